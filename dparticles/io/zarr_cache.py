"""zarr particle caches as a storage engine: open one lazily, and read slices of it in batch tasks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from dparticles.errors import ParticleError


def open_zarr(path: Path) -> xr.Dataset:
    """Open a zarr cache written by :func:`dparticles.sinks.prepare_zarr` (images lazily, as dask)."""
    try:
        ds = xr.open_zarr(path, consolidated=False)
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


@dataclass(frozen=True)
class ZarrSource:
    """A zarr cache as a batch source: what the writer needs to read particles ``[start, stop)``."""

    path: str
    ny: int
    nx: int
    dtype: str

    @property
    def image_bytes(self) -> int:
        return self.ny * self.nx * np.dtype(self.dtype).itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(zarr.open_array(f"{self.path}/images", mode="r")[start:stop])
