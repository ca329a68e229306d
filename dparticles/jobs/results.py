"""The last step of the jobs that write batches: the metadata, then the zarr cache if asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from dparticles.dataset import open_particles
from dparticles.output import write_metadata
from dparticles.sinks import write_zarr
from dparticles.writer import Batch


def write_results(out_dir: Path, ds: xr.Dataset, batches: list[Batch], names: list[str], *, zarr: Path | None,
                  overwrite: bool, cluster: dict, batch_size: int, log, updates: dict | None = None) -> list[str]:
    """Write ``particles.star`` (and ``particles.cs`` for a CryoSPARC input) naming each particle's new
    place, batch ``k`` being ``names[k]``; then the zarr cache from that metadata. Returns notes."""
    paths = np.repeat(np.array(names, dtype=object), [b.n for b in batches])
    indices = np.concatenate([np.arange(b.n) for b in batches])
    cs = ds.attrs.get("format") == "cryosparc"
    write_metadata(out_dir, ds, paths, indices, cs=cs, updates=updates)
    if zarr is None:
        return []
    written = out_dir / ("particles.cs" if cs else "particles.star")  # .cs fields have no STAR labels
    return [write_zarr(open_particles(written), Path(zarr), overwrite=overwrite, cluster=cluster,
                       batch_size=batch_size, log=log)]
