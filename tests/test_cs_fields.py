"""A particles.cs made from a STAR file holds the fields CryoSPARC's Import Particle Stack writes, with
the values the STAR file gives (or CryoSPARC's own for what it does not), and cryosparc-tools loads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mrcfile.dtypes import HEADER_DTYPE

from helpers import image_names, make_stack, optics_table, write_star

from dparticles.cli import main
from dparticles.dataset import open_particles

cryosparc_dataset = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is in the test extra")
cryosparc_tools = pytest.importorskip("cryosparc.tools", reason="cryosparc-tools is in the test extra")

SET = "relion31_sim_ribo70S_b128"
MIC_SHAPE = (4092, 5760)  # (ny, nx) of a K3 micrograph: not square, so x and y cannot be swapped unseen
CTF_ZEROS = {"ctf/scale_const": (), "ctf/shift_A": (2,), "ctf/tilt_A": (2,), "ctf/trefoil_A": (2,),
             "ctf/tetra_A": (4,), "ctf/anisomag": (4,)}


def _micrograph(path: Path, ny: int, nx: int) -> None:
    """An int8 MRC micrograph header with a sparse data block: a real shape at no disk cost."""
    header = np.zeros((), dtype=HEADER_DTYPE)
    header["nx"], header["ny"], header["nz"], header["mode"] = nx, ny, 1, 0
    header["mx"], header["my"], header["mz"] = nx, ny, 1
    header["map"], header["machst"], header["nversion"] = b"MAP ", [0x44, 0x44, 0, 0], 20140
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.truncate(1024 + nx * ny)


@pytest.fixture
def project(real, tmp_path, monkeypatch) -> Path:
    """The real RELION project with its micrographs (headers only), the current directory as RELION's is."""
    root = tmp_path / "project"
    (root / "Select" / "job010").mkdir(parents=True)
    (root / "Extract").symlink_to(real / SET / "Extract")
    shutil.copy(real / SET / "Select/job010/particles.star", root / "Select/job010/particles.star")
    for name in set(open_particles(root / "Select/job010/particles.star", ignore_raw=True)["micrograph"].values):
        _micrograph(root / name, *MIC_SHAPE)
    monkeypatch.chdir(root)
    return root


def _fields(path: Path):
    data = cryosparc_dataset.Dataset.load(path)
    assert len(data) > 0
    return data


def test_import_of_a_star_writes_cryosparcs_import_fields(project, capsys):
    assert main(["import", "Select/job010/particles.star", "--out", "Import/job011"]) == 0
    assert "note:" not in capsys.readouterr().out
    cs = _fields(project / "Import/job011/particles.cs")
    src = open_particles("Select/job010/particles.star")
    n = src.sizes["particle"]
    assert len(cs) == n == 284

    stacks = [str(Path(p).resolve()) for p in src["stack_path"].values]
    expected = np.array(cryosparc_tools.get_import_signatures(stacks), dtype=np.uint64)[src["stack_id"].values]
    assert cs["blob/import_sig"].dtype == np.uint64
    np.testing.assert_array_equal(cs["blob/import_sig"], expected)
    assert len(set(cs["blob/import_sig"].tolist())) == 20  # one per source stack

    assert cs["ctf/type"].tolist() == ["imported"] * n
    for field, value in {"ctf/scale": "star:rlnCtfScalefactor", "ctf/bfactor": "star:rlnCtfBfactor"}.items():
        assert cs[field].dtype == np.float32
        np.testing.assert_array_equal(cs[field], src[value].values.astype(np.float32))
    for field, shape in CTF_ZEROS.items():
        assert cs[field].dtype == np.float32 and cs[field].shape == (n, *shape) and not cs[field].any(), field

    micrographs = src["micrograph"].values.astype(str)
    assert cs["location/micrograph_path"].tolist() == micrographs.tolist()
    names = sorted(set(micrographs))
    uid_of = dict(zip(names, cryosparc_tools.get_import_signatures(names)))
    np.testing.assert_array_equal(cs["location/micrograph_uid"], [uid_of[m] for m in micrographs])
    assert cs["location/exp_group_id"].dtype == np.uint32 and not cs["location/exp_group_id"].any()
    assert cs["location/micrograph_shape"].dtype == np.uint32
    assert (cs["location/micrograph_shape"] == MIC_SHAPE).all()
    ny, nx = MIC_SHAPE
    np.testing.assert_array_equal(cs["location/center_x_frac"], (src["coord_x"].values / nx).astype(np.float32))
    np.testing.assert_array_equal(cs["location/center_y_frac"], (src["coord_y"].values / ny).astype(np.float32))
    # no RELION label holds these: not invented
    assert "location/min_dist_A" not in cs and "location/micrograph_psize_A" not in cs

    back = open_particles(project / "Import/job011/particles.cs")  # coordinates survive the round trip
    np.testing.assert_allclose(back["coord_x"].values, src["coord_x"].values, rtol=1e-6)
    np.testing.assert_allclose(back["coord_y"].values, src["coord_y"].values, rtol=1e-6)
    record = json.loads((project / "Import/job011/job.json").read_text())
    assert {"blob/import_sig", "ctf/anisomag", "location/micrograph_shape"} <= set(record["cs_fields_added"])
    assert record["notes"] == []


def test_cs_fields_survive_a_restack_bit_for_bit(project):
    assert main(["import", "Select/job010/particles.star", "--out", "Import/job011"]) == 0
    assert main(["restack", "Import/job011/particles.cs", "--out", "Restack/job012", "--n-workers", "1",
                 "--batch-size", "100"]) == 0
    before = np.load(project / "Import/job011/particles.cs")
    after = np.load(project / "Restack/job012/particles.cs")
    changed = {"blob/path", "blob/idx"}  # the images moved: nothing else may change
    assert set(after.dtype.names) == set(before.dtype.names)
    for field in before.dtype.names:
        if field not in changed:
            assert before[field].tobytes() == after[field].tobytes(), field


def test_unreadable_micrographs_leave_no_location_shape_and_say_so(real, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["import", str(real / SET / "Select/job010/particles.star"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "20 of 20 micrographs could not be read" in said and "location/micrograph_shape" in said
    cs = _fields(out / "particles.cs")
    assert {"location/micrograph_path", "location/micrograph_uid", "blob/import_sig"} <= set(cs.fields())
    assert not {"location/micrograph_shape", "location/center_x_frac", "location/center_y_frac"} & set(cs.fields())
    assert "20 of 20 micrographs" in json.loads((out / "job.json").read_text())["notes"][0]
    assert "20 of 20 micrographs" in (out / "report.html").read_text()


def test_scale_and_bfactor_come_from_the_star(real, tmp_path):
    src = real / "cryojax/test_starfile.star"  # rlnCtfScalefactor 2, rlnCtfBfactor 1, no micrograph names
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    cs = _fields(tmp_path / "out" / "particles.cs")
    assert cs["ctf/scale"].tolist() == [2.0] * 3 and cs["ctf/bfactor"].tolist() == [1.0] * 3
    assert not any(f.startswith("location/") for f in cs.fields())


def test_a_bfactor_that_is_not_a_number_is_one_line(tmp_path, capsys):
    make_stack(tmp_path / "s.mrcs", 3)
    star = write_star(tmp_path / "particles.star", {"rlnImageName": image_names(range(3), "s.mrcs"),
                                                    "rlnDefocusU": [1e4] * 3, "rlnDefocusV": [1e4] * 3,
                                                    "rlnCtfBfactor": ["0", "high", "0"]}, optics_table([1.5], 16))
    assert main(["import", str(star), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "particle 2: rlnCtfBfactor is 'high'; expected a number" in err and not (tmp_path / "out").exists()


def test_the_same_particles_get_the_fields_cryosparcs_import_gave_them(real, tmp_path):
    folder = real / "cryodrgn/empiar_10076_7"  # the same 7 particles as a 3.0 STAR file and as CryoSPARC imported it
    assert main(["import", str(folder / "empiar_10076_7.star"), "--out", str(tmp_path / "out")]) == 0
    ours, theirs = np.load(tmp_path / "out" / "particles.cs"), np.load(folder / "empiar_10076_7.cs")
    for field in theirs.dtype.names:
        assert field in ours.dtype.names, field
        assert ours.dtype[field].kind == theirs.dtype[field].kind and ours[field].shape == theirs[field].shape, field
    # the values the STAR file holds, and the defaults CryoSPARC wrote for what it does not
    for field in ("blob/idx", "blob/shape", "blob/psize_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast",
                  "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/phase_shift_rad", "ctf/type", *CTF_ZEROS,
                  "ctf/scale", "ctf/bfactor"):
        np.testing.assert_array_equal(ours[field], theirs[field], err_msg=field)


def test_import_of_a_cs_adds_nothing(real, tmp_path):
    src = real / "cryodrgn/empiar_10076_7/empiar_10076_7.cs"  # written by CryoSPARC's own import
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    before, after = np.load(src), np.load(tmp_path / "out" / "particles.cs")
    assert set(after.dtype.names) == set(before.dtype.names)
    for field in set(before.dtype.names) - {"blob/path"}:
        if before[field].dtype.kind == "S":  # text is rewritten at the width its longest value needs
            assert before[field].tolist() == after[field].tolist(), field
        else:
            assert before[field].tobytes() == after[field].tobytes(), field
