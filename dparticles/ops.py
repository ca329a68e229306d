"""Lazy image transforms on an opened particle Dataset: Dataset in, Dataset out, nothing read.

A new op is a pure numpy kernel (in :mod:`dparticles.kernels`, or one's own) plus a few lines here:
check the arguments, make one :func:`map_particles` call over the kernel, and return
``_result(ds, images, box, pixel_size)`` with the metadata the images now have.

Each function checks its arguments first (raising :class:`ParticleError` before any graph is
built, also for boxes whose task of one particle would not fit the memory budget), then returns a
new Dataset whose ``images`` is one ``blockwise`` call of its kernel (:func:`kernels.crop_pad`,
:func:`kernels.fourier_crop`, :func:`kernels.lowpass`, :func:`kernels.recenter`, or the fused
:func:`kernels.downsample_chunk`) over the input's particle chunks, float32, each chunk cut where the
kernel's peak (:func:`kernels.task_peak_bytes`) would exceed 75% of ``dparticles.memory-budget``,
and whose metadata already say what the images now are: ``pixel_size = psize * C / b`` in float64
(``C`` the box after the real-space crop, ``b`` the output box), ``box``, and after recentring zero
shifts and picking coordinates moved by ``- shift / micrograph_pixel_size``. Every other coordinate
and attribute of the input is kept, so the result still names its source stacks.

:func:`downsample` does a crop, Fourier crop, lowpass and recentring in one Fourier pass per image;
asked for several sizes it returns one Dataset per size, all derived from ONE read and ONE forward
FFT per image (computed together, e.g. ``dask.compute(a.images, b.images)``, they share them).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence

import dask.array as da
import numpy as np
import xarray as xr
from dask.utils import format_bytes, parse_bytes

from dparticles import config, kernels, planning
from dparticles.errors import ParticleError

__all__ = ["crop", "downsample", "fourier_crop", "lowpass", "map_particles", "recenter"]

# micrograph pixel size for recentred coordinates: evidence about micrographs only, best first (see
# CONVENTIONS.md), each coordinate with the RELION or CryoSPARC label it holds. rlnMicrographOriginalPixelSize
# is not among them: it is the movies' pixel size, which motion correction may have binned.
MICROGRAPH_PIXEL_SIZE = {"star_optics:rlnMicrographPixelSize": "rlnMicrographPixelSize",
                         "star:rlnMicrographPixelSize": "rlnMicrographPixelSize",
                         "cs:location.micrograph_psize_A": "location/micrograph_psize_A"}
MOVIE_PIXEL_SIZE = ("star_optics:rlnMicrographOriginalPixelSize", "star:rlnMicrographOriginalPixelSize")
_LISTS = (list, tuple, np.ndarray)
MAX_UPSAMPLING = 4  # Fourier boxes beyond this many times the box are refused as typos
TASK_SHARE = 0.75  # of dparticles.memory-budget a task's arrays may hold; the rest is the worker's own


def map_particles(ds: xr.Dataset, kernel: Callable[..., np.ndarray], *, out_box: int | None = None,
                  per_particle: Sequence[np.ndarray] = (), peak: Callable[[int], int] | None = None,
                  dtype: np.dtype | type = np.float32, name: str | None = None, **kwargs: object) -> da.Array:
    """``kernel(images, *per_particle, **kwargs)`` over the particle chunks of ``ds.images``: one
    ``blockwise`` call, one task per chunk, each chunk holding whole images (y and x whole).

    ``kernel`` takes a numpy stack ``(n, y, x)`` and returns a ``(n, out_box, out_box)`` stack of
    ``dtype`` (``out_box`` default: the input's box). ``per_particle`` are arrays of one value per
    particle (pixel size, shifts): after the stack, the kernel gets each one's values for its chunk's
    particles, or, when every one of them holds a single value (one pixel size, no shifts: the usual
    case), that value as an array of length 1, and no task per chunk carries them. ``peak(n)``, the
    bytes a task of ``n`` particles holds at its peak, cuts the chunks that would exceed
    :data:`TASK_SHARE` of ``dparticles.memory-budget`` (:func:`planning.fit_chunks`); without it the
    chunks stay as they are. ``name`` prefixes the layer's name. Returns the lazy images; for a
    kernel that keeps the box, ``ds.assign(images=(("particle", "y", "x"), images))`` is the new
    Dataset, e.g. contrast inversion: ``ops.map_particles(ds, np.negative)``.
    """
    images = _whole_images(ds, peak)
    box = int(ds.sizes["x"]) if out_box is None else out_box
    return da.blockwise(kernel, "pyx", images, "pyx", *_blocks(per_particle, images.chunks[0]), **kwargs,
                        adjust_chunks={"y": box, "x": box}, token=name, dtype=dtype,
                        meta=np.empty((0, 0, 0), dtype=dtype))


def crop(ds: xr.Dataset, box: int) -> xr.Dataset:
    """Real-space crop or pad to ``box`` (centred as RELION centres, padding with each image's mean).

    The pixel size is unchanged; ``box`` is updated. See :func:`kernels.crop_pad`.
    """
    psize = _pixel_sizes(ds)
    box = _check_box(box, "crop box")
    _warn_odd_requests([box], box, None, 0.0)
    peak = _peak(ds, box, [box], fourier=False)
    return _result(ds, map_particles(ds, kernels.crop_pad, out_box=box, peak=peak, name="crop", box=box), box,
                   psize.copy())


def fourier_crop(ds: xr.Dataset, box: int | Sequence[int] | None = None, *,
                 pixel_size: float | Sequence[float] | None = None) -> xr.Dataset | list[xr.Dataset]:
    """Fourier-crop (or pad) to ``box``, or to the even box nearest to the target ``pixel_size`` (Å).

    Give one of the two; a list gives a list of Datasets sharing one read and FFT per image (the
    multi-size pass of :func:`downsample`). See :func:`kernels.fourier_crop`.
    """
    if box is None and pixel_size is None:
        raise ParticleError("give a Fourier box or a target pixel size to Fourier-crop to")
    if isinstance(box, _LISTS) or isinstance(pixel_size, _LISTS):
        return downsample(ds, fourier_box=box, pixel_size=pixel_size)
    psize = _pixel_sizes(ds)
    c = int(ds.sizes["x"])
    [b] = _output_boxes(box, pixel_size, c, psize)
    _warn_odd_requests([b], c, None, 0.0)
    peak = _peak(ds, None, [b], fourier=b != c)
    images = map_particles(ds, kernels.fourier_crop, out_box=b, peak=peak, name=f"fourier-crop-box{b}", box=b)
    return _result(ds, images, b, _scaled(psize, c, b))


def lowpass(ds: xr.Dataset, resolution: float) -> xr.Dataset:
    """Lowpass at ``resolution`` Å (RELION's raised cosine two shells wide, see :func:`kernels.downsample`).

    Each particle is filtered with its own pixel size (optics groups may differ).
    """
    psize = _pixel_sizes(ds)
    _check_lowpass(resolution)
    c = int(ds.sizes["x"])
    _warn_odd_requests([c], c, resolution, float(psize.max()))
    peak = _peak(ds, None, [c], fourier=True, split=len(np.unique(psize)) > 1)
    images = map_particles(ds, kernels.lowpass, per_particle=[psize], peak=peak, name="lowpass", resolution=resolution)
    return _result(ds, images, c, psize.copy())


def recenter(ds: xr.Dataset, *, micrograph_pixel_size: float | None = None) -> xr.Dataset:
    """Shift each image by its origin (an exact Fourier phase ramp, :func:`kernels.recenter`): shifts
    become zero and the picking coordinates move by ``- shift / micrograph_pixel_size`` (see
    :func:`downsample`)."""
    psize = _pixel_sizes(ds)
    _check_micrograph_pixel_size(micrograph_pixel_size)
    c = int(ds.sizes["x"])
    _warn_odd_requests([c], c, None, 0.0)
    shifts = _shifts_px(ds, psize)
    mic, mic_from = _micrograph_pixel_size(ds, micrograph_pixel_size)
    peak = _peak(ds, None, [c], fourier=True)
    images = map_particles(ds, kernels.recenter, per_particle=list(shifts.T), peak=peak, name="recenter")
    return _result(ds, images, c, psize.copy(), mic, mic_from)


def downsample(ds: xr.Dataset, *, crop_box: int | None = None, fourier_box: int | Sequence[int] | None = None,
               pixel_size: float | Sequence[float] | None = None, lowpass: float | None = None,
               recenter: bool = False, micrograph_pixel_size: float | None = None) -> xr.Dataset | list[xr.Dataset]:
    """Crop/pad in real space, then Fourier-crop, lowpass and recentre in one Fourier pass per image.

    Parameters
    ----------
    ds : xarray.Dataset
        As :func:`dparticles.open_particles` returns it (``images`` a dask array).
    crop_box : int, optional
        Real-space box (>= 2) applied first; ``C`` below (default: the input box).
    fourier_box, pixel_size : int or float, or a list of them, optional
        Output box(es), or target pixel size(s) in Å (the nearest even box; the achieved pixel size
        ``psize * C / b`` is stored). At most one of the two; default: ``C``.
    lowpass : float, optional
        Corner resolution in Å.
    recenter : bool
        Apply each particle's shift (needs 2D or 3D alignments).
    micrograph_pixel_size : float, optional
        Å per micrograph pixel, for moving the picking coordinates; default: the best evidence in the
        metadata (:data:`MICROGRAPH_PIXEL_SIZE`, in order). Particles with coordinates and no such
        evidence are refused. ``attrs["micrograph_pixel_size_from"]`` names the label used
        (``rlnMicrographPixelSize``, ``location/micrograph_psize_A`` or ``--micrograph-pixel-size``);
        particles without coordinates have none.

    Returns
    -------
    xarray.Dataset, or a list of them (one per box) if ``fourier_box`` or ``pixel_size`` is a list.

    Raises
    ------
    ParticleError
        On a bad argument, before any graph is built.
    """
    psize = _pixel_sizes(ds)
    many = isinstance(fourier_box, _LISTS) or isinstance(pixel_size, _LISTS)
    crop_box = _check_box(crop_box, "crop box") if crop_box is not None else None
    c = crop_box or int(ds.sizes["x"])
    boxes = _output_boxes(fourier_box, pixel_size, c, psize)
    if lowpass is not None:
        _check_lowpass(lowpass)
    _check_micrograph_pixel_size(micrograph_pixel_size)
    _warn_odd_requests(boxes, c, lowpass, float(psize.max()))
    shifts = _shifts_px(ds, psize) if recenter else None
    mic, mic_from = _micrograph_pixel_size(ds, micrograph_pixel_size) if recenter else (None, None)
    peak = _peak(ds, crop_box, boxes, fourier=recenter or lowpass is not None or any(b != c for b in boxes),
                 split=lowpass is not None and len(np.unique(psize)) > 1)

    per_particle = [psize] if shifts is None else [psize, *shifts.T]
    options = {"crop_box": crop_box, "boxes": tuple(boxes), "lowpass": lowpass}
    if len(boxes) == 1:
        images = [map_particles(ds, kernels.downsample_chunk_one, out_box=boxes[0], per_particle=per_particle,
                                peak=peak, name=f"downsample-box{boxes[0]}", **options)]
    else:
        images = _several_sizes(ds, per_particle, peak, options)
    out = [_result(ds, img, b, _scaled(psize, c, b), mic, mic_from) for img, b in zip(images, boxes)]
    return out if many else out[0]


def _several_sizes(ds: xr.Dataset, per_particle: list[np.ndarray], peak: Callable[..., int],
                   options: dict) -> list[da.Array]:
    """One lazy image array per output box, all picked from a single blockwise layer of
    :func:`kernels.downsample_chunk` whose every block is the tuple of outputs of one read and one
    forward FFT (chunks and per-particle arrays as :func:`map_particles` makes them)."""
    images = _whole_images(ds, peak)
    along = images.chunks[0]
    meta = np.empty((0, 0, 0), dtype=np.float32)
    # blocks of this layer are tuples of stacks, one per box: never computed alone, only picked from
    outputs = da.blockwise(kernels.downsample_chunk, "pyx", images, "pyx", *_blocks(per_particle, along), **options,
                           token="downsample", dtype=np.float32, meta=meta)
    return [da.map_blocks(operator.getitem, outputs, k, chunks=(along, (b,), (b,)), dtype=np.float32, meta=meta,
                          token=f"downsample-box{b}")
            for k, b in enumerate(options["boxes"])]


def _whole_images(ds: xr.Dataset, peak: Callable[[int], int] | None) -> da.Array:
    """``ds.images`` with y and x whole in every chunk and, given ``peak``, the particle chunks whose
    task would not fit the budget cut to fit (the others kept)."""
    images = da.asarray(ds["images"].data)
    if images.numblocks[1:] != (1, 1):
        images = images.rechunk({1: -1, 2: -1})
    budget = _task_budget()
    if peak is not None and peak(max(images.chunks[0], default=0)) > budget:
        images = images.rechunk({0: planning.fit_chunks(images.chunks[0], peak, budget, kernels.FFT_GROUP)})
    return images


def _blocks(per_particle: Sequence[np.ndarray], chunks: tuple[int, ...]) -> list:
    """``blockwise`` arguments for the per-particle arrays: a slice per chunk of each (not the whole
    array in every task), or, when each holds one value, that value as an array of length 1."""
    arrays = [np.asarray(a) for a in per_particle]
    if all((a == a[:1]).all() for a in arrays):
        return [x for a in arrays for x in (a[:1], None)]
    return [x for a in arrays for x in (da.from_array(np.ascontiguousarray(a), chunks=(chunks,)), "p")]


def _pixel_sizes(ds: xr.Dataset) -> np.ndarray:
    """The particles' pixel sizes in float64, once ``ds`` is known to hold images and pixel sizes."""
    if "images" not in ds or "pixel_size" not in ds.coords:
        raise ParticleError("the dataset has no images or no pixel size (opened with ignore_raw?)",
                            path=ds.attrs.get("source"))
    return ds["pixel_size"].values.astype(np.float64)


def _scaled(psize: np.ndarray, c: int, b: int) -> np.ndarray:
    """The pixel size after Fourier-cropping a ``c`` box to ``b``: ``psize * c / b``, in float64."""
    # but psize itself when c == b: 2.8 * 96 / 96 is 2.7999999999999994 in float64
    return psize * c / b if b != c else psize.copy()


def _check_lowpass(resolution: object) -> None:
    if not _positive(resolution):
        raise ParticleError(f"lowpass must be a finite resolution in Å greater than 0, got {resolution!r}")


def _check_micrograph_pixel_size(value: object) -> None:
    if value is not None and not _positive(value):
        raise ParticleError(f"micrograph pixel size must be greater than 0 Å, got {value!r}")


def _warn_odd_requests(boxes: list[int], c: int, lowpass: float | None, psize: float) -> None:
    """Say so when a request is allowed but probably not meant: an odd box, a Fourier box larger
    than the box (that pads in Fourier space: upsampling adds no information), a lowpass finer than
    the output can hold (it then changes nothing)."""
    for b in boxes:
        if b % 2:
            warnings.warn(f"Fourier box {b} is odd; RELION and CryoSPARC expect even boxes", stacklevel=3)
        if b > c:
            warnings.warn(f"Fourier box {b} is larger than the box {c}: this pads in Fourier space (upsamples, "
                          "adding no information); use --crop-box to pad in real space", stacklevel=3)
        nyquist = 2 * psize * c / b
        if lowpass is not None and lowpass < nyquist:
            warnings.warn(f"lowpass {lowpass:g} Å is beyond the {b}-pixel output's Nyquist limit "
                          f"({nyquist:.4g} Å): it changes nothing there", stacklevel=3)


def _peak(ds: xr.Dataset, crop_box: int | None, boxes: list[int], *, fourier: bool,
          split: bool = False) -> Callable[..., int]:
    """``peak(n, outs=boxes)``: bytes one task of ``n`` particles holds at its peak
    (:func:`kernels.task_peak_bytes` for these images and arguments; ``fourier``: with a Fourier
    pass, ``split``: a lowpass over several pixel sizes). Refused (:func:`_check_memory`) when a task
    of one particle would not fit the budget."""
    box, itemsize = int(ds.sizes["x"]), int(ds["images"].dtype.itemsize)

    def peak(n: int, outs: Sequence[int] = tuple(boxes)) -> int:
        return kernels.task_peak_bytes(n, box, crop_box, outs, itemsize=itemsize, fourier=fourier, split=split)

    _check_memory(peak, crop_box, boxes, box)
    return peak


def _task_budget() -> int:
    """Bytes a task's arrays may hold: :data:`TASK_SHARE` of ``dparticles.memory-budget``."""
    return int(TASK_SHARE * parse_bytes(str(config.get("memory-budget"))))


def _check_memory(peak: Callable[..., int], crop_box: int | None, boxes: list[int], box: int) -> None:
    """Refuse sizes whose task of one particle would not fit the budget, naming the size to blame: the
    crop box (or the input box) if even a 2-pixel output would not fit, else the largest Fourier box."""
    need = peak(1)
    if need <= _task_budget():
        return
    if peak(1, (2,)) > _task_budget():
        what = f"crop box {crop_box} (--crop-box)" if crop_box is not None else f"the images' box {box}"
    else:
        what = f"Fourier box {max(boxes)} (--fourier-box) from a {crop_box or box}-pixel box"
    raise ParticleError(f"{what} would need {format_bytes(need)} for a task of one particle, more than "
                        f"{TASK_SHARE:.0%} of the memory budget of {config.get('memory-budget')} per worker "
                        "(dparticles.memory-budget); ask for a smaller box or a larger budget")


def _positive(value: object) -> bool:
    """Whether ``value`` is a finite real number greater than 0 (not a bool)."""
    return (not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
            and math.isfinite(value) and value > 0)


def _check_box(box: object, what: str) -> int:
    if isinstance(box, bool) or not isinstance(box, int | np.integer) or box < 2:
        raise ParticleError(f"{what} must be a whole number of pixels of at least 2, got {box!r}")
    return int(box)


def _output_boxes(fourier_box, pixel_size, c: int, psize: np.ndarray) -> list[int]:
    """Output boxes: as given, or for each target pixel size the nearest even box (one for all
    optics groups, else refused); ``[c]`` if neither is given."""
    if fourier_box is not None and pixel_size is not None:
        raise ParticleError("give a Fourier box or a target pixel size (--fourier-box or --approx-pixel-size), "
                            "not both")
    if fourier_box is not None:
        values = list(fourier_box) if isinstance(fourier_box, _LISTS) else [fourier_box]
        if not values:
            raise ParticleError("give at least one Fourier box, got an empty list")
        boxes = [_check_box(b, "Fourier box") for b in values]
        for b in boxes:  # a typo such as 200000 would ask every task for 160 GB per image
            if b > MAX_UPSAMPLING * c:
                raise ParticleError(f"Fourier box {b} is more than {MAX_UPSAMPLING} times the box {c}; expected a "
                                    "box near or below it (Fourier padding adds no information)")
        return _once(boxes, None)
    if pixel_size is None:
        return [c]
    targets = list(pixel_size) if isinstance(pixel_size, _LISTS) else [pixel_size]
    if not targets:
        raise ParticleError("give at least one target pixel size, got an empty list")
    for target in targets:
        if not _positive(target):
            raise ParticleError(f"target pixel size must be greater than 0 Å, got {target!r}")
    boxes = []
    for target in targets:
        per_group = sorted({kernels.fourier_box_for_pixel_size(c, float(p), float(target)) for p in np.unique(psize)})
        if len(per_group) > 1:
            raise ParticleError(f"optics groups with pixel sizes {np.unique(psize).tolist()} Å give different boxes "
                                f"{per_group} for {target} Å; downsample each optics group on its own, or give "
                                "--fourier-box")
        boxes.append(per_group[0])
    return _once(boxes, pixel_size)


def _once(boxes: list[int], pixel_size) -> list[int]:
    """``boxes`` if no box is asked for twice (each size is one output folder), else refused."""
    twice = sorted({b for b in boxes if boxes.count(b) > 1})
    if twice:
        how = " (target pixel sizes " + ", ".join(f"{t:g}" for t in pixel_size) + " Å give the same box)" \
            if pixel_size is not None else ""
        raise ParticleError(f"box {twice[0]} is asked for twice{how}; give each output size once")
    return boxes


def _shifts_px(ds: xr.Dataset, psize: np.ndarray) -> np.ndarray:
    """Each particle's origin in input pixels, shaped (n, 2) as (ox, oy)."""
    pose = ds.attrs.get("pose", "none")
    if pose == "none":
        raise ParticleError("--recenter needs aligned shifts (2D or 3D alignments), and these particles have none",
                            path=ds.attrs.get("source"))
    if "shift_x" not in ds.coords or "shift_y" not in ds.coords:
        raise ParticleError(f"--recenter needs aligned shifts, and these particles have {pose.upper()} angles but "
                            "no shifts (origins) to recentre by", path=ds.attrs.get("source"))
    shifts = np.stack([ds["shift_x"].values / psize, ds["shift_y"].values / psize], axis=1).astype(np.float64)
    bad = ~np.isfinite(shifts).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ParticleError(f"shift ({ds['shift_x'].values[row]!r}, {ds['shift_y'].values[row]!r}) Å is not finite; "
                            "expected a number to recentre by", path=ds.attrs.get("source"), particle=row + 1)
    return shifts


def _micrograph_pixel_size(ds: xr.Dataset, override: float | None) -> tuple[np.ndarray, str | None]:
    """Per-particle micrograph pixel size (Å) for moving the picking coordinates, and the label it came
    from: the argument, else the first of :data:`MICROGRAPH_PIXEL_SIZE` present. Particles without
    coordinates need none (NaN, no label); with coordinates and no evidence they are refused."""
    n = ds.sizes["particle"]
    if "coord_x" not in ds.coords and "coord_y" not in ds.coords:
        return np.full(n, np.nan), None
    if override is not None:
        return np.full(n, float(override)), "--micrograph-pixel-size"
    for name, label in MICROGRAPH_PIXEL_SIZE.items():
        if name in ds.coords:
            values = np.asarray(ds[name].values, dtype=np.float64)
            bad = ~(np.isfinite(values) & (values > 0))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ParticleError(f"{label} {float(values[row])!r} is not a pixel size greater than 0 Å; "
                                    "give --micrograph-pixel-size", path=ds.attrs.get("source"), particle=row + 1)
            return values, label
    movies = next((np.unique(ds[name].values) for name in MOVIE_PIXEL_SIZE if name in ds.coords), None)
    hint = "" if movies is None else (f"; rlnMicrographOriginalPixelSize {', '.join(f'{v:g}' for v in movies)} Å "
                                      "is the movies', which motion correction may have binned")
    raise ParticleError("--recenter moves the picking coordinates in micrograph pixels, and the metadata give no "
                        "micrograph pixel size (looked for rlnMicrographPixelSize, location/micrograph_psize_A"
                        f"{hint}); give --micrograph-pixel-size", path=ds.attrs.get("source"))


def _result(ds: xr.Dataset, images: da.Array, box: int, new_psize: np.ndarray, mic: np.ndarray | None = None,
            mic_from: str | None = None) -> xr.Dataset:
    """``ds`` with new images, pixel size and box; after recentring zero shifts and moved coordinates."""
    out = ds.drop_vars([name for name, v in ds.variables.items() if {"y", "x"} & set(v.dims)])
    coords = {"pixel_size": ("particle", new_psize), "box": ("particle", np.full(ds.sizes["particle"], box, np.int64))}
    if mic is not None:
        for axis in "xy":
            shift = ds[f"shift_{axis}"].values
            if f"coord_{axis}" in ds.coords:
                coords[f"coord_{axis}"] = ("particle", ds[f"coord_{axis}"].values - shift / mic)
            coords[f"shift_{axis}"] = ("particle", np.zeros_like(shift))
    out = out.assign_coords({name: (*value, ds[name].attrs if name in ds.coords else {})
                             for name, value in coords.items()})  # units stay
    out["images"] = (("particle", "y", "x"), images)
    out.attrs = dict(ds.attrs)
    if mic is not None:  # recentred now: what an earlier recentring said no longer describes the coordinates
        out.attrs.pop("micrograph_pixel_size_from", None)
    if mic_from is not None:
        out.attrs["micrograph_pixel_size_from"] = mic_from
    return out
