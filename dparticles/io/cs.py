"""CryoSPARC ``.cs`` datasets: numpy structured arrays, one row per particle. No science here."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dparticles.errors import ParticleError


def read_cs(path: str | os.PathLike) -> np.ndarray:
    """Load a ``.cs`` file as a structured array (never pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise ParticleError("no such CryoSPARC dataset", path=path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ParticleError(f"could not read as a CryoSPARC .cs dataset ({exc})", path=path) from exc
    if not isinstance(data, np.ndarray) or data.dtype.names is None:
        raise ParticleError("not a CryoSPARC dataset: expected a numpy structured array", path=path)
    if data.ndim != 1:
        raise ParticleError(f"not a CryoSPARC dataset: the array has shape {data.shape}; expected one row per "
                            "particle (a one-dimensional array)", path=path)
    return data


def write_cs(path: str | os.PathLike, data: np.ndarray) -> None:
    """Save a structured array exactly as CryoSPARC does (``np.save`` to an open file: no ``.npy`` suffix)."""
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)


def import_signatures(paths: Sequence[str]) -> np.ndarray:
    """CryoSPARC's 64-bit import signature of each path: the first 8 bytes of the SHA-1 of the path's
    UTF-8 text, read as a little-endian ``uint64`` (``cryosparc.tools.get_import_signatures``, the scheme
    CryoSPARC documents for ``import_sig``). An empty path (nothing to sign) gives 0."""
    digests = b"".join(hashlib.sha1(p.encode("utf-8")).digest()[:8] if p else bytes(8) for p in paths)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)
