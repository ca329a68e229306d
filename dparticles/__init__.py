"""dparticles: lazy, chunked cryo-EM particle stacks on Dask.

The public Python API, which the command line and the notebooks use.
"""

from dparticles.dataset import open_particles, table
from dparticles.downsample import downsample
from dparticles.errors import ParticleError
from dparticles.importer import import_particles
from dparticles.info import describe
from dparticles.restack import restack

__all__ = ["ParticleError", "describe", "downsample", "import_particles", "open_particles", "restack", "table"]
__version__ = "0.1.0"
