"""File formats as engines, one module each, behind one registry (as xarray's ``backends/``).

An engine module holds everything about its format and offers a small common interface:

- ``NAME``, and ``guess_can_open(path) -> bool``: whether it reads ``path`` (by name, or a look at a
  folder), cheap;
- ``open_table(path) -> metadata.Table`` for metadata whose images lie in stacks (RELION, CryoSPARC,
  a bare MRC stack), or ``open_dataset(path) -> xarray.Dataset`` for a format that holds the images
  itself (a zarr cache);
- ``METADATA_FILE`` and ``write_particles(path, particles, paths, indices, attrs)`` for a format that
  output folders carry as metadata (``cryosparc`` also writes its result group beside it).

:func:`engine_for` picks the engine of a path for :func:`dparticles.open_particles`, the xarray
entry point and the CLI alike. A new format is one new module and one line of :data:`ENGINES`.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from types import ModuleType

from dparticles.errors import ParticleError
from dparticles.safe import read_json

# asked in this order; each module is imported only when a path is put to it
ENGINES = ("relion", "cryosparc", "mrc", "zarr")
OUTPUT_METADATA = ("relion", "cryosparc")  # what an output folder may hold, in order of preference


def engine(name: str) -> ModuleType:
    """The engine module called ``name``."""
    return import_module(f"dparticles.formats.{name}")


def resolve(path: Path) -> Path:
    """``path``, or for an output folder the metadata file inside it (a zarr cache is itself the
    input): the one in the format the folder's particles came in, as its run record (``job.json``)
    names their metadata, so that CryoSPARC metadata stay CryoSPARC's from job to job; else STAR."""
    if path.is_dir() and not engine("zarr").guess_can_open(path):
        record = read_json(path / "job.json") or {}
        came_in = str((record.get("inputs") or {}).get("metadata") or "")
        first = next((name for name in OUTPUT_METADATA if came_in.endswith(engine(name).SUFFIXES)), None)
        for name in sorted(OUTPUT_METADATA, key=lambda name: name != first):
            inside = path / engine(name).METADATA_FILE
            if inside.is_file():
                return inside
        raise ParticleError("folder holds no " + ", ".join(engine(n).METADATA_FILE for n in OUTPUT_METADATA)
                            + " or zarr cache", path=path)
    return path


def engine_for(path: Path) -> ModuleType | None:
    """The engine that reads ``path`` (see :func:`resolve` for folders), or None."""
    for name in ENGINES:
        module = engine(name)
        if module.guess_can_open(path):
            return module
    return None


def known() -> str:
    """What can be opened, in words, for messages and help."""
    return "RELION .star, CryoSPARC .cs, a bare .mrcs/.mrc stack, a dparticles output folder or a zarr cache"
