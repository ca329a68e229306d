"""Import Particle Stack: link the source stacks into an output folder and write metadata that
points at the links (``particles.star``, RELION 3.1 style, and ``particles.cs``). Nothing is copied."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.formats.cryosparc import import_signatures
from dparticles.formats.mrc import read_info
from dparticles.formats.relion import read_star
from dparticles.metadata import floats
from dparticles.runner import JobRun
from dparticles.safe import hold_outputs, prepare_output
from dparticles.stack import read_infos, resolve_stacks, search_roots
from dparticles.store import project_path, write_metadata

EXPOSURE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer", ".mrc.bz2")


@dataclass
class ImportResult:
    out: Path
    n_particles: int
    n_stacks: int
    exposures_matched: int | None
    exposures_unmatched: int | None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"imported {self.n_particles} particles from {self.n_stacks} stacks into {self.out}"
        if self.exposures_matched is not None:
            text += f"; {self.exposures_matched} particles linked to exposures, {self.exposures_unmatched} unmatched"
        return "\n".join([text, *(f"note: {n}" for n in self.notes)])


@hold_outputs
def import_particles(source: str | os.PathLike, out: str | os.PathLike, *, exposures: str | None = None,
                     trim_prefix: str = "", trim_suffix: str = "", keep_unmatched: bool = False,
                     overwrite: bool = False, project_dir: str | os.PathLike | None = None,
                     **open_options) -> ImportResult:
    """Import particles: options as :func:`open_particles`, plus linking to exposures by micrograph name.
    The stacks are linked under ``out/stacks`` and named as RELION names them, relative to
    ``project_dir`` (default: the current directory) or absolute when ``out`` lies outside it."""
    project = Path(project_dir if project_dir is not None else os.getcwd()).absolute()
    run = JobRun("import", {"source": str(source), "exposures": exposures, "trim_prefix": trim_prefix,
                            "trim_suffix": trim_suffix, "keep_unmatched": keep_unmatched, "project_dir": project,
                            **open_options})
    ds = open_particles(source, **open_options)
    matched = unmatched = None
    if exposures is not None:
        ds, matched, unmatched = link_exposures(ds, Path(exposures), trim_prefix, trim_suffix, keep_unmatched)
    fields, notes = cryosparc_import_fields(ds, open_options.get("data_dir")) \
        if str(ds.attrs.get("format", "")).startswith("relion") else ({}, [])
    token = tokenize(str(source), sorted(open_options.items()), exposures, trim_prefix, trim_suffix, keep_unmatched)
    out_dir = prepare_output(Path(out).absolute(), ds, overwrite=overwrite, job="import", token=token)
    paths = indices = None
    n_stacks = 0
    if "images" in ds:
        links = _link_stacks(ds, out_dir, project)
        n_stacks = len(links)
        paths = np.array([links[p] for p in ds["stack_path"].values], dtype=object)[ds["stack_id"].values]
        indices = ds["image_index"].values
    write_metadata(out_dir, ds, paths, indices, cs=True, updates=fields)
    result = ImportResult(Path(out), ds.sizes["particle"], n_stacks, matched, unmatched, notes)
    run.record(out_dir, ds, {"particles": result.n_particles, "stacks_linked": n_stacks, "matched": matched,
                             "unmatched": unmatched, "cs_fields_added": _field_names(fields), "notes": notes})
    return result


def cryosparc_import_fields(ds: xr.Dataset, data_dir: str | os.PathLike | None) -> tuple[dict, list[str]]:
    """What CryoSPARC's Import Particle Stack writes beyond the fields a STAR file names directly, as
    columns for the ``.cs`` writer (``cs:`` fields, ``micrograph_ny``/``micrograph_nx``, from which it
    writes ``location/micrograph_shape`` and the centre fractions), and notes on what could not be
    filled and why. Unknowns take the value CryoSPARC's own import gives them (README, "`particles.cs`
    from a STAR file")."""
    n = ds.sizes["particle"]

    def same(value, dtype) -> np.ndarray:  # one value for every particle, in no memory
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n,))

    def star(label: str, default: float) -> np.ndarray:
        for name in (f"star:{label}", f"star_optics:{label}"):
            if name in ds.coords:
                return floats(ds[name].values, label, ds.attrs.get("source")).astype(np.float32)
        return same(default, np.float32)

    cols: dict[str, object] = {}
    if "stack_path" in ds.coords:  # each particle signed by the stack it is imported from (the link's target)
        sigs = import_signatures([str(Path(p).resolve()) for p in ds["stack_path"].values.astype(str)])
        cols["cs:blob.import_sig"] = sigs[ds["stack_id"].values]
    cols["cs:ctf.type"] = pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=["imported"])
    if "phase_shift" not in ds.coords:
        cols["cs:ctf.phase_shift_rad"] = same(0.0, np.float32)
    cols["cs:ctf.scale"] = star("rlnCtfScalefactor", 1.0)
    cols["cs:ctf.scale_const"] = same(0.0, np.float32)
    cols["cs:ctf.bfactor"] = star("rlnCtfBfactor", 0.0)
    # higher-order aberrations: RELION's and CryoSPARC's are not convertible; CryoSPARC's import writes zeros
    for name, size in (("shift_A", 2), ("tilt_A", 2), ("trefoil_A", 2), ("tetra_A", 4), ("anisomag", 4)):
        for i in range(size):
            cols[f"cs:ctf.{name}[{i}]"] = same(0.0, np.float32)
    notes: list[str] = []
    mic = "exposure" if "exposure" in ds.coords else "micrograph"
    if mic not in ds.coords:
        return cols, notes
    codes, uniques = pd.factorize(ds[mic].values)
    uids = np.append(import_signatures([str(u) for u in uniques]), np.uint64(0))  # code -1 (no name): 0
    cols["cs:location.micrograph_uid"] = uids[codes]
    cols["cs:location.exp_group_id"] = (ds["optics_group"].values.astype(np.int64) - 1).astype(np.uint32)
    if "star_optics:rlnMicrographPixelSize" in ds.coords or "star:rlnMicrographPixelSize" in ds.coords:
        cols["cs:location.micrograph_psize_A"] = star("rlnMicrographPixelSize", np.nan)
    if {"micrograph", "coord_x", "coord_y"} <= set(ds.coords):
        codes, uniques = pd.factorize(ds["micrograph"].values)
        shapes, problem = _micrograph_shapes([str(u) for u in uniques], Path(ds.attrs["source"]), data_dir)
        if problem is None and (codes >= 0).all():
            cols["micrograph_ny"], cols["micrograph_nx"] = shapes[codes, 0], shapes[codes, 1]
        else:
            notes.append("particles.cs has no location/micrograph_shape, location/center_x_frac or "
                         f"location/center_y_frac: {problem or 'some particles name no micrograph'}; "
                         "particles.star keeps rlnCoordinateX/Y")
    return cols, notes


def _field_names(columns: dict) -> list[str]:
    """The ``.cs`` fields that :func:`cryosparc_import_fields` columns become, for the run record."""
    names = {re.sub(r"\[\d+\]$", "", c[3:]).replace(".", "/") for c in columns if c.startswith("cs:")}
    if "micrograph_ny" in columns:
        names |= {"location/micrograph_shape", "location/center_x_frac", "location/center_y_frac"}
    return sorted(names)


def _micrograph_shapes(names: list[str], metadata: Path,
                       data_dir: str | os.PathLike | None) -> tuple[np.ndarray, str | None]:
    """(ny, nx) of each micrograph from its MRC header, looked for as stacks are; or why not all could
    be read (how many failed, and the first one's reason)."""
    roots = search_roots(metadata, data_dir)
    try:  # all at once: a folder is listed once, the headers read concurrently
        infos = read_infos(resolve_stacks(names, roots, metadata))
        return np.array([(i.ny, i.nx) for i in infos], dtype=np.int64).reshape(-1, 2), None
    except ParticleError:
        pass  # one by one, to say how many could not be read
    shapes = np.zeros((len(names), 2), dtype=np.int64)
    failed: list[str] = []
    for k, name in enumerate(names):
        try:
            info = read_info(resolve_stacks([name], roots, metadata)[0])
            shapes[k] = info.ny, info.nx
        except ParticleError as exc:
            reason = "not found beside the metadata or in its parent folders" if "not found" in str(exc) else exc
            failed.append(f"{name!r}: {reason}")
    if failed:
        return shapes, f"{len(failed)} of {len(names)} micrographs could not be read (first {failed[0]})"
    return shapes, None


def _link_stacks(ds: xr.Dataset, out: Path, project: Path) -> dict[str, str]:
    """Symlink each distinct source stack under ``out/stacks``; returns source -> the link's name as
    the metadata gives it (:func:`dparticles.store.project_path`)."""
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
