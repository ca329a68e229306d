"""The command line: ``info`` on real data, and every kind of bad input refused with one clear line on
stderr, a non-zero exit and nothing written; in-process (``main([...])``) and as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import image_names, make_stack, optics_table, simple_set, write_star

from dparticles.cli import main

SELECT = "relion31_sim_ribo70S_b128/Select/job010/particles.star"


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(args: list[str]) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "dparticles.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=120, env=env)
    return r.returncode, r.stdout, r.stderr


# --- info ------------------------------------------------------------------------------------

def test_info_json_on_select(real, capsys):
    code, out, err = run_main(["info", real / SELECT, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert {"n_particles", "n_stacks", "box", "pixel_size", "dtype", "optics_groups"} <= set(info)
    assert info["n_particles"] == 284 and info["particles_on_disk"] == 400
    assert info["n_stacks"] == 20 and info["box"] == 128 and info["dtype"] == "float32"
    assert info["pixel_size"] == pytest.approx(2.8)
    assert info["bytes_in_use"] == 284 * 128 * 128 * 4
    assert info["bytes_on_disk"] == 400 * 128 * 128 * 4
    assert sum(s["in_use"] for s in info["stacks"]) == 284 and sum(s["on_disk"] for s in info["stacks"]) == 400
    by_name = {Path(s["path"]).name: (s["in_use"], s["on_disk"]) for s in info["stacks"]}
    assert by_name["20240311_FoilHole_0019_fractions.mrcs"] == (37, 50)
    (group,) = info["optics_groups"]
    assert group["pixel_size"] == pytest.approx(2.8) and group["voltage"] == 300 and group["n_particles"] == 284
    assert info["sign"] == 1.0 and info["ctf"] is True and info["alignments"] == "3d"


def test_info_text_on_select(real, capsys):
    code, out, err = run_main(["info", real / SELECT], capsys)
    assert code == 0, err
    assert "284 in use of 400 on disk, in 20 stacks" in out
    assert "128 px" in out and "float32" in out and "2.8 Å/px" in out
    assert "CTF yes" in out and "alignments 3d" in out


def test_info_subprocess(real):
    code, out, err = run_subprocess(["info", real / SELECT, "--json"])
    assert code == 0, err
    assert json.loads(out)["n_particles"] == 284


def test_info_several_optics_groups(tmp_path, capsys):
    star, _ = simple_set(tmp_path, pixel_sizes=(1.0, 2.0))
    code, out, err = run_main(["info", star, "--json"], capsys)
    info = json.loads(out)
    assert info["pixel_size"] == {"1": 1.0, "2": 2.0}
    assert [g["pixel_size"] for g in info["optics_groups"]] == [1.0, 2.0]


def test_info_ignore_raw(real, capsys):
    code, out, err = run_main(["info", real / "relion31_sim_ribo70S_b128/relion_project_input/ang_all.star",
                               "--ignore-raw", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["n_particles"] == 400 and info["n_stacks"] == 0


# --- bad inputs ------------------------------------------------------------------------------

def _bad_garbage(t: Path) -> tuple[Path, list[str]]:
    p = t / "garbage.star"
    p.write_bytes(b"this is not\x00 a STAR file\n\x89PNG\r\n" + bytes(range(256)))
    return p, ["garbage.star"]


def _bad_no_image_name(t: Path):
    p = write_star(t / "coords.star", {"rlnMicrographName": ["a.mrc"], "rlnCoordinateX": [1.0],
                                       "rlnOpticsGroup": [1]}, optics_table([1.0], 16))
    return p, ["coords.star", "rlnImageName", "--ignore-raw"]


def _bad_index_beyond(t: Path):
    make_stack(t / "s.mrcs", 4, 16)
    p = write_star(t / "p.star", {"rlnImageName": image_names([0, 1, 6, 2], "s.mrcs"), "rlnOpticsGroup": [1] * 4},
                   optics_table([1.0], 16))
    return p, ["p.star", "particle 3", "image 7", "holds 4 images", "expected 1..4"]


def _bad_missing_stack(t: Path):
    p = write_star(t / "sub" / "p.star", {"rlnImageName": image_names([0], "gone/s.mrcs"), "rlnOpticsGroup": [1]},
                   optics_table([1.0], 16))
    return p, ["p.star", "particle 1", "'gone/s.mrcs' not found", "tried", str(t / "sub" / "gone" / "s.mrcs"),
               str(t / "gone" / "s.mrcs")]


def _bad_stack_is_folder(t: Path):
    (t / "s.mrcs").mkdir()
    p = write_star(t / "p.star", {"rlnImageName": image_names([0], "s.mrcs"), "rlnOpticsGroup": [1]},
                   optics_table([1.0], 16))
    return p, ["p.star", "'s.mrcs' not found", "exists but is not a file"]


def _bad_stack_tiny(t: Path):
    (t / "s.mrcs").write_bytes(b"\x00" * 100)
    p = write_star(t / "p.star", {"rlnImageName": image_names([0], "s.mrcs"), "rlnOpticsGroup": [1]},
                   optics_table([1.0], 16))
    return p, ["p.star", "particle 1", str(t / "s.mrcs"), "MRC header"]


def _bad_stack_short(t: Path, real: Path):
    src = real / "relion31_sim_ribo70S_b128/Extract/job007/Movies/20240311_FoilHole_0002_fractions.mrcs"
    shutil.copyfile(src, t / "s.mrcs")
    with open(t / "s.mrcs", "r+b") as f:
        f.truncate(1024 + 12 * 128 * 128 * 4 + 100)
    p = write_star(t / "p.star", {"rlnImageName": image_names([0], "s.mrcs"), "rlnOpticsGroup": [1]},
                   optics_table([2.8], 128))
    return p, ["p.star", "particle 1", str(t / "s.mrcs"), "shorter than its header says", "20 images", "only 12 complete images"]


def _bad_non_square(t: Path):
    make_stack(t / "s.mrcs", 2, (16, 12))
    p = write_star(t / "p.star", {"rlnImageName": image_names([0, 1], "s.mrcs"), "rlnOpticsGroup": [1, 1]},
                   optics_table([1.0], 16))
    return p, ["p.star", "particle 1", "16x12", "square"]


def _bad_mixed_boxes(t: Path):
    make_stack(t / "a.mrcs", 2, 16)
    make_stack(t / "b.mrcs", 2, 20)
    p = write_star(t / "p.star", {"rlnImageName": image_names([0, 1], "a.mrcs") + image_names([0], "b.mrcs"),
                                  "rlnOpticsGroup": [1] * 3}, optics_table([1.0], 16))
    return p, ["p.star", "particle 3", "optics group 1", "[16, 20]", "b.mrcs"]


def _bad_no_pixel_size(t: Path):
    make_stack(t / "s.mrcs", 2, 16)
    p = write_star(t / "p.star", {"rlnImageName": image_names([0, 1], "s.mrcs")}, particle_block="")
    return p, ["p.star", "no pixel size", "--pixel-size"]


def _bad_not_a_number(t: Path):
    make_stack(t / "s.mrcs", 2, 16)
    p = write_star(t / "p.star", {"rlnImageName": image_names([0, 1], "s.mrcs"), "rlnDefocusU": ["1.0", "abc"],
                                  "rlnOpticsGroup": [1, 1]}, optics_table([1.0], 16))
    return p, ["p.star", "particle 2", "rlnDefocusU", "abc", "expected a number"]


def _bad_unknown_format(t: Path):
    p = t / "p.txt"
    p.write_text("hello")
    return p, ["p.txt", "unknown particle format; expected RELION .star, CryoSPARC .cs, a bare .mrcs/.mrc stack"]


def _bad_cs_garbage(t: Path):
    p = t / "p.cs"
    p.write_text("not numpy")
    return p, ["p.cs", "CryoSPARC"]


BAD = {f.__name__[5:]: f for f in [_bad_garbage, _bad_no_image_name, _bad_index_beyond, _bad_missing_stack,
                                   _bad_stack_is_folder, _bad_stack_tiny, _bad_stack_short, _bad_non_square,
                                   _bad_mixed_boxes, _bad_no_pixel_size, _bad_not_a_number, _bad_unknown_format,
                                   _bad_cs_garbage]}


def _make_bad(name: str, tmp_path: Path, real_dir: Path | None):
    d = tmp_path / "in"
    d.mkdir()
    return BAD[name](d, real_dir) if name == "stack_short" else BAD[name](d)


def _check_refusal(code: int, out: str, err: str, words: list[str], command: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dparticles {command}: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("command", ["import", "info"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_in_process(tmp_path, capsys, request, name, command):
    real = request.getfixturevalue("real") if name == "stack_short" else None
    path, words = _make_bad(name, tmp_path, real)
    out_dir = tmp_path / "out"
    args = ["import", path, "--out", out_dir] if command == "import" else ["info", path]
    code, out, err = run_main(args, capsys)
    _check_refusal(code, out, err, words, command)
    assert not out_dir.exists()


@pytest.mark.parametrize("name", ["garbage", "index_beyond", "missing_stack", "stack_short", "no_pixel_size",
                                  "mixed_boxes"])
def test_bad_input_subprocess(tmp_path, request, name):
    real = request.getfixturevalue("real") if name == "stack_short" else None
    path, words = _make_bad(name, tmp_path, real)
    out_dir = tmp_path / "out"
    code, out, err = run_subprocess(["import", path, "--out", out_dir])
    _check_refusal(code, out, err, words, "import")
    assert not out_dir.exists()


def test_bad_override(tmp_path, capsys):
    star, _ = simple_set(tmp_path)
    code, out, err = run_main(["import", star, "--out", tmp_path / "out", "--pixel-size", "-1"], capsys)
    _check_refusal(code, out, err, ["pixel size", "-1"], "import")
    assert not (tmp_path / "out").exists()


def test_malformed_real_file_subprocess(real, tmp_path):
    code, out, err = run_subprocess(["import", real / "starfile/postprocess.star", "--out", tmp_path / "out"])
    _check_refusal(code, out, err, ["postprocess.star", "no particle table"], "import")
    assert not (tmp_path / "out").exists()


def test_console_script(real, tmp_path):
    exe = Path(sys.executable).parent / "dparticles"
    if not exe.exists():
        pytest.skip("console script not installed")
    r = subprocess.run([str(exe), "info", str(real / SELECT), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_stacks"] == 20
    r = subprocess.run([str(exe), "info", str(tmp_path / "absent.star")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "absent.star" in r.stderr and "Traceback" not in r.stderr
