"""run_tasks on SLURM worker jobs, including a worker job cancelled mid-run (pre-emption)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dparticles.cluster import cluster_client, run_tasks

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

N = 20_000_000                                   # sum(range(i, i + N)): about 0.2-0.4 s per task


def expected(i: int) -> int:
    return N * i + N * (N - 1) // 2


def test_sbatch_restack_script_in_an_allocation(tmp_path, slurm_available):
    """deploy/sbatch-restack.sh starts a scheduler and srun workers in its allocation, and the
    job command reaches them through the scheduler file (`dparticles` replaced by a stand-in).
    First in this file: it needs free CPUs before the session's SLURMCluster takes them."""
    repo = Path(__file__).resolve().parents[2]
    fake = tmp_path / "dparticles"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name('fake_dparticles.py')} \"$@\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, DPARTICLES=str(fake), DASK_INTERFACE="lo",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    sub = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--mem-per-cpu=1G",
                          f"--output={tmp_path}/job-%j.log", str(repo / "deploy" / "sbatch-restack.sh"),
                          "particles.star", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        if not any(s in state for s in ("JobState=PENDING", "JobState=RUNNING", "JobState=COMPLETING")):
            break
        time.sleep(0.5)
    log = (tmp_path / f"job-{job}.log").read_text() if (tmp_path / f"job-{job}.log").exists() else ""
    assert "JobState=COMPLETED" in state, f"{state}\n{log}"
    result = json.loads((out / "result.json").read_text())
    assert result["argv"][:4] == ["restack", "particles.star", "--out", str(out)]
    assert result["n_workers"] == 2
    assert result["results"] == [1000 * i + 1000 * 999 // 2 for i in range(8)]


def test_run_tasks_on_slurm_workers(slurm_client, n_jobs):
    workers = slurm_client.scheduler_info()["workers"]
    assert len(workers) == n_jobs and all(a.startswith("tcp://127.0.0.1:") for a in workers)
    with cluster_client(scheduler=slurm_client.scheduler.address, log=lambda m: None) as client:
        results, summary = run_tasks(client, sum, [(range(i, i + N),) for i in range(6)], label="slurm-sum",
                                     log=lambda m: None)
    assert results == [expected(i) for i in range(6)]
    assert summary.n_workers == n_jobs and summary.peak_worker_memory_bytes > 10**7


def test_scancel_of_a_worker_job_mid_run(slurm_cluster, slurm_client, n_jobs):
    """Cancel one worker's SLURM job while tasks run: all results still arrive, the job is replaced."""
    job_ids = sorted(j.job_id for j in slurm_cluster.workers.values() if getattr(j, "job_id", None))
    assert len(job_ids) == n_jobs, job_ids
    victim = job_ids[0]
    cancelled: dict[str, object] = {}

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = sum(ts.state == "memory" for ts in slurm_cluster.scheduler.tasks.values()
                       if str(ts.key).startswith("preempt-"))
            if done >= 2:
                cancelled["done_before"] = done
                cancelled["scancel"] = subprocess.run(["scancel", victim], capture_output=True, text=True)
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    args = [(range(i, i + N),) for i in range(20)]
    results, summary = run_tasks(slurm_client, sum, args, label="preempt", log=lambda m: None)
    canceller.join()
    assert cancelled.get("scancel") is not None and cancelled["scancel"].returncode == 0, cancelled
    assert cancelled["done_before"] < len(args)
    assert results == [expected(i) for i in range(20)]
    assert summary.n_tasks == 20
    # adapt() submits a replacement job for the cancelled one
    slurm_client.wait_for_workers(n_jobs, timeout=180)
    new_ids = {j.job_id for j in slurm_cluster.workers.values() if getattr(j, "job_id", None)}
    assert victim not in new_ids and len(new_ids) == n_jobs

