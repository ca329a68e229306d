"""Batch tasks: each writes one output batch (one ``.mrcs`` per output size) from the source runs.

A batch file is written under a temporary name and renamed when complete, so a file under its
final name is always whole; a rerun keeps finished batches after checking them. Float32 copies
move bytes in the kernel (``os.copy_file_range``) without decoding; conversions and transforms
stream the batch in pieces of bounded size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dparticles.errors import ParticleError
from dparticles.io.mrc import HEADER_BYTES, StackInfo, read_info, read_runs, stack_header
from dparticles.io.files import tmp_name
from dparticles.planning import split_runs

FLOAT16_MAX = 65504.0
VERIFY_BYTES = 16 * 2**20  # bytes compared at a time when checking a kept batch
PIECE_BYTES = 8 * 2**20  # images decoded at once inside a batch; small enough for the CPU caches
# (benchmarks/README.md: downsample tasks ran about 1.5x faster than with 32 MB pieces)


@dataclass(frozen=True)
class Output:
    """One output stack of a batch."""

    path: str
    box: int
    dtype: str  # '<f4', '<f2', or a source mode kept as is
    pixel_size: float


@dataclass(frozen=True)
class Batch:
    """Everything one task needs: source runs, where to write, and the transform (None: copy)."""

    runs: tuple[tuple[StackInfo, int, int], ...]
    first: int  # metadata row of the batch's first particle, for messages
    outputs: tuple[Output, ...]
    transform: Callable[[np.ndarray, np.ndarray | None, np.ndarray], list[np.ndarray]] | None = None
    shifts: np.ndarray | None = None  # (n, 2) recentring origins in input pixels
    pixel_sizes: np.ndarray | None = None  # (n,) input pixel sizes, for the transform

    @property
    def n(self) -> int:
        return sum(stop - start for _, start, stop in self.runs)


def write_batch(batch: Batch) -> dict:
    """Write (or keep, after checking) the batch's output files; return what was done and the
    float16 rounding error (max and sum of squares against float32)."""
    if all(_header_matches(o, batch) for o in batch.outputs) and _content_matches(batch):
        return {"kept": True, "n": batch.n, "bytes": 0, "f16_max": 0.0, "f16_sq": 0.0}
    tmps = [Path(tmp_name(Path(o.path))) for o in batch.outputs]
    stats = {"kept": False, "n": batch.n, "bytes": 0, "f16_max": 0.0, "f16_sq": 0.0}
    files = []
    try:
        for o, tmp in zip(batch.outputs, tmps):
            f = open(tmp, "wb")
            files.append(f)
            f.write(stack_header(batch.n, o.box, np.dtype(o.dtype), o.pixel_size, "dparticles"))
        if _can_copy(batch):
            stats["bytes"] = _copy_runs(batch.runs, files[0])
        else:
            _stream(batch, files, stats)
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for o, tmp in zip(batch.outputs, tmps):
            os.replace(tmp, o.path)
    except OSError as exc:
        raise ParticleError(f"could not write batch ({exc.strerror or exc}); nothing was left under the "
                            "final name, rerun to continue", path=batch.outputs[0].path) from exc
    finally:
        for f in files:
            f.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return stats


def _can_copy(batch: Batch) -> bool:
    """Bytes can move unchanged: no transform, one output in the sources' own little-endian mode."""
    if batch.transform is not None or len(batch.outputs) != 1:
        return False
    want = batch.outputs[0].dtype
    return all(isinstance(info, StackInfo) and info.dtype == want and info.dtype[0] in "<|" for info, _, _ in batch.runs)


def _copy_runs(runs, dst) -> int:
    """Copy each run's bytes into ``dst`` at its current end, in the kernel where it can."""
    dst.flush()
    out_fd = dst.fileno()
    pos = os.lseek(out_fd, 0, os.SEEK_END)
    total = 0
    for info, start, stop in runs:
        length = (stop - start) * info.image_bytes
        offset = info.offset + start * info.image_bytes
        with open(info.path, "rb") as src:
            done = _copy_range(src.fileno(), out_fd, length, offset, pos)
        if done != length:
            raise ParticleError(f"stack ended early: expected {length} bytes from byte {offset}, read {done}",
                                path=info.path)
        pos += length
        total += length
    os.lseek(out_fd, pos, os.SEEK_SET)
    return total


def _copy_range(src: int, dst: int, length: int, src_off: int, dst_off: int) -> int:
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
            if n == 0:
                break
            done += n
    except OSError as exc:  # not supported across these file systems: copy through user space
        if exc.errno not in (18, 38, 95, 22, 1):  # EXDEV, ENOSYS, EOPNOTSUPP, EINVAL, EPERM
            raise
        while done < length:
            chunk = memoryview(os.pread(src, min(length - done, 16 * 2**20), src_off + done))
            if not chunk:
                break
            while chunk:  # pwrite may write less than asked (a full disk): write the rest or fail
                n = os.pwrite(dst, chunk, dst_off + done)
                if n == 0:
                    raise OSError(28, "No space left on device")
                done += n
                chunk = chunk[n:]
    return done


def _stream(batch: Batch, files, stats: dict) -> None:
    """Append each piece of each output to its file."""
    for arrays in _pieces(batch, stats):
        for f, data in zip(files, arrays):
            f.write(data.data)
            stats["bytes"] += data.nbytes


def _pieces(batch: Batch, stats: dict) -> Iterator[list[np.ndarray]]:
    """The batch read in pieces of bounded size, transformed and converted: for each piece, one
    little-endian array per output, exactly as it is written."""
    info0 = batch.runs[0][0]
    per_piece = max(1, PIECE_BYTES // (info0.ny * info0.nx * 4))
    first_dtype = batch.outputs[0].dtype
    decode = "<f4" if batch.transform is not None or first_dtype == "<f2" else first_dtype
    row = 0
    for piece in split_runs(list(batch.runs), per_piece):
        images = _read(piece, decode)
        n = len(images)
        shifts = batch.shifts[row:row + n] if batch.shifts is not None else None
        if batch.transform is not None:
            results = batch.transform(images, shifts, batch.pixel_sizes[row:row + n])
        else:
            results = [images]
        yield [np.ascontiguousarray(_convert(data, np.dtype(o.dtype), batch.first + row, stats, piece),
                                    dtype=np.dtype(o.dtype).newbyteorder("<"))
               for o, data in zip(batch.outputs, results)]
        row += n


def _read(piece: list[tuple], dtype: str) -> np.ndarray:
    """Images of a piece of a batch, from MRC stacks or from a zarr cache (``.read``)."""
    if isinstance(piece[0][0], StackInfo):
        return read_runs(piece, dtype)
    return np.concatenate([src.read(a, b) for src, a, b in piece]).astype(dtype, copy=False)


def _convert(data: np.ndarray, dtype: np.dtype, first: int, stats: dict, piece: list[tuple]) -> np.ndarray:
    """``data`` in the output mode; for float16, range-checked first, with the rounding error kept."""
    if dtype != np.float16:
        return data.astype(dtype, copy=False)
    flat = data.reshape(len(data), -1)
    peak = np.maximum(flat.max(axis=1), -flat.min(axis=1))  # |x| without a temporary copy; NaN stays NaN
    over = np.flatnonzero(~(peak <= FLOAT16_MAX))
    if len(over):
        k = int(over[0])
        source, image = _source_of(piece, k)
        raise ParticleError(f"a value of magnitude {peak[k]:.6g} (from image {image + 1} of {source}) does not "
                            f"fit in float16, whose largest is {FLOAT16_MAX:g}; write float32 instead",
                            particle=first + k + 1)
    half = data.astype(np.float16)
    err = half.astype(np.float32)
    err -= data
    stats["f16_max"] = max(stats["f16_max"], float(err.max()), float(-err.min()))
    stats["f16_sq"] += float(np.square(err, out=err).sum(dtype=np.float64))
    return half


def _source_of(piece: list[tuple], k: int) -> tuple[str, int]:
    """Where the k-th image of a piece comes from: (stack or cache path, 0-based index)."""
    for src, start, stop in piece:
        if k < stop - start:
            return src.path, start + k
        k -= stop - start
    raise IndexError(k)


def _header_matches(o: Output, batch: Batch) -> bool:
    """A batch file left by an earlier run has exactly the header and size this run would write."""
    if not os.path.exists(o.path):
        return False
    try:
        info = read_info(o.path)
    except ParticleError:
        return False
    return (info.n == batch.n and info.ny == info.nx == o.box and np.dtype(info.dtype) == np.dtype(o.dtype)
            and info.offset == HEADER_BYTES and os.path.getsize(o.path) == HEADER_BYTES + info.n * info.image_bytes)


def _content_matches(batch: Batch) -> bool:
    """The pixels of a batch left by an earlier run are what this run would write: for byte copies
    every byte is compared with the sources; for transforms the first piece is computed again and
    compared (the rest was written by the same code from the same inputs, and the file was renamed
    into place only when complete)."""
    if _can_copy(batch):
        with open(batch.outputs[0].path, "rb") as out:
            pos = HEADER_BYTES
            for info, start, stop in batch.runs:
                with open(info.path, "rb") as src:
                    offset, left = info.offset + start * info.image_bytes, (stop - start) * info.image_bytes
                    while left:
                        step = min(left, VERIFY_BYTES)
                        if os.pread(src.fileno(), step, offset) != os.pread(out.fileno(), step, pos):
                            return False
                        offset, pos, left = offset + step, pos + step, left - step
        return True
    first = next(_pieces(batch, {"f16_max": 0.0, "f16_sq": 0.0}))
    for o, data in zip(batch.outputs, first):
        with open(o.path, "rb") as f:
            if os.pread(f.fileno(), data.nbytes, HEADER_BYTES) != data.tobytes():
                return False
    return True
