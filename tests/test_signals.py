"""Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and SIGTERM (a batch system's
time limit) stop a run with one line, leave no temporaries and no processes, and the same command
then finishes the job with the same output as an undisturbed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobdata import TMP_MARK, assert_same_output, shuffled_set


def _cli(args: list, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "dparticles", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **kw)


@pytest.mark.parametrize("mode", ["in-process", "processes"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_in_one_line_and_the_rerun_finishes(tmp_path, sig, mode):
    star = shuffled_set(tmp_path / "src", n_stacks=12, per_stack=200, box=128)
    args = ["downsample", star, "--fourier-box", "64", "--batch-size", "40", "--n-workers", "2",
            *(["--processes"] if mode == "processes" else [])]
    proc = _cli(args + ["--out", tmp_path / "out"])
    stacks, deadline = tmp_path / "out" / "stacks", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not \
            (stacks.is_dir() and any(p.suffix == ".mrcs" for p in stacks.iterdir())):
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run ended before it could be interrupted")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does: the whole process group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "dparticles downsample: interrupted; rerun the same command to finish"
    assert len(lines) <= 3 and "Traceback" not in err, err  # no worker tracebacks
    assert not [p for p in (tmp_path / "out").rglob("*") if TMP_MARK in p.name]
    assert not (tmp_path / "out" / "particles.star").exists()
    done = subprocess.run([sys.executable, "-m", "dparticles", *map(str, args + ["--out", tmp_path / "out"])],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run([sys.executable, "-m", "dparticles", *map(str, args + ["--out", tmp_path / "ref"])],
                         capture_output=True, text=True, timeout=180)
    assert ref.returncode == 0, ref.stderr
    assert_same_output(Path(tmp_path / "out"), Path(tmp_path / "ref"))


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """``dparticles info ... | head``: once the reader has closed the pipe, the command stops with
    141, as a shell reports a program killed by SIGPIPE, and prints no error."""
    star = shuffled_set(tmp_path / "src", n_stacks=2, per_stack=5, box=16)
    proc = subprocess.Popen([sys.executable, "-m", "dparticles", "info", "--json", str(star)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    proc.stdout.close()  # the reader went away before anything was written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""
