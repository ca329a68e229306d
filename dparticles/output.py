"""Writing results safely: every file appears under its final name only when complete, outputs never
overwrite inputs, and existing outputs are replaced only when asked."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr

from dparticles.dataset import table
from dparticles.errors import ParticleError
from dparticles.io.files import TMP_MARK, tmp_name
from dparticles.io.cs import write_cs
from dparticles.io.star import write_star
from dparticles.metadata import assign, to_cs, to_star

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` then rename tmp to ``path``; on any failure remove tmp and re-raise.

    The data are flushed to disk before the rename, so a crash leaves either the old file, no
    file, or the complete new one, never a partial file under the final name.
    """
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ParticleError(f"could not write ({exc.strerror or exc})", path=path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path, nonce: str = "") -> None:
    """Delete temporary files an interrupted run left behind (only the run ``nonce``'s, if given)."""
    for p in folder.rglob(f"*{TMP_MARK}-{nonce}*"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def input_files(ds: xr.Dataset) -> set[Path]:
    """Every file a dataset reads: its metadata file and its stacks, resolved."""
    files = {Path(ds.attrs["source"]).resolve()} if "source" in ds.attrs else set()
    if "image_path" in ds.coords:
        files |= {Path(p).resolve() for p in np.unique(ds["image_path"].values.astype(str))}
    return files


def refuse_inputs(out: Path, ds: xr.Dataset, flag: str = "--out") -> None:
    """Raise ParticleError if ``out`` is, or is a folder holding, any file ``ds`` reads."""
    resolved = Path(out).resolve()
    for f in input_files(ds):
        if resolved == f or resolved in f.parents:
            what = "output folder" if flag == "--out" else f"{flag} path"
            raise ParticleError(f"the {what} is or holds an input ({f}); choose another {flag}", path=out)


RUN_MARKER = ".dparticles-run.json"


def prepare_output(out: Path, ds: xr.Dataset, *, overwrite: bool, job: str, token: str) -> Path:
    """Create (or reuse) the output folder after checking it is safe, and return it.

    Refuses a folder that holds any input. A non-empty folder is emptied with ``overwrite``;
    without it, it is reused only if it holds a run of the same job with the same inputs and
    arguments (``token``), which is then resumed; anything else is refused.
    """
    out = Path(out)
    refuse_inputs(out, ds)
    if out.exists() and not out.is_dir():
        raise ParticleError("output exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif _marker(out) != {"job": job, "token": token}:
            raise ParticleError("output folder exists and is not empty (nor an unfinished run of this job with "
                                "the same arguments); use --overwrite to replace it", path=out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    if _marker(out) is None:
        atomic_write(out / RUN_MARKER, lambda tmp: tmp.write_text(json.dumps({"job": job, "token": token})))
    return out


def _marker(out: Path) -> dict | None:
    try:
        return json.loads((out / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_metadata(out: Path, ds: xr.Dataset, paths: np.ndarray | None, indices: np.ndarray | None,
                   *, cs: bool = False, updates: dict | None = None) -> None:
    """Write ``particles.star`` (and ``particles.cs`` when ``cs``) in ``out`` for the particles of
    ``ds``, whose images are now at ``paths`` (relative to ``out``) / ``indices`` (0-based).
    ``updates`` replaces canonical columns (new pixel size, box, shifts...). Written last, atomically."""
    particles = assign(table(ds, skip=("image_path", "stack_id", "image_name", "image_index")), updates or {})
    if cs:
        data = to_cs(particles, paths, indices, ds.attrs.get("pose", "none"))
        atomic_write(out / "particles.cs", lambda tmp: write_cs(tmp, data))
    blocks = to_star(particles, paths, indices)
    atomic_write(out / "particles.star", lambda tmp: write_star(tmp, blocks))
