"""Wiring shared by the jobs that write batches: plan the batches of a dataset, name their files,
and run one task per batch on the cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from dask.base import tokenize

from dparticles.cluster import RunSummary, cluster_client, run_tasks
from dparticles.errors import ParticleError
from dparticles.io.mrc import StackInfo
from dparticles.output import remove_temporaries
from dparticles.planning import chunk_bounds, plan_runs
from dparticles.io.zarr_cache import ZarrSource
from dparticles.stack import stack_infos
from dparticles.writer import Batch, write_batch


@dataclass
class JobResult:
    """What a job wrote and what it cost."""

    out: Path | None
    n_particles: int
    n_batches: int
    kept_batches: int
    summary: RunSummary | None
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"wrote {self.n_particles} particles in {self.n_batches} stacks to {self.out}"
                 + (f" ({self.kept_batches} complete stacks kept from an earlier run)" if self.kept_batches else "")
                 ] if self.out is not None else []
        return "\n".join(lines + self.notes)


def source_runs(ds: xr.Dataset, batch_size: int) -> list[tuple[int, tuple[tuple[StackInfo, int, int], ...]]]:
    """For each batch of ``batch_size`` particles in metadata order: its first row and source runs."""
    if "images" not in ds:
        raise ParticleError("these particles have no images (opened with ignore_raw)", path=ds.attrs.get("source"))
    if batch_size < 1:
        raise ParticleError(f"batch size must be at least 1, got {batch_size}")
    bounds = chunk_bounds(ds.sizes["particle"], batch_size)
    if "zarr" in ds.attrs:  # a zarr cache: each batch reads one slice of the cache
        src = ZarrSource(ds.attrs["zarr"], ds.sizes["y"], ds.sizes["x"], np.dtype(ds["images"].dtype).str)
        return [(int(a), ((src, int(a), int(b)),)) for a, b in zip(bounds[:-1], bounds[1:])]
    infos = stack_infos(ds)
    plan = plan_runs(ds["stack_id"].values, ds["image_index"].values, bounds)
    return [(int(first), tuple((infos[s], a, b) for s, a, b in runs)) for first, runs in zip(bounds[:-1], plan)]


def batch_names(n_batches: int) -> list[str]:
    """Output stack names, relative to the output folder."""
    return [f"stacks/batch_{k:06d}.mrcs" for k in range(n_batches)]


def source_token(ds: xr.Dataset) -> str:
    """Identifies the input: metadata, particle order, and each stack's size and modification time."""
    if "zarr" in ds.attrs:
        files, order = [ds.attrs["zarr"] + "/images/zarr.json"], ds.sizes["particle"]
    else:
        files, order = ds["stack_path"].values.astype(str), (ds["stack_id"].values, ds["image_index"].values)
    stamps = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    return tokenize(ds.attrs.get("source"), stamps, order)


def run_batches(batches: list[Batch], *, label: str, cluster: dict, log=print) -> tuple[dict, RunSummary]:
    """Run every batch as one task (on the given or an embedded cluster) and total their reports."""
    for b in batches:
        for o in b.outputs:
            Path(o.path).parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(b.n * b.runs[0][0].image_bytes for b in batches)  # bytes read
    with cluster_client(**cluster, log=log) as client:
        results, summary = run_tasks(client, write_batch, [(b,) for b in batches], label=label, log=log,
                                     nbytes=nbytes)
    # a worker killed mid-batch leaves its temporary file; the scheduler wrote that batch again elsewhere
    for folder in {Path(o.path).parent for b in batches for o in b.outputs}:
        remove_temporaries(folder)
    total = {"n": sum(r["n"] for r in results), "kept": sum(r["kept"] for r in results),
             "bytes": sum(r["bytes"] for r in results), "f16_max": max((r["f16_max"] for r in results), default=0.0),
             "f16_sq": sum(r["f16_sq"] for r in results)}
    return total, summary


def float16_report(total: dict, n_values: int) -> str:
    """The float16 rounding error against float32, as written in the run summary."""
    rms = float(np.sqrt(total["f16_sq"] / n_values)) if n_values else 0.0
    return f"float16 rounding error against float32: largest {total['f16_max']:.3g}, RMS {rms:.3g}"
