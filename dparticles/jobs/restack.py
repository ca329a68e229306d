"""Restack Particles: the particles in use, in metadata order, into new stacks of N particles.

Float32 pixels come out bit for bit (bytes are moved, not decoded); ``float16`` writes MRC mode 12
after a range check. The metadata is written last and differs from the input only in where the
images now are.
"""

from __future__ import annotations

import os
from pathlib import Path

from dask.base import tokenize

from dparticles import config
from dparticles.batching import JobResult, batch_names, float16_report, run_batches, source_runs, source_token
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.jobs.results import write_results
from dparticles.output import prepare_output
from dparticles.sinks import check_zarr_target, write_zarr
from dparticles.writer import Batch, Output


def restack(source: str | os.PathLike, out: str | os.PathLike | None, *, batch_size: int | None = None,
            float16: bool = False, zarr: str | os.PathLike | None = None, overwrite: bool = False,
            cluster: dict | None = None, log=print, **open_options) -> JobResult:
    """Write the particles of ``source`` (anything :func:`open_particles` reads) into ``out``.

    ``cluster`` holds :func:`dparticles.cluster.cluster_client` keywords (scheduler, sizes).
    Rerunning an interrupted run with the same arguments keeps its complete stacks.
    """
    ds = open_particles(source, **open_options)
    batch_size = int(config.get("batch-size", batch_size))
    if out is None:  # a zarr cache alone
        if zarr is None:
            raise ParticleError("give an output folder, a zarr cache, or both")
        note = write_zarr(ds, Path(zarr), overwrite=overwrite, cluster=cluster or {}, batch_size=batch_size, log=log)
        return JobResult(None, ds.sizes["particle"], 0, 0, None, [note])
    if zarr is not None:  # before any work: the cache must not replace an input or an unasked-for cache
        check_zarr_target(Path(zarr), ds, overwrite=overwrite)
    dtype = "<f2" if float16 else None
    runs = source_runs(ds, batch_size)
    if dtype is None:
        modes = {info.dtype for _, r in runs for info, _, _ in r}
        dtype = modes.pop() if len(modes) == 1 else "<f4"
        dtype = "<" + dtype[1:] if dtype[0] in ">=" else dtype
    token = tokenize("restack", source_token(ds), batch_size, dtype)
    out_dir = prepare_output(Path(out), ds, overwrite=overwrite, job="restack", token=token)
    names = batch_names(len(runs))
    pixel = ds["pixel_size"].values
    batches = [Batch(runs=r, first=first, outputs=(Output(str(out_dir / name), int(ds.sizes["x"]), dtype,
                                                          float(pixel[first])),))
               for (first, r), name in zip(runs, names)]
    total, summary = run_batches(batches, label="restack", cluster=cluster or {}, log=log)
    n = ds.sizes["particle"]
    notes = [float16_report(total, n * ds.sizes["x"] * ds.sizes["y"])] if float16 else []
    notes += write_results(out_dir, ds, batches, names, zarr=zarr, overwrite=overwrite, cluster=cluster or {},
                           batch_size=batch_size, log=log)
    return JobResult(out_dir, n, len(batches), total["kept"], summary, notes)
