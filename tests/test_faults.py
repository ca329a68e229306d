"""Real jobs under faults and on different clusters: a worker process SIGKILLed while it writes a
batch of a real restack or downsample, and the output is still byte for byte that of an undisturbed
run; and the output is the same whichever cluster ran the job (embedded LocalCluster, a scheduler
reached by address or scheduler file, the active client, one worker)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest
from distributed import Client, LocalCluster
from helpers import simple_set
from jobdata import TMP_MARK, Killer, assert_same_output, shuffled_set

import dparticles

pytestmark = pytest.mark.timeout(300)

# restack: many small batches (byte copies, fsync each); downsample: fewer, slower ones (box 256,
# two Fourier crops with lowpass and recentring in one pass), two output folders
RESTACK = {"batch_size": 6}
DOWNSAMPLE = {"fourier_box": [128, 64], "lowpass": 8.0, "recenter": True, "micrograph_pixel_size": 1.2, "batch_size": 8}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The two inputs and their outputs from an undisturbed run on an embedded 2-worker LocalCluster."""
    root = tmp_path_factory.mktemp("faults")
    small = shuffled_set(root / "small", n_stacks=8, per_stack=400, box=48, seed=1)     # 2880 particles
    big = shuffled_set(root / "big", n_stacks=6, per_stack=170, box=256, seed=2)        # 918 particles
    log: list[str] = []
    rs = dparticles.restack(small, root / "ref-restack", cluster={"n_workers": 2}, log=log.append, **RESTACK)
    ds = dparticles.downsample(big, root / "ref-downsample", cluster={"n_workers": 2}, log=log.append, **DOWNSAMPLE)
    assert sum("Started an in-process Dask cluster: 2 workers" in m for m in log) == 2, log
    assert rs.n_files == 480 and [r.n_files for r in ds] == [115, 115]
    return {"small": small, "big": big, "root": root, "ref-restack": root / "ref-restack",
            "ref-downsample": root / "ref-downsample"}


def run(job: str, sets: dict, out: Path, **kw):
    if job == "restack":
        return dparticles.restack(sets["small"], out, **RESTACK, **kw)
    return dparticles.downsample(sets["big"], out, **DOWNSAMPLE, **kw)


def outputs(job: str, out: Path) -> list[Path]:
    return [out] if job == "restack" else [out / "box128", out / "box64"]


@pytest.mark.parametrize("job", ["restack", "downsample"])
def test_sigkill_of_a_worker_mid_job_gives_the_undisturbed_output(job, sets, tmp_path):
    """SIGKILL one worker process of the job's cluster while it writes a batch: the scheduler runs its
    tasks again on the other worker (and on the one the nanny restarts), and the output folder is
    byte for byte that of an undisturbed run, with no temporary file left behind."""
    out = tmp_path / "out"
    n_files = 480 if job == "restack" else 2 * 115
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        ours = {c.pid for c in psutil.Process().children(recursive=True)}
        assert len(pids) == 2 and set(pids.values()) <= ours           # only ever signal our own children
        victim_addr, victim_pid = sorted(pids.items())[0]

        def busy() -> bool:
            ws = cluster.scheduler.workers.get(victim_addr)
            return bool(ws is not None and ws.processing)

        killer = Killer(outputs(job, out), victim_pid, n_files, lambda: os.kill(victim_pid, signal.SIGKILL), busy,
                        min_done=n_files // 10)
        killer.start()
        log: list[str] = []
        try:
            result = run(job, sets, out, log=log.append)            # the active client: this cluster
        finally:
            killer.stop.set()
            killer.join()
        assert any("Using the active Dask client" in m for m in log), log
        assert killer.done_before is not None, "the job finished before a worker could be killed; make it bigger"
        assert killer.done_before < n_files
        assert not psutil.pid_exists(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
        summary = (result if job == "restack" else result[0]).summary
        assert summary.n_tasks >= 8  # tasks are pieces of the data, whatever the number of files
        client.wait_for_workers(2, timeout=60)                         # the nanny brought it back
        assert victim_pid not in client.run(os.getpid).values()
        print(f"{job}: killed worker {victim_pid} after {killer.done_before}/{n_files} batch files, "
              f"{'while it wrote a batch' if killer.during_write else 'while it ran a task'}; {summary}")
    assert_same_output(out, sets[f"ref-{job}"])
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]


@pytest.mark.parametrize("job", ["restack", "downsample"])
def test_output_is_the_same_whichever_cluster_ran_it(job, sets, tmp_path):
    """Reference: an embedded 2-worker LocalCluster. Then: a running scheduler by address and by
    scheduler file, the active client, and an embedded cluster of one worker."""
    ref = sets[f"ref-{job}"]
    sfile = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", scheduler_kwargs={"scheduler_file": str(sfile)}) as cluster:
        for name, cluster_kw, expect in [("address", {"scheduler": cluster.scheduler_address}, "Connected to Dask"),
                                         ("file", {"scheduler_file": str(sfile)}, "Connected to Dask")]:
            log: list[str] = []
            run(job, sets, tmp_path / name, cluster=cluster_kw, log=log.append)
            assert any(expect in m for m in log), log
            assert_same_output(tmp_path / name, ref)
        with Client(cluster):
            log = []
            run(job, sets, tmp_path / "active", log=log.append)
            assert any("Using the active Dask client" in m for m in log), log
            assert_same_output(tmp_path / "active", ref)
        assert cluster.status.name == "running"                        # a scheduler we were given is left running
    for processes, started in ((False, "an in-process Dask cluster"), (True, "a local Dask cluster")):
        log = []
        run(job, sets, tmp_path / f"one-{processes}", cluster={"n_workers": 1, "processes": processes},
            log=log.append)
        assert any(f"Started {started}: 1 worker x" in m for m in log), log
        assert_same_output(tmp_path / f"one-{processes}", ref)


def _hungry(block, bytes_needed: int, from_particle: int, block_info=None):
    """The block as it is, unless it holds particle ``from_particle`` (0-based) or later: then first
    ask for ``bytes_needed`` of memory and touch it, as a kernel on too large a chunk would."""
    if block_info[0]["array-location"][0][1] > from_particle:
        np.ones(bytes_needed, dtype=np.uint8)
    return block


@pytest.mark.parametrize("how", ["MemoryError", "killed by its nanny"])
def test_a_task_that_runs_out_of_memory_ends_the_run_in_one_line(tmp_path, how):
    """A task that asks for more memory than there is (numpy's MemoryError), or whose worker the
    nanny kills at its memory limit, ends the run with one ParticleError naming the particles of
    that task and what to change, not a traceback; and nothing is left that claims success."""
    star, _ = simple_set(tmp_path / "p", n_stacks=2, per_stack=6)
    ds = dparticles.open_particles(star, chunks=6)
    need = 2**50 if how == "MemoryError" else 2**30  # 1 PiB cannot be had; 1 GiB is over the 400 MB limit
    ds = ds.assign(images=(("particle", "y", "x"), ds["images"].data.map_blocks(
        _hungry, need, 6, dtype=ds["images"].dtype)))
    # a worker that dies fails every task it held; dask retries them, so the culprit is the one
    # that keeps killing it (each retry costs a worker restart, about a second)
    with dask.config.set({"distributed.scheduler.allowed-failures": 2}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", memory_limit="400MB",
                         dashboard_address="127.0.0.1:0") as cluster, Client(cluster):
        with pytest.raises(dparticles.ParticleError) as err:
            dparticles.to_stacks(ds, tmp_path / "out", batch_size=4, log=lambda m: None)
    message = str(err.value)
    # a MemoryError is the failed task's own; a dead worker fails every task it held, and dask blames
    # whichever of them went over the retries first, which may be the other chunk
    assert re.search("the task of particles 7 to 12" if how == "MemoryError" else
                     "the task of particles (1 to 6|7 to 12)", message), message
    assert ("ran out of memory" if how == "MemoryError" else "killed its worker") in message, message
    assert "--memory-limit" in message and "dparticles.memory-budget" in message, message
    assert not (tmp_path / "out" / "particles.star").exists()
