"""Import Particle Stack: link the source stacks into an output folder and write metadata that
points at the links (``particles.star``, RELION 3.1 style, and ``particles.cs``). Nothing is copied."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.io.star import read_star
from dparticles import __version__
from dparticles.output import hold_outputs, prepare_output, project_path, write_metadata
from dparticles.record import command_line, inputs, now, write_run_record

EXPOSURE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer", ".mrc.bz2")


@dataclass
class ImportResult:
    out: Path
    n_particles: int
    n_stacks: int
    exposures_matched: int | None
    exposures_unmatched: int | None

    def __str__(self) -> str:
        text = f"imported {self.n_particles} particles from {self.n_stacks} stacks into {self.out}"
        if self.exposures_matched is not None:
            text += f"; {self.exposures_matched} particles linked to exposures, {self.exposures_unmatched} unmatched"
        return text


@hold_outputs
def import_particles(source: str | os.PathLike, out: str | os.PathLike, *, exposures: str | None = None,
                     trim_prefix: str = "", trim_suffix: str = "", keep_unmatched: bool = False,
                     overwrite: bool = False, project_dir: str | os.PathLike | None = None,
                     **open_options) -> ImportResult:
    """Import particles: options as :func:`open_particles`, plus linking to exposures by micrograph name.
    The stacks are linked under ``out/stacks`` and named as RELION names them, relative to
    ``project_dir`` (default: the current directory) or absolute when ``out`` lies outside it."""
    started, t0 = now(), time.monotonic()
    ds = open_particles(source, **open_options)
    matched = unmatched = None
    if exposures is not None:
        ds, matched, unmatched = link_exposures(ds, Path(exposures), trim_prefix, trim_suffix, keep_unmatched)
    token = tokenize(str(source), sorted(open_options.items()), exposures, trim_prefix, trim_suffix, keep_unmatched)
    out_dir = prepare_output(Path(out).absolute(), ds, overwrite=overwrite, job="import", token=token)
    project = Path(project_dir if project_dir is not None else os.getcwd()).absolute()
    paths = indices = None
    n_stacks = 0
    if "images" in ds:
        links = _link_stacks(ds, out_dir, project)
        n_stacks = len(links)
        paths = np.array([links[p] for p in ds["stack_path"].values], dtype=object)[ds["stack_id"].values]
        indices = ds["image_index"].values
    write_metadata(out_dir, ds, paths, indices, cs=True)
    result = ImportResult(Path(out), ds.sizes["particle"], n_stacks, matched, unmatched)
    write_run_record(out_dir, {  # no dask tasks run here, so there is no performance report
        "job": "import", "command": command_line(), "version": __version__,
        "parameters": {"source": str(source), "exposures": exposures, "trim_prefix": trim_prefix,
                       "trim_suffix": trim_suffix, "keep_unmatched": keep_unmatched, "project_dir": project,
                       **open_options},
        "inputs": inputs(ds), "started": started, "ended": now(), "seconds": round(time.monotonic() - t0, 3),
        "particles": result.n_particles, "stacks_linked": n_stacks, "matched": matched, "unmatched": unmatched})
    return result


def _link_stacks(ds: xr.Dataset, out: Path, project: Path) -> dict[str, str]:
    """Symlink each distinct source stack under ``out/stacks``; returns source -> the link's name as
    the metadata gives it (:func:`dparticles.output.project_path`)."""
    sources = ds["stack_path"].values.astype(str)
    (out / "stacks").mkdir(exist_ok=True)
    links: dict[str, str] = {}
    used: set[str] = set()
    for k, src in enumerate(sources):
        name = Path(src).name
        if name in used:
            name = f"{k:06d}_{name}"
        used.add(name)
        link, target = out / "stacks" / name, Path(src).resolve()
        if link.is_symlink() and link.resolve() == target:  # left by an interrupted run
            pass
        else:
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        links[src] = project_path(out / "stacks" / name, project)
    return links


def exposure_key(name: str, trim_prefix: str, trim_suffix: str) -> str:
    """Matching key of a micrograph or exposure name: the file name without folders or extension,
    then without ``trim_prefix`` / ``trim_suffix`` where present.

    >>> exposure_key("MotionCorr/job002/Movies/FoilHole_1_fractions.mrc", "", "_fractions")
    'FoilHole_1'
    """
    base = Path(name).name
    for ext in sorted(EXPOSURE_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    if trim_prefix and base.startswith(trim_prefix):
        base = base[len(trim_prefix):]
    if trim_suffix and base.endswith(trim_suffix):
        base = base[: -len(trim_suffix)]
    return base


def link_exposures(ds: xr.Dataset, exposures: Path, trim_prefix: str, trim_suffix: str,
                   keep_unmatched: bool) -> tuple[xr.Dataset, int, int]:
    """Add an ``exposure`` coordinate: the exposure each particle's micrograph name matches."""
    if "micrograph" not in ds.coords:
        raise ParticleError("particles have no micrograph name (rlnMicrographName), so they cannot be linked "
                            "to exposures", path=ds.attrs.get("source"))
    if exposures.is_dir():
        files = sorted(str(p) for p in exposures.iterdir() if p.name.lower().endswith(EXPOSURE_SUFFIXES))
    elif exposures.suffix == ".star":
        blocks = read_star(exposures)
        loop = blocks.get("micrographs", next((b for b in blocks.values()
                                               if isinstance(b, pd.DataFrame) and "rlnMicrographName" in b), None))
        if loop is None or "rlnMicrographName" not in loop:
            raise ParticleError("no rlnMicrographName column; expected a micrographs STAR file", path=exposures)
        files = loop["rlnMicrographName"].astype(str).tolist()
    else:
        raise ParticleError("expected a micrographs .star file or a folder of micrographs/movies", path=exposures)
    table: dict[str, str] = {}
    for f in files:
        key = exposure_key(f, trim_prefix, trim_suffix)
        if key in table and table[key] != f:
            raise ParticleError(f"exposures {table[key]!r} and {f!r} both match the name {key!r}; adjust "
                                "--trim-prefix/--trim-suffix", path=exposures)
        table[key] = f
    keys = [exposure_key(m, trim_prefix, trim_suffix) for m in ds["micrograph"].values.astype(str)]
    exposure = np.array([table.get(k, "") for k in keys], dtype=object)
    missing = exposure == ""
    if missing.any() and not keep_unmatched:
        row = int(np.flatnonzero(missing)[0])
        raise ParticleError(f"{int(missing.sum())} of {len(keys)} particles match no exposure; the first is "
                            f"micrograph {ds['micrograph'].values[row]!r} (key {keys[row]!r}), among "
                            f"{len(table)} exposures such as {next(iter(table), 'none')!r}. Adjust "
                            "--trim-prefix/--trim-suffix, or pass --keep-unmatched",
                            path=ds.attrs.get("source"), particle=row + 1)
    ds = ds.assign_coords(exposure=("particle", exposure))
    return ds, int((~missing).sum()), int(missing.sum())
