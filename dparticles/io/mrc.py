"""MRC image stacks: headers, reads of particle runs, and stack headers for writing.

Knows the MRC2014 format and the ways real headers are imperfect (zero pixel size, nversion 0,
a missing map id, stacks flagged as volumes); it knows nothing of particles or metadata.
"""

from __future__ import annotations

import os
import warnings
from itertools import groupby
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

    A 2D image counts as a stack of one; a file flagged as a volume is read as a stack of ``nz``
    images. Raises ParticleError for an unreadable file, an unknown mode or a short data block.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
    except FileNotFoundError:
        raise ParticleError("image stack not found", path=path) from None
    except Exception as exc:
        raise ParticleError(f"could not read the MRC header ({exc})", path=path) from exc
    if header is None:
        raise ParticleError("could not read the MRC header (file shorter than 1024 bytes)", path=path)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as exc:
        raise ParticleError(f"unsupported MRC mode {int(header.mode)} ({exc})", path=path) from None
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise ParticleError(f"header gives an empty or invalid shape (nx, ny, nz) = ({nx}, {ny}, {nz})", path=path)
    offset = HEADER_BYTES + max(int(header.nsymbt), 0)
    info = StackInfo(path=str(path), n=nz, ny=ny, nx=nx, dtype=dtype.str, offset=offset)
    size = os.path.getsize(path)
    need = offset + nz * info.image_bytes
    if size < need:
        have = max(size - offset, 0) // info.image_bytes
        raise ParticleError(f"stack is shorter than its header says: the header gives {nz} images of "
                            f"{ny}x{nx} {dtype.name}, expected {need} bytes but the file has {size} "
                            f"(only {have} complete images)", path=path)
    return info


def read_runs(runs: Sequence[tuple[StackInfo, int, int]], dtype: str | None = None) -> np.ndarray:
    """Read images ``[start, stop)`` of each stack in turn and return them concatenated, in native
    byte order (converted to ``dtype`` when given, for sets whose stacks differ in mode).

    Each stack is opened by path as an mrcfile memory map, once for all its consecutive runs, the
    runs are copied out, and the map is closed, so nothing mapped outlives the call (safe inside
    dask tasks).
    """
    if not runs:
        raise ValueError("no runs to read")
    first = runs[0][0]
    total = sum(stop - start for _, start, stop in runs)
    out = np.empty((total, first.ny, first.nx), dtype=np.dtype(dtype or first.dtype).newbyteorder("="))
    pos = 0
    for info, group in groupby(runs, key=lambda run: run[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(info.path, mode="r", permissive=True) as mrc:
                data = mrc.data
                if data is None:  # mrcfile could not interpret the header; fall back to our own reading
                    data = _raw_map(info)
                data = data.reshape(-1, info.ny, info.nx)
                for _, start, stop in group:
                    out[pos:pos + stop - start] = data[start:stop]
                    pos += stop - start
                del data
    return out


def _raw_map(info: StackInfo) -> np.ndarray:
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset,
                     shape=(info.n, info.ny, info.nx))


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
