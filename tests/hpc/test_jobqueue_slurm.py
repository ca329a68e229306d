"""dparticles submitting its own worker jobs (``--jobqueue slurm --jobs N``).

On the one-node SLURM cluster (tests marked ``slurm``): jobs that can never start are reported
pending with SLURM's reason and given up in one line, their jobs cancelled; a request SLURM refuses
fails at once in one line; a request that fits runs a restack from a project directory with relative
paths, as an embedded cluster does. This file runs before test_slurm.py, whose worker jobs hold every
CPU of the node. The rest (argument checks, queue output parsing) needs no SLURM: tests/test_jobqueue.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_remote import COMMANDS, assert_same_relative, command, reference_project

from dparticles.cluster import cluster_client
from dparticles.errors import ParticleError

REPO = Path(__file__).resolve().parents[2]


def squeue_jobs(name: str) -> list[str]:
    """``JOBID STATE`` of every job named ``name`` that ``squeue`` lists."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def wait_until_gone(name: str, timeout: float = 30) -> list[str]:
    """Poll ``squeue`` until no job named ``name`` is listed (a cancelled job passes through
    COMPLETING); what is still listed then."""
    deadline = time.monotonic() + timeout
    while (left := squeue_jobs(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def jobqueue_env(tmp_path, name: str, **profile: str) -> dict[str, str]:
    """Environment for a ``dparticles`` command: the jobqueue.slurm profile (partition debug, loopback,
    job name ``name``, logs and scratch in tmp, this Python) updated with ``profile``, and a pending
    report every second."""
    settings = {"queue": "debug", "interface": "lo", "walltime": "00:10:00", "name": name,
                "log-directory": str(tmp_path / "logs"), "local-directory": str(tmp_path / "scratch"),
                "python": sys.executable, **profile}
    env = {f"DASK_JOBQUEUE__SLURM__{k.upper().replace('-', '_')}": v for k, v in settings.items()}
    return dict(os.environ, PYTHONWARNINGS="ignore", DASK_DPARTICLES__CLUSTER__PENDING_REPORT="1s", **env)


def dparticles(project, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m dparticles.cli ARGS`` in ``project``; the result and the seconds it took."""
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "dparticles.cli", *args], cwd=project, env=env,
                         capture_output=True, text=True, timeout=240)
    return run, time.monotonic() - t0


@pytest.fixture(scope="module")
def project(slurm_available, tmp_path_factory):
    return reference_project(tmp_path_factory)


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_jobs_that_cannot_start_are_reported_pending_then_given_up_in_one_line(project, tmp_path):
    """4 cores per job on a node with fewer: SLURM keeps the jobs pending (PartitionConfig) for ever.
    The command says so within the report interval, stops after start-timeout with one line, and
    leaves no job in the queue."""
    name = "dp-too-many-cores"
    env = jobqueue_env(tmp_path, name, cores="4", memory="2GB")
    env["DASK_DPARTICLES__CLUSTER__START_TIMEOUT"] = "4s"
    run, seconds = dparticles(project, [*command("restack", "out-too-big/restack"), "--jobqueue", "slurm",
                                        "--jobs", "2"], env)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    reports = [line for line in lines if line.startswith("Waiting for Dask workers")]
    assert reports and reports[0].startswith("Waiting for Dask workers after 1 s: 2 jobs pending (PartitionConfig: "
                                             "each asks for 4 cores, 2 GB, walltime 00:10:00, more than"), run.stderr
    assert not [line for line in lines if "Traceback" in line or "Error" in line], run.stderr
    assert [line for line in lines if "error" in line] == [lines[-1]], run.stderr    # one line, the last
    assert lines[-1].startswith("dparticles restack: error: no worker job started within 4 s: 2 jobs pending "
                                "(PartitionConfig: each asks for 4 cores, 2 GB"), lines[-1]
    assert lines[-1].endswith("; the jobs were cancelled"), lines[-1]
    assert seconds < 40, seconds
    assert wait_until_gone(name) == []
    print(f"{seconds:.1f} s: {lines[-1]}")


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_a_request_slurm_refuses_fails_at_once_in_one_line(slurm_available, tmp_path):
    """More memory than the node has: sbatch refuses the job outright; that is the error, at once."""
    name = "dp-too-much-memory"
    log: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(ParticleError) as err:
        with cluster_client(jobqueue="slurm", jobs=2, cores=1, memory="100TB", queue="debug", interface="lo",
                            job_name=name, log_directory=str(tmp_path / "logs"), python=sys.executable,
                            log=log.append):
            pass
    seconds = time.monotonic() - t0
    message = str(err.value)
    assert "\n" not in message and seconds < 20, (seconds, message)
    assert message.startswith("could not submit the SLURM worker jobs (1 core, 100000 GB, walltime"), message
    assert "sbatch: error: Memory specification can not be satisfied" in message, message
    assert squeue_jobs(name) == []
    print(f"{seconds:.1f} s: {message}")


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_jobs_that_end_before_a_worker_connects_fail_at_the_next_report(slurm_available, tmp_path):
    """A job script that cannot start a worker (a broken prologue): the jobs leave the queue, and the
    next report says so in one line, pointing at the jobs' output, instead of waiting for the timeout."""
    import dask

    log: list[str] = []
    t0 = time.monotonic()
    with dask.config.set({"dparticles.cluster.pending-report": "1s"}), pytest.raises(ParticleError) as err:
        with cluster_client(jobqueue="slurm", jobs=2, queue="debug", interface="lo", job_name="dp-broken",
                            job_script_prologue=["exit 3"], log_directory=str(tmp_path / "logs"),
                            python=sys.executable, log=log.append):
            pass
    seconds = time.monotonic() - t0
    message = str(err.value)    # "2 jobs no longer in the queue", or "completing" if squeue is quick
    assert message.startswith("the SLURM worker jobs ended before a Dask worker connected: 2 jobs "), (message, log)
    assert message.endswith(f"; see the jobs' output in {tmp_path / 'logs'}"), message
    assert seconds < 30, seconds


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_fitting_request_starts_and_runs_a_restack_with_relative_paths(project, tmp_path):
    """One 1-core job of ``memory-budget`` (the profile's default sizing): its worker connects and the
    restack, run from the project directory with relative paths, writes what an embedded run writes;
    the job is cancelled at the end."""
    name = "dp-fits"
    env = jobqueue_env(tmp_path, name)
    for key in ("CORES", "MEMORY", "PROCESSES"):                 # unset: dparticles sizes the job
        env.pop(f"DASK_JOBQUEUE__SLURM__{key}", None)
    out = "out-jobqueue/restack"
    run, seconds = dparticles(project, [*command("restack", out), "--jobqueue", "slurm", "--jobs", "1"], env)
    assert run.returncode == 0, run.stderr
    assert "Submitting 1 SLURM worker job (1 core, 2 GB, walltime 00:10:00 each)" in run.stderr, run.stderr
    assert "Dask workers up: 1 of 1 connected" in run.stderr, run.stderr
    assert "restack: 15 tasks in" in run.stderr and "on 1 worker" in run.stderr, run.stderr
    assert_same_relative(project, out, "ref/restack")
    assert wait_until_gone(name) == []
    print(f"{seconds:.1f} s in all")


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_sbatch_script_in_jobqueue_mode_submits_worker_jobs_from_its_job(project, tmp_path):
    """deploy/sbatch-restack.sh with MODE=jobqueue: a 1-core batch job runs `dparticles restack
    --jobqueue slurm --jobs 1` (relative paths, submitted from the project directory), which submits
    its worker job from inside the batch job and cancels it at the end."""
    name = "dp-sbatch-jq"
    bindir = Path(sys.executable).parent
    env = dict(jobqueue_env(tmp_path, name), MODE="jobqueue", WORKER_JOBS="1", DASK_INTERFACE="lo",
               DPARTICLES=str(bindir / "dparticles"), PATH=f"{bindir}:{os.environ['PATH']}")
    out = "out-sbatch-jobqueue/restack"
    t0 = time.monotonic()
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks=1", "--cpus-per-task=1", "--mem-per-cpu=1G",
                          f"--output={tmp_path}/job-%j.log", str(REPO / "deploy" / "sbatch-restack.sh"),
                          COMMANDS["restack"][1], out, *COMMANDS["restack"][2:], "--zarr", f"{out}.zarr"],
                         cwd=project, env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    while squeue_jobs_by_id(job) and time.monotonic() - t0 < 180:
        time.sleep(0.5)
    log = (tmp_path / f"job-{job}.log").read_text()
    assert "Submitting 1 SLURM worker job" in log and "Dask workers up: 1 of 1 connected" in log, log
    assert "wrote 108 particles in 11 stacks" in log, log
    assert_same_relative(project, out, "ref/restack")
    assert wait_until_gone(name) == []
    print(f"{time.monotonic() - t0:.1f} s in all")


def squeue_jobs_by_id(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True, timeout=20)
    return out.stdout.splitlines()
