"""``open_particles``: particles as they are on disk, opened lazily as an xarray Dataset.

``images`` (particle, y, x) is a dask array over the source stacks; every metadata column of
:mod:`dparticles.metadata` is a coordinate along ``particle``, plus ``image_path`` (the resolved
stack) and ``stack_id``, which indexes the ``stack`` dimension (``stack_path``, ``stack_images``,
``stack_offset``, ``stack_dtype``: every source stack as its header describes it). Opening reads
metadata and stack headers only, never pixel data.

Memory: ten million particles take about 150 bytes each (see ``benchmarks/scale_bench.py``):

- ``particle`` is a ``pandas.RangeIndex`` (no array);
- numbers are numpy arrays, and a value the same for every particle (the optics values of a single
  optics group, the box, the data sign) is a read-only zero-stride view (``np.broadcast_to``), which
  takes no memory: select with ``isel``/``where`` (which copy what they keep) or build new arrays
  rather than writing into ``ds[name].values``;
- text (``image_name``, ``micrograph``, ``image_path``, ``optics_group_name``, ``star:`` text) is an
  object array whose elements are references to one Python string per distinct value (8 bytes a
  particle, where a string each would take 60 or more), put in place without xarray's conversion
  through pandas, which would make a string per particle. ``.values`` gives strings as before.

Select with ``ds.isel(particle=np.flatnonzero(mask))``: it indexes each array once.
``ds.where(mask, drop=True)`` works too, but xarray aligns (deep-copies) every object coordinate on
the way, element by element: a few seconds per text coordinate at ten million particles.
:func:`table` gives the metadata as a DataFrame with text as ``pandas.Categorical``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from dparticles import formats
from dparticles.formats import cryosparc, relion
from dparticles.errors import ParticleError
from dparticles.metadata import POSE, UNITS, Table, assign, categorical
from dparticles.safe import RUN_MARKER
from dparticles.stack import SOURCE_READ, check_indices, lazy_images, read_infos, resolve_stacks, search_roots

CHUNK_BYTES = 64 * 2**20  # default dask chunk: a few tens of MB of images, whatever the box
OVERRIDES = {"pixel_size": "pixel size (Å)", "voltage": "voltage (kV)", "cs": "Cs (mm)",
             "amp_contrast": "amplitude contrast", "dose": "dose (e/Å²)"}


def open_particles(path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                   pixel_size: float | None = None, voltage: float | None = None, cs: float | None = None,
                   amp_contrast: float | None = None, dose: float | None = None, sign: int | None = None,
                   ignore_raw: bool = False, ignore_pose: bool = False, apply_sign: bool = False,
                   chunks: int | None = None) -> xr.Dataset:
    """Open a RELION ``.star``, a CryoSPARC ``.cs``, a bare ``.mrcs``/``.mrc`` stack, a dparticles
    output folder or a zarr cache, through the engine of :mod:`dparticles.formats` that reads it.

    Microscope values given here override the file's. ``sign`` sets the data sign (+1 dark
    particles on a light background, -1 the reverse); ``apply_sign`` returns images multiplied by it
    (for display). ``ignore_raw`` opens metadata only; ``ignore_pose`` drops angles and shifts.
    ``chunks`` is the number of particles per dask chunk (default: about 64 MB of images).
    Raises :class:`ParticleError` naming the file and particle for any inconsistency.
    """
    path = formats.resolve(Path(path))
    engine = formats.engine_for(path)
    if engine is None:
        raise ParticleError(f"unknown particle format; expected {formats.known()}" if path.exists()
                            else "no such file", path=path)
    if hasattr(engine, "open_dataset"):  # the images are in the file itself
        return _finish(engine.open_dataset(path), apply_sign)
    table = engine.open_table(path)
    _keep_cryosparc_rows(table, path)
    table.attrs["source"] = str(path.resolve())
    particles = _apply_options(table, path, locals_=dict(pixel_size=pixel_size, voltage=voltage, cs=cs,
                                                         amp_contrast=amp_contrast, dose=dose),
                               sign=sign, ignore_pose=ignore_pose, ignore_raw=ignore_raw)
    ds = xr.Dataset(coords=_coords(particles), attrs=table.attrs)
    if not ignore_raw:
        ds = _attach_images(ds, particles, path, data_dir, chunks)
    return _finish(ds, apply_sign)


def _keep_cryosparc_rows(table: Table, path: Path) -> None:
    """The ``particles.star`` of a dparticles output that also holds a ``particles.cs`` (from CryoSPARC
    metadata, or an import) names the same particles in the same order: record its rows, so that the
    next job writes the ``.cs`` too, every field kept (see ``formats.cryosparc.write_particles``)."""
    companion = path.with_name(cryosparc.METADATA_FILE)
    if path.name != relion.METADATA_FILE or not (path.parent / RUN_MARKER).is_file() or not companion.is_file():
        return
    try:
        rows = len(cryosparc.read_cs(companion, mapped=True))
    except ParticleError:
        return
    if rows == len(table.particles):
        table.particles = assign(table.particles, {"cs_row": np.arange(rows, dtype=np.int64)})
        table.attrs[cryosparc.CS_SOURCE] = str(companion.resolve())


def _apply_options(table: Table, path: Path, locals_: dict, *, sign: int | None, ignore_pose: bool,
                   ignore_raw: bool) -> pd.DataFrame:
    p = table.particles
    n = len(p)
    if n == 0:
        raise ParticleError("holds no particles (the particle table is empty)", path=path)
    new: dict[str, np.ndarray] = {}
    for name, value in locals_.items():
        if value is not None:
            if not np.isfinite(value) or (value <= 0 and name != "amp_contrast") or value < 0:
                raise ParticleError(f"the {OVERRIDES[name]} override must be a positive number, got {value}")
            new[name] = _same(float(value), n)
    if sign is not None:
        if sign not in (1, -1):
            raise ParticleError(f"data sign must be 1 or -1, got {sign}")
        new["sign"] = _same(float(sign), n)
    elif "sign" not in p:
        new["sign"] = _same(1.0, n)
    p = assign(p, new)
    if "pixel_size" in p:
        psize = p["pixel_size"].to_numpy()
        values = psize if psize.dtype.kind in "iuf" else pd.to_numeric(pd.Series(psize), errors="coerce").to_numpy()
        bad = ~(values > 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ParticleError(f"pixel size {psize[row]!r} is not a positive number; "
                                "give --pixel-size", path=path, particle=row + 1)
        p = assign(p, {"pixel_size": _float64(values)})
    elif not ignore_raw:
        hint = ("rlnOpticsGroup is given but the data_optics block is missing; "
                if table.attrs["format"] == "relion-3.1" else "")
        raise ParticleError(table.attrs.get("no_pixel_size") or
                            f"{hint}no pixel size: expected rlnImagePixelSize in data_optics, rlnDetectorPixelSize "
                            "and rlnMagnification, or blob/psize_A; give one with --pixel-size", path=path)
    for axis in "xy":  # pixel-valued origins waited for the pixel size
        if f"_origin_px_{axis}" in p:
            px = p[f"_origin_px_{axis}"].to_numpy()
            p = p.drop(columns=[f"_origin_px_{axis}"])
            if "pixel_size" in p:
                p = assign(p, {f"shift_{axis}": px * p["pixel_size"].to_numpy()})
    if ignore_pose:
        p = p.drop(columns=[c for c in p.columns if c in POSE or c.startswith("cs:alignments")])
        table.attrs["pose"] = "none"
    table.attrs["has_ctf"] = bool({"defocus_u", "defocus_v"} <= set(p))
    return p


def _same(value, n: int) -> np.ndarray:
    """``value`` for each of ``n`` particles, in no memory (a read-only zero-stride view)."""
    return np.broadcast_to(np.asarray(value), (n,))


def _float64(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.float64:
        return values
    if values.strides == (0,):
        return _same(np.float64(values[0]), len(values))
    return values.astype(np.float64)


def _attach_images(ds: xr.Dataset, p: pd.DataFrame, path: Path, data_dir, chunks: int | None) -> xr.Dataset:
    if "image_name" not in p:
        raise ParticleError("no image column (rlnImageName or blob/path); expected particle images, or "
                            "use --ignore-raw to import metadata only", path=path)
    names, first, stack_ids = _distinct(p["image_name"], path)
    paths = resolve_stacks(list(names), search_roots(path, data_dir), path, first)
    try:
        infos = read_infos(paths)
    except ParticleError as exc:  # say which particle needs the bad stack
        k = paths.index(str(exc.path)) if str(exc.path) in paths else None
        if k is None:
            raise
        raise ParticleError(f"stack {exc}", path=path, particle=int(first[k]) + 1) from None
    indices = p["image_index"].to_numpy(np.int64)
    check_indices(infos, stack_ids, indices, ds["image_name"].values, path)
    stack_box = np.array([i.ny for i in infos], dtype=np.int64)
    if len(np.unique(stack_box)) > 1:
        _mixed_boxes(p, stack_box, stack_ids, infos, path)
    box = int(stack_box[0])
    _check_stated_box(p, np.broadcast_to(np.int64(box), len(p)), stack_ids, infos, path)
    if chunks is None:
        chunks = max(1, CHUNK_BYTES // infos[0].image_bytes)
    images = lazy_images(infos, stack_ids, indices, chunks)
    ds = ds.assign_coords(box=("particle", _same(np.int64(box), len(p))),
                          image_path=_text(np.array(paths, dtype=object)[stack_ids]),
                          stack_id=("particle", stack_ids),
                          stack_path=("stack", np.array(paths, dtype=object)),
                          stack_images=("stack", np.array([i.n for i in infos], dtype=np.int64)),
                          stack_offset=("stack", np.array([i.offset for i in infos], dtype=np.int64)),
                          stack_dtype=("stack", np.array([i.dtype for i in infos], dtype=object)))
    # the pixels as the stacks hold them: y and x numbered, the read named (what lets a store copy bytes)
    ds["images"] = xr.Variable(("particle", "y", "x"), images, attrs={SOURCE_READ: images.name})
    return ds.assign_coords(y=np.arange(box), x=np.arange(box))


def _check_stated_box(p: pd.DataFrame, box: np.ndarray, stack_ids: np.ndarray, infos, path: Path) -> None:
    """The box the metadata states for each particle (if any) must be its stack's."""
    if "box" in p:
        stated = p["box"].to_numpy()
        wrong = stated != box
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise ParticleError(f"the metadata gives box {stated[row]} but the stack "
                                f"{infos[stack_ids[row]].path} holds {box[row]}x{box[row]} images",
                                path=path, particle=row + 1)


def _mixed_boxes(p: pd.DataFrame, stack_box: np.ndarray, stack_ids: np.ndarray, infos, path: Path) -> None:
    """Stacks of several box sizes: name the particle that shows it (always raises)."""
    box = stack_box[stack_ids]
    groups = p["optics_group"].to_numpy()
    for g in np.unique(groups):
        sizes = np.unique(box[groups == g])
        if len(sizes) > 1:
            row = int(np.flatnonzero((groups == g) & (box != sizes[0]))[0])
            raise ParticleError(f"optics group {g} mixes box sizes {sizes.tolist()}; expected one box per "
                                f"optics group (this particle is in {infos[stack_ids[row]].path})",
                                path=path, particle=row + 1)
    _check_stated_box(p, box, stack_ids, infos, path)
    raise ParticleError(f"optics groups have different box sizes {np.unique(box).tolist()}; a particle "
                        "stack holds one box size (select one optics group first)", path=path)


def _distinct(values: pd.Series, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like ``np.unique(..., return_index=True, return_inverse=True)`` for a text column: the
    distinct names sorted, the first row of each, and each row's name as an index into them (from
    the Categorical's codes: no string is hashed or compared per particle)."""
    cat = categorical(values.array if isinstance(values.dtype, pd.CategoricalDtype) else values.to_numpy(dtype=object))
    codes, k = cat.codes, len(cat.categories)
    if (codes < 0).any():
        raise ParticleError("no image name (rlnImageName or blob/path is empty)", path=path,
                            particle=int(np.flatnonzero(codes < 0)[0]) + 1)
    names = np.asarray(cat.categories, dtype=object)
    first = np.searchsorted(np.maximum.accumulate(codes), np.arange(k))  # codes numbered in order of appearance
    used = first < len(codes)
    if not (codes[first[used]] == np.arange(k)[used]).all():  # they are not: the first row of each the long way
        first = np.full(k, len(codes), dtype=np.int64)
        np.minimum.at(first, codes, np.arange(len(codes), dtype=np.int64))
        used = first < len(codes)
    order = np.argsort(names.astype(str), kind="stable")
    order = order[used[order]]
    rank = np.full(k, -1, dtype=np.int32 if k < 2**31 else np.int64)  # stack ids: 4 bytes a particle
    rank[order] = np.arange(len(order))
    return names[order].astype(str), first[order].astype(np.int64), rank[codes]


def _coords(p: pd.DataFrame) -> dict:
    coords: dict = {"particle": pd.RangeIndex(len(p))}
    for col in p.columns:
        s = p[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            coords[col] = _text(_objects(s.array))
        elif s.dtype.kind in "OUST" or isinstance(s.dtype, pd.StringDtype):
            coords[col] = _text(_objects(categorical(s.to_numpy(dtype=object))))
        else:
            coords[col] = ("particle", s.to_numpy())
    return coords


def _objects(cat: pd.Categorical) -> np.ndarray:
    """A Categorical as an object array of references to one string per distinct value (NaN where
    missing); a zero-stride view when every particle has the same value."""
    table = np.empty(len(cat.categories) + 1, dtype=object)
    table[:-1] = list(cat.categories)
    table[-1] = np.nan
    codes = cat.codes
    if len(codes) > 1 and len(cat.categories) == 1 and (codes == 0).all():
        return np.broadcast_to(table[:1], (len(codes),))
    return table[codes]  # a missing value's code, -1, takes the last entry: NaN


def _text(values: np.ndarray) -> xr.Variable:
    """A particle coordinate of Python strings as it is: xarray would otherwise pass an object array
    through pandas, which makes a new string per element."""
    return xr.Variable(("particle",), values, fastpath=True)


def _finish(ds: xr.Dataset, apply_sign: bool) -> xr.Dataset:
    for name, unit in UNITS.items():
        if name in ds.coords:
            ds[name].attrs["units"] = unit
    if apply_sign and "images" in ds:
        signed = ds["images"] * ds["sign"].astype(ds["images"].dtype)
        ds = ds.assign(images=signed.transpose("particle", "y", "x"))
    return ds


def table(ds: xr.Dataset, skip: tuple[str, ...] = ()) -> pd.DataFrame:
    """The per-particle metadata of a dataset as a pandas DataFrame (one row per particle): numbers
    as they are (no copy), text as ``pandas.Categorical``. Coordinates named in ``skip`` are left out."""
    names = [n for n, c in ds.coords.items() if c.dims == ("particle",) and n != "particle" and n not in skip]
    out = {}
    for n in names:
        values = ds.coords[n].values
        out[n] = categorical(values) if values.dtype == object else values
    return pd.DataFrame(out, index=pd.RangeIndex(ds.sizes["particle"]), copy=False)
