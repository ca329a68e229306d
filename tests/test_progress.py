"""Watching a run's tasks (:func:`dparticles.progress.watch`) on real LocalClusters: results in order,
progress lines in a log, the summary (:class:`~dparticles.progress.RunSummary`) and the workers' own
peak memory, a task's error, a worker SIGKILLed mid-run.

Task functions are builtins (``sum`` over a ``range``, ``operator.truediv``) so that spawned
workers unpickle them without importing this file; ``sum(range(i, i + N))`` is a task whose
run time grows with N and whose result is known: ``N * i + N * (N - 1) // 2``.
"""

from __future__ import annotations

import operator
import os
import re
import signal
import threading
import time

import dask
import numpy as np
import psutil
import pytest
from distributed import Client, LocalCluster

from dparticles import progress
from dparticles.cluster import cluster_client
from dparticles.progress import RunSummary, reset_worker_peaks, watch


def expected_sum(i: int, n: int) -> int:
    return n * i + n * (n - 1) // 2


@pytest.fixture(scope="module")
def two_workers():
    """A LocalCluster of 2 single-threaded worker processes on 127.0.0.1."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


# --- watch ------------------------------------------------------------------------------------

def test_watch_gives_results_in_order_with_summary_and_progress_lines(two_workers):
    n = 3_000_000
    args = [range(i, i + n * (1 + i % 3)) for i in range(16)]         # uneven task lengths
    log: list[str] = []
    pytest.importorskip("ipykernel")  # imported here, as by a notebook test: that is not a notebook
    with Client(two_workers) as client, dask.config.set({"dparticles.progress-interval": 0.1}):
        # pure=False: run them now, whatever an earlier test left on the cluster under the same keys
        results, summary = watch(client, client.map(sum, args, pure=False), label="sums", log=log.append,
                                 nbytes=10**9)
        assert results == [expected_sum(i, n * (1 + i % 3)) for i in range(16)]
        assert isinstance(summary, RunSummary) and summary.n_tasks == 16 and summary.n_workers == 2
        assert summary.seconds > 0 and summary.peak_worker_memory_bytes > 10**7
        assert summary.sampled_peak_rss_bytes > 10**7
        assert str(summary) == log[-1] and str(summary).startswith("sums: 16 tasks in ")
        # not a TTY: a line at each further tenth done, with rate and time left, not a bar
        lines = log[:-1]
        assert 1 <= len(lines) <= 10 and all(re.fullmatch(r"sums: \d+% \(\d+/16 tasks\) in \d+ s, [\d.]+ [KMG]iB/s, "
                                                         r"about \d+ s left", m) for m in lines), lines
        steps = [int(m.split()[1].rstrip("%")) // 10 for m in lines]
        assert steps == sorted(set(steps)), lines
        # the same tasks again: the same results
        again, _ = watch(client, client.map(sum, args), label="sums", log=lambda m: None)
        assert again == results
        empty, s0 = watch(client, [], label="none", log=lambda m: None)
        assert empty == [] and s0.n_tasks == 0


def test_watch_raises_task_error_and_cancels_the_rest(two_workers):
    with Client(two_workers) as client:
        futures = client.map(operator.truediv, [1, 1, 2], [1, 0, 1])
        with pytest.raises(ZeroDivisionError):
            watch(client, futures, label="div", log=lambda m: None)
        assert all(f.status == "cancelled" for f in futures), [f.status for f in futures]


@pytest.mark.timeout(180)
def test_worker_memory_is_the_workers_own_not_the_parents():
    """Spawned workers inherit the parent's ru_maxrss; the summary must report what the workers used."""
    big = np.ones(2 * 2**30 // 8)                      # 2 GiB, touched, held while the cluster starts
    assert psutil.Process().memory_info().rss > 2 * 2**30
    log: list[str] = []
    with cluster_client(n_workers=2, threads_per_worker=1, processes=True, log=log.append) as client:
        reset_worker_peaks(client)                          # before submitting, as a job does
        futures = client.map(sum, [range(i, i + 1000) for i in range(8)])
        results, summary = watch(client, futures, label="small", log=log.append, peaks_reset=True)
    assert results == [expected_sum(i, 1000) for i in range(8)]
    assert 5 * 2**20 < summary.peak_worker_memory_bytes < 512 * 2**20, summary
    assert not summary.peak_worker_memory_sampled
    assert "of memory per worker" in str(summary) and "ru_maxrss" not in str(summary)
    del big


def test_worker_memory_falls_back_to_the_sampled_rss_without_proc(monkeypatch):
    """Where workers cannot read their peak (no /proc), the summary gives the sampled RSS and says so."""
    monkeypatch.setattr(progress, "_peak_memory_bytes", lambda: None)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:                   # in-process worker: it runs the patched reader
        _, summary = watch(client, [client.submit(operator.add, 1, 2)], label="fallback", log=lambda m: None)
    assert summary.peak_worker_memory_sampled
    assert summary.peak_worker_memory_bytes == summary.sampled_peak_rss_bytes > 10**7
    assert str(summary).endswith("(sampled).")


def test_run_summary_text():
    s = RunSummary("x", 4, 2.0, 2, 223 * 2**20, 100 * 2**20)
    assert str(s) == "x: 4 tasks in 2.0 s on 2 workers; at most 223.00 MiB of memory per worker."
    fallback = RunSummary("x", 1, 2.0, 1, 100 * 2**20, 100 * 2**20, 2**30, peak_worker_memory_sampled=True)
    assert str(fallback) == ("x: 1 task in 2.0 s on 1 worker, 1.00 GiB written (512.00 MiB/s); "
                             "at most 100.00 MiB of memory per worker (sampled).")


@pytest.mark.timeout(180)
def test_watch_survives_sigkill_of_a_worker():
    """SIGKILL one worker process mid-run: its tasks run again elsewhere, all results arrive."""
    n = 20_000_000                                        # about 0.2-0.4 s per task
    args = [range(i, i + n) for i in range(24)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        ours = {c.pid for c in psutil.Process().children(recursive=True)}
        assert set(pids.values()) <= ours                 # only ever signal our own children
        victim_addr, victim_pid = sorted(pids.items())[0]
        killed: dict[str, int] = {}

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tasks = cluster.scheduler.tasks.values()
                n_done = sum(ts.state == "memory" for ts in tasks if ts.key.startswith("kill-"))
                if n_done >= 3 and cluster.scheduler.workers.get(victim_addr) and \
                        cluster.scheduler.workers[victim_addr].processing:
                    killed["done_before"] = n_done
                    os.kill(victim_pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        results, summary = watch(client, client.map(sum, args, key="kill"), label="kill", log=lambda m: None)
        killer.join()
        assert "done_before" in killed and killed["done_before"] < len(args), killed
        assert not psutil.pid_exists(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
        assert results == [expected_sum(i, n) for i in range(24)]
        assert summary.n_tasks == 24
