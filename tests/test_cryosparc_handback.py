"""CryoSPARC metadata through every job and back: import -> restack -> downsample of a ``.cs`` keeps
``particles.cs`` at each step, uids kept and every field the job does not change bit for bit in its
own dtype (fixed-width text of its width, the alignments' own pixel size and shifts); a result group
``particles.csg`` lies beside each ``particles.cs`` and names it, as CryoSPARC's exports do, and
cryosparc-tools loads what it names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import simple_set

import dparticles
from dparticles.cli import main

N, BOX, PSIZE = 12, 16, 1.5


def cs_set(folder: Path) -> Path:
    """A CryoSPARC particle dataset over the stacks of ``simple_set``: 3D alignments at twice the
    particles' pixel size, CTF, locations, a 7-byte ``ctf/type`` and a field nobody interprets."""
    simple_set(folder, n_stacks=2, per_stack=6, box=BOX)
    rng = np.random.default_rng(7)
    dtype = [("uid", "<u8"), ("blob/path", "S16"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/type", "S7"), ("ctf/exp_group_id", "<u4"),
             ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
             ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
             ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
             ("alignments3D/class", "<u4"), ("location/micrograph_path", "S24"), ("location/micrograph_shape", "<u4", (2,)),
             ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"),
             ("location/micrograph_psize_A", "<f4"), ("pick_stats/ncc_score", "<f4")]
    data = np.zeros(N, dtype=dtype)
    data["uid"] = rng.integers(1, 2**63, N, dtype=np.uint64)
    data["blob/path"] = [f"Extract/s{k // 6}.mrcs".encode() for k in range(N)]
    data["blob/idx"] = np.arange(N) % 6
    data["blob/shape"] = BOX
    data["blob/psize_A"], data["blob/sign"] = PSIZE, 1
    data["ctf/type"] = b"spline"
    data["ctf/accel_kv"], data["ctf/cs_mm"], data["ctf/amp_contrast"] = 300, 2.7, 0.1
    data["ctf/df1_A"], data["ctf/df2_A"] = rng.uniform(1e4, 2e4, N), rng.uniform(1e4, 2e4, N)
    data["ctf/df_angle_rad"] = rng.uniform(-3, 3, N)
    data["alignments3D/shift"] = rng.uniform(-2, 2, (N, 2))
    data["alignments3D/psize_A"] = 2 * PSIZE
    data["alignments3D/pose"] = rng.uniform(-1, 1, (N, 3))
    data["alignments3D/class"] = np.arange(N) % 3
    data["location/micrograph_path"] = [f"mic_{k // 6:03d}.mrc".encode() for k in range(N)]
    data["location/micrograph_shape"] = (4096, 4096)
    data["location/center_x_frac"], data["location/center_y_frac"] = rng.uniform(0.1, 0.9, (2, N))
    data["location/micrograph_psize_A"] = 0.75
    data["pick_stats/ncc_score"] = rng.uniform(0, 1, N)
    path = folder / "J42_particles.cs"
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)
    return path


def load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def differing(a: np.ndarray, b: np.ndarray) -> list[str]:
    """Fields of ``a`` that ``b`` lacks, holds in another dtype, or holds with other bytes."""
    return [f for f in a.dtype.names if f not in b.dtype.names or b.dtype.fields[f][0] != a.dtype.fields[f][0]
            or b[f].tobytes() != a[f].tobytes()]


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """import -> restack -> downsample of a .cs, run from the project directory as the README shows."""
    monkeypatch.chdir(tmp_path)
    source = cs_set(tmp_path)
    for args in (["import", str(source), "--out", "Import/job030"],
                 ["restack", "Import/job030", "--out", "Restack/job031", "--batch-size", "5"],
                 ["downsample", "Restack/job031", "--out", "Downsample/job032", "--fourier-box", "8"],
                 ["downsample", "Restack/job031", "--out", "Downsample/job033", "--recenter"]):
        assert main(["-q", *args]) == 0
    return tmp_path, load(source)


def test_every_job_carries_the_cs_with_every_field_it_does_not_change(pipeline):
    root, source = pipeline
    imported, restacked, small, centred = (load(root / job / "particles.cs") for job in
                                           ("Import/job030", "Restack/job031", "Downsample/job032",
                                            "Downsample/job033"))
    for data in (imported, restacked, small, centred):
        assert data.dtype.names == source.dtype.names  # no field lost or added, in their order
        assert data.dtype.fields["ctf/type"][0] == np.dtype("S7")
    assert differing(source, imported) == ["blob/path"]  # the import links the stacks, nothing else
    assert differing(source, restacked) == ["blob/path", "blob/idx"]
    assert differing(source, small) == ["blob/path", "blob/idx", "blob/shape", "blob/psize_A"]
    assert (small["blob/shape"] == 8).all() and np.allclose(small["blob/psize_A"], PSIZE * BOX / 8)
    # recentring changes the shifts (now zero, still in pixels of the alignments' own 3.0 Å) and the
    # picking coordinates; the alignments' pixel size stays theirs
    assert differing(source, centred) == ["blob/path", "blob/idx", "alignments3D/shift", "location/center_x_frac",
                                          "location/center_y_frac"]
    assert (centred["alignments3D/shift"] == 0).all()
    assert centred["alignments3D/psize_A"].tobytes() == source["alignments3D/psize_A"].tobytes()
    moved = (centred["location/center_x_frac"] - source["location/center_x_frac"]) * 4096 * 0.75
    np.testing.assert_allclose(moved, -source["alignments3D/shift"][:, 0] * 2 * PSIZE, atol=1e-3)  # Å
    # an output folder whose particles came in as CryoSPARC metadata is opened from its particles.cs
    reopened = dparticles.open_particles(root / "Restack/job031")
    assert reopened.attrs["cs_source"] == str((root / "Restack/job031/particles.cs").resolve())
    assert reopened["cs_row"].values.tolist() == list(range(N))


def test_each_particles_cs_has_a_result_group_that_cryosparc_tools_reads(pipeline):
    root, source = pipeline
    dataset = pytest.importorskip("cryosparc.dataset")
    for job in ("Import/job030", "Restack/job031", "Downsample/job032", "Downsample/job033"):
        group = yaml.safe_load((root / job / "particles.csg").read_text())
        assert group["group"]["type"] == "particle" and group["group"]["name"] == "particles"
        slots = {name.split("/")[0] for name in source.dtype.names if "/" in name}
        assert set(group["results"]) == slots
        for slot, result in group["results"].items():
            assert result == {"metafile": ">particles.cs", "num_items": N, "type": f"particle.{slot}"}
        loaded = dataset.Dataset.load(root / job / "particles.cs")
        assert len(loaded) == N and loaded["uid"].tolist() == source["uid"].tolist()


def test_a_star_pipeline_keeps_the_cs_the_import_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star, _ = simple_set(tmp_path / "p")
    assert main(["-q", "import", str(star), "--out", "Import/job010"]) == 0
    assert main(["-q", "restack", "Import/job010", "--out", "Restack/job011", "--batch-size", "5"]) == 0
    imported, restacked = load(tmp_path / "Import/job010/particles.cs"), load(tmp_path / "Restack/job011/particles.cs")
    assert restacked["uid"].tolist() == imported["uid"].tolist()
    assert differing(imported, restacked) == ["blob/path", "blob/idx"]
    assert (tmp_path / "Restack/job011/particles.csg").is_file()
    # a STAR file alone gives a STAR file alone
    assert main(["-q", "restack", str(star), "--out", "Restack/job012"]) == 0
    assert sorted(p.name for p in (tmp_path / "Restack/job012").glob("particles.*")) == ["particles.star"]


def test_the_cs_a_job_keeps_rows_of_is_an_input_no_output_may_replace(tmp_path, monkeypatch):
    """A zarr cache of CryoSPARC particles writes its particles.cs from the .cs it came from: that file
    is an input, and --overwrite of the folder holding it is refused before anything is removed."""
    monkeypatch.chdir(tmp_path)
    source = cs_set(tmp_path)
    assert main(["-q", "import", str(source), "--out", "Import/job030"]) == 0
    assert main(["-q", "restack", "Import/job030", "--zarr", "c.zarr"]) == 0
    before = (tmp_path / "Import/job030/particles.cs").read_bytes()
    assert main(["restack", "c.zarr", "--out", "Import/job030", "--overwrite"]) == 1
    assert (tmp_path / "Import/job030/particles.cs").read_bytes() == before
    assert main(["-q", "restack", "c.zarr", "--out", "Restack/job031"]) == 0
    assert differing(load(source), load(tmp_path / "Restack/job031/particles.cs")) == ["blob/path", "blob/idx"]
