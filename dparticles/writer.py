"""Worker-side tasks of the store step: create an output stack under a temporary name, write pieces
of it at their offsets, then sync and rename it into place; and check a file an earlier run left.

A file appears under its final name only when every piece is written and synced. Temporary names
carry a random run nonce and are created with ``O_EXCL | O_NOFOLLOW``, so a planted link is never
followed and no other run's file is touched. Every task is idempotent: the scheduler may run one
again after a worker dies, and the result is the same bytes.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from collections.abc import Sequence

import numpy as np

from dparticles.errors import ParticleError
from dparticles.io.files import TMP_MARK, open_regular
from dparticles.io.mrc import HEADER_BYTES, stack_header

FLOAT16_MAX = 65504.0
VERIFY_BYTES = 16 * 2**20  # bytes compared at a time when checking a kept file
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # no link followed, no FIFO waited on


def tmp_path(final: str, nonce: str) -> str:
    """The temporary name of ``final`` for the run with this ``nonce`` (random, unguessable)."""
    head, name = os.path.split(final)
    return os.path.join(head, f".{name}{TMP_MARK}-{nonce}")


def open_tmp(final: str, nonce: str, n: int, box: int, dtype: str, pixel_size: float) -> int:
    """Open (creating it if need be) the temporary file of ``final`` for this run and make sure it has
    its header and full size; every piece does this, so the order pieces run in does not matter and a
    piece run again keeps what others wrote. A file there that is not a regular file of ours (a
    planted link or another account's file) is refused."""
    tmp = tmp_path(final, nonce)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | _OPEN_FLAGS, 0o666)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ParticleError("a temporary output file was replaced by something that is not ours; stopped "
                                "without writing", path=tmp)
        _pwrite_fd(fd, memoryview(stack_header(n, box, np.dtype(dtype), pixel_size, "dparticles")), 0)
        size = HEADER_BYTES + n * box * box * np.dtype(dtype).itemsize
        if st.st_size != size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_piece(block: np.ndarray, file: tuple, offset: int, first: int) -> dict:
    """Write ``block`` (images) converted to the file's mode at byte ``offset`` of the temporary file
    ``file`` = ``(final, nonce, n, box, dtype, pixel_size)`` (see :func:`open_tmp`); return counts, the
    piece's CRC-32 (to verify the file on a rerun) and the float16 rounding error."""
    stats = {"n": len(block), "bytes": 0, "f16_max": 0.0, "f16_sq": 0.0}
    data = np.ascontiguousarray(convert(block, np.dtype(file[4]), first, stats))
    buf = memoryview(data).cast("B")
    fd = _open(file)
    try:
        _pwrite_fd(fd, buf, offset)
    except OSError as exc:
        raise _write_error(exc, file[0]) from exc
    finally:
        os.close(fd)
    stats.update(bytes=len(buf), crc=zlib.crc32(buf), offset=offset)
    return stats


def copy_piece(paths: Sequence[str], codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               file: tuple, offset: int) -> dict:
    """Copy byte ranges ``[starts, starts + lengths)`` of the source files ``paths[codes]`` one after
    another into the temporary ``file`` (as :func:`write_piece`) from ``offset``, in the kernel where
    it can (never decoded). Each source is opened once: its ranges are copied together, each to its
    own place (a shuffled selection alternates between stacks at every image)."""
    dest = offset + np.cumsum(lengths) - lengths
    order = np.argsort(codes, kind="stable")
    cuts = np.flatnonzero(np.diff(codes[order])) + 1
    fd = _open(file)
    try:
        for group in np.split(order, cuts) if len(order) else []:
            path = paths[codes[group[0]]]
            src = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                for start, length, pos in zip(starts[group].tolist(), lengths[group].tolist(), dest[group].tolist()):
                    done = _copy_range(src, fd, length, start, pos)
                    if done != length:
                        raise ParticleError(f"stack ended early: expected {length} bytes from byte {start}, "
                                            f"read {done}", path=path)
            finally:
                os.close(src)
    except OSError as exc:
        raise _write_error(exc, file[0]) from exc
    finally:
        os.close(fd)
    return {"n": None, "bytes": int(lengths.sum()), "f16_max": 0.0, "f16_sq": 0.0}


def write_segments(block: np.ndarray, segments: list[tuple], first: int) -> dict[str, dict]:
    """Write the rows of one chunk of images to the files they belong to. Each segment is
    ``(file, lo, hi, offset, record)``: rows ``block[lo:hi]`` go at byte ``offset`` of ``file``
    (see :func:`write_piece`); a file that lies wholly in this chunk comes with its ``record`` and
    is finished here (:func:`finish_file`). Returns each file's piece statistics by final name."""
    done = {}
    for file, lo, hi, offset, record in segments:
        done[file[0]] = write_piece(block[lo:hi], file, offset, first + lo)
        if record is not None:
            finish_file(file, record, [done])
    return done


def copy_segments(paths: Sequence[str], codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  segments: list[tuple]) -> dict[str, dict]:
    """As :func:`write_segments` for unchanged pixels: the piece's source byte ranges are
    ``(paths[codes], starts, lengths)``, and each segment ``(file, lo, hi, offset, record)`` copies
    ranges ``lo:hi`` of them with :func:`copy_piece`."""
    done = {}
    for file, lo, hi, offset, record in segments:
        done[file[0]] = copy_piece(paths, codes[lo:hi], starts[lo:hi], lengths[lo:hi], file, offset)
        if record is not None:
            finish_file(file, record, [done])
    return done


def finish_file(file: tuple, record: dict, results: list[dict[str, dict]]) -> dict:
    """Sync the temporary ``file``, write its record (what a rerun checks), then rename it to its
    final name; return the totals of its pieces, picked from the chunk tasks' ``results``. Run again
    after the rename, it finds the final file and leaves it."""
    final, tmp = file[0], tmp_path(*file[:2])
    pieces = [r[final] for r in results if final in r]
    try:
        if os.path.lexists(tmp):
            fd = _open_for_write(tmp)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            crcs = [[p["offset"], p["bytes"], p["crc"]] for p in pieces if "crc" in p]
            write_record(record_path(final), dict(record, pieces=crcs), nonce=file[1])
            os.replace(tmp, final)
        elif not os.path.isfile(final):
            raise ParticleError("the temporary file of this output vanished before it was complete; rerun to "
                                "write it again", path=final)
    except OSError as exc:
        raise _write_error(exc, final) from exc
    return {"bytes": sum(p["bytes"] for p in pieces), "f16_max": max((p["f16_max"] for p in pieces), default=0.0),
            "f16_sq": sum(p["f16_sq"] for p in pieces)}


RECORDS = ".dparticles"  # folder of an output that holds the records of its finished files


def record_path(final: str) -> str:
    """Where the record of a finished output file ``OUT/stacks/NAME`` is kept: ``OUT/.dparticles/NAME.json``."""
    stacks, name = os.path.split(final)
    return os.path.join(os.path.dirname(stacks), RECORDS, f"{name}.json")


def write_record(path: str, record: dict, indent: int | None = None, nonce: str = "") -> None:
    """Write a small JSON record atomically (temporary name carrying the run ``nonce``, sync, rename)."""
    tmp = f"{path}{TMP_MARK}-{nonce or os.urandom(8).hex()}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o666)
    try:
        _pwrite_fd(fd, memoryview(json.dumps(record, indent=indent).encode()), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def verify_record(final: str, header: bytes, record: dict) -> bool:
    """Whether ``final`` still holds exactly the bytes its record describes: this ``header``, the
    size, and each piece's CRC."""
    try:
        with open(open_regular(final), "rb") as f:
            if os.fstat(f.fileno()).st_size != record["size"] or os.pread(f.fileno(), HEADER_BYTES, 0) != header:
                return False
            for offset, length, crc in record["pieces"]:
                if zlib.crc32(os.pread(f.fileno(), length, offset)) != crc:
                    return False
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return True


def verify_copy(final: str, header: bytes, paths: Sequence[str], codes: np.ndarray, starts: np.ndarray,
                lengths: np.ndarray) -> bool:
    """Whether ``final`` has this ``header`` and its images are byte for byte the source ranges they
    were copied from."""
    try:
        with open(open_regular(final), "rb") as out:
            if os.pread(out.fileno(), HEADER_BYTES, 0) != header:
                return False
            pos = HEADER_BYTES
            for code, start, length in zip(codes.tolist(), starts.tolist(), lengths.tolist()):
                with open(paths[code], "rb") as src:
                    while length:
                        step = min(length, VERIFY_BYTES)
                        if os.pread(src.fileno(), step, start) != os.pread(out.fileno(), step, pos):
                            return False
                        start, pos, length = start + step, pos + step, length - step
            return os.fstat(out.fileno()).st_size == pos
    except OSError:
        return False


def convert(data: np.ndarray, dtype: np.dtype, first: int, stats: dict) -> np.ndarray:
    """``data`` in the little-endian output mode; for float16 range-checked first (an error names the
    particle, 1-based from ``first`` + 1), with the rounding error against float32 kept in ``stats``."""
    out = dtype.newbyteorder("<")
    if dtype != np.float16:
        return data.astype(out, copy=False)
    flat = data.reshape(len(data), -1)
    peak = np.maximum(flat.max(axis=1), -flat.min(axis=1))  # |x| without a temporary; NaN stays NaN
    over = np.flatnonzero(~(peak <= FLOAT16_MAX))
    if len(over):
        k = int(over[0])
        raise ParticleError(f"a value of magnitude {peak[k]:.6g} does not fit in float16, whose largest is "
                            f"{FLOAT16_MAX:g}; write float32 instead", particle=first + k + 1)
    half = data.astype(out)
    err = half.astype(np.float32)
    err -= data
    stats["f16_max"] = max(stats["f16_max"], float(err.max()), float(-err.min()))
    stats["f16_sq"] += float(np.square(err, out=err).sum(dtype=np.float64))
    return half


def _open(file: tuple) -> int:
    try:
        return open_tmp(*file)
    except OSError as exc:
        raise _write_error(exc, file[0]) from exc


def _open_for_write(tmp: str) -> int:
    try:
        return os.open(tmp, os.O_WRONLY | _OPEN_FLAGS)
    except OSError as exc:
        raise _write_error(exc, tmp) from exc


def _pwrite_fd(fd: int, buf: memoryview, offset: int) -> None:
    """pwrite may write less than asked (a full disk): write the rest or fail."""
    while buf:
        n = os.pwrite(fd, buf, offset)
        if n == 0:
            raise OSError(28, "No space left on device")
        buf, offset = buf[n:], offset + n


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
            _pwrite_fd(dst, chunk, dst_off + done)
            done += len(chunk)
    return done


def _write_error(exc: OSError, path: str) -> ParticleError:
    base = os.path.basename(path).split(TMP_MARK)[0].lstrip(".")
    return ParticleError(f"could not write {base} ({exc.strerror or exc}); nothing was left under the final name, "
                         "rerun to continue", path=os.path.dirname(path) or ".")
