"""MRC image stacks as an engine: headers, reads of particle runs, a bare stack as a particle source,
and the worker tasks that write output stacks.

Knows the MRC2014 format and the ways real headers are imperfect (zero pixel size, nversion 0,
a missing map id, stacks flagged as volumes). Writing: a stack is created under a temporary name,
its pieces written at their offsets (or copied in the kernel, never decoded), then synced and
renamed into place, with a record of each piece's CRC for a rerun to check. Temporary names carry a
random run nonce and are created with ``O_NOFOLLOW``, so a planted link is never followed and no
other run's file is touched. Every task is idempotent: the scheduler may run one again after a
worker dies, and the result is the same bytes. Light imports only: worker tasks use it.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mrcfile
import mrcfile.constants
import mrcfile.utils
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from dparticles.errors import ParticleError
from dparticles.safe import RECORDS, TMP_MARK, pwrite_all, open_regular, tmp_path, write_record

if TYPE_CHECKING:
    from dparticles.metadata import Table

HEADER_BYTES = 1024


@dataclass(frozen=True)
class StackInfo:
    """What a stack's header says, checked against the file's size."""

    path: str
    n: int
    ny: int
    nx: int
    dtype: str  # numpy dtype string with byte order, e.g. '<f4'
    offset: int  # byte offset of the first image: 1024 + extended header

    @property
    def image_bytes(self) -> int:
        return self.ny * self.nx * np.dtype(self.dtype).itemsize


def read_info(path: str) -> StackInfo:
    """Read only the header of an MRC stack, permissively, and check the data block is all there.

    One ``open``, ``fstat`` and ``pread`` of the 1024 header bytes, decoded as mrcfile's permissive
    reader would (``mrcfile.open`` costs ten times more: minutes at 100,000 stacks): the machine
    stamp gives the byte order (little-endian when unrecognised), and a mode valid only in the other
    byte order swaps the header; a missing map id, nversion 0, a volume flag or stale statistics are
    not checked. A 2D image counts as a stack of one; a file flagged as a volume is read as a stack
    of ``nz`` images. A link is followed, but a FIFO or device is never opened for reading.
    Raises ParticleError for an unreadable file, an unknown mode or a short data block.
    """
    return _info(path, *_header_bytes(path))


NAME = "mrc"
SUFFIXES = (".mrcs", ".mrc")


def guess_can_open(path: Path) -> bool:
    """A bare stack: a file named ``.mrcs`` or ``.mrc`` (the images themselves, no metadata file)."""
    return path.suffix.lower() in SUFFIXES and not path.is_dir()


def open_table(path: Path) -> "Table":
    """Every image of a bare stack as a particle, in order: the stack path and index, the box, and
    the pixel size of the header (``cella / m``, the same along x and y) when it gives one; with
    none, or two, opening asks for ``--pixel-size``. No CTF, pose or micrograph: a stack holds none."""
    import pandas as pd  # here, not at the top: worker tasks import this module for writing only

    from dparticles.metadata import Table, group_names, same

    info = read_info(str(path))
    raw, _ = _header_bytes(str(path))
    header, _ = _decode_header(raw)
    n = info.n
    particles = {"image_name": pd.Categorical.from_codes(np.zeros(n, dtype=np.int8),
                                                         categories=pd.Index([str(path.absolute())], dtype=object)),
                 "image_index": np.arange(n, dtype=np.int64), "box": same(np.int64(info.ny), n),
                 "optics_group": same(np.int64(1), n)}
    sizes = [float(header["cella"][a]) / int(header[f"m{a}"]) if int(header[f"m{a}"]) > 0 else 0.0 for a in "xy"]
    px, py = (float(np.float32(s)) if np.isfinite(s) else 0.0 for s in sizes)
    if px > 0 and px == py:
        particles["pixel_size"] = same(px, n)
    particles["optics_group_name"] = group_names(particles["optics_group"])
    why = (f"its x and y pixel sizes differ ({px:g} and {py:g} Å)" if px > 0 and py > 0 and px != py
           else "it gives none (cell size or sampling 0)")
    attrs = {"format": NAME, "pose": "none",
             "no_pixel_size": f"the stack header gives no pixel size to use: {why}; give --pixel-size"}
    return Table(pd.DataFrame(particles, index=pd.RangeIndex(n), copy=False), attrs)


def read_headers(paths: Sequence[str]) -> list[StackInfo]:
    """``[read_info(p) for p in paths]`` (the same results and the same first error), with the headers
    decoded together: each distinct machine stamp and mode is decoded once, the rest are array
    operations on the headers viewed through mrcfile's ``HEADER_DTYPE``."""
    n = len(paths)
    raw = np.zeros((n, HEADER_BYTES), dtype=np.uint8)
    got = np.zeros(n, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    failed = None  # the error of the first file that could not be read; the files after it are not read
    for k, path in enumerate(paths):
        try:
            got[k], sizes[k] = _header_into(path, memoryview(raw[k]))
        except ParticleError as exc:
            failed, n = exc, k
            break
    raw, got, sizes = raw[:n], got[:n], sizes[:n]
    machst_mode = np.ascontiguousarray(raw[:, [_MACHST, _MACHST + 1, _MODE, _MODE + 1, _MODE + 2, _MODE + 3]])
    _, first, kind = np.unique(machst_mode.view("V6")[:, 0], return_index=True, return_inverse=True)
    decoded = [_decode_header(raw[i].tobytes()) for i in first.tolist()]
    big = np.array([h.dtype["mode"].byteorder == ">" for h, _ in decoded], dtype=bool)[kind]
    known = np.array([d is not None for _, d in decoded], dtype=bool)[kind]
    itemsize = np.array([0 if d is None else d.itemsize for _, d in decoded], dtype=np.float64)[kind]
    dtypes = np.array(["" if d is None else d.str for _, d in decoded], dtype=object)[kind]
    le, be = raw.view(_HEADER["<"])[:, 0], raw.view(_HEADER[">"])[:, 0]
    nx, ny, nz, ext = (np.where(big, be[f], le[f]).astype(np.int64) for f in ("nx", "ny", "nz", "nsymbt"))
    offset = HEADER_BYTES + ext
    need = offset + nz.astype(np.float64) * ny * nx * itemsize  # exact below 2**53; beyond, larger than any file
    magic = raw[:, :2].copy().view(">u2")[:, 0]
    compressed = (le["map"] != mrcfile.constants.MAP_ID) & np.isin(magic, (0x1F8B, 0x425A))  # gzip, bzip2
    bad = (got < HEADER_BYTES) | compressed | (ext < 0) | ~known | (nx <= 0) | (ny <= 0) | (nz <= 0) | (sizes < need)
    if bad.any():  # the first bad header, decoded alone, says what is wrong with it
        k = int(np.flatnonzero(bad)[0])
        _info(paths[k], raw[k, :got[k]].tobytes(), int(sizes[k]))
        raise AssertionError(f"header {paths[k]} decoded as bad together but not alone")
    if failed is not None:
        raise failed
    return [StackInfo(path=str(p), n=c, ny=y, nx=x, dtype=d, offset=o) for p, c, y, x, d, o in
            zip(paths, nz.tolist(), ny.tolist(), nx.tolist(), dtypes.tolist(), offset.tolist())]


def _info(path: str, raw: bytes, size: int) -> StackInfo:
    """A stack's header bytes and file size, checked and decoded (see ``read_info``)."""
    if raw[_MAP:_MAP + 4] != mrcfile.constants.MAP_ID and raw[:2] in (b"\x1f\x8b", b"BZ"):
        raise ParticleError("could not read the MRC header (the stack is compressed; decompress it first)",
                            path=path)
    if len(raw) < HEADER_BYTES:
        raise ParticleError("could not read the MRC header (Couldn't read enough bytes for MRC header)", path=path)
    header, dtype = _decode_header(raw)
    if int(header["nsymbt"]) < 0:
        raise ParticleError("could not read the MRC header (negative count)", path=path)
    if dtype is None:
        mode = int(header["mode"])
        raise ParticleError(f"unsupported MRC mode {mode} (Unrecognised mode '{mode}')", path=path)
    nx, ny, nz = int(header["nx"]), int(header["ny"]), int(header["nz"])
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise ParticleError(f"header gives an empty or invalid shape (nx, ny, nz) = ({nx}, {ny}, {nz})", path=path)
    offset = HEADER_BYTES + int(header["nsymbt"])
    info = StackInfo(path=str(path), n=nz, ny=ny, nx=nx, dtype=dtype.str, offset=offset)
    need = offset + nz * info.image_bytes
    if size < need:
        have = max(size - offset, 0) // info.image_bytes
        raise ParticleError(f"stack is shorter than its header says: the header gives {nz} images of "
                            f"{ny}x{nx} {dtype.name}, expected {need} bytes but the file has {size} "
                            f"(only {have} complete images)", path=path)
    return info


_MAP, _MODE, _MACHST = (HEADER_DTYPE.fields[f][1] for f in ("map", "mode", "machst"))  # byte offsets
_HEADER = {order: HEADER_DTYPE.newbyteorder(order) for order in "<>"}
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _header_bytes(path: str) -> tuple[bytes, int]:
    """The first 1024 bytes of a regular file (fewer if it is shorter) and its size."""
    buf = bytearray(HEADER_BYTES)
    got, size = _header_into(path, memoryview(buf))
    return bytes(buf[:got]), size


def _header_into(path: str, buf: memoryview) -> tuple[int, int]:
    """Read the first ``len(buf)`` bytes of a regular file into ``buf``: (bytes read, file size).
    O_NONBLOCK: a FIFO is never waited on, and fstat refuses it before any read."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise ParticleError("image stack not found", path=path) from None
    except OSError as exc:
        raise ParticleError(f"could not read the MRC header ({exc})", path=path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path) if stat.S_ISDIR(st.st_mode) \
                else "not a regular file"
            raise ParticleError(f"could not read the MRC header ({what})", path=path)
        got = 0
        while got < len(buf):  # from the start of a file just opened: plain reads, on every platform
            chunk = os.read(fd, len(buf) - got)
            if not chunk:
                break
            buf[got:got + len(chunk)] = chunk
            got += len(chunk)
        return got, st.st_size
    except OSError as exc:
        raise ParticleError(f"could not read the MRC header ({exc})", path=path) from exc
    finally:
        os.close(fd)


def _decode_header(raw: bytes) -> tuple[np.void, np.dtype | None]:
    """The header record in its byte order and the data dtype (None for an unknown mode), as
    mrcfile's permissive reader decides them."""
    try:
        order = mrcfile.utils.byte_order_from_machine_stamp(raw[_MACHST:_MACHST + 4])
    except ValueError:
        order = "<"
    header = np.frombuffer(raw, dtype=_HEADER[order], count=1)[0]
    for candidate in (header, np.frombuffer(raw, dtype=_HEADER["<" if order == ">" else ">"], count=1)[0]):
        try:
            mode = mrcfile.utils.dtype_from_mode(int(candidate["mode"]))
        except ValueError:
            continue
        return candidate, mode.newbyteorder(candidate.dtype["mode"].byteorder)
    return header, None


def read_chunk(stacks: Sequence[StackInfo], runs, order: np.ndarray | None = None,
               dtype: str | None = None) -> np.ndarray:
    """Read runs of images straight from their stacks into an array in metadata order.

    ``runs`` holds rows ``(stack, start, stop)``: images ``[start, stop)`` of ``stacks[stack]``, read
    in the order given (best sorted by stack and image, as ``planning.plan_chunks`` gives them);
    call the images so read, in that order, ``images_read``. The result is ``images_read[order]``
    (``order=None``: ``images_read`` itself). It has native byte order and ``dtype`` (default: the
    first stack's mode), so that sets mixing modes can be read.

    Each stack is opened with ``os.open`` once for its consecutive runs and closed before the next.
    A stack in the output's mode is read in place: each run is one ``preadv`` whose buffers are the
    rows its images take in the result, so shuffled particles cost no reordering copy (an image
    wanted twice is read once and copied). Other byte orders and modes are read as stored and
    converted into their rows. Nothing outlives the call. Raises ParticleError naming the stack when
    it cannot be opened or ends early.
    """
    table = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    if not len(table):
        raise ValueError("no runs to read")
    first = stacks[int(table[0, 0])]
    want = np.dtype(dtype or first.dtype).newbyteorder("=")
    total = int((table[:, 2] - table[:, 1]).sum())
    dest = None  # the result row of each image read (its first row when wanted more than once)
    if order is None:
        n = total
    else:
        order = np.asarray(order, dtype=np.int64)
        n = len(order)
        if n and (order.min() < 0 or order.max() >= total):
            raise ValueError(f"order must index the {total} images read")
        dest = np.full(total, -1, dtype=np.int64)
        dest[order[::-1]] = np.arange(n - 1, -1, -1)
        if (dest < 0).any():
            raise ValueError("order leaves images read unused")
    out = np.empty((n, first.ny, first.nx), dtype=want)
    raw = memoryview(out.reshape(-1).view(np.uint8))
    rb = first.ny * first.nx * want.itemsize  # bytes per result row
    rows = None if dest is None else dest.tolist()
    fd, now = -1, -1  # the open stack and its number
    pos = 0
    try:
        for s, start, stop in table.tolist():
            if s != now:  # runs come grouped by stack: each stack is opened once
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                info = stacks[s]
                if (info.ny, info.nx) != (first.ny, first.nx):
                    raise ParticleError(f"images of {info.ny}x{info.nx} cannot be read together with {first.ny}x"
                                        f"{first.nx} images of {first.path}", path=info.path)
                fd, now = _open(info), s
                image_bytes, in_place = info.image_bytes, np.dtype(info.dtype) == want
            m = stop - start
            offset = info.offset + start * image_bytes
            if in_place:
                if rows is None:
                    views = [raw[pos * rb:(pos + m) * rb]]
                else:
                    views = [raw[r * rb:(r + 1) * rb] for r in rows[pos:pos + m]]
                _preadv_into(fd, views, offset, info)
            else:  # another byte order or mode: read as stored, then convert into place
                tmp = np.empty((m, info.ny, info.nx), dtype=info.dtype)
                _preadv_into(fd, [memoryview(tmp.reshape(-1).view(np.uint8))], offset, info)
                if rows is None:
                    out[pos:pos + m] = tmp
                else:
                    out[rows[pos:pos + m]] = tmp
            pos += m
    finally:
        if fd >= 0:
            os.close(fd)
    if dest is not None:
        again = np.flatnonzero(dest[order] != np.arange(n))  # images wanted more than once
        if len(again):
            out[again] = out[dest[order[again]]]
    return out


_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate line ends
_PREADV = getattr(os, "preadv", None)  # Linux, BSD, recent macOS
try:
    _IOV_MAX = max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16  # the smallest POSIX allows


def _open(info: StackInfo) -> int:
    try:
        return os.open(info.path, os.O_RDONLY | _BINARY)
    except FileNotFoundError:
        raise ParticleError("image stack not found", path=info.path) from None
    except OSError as exc:
        raise ParticleError(f"could not open the image stack ({exc.strerror or exc})", path=info.path) from exc


def _preadv_into(fd: int, views: list[memoryview], offset: int, info: StackInfo) -> None:
    """Fill ``views`` in turn from byte ``offset`` of ``fd`` (``IOV_MAX`` buffers per call, partial
    reads continued), or fail naming the stack."""
    length = sum(map(len, views))
    done, i = 0, 0
    try:
        while i < len(views):
            batch = views[i:i + _IOV_MAX]
            if _PREADV is not None:
                got = _PREADV(fd, batch, offset + done)
            else:  # no preadv (older macOS, Windows): seek and read into the first buffer
                os.lseek(fd, offset + done, os.SEEK_SET)
                with open(fd, "rb", buffering=0, closefd=False) as f:
                    got = f.readinto(batch[0]) or 0
            if not got:
                break
            done += got
            while got and i < len(views):  # step over the buffers filled; trim one filled in part
                if got >= len(views[i]):
                    got -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][got:]
                    got = 0
    except OSError as exc:
        raise ParticleError(f"could not read the image stack ({exc.strerror or exc}) at byte {offset + done}",
                            path=info.path) from exc
    if done < length:
        raise ParticleError(f"stack ended early: expected {length} bytes at byte {offset}, read {done}",
                            path=info.path)


def stack_header(n: int, box: int, dtype: np.dtype, pixel_size: float, label: str) -> bytes:
    """A valid MRC2014 image-stack header (ispg 0, mz 1, nversion 20140) for ``n`` images of box².

    Statistics are marked as not computed (dmax < dmin, rms < 0), as MRC2014 allows, so that
    float32 stacks can be written by moving bytes without decoding them.
    """
    header = np.zeros((), dtype=HEADER_DTYPE).view(np.recarray)
    header.nx, header.ny, header.nz = box, box, n
    header.mode = mrcfile.utils.mode_from_dtype(np.dtype(dtype))
    header.mx, header.my, header.mz = box, box, 1
    header.cella.x = header.cella.y = box * pixel_size
    header.cella.z = pixel_size
    header.cellb = (90.0, 90.0, 90.0)
    header.mapc, header.mapr, header.maps = 1, 2, 3
    header.dmin, header.dmax, header.dmean, header.rms = 0.0, -1.0, -2.0, -1.0
    header.ispg = 0
    header.nversion = 20140
    header.exttyp = b"    "
    header.map = mrcfile.constants.MAP_ID
    header.machst = mrcfile.utils.machine_stamp_from_byte_order("<")
    header.nlabl = 1
    header.label[0] = label.encode("ascii", "replace")[:80]
    return header.tobytes()


# --- writing stacks (worker tasks) ---------------------------------------------------------------

FLOAT16_MAX = 65504.0



VERIFY_BYTES = 16 * 2**20  # bytes compared at a time when checking a kept file



_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # no link followed, no FIFO waited on



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
        pwrite_all(fd, memoryview(stack_header(n, box, np.dtype(dtype), pixel_size, "dparticles")), 0)
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
    fd = _open_output(file)
    try:
        pwrite_all(fd, buf, offset)
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
    fd = _open_output(file)
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



def record_path(final: str) -> str:
    """Where the record of a finished output file ``OUT/stacks/NAME`` is kept: ``OUT/.dparticles/NAME.json``."""
    stacks, name = os.path.split(final)
    return os.path.join(os.path.dirname(stacks), RECORDS, f"{name}.json")



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



def _open_output(file: tuple) -> int:
    try:
        return open_tmp(*file)
    except OSError as exc:
        raise _write_error(exc, file[0]) from exc



def _open_for_write(tmp: str) -> int:
    try:
        return os.open(tmp, os.O_WRONLY | _OPEN_FLAGS)
    except OSError as exc:
        raise _write_error(exc, tmp) from exc



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
            pwrite_all(dst, chunk, dst_off + done)
            done += len(chunk)
    return done



def _write_error(exc: OSError, path: str) -> ParticleError:
    base = os.path.basename(path).split(TMP_MARK)[0].lstrip(".")
    return ParticleError(f"could not write {base} ({exc.strerror or exc}); nothing was left under the final name, "
                         "rerun to continue", path=os.path.dirname(path) or ".")

