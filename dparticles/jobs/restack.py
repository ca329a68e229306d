"""Restack Particles: the particles in use, in metadata order, into new stacks of N particles.

``restack(source, out)`` is ``to_stacks(open_particles(source), out)``: float32 pixels come out bit
for bit (bytes are moved, not decoded); ``float16`` writes MRC mode 12 after a range check. The
metadata is written last and differs from the input only in where the images now are.
"""

from __future__ import annotations

import os

import xarray as xr

from dparticles.dataset import open_particles
from dparticles.store import StoreResult, to_stacks


def restack(source: str | os.PathLike | xr.Dataset, out: str | os.PathLike | None, *, batch_size: int | None = None,
            float16: bool = False, zarr: str | os.PathLike | None = None, overwrite: bool = False,
            cluster: dict | None = None, project_dir: str | os.PathLike | None = None, log=print,
            **open_options) -> StoreResult:
    """Write the particles of ``source`` into ``out`` (and/or a zarr cache).

    ``source`` is anything :func:`open_particles` reads (opened with ``open_options``) or an
    already opened Dataset, such as a selection made with xarray. ``cluster`` holds
    :func:`dparticles.cluster.cluster_client` keywords. Rerunning an interrupted run with the same
    arguments keeps its complete stacks.
    """
    ds = source if isinstance(source, xr.Dataset) else open_particles(source, **open_options)
    return to_stacks(ds, out, batch_size=batch_size, float16=float16, zarr=zarr, overwrite=overwrite,
                     cluster=cluster, project_dir=project_dir, label="restack", log=log,
                     parameters={"source": source if not isinstance(source, xr.Dataset) else "a Dataset",
                                 **open_options})
