"""Test helpers: generated MRC stacks and STAR files written independently of dparticles' writers,
and direct reads of stacks with mrcfile for comparison."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile



OPTICS_ROW = "1 opticsGroup1 300.0 2.7 0.1 1.5 16 2"
OPTICS_STAR = f"""
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
{OPTICS_ROW}

"""  # the text of one RELION 3.1 optics group of 16-pixel images, for STAR files written by hand

def find_real_data() -> Path:
    """The folder of real test inputs: $DPARTICLES_TEST_DATA, else ``shared/data/real`` beside the
    repository (as the project's machines and CI lay it out), else the first candidate (missing)."""
    candidates = [Path(os.environ["DPARTICLES_TEST_DATA"])] if os.environ.get("DPARTICLES_TEST_DATA") else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data" / "real", Path("/work/shared/data/real")]
    return next((c for c in candidates if (c / "README.md").is_file()), candidates[0])


REAL = find_real_data()

def make_stack(path: str | Path, n: int, box: int | tuple[int, int] = 16, dtype=np.float32,
               seed: int = 0) -> np.ndarray:
    """Write an MRC image stack of ``n`` random images (``box`` or (ny, nx)) with mrcfile; return the data."""
    ny, nx = (box, box) if np.isscalar(box) else box
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((n, ny, nx)) * 100).astype(dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 1.0
    return data


def read_direct(path: str | Path) -> np.ndarray:
    """All images of a stack as (n, y, x), read with mrcfile alone (permissively)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            data = np.array(mrc.data)
    return data.reshape(-1, data.shape[-2], data.shape[-1])


def star_images(star: Path, root: Path | None = None) -> np.ndarray:
    """The images a STAR file names, in its order, read with mrcfile alone (paths under ``root``,
    default the STAR file's folder)."""
    root = root or star.parent
    names = starfile.read(star, always_dict=True)["particles"]["rlnImageName"].astype(str)
    stacks: dict[str, np.ndarray] = {}
    out = []
    for name in names:
        idx, path = name.split("@", 1)
        if path not in stacks:
            stacks[path] = read_direct(root / path)
        out.append(stacks[path][int(idx) - 1])
    return np.stack(out)


def _loop(name: str, df: pd.DataFrame, sep: str = " ") -> str:
    lines = [f"data_{name}", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(df.columns, start=1)]
    for row in df.itertuples(index=False):
        lines.append(sep.join(_cell(v) for v in row))
    return "\n".join(lines) + "\n\n"


def _cell(v) -> str:
    if isinstance(v, str) and (v == "" or re.search(r"\s", v)):
        return f'"{v}"'
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_star(path: str | Path, particles: pd.DataFrame | dict, optics: pd.DataFrame | dict | None = None,
               *, optics_first: bool = True, particle_block: str = "particles", sep: str = " ") -> Path:
    """Write a STAR file: RELION 3.1 style (``optics`` given: data_optics + data_particles) or 3.0
    (a single table, named ``particle_block``; ``""`` gives an unnamed ``data_``)."""
    particles = pd.DataFrame(particles)
    text = "\n# version 30001\n\n"
    blocks = []
    if optics is not None:
        blocks.append(_loop("optics", pd.DataFrame(optics), sep))
    blocks.append(_loop(particle_block, particles, sep))
    if not optics_first:
        blocks.reverse()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "".join(blocks))
    return path


def image_names(indices, stack: str) -> list[str]:
    """RELION image names (1-based) from 0-based indices into one stack."""
    return [f"{i + 1:06d}@{stack}" for i in indices]


def optics_table(pixel_sizes: list[float], box: int, voltage: float = 300.0) -> pd.DataFrame:
    """A data_optics table with one group per pixel size."""
    k = len(pixel_sizes)
    return pd.DataFrame({"rlnOpticsGroup": np.arange(1, k + 1), "rlnOpticsGroupName": [f"opticsGroup{g}" for g in
                                                                                      range(1, k + 1)],
                         "rlnVoltage": [voltage] * k, "rlnSphericalAberration": [2.7] * k,
                         "rlnAmplitudeContrast": [0.1] * k, "rlnImagePixelSize": [float(p) for p in pixel_sizes],
                         "rlnImageSize": [box] * k, "rlnImageDimensionality": [2] * k})


def simple_set(folder: Path, *, n_stacks: int = 2, per_stack: int = 6, box: int = 16, pixel_sizes=(1.5,),
               micrographs: bool = True, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A 3.1 particle set in ``folder``: stacks ``Extract/s{k}.mrcs``, ``particles.star`` naming
    every image in order, optics groups cycling over ``pixel_sizes``. Returns (star path, images)."""
    images, names, mics = [], [], []
    for k in range(n_stacks):
        images.append(make_stack(folder / "Extract" / f"s{k}.mrcs", per_stack, box, seed=seed + k))
        names += image_names(range(per_stack), f"Extract/s{k}.mrcs")
        mics += [f"MotionCorr/job002/Movies/mic_{k:03d}_fractions.mrc"] * per_stack
    n = len(names)
    rng = np.random.default_rng(seed)
    groups = np.arange(n) % len(pixel_sizes) + 1
    p = {"rlnImageName": names, "rlnDefocusU": rng.uniform(1e4, 2e4, n).round(2),
         "rlnDefocusV": rng.uniform(1e4, 2e4, n).round(2), "rlnDefocusAngle": rng.uniform(0, 180, n).round(2),
         "rlnAngleRot": rng.uniform(-180, 180, n).round(3), "rlnAngleTilt": rng.uniform(0, 180, n).round(3),
         "rlnAnglePsi": rng.uniform(-180, 180, n).round(3), "rlnOriginXAngst": rng.uniform(-5, 5, n).round(3),
         "rlnOriginYAngst": rng.uniform(-5, 5, n).round(3), "rlnOpticsGroup": groups,
         "rlnCtfBfactor": np.zeros(n), "rlnRandomSubset": np.arange(n) % 2 + 1}
    if micrographs:
        p = {"rlnMicrographName": mics, "rlnCoordinateX": rng.uniform(0, 4000, n).round(1),
             "rlnCoordinateY": rng.uniform(0, 4000, n).round(1)} | p
    star = write_star(folder / "particles.star", p, optics_table(list(pixel_sizes), box))
    return star, np.concatenate(images)
