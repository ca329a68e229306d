"""dparticles: lazy, chunked cryo-EM particle stacks on Dask.

The public Python API, which the command line and the notebooks use. Names are imported on first
use, so that dask workers, which only need ``dparticles.formats.mrc``, start without loading the rest.
"""

from importlib import import_module

_API = {
    "ParticleError": "dparticles.errors",
    "describe": "dparticles.jobs.info",
    "downsample": "dparticles.jobs.downsample",
    "import_particles": "dparticles.jobs.importer",
    "open_particles": "dparticles.dataset",
    "ops": "dparticles.ops",
    "restack": "dparticles.jobs.restack",
    "table": "dparticles.dataset",
    "to_stacks": "dparticles.store",
}
__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _API:
        module = import_module(_API[name])
        return module if module.__name__ == f"dparticles.{name}" else getattr(module, name)
    raise AttributeError(f"module 'dparticles' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
