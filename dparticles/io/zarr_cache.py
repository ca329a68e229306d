"""zarr particle caches as a storage engine: open one lazily (images as dask, metadata loaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from dparticles.errors import ParticleError


def open_zarr(path: Path) -> xr.Dataset:
    """Open a zarr cache written by :func:`dparticles.sinks.prepare_zarr` (images lazily, as dask).
    Each image task reads one zarr chunk and checks it (:func:`read_chunk`)."""
    try:
        ds = xr.open_zarr(path, consolidated=_consolidated(path))
    except Exception as exc:
        raise ParticleError(f"could not open as a dparticles zarr cache ({exc})", path=path) from exc
    if "images" not in ds:
        raise ParticleError("zarr store has no 'images' array; expected a dparticles cache", path=path)
    coords = {}
    for name, coord in ds.coords.items():
        try:
            values = coord.values  # metadata is small: load it, leave the images lazy
        except Exception as exc:
            raise ParticleError(f"the metadata array {name!r} could not be read ({type(exc).__name__}: {exc}); "
                                "expected one value per particle", path=Path(path) / name) from None
        coords[name] = (coord.dims, values.astype(object) if values.dtype.kind in "UT" else values)
    ds = ds.assign_coords(coords)
    ds = ds.assign(images=ds["images"].copy(data=_checked_images(Path(path).resolve(), ds["images"].data)))
    ds.attrs["source"] = str(Path(path).resolve())
    ds.attrs["zarr"] = str(Path(path).resolve())
    return ds


def _checked_images(path: Path, images: da.Array) -> da.Array:
    """The cache's images as a dask array of the same chunks whose every task is :func:`read_chunk`."""
    try:
        stamp = os.stat(path / "images" / "zarr.json").st_mtime_ns
    except OSError:
        stamp = None
    token = tokenize(str(path), stamp, images.shape, images.chunks, images.dtype.str)
    return da.map_blocks(read_chunk, dtype=images.dtype, chunks=images.chunks, meta=np.empty((0, 0, 0), images.dtype),
                         name=f"zarr-images-{token}", path=str(path))


def read_chunk(path: str, block_info: dict | None = None) -> np.ndarray:
    """One chunk of a cache's images, read through zarr. A chunk file that is missing (zarr would give
    NaN images in its place) or does not decode is one error naming the file and what it should hold."""
    info = block_info[None]
    (a, b), (_, ny), (_, nx) = info["array-location"]
    array = zarr.open_array(Path(path) / "images", mode="r")
    name = array.metadata.encode_chunk_key(tuple(info["chunk-location"]))
    file = Path(path) / "images" / name
    expected = (f"expected particles {a + 1} to {b} of the cache: {b - a} images of {ny}x{nx} "
                f"{np.dtype(info['dtype']).name}, encoded as images/zarr.json says")
    if not file.is_file():
        raise ParticleError(f"zarr chunk {name} is missing; {expected}", path=file)
    try:
        return array[a:b, 0:ny, 0:nx]
    except Exception as exc:
        raise ParticleError(f"zarr chunk {name} is corrupt ({type(exc).__name__}: {exc}); {expected}",
                            path=file) from None


def _consolidated(path: Path) -> bool:
    """Whether a zarr v3 store carries consolidated metadata (caches written before it did not)."""
    try:
        return json.loads((Path(path) / "zarr.json").read_text()).get("consolidated_metadata") is not None
    except (OSError, ValueError):
        return False
