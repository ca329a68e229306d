"""The zarr cache as an engine, both ways: images chunked by batch and compressed, with every metadata column, so that
``open_particles(path)`` gives back the same images and metadata and the jobs run from it.

Compressor: blosc zstd, level 5, byte shuffle (``dparticles.zarr.*``). Measured on RELION-written
particle images (``benchmarks/zarr_codec.py``): particle images are mostly noise, zstd saves about
8% and decodes at over 1 GB/s; lz4 saves nothing; bit-shuffle is worse than byte shuffle.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from dparticles import config
from dparticles.errors import ParticleError
from dparticles.safe import TMP_MARK, at_job_end, is_zarr_cache, private_dir, refuse_inputs, remove_temporary


NAME = "zarr"


def guess_can_open(path: Path) -> bool:
    """A dparticles zarr cache: a folder holding a zarr group with an ``images`` array."""
    return is_zarr_cache(path)


def open_dataset(path: Path) -> xr.Dataset:
    """The whole cache as a Dataset (images lazily), as it was written."""
    return open_zarr(path)


def open_zarr(path: Path) -> xr.Dataset:
    """Open a zarr cache written by :func:`prepare_zarr` (images lazily, as dask).
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
    import zarr  # imported when used: asking whether a folder is a cache must stay cheap

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


# --- writing a cache ----------------------------------------------------------------------------

MAX_CHUNK_BYTES = 64 * 2**20  # a batch larger than this is stored as several chunks



def check_zarr_target(path: Path, ds: xr.Dataset, *, overwrite: bool) -> None:
    """Refuse a cache path that is or holds an input of ``ds``, that exists without ``overwrite``, that
    is something other than a dparticles zarr cache (which ``overwrite`` would replace), a link to
    nothing, or in a folder this account cannot write. A link to a cache is followed: its target is
    replaced, the link kept."""
    path = Path(path).absolute()
    if path.is_symlink() and not path.exists():
        raise ParticleError(f"the zarr cache path is a symbolic link to {os.readlink(path)}, which does not "
                            "exist; give an existing cache or a new path", path=path)
    refuse_inputs(path, ds, "--zarr")
    target = Path(os.path.realpath(path))
    if target.exists() and not overwrite:
        raise ParticleError("zarr cache exists; use --overwrite to replace it", path=path)
    if target.exists() and not is_zarr_cache(target):
        raise ParticleError("exists and is not a zarr cache; --overwrite replaces only a zarr cache, choose "
                            "another --zarr", path=path)
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ParticleError(f"cannot write in {parent} (permission denied); choose another --zarr", path=path)



@dataclass
class ZarrJob:
    """A zarr cache being written: the lazy write to compute, and where it goes when complete.

    ``tmp`` is the store being written, inside a private folder beside the target that holds the
    lock of this run (so that another run never removes it while it is written)."""

    path: Path
    tmp: Path
    delayed: object
    n: int
    raw_bytes: int
    target: Path | None = None  # where it goes: ``path`` with links resolved
    lock: int | None = None  # the open, locked lock file of the private folder

    def note(self) -> str:
        stored = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return (f"zarr cache {self.path}: {self.n} particles, {self.raw_bytes / 1e9:.3f} GB stored in "
                f"{stored / 1e9:.3f} GB")



def prepare_zarr(ds: xr.Dataset, path: Path, batch_size: int | None = None) -> ZarrJob:
    """Set up the zarr store of ``ds`` (images and metadata) in a private folder beside ``path``
    (random name, this account only, locked for this run); computing ``job.delayed`` writes the
    images, :func:`finish_zarr` renames it into place, :func:`discard_zarr` removes it. Private
    folders that dead runs left beside ``path`` are removed first; those of live runs are left."""
    path = Path(path).absolute()
    target = Path(os.path.realpath(path))
    image_bytes = ds["images"].dtype.itemsize * ds.sizes["y"] * ds.sizes["x"]
    chunk = min(int(config.get("batch-size", batch_size)), max(1, MAX_CHUNK_BYTES // image_bytes))
    out = ds.drop_vars([v for v in ds.variables if "stack" in ds[v].dims or v in ("image_path", "stack_id")])
    out = out.assign(images=out["images"].chunk({"particle": chunk}))
    out["images"].attrs = {}  # what the images were (their read) is not what the cache holds
    for name, coord in out.coords.items():  # text as variable-length UTF-8 strings, zarr v3's "string"
        if coord.dtype == object:
            out = out.assign_coords({name: coord.astype(np.dtypes.StringDType())})
    import zarr

    compressor = zarr.codecs.BloscCodec(cname=str(config.get("zarr.codec")), clevel=int(config.get("zarr.level")),
                                        shuffle=zarr.codecs.BloscShuffle.shuffle)
    encoding = {"images": {"compressors": [compressor], "chunks": (chunk, ds.sizes["y"], ds.sizes["x"])}}
    out.attrs = {k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float, bool))}
    _remove_dead(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        box = private_dir(target)
    except OSError as exc:
        raise ParticleError(f"could not write the zarr cache ({exc.strerror or exc})", path=path) from None
    job = ZarrJob(path, box / target.name, None, ds.sizes["particle"], ds.sizes["particle"] * image_bytes, target)
    at_job_end(lambda ok: discard_zarr(job))  # a write that did not complete leaves nothing behind
    try:
        job.lock = os.open(box / "lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(job.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to the v3 format,
            warnings.simplefilter("ignore")  # which plain xr.open_zarr reads without a warning
            job.delayed = out.to_zarr(job.tmp, mode="w-", encoding=encoding, compute=False, consolidated=True)
    except OSError as exc:
        discard_zarr(job)
        raise ParticleError(f"could not write the zarr cache ({exc.strerror or exc})", path=path) from None
    except BaseException:
        discard_zarr(job)
        raise
    return job



def _remove_dead(target: Path) -> None:
    """Remove the private folders of runs that died while writing a cache at ``target``."""
    prefix = f".{target.name}{TMP_MARK}-"
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for e in entries:
        remove_temporary(Path(e.path), folder_held=False)  # beside the target, others may be writing theirs



def finish_zarr(job: ZarrJob) -> None:
    """Put a completely written cache in place of any earlier one (moved aside into the private
    folder first, so the place is never empty of a complete cache for longer than two renames;
    a link there is replaced, never followed), then remove the private folder."""
    target, box = job.target or job.path, job.tmp.parent
    try:
        if os.path.lexists(target):
            os.rename(target, box / "replaced")
        try:
            os.rename(job.tmp, target)
        except OSError:
            if os.path.lexists(box / "replaced"):
                os.rename(box / "replaced", target)
            raise
    except OSError as exc:
        raise ParticleError(f"could not put the zarr cache in place ({exc.strerror or exc}); nothing was "
                            "changed, rerun to write it again", path=job.path) from None
    finally:
        discard_zarr(job)



def discard_zarr(job: ZarrJob) -> None:
    """Remove the private folder of a write (the store if it did not complete, and the cache it
    replaced if it did), and give up its lock. Doing it twice does nothing more."""
    if job.lock is not None:
        os.close(job.lock)
        job.lock = None
    shutil.rmtree(job.tmp.parent, ignore_errors=True)

