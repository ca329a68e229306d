"""Temporary names for files written before they are renamed into place, and opening files without
following links or hanging on a FIFO (no heavy imports: batch tasks on workers use this)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

TMP_MARK = ".dparticles-tmp"
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def private_dir(path: Path) -> Path:
    """A new folder beside ``path`` with a random name (``.NAME.dparticles-tmp-XXXXXXXX``), readable
    and writable by this account only: what is written in it cannot be planted, linked or guessed
    by anyone else, and it is on the same file system, so a rename from it into place is atomic."""
    path = Path(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}-", dir=path.parent))


def is_regular(path: str | os.PathLike) -> bool:
    """Whether ``path`` itself (not what a link there points to) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` only if it is a regular file, never following a link at its name and never
    waiting on a FIFO or a device; raises OSError otherwise."""
    fd = os.open(path, flags | _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str | os.PathLike, limit: int = 2**20) -> bytes | None:
    """The bytes of a small regular file (a run record, a marker), or None if there is none there,
    it is something else (a link, a FIFO, a folder) or larger than ``limit``."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if len(data) > limit else data


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in the small regular file at ``path`` (a run or file record), or None if there
    is none, or it is not a regular file (a link, a FIFO: never followed or opened) holding one."""
    data = read_small(path)
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
