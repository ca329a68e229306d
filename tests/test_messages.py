"""What a new RELION or CryoSPARC user reads in the first hour: the one-line messages and notes of
recentring (which micrograph pixel size moved the coordinates, and when there is none), of an output
folder that is not ours, of ``--help``, and of ``info`` on a set with angles but no shifts. Real runs
through the command line (``main([...])``) and the API, with the exact lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
from helpers import image_names, make_stack, optics_table, simple_set, write_star

from dparticles import ops
from dparticles.cli import main
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.jobs.downsample import downsample

SELECT = "relion31_sim_ribo70S_b128/Select/job010/particles.star"
NOTE = "recentred coordinates use the micrograph pixel size from "


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines, err
    return lines[-1]


def quiet(*_) -> None:
    pass


def job_record(out: Path) -> dict:
    return json.loads((out / "job.json").read_text())


# --- the micrograph pixel size for recentred coordinates ------------------------------------------

def test_movie_pixel_size_is_not_the_micrographs(real, tmp_path, capsys):
    """RELION 3.1's rlnMicrographOriginalPixelSize (0.70 Å, the movies') is no evidence about the
    micrographs: recentring is refused in one line naming the labels looked for and the option."""
    src = real / SELECT
    code, _, err = run(["downsample", src, "--out", tmp_path / "out", "--fourier-box", "64", "--recenter"], capsys)
    assert code == 1
    assert error_line(err) == (
        f"dparticles downsample: error: {src}: --recenter moves the picking coordinates in micrograph pixels, and "
        "the metadata give no micrograph pixel size (looked for rlnMicrographPixelSize, location/micrograph_psize_A; "
        "rlnMicrographOriginalPixelSize 0.7 Å is the movies', which motion correction may have binned); "
        "give --micrograph-pixel-size")
    assert not (tmp_path / "out").exists()
    code, out, err = run(["downsample", src, "--out", tmp_path / "out", "--fourier-box", "64", "--recenter",
                          "--micrograph-pixel-size", "0.7", "--n-workers", "1"], capsys)
    assert code == 0, err
    assert NOTE + "--micrograph-pixel-size" in out.splitlines()
    assert job_record(tmp_path / "out")["micrograph_pixel_size_from"] == "--micrograph-pixel-size"


def picked_set(folder: Path, optics: dict | None = None) -> Path:
    """Four particles of one stack with picking coordinates and shifts; ``optics`` adds columns."""
    make_stack(folder / "Extract" / "s.mrcs", 4, 16)
    table = optics_table([1.5], 16).assign(**(optics or {}))
    return write_star(folder / "particles.star", {
        "rlnMicrographName": ["mic_001.mrc"] * 4, "rlnCoordinateX": [100.0, 200.0, 300.0, 400.0],
        "rlnCoordinateY": [50.0] * 4, "rlnImageName": image_names(range(4), "Extract/s.mrcs"),
        "rlnAnglePsi": [30.0] * 4, "rlnOriginXAngst": [1.5, -3.0, 0.0, 4.5], "rlnOriginYAngst": [0.0] * 4,
        "rlnOpticsGroup": [1] * 4}, table)


def test_note_and_record_name_the_label_used(tmp_path):
    star = picked_set(tmp_path / "p", {"rlnMicrographPixelSize": [0.5]})
    ds = open_particles(star)
    assert ds["star_optics:rlnMicrographPixelSize"].values[0] == 0.5
    (result,) = downsample(star, tmp_path / "out", recenter=True, log=quiet, cluster={"n_workers": 1})
    assert f"{NOTE}rlnMicrographPixelSize" in result.notes
    moved = open_particles(tmp_path / "out")["coord_x"].values
    np.testing.assert_allclose(moved, [100.0 - 3, 200.0 + 6, 300.0, 400.0 - 9])  # shift Å / 0.5 Å per pixel
    assert job_record(tmp_path / "out")["micrograph_pixel_size_from"] == "rlnMicrographPixelSize"
    cs = ds.drop_vars("star_optics:rlnMicrographPixelSize").assign_coords(
        {"cs:location.micrograph_psize_A": ("particle", np.full(ds.sizes["particle"], 0.9))})
    assert ops.recenter(cs).attrs["micrograph_pixel_size_from"] == "location/micrograph_psize_A"
    with pytest.raises(ParticleError, match=r"particle 1: location/micrograph_psize_A 0.0 is not a pixel size "
                                            r"greater than 0 Å; give --micrograph-pixel-size$"):
        ops.recenter(cs.assign_coords({"cs:location.micrograph_psize_A": ("particle", np.zeros(4))}))


def test_no_coordinates_no_micrograph_pixel_size_and_no_note(tmp_path):
    star, _ = simple_set(tmp_path / "p", micrographs=False)
    (result,) = downsample(star, tmp_path / "out", recenter=True, log=quiet, cluster={"n_workers": 1})
    assert not any("micrograph pixel size" in n for n in result.notes), result.notes
    assert job_record(tmp_path / "out")["micrograph_pixel_size_from"] is None
    assert "micrograph_pixel_size_from" not in ops.recenter(open_particles(star), micrograph_pixel_size=1.0).attrs


def test_coordinates_without_any_evidence_are_refused(tmp_path):
    with pytest.raises(ParticleError) as caught:
        ops.downsample(open_particles(picked_set(tmp_path / "p")), fourier_box=8, recenter=True)
    assert caught.value.message == (
        "--recenter moves the picking coordinates in micrograph pixels, and the metadata give no micrograph pixel "
        "size (looked for rlnMicrographPixelSize, location/micrograph_psize_A); give --micrograph-pixel-size")


# --- an output folder that is not ours ------------------------------------------------------------

def test_a_folder_that_is_not_ours_is_not_offered_overwrite(real, tmp_path, capsys):
    notes = tmp_path / "MyNotes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    src = real / SELECT
    start = f"dparticles restack: error: {notes}: the output folder is not empty and is not a dparticles output " \
            "(it has no run record .dparticles-run.json); "
    code, _, err = run(["restack", src, "--out", notes], capsys)
    assert code == 1 and error_line(err) == start + "choose another --out, or empty it"
    code, _, err = run(["restack", src, "--out", notes, "--overwrite"], capsys)
    assert code == 1
    assert error_line(err) == start + "--overwrite replaces only what dparticles wrote: empty it yourself or choose " \
                                      "another --out"
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def test_an_output_holding_other_files_is_not_offered_overwrite(tmp_path, capsys):
    star, _ = simple_set(tmp_path / "p")
    out = tmp_path / "out"
    assert run(["restack", star, "--out", out, "--n-workers", "1"], capsys)[0] == 0
    (out / "todo.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # another run of another size: --overwrite would refuse it too
        code, _, err = run(["restack", star, "--out", out, "--batch-size", "5", *extra], capsys)
        assert code == 1 and error_line(err) == (
            f"dparticles restack: error: {out}: the output folder holds files dparticles did not write (todo.txt); "
            "--overwrite replaces only dparticles outputs: move them or choose another --out")


# --- --help -----------------------------------------------------------------------------------------

def help_text(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    with pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_shows_default_values(capsys, monkeypatch):
    for command in ("restack", "downsample"):
        text = help_text([command], capsys, monkeypatch)
        assert "particles per output stack; default: 5000 (dparticles.batch-size)" in text
        assert "worker jobs to keep with --jobqueue; default: 4 (dparticles.cluster.jobs)" in text
        assert "default: false (dparticles.cluster.processes)" in text
    with dask.config.set({"dparticles.batch-size": 123}):  # the value a run would use
        assert "default: 123 (dparticles.batch-size)" in help_text(["restack"], capsys, monkeypatch)


def test_info_input_and_demo_examples_in_help(capsys, monkeypatch):
    text = help_text(["info"], capsys, monkeypatch)
    assert "input RELION .star, CryoSPARC .cs, a bare .mrcs/.mrc stack, an earlier output folder or a zarr cache" \
        in [" ".join(line.split()) for line in text.splitlines()]
    text = help_text(["demo"], capsys, monkeypatch)
    assert text.rstrip().endswith("examples:\n  dparticles demo --out dparticles-demo\n"
                                  "  dparticles demo --out /tmp/dparticles-demo --n-workers 2")


# --- angles without shifts: info and --recenter agree -----------------------------------------------

def test_subtomogram_set_with_angles_but_no_origins(real, tmp_path, capsys):
    one_loop = real / "starfile/one_loop.star"  # RELION 3.0 sub-tomograms: rlnAngleRot/Tilt/Psi, no origins
    code, out, err = run(["info", one_loop, "--ignore-raw"], capsys)
    assert code == 0, err
    assert "metadata:    CTF no, alignments 3d (angles, no shifts), exposures linked 0, duplicate image " \
           "references 0" in out.splitlines()
    code, out, _ = run(["info", one_loop, "--ignore-raw", "--json"], capsys)
    assert json.loads(out)["alignments"] == "3d" and json.loads(out)["shifts"] is False
    # the same kind of set with images: --recenter says why it cannot
    make_stack(tmp_path / "Extract" / "s.mrcs", 4, 16)
    star = write_star(tmp_path / "particles.star", {"rlnImageName": image_names(range(4), "Extract/s.mrcs"),
                                                    "rlnAngleRot": [10.0] * 4, "rlnAngleTilt": [20.0] * 4,
                                                    "rlnAnglePsi": [30.0] * 4, "rlnOpticsGroup": [1] * 4},
                      optics_table([1.5], 16))
    code, out, _ = run(["info", star], capsys)
    assert "alignments 3d (angles, no shifts)" in out
    code, _, err = run(["downsample", star, "--out", tmp_path / "out", "--recenter"], capsys)
    assert code == 1 and error_line(err) == (
        f"dparticles downsample: error: {star}: --recenter needs aligned shifts, and these particles have 3D angles "
        "but no shifts (origins) to recentre by")
    code, out, _ = run(["info", real / SELECT], capsys)
    assert "alignments 3d," in out  # with shifts: nothing added


# --- a zarr-only run counts what it wrote --------------------------------------------------------------

def test_a_zarr_only_restack_reports_the_bytes_it_wrote(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p")
    code, _, err = run(["restack", star, "--zarr", tmp_path / "c.zarr"], capsys)
    assert code == 0, err
    summary = next(line for line in err.splitlines() if line.startswith("restack: "))
    assert f", {dask.utils.format_bytes(images.nbytes)} written (" in summary, summary


def test_version_and_a_run_s_parser_import_no_dask(tmp_path):
    """--version (and building the parser every run makes) stay light: settings shown in --help are
    read from the dask config only when the help is printed."""
    code = ("import sys\nfrom dparticles.cli import main, parser\nparser()\n"
            "assert 'dask' not in sys.modules, sorted(m for m in sys.modules if m.startswith('dask'))\n"
            "main(['--version'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "dparticles 0.1.0" and "AssertionError" not in done.stderr, done.stderr
