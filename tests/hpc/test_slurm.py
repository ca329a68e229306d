"""Real dparticles jobs on SLURM: the `dparticles restack` command inside an allocation made by
deploy/sbatch-restack.sh, restack and downsample on dask-jobqueue SLURMCluster worker jobs (also as
commands run from a project directory with relative paths), and a worker job cancelled (pre-empted)
mid-job. Each output is compared byte for byte with the same job
run on an embedded local cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobdata import TMP_MARK, Killer, assert_same_output, shuffled_set
from test_remote import assert_same_relative, command, reference_project, run_cli

import dparticles

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
RESTACK = {"batch_size": 6}
DOWNSAMPLE = {"fourier_box": [128, 64], "lowpass": 8.0, "recenter": True, "micrograph_pixel_size": 1.2, "batch_size": 8}


@pytest.fixture(scope="module")
def local(slurm_available, tmp_path_factory):
    """Inputs (on a path the SLURM jobs see too: one machine) and their outputs from an embedded
    2-worker LocalCluster, made before any SLURM client is active."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    small = shuffled_set(root / "small", n_stacks=8, per_stack=400, box=48, seed=1)     # 480 batches
    big = shuffled_set(root / "big", n_stacks=6, per_stack=170, box=256, seed=2)        # 115 batches, 2 sizes
    log: list[str] = []
    dparticles.restack(small, root / "ref-restack", cluster={"n_workers": 2}, log=log.append, **RESTACK)
    dparticles.downsample(big, root / "ref-downsample", cluster={"n_workers": 2}, log=log.append, **DOWNSAMPLE)
    assert sum("Started an in-process Dask cluster: 2 workers" in m for m in log) == 2, log
    return {"small": small, "big": big, "ref-restack": root / "ref-restack", "ref-downsample": root / "ref-downsample"}


def wait_for_job(job: str, timeout: float = 300) -> str:
    """Poll until the SLURM job has ended; its final `scontrol show job` line."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        if not any(s in state for s in ("JobState=PENDING", "JobState=RUNNING", "JobState=COMPLETING")):
            break
        time.sleep(0.5)
    return state


def test_sbatch_restack_script_runs_the_real_command_in_an_allocation(local, tmp_path):
    """deploy/sbatch-restack.sh: scheduler and 2 `srun` workers in one allocation, then the
    installed `dparticles restack ... --scheduler-file` command; output as a local run's.
    First in this file: it needs both CPUs, before the SLURMCluster's worker jobs take them."""
    bindir = Path(sys.executable).parent
    command = bindir / "dparticles"                      # the console script of this environment
    assert command.is_file(), f"{command} missing: install the package (pip install -e .)"
    env = dict(os.environ, DPARTICLES=str(command), DASK_INTERFACE="lo", PATH=f"{bindir}:{os.environ['PATH']}",
               TMPDIR=str(tmp_path), PYTHONWARNINGS="ignore")
    out = tmp_path / "out"
    submit = tmp_path / "submit"     # the job's project directory: out lies outside it, as the reference's does
    submit.mkdir()
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=1G",
                          f"--output={tmp_path}/job-%j.log", str(REPO / "deploy" / "sbatch-restack.sh"),
                          str(local["small"]), str(out), "--batch-size", str(RESTACK["batch_size"])],
                         cwd=submit, env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    state = wait_for_job(job)
    log = (tmp_path / f"job-{job}.log").read_text() if (tmp_path / f"job-{job}.log").exists() else ""
    assert "JobState=COMPLETED" in state, f"{state}\n{log}"
    assert "Connected to Dask scheduler tcp://127.0.0.1:" in log, log
    # tasks are pieces of the data, not one per output file: count the files written instead
    assert "wrote 2880 particles in 480 stacks" in log and "on 2 workers" in log, log
    assert_same_output(out, local["ref-restack"])


@pytest.mark.parametrize("job", ["restack", "downsample"])
def test_jobs_on_slurm_worker_jobs_write_what_a_local_run_writes(job, local, slurm_client, n_jobs, tmp_path):
    workers = slurm_client.scheduler_info()["workers"]
    assert len(workers) == n_jobs and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    job_ids = slurm_client.run(os.getenv, "SLURM_JOB_ID")
    assert all(job_ids.values()) and len(set(job_ids.values())) == n_jobs, job_ids   # one SLURM job each
    out, log = tmp_path / "out", []
    cluster = {"scheduler": slurm_client.scheduler.address}
    if job == "restack":
        result = dparticles.restack(local["small"], out, cluster=cluster, log=log.append, **RESTACK)
    else:
        result = dparticles.downsample(local["big"], out, cluster=cluster, log=log.append, **DOWNSAMPLE)[0]
    assert any(f"Connected to Dask scheduler {slurm_client.scheduler.address}" in m for m in log), log
    assert result.summary.n_workers == n_jobs and result.summary.peak_worker_memory_bytes > 10**7
    assert_same_output(out, local[f"ref-{job}"])


@pytest.mark.parametrize("job", ["restack", "downsample"])
def test_relative_paths_from_a_project_directory_on_slurm_worker_jobs(job, slurm_client, n_jobs, tmp_path_factory):
    """`cd project && dparticles JOB ... --out out-slurm/JOB --zarr ... --data-dir raw/... --scheduler ADDR`
    while the worker jobs run in a folder of their own: the outputs land in the project, as an embedded
    run's (tests/test_remote.py), and nothing in the jobs' folder."""
    project = reference_project(tmp_path_factory)
    cwds = set(slurm_client.run(os.getcwd).values())
    assert len(cwds) == 1 and str(project) not in cwds and not any(os.listdir(c) for c in cwds), cwds
    out = f"out-slurm/{job}"
    run = run_cli(project, [*command(job, out), "--scheduler", slurm_client.scheduler.address])
    assert f"Connected to Dask scheduler {slurm_client.scheduler.address}" in run.stderr, run.stderr
    assert f"on {n_jobs} workers" in run.stderr, run.stderr
    assert_same_relative(project, out, f"ref/{job}")
    assert not any(os.listdir(c) for c in cwds), cwds


def test_scancel_of_a_worker_job_mid_downsample(local, slurm_cluster, slurm_client, n_jobs, tmp_path):
    """Cancel one worker's SLURM job while it writes a batch of a real downsample: the job finishes on
    the other worker, byte for byte as a local run, and adapt() replaces the cancelled job."""
    by_name = {name: j.job_id for name, j in slurm_cluster.workers.items() if getattr(j, "job_id", None)}
    assert len(by_name) == n_jobs, by_name
    pids = slurm_client.run(os.getpid)
    infos = slurm_client.scheduler_info()["workers"]
    victim_addr = sorted(pids)[0]
    victim_job, victim_pid = by_name[infos[victim_addr]["name"]], pids[victim_addr]
    assert slurm_client.run(os.getenv, "SLURM_JOB_ID", workers=[victim_addr])[victim_addr] == victim_job

    def busy() -> bool:
        ws = slurm_cluster.scheduler.workers.get(victim_addr)
        return bool(ws is not None and ws.processing)

    out = tmp_path / "out"
    dirs, n_files = [out / "box128", out / "box64"], 2 * 115
    # temporary names carry the run's nonce, not the writer's pid: the kill comes while the victim is
    # busy once a tenth of the files are done (Killer's n_files // 3 threshold set to that tenth)
    min_done = n_files // 10
    killer = Killer(dirs, victim_pid, 3 * min_done, busy=busy, min_done=min_done,
                    kill=lambda: subprocess.run(["scancel", victim_job], capture_output=True, text=True))
    killer.start()
    log: list[str] = []
    try:
        results = dparticles.downsample(local["big"], out, log=log.append, **DOWNSAMPLE)   # the active client
    finally:
        killer.stop.set()
        killer.join()
    assert any("Using the active Dask client" in m for m in log), log
    assert killer.done_before is not None, "the job finished before a worker job could be cancelled"
    assert killer.result.returncode == 0, killer.result.stderr
    print(f"scancel {victim_job} after {killer.done_before}/{n_files} batch files, "
          f"{'while its worker wrote a batch' if killer.during_write else 'while its worker ran a task'}; "
          f"{results[0].summary}")
    assert results[0].n_particles == 6 * 170 * 9 // 10
    assert_same_output(out, local["ref-downsample"])
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]
    # adapt() submits a replacement job for the cancelled one
    slurm_client.wait_for_workers(n_jobs, timeout=180)
    new_ids = {j.job_id for j in slurm_cluster.workers.values() if getattr(j, "job_id", None)}
    assert victim_job not in new_ids and len(new_ids) == n_jobs
