"""The zarr cache: images chunked by batch and compressed, with every metadata column, so that
``open_particles(path)`` gives back the same images and metadata and the jobs run from it.

Compressor: blosc zstd, level 5, byte shuffle (``dparticles.zarr.*``). Measured on RELION-written
particle images (``benchmarks/zarr_codec.py``): particle images are mostly noise, zstd saves about
8% and decodes at over 1 GB/s; lz4 saves nothing; bit-shuffle is worse than byte shuffle.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from dparticles import config
from dparticles.errors import ParticleError
from dparticles.io.files import TMP_MARK
from dparticles.output import refuse_inputs

MAX_CHUNK_BYTES = 64 * 2**20  # a batch larger than this is stored as several chunks


def check_zarr_target(path: Path, ds: xr.Dataset, *, overwrite: bool) -> None:
    """Refuse a cache path that is or holds an input of ``ds``, that exists without ``overwrite``, or
    that is something other than a zarr cache (which ``overwrite`` would delete)."""
    path = Path(path)
    refuse_inputs(path, ds, "--zarr")
    if path.exists() and not overwrite:
        raise ParticleError("zarr cache exists; use --overwrite to replace it", path=path)
    if path.exists() and not any((path / m).is_file() for m in ("zarr.json", ".zgroup")):
        raise ParticleError("exists and is not a zarr cache; --overwrite replaces only a zarr cache, choose "
                            "another --zarr", path=path)


@dataclass
class ZarrJob:
    """A zarr cache being written: the lazy write to compute, and where it goes when complete."""

    path: Path
    tmp: Path
    delayed: object
    n: int
    raw_bytes: int

    def note(self) -> str:
        stored = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return (f"zarr cache {self.path}: {self.n} particles, {self.raw_bytes / 1e9:.3f} GB stored in "
                f"{stored / 1e9:.3f} GB")


def prepare_zarr(ds: xr.Dataset, path: Path, batch_size: int | None = None) -> ZarrJob:
    """Set up the zarr store of ``ds`` (images and metadata) under a temporary name; computing
    ``job.delayed`` writes the images, :func:`finish_zarr` renames it into place."""
    path = Path(path)
    image_bytes = ds["images"].dtype.itemsize * ds.sizes["y"] * ds.sizes["x"]
    chunk = min(int(config.get("batch-size", batch_size)), max(1, MAX_CHUNK_BYTES // image_bytes))
    out = ds.drop_vars([v for v in ds.variables if "stack" in ds[v].dims or v in ("image_path", "stack_id")])
    out = out.assign(images=out["images"].chunk({"particle": chunk}))
    for name, coord in out.coords.items():  # text as variable-length UTF-8 strings, zarr v3's "string"
        if coord.dtype == object:
            out = out.assign_coords({name: coord.astype(np.dtypes.StringDType())})
    compressor = zarr.codecs.BloscCodec(cname=str(config.get("zarr.codec")), clevel=int(config.get("zarr.level")),
                                        shuffle=zarr.codecs.BloscShuffle.shuffle)
    encoding = {"images": {"compressors": [compressor], "chunks": (chunk, ds.sizes["y"], ds.sizes["x"])}}
    tmp = path.with_name(f"{path.name}{TMP_MARK}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.attrs = {k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float, bool))}
    delayed = out.to_zarr(tmp, mode="w", encoding=encoding, compute=False, consolidated=False)
    return ZarrJob(path, tmp, delayed, ds.sizes["particle"], ds.sizes["particle"] * image_bytes)


def finish_zarr(job: ZarrJob) -> None:
    """Put a completely written cache in place of any earlier one."""
    if job.path.exists():
        shutil.rmtree(job.path)
    job.tmp.rename(job.path)


def discard_zarr(job: ZarrJob) -> None:
    """Remove the temporary store of a write that did not complete."""
    shutil.rmtree(job.tmp, ignore_errors=True)
