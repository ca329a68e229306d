"""Temporary names for files written before they are renamed into place (no heavy imports: batch
tasks on workers use this)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

TMP_MARK = ".dparticles-tmp"


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place: unique per host
    and process, so workers on different nodes of a shared file system never share one."""
    return path.with_name(f"{path.name}{TMP_MARK}-{socket.gethostname()}-{os.getpid()}")
