"""The xarray backend: ``xr.open_dataset("particles.star", engine="dparticles")`` opens what
:func:`dparticles.open_particles` opens (every engine of :mod:`dparticles.formats`: RELION ``.star``,
CryoSPARC ``.cs``, bare stacks, output folders, zarr caches), images lazy, metadata as coordinates,
the way xarray users open any format."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import xarray as xr
from xarray.backends import BackendEntrypoint


class DparticlesBackend(BackendEntrypoint):
    """``engine="dparticles"``; keyword arguments are those of :func:`dparticles.open_particles`."""

    description = "Cryo-EM particle stacks: RELION .star, CryoSPARC .cs, bare .mrcs stacks and dparticles outputs, read lazily"
    url = "https://pypi.org/project/dparticles/"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "data_dir", "pixel_size", "voltage", "cs",
                               "amp_contrast", "dose", "sign", "ignore_raw", "ignore_pose", "particle_chunks")

    def open_dataset(self, filename_or_obj, *, drop_variables: str | Iterable[str] | None = None,
                     particle_chunks: int | None = None, **options) -> xr.Dataset:
        from dparticles.dataset import open_particles

        ds = open_particles(os.fspath(filename_or_obj), chunks=particle_chunks, **options)
        if drop_variables is not None:
            ds = ds.drop_vars([drop_variables] if isinstance(drop_variables, str) else list(drop_variables))
        return ds

    def guess_can_open(self, filename_or_obj) -> bool:
        from dparticles import formats
        from dparticles.errors import ParticleError

        try:
            return formats.engine_for(formats.resolve(Path(os.fspath(filename_or_obj)))) is not None
        except (TypeError, ParticleError):
            return False
