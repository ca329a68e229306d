"""CryoSPARC ``.cs`` datasets: numpy structured arrays, one row per particle. No science here."""

from __future__ import annotations

import os
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
    return data


def write_cs(path: str | os.PathLike, data: np.ndarray) -> None:
    """Save a structured array exactly as CryoSPARC does (``np.save`` to an open file: no ``.npy`` suffix)."""
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)
