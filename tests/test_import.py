"""The import job: stacks linked, never copied; particles.star and particles.cs that re-open to the
same images and metadata; overrides, sign, metadata only, poses dropped, exposures, safe outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_stack, simple_set, write_star

from dparticles.cli import main
from dparticles.dataset import open_particles, table
from dparticles.errors import ParticleError
from dparticles.jobs.importer import exposure_key, import_particles

SELECT = "relion31_sim_ribo70S_b128/Select/job010/particles.star"
META = ["micrograph", "coord_x", "coord_y", "defocus_u", "defocus_v", "defocus_angle", "phase_shift", "voltage",
        "cs", "amp_contrast", "pixel_size", "box", "optics_group", "shift_x", "shift_y", "class_number", "sign",
        "image_index"]


def _disk_bytes(folder: Path) -> int:
    """Bytes the folder really occupies (symlinks counted as links, not targets)."""
    return sum(os.lstat(p).st_size for p in folder.rglob("*"))


def _same(a, b, columns) -> None:
    ta, tb = table(a), table(b)
    for c in columns:
        x, y = ta[c].to_numpy(), tb[c].to_numpy()
        if x.dtype.kind in "fiu":
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-6, atol=1e-4, err_msg=c)
        else:
            assert x.astype(str).tolist() == y.astype(str).tolist(), c


def test_import_links_and_reopens(real, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", str(real / SELECT), "--out", str(out)]) == 0
    assert "imported 284 particles from 20 stacks" in capsys.readouterr().out
    links = sorted((out / "stacks").iterdir())
    assert len(links) == 20
    for link in links:
        assert link.is_symlink()
        assert link.resolve() == (real / "relion31_sim_ribo70S_b128/Extract/job007/Movies" / link.name).resolve()
    assert _disk_bytes(out) < 1_000_000  # the stacks are 26 MB: nothing was copied
    src = open_particles(real / SELECT)
    star = open_particles(out / "particles.star")
    cs = open_particles(out / "particles.cs")
    folder = open_particles(out)
    for ds in (star, cs, folder):
        np.testing.assert_array_equal(ds["images"].values, src["images"].values)
        # a .cs holds picking coordinates only as fractions of a micrograph shape, which a STAR file lacks
        _same(src, ds, [c for c in META if ds is not cs or not c.startswith("coord")])
        assert all(Path(p).parent == out / "stacks" for p in ds["image_path"].values)
    assert star["image_name"].values[0].startswith(f"{out}/stacks/")  # absolute: out lies outside the project
    assert "star:rlnCtfBfactor" in star.coords and "star_optics:rlnMicrographOriginalPixelSize" in star.coords
    text = (out / "particles.star").read_text()
    assert "data_optics" in text and "_rlnOriginXAngst" in text and "_rlnImagePixelSize" in text


def test_import_cs_source(real, tmp_path):
    src = real / "cryodrgn/empiar_10076_7/empiar_10076_7.cs"
    result = import_particles(src, tmp_path / "out")
    assert result.n_particles == 7 and result.n_stacks == 1
    a, b = open_particles(src), open_particles(tmp_path / "out" / "particles.cs")
    np.testing.assert_array_equal(a["images"].values, b["images"].values)
    _same(a, b, ["uid", "defocus_u", "defocus_v", "voltage", "pixel_size", "sign", "cs:ctf.type"])
    assert (open_particles(tmp_path / "out" / "particles.star")["sign"].values == -1).all()


def test_import_overrides(particle_set, tmp_path):
    star, _ = particle_set
    out = tmp_path / "out"
    assert main(["import", str(star), "--out", str(out), "--pixel-size", "1.75", "--voltage", "200", "--cs", "0.01",
                 "--amp-contrast", "0.07", "--dose", "45.5"]) == 0
    for ds in (open_particles(out / "particles.star"), open_particles(out / "particles.cs")):
        for name, value in {"pixel_size": 1.75, "voltage": 200, "cs": 0.01, "amp_contrast": 0.07, "dose": 45.5}.items():
            np.testing.assert_allclose(ds[name].values, value, rtol=1e-6, err_msg=name)


def test_import_sign(particle_set, tmp_path):
    star, images = particle_set
    out = tmp_path / "out"
    assert main(["import", str(star), "--out", str(out), "--sign", "-1"]) == 0
    for path in (out, out / "particles.star", out / "particles.cs"):
        ds = open_particles(path, apply_sign=True)
        assert (ds["sign"].values == -1).all()
        np.testing.assert_array_equal(ds["images"].values, -images)
        np.testing.assert_array_equal(open_particles(path)["images"].values, images)


def test_import_ignore_raw(real, tmp_path):
    src = real / "cryodrgn/cryosparc/cryosparc_J2_particles_exported.cs"  # its stacks are not shipped
    out = tmp_path / "out"
    assert main(["import", str(src), "--out", str(out), "--ignore-raw"]) == 0
    assert not (out / "stacks").exists() or not any((out / "stacks").iterdir())
    for name in ("particles.star", "particles.cs"):
        ds = open_particles(out / name, ignore_raw=True)
        assert ds.sizes["particle"] == 22 and "images" not in ds
    _same(open_particles(src, ignore_raw=True), open_particles(out / "particles.cs", ignore_raw=True),
          ["defocus_u", "defocus_v", "voltage", "pixel_size", "angle_psi", "shift_x", "shift_y", "class_number",
           "cs:alignments2D.error", "cs:ctf.type"])


def test_import_ignore_pose(particle_set, tmp_path):
    star, _ = particle_set
    out = tmp_path / "out"
    assert main(["import", str(star), "--out", str(out), "--ignore-pose"]) == 0
    text = (out / "particles.star").read_text()
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert label not in text
    assert "rlnDefocusU" in text
    cs = np.load(out / "particles.cs")
    assert not any(f.startswith("alignments") for f in cs.dtype.names)
    ds = open_particles(out)
    assert not {"angle_rot", "shift_x"} & set(ds.coords)


def _micrographs_star(path: Path, names: list[str]) -> Path:
    return write_star(path, {"rlnMicrographName": names, "rlnOpticsGroup": [1] * len(names)},
                      {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                       "rlnMicrographPixelSize": [0.7]}, particle_block="micrographs")


def test_import_exposures_star(tmp_path, capsys):
    star, _ = simple_set(tmp_path / "p", n_stacks=3)
    mics = _micrographs_star(tmp_path / "mics.star", [f"MotionCorr/job002/Movies/mic_{k:03d}_fractions.mrc"
                                                      for k in range(3)])
    out = tmp_path / "out"
    assert main(["import", str(star), "--out", str(out), "--exposures", str(mics)]) == 0
    assert "18 particles linked to exposures, 0 unmatched" in capsys.readouterr().out
    ds = open_particles(out / "particles.cs")
    assert ds["micrograph"].values[0] == "MotionCorr/job002/Movies/mic_000_fractions.mrc"


def test_import_exposures_folder_with_trims(tmp_path, capsys):
    star, _ = simple_set(tmp_path / "p", n_stacks=3)
    movies = tmp_path / "movies"
    movies.mkdir()
    for k in range(3):
        (movies / f"grid1_mic_{k:03d}.tiff").write_bytes(b"")
    (movies / "notes.txt").write_text("not an exposure")
    out = tmp_path / "out"
    code = main(["import", str(star), "--out", str(out), "--exposures", str(movies)])
    assert code == 1 and "match no exposure" in capsys.readouterr().err and not out.exists()
    assert main(["import", str(star), "--out", str(out), "--exposures", str(movies), "--trim-prefix", "grid1_",
                 "--trim-suffix", "_fractions"]) == 0
    assert "18 particles linked to exposures, 0 unmatched" in capsys.readouterr().out
    cs = np.load(out / "particles.cs")
    assert cs["location/micrograph_path"][0].decode().endswith("grid1_mic_000.tiff")


def test_import_unmatched_exposures(tmp_path, capsys):
    star, _ = simple_set(tmp_path / "p", n_stacks=3)
    mics = _micrographs_star(tmp_path / "mics.star", ["Movies/mic_000_fractions.mrc", "Movies/mic_002_fractions.mrc"])
    out = tmp_path / "out"
    assert main(["import", str(star), "--out", str(out), "--exposures", str(mics)]) == 1
    err = capsys.readouterr().err
    assert "6 of 18 particles match no exposure" in err and "particle 7" in err and "mic_001_fractions" in err
    assert "--keep-unmatched" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["import", str(star), "--out", str(out), "--exposures", str(mics), "--keep-unmatched"]) == 0
    assert "12 particles linked to exposures, 6 unmatched" in capsys.readouterr().out
    ds = open_particles(out, ignore_raw=True)
    assert ds.sizes["particle"] == 18


def test_exposure_key():
    assert exposure_key("a/b/FoilHole_1_fractions.mrc", "", "_fractions") == "FoilHole_1"
    assert exposure_key("x/pre_FoilHole_1.tiff", "pre_", "") == "FoilHole_1"
    assert exposure_key("x/FoilHole_1.mrc.bz2", "", "") == "FoilHole_1"


def test_import_existing_output(particle_set, tmp_path, capsys):
    star, _ = particle_set
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["import", str(star), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "choose another --out, or empty it" in err and "--overwrite" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["import", str(star), "--out", str(out), "--overwrite"]) == 1  # not ours: kept as it is
    assert "is not a dparticles output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(["import", str(star), "--out", str(out)]) == 0
    assert main(["import", str(star), "--out", str(out), "--overwrite"]) == 0
    assert (out / "particles.star").is_file()


def test_import_refuses_output_holding_an_input(particle_set, capsys):
    star, _ = particle_set
    before = sorted(p.relative_to(star.parent) for p in star.parent.rglob("*"))
    for out in (star.parent, star.parent / "Extract", star.parent / "Extract" / "s0.mrcs"):
        assert main(["import", str(star), "--out", str(out), "--overwrite"]) == 1
        assert "holds an input" in capsys.readouterr().err
    assert sorted(p.relative_to(star.parent) for p in star.parent.rglob("*")) == before


def test_import_duplicate_stack_names(tmp_path):
    a = make_stack(tmp_path / "x" / "s.mrcs", 2, 8, seed=1)
    b = make_stack(tmp_path / "y" / "s.mrcs", 2, 8, seed=2)
    star = write_star(tmp_path / "p.star", {"rlnImageName": ["1@x/s.mrcs", "2@y/s.mrcs"], "rlnImagePixelSize": [1.0] * 2})
    import_particles(star, tmp_path / "out")
    ds = open_particles(tmp_path / "out")
    assert len(set(ds["image_path"].values)) == 2
    np.testing.assert_array_equal(ds["images"].values, np.stack([a[0], b[1]]))


def test_import_api_error_leaves_nothing(tmp_path):
    star = write_star(tmp_path / "p.star", {"rlnImageName": ["1@absent.mrcs"], "rlnImagePixelSize": [1.0]})
    with pytest.raises(ParticleError, match="absent.mrcs"):
        import_particles(star, tmp_path / "out")
    assert not (tmp_path / "out").exists()
