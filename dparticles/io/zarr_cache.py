"""zarr particle caches as a storage engine: open one lazily (images as dask, metadata loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from dparticles.errors import ParticleError


def open_zarr(path: Path) -> xr.Dataset:
    """Open a zarr cache written by :func:`dparticles.sinks.prepare_zarr` (images lazily, as dask)."""
    try:
        ds = xr.open_zarr(path, consolidated=_consolidated(path))
    except Exception as exc:
        raise ParticleError(f"could not open as a dparticles zarr cache ({exc})", path=path) from exc
    if "images" not in ds:
        raise ParticleError("zarr store has no 'images' array; expected a dparticles cache", path=path)
    coords = {}
    for name, coord in ds.coords.items():
        values = coord.values  # metadata is small: load it, leave the images lazy
        coords[name] = (coord.dims, values.astype(object) if values.dtype.kind in "UT" else values)
    ds = ds.assign_coords(coords)
    ds.attrs["source"] = str(Path(path).resolve())
    ds.attrs["zarr"] = str(Path(path).resolve())
    return ds


def _consolidated(path: Path) -> bool:
    """Whether a zarr v3 store carries consolidated metadata (caches written before it did not)."""
    try:
        return json.loads((Path(path) / "zarr.json").read_text()).get("consolidated_metadata") is not None
    except (OSError, ValueError):
        return False
