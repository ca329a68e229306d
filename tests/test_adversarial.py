"""An adversarial look at output folders: nothing lost, nobody in.

Five ways a run could lose or leak data, each tried for real (real files, links, FIFOs, a real
``flock`` held by a real run, real subprocesses of ``python -m dparticles.cli``, another account
through ``setpriv``, a full tmpfs):

1. ``--overwrite`` replaces only a dparticles output that holds nothing else and that no input needs;
   a ``--out`` link is followed, never removed through.
2. A second run on an output folder that a run is writing is refused at once, naming that run; the
   lock goes with the process, so a ``kill -9`` and a rerun resumes.
3. Planted links and FIFOs at temporary or final names are never followed or opened.
4. A full disk or a folder one may not write ends in one line, without temporaries or new folders.
5. A rerun with other options never keeps stale files: metadata-only options resume and rewrite the
   metadata; anything else is refused without ``--overwrite``.
6. A damaged zarr cache read as input ends the job in one line naming the chunk file and what it
   should hold, and leaves no output.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import distributed
import mrcfile
import numpy as np
import psutil
import pytest
import starfile
from helpers import read_direct, simple_set, star_images, write_star
from jobdata import shuffled_set

from dparticles.cli import main
from dparticles.dataset import open_particles
from dparticles.formats.mrc import HEADER_BYTES
from dparticles.safe import atomic_write

TMP_MARK = ".dparticles-tmp"  # in the name of every temporary
LOCK = ".dparticles-lock"  # the lock file a run holds in its output folder
RUN_MARKER = ".dparticles-run.json"  # the run record that says a folder is a dparticles output
OTHER = "nobody"


@pytest.fixture(scope="module", autouse=True)
def client():
    """One small cluster for the in-process runs of this module; subprocesses start their own."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as c:
        yield c


def cli(args: list, *, timeout: float = 120, prefix: list | None = None, cwd: Path | None = None,
        **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*(prefix or []), sys.executable, "-m", "dparticles.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, **popen)


def one_line_error(done: subprocess.CompletedProcess, command: str = "restack") -> str:
    """The error a failed run ended with: exit status 1, one ``dparticles X: error:`` line last, and
    no Python traceback anywhere."""
    assert done.returncode == 1, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback (most recent call last)" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dparticles {command}: error: "), done.stderr
    return last


def snapshot(folder: Path) -> dict:
    """Everything under ``folder`` as it is, links and FIFOs included and never followed:
    relative path -> (kind, bytes or link target, mtime)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", p.read_bytes())
            else:
                what = ("dir" if stat.S_ISDIR(st.st_mode) else "other", None)
            out[p.relative_to(folder).as_posix()] = (*what, st.st_mtime_ns)
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*") if TMP_MARK in p.name)


def quiet_main(args: list, capsys) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


# --- 1. nothing lost through --overwrite --------------------------------------------------------

def test_overwrite_refuses_a_folder_dparticles_did_not_write(tmp_path):
    star, _ = simple_set(tmp_path / "p")
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    (mine / "stacks").mkdir()  # even one with our names in it
    (mine / "stacks" / "batch_000000.mrcs").write_text("my own")
    before = snapshot(mine)
    done = cli(["restack", star, "--out", mine, "--overwrite", "--n-workers", "1"])
    last = one_line_error(done)
    assert "is not a dparticles output" in last and "--overwrite replaces only" in last, last
    assert "Dask cluster" not in done.stdout  # refused before any work
    assert snapshot(mine) == before
    done = cli(["import", star, "--out", mine, "--overwrite"])
    assert "is not a dparticles output" in one_line_error(done, "import")
    assert snapshot(mine) == before


def test_overwrite_refuses_an_output_holding_other_files_and_removes_only_its_own(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p")
    out = tmp_path / "out"
    victim = tmp_path / "victim.mrcs"
    victim.write_bytes(b"not yours")
    assert quiet_main(["restack", star, "--out", out, "--batch-size", "5", "--zarr", out / "c.zarr"], capsys)[0] == 0
    assert sorted(p.name for p in (out / "stacks").iterdir()) == [f"batch_00000{k}.mrcs" for k in range(3)]
    for planted in (out / "notes.txt", out / "stacks" / "mine.mrcs", out / ".dparticles" / "sub"):
        planted.mkdir() if planted.name == "sub" else planted.write_text("user data")
        before = snapshot(out)
        code, _, err = quiet_main(["restack", star, "--out", out, "--batch-size", "12", "--overwrite"], capsys)
        assert code == 1 and "holds files dparticles did not write" in err, err
        assert planted.relative_to(out).as_posix() in err, err
        assert snapshot(out) == before
        planted.rmdir() if planted.is_dir() else planted.unlink()
    # a link in stacks/ (as import makes) is ours: the link goes, never what it points to
    (out / "stacks" / "s0.mrcs").symlink_to(victim)
    code, stdout, err = quiet_main(["restack", star, "--out", out, "--batch-size", "12", "--overwrite"], capsys)
    assert code == 0, err
    assert victim.read_bytes() == b"not yours"
    assert not (out / "c.zarr").exists()  # the zarr cache written there was ours too
    assert sorted(p.name for p in (out / "stacks").iterdir()) == ["batch_000000.mrcs"]
    assert sorted(p.name for p in (out / ".dparticles").iterdir()) == ["batch_000000.mrcs.json"]
    assert set(os.listdir(out)) <= {RUN_MARKER, "particles.star", "stacks", ".dparticles", "job.json", "note.txt",
                                    "report.html"}
    assert not temporaries(out) and not (out / LOCK).exists()
    assert star_images(out / "particles.star").tobytes() == images.tobytes()


@pytest.mark.parametrize("out, zarr, expected", [
    ("r", "r", "--out {t}/r and --zarr {t}/r are the same place"),
    ("r", "link", "--out {t}/r and --zarr {t}/link are the same place"),  # link -> r
    ("c/r", "c", "--out {t}/c/r lies inside --zarr {t}/c;"),
    ("r", "r/stacks", "--zarr {t}/r/stacks lies inside --out {t}/r, where it keeps its stacks"),
    ("r", "r/particles.star", "lies inside --out {t}/r, where it keeps its particles.star"),
    ("r", "r/.dparticles/c.zarr", "lies inside --out {t}/r, where it keeps its .dparticles"),
    ("link/sub", "r", "--out {t}/link/sub lies inside --zarr {t}/r;"),
])
def test_outputs_of_one_run_never_consume_each_other(tmp_path, capsys, out, zarr, expected):
    """--out and --zarr that are one place, or one inside the other where it would be moved or
    removed with it, are refused before any work, whether named so or reached through a link: a
    run that reported success once had lost its stacks this way."""
    star, _ = simple_set(tmp_path / "p")
    (tmp_path / "link").symlink_to("r")
    before = snapshot(tmp_path)
    code, stdout, err = quiet_main(["restack", star, "--out", tmp_path / out, "--zarr", tmp_path / zarr,
                                    "--batch-size", "5"], capsys)
    assert code == 1 and expected.format(t=tmp_path) in err, err
    assert "Dask cluster" not in stdout + err  # refused before any work
    assert snapshot(tmp_path) == before


def test_a_cache_beside_the_stacks_and_one_per_size_in_the_same_folder_are_kept_whole(tmp_path, capsys):
    """What may share a folder does, and every file the metadata names is there afterwards."""
    star, images = simple_set(tmp_path / "p")
    out = tmp_path / "d"
    code, _, err = quiet_main(["downsample", star, "--out", out, "--zarr", out, "--fourier-box", "8", "16",
                               "--batch-size", "5"], capsys)
    assert code == 0, err
    for box in (8, 16):
        ds = open_particles(out / f"box{box}" / "particles.star")
        assert ds.sizes["x"] == box and ds.sizes["particle"] == len(images)
        cached = open_particles(out / f"box{box}.zarr")
        assert cached["images"].values.tobytes() == ds["images"].values.tobytes()


def test_overwrite_never_removes_links_an_input_needs(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p")
    imp = tmp_path / "imported"
    assert quiet_main(["import", star, "--out", imp], capsys)[0] == 0
    links = snapshot(imp / "stacks")
    assert all(kind == "link" for kind, *_ in links.values()) and len(links) == 2
    # the stacks the input names are the links in the folder to be overwritten
    code, _, err = quiet_main(["restack", imp, "--out", imp / "stacks", "--overwrite"], capsys)
    assert code == 1 and "is or holds an input" in err, err
    # an input reached through a link inside the folder: project2/Stacks -> imported/stacks
    other = tmp_path / "project2"
    other.mkdir()
    (other / "Stacks").symlink_to(imp / "stacks")
    names = [f"{i:06d}@Stacks/s{k}.mrcs" for k in range(2) for i in range(1, 7)]
    star2 = write_star(other / "particles.star", {"rlnImageName": names, "rlnImagePixelSize": [1.5] * 12})
    before = snapshot(imp)
    for command in (["restack", star2, "--out", imp, "--overwrite"], ["import", star2, "--out", imp, "--overwrite"]):
        code, _, err = quiet_main(command, capsys)
        assert code == 1 and "is or holds an input" in err and "reached through" in err, err
        assert str(imp / "stacks" / "s0.mrcs") in err
        assert snapshot(imp) == before
    # no input needs it: the same import replaces its own links
    assert quiet_main(["import", star, "--out", imp, "--overwrite"], capsys)[0] == 0
    assert star_images(imp / "particles.star").tobytes() == images.tobytes()
    assert star_images(star2).tobytes() == images.tobytes()


def test_out_link_to_an_earlier_output_is_followed_not_removed(tmp_path):
    star, images = simple_set(tmp_path / "p")
    real = tmp_path / "scratch" / "job1"
    assert main(["restack", str(star), "--out", str(real), "--batch-size", "5"]) == 0
    link = tmp_path / "job1"
    link.symlink_to(real, target_is_directory=True)
    done = cli(["restack", star, "--out", link, "--batch-size", "12", "--overwrite", "--n-workers", "1"])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "wrote 12 particles in 1 stack" in done.stdout, done.stdout
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in (real / "stacks").iterdir()) == ["batch_000000.mrcs"]
    assert star_images(real / "particles.star").tobytes() == images.tobytes()
    # a link to nothing is refused, and nothing is made where it points
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    last = one_line_error(cli(["restack", star, "--out", dangling, "--n-workers", "1"]))
    assert "symbolic link" in last and "does not exist" in last, last
    assert not (tmp_path / "missing").exists()


# --- 2. one run at a time ---------------------------------------------------------------------------

def test_a_second_run_is_refused_at_once_naming_the_first_and_kill_9_still_resumes(tmp_path):
    star = shuffled_set(tmp_path / "src", n_stacks=2, per_stack=1200, box=64)
    out = tmp_path / "out"
    args = ["restack", star, "--out", out, "--batch-size", "40", "--n-workers", "1", "--threads-per-worker", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    first = subprocess.Popen([sys.executable, "-m", "dparticles.cli", *map(str, args)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    stopped = False
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and first.poll() is None:
            try:  # mid-write: at least one batch complete and one being written under a temporary name
                names = os.listdir(out / "stacks")
            except FileNotFoundError:
                continue
            if any(n.endswith(".mrcs") and not n.startswith(".") for n in names) and \
                    any(TMP_MARK in n for n in names):
                os.killpg(first.pid, signal.SIGSTOP)  # the run and its workers, frozen holding the lock
                stopped = all_stopped(first.pid)
                break
        assert stopped, "the first run ended before it could be stopped mid-write; make the set larger"
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = snapshot(out)
        assert temporaries(out)
        for extra in ([], ["--overwrite"], ["--overwrite", "--batch-size", "7"]):
            t0 = time.monotonic()
            done = cli(args + extra)
            last = one_line_error(done)
            assert "another dparticles run is writing this output folder" in last, last
            assert f"pid {first.pid} on host {socket.gethostname()}, started " in last, last
            assert "Dask cluster" not in done.stdout and time.monotonic() - t0 < 30
            assert snapshot(out) == before  # its temporaries included: nothing of a live run is touched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert (out / LOCK).exists() and not (out / "particles.star").exists()
    kept = sorted(n for n in os.listdir(out / "stacks") if not n.startswith("."))
    done = cli(args)  # the kernel let the lock go with the process: the same command resumes
    assert done.returncode == 0, done.stderr
    assert f"({len(kept)} complete stacks kept from an earlier run)" in done.stdout, done.stdout
    assert not temporaries(out) and not (out / LOCK).exists()
    n = star_images(star).shape[0]
    assert sorted(os.listdir(out / "stacks")) == [f"batch_{k:06d}.mrcs" for k in range(-(-n // 40))]
    assert star_images(out / "particles.star").tobytes() == star_images(star).tobytes()


def all_stopped(pid: int, timeout: float = 10) -> bool:
    """Wait until ``pid`` and all its descendants are stopped (a write in progress ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            if all(p.status() == psutil.STATUS_STOPPED for p in procs):
                return True
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.01)
    return False


# --- 3. planted links and FIFOs -------------------------------------------------------------------

def test_atomic_write_never_follows_a_planted_link(tmp_path):
    target = tmp_path / "particles.star"
    victims = [tmp_path / "victim0", tmp_path / "victim1"]
    for v in victims:
        v.write_text("precious")
    target.symlink_to(victims[0])  # at the final name
    old_style = tmp_path / f"particles.star{TMP_MARK}-{socket.gethostname()}-{os.getpid()}"
    old_style.symlink_to(victims[1])  # at the temporary name an earlier version used
    seen = []

    def write(tmp: Path) -> None:
        st = os.stat(tmp.parent)
        seen.append((tmp, stat.S_IMODE(st.st_mode), st.st_uid))
        tmp.write_text("new")

    atomic_write(target, write)
    atomic_write(target, write)
    assert not target.is_symlink() and target.read_text() == "new"
    assert [v.read_text() for v in victims] == ["precious", "precious"]
    (a, mode, uid), (b, _, _) = seen
    assert a.parent != b.parent and a.parent.parent == tmp_path and TMP_MARK in a.parent.name
    assert mode == 0o700 and uid == os.geteuid()  # a folder of our own that nobody else may enter
    assert not a.parent.exists() and not b.parent.exists()


def test_zarr_temporaries_cannot_be_planted_and_a_live_ones_are_kept(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "zarr.json").write_text("{}")
    (victim / "data").write_text("precious")
    before = snapshot(victim)
    (tmp_path / f"c.zarr{TMP_MARK}").symlink_to(victim)  # the temporary name an earlier version used
    dead = tmp_path / f".c.zarr{TMP_MARK}-dead"
    live = tmp_path / f".c.zarr{TMP_MARK}-live"
    for d in (dead, live):
        d.mkdir()
        (d / "lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)", str(live / "lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert quiet_main(["restack", star, "--zarr", tmp_path / "c.zarr"], capsys)[0] == 0
        assert live.is_dir() and not dead.exists()  # a dead run's folder goes, a live run's stays
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(victim) == before
    from dparticles.dataset import open_particles
    assert open_particles(tmp_path / "c.zarr")["images"].values.tobytes() == images.tobytes()
    assert [p.name for p in tmp_path.iterdir() if TMP_MARK in p.name and p != live] == [f"c.zarr{TMP_MARK}"]
    # a link planted at the cache's name, to something that is not a cache: refused, left alone
    (tmp_path / "d.zarr").symlink_to(victim)
    code, _, err = quiet_main(["restack", star, "--zarr", tmp_path / "d.zarr", "--overwrite"], capsys)
    assert code == 1 and "is not a zarr cache" in err, err
    assert snapshot(victim) == before


def test_planted_fifos_and_links_in_a_resumable_output_are_removed_not_opened(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p")
    out = tmp_path / "out"
    args = ["restack", star, "--out", out, "--batch-size", "3"]
    assert quiet_main(args, capsys)[0] == 0
    good = {p.name: p.read_bytes() for p in (out / "stacks").iterdir()}
    assert len(good) == 4
    stacks, records = out / "stacks", out / ".dparticles"
    # batch 0: a link to a file elsewhere with exactly the right bytes (its record still matches)
    victim = tmp_path / "victim.mrcs"
    os.replace(stacks / "batch_000000.mrcs", victim)
    (stacks / "batch_000000.mrcs").symlink_to(victim)
    victim_before = snapshot(tmp_path)["victim.mrcs"]
    # batch 1: a FIFO where the stack is; batch 2: a FIFO where its record is
    (stacks / "batch_000001.mrcs").unlink()
    os.mkfifo(stacks / "batch_000001.mrcs")
    (records / "batch_000002.mrcs.json").unlink()
    os.mkfifo(records / "batch_000002.mrcs.json")
    # links at the final names of the metadata and of the run's record, and a FIFO at the run record
    for name in ("particles.star", "job.json", "note.txt", "report.html"):
        if os.path.lexists(out / name):
            os.unlink(out / name)
        (out / name).symlink_to(victim)
    done = cli(args + ["--n-workers", "1"], timeout=90)  # a FIFO opened would hang here
    assert done.returncode == 0, done.stderr
    assert re.search(r"\(1 complete stacks? kept from an earlier run\)", done.stdout), done.stdout
    for name, data in good.items():
        p = stacks / name
        assert stat.S_ISREG(os.lstat(p).st_mode) and p.read_bytes() == data, name
    assert stat.S_ISREG(os.lstat(records / "batch_000002.mrcs.json").st_mode)
    assert not [p.name for p in out.iterdir() if p.is_symlink()]
    assert snapshot(tmp_path)["victim.mrcs"] == victim_before
    assert star_images(out / "particles.star").tobytes() == images.tobytes()
    # a link planted at the lock file's name: refused, its target untouched
    (out / LOCK).symlink_to(victim)
    code, _, err = quiet_main(args, capsys)
    assert code == 1 and "lock file" in err and "symbolic link" in err, err
    assert snapshot(tmp_path)["victim.mrcs"] == victim_before


@pytest.mark.parametrize("what", ["fifo", "device", "metadata fifo"])
def test_input_that_is_not_a_regular_file_is_refused_at_open(tmp_path, what):
    star, _ = simple_set(tmp_path / "p")
    stack = tmp_path / "p" / "Extract" / "s1.mrcs"
    if what == "fifo":
        stack.unlink()
        os.mkfifo(stack)
    elif what == "device":
        stack.unlink()
        stack.symlink_to("/dev/zero")
    else:
        star = tmp_path / "fifo.star"
        os.mkfifo(star)
    done = cli(["restack", star, "--out", tmp_path / "out", "--n-workers", "1"], timeout=60)
    last = one_line_error(done)
    if what != "metadata fifo":
        assert "Extract/s1.mrcs" in last and "is not a file" in last, last
    assert not (tmp_path / "out").exists()


# --- 4. errors that end clean ----------------------------------------------------------------------

@pytest.fixture
def shared_tmp():
    """A folder another account may read (pytest's own is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="dparticles-adv-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def other_account() -> list[str]:
    need_root("running as another account")
    try:
        pwd.getpwnam(OTHER)
    except KeyError:
        pytest.skip(f"no {OTHER!r} account on this machine")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    prefix = ["setpriv", f"--reuid={OTHER}", "--regid=nogroup", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import dparticles.cli"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"{OTHER} cannot run this Python environment: {probe.stderr.decode()[-300:]}")
    return prefix


def test_a_folder_one_may_not_write_ends_in_one_line_and_creates_nothing(shared_tmp):
    prefix = other_account()
    star, _ = simple_set(shared_tmp / "p")
    for p in (shared_tmp / "p").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    ro = shared_tmp / "ro"  # root's: the other account may read it, not write in it
    ro.mkdir(mode=0o755)
    for command in (["restack", star, "--out", ro / "new" / "out", "--n-workers", "1"],
                    ["import", star, "--out", ro / "imported"],
                    ["restack", star, "--zarr", ro / "c.zarr", "--n-workers", "1"]):
        done = cli(command, prefix=prefix, cwd=shared_tmp)
        last = one_line_error(done, command[0])
        assert "ermission denied" in last, last
        assert os.listdir(ro) == [], os.listdir(ro)


def test_a_full_disk_ends_in_one_line_and_leaves_nothing(tmp_path):
    need_root("mounting a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        star = shuffled_set(tmp_path / "src", n_stacks=2, per_stack=100, box=64)  # 6 MB of images
        # the cache does not fit: the workers' write fails
        last = one_line_error(cli(["restack", star, "--zarr", mnt / "c.zarr", "--n-workers", "1"]))
        assert "No space left on device" in last, last
        assert os.listdir(mnt) == []  # no cache, no temporary
        # a disk already full: the output folder is not even left behind
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        last = one_line_error(cli(["restack", star, "--out", mnt / "out", "--n-workers", "1"]))
        assert "No space left on device" in last, last
        assert os.listdir(mnt) == ["filler"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- 5. resume that cannot be fooled ---------------------------------------------------------------

def headers(out: Path) -> set[float]:
    sizes = set()
    for p in sorted((out / "stacks").iterdir()):
        with mrcfile.open(p, header_only=True, permissive=True) as mrc:
            sizes.add(round(float(mrc.voxel_size.x), 4))
    return sizes


def star_tables(out: Path) -> tuple:
    t = starfile.read(out / "particles.star", always_dict=True)
    return t["optics"], t["particles"]


def test_a_rerun_with_other_options_never_keeps_stale_files(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p", pixel_sizes=(1.5,))
    out = tmp_path / "out"
    args = ["restack", star, "--out", out, "--batch-size", "5"]
    assert quiet_main(args, capsys)[0] == 0
    assert headers(out) == {1.5}
    stacks = {p.name: p.read_bytes()[HEADER_BYTES:] for p in (out / "stacks").iterdir()}
    # a new pixel size changes the stack headers: not a resume, refused without --overwrite
    before = snapshot(out)
    code, _, err = quiet_main(args + ["--pixel-size", "2"], capsys)
    assert code == 1 and "--overwrite" in err and snapshot(out) == before
    code, stdout, _ = quiet_main(args + ["--pixel-size", "2", "--overwrite"], capsys)
    assert code == 0 and "kept" not in stdout
    assert headers(out) == {2.0} and set(star_tables(out)[0]["rlnImagePixelSize"]) == {2.0}
    # metadata-only options resume: the stacks are kept (same pixels, same headers), the metadata new
    code, stdout, _ = quiet_main(args + ["--pixel-size", "2", "--voltage", "200"], capsys)
    assert code == 0 and "(3 complete stacks kept from an earlier run)" in stdout, stdout
    optics, particles = star_tables(out)
    assert set(optics["rlnVoltage"]) == {200.0} and set(optics["rlnImagePixelSize"]) == {2.0}
    code, stdout, _ = quiet_main(args + ["--pixel-size", "2", "--sign", "-1"], capsys)
    assert code == 0 and "(3 complete stacks kept from an earlier run)" in stdout, stdout
    optics, particles = star_tables(out)
    assert set(optics["rlnVoltage"]) == {300.0} and set(particles["dparticlesDataSign"]) == {-1.0}
    assert headers(out) == {2.0}
    assert {p.name: p.read_bytes()[HEADER_BYTES:] for p in (out / "stacks").iterdir()} == stacks
    assert star_images(out / "particles.star").tobytes() == images.tobytes()
    # import: every option is in its token; another one is refused, then replaced with --overwrite
    imp = tmp_path / "imported"
    assert quiet_main(["import", star, "--out", imp], capsys)[0] == 0
    before = snapshot(imp)
    code, _, err = quiet_main(["import", star, "--out", imp, "--voltage", "200"], capsys)
    assert code == 1 and "--overwrite" in err and snapshot(imp) == before
    assert quiet_main(["import", star, "--out", imp, "--voltage", "200", "--overwrite"], capsys)[0] == 0
    assert set(star_tables(imp)[0]["rlnVoltage"]) == {200.0}
    np.testing.assert_array_equal(read_direct(imp / "stacks" / "s0.mrcs"), images[:6])


# --- 6. a damaged zarr cache ------------------------------------------------------------------------

def test_a_corrupt_or_missing_zarr_chunk_ends_in_one_line(tmp_path, capsys):
    star, images = simple_set(tmp_path / "p")  # 12 particles: cache chunks of 5, 5 and 2
    cache = tmp_path / "c.zarr"
    assert quiet_main(["restack", star, "--zarr", cache, "--batch-size", "5"], capsys)[0] == 0
    chunk = cache / "images" / "c" / "1" / "0" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(os.urandom(len(good)))
    for command in (["restack", cache, "--out", tmp_path / "r", "--n-workers", "1"],
                    ["downsample", cache, "--out", tmp_path / "d", "--fourier-box", "8", "--n-workers", "1"]):
        last = one_line_error(cli(command), command[0])
        assert f"{chunk}: zarr chunk c/1/0/0 is corrupt" in last, last
        assert "expected particles 6 to 10 of the cache: 5 images of 16x16 float32" in last, last
        assert not command[3].exists()
    chunk.unlink()  # zarr alone would read a missing chunk as NaN images
    code, _, err = quiet_main(["restack", cache, "--out", tmp_path / "r"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("dparticles restack: error: "), err
    assert "zarr chunk c/1/0/0 is missing; expected particles 6 to 10" in last, last
    chunk.write_bytes(good)
    assert quiet_main(["restack", cache, "--out", tmp_path / "r"], capsys)[0] == 0
    assert star_images(tmp_path / "r" / "particles.star").tobytes() == images.tobytes()
