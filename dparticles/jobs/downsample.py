"""Downsample Particles: real-space crop/pad, Fourier crop, lowpass and recentring in one Fourier
pass per particle, into one output folder per requested size, with metadata kept true.

``downsample(source, out, ...)`` is ``to_stacks(ops.downsample(open_particles(source), ...), out)``:
the images and metadata rules are those of :func:`dparticles.ops.downsample`. Several sizes are
written in one run and share one read and one forward FFT per particle.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import xarray as xr

from dparticles import ops
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.store import StoreResult, to_stacks


def downsample(source: str | os.PathLike | xr.Dataset, out: str | os.PathLike, *, crop_box: int | None = None,
               fourier_box: int | list[int] | None = None,
               approx_pixel_size: float | list[float] | None = None, lowpass: float | None = None, recenter: bool = False, float16: bool = False,
               micrograph_pixel_size: float | None = None, batch_size: int | None = None,
               zarr: str | os.PathLike | None = None, overwrite: bool = False, cluster: dict | None = None,
               project_dir: str | os.PathLike | None = None, log=print, **open_options) -> list[StoreResult]:
    """Downsample ``source`` into ``out`` (one folder ``boxN`` per size when several are asked for).

    ``source`` is anything :func:`open_particles` reads (opened with ``open_options``) or an opened
    Dataset (``open_options`` such as ``pixel_size`` override the input's values). ``fourier_box`` or
    ``approx_pixel_size`` (the target, Å, CryoSPARC's "desired approx. pixel size": the nearest even
    box is used and the achieved pixel size reported) may be one value or several. ``zarr`` also writes a cache (one
    ``boxN.zarr`` inside it per size when several). See :func:`dparticles.ops.downsample`.
    """
    ds = source if isinstance(source, xr.Dataset) else open_particles(source, **open_options)
    several = isinstance(fourier_box, (list, tuple)) and len(fourier_box) > 1 or \
        isinstance(approx_pixel_size, (list, tuple)) and len(approx_pixel_size) > 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = ops.downsample(ds, crop_box=crop_box, fourier_box=fourier_box, pixel_size=approx_pixel_size,
                                 lowpass=lowpass, recenter=recenter, micrograph_pixel_size=micrograph_pixel_size)
    for w in caught:  # said once, in the job's log
        log(f"note: {w.message}")
    results = results if isinstance(results, list) else [results]
    if not several and len(results) == 1 and crop_box is None and lowpass is None and not recenter \
            and results[0].sizes["x"] == ds.sizes["x"]:
        raise ParticleError("nothing to do: give --crop-box, --fourier-box/--approx-pixel-size, --lowpass or --recenter "
                            "(to copy particles unchanged, use restack)")
    boxes = [int(r.sizes["x"]) for r in results]
    outs = [Path(out)] if len(results) == 1 else [Path(out) / f"box{b}" for b in boxes]
    zarrs = None if zarr is None else [Path(zarr)] if len(results) == 1 else [Path(zarr) / f"box{b}.zarr" for b in boxes]
    written = to_stacks(results, outs, batch_size=batch_size, float16=float16, zarr=zarrs, overwrite=overwrite,
                        cluster=cluster, project_dir=project_dir, label="downsample", log=log,
                        parameters={"source": source if not isinstance(source, xr.Dataset) else "a Dataset",
                                    "crop_box": crop_box, "fourier_box": fourier_box, "approx_pixel_size": approx_pixel_size,
                                    "lowpass": lowpass, "recenter": recenter,
                                    "micrograph_pixel_size": micrograph_pixel_size, **open_options})
    for r, w in zip(results, written):
        achieved = sorted({float(p) for p in r["pixel_size"].values})
        w.notes.insert(0, f"box {ds.sizes['x']} -> " + (f"crop {crop_box} -> " if crop_box else "")
                       + f"{r.sizes['x']}: pixel size " + ", ".join(f"{p:.6g}" for p in achieved) + " Å")
        if recenter and r.attrs.get("micrograph_pixel_size_from"):  # only when there were coordinates to move
            w.notes.append(f"recentred coordinates use the micrograph pixel size from "
                           f"{r.attrs['micrograph_pixel_size_from']}")
    return written
