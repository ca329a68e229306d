"""The zarr cache: images chunked by batch and compressed, with every metadata column, so that
``open_particles(path)`` gives back the same images and metadata and the jobs run from it.

Compressor: blosc zstd, level 5, byte shuffle (``dparticles.zarr.*``). Measured on RELION-written
particle images (``benchmarks/zarr_codec.py``): particle images are mostly noise, zstd saves about
8% and decodes at over 1 GB/s; lz4 saves nothing; bit-shuffle is worse than byte shuffle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from dparticles import config
from dparticles.cluster import cluster_client
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


def write_zarr(ds: xr.Dataset, path: Path, *, overwrite: bool, cluster: dict, batch_size: int | None = None,
               log=print) -> str:
    """Write ``ds`` (images and metadata) as a zarr store at ``path``, atomically; return a summary."""
    path = Path(path)
    check_zarr_target(path, ds, overwrite=overwrite)
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
    try:
        delayed = out.to_zarr(tmp, mode="w", encoding=encoding, compute=False, consolidated=False)
        with cluster_client(**cluster, log=log) as client:
            client.compute(delayed).result()
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    raw = ds.sizes["particle"] * image_bytes
    return f"zarr cache {path}: {ds.sizes['particle']} particles, {raw / 1e9:.3f} GB stored in {stored / 1e9:.3f} GB"
