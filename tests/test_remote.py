"""Jobs run from a project directory with relative paths while the workers run somewhere else.

A real ``dask scheduler`` and a ``dask worker`` are started as processes, the worker in another
directory. The ``dparticles restack`` and ``downsample`` commands then run from the project
directory with a relative ``--out``, ``--zarr`` and ``--data-dir`` against that scheduler
(``--scheduler`` and ``--scheduler-file``), and their outputs are compared with those of the same
commands on an embedded cluster. tests/hpc/test_slurm.py runs the same commands on SLURM worker jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from helpers import simple_set
from jobdata import TMP_MARK, shuffled_set, tree

pytestmark = pytest.mark.timeout(300)

RECORDS = ("job.json", "note.txt", "report.html")   # when and how it ran: differ between runs

# the jobs compared, as command lines run from the project directory (output folders added by command())
COMMANDS = {
    "restack": ["restack", "Select/job010/particles.star", "--data-dir", "raw/a", "--batch-size", "10"],
    "downsample": ["downsample", "Select/job011/particles.star", "--data-dir", "raw/b", "--fourier-box", "12",
                   "--lowpass", "6", "--recenter", "--micrograph-pixel-size", "1.5", "--batch-size", "5"],
}


def make_project(root: Path) -> Path:
    """A project directory whose STAR files name stacks that only ``--data-dir`` finds:
    ``Select/job010`` (a shuffled set, 3 x 40 images of 32 px, under ``raw/a``) and ``Select/job011``
    (2 x 6 images of 16 px under ``raw/b``)."""
    project = root / "project"
    star_a = shuffled_set(project / "raw" / "a", n_stacks=3, per_stack=40, box=32, seed=3)
    star_b, _ = simple_set(project / "raw" / "b", seed=4)
    for star, job in ((star_a, "job010"), (star_b, "job011")):
        (project / "Select" / job).mkdir(parents=True)
        shutil.move(star, project / "Select" / job / "particles.star")
    return project


def command(name: str, out: str) -> list[str]:
    """The CLI arguments of job ``name`` writing to the relative folder ``out`` and ``out.zarr``."""
    return [*COMMANDS[name], "--out", out, "--zarr", f"{out}.zarr"]


def run_cli(project: Path, args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m dparticles.cli ARGS`` in ``project``; fails the test with its output unless it succeeds."""
    env = dict(os.environ if env is None else env, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "dparticles.cli", *args], cwd=project, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(args)}\n{run.stdout}\n{run.stderr}"
    return run


def _text_without(data: bytes, project: Path, folder: str) -> str:
    """A text file with the output folder's path (absolute, then relative to the project) as OUT."""
    text = data.decode()
    return text.replace(str(project / folder), "OUT").replace(folder, "OUT")


def assert_same_relative(project: Path, got: str, want: str) -> None:
    """Folders ``got`` and ``want`` (relative to ``project``) and their ``.zarr`` caches hold the same
    files: stack images bit for bit (read with mrcfile) and every other file byte for byte, but for
    particles.star and zarr metadata, which are compared as text with each folder's path replaced,
    and the run records (times differ). No temporary file is left."""
    for suffix in ("", ".zarr"):
        a, b = tree(project / (got + suffix)), tree(project / (want + suffix))
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
        stacks = [k for k in b if k.endswith(".mrcs")]
        assert suffix or stacks
        for k in stacks:
            with mrcfile.open(project / (got + suffix) / k, permissive=True) as m, \
                    mrcfile.open(project / (want + suffix) / k, permissive=True) as n:
                assert m.data.dtype == n.data.dtype and m.data.shape == n.data.shape, k
                assert m.data.tobytes() == n.data.tobytes(), k
        for k in b:
            name = k.rsplit("/", 1)[-1]
            if a[k] == b[k] or name in RECORDS:
                continue
            assert name in ("particles.star", "zarr.json", ".zattrs", ".zarray"), f"{got + suffix}/{k} differs"
            assert _text_without(a[k], project, got + suffix) == _text_without(b[k], project, want + suffix), k
        assert not [k for k in a if TMP_MARK in k]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A ``dask scheduler`` on 127.0.0.1 (scheduler file in tmp) and one ``dask worker`` process with
    two threads, started in a directory of its own; stopped (by their pids) after the module."""
    root = tmp_path_factory.mktemp("external")
    workdir, sfile = root / "worker-cwd", root / "scheduler.json"
    workdir.mkdir()
    port = _free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        logs.append(open(root / "scheduler.log", "w"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--scheduler-file", str(sfile), "--dashboard-address", "127.0.0.1:0"],
            cwd=root, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not (sfile.is_file() and sfile.stat().st_size) and time.monotonic() < deadline:
            assert procs[0].poll() is None, (root / "scheduler.log").read_text()
            time.sleep(0.1)
        address = json.loads(sfile.read_text())["address"]
        logs.append(open(root / "worker.log", "w"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "2", "--no-nanny",
             "--local-directory", str(root / "worker-scratch")],
            cwd=workdir, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        from distributed import Client

        with Client(address, set_as_default=False, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            assert set(client.run(os.getcwd).values()) == {str(workdir)}
        yield {"address": address, "scheduler_file": sfile, "workdir": workdir}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


_REFERENCE: dict[str, Path] = {}


def reference_project(tmp_path_factory) -> Path:
    """The project directory with, in ``ref/NAME``, the outputs of each command on an embedded cluster;
    made once per test session (tests/hpc compares its SLURM runs with the same outputs). Every test
    writes into folders of its own beside ``ref/``."""
    if "project" not in _REFERENCE:
        project = make_project(tmp_path_factory.mktemp("relative"))
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        runs = {name: subprocess.Popen([sys.executable, "-m", "dparticles.cli", *command(name, f"ref/{name}"),
                                        "--n-workers", "1"], cwd=project, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for name in COMMANDS}                                       # both at once: mostly start-up
        for name, proc in runs.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0 and "Dask cluster" in err, f"{name}\n{out}\n{err}"
        _REFERENCE["project"] = project
    return _REFERENCE["project"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return reference_project(tmp_path_factory)


@pytest.mark.parametrize("name,how", [("restack", "scheduler"), ("downsample", "scheduler"),
                                      ("restack", "scheduler-file")])
def test_relative_paths_with_a_worker_in_another_directory(name, how, project, external):
    out = f"out-{how}/{name}"
    where = (["--scheduler", external["address"]] if how == "scheduler" else
             ["--scheduler-file", os.path.relpath(external["scheduler_file"], project)])   # relative too
    run = run_cli(project, [*command(name, out), *where])
    assert f"Connected to Dask scheduler {external['address']}" in run.stderr, run.stderr
    assert "on 1 worker" in run.stderr, run.stderr
    assert_same_relative(project, out, f"ref/{name}")
    # nothing was written where the worker runs, and the outputs name their stacks relative to the project
    assert list(external["workdir"].iterdir()) == []
    star = (project / out / "particles.star").read_text()
    assert f" {out}/stacks/batch_000000.mrcs" in star.replace("@", " ")
    import dparticles

    cache = dparticles.open_particles(project / f"{out}.zarr")
    stacks = dparticles.open_particles(project / out / "particles.star")
    np.testing.assert_array_equal(cache.images.values, stacks.images.values)
