"""The Restack job end to end: real RELION selections restacked bit for bit in metadata order,
metadata unchanged but for the image names, stored modes kept, float16 range checks and report,
nothing lost (read-only inputs, refusals, a real kill -9 and rerun, corrupted batches, a full
file system) and the zarr cache as output and input."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import distributed
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from jobdata import star_text
from helpers import image_names, make_stack, optics_table, read_direct, star_images, write_star

from dparticles.cli import main
from dparticles.dataset import open_particles, table
from dparticles.jobs.downsample import downsample
from dparticles.errors import ParticleError
from dparticles.formats.mrc import HEADER_BYTES
from dparticles.jobs.info import describe
from dparticles.jobs.restack import restack

RIBO = "relion31_sim_ribo70S_b128"
SELECT = f"{RIBO}/Select/job010/particles.star"
EXTRACT = f"{RIBO}/Extract/job007/particles.star"
EMPIAR_CS = "cryodrgn/empiar_10076_7/empiar_10076_7.cs"
TMP_MARK = ".dparticles-tmp"


@pytest.fixture(scope="module", autouse=True)
def client():
    """One single-worker cluster for the in-process jobs of this module (the jobs reuse the active
    client); the subprocess tests start their own."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as c:
        yield c


def quiet(*_args) -> None:
    """A log that drops progress lines."""


def run_cli(args: list, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "dparticles.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_same_metadata(a: Path, b: Path, *, except_columns=("rlnImageName",)) -> None:
    """Two STAR files hold the same optics and particle values (column order aside) but for ``except``."""
    ta, tb = starfile.read(a, always_dict=True), starfile.read(b, always_dict=True)
    assert set(ta) == set(tb)
    for block in ta:
        da, db = ta[block], tb[block]
        assert set(da.columns) == set(db.columns), block
        for col in da.columns:
            if col not in except_columns:
                pd.testing.assert_series_equal(da[col], db[col], check_names=False, check_dtype=False)


def file_state(paths) -> dict:
    """Size, mtime and bytes of each file (to show inputs are untouched)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def copy_project(real: Path, dst: Path) -> Path:
    shutil.copytree(real / RIBO, dst)
    return dst


# --- bit-exactness on real data ---------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [50, 7, 1000])
def test_real_selection_bit_identical_in_metadata_order(real, tmp_path, batch_size):
    src = real / SELECT
    out = tmp_path / "out"
    result = restack(src, out, batch_size=batch_size, project_dir=out, log=quiet)  # names relative to out
    n_batches = -(-284 // batch_size)
    assert (result.n_particles, result.n_files) == (284, n_batches)
    stacks = sorted((out / "stacks").iterdir())
    assert [p.name for p in stacks] == [f"batch_{k:06d}.mrcs" for k in range(n_batches)]
    expected = star_images(src, real / RIBO)  # the 284 images in use, in metadata order
    written = np.concatenate([read_direct(p) for p in stacks])
    assert written.dtype == np.float32 and written.tobytes() == expected.tobytes()
    for k, p in enumerate(stacks):  # N per stack, the last may hold fewer; valid MRC2014 headers
        assert p.stat().st_size == HEADER_BYTES + min(batch_size, 284 - k * batch_size) * 128 * 128 * 4
        assert mrcfile.validate(str(p), print_file=open(os.devnull, "w"))
        with mrcfile.open(p, header_only=True) as mrc:
            h = mrc.header
            assert int(h.mode) == 2 and int(h.ispg) == 0 and int(h.nversion) == 20140
            assert int(h.mz) == 1 and int(h.nz) == p.stat().st_size // (128 * 128 * 4)
            assert float(mrc.voxel_size.x) == pytest.approx(2.8) and float(mrc.voxel_size.y) == pytest.approx(2.8)
    # the metadata is the input's but for the image names, which point at the same pixels
    assert_same_metadata(src, out / "particles.star")
    assert star_images(out / "particles.star").tobytes() == expected.tobytes()
    names = starfile.read(out / "particles.star")["particles"]["rlnImageName"]
    assert names.iloc[0] == "000001@stacks/batch_000000.mrcs"
    assert not list(out.rglob(f"*{TMP_MARK}*"))


def test_real_cs_keeps_every_field_but_the_blob_location(real, tmp_path):
    src = real / EMPIAR_CS
    restack(src, tmp_path / "out", batch_size=3, project_dir=tmp_path / "out", log=quiet)
    before, after = np.load(src), np.load(tmp_path / "out" / "particles.cs")
    assert set(before.dtype.names) == set(after.dtype.names)
    for name in before.dtype.names:
        if name not in ("blob/path", "blob/idx"):
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert after["blob/path"].tolist() == [b"stacks/batch_000000.mrcs"] * 3 + [b"stacks/batch_000001.mrcs"] * 3 + \
        [b"stacks/batch_000002.mrcs"]
    assert after["blob/idx"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert (tmp_path / "out" / "particles.star").is_file()
    ds = open_particles(tmp_path / "out" / "particles.cs")
    assert ds["images"].values.tobytes() == read_direct(src.with_suffix(".mrc")).tobytes()


def test_inputs_on_a_read_only_file_system(real, tmp_path):
    """Inputs are never opened for writing: the job runs from a read-only mount (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only view of the inputs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(real / RIBO), str(ro)], capture_output=True).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        with pytest.raises(OSError):
            open(ro / "Select" / "job010" / "particles.star", "r+b")
        restack(ro / "Select" / "job010" / "particles.star", tmp_path / "out", batch_size=100, log=quiet)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert star_images(tmp_path / "out" / "particles.star").tobytes() == \
        star_images(real / SELECT, real / RIBO).tobytes()


# --- stored modes and float16 ---------------------------------------------------------------------

def _two_stack_set(folder: Path, dtypes, box: int = 12, per: int = 5) -> tuple[Path, np.ndarray]:
    """Stacks a.mrcs, b.mrcs of the given modes; the STAR names a shuffled subset of them."""
    data = {}
    for name, dtype in zip("ab", dtypes):
        if np.dtype(dtype).byteorder == ">":
            arr = (np.random.default_rng(7).standard_normal((per, box, box)) * 100).astype(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.new(folder / f"{name}.mrcs", overwrite=True) as mrc:
                    mrc.set_data(arr)
                    mrc.set_image_stack()
            data[name] = arr
        else:
            data[name] = make_stack(folder / f"{name}.mrcs", per, box, dtype=dtype, seed=ord(name))
    order = [("a", 3), ("b", 0), ("b", 1), ("a", 0), ("a", 1), ("a", 2), ("b", 4)]
    names = [f"{i + 1:06d}@{s}.mrcs" for s, i in order]
    star = write_star(folder / "particles.star", {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names)},
                      optics_table([1.25], box))
    return star, np.stack([data[s][i] for s, i in order])


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float16, np.int8], ids=str)
def test_stored_modes_are_kept(tmp_path, dtype):
    star, expected = _two_stack_set(tmp_path, [dtype, dtype])
    restack(star, tmp_path / "out", batch_size=3, log=quiet)
    stacks = sorted((tmp_path / "out" / "stacks").iterdir())
    written = np.concatenate([read_direct(p) for p in stacks])
    assert written.dtype == np.dtype(dtype) and written.tobytes() == expected.tobytes()
    with mrcfile.open(stacks[0], header_only=True) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(1.25)


def test_mixed_and_big_endian_modes_become_little_endian_float32(tmp_path):
    star, expected = _two_stack_set(tmp_path, [np.int16, ">f4"])
    restack(star, tmp_path / "out", batch_size=4, log=quiet)
    written = np.concatenate([read_direct(p) for p in sorted((tmp_path / "out" / "stacks").iterdir())])
    assert written.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(written, expected.astype(np.float32))
    (tmp_path / "be").mkdir()
    star, expected = _two_stack_set(tmp_path / "be", [">f4", ">f4"])
    restack(star, tmp_path / "be_out", batch_size=4, log=quiet)
    written = np.concatenate([read_direct(p) for p in sorted((tmp_path / "be_out" / "stacks").iterdir())])
    assert written.dtype == np.dtype("<f4") and written.tobytes() == expected.astype("<f4").tobytes()


def _summary_errors(text: str) -> tuple[float, float]:
    m = re.search(r"float16 rounding error against float32: largest ([0-9.e+-]+), RMS ([0-9.e+-]+)", text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def test_float16_writes_mode_12_and_reports_the_error(real, tmp_path, capsys):
    code = main(["restack", str(real / SELECT), "--out", str(tmp_path / "out"), "--batch-size", "100", "--float16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = star_images(real / SELECT, real / RIBO)
    stacks = sorted((tmp_path / "out" / "stacks").iterdir())
    for p in stacks:
        with mrcfile.open(p, header_only=True) as mrc:
            assert int(mrc.header.mode) == 12
    written = np.concatenate([read_direct(p) for p in stacks])
    assert written.dtype == np.float16
    np.testing.assert_array_equal(written, expected.astype(np.float16))
    err16 = written.astype(np.float32) - expected
    largest, rms = _summary_errors(out)
    assert largest == pytest.approx(float(np.abs(err16).max()), rel=1e-2)
    assert rms == pytest.approx(float(np.sqrt(np.mean(np.square(err16, dtype=np.float64)))), rel=1e-2)


@pytest.mark.parametrize("value", [7e4, -1e6, np.inf, np.nan], ids=["7e4", "-1e6", "inf", "nan"])
def test_float16_range_error_names_the_particle(tmp_path, capsys, value):
    data = make_stack(tmp_path / "s.mrcs", 10, 8)
    data[6, 3, 4] = value  # particle 6 of the STAR file below (image 7 of the stack)
    with mrcfile.open(tmp_path / "s.mrcs", "r+") as mrc:
        mrc.data[6, 3, 4] = value
    star = write_star(tmp_path / "p.star", {"rlnImageName": image_names([0, 1, 2, 3, 4, 6, 5, 7], "s.mrcs"),
                                            "rlnOpticsGroup": [1] * 8}, optics_table([1.0], 8))
    code = main(["restack", str(star), "--out", str(tmp_path / "out"), "--batch-size", "3", "--float16"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "particle 6" in err and "float16" in err and "float32" in err, err
    assert f"image 7 of {tmp_path / 's.mrcs'}" in err, err
    assert not (tmp_path / "out" / "particles.star").exists()
    assert not (tmp_path / "out" / "stacks" / "batch_000001.mrcs").exists()  # the batch holding particle 6
    # without --float16 the same set restacks (float32 holds it)
    assert main(["restack", str(star), "--out", str(tmp_path / "out32"), "--batch-size", "3"]) == 0


# --- refusals -------------------------------------------------------------------------------------

def test_refuses_an_output_folder_holding_inputs(real, tmp_path, capsys):
    project = copy_project(real, tmp_path / "project")
    star = project / "Select" / "job010" / "particles.star"
    before = file_state([p for p in project.rglob("*") if p.is_file()])
    for out in (project, project / "Extract", project / "Select" / "job010", project / "Extract" / "job007" / "Movies"):
        code = main(["restack", str(star), "--out", str(out), "--overwrite"])
        _, err = capsys.readouterr()
        assert code == 1 and "is or holds an input" in err, (out, err)
    assert file_state([p for p in project.rglob("*") if p.is_file()]) == before


def test_existing_output_needs_overwrite(real, tmp_path, capsys):
    src = real / SELECT
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["restack", str(src), "--out", str(out), "--batch-size", "100"])
    _, err = capsys.readouterr()
    assert code == 1 and "choose another --out, or empty it" in err and "--overwrite" not in err  # it would refuse
    assert (out / "notes.txt").read_text() == "mine"
    # --overwrite replaces only a dparticles output: a folder with the user's own files is kept as it is
    assert main(["restack", str(src), "--out", str(out), "--batch-size", "100", "--overwrite"]) == 1
    _, err = capsys.readouterr()
    assert "is not a dparticles output" in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert main(["restack", str(src), "--out", str(out), "--batch-size", "100"]) == 0
    assert main(["restack", str(src), "--out", str(out), "--batch-size", "100", "--overwrite"]) == 0
    assert (out / "particles.star").is_file()
    capsys.readouterr()
    # another run's output (other arguments) is refused too, and left as it was
    before = file_state([p for p in out.rglob("*") if p.is_file()])
    code = main(["restack", str(src), "--out", str(out), "--batch-size", "50"])
    _, err = capsys.readouterr()
    assert code == 1 and "--overwrite" in err
    assert file_state([p for p in out.rglob("*") if p.is_file()]) == before
    # an output path that is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParticleError, match="not a folder"):
        restack(src, tmp_path / "file", log=quiet)


# --- interruption: a real kill -9 of a real run, then a rerun ------------------------------------

def _big_set(folder: Path, n_stacks: int, per: int, box: int) -> Path:
    """float32 stacks of random images; the STAR file leaves every 10th image out."""
    names = []
    for k in range(n_stacks):
        data = np.random.default_rng(k).standard_normal((per, box, box), dtype=np.float32)
        with mrcfile.new(folder / f"s{k}.mrcs", overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
        names += image_names([i for i in range(per) if i % 10 != 9], f"s{k}.mrcs")
    return write_star(folder / "particles.star", {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names)},
                      optics_table([1.0], box))


def _interrupt(cmd: list[str], out: Path, timeout: float = 60) -> bool:
    """Start ``cmd`` in its own process group, kill -9 the whole group as soon as a first batch (any)
    is complete under its final name; True if it was killed before finishing."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    stacks = out / "stacks"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not \
                (stacks.is_dir() and any(e.name.endswith(".mrcs") for e in os.scandir(stacks))):
            time.sleep(0.005)
        killed = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        killed = False
    proc.wait(timeout=30)
    return killed and not (out / "particles.star").exists()


def test_kill_and_rerun_ends_as_an_uninterrupted_run(tmp_path):
    box, per, batch = 64, 1500, 20
    src = tmp_path / "src"
    src.mkdir()
    star = _big_set(src, 10, per, box)  # 10 x 1500 x 16 KiB = 246 MB of stacks; 13500 in use
    n = 10 * (per - per // 10)
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "-m", "dparticles.cli", "restack", str(star), "--out", str(out), "--batch-size", str(batch),
           "--n-workers", "1"]
    assert _interrupt(cmd, out), "the run finished before it could be killed; make the set larger"
    # nothing under a final name is partial: each batch file there has exactly its full size
    kept = sorted((out / "stacks").glob("batch_*.mrcs"))
    assert kept and len(kept) < n // batch
    for p in kept:
        assert p.stat().st_size == HEADER_BYTES + batch * box * box * 4, p
    assert not (out / "particles.star").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in kept}

    done = run_cli(cmd[3:], timeout=180)
    assert done.returncode == 0, done.stderr
    assert "complete stacks kept from an earlier run" in done.stdout, done.stdout
    assert all((out / "stacks" / name).stat().st_mtime_ns == t for name, t in mtimes.items())  # kept, not rewritten
    assert run_cli(cmd[3:6] + [str(ref)] + cmd[7:], timeout=180).returncode == 0  # uninterrupted, elsewhere
    ours, theirs = sorted((out / "stacks").iterdir()), sorted((ref / "stacks").iterdir())
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == -(-n // batch)
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(ours, theirs))
    assert star_text(out / "particles.star", out) == star_text(ref / "particles.star", ref)
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]
    # and the images are the source's, in metadata order
    first = read_direct(ours[0])
    np.testing.assert_array_equal(first, read_direct(src / "s0.mrcs")[[i for i in range(per) if i % 10 != 9][:batch]])


@pytest.mark.parametrize("damage", ["truncate", "first image", "last image", "header"])
def test_corrupted_batch_is_detected_and_rewritten(real, tmp_path, damage):
    src = real / SELECT
    out = tmp_path / "out"
    restack(src, out, batch_size=50, log=quiet)
    good = {p.name: p.read_bytes() for p in (out / "stacks").iterdir()}
    victim = out / "stacks" / "batch_000002.mrcs"
    image = 128 * 128 * 4
    with open(victim, "r+b") as f:
        if damage == "truncate":
            f.truncate(victim.stat().st_size - 1000)
        elif damage == "first image":
            f.seek(HEADER_BYTES + 100)
            f.write(b"\0" * 64)
        elif damage == "last image":
            f.seek(HEADER_BYTES + 49 * image + 4000)
            f.write(b"\x7f" * 16)
        else:
            f.seek(8)  # nz
            f.write(np.int32(49).tobytes())
    result = restack(src, out, batch_size=50, log=quiet)
    assert result.kept_files == 5  # the other five were checked and kept
    assert {p.name: p.read_bytes() for p in (out / "stacks").iterdir()} == good


def test_corruption_inside_a_batch_is_found_and_rewritten(real, tmp_path):
    """Every byte of a kept batch is compared with the sources: damage in the middle of a batch is
    found, that batch alone is rewritten, and the result equals an undisturbed run."""
    src = real / SELECT
    out = tmp_path / "out"
    restack(src, out, batch_size=50, log=quiet)
    victim = out / "stacks" / "batch_000002.mrcs"
    good = victim.read_bytes()
    with open(victim, "r+b") as f:
        f.seek(HEADER_BYTES + 20 * 128 * 128 * 4)
        f.write(b"\0" * 64)
    assert restack(src, out, batch_size=50, log=quiet).kept_files == 5
    assert victim.read_bytes() == good


def test_a_damaged_downsampled_batch_is_found_and_rewritten(real, tmp_path):
    """A kept downsampled batch is checked by computing its first piece again."""
    src = real / SELECT
    out = tmp_path / "out"
    downsample(src, out, fourier_box=64, batch_size=50, log=quiet)
    victim = out / "stacks" / "batch_000001.mrcs"
    good = victim.read_bytes()
    with open(victim, "r+b") as f:
        f.seek(HEADER_BYTES + 3 * 64 * 64 * 4)
        f.write(b"\0" * 64)
    assert downsample(src, out, fourier_box=64, batch_size=50, log=quiet)[0].kept_files == 5
    assert victim.read_bytes() == good


# --- a write error: a full file system ----------------------------------------------------------

def test_full_file_system_gives_a_clear_error_and_no_partial_batch(real, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    cmd = ["restack", real / SELECT, "--out", mnt / "out", "--batch-size", "10", "--n-workers", "1"]
    try:
        done = run_cli(cmd)
        files = {p: p.stat().st_size for p in (mnt / "out").rglob("*") if p.is_file()}
        # with room made, the same command finishes the job (temporaries of the failed run removed)
        subprocess.run(["mount", "-o", "remount,size=40m", str(mnt)], check=True)
        again = run_cli(cmd)
        assert again.returncode == 0, again.stderr
        assert star_images(mnt / "out" / "particles.star").tobytes() == \
            star_images(real / SELECT, real / RIBO).tobytes()
        assert not [p for p in (mnt / "out").rglob("*") if TMP_MARK in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dparticles restack: error:") and "No space left on device" in last, done.stderr
    assert "batch_" in last and "rerun" in last
    assert "Traceback (most recent call last)" not in done.stderr  # (the workers' own error log lines remain)
    batches = {p: s for p, s in files.items() if p.name.startswith("batch_") and p.suffix == ".mrcs"}
    assert batches, "expected some batches to fit"
    assert all(s == HEADER_BYTES + 10 * 128 * 128 * 4 for s in batches.values())
    assert not any(p.name == "particles.star" for p in files)


# --- zarr cache -----------------------------------------------------------------------------------

def _comparable(ds) -> pd.DataFrame:
    t = table(ds).drop(columns=["image_path", "stack_id", "image_name", "image_index"], errors="ignore")
    return t.reindex(sorted(t.columns), axis=1)


def test_zarr_round_trip_and_jobs_from_the_cache(real, tmp_path):
    src = real / SELECT
    restack(src, tmp_path / "out", batch_size=100, zarr=tmp_path / "c.zarr", log=quiet)
    restack(src, None, batch_size=100, zarr=tmp_path / "only.zarr", log=quiet)
    ds = open_particles(src)
    for path in (tmp_path / "c.zarr", tmp_path / "only.zarr"):
        z = open_particles(path)
        assert z["images"].dtype == np.float32
        assert z["images"].values.tobytes() == ds["images"].values.tobytes()
        pd.testing.assert_frame_equal(_comparable(z), _comparable(ds), check_dtype=False)
        assert {k: z.attrs[k] for k in ("format", "pose")} == {k: ds.attrs[k] for k in ("format", "pose")}
    only = open_particles(tmp_path / "only.zarr")
    assert list(only["image_name"].values) == list(ds["image_name"].values)
    # info on a cache: every particle stored is in use; the bytes on disk are the compressed store's
    info = describe(only)
    assert (info["n_particles"], info["particles_on_disk"], info["n_stacks"]) == (284, 284, 0)
    assert info["bytes_in_use"] == 284 * 128 * 128 * 4
    assert 0 < info["bytes_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "only.zarr").rglob("*") if f.is_file())
    # restack from the cache: the same stacks and metadata as from the STAR file
    restack(tmp_path / "c.zarr", tmp_path / "again", batch_size=100, log=quiet)
    for a, b in zip(sorted((tmp_path / "out" / "stacks").iterdir()), sorted((tmp_path / "again" / "stacks").iterdir())):
        assert read_direct(a).tobytes() == read_direct(b).tobytes()
    assert_same_metadata(tmp_path / "out" / "particles.star", tmp_path / "again" / "particles.star")
    # downsample from the cache equals downsample from the STAR file
    downsample(src, tmp_path / "ds_star", fourier_box=64, batch_size=100, log=quiet)
    downsample(tmp_path / "c.zarr", tmp_path / "ds_zarr", fourier_box=64, batch_size=100, log=quiet)
    for a, b in zip(sorted((tmp_path / "ds_star" / "stacks").iterdir()),
                    sorted((tmp_path / "ds_zarr" / "stacks").iterdir())):
        assert read_direct(a).tobytes() == read_direct(b).tobytes()
    assert_same_metadata(tmp_path / "ds_star" / "particles.star", tmp_path / "ds_zarr" / "particles.star")
    # an existing cache needs --overwrite
    with pytest.raises(ParticleError, match="--overwrite"):
        restack(src, None, zarr=tmp_path / "only.zarr", log=quiet)
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_zarr_cache_of_a_cs_input_keeps_all_its_metadata(real, tmp_path):
    src = real / EMPIAR_CS
    restack(src, tmp_path / "out", batch_size=3, zarr=tmp_path / "c.zarr", log=quiet)
    ds, z = open_particles(src), open_particles(tmp_path / "c.zarr")
    assert z.attrs["format"] == "cryosparc"
    pd.testing.assert_frame_equal(_comparable(z), _comparable(ds), check_dtype=False)
    assert z["images"].values.tobytes() == ds["images"].values.tobytes()
    # and a restack from the cache writes the .cs again, with the same uids
    restack(tmp_path / "c.zarr", tmp_path / "again", batch_size=3, log=quiet)
    again = np.load(tmp_path / "again" / "particles.cs")
    np.testing.assert_array_equal(again["uid"], np.load(src)["uid"])


def test_zarr_cache_may_not_replace_an_input(real, tmp_path, capsys):
    """``--zarr`` naming a folder of inputs (or an input) is refused before anything is written, even
    with ``--overwrite`` (which would otherwise delete the input stacks to put the cache there)."""
    project = copy_project(real, tmp_path / "project")
    star = project / "Select" / "job010" / "particles.star"
    (project / "Notes").mkdir()
    (project / "Notes" / "todo.txt").write_text("keep me")
    before = file_state([p for p in project.rglob("*") if p.is_file()])
    targets = {project / "Extract" / "job007": "--zarr path is or holds an input", star: "is or holds an input",
               project / "Extract" / "job007" / "particles.star": "not a zarr cache",  # not read, but not a cache
               project / "Notes": "not a zarr cache"}
    for target, message in targets.items():
        for command in ("restack", "downsample"):
            extra = ["--fourier-box", "64"] if command == "downsample" else []
            code = main([command, str(star), "--out", str(tmp_path / f"out_{command}"), "--zarr", str(target),
                         "--overwrite", *extra])
            _, err = capsys.readouterr()
            assert code == 1 and message in err, (target, err)
            assert not (tmp_path / f"out_{command}").exists()
    assert file_state([p for p in project.rglob("*") if p.is_file()]) == before
    # an existing cache is refused up front too, before any batch is written
    restack(star, None, zarr=tmp_path / "c.zarr", log=quiet)
    with pytest.raises(ParticleError, match="--overwrite"):
        restack(star, tmp_path / "out", zarr=tmp_path / "c.zarr", log=quiet)
    assert not (tmp_path / "out").exists()
