"""``dparticles demo``: make a small particle set, then import, inspect, restack and downsample it
on a local Dask cluster, and say where everything is.

The demo set imitates an extraction job: several stacks (one per micrograph), a RELION 3.1 STAR
file selecting about 70% of the particles (as a 2D classification would), shifts and CTF values.
The particles are elongated blobs, randomly oriented and off-centre by their shifts, in noise.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from dparticles.cluster import cluster_client
from dparticles.dataset import open_particles
from dparticles.jobs.downsample import downsample
from dparticles.jobs.importer import import_particles
from dparticles.jobs.info import describe, format_text
from dparticles.formats.relion import write_star
from dparticles.jobs.restack import restack

PIXEL_SIZE = 1.5  # Å


def make_demo_data(folder: str | Path, *, n_micrographs: int = 8, per_micrograph: int = 60, box: int = 96,
                   seed: int = 0) -> Path:
    """Write demo stacks and ``Select/particles.star`` under ``folder`` (a RELION-like project)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "Extract" / "Movies").mkdir(parents=True, exist_ok=True)
    (folder / "Select").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:box, :box] - box // 2
    rows = []
    for m in range(n_micrographs):
        stack_name = f"Extract/Movies/mic_{m + 1:03d}.mrcs"
        images = np.empty((per_micrograph, box, box), dtype=np.float32)
        for i in range(per_micrograph):
            angle = rng.uniform(0, np.pi)
            shift = rng.normal(0, 2.0, size=2)  # pixels; the particle sits at -origin
            x = (xx + shift[0]) * np.cos(angle) + (yy + shift[1]) * np.sin(angle)
            y = -(xx + shift[0]) * np.sin(angle) + (yy + shift[1]) * np.cos(angle)
            blob = np.exp(-(x / (box / 6)) ** 2 - (y / (box / 14)) ** 2)
            images[i] = -3 * blob + rng.normal(0, 1, size=(box, box))  # dark particle on light background
            defocus = rng.uniform(8000, 25000)
            rows.append({"rlnMicrographName": f"MotionCorr/mic_{m + 1:03d}.mrc",
                         "rlnCoordinateX": float(rng.uniform(200, 3800)), "rlnCoordinateY": float(rng.uniform(200, 3800)),
                         "rlnDefocusU": defocus, "rlnDefocusV": defocus - 200, "rlnDefocusAngle": 30.0,
                         "rlnPhaseShift": 0.0, "rlnAnglePsi": float(np.rad2deg(angle)),
                         "rlnOriginXAngst": float(shift[0] * PIXEL_SIZE), "rlnOriginYAngst": float(shift[1] * PIXEL_SIZE),
                         "rlnClassNumber": int(rng.integers(1, 11)), "rlnOpticsGroup": 1,
                         "rlnImageName": f"{i + 1:06d}@{stack_name}"})
        with mrcfile.new(folder / stack_name, data=images, overwrite=True) as mrc:
            mrc.voxel_size = PIXEL_SIZE
    particles = pd.DataFrame(rows)
    selected = particles[particles["rlnClassNumber"] <= 7].reset_index(drop=True)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [PIXEL_SIZE], "rlnMicrographPixelSize": [PIXEL_SIZE],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    write_star(folder / "Select" / "particles.star", {"optics": optics, "particles": selected})
    return folder / "Select" / "particles.star"


def run_demo(out: str | Path, **cluster) -> None:
    """Make the demo set in ``out`` and run every job on it, on one local (or given) cluster."""
    out = Path(out)
    star = make_demo_data(out / "project")
    print(f"demo particles: {star}")
    with cluster_client(**cluster) as client:
        print(import_particles(star, out / "import", overwrite=True))
        print(format_text(describe(open_particles(out / "import"))))
        print(restack(out / "import", out / "restack", batch_size=100, overwrite=True))
        for result in downsample(out / "restack", out / "downsample", fourier_box=[48], lowpass=8.0, recenter=True,
                                 batch_size=100, overwrite=True):
            print(result)
        print(f"dashboard was at {client.dashboard_link}")
    print(f"\nresults in {out.resolve()}:\n  import/     linked stacks + particles.star/.cs\n"
          "  restack/    consolidated stacks of 100 particles + particles.star/.cs\n"
          "  downsample/ 48-px recentred, 8 Å lowpassed stacks + particles.star/.cs\n"
          "each particles.cs with its result group particles.csg, for CryoSPARC's Import Result Group\n"
          "each with job.json, note.txt and report.html (the run's record as a page that opens offline)\n\n"
          f"next: dparticles info {out / 'downsample'}\n"
          f"      dparticles downsample {out / 'restack'} --out {out / 'small'} --approx-pixel-size 4.5\n"
          "      or open notebooks/quickstart.ipynb for the Python API")
