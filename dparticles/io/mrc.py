"""MRC image stacks: headers, reads of particle runs, and stack headers for writing.

Knows the MRC2014 format and the ways real headers are imperfect (zero pixel size, nversion 0,
a missing map id, stacks flagged as volumes); it knows nothing of particles or metadata.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Sequence

import mrcfile
import mrcfile.constants
import mrcfile.utils
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from dparticles.errors import ParticleError

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
    in the order given (best sorted by stack and image, as ``planning.plan_reads`` gives them);
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
