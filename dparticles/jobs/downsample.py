"""Downsample Particles: real-space crop/pad, Fourier crop, lowpass and recentring in one Fourier
pass per particle, into one output folder per requested size, with metadata kept true.

Output pixel size is ``pixel_size * C / b`` in float64 (``C`` the box after the real-space crop,
``b`` the output box). Shifts are stored in Å and so do not change with the box; recentring
applies each particle's shift exactly (a Fourier phase ramp), writes origins of zero and moves
the picking coordinate by the applied shift in micrograph pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr
from dask.base import tokenize

from dparticles import config, kernels
from dparticles.batching import JobResult, batch_names, float16_report, run_batches, source_runs, source_token
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.jobs.results import write_results
from dparticles.output import prepare_output
from dparticles.sinks import check_zarr_target
from dparticles.transforms import Transform
from dparticles.writer import Batch, Output


def downsample(source: str | os.PathLike, out: str | os.PathLike, *, crop_box: int | None = None,
               fourier_box: int | list[int] | None = None, pixel_size: float | list[float] | None = None,
               lowpass: float | None = None, recenter: bool = False, float16: bool = False,
               micrograph_pixel_size: float | None = None, batch_size: int | None = None,
               zarr: str | os.PathLike | None = None, overwrite: bool = False, cluster: dict | None = None,
               log=print, **open_options) -> list[JobResult]:
    """Downsample ``source`` into ``out`` (one folder per size when several are asked for).

    ``fourier_box`` or ``pixel_size`` (target, Å; the nearest even box is used and the achieved
    pixel size reported) may be one value or several; give at most one of the two. ``lowpass``
    is a corner resolution in Å (raised cosine two shells wide, see :func:`kernels.downsample`).
    ``micrograph_pixel_size`` (Å) converts recentring shifts into picking-coordinate pixels when the
    metadata does not say it (``rlnMicrographPixelSize`` / ``location/micrograph_psize_A``).
    """
    if fourier_box is not None and pixel_size is not None:
        raise ParticleError("give --fourier-box or --pixel-size, not both")
    ds = open_particles(source, **open_options)
    box_in = int(ds.sizes["x"])
    crop = _check_box(crop_box, "crop box") if crop_box is not None else None
    c = crop or box_in
    psize = ds["pixel_size"].values.astype(np.float64)
    boxes = _output_boxes(fourier_box, pixel_size, c, psize)
    if lowpass is not None and not lowpass > 0:
        raise ParticleError(f"lowpass must be a resolution in Å greater than 0, got {lowpass}")
    if crop is None and lowpass is None and not recenter and all(b == c for b in boxes):
        raise ParticleError("nothing to do: give --crop-box, --fourier-box/--pixel-size, --lowpass or --recenter "
                            "(to copy particles unchanged, use restack)")
    shifts_px = _recenter_shifts(ds, psize) if recenter else None
    zarrs = [None] * len(boxes) if zarr is None else \
        [Path(zarr)] if len(boxes) == 1 else [Path(zarr) / f"box{b}.zarr" for b in boxes]
    for target in zarrs:  # before any work: no cache may replace an input or an unasked-for cache
        if target is not None:
            check_zarr_target(target, ds, overwrite=overwrite)
    batch_size = int(config.get("batch-size", batch_size))
    dtype = "<f2" if float16 else "<f4"
    runs = source_runs(ds, batch_size)
    transform = Transform(crop, tuple(boxes), lowpass)
    outs = [Path(out)] if len(boxes) == 1 else [Path(out) / f"box{b}" for b in boxes]
    base = source_token(ds)
    dirs = [prepare_output(o, ds, overwrite=overwrite, job="downsample",
                           token=tokenize("downsample", base, crop, b, lowpass, recenter, dtype, batch_size))
            for o, b in zip(outs, boxes)]
    names = batch_names(len(runs))
    batches = [Batch(runs=r, first=first,
                     outputs=tuple(Output(str(d / name), b, dtype, float(psize[first] * c / b))
                                   for d, b in zip(dirs, boxes)),
                     transform=transform,
                     shifts=None if shifts_px is None else shifts_px[first:first + sum(s - a for _, a, s in r)],
                     pixel_sizes=psize[first:first + sum(s - a for _, a, s in r)])
               for (first, r), name in zip(runs, names)]
    total, summary = run_batches(batches, label="downsample", cluster=cluster or {}, log=log)
    n = ds.sizes["particle"]
    results = []
    for d, b, target in zip(dirs, boxes, zarrs):
        achieved = sorted({float(p) for p in psize * c / b})
        notes = [f"box {box_in} -> " + (f"crop {c} -> " if crop else "") + f"{b}: pixel size "
                 + ", ".join(f"{p:.6g}" for p in achieved) + " Å"]
        if float16:
            notes.append(float16_report(total, n * sum(o * o for o in boxes))  # over all sizes written
                         + (f" (all {len(boxes)} sizes)" if len(boxes) > 1 else ""))
        notes += write_results(d, ds, batches, names, zarr=target, overwrite=overwrite, cluster=cluster or {},
                               batch_size=batch_size, log=log,
                               updates=_metadata_updates(ds, psize * c / b, b, recenter, micrograph_pixel_size, log))
        results.append(JobResult(d, n, len(batches), total["kept"] // len(boxes), summary, notes))
    return results


def _check_box(box: int, what: str) -> int:
    if isinstance(box, bool) or not isinstance(box, int | np.integer) or box < 2:
        raise ParticleError(f"{what} must be a whole number of pixels of at least 2, got {box!r}")
    return int(box)


def _output_boxes(fourier_box, pixel_size, c: int, psize: np.ndarray) -> list[int]:
    """Output boxes: as given, or the nearest even box for each target pixel size."""
    if fourier_box is not None:
        values = fourier_box if isinstance(fourier_box, (list, tuple)) else [fourier_box]
        return [_check_box(b, "Fourier box") for b in values]
    if pixel_size is None:
        return [c]
    boxes = []
    for target in pixel_size if isinstance(pixel_size, (list, tuple)) else [pixel_size]:
        if not target > 0:
            raise ParticleError(f"target pixel size must be greater than 0 Å, got {target}")
        per_group = sorted({kernels.fourier_box_for_pixel_size(c, float(p), float(target)) for p in np.unique(psize)})
        if len(per_group) > 1:
            raise ParticleError(f"optics groups with pixel sizes {np.unique(psize).tolist()} Å give different boxes "
                                f"{per_group} for {target} Å; downsample each optics group on its own, or give "
                                "--fourier-box")
        boxes.append(per_group[0])
    return boxes


def _recenter_shifts(ds: xr.Dataset, psize: np.ndarray) -> np.ndarray:
    """Each particle's aligned origin in input pixels, (ox, oy)."""
    if ds.attrs.get("pose", "none") == "none" or "shift_x" not in ds.coords:
        raise ParticleError("--recenter needs aligned shifts (2D or 3D alignments), and these particles have none",
                            path=ds.attrs.get("source"))
    return np.stack([ds["shift_x"].values / psize, ds["shift_y"].values / psize], axis=1)


def _metadata_updates(ds: xr.Dataset, new_psize: np.ndarray, box: int, recenter: bool,
                      micrograph_pixel_size: float | None, log) -> dict:
    """New pixel size and box; after recentring, zero origins and coordinates moved by the shift."""
    updates: dict = {"pixel_size": new_psize, "box": np.full(ds.sizes["particle"], box, dtype=np.int64)}
    if recenter:
        mic_psize = _micrograph_pixel_size(ds, micrograph_pixel_size, log)
        for axis in "xy":
            shift = ds[f"shift_{axis}"].values
            if f"coord_{axis}" in ds.coords:
                updates[f"coord_{axis}"] = ds[f"coord_{axis}"].values - shift / mic_psize
            updates[f"shift_{axis}"] = np.zeros_like(shift)
    return updates


def _micrograph_pixel_size(ds: xr.Dataset, override: float | None, log) -> np.ndarray:
    """Pixel size of the micrographs the coordinates refer to: the override, else RELION's
    rlnMicrographPixelSize or CryoSPARC's location/micrograph_psize_A, else (said in the log) the
    particles' own pixel size, which is right only for particles extracted without rescaling."""
    if override is not None:
        if not override > 0:
            raise ParticleError(f"micrograph pixel size must be greater than 0 Å, got {override}")
        return np.full(ds.sizes["particle"], float(override))
    for name in ("star_optics:rlnMicrographPixelSize", "star:rlnMicrographPixelSize", "cs:location.micrograph_psize_A"):
        if name in ds.coords:
            return ds[name].values.astype(np.float64)
    if "coord_x" in ds.coords:
        log("note: the metadata gives no micrograph pixel size, so recentred coordinates assume the particles' "
            "own pixel size (extraction without rescaling); give --micrograph-pixel-size if they were rescaled")
    return ds["pixel_size"].values.astype(np.float64)
