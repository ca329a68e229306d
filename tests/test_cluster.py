"""Cluster layer and config tiers, on real LocalClusters (worker processes, sockets, TLS, SIGKILL).

Task functions are builtins (``sum`` over a ``range``, ``operator.truediv``) so that spawned
workers unpickle them without importing this file; ``sum(range(i, i + N))`` is a task whose
run time grows with N and whose result is known: ``N * i + N * (N - 1) // 2``.
"""

from __future__ import annotations

import operator
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import dask
import numpy as np
import psutil
import pytest
import yaml
from distributed import Client, LocalCluster

from dparticles import cli, config
from dparticles import cluster as cluster_module
from dparticles.cluster import RunSummary, cluster_client, run_tasks
from dparticles.errors import ParticleError

REPO = Path(__file__).resolve().parents[1]


def expected_sum(i: int, n: int) -> int:
    return n * i + n * (n - 1) // 2


def listening_hosts(proc: psutil.Process) -> set[str]:
    """IP addresses on which a process has listening TCP sockets."""
    return {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def listening_ports(proc: psutil.Process) -> set[int]:
    """TCP ports on which a process listens."""
    return {c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A 2-worker LocalCluster on 127.0.0.1 that writes a scheduler file, as an HPC scheduler would."""
    sfile = tmp_path_factory.mktemp("sched") / "scheduler.json"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", scheduler_kwargs={"scheduler_file": str(sfile)}) as cluster:
        yield cluster, str(sfile)


# --- config tiers ---------------------------------------------------------------------------

def test_config_tiers_keyword_beats_dask_config_beats_packaged_default():
    packaged = yaml.safe_load(config.DEFAULTS_FILE.read_text())["dparticles"]
    assert config.get("batch-size") == packaged["batch-size"]
    assert config.get("zarr.codec") == packaged["zarr"]["codec"]
    assert config.get("batch_size") == packaged["batch-size"]          # - and _ are the same key
    with dask.config.set({"dparticles.batch-size": 123, "dparticles.zarr.level": 9}):
        assert config.get("batch-size") == 123
        assert config.get("batch-size", 7) == 7
        assert config.get("zarr.level") == 9
        assert config.get("zarr.codec") == packaged["zarr"]["codec"]   # siblings keep their defaults
    assert config.get("batch-size") == packaged["batch-size"]
    with pytest.raises(KeyError, match="batch-size"):
        config.get("no-such-key")


def test_a_setting_made_before_the_package_is_imported_leaves_the_defaults_in_place():
    """``dask.config.set`` restores the config it found on exit, which the defaults merged inside
    the block were not part of: a script's next job must still find them."""
    code = ("import dask.config\n"
            "with dask.config.set({'dparticles.batch-size': 7}):\n"
            "    from dparticles import config\n"
            "    assert config.get('batch-size') == 7\n"
            "print(config.get('batch-size'), config.get('cluster.threads_per_worker'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    packaged = yaml.safe_load(config.DEFAULTS_FILE.read_text())["dparticles"]
    assert done.stdout.split() == [str(packaged["batch-size"]), str(packaged["cluster"]["threads-per-worker"])], \
        done.stderr


def test_deploy_site_config_only_uses_known_keys():
    """deploy/dparticles.yaml must not carry typos that would be silently ignored."""
    site = yaml.safe_load((REPO / "deploy" / "dparticles.yaml").read_text())
    assert set(config._keys(site["dparticles"])) <= set(config._keys(config.DEFAULTS["dparticles"]))


def test_deploy_jobqueue_profiles_make_job_scripts():
    """The dask-jobqueue profiles in deploy/ load and render a job script for their scheduler."""
    jq = pytest.importorskip("dask_jobqueue")
    for name, job_cls, directive in [("slurm", jq.slurm.SLURMJob, "#SBATCH"), ("pbs", jq.pbs.PBSJob, "#PBS")]:
        profile = yaml.safe_load((REPO / "deploy" / f"jobqueue-{name}.yaml").read_text())["jobqueue"][name]
        with dask.config.set({f"jobqueue.{name}.{k}": v for k, v in profile.items()}):   # merged as a site file is
            script = job_cls(scheduler="tcp://127.0.0.1:8786", name="w", python="python").job_script()
        assert directive in script and "distributed.cli.dask_worker" in script


# --- cluster_client --------------------------------------------------------------------------

@pytest.mark.parametrize("processes", [False, True])
def test_embedded_cluster_listens_on_loopback_only_and_is_closed(processes):
    """In-process (the default): scheduler and workers talk inproc://, in this process, and only
    HTTP servers listen, on loopback. Processes: TLS on loopback with credentials of the run."""
    messages: list[str] = []
    before = listening_ports(psutil.Process())
    with dask.config.set({"dparticles.cluster.dashboard-address": ":0"}):     # port only: host is added
        with cluster_client(n_workers=1, threads_per_worker=1, processes=processes, log=messages.append) as client:
            cluster = client.cluster
            scheme = "tls://127.0.0.1:" if processes else "inproc://"  # per-run credentials, or no network
            assert client.scheduler.address.startswith(scheme)
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 1 and all(a.startswith(scheme) for a in workers)
            link = urlparse(client.dashboard_link)
            assert link.hostname == "127.0.0.1" and link.port
            assert any(client.dashboard_link in m for m in messages), messages
            assert ("in-process" in messages[0]) != processes, messages
            # every listening socket, of the scheduler (this process) and of the worker processes
            pids = set(client.run(os.getpid).values())
            assert (pids == {os.getpid()}) != processes, pids
            procs = [psutil.Process()] + [psutil.Process(p) for p in pids - {os.getpid()}]
            hosts = set().union(*(listening_hosts(p) for p in procs))
            assert hosts == {"127.0.0.1"}, hosts
            ports = listening_ports(psutil.Process()) - before
            if not processes:  # the dashboard and the worker's HTTP server (health, metrics), nothing else
                assert len(ports) == 2 and link.port in ports, ports
    assert client.status == "closed" and cluster.status.name == "closed"
    assert not listening_ports(psutil.Process()) - before


def test_explicit_address_and_scheduler_file_are_used_and_left_running(shared_cluster):
    cluster, sfile = shared_cluster
    for kwargs in ({"scheduler": cluster.scheduler_address}, {"scheduler_file": sfile}):
        log: list[str] = []
        with cluster_client(**kwargs, log=log.append) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.cluster is None                     # connected, nothing started
            results, _ = run_tasks(client, operator.add, [(1, 2), (3, 4)], label="add", log=log.append)
            assert results == [3, 7]
        assert client.status == "closed"
        assert cluster.status.name == "running"
        assert "Connected to Dask scheduler" in log[0]


def test_active_client_is_reused_and_not_closed(shared_cluster):
    cluster, _ = shared_cluster
    with Client(cluster) as active:
        with cluster_client(log=lambda m: None) as client:
            assert client is active
        assert active.status == "running"
        assert active.submit(operator.mul, 6, 7).result() == 42


def test_a_worker_address_is_not_taken_for_a_scheduler(shared_cluster):
    cluster, _ = shared_cluster
    worker = next(iter(cluster.scheduler_info["workers"]))
    with pytest.raises(ParticleError, match="is a Dask Worker, not a scheduler"):
        with cluster_client(scheduler=worker, log=lambda m: None):
            pass


def test_missing_scheduler_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParticleError, match="scheduler file not found"):
        with cluster_client(scheduler_file=str(tmp_path / "nope.json")):
            pass


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.timeout(60)
def test_scheduler_that_does_not_answer_fails_within_the_timeout(silent_port, tmp_path):
    """A closed port and a port that accepts and stays silent: one-line error after the timeout, not a hang."""
    sfile = tmp_path / "scheduler.json"
    sfile.write_text(f'{{"address": "tcp://127.0.0.1:{silent_port}", "type": "Scheduler"}}')
    cases = [({"scheduler": f"tcp://127.0.0.1:{closed_port()}"}, "connection refused"),
             ({"scheduler": f"tcp://127.0.0.1:{silent_port}"}, "nothing answered"),
             ({"scheduler_file": str(sfile)}, "nothing answered")]
    with dask.config.set({"dparticles.cluster.connect-timeout": "1s"}):                # config tier
        for kwargs, why in cases:
            t0 = time.monotonic()
            with pytest.raises(ParticleError) as err:
                with cluster_client(**kwargs, log=lambda m: None):
                    pass
            elapsed = time.monotonic() - t0
            msg = str(err.value)
            assert "\n" not in msg and msg.startswith("could not reach the Dask scheduler at tcp://127.0.0.1:")
            assert "within 1 s" in msg and why in msg and msg.endswith("is it running?"), msg
            assert 0.5 < elapsed < 3.5, (kwargs, elapsed)
        t0 = time.monotonic()                                                           # keyword beats config
        with pytest.raises(ParticleError, match="within 0.3 s"):
            with cluster_client(f"tcp://127.0.0.1:{silent_port}", connect_timeout=0.3, log=lambda m: None):
                pass
        assert time.monotonic() - t0 < 2.5


def test_cli_prints_one_line_for_an_unreachable_scheduler(particle_set, tmp_path, capsys):
    star, _ = particle_set
    with dask.config.set({"dparticles.cluster.connect-timeout": "0.5s"}):
        rc = cli.main(["restack", str(star), "--out", str(tmp_path / "out"),
                       "--scheduler", f"tcp://127.0.0.1:{closed_port()}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "could not reach the Dask scheduler" in err, err


@pytest.mark.parametrize("kwargs, match", [
    ({"n_workers": 0}, "n_workers must be a whole number of at least 1, got 0"),
    ({"threads_per_worker": 0}, "threads_per_worker must be a whole number of at least 1, got 0"),
    ({"threads_per_worker": -2}, "threads_per_worker"),
    ({"memory_limit": "lots"}, "memory_limit must be \"auto\" or a size such as 4GB, got 'lots'"),
    ({"memory_limit": "-1GB"}, "memory_limit"),
    ({"connect_timeout": "soon", "scheduler": "tcp://127.0.0.1:1"}, "connect timeout must be a positive duration"),
])
def test_bad_cluster_arguments_fail_before_anything_starts(kwargs, match):
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    with pytest.raises(ParticleError, match=match) as err:
        with cluster_client(**kwargs, log=lambda m: None):
            pass
    assert "\n" not in str(err.value)
    assert time.monotonic() - t0 < 1.0
    assert {c.pid for c in psutil.Process().children(recursive=True)} <= before   # no worker was started


def test_bad_cluster_setting_in_dask_config_is_caught_too():
    with dask.config.set({"dparticles.cluster.n-workers": 0}):
        with pytest.raises(ParticleError, match="dparticles.cluster.n-workers"):
            with cluster_client(log=lambda m: None):
                pass
    for ok in ("auto", "AUTO", "2GB", 2 * 10**9, 0.5, 0):                    # what distributed accepts (0: no limit)
        assert cluster_module._cluster_settings(1, 1, ok)[2] == ("auto" if str(ok).lower() == "auto" else ok)


def test_busy_dashboard_port_is_replaced_by_a_free_one_without_warning():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        log: list[str] = []
        with dask.config.set({"dparticles.cluster.dashboard-address": f"127.0.0.1:{port}"}), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cluster_client(n_workers=1, log=log.append) as client:
                link = urlparse(client.dashboard_link)
                assert link.hostname == "127.0.0.1" and link.port and link.port != port
                assert any(client.dashboard_link in m for m in log), log
        assert not [w for w in caught if "already in use" in str(w.message)], [str(w.message) for w in caught]
    # a free configured port is used as it is
    free = closed_port()
    with dask.config.set({"dparticles.cluster.dashboard-address": f":{free}"}):
        assert cluster_module._dashboard_address("127.0.0.1") == f"127.0.0.1:{free}"


# --- run_tasks --------------------------------------------------------------------------------

def test_run_tasks_results_in_order_with_summary_and_progress_lines(shared_cluster):
    cluster, _ = shared_cluster
    n = 3_000_000
    args = [(range(i, i + n * (1 + i % 3)),) for i in range(16)]      # uneven task lengths
    log: list[str] = []
    with Client(cluster) as client, dask.config.set({"dparticles.progress-interval": 0.1}):
        results, summary = run_tasks(client, sum, args, label="sums", log=log.append, nbytes=10**9)
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
        # deterministic keys: the same call again finds the same tasks
        again, _ = run_tasks(client, sum, args, label="sums", log=lambda m: None)
        assert again == results
        empty, s0 = run_tasks(client, sum, [], label="none", log=lambda m: None)
        assert empty == [] and s0.n_tasks == 0


def test_run_tasks_raises_task_error_and_cancels_the_rest(shared_cluster):
    cluster, _ = shared_cluster
    with Client(cluster) as client:
        with pytest.raises(ZeroDivisionError):
            run_tasks(client, operator.truediv, [(1, 1), (1, 0), (2, 1)], label="div", log=lambda m: None)
        with pytest.raises(ValueError, match="same length"):
            run_tasks(client, operator.add, [(1, 2), (1,)], label="bad", log=lambda m: None)


@pytest.mark.timeout(180)
def test_worker_memory_is_the_workers_own_not_the_parents():
    """Spawned workers inherit the parent's ru_maxrss; the summary must report what the workers used."""
    big = np.ones(2 * 2**30 // 8)                      # 2 GiB, touched, held while the cluster starts
    assert psutil.Process().memory_info().rss > 2 * 2**30
    log: list[str] = []
    with cluster_client(n_workers=2, threads_per_worker=1, processes=True, log=log.append) as client:
        results, summary = run_tasks(client, sum, [(range(i, i + 1000),) for i in range(8)], label="small",
                                     log=log.append)
    assert results == [expected_sum(i, 1000) for i in range(8)]
    assert 5 * 2**20 < summary.peak_worker_memory_bytes < 512 * 2**20, summary
    assert not summary.peak_worker_memory_sampled
    assert "of memory per worker" in str(summary) and "ru_maxrss" not in str(summary)
    del big


def test_worker_memory_falls_back_to_the_sampled_rss_without_proc(monkeypatch):
    """Where workers cannot read their peak (no /proc), the summary gives the sampled RSS and says so."""
    monkeypatch.setattr(cluster_module, "_peak_memory_bytes", lambda: None)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:                   # in-process worker: it runs the patched reader
        _, summary = run_tasks(client, operator.add, [(1, 2)], label="fallback", log=lambda m: None)
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
def test_run_tasks_survives_sigkill_of_a_worker():
    """SIGKILL one worker process mid-run: its tasks run again elsewhere, all results arrive."""
    n = 20_000_000                                        # about 0.2-0.4 s per task
    args = [(range(i, i + n),) for i in range(24)]
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
        results, summary = run_tasks(client, sum, args, label="kill", log=lambda m: None)
        killer.join()
        assert "done_before" in killed and killed["done_before"] < len(args), killed
        assert not psutil.pid_exists(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
        assert results == [expected_sum(i, n) for i in range(24)]
        assert summary.n_tasks == 24


# --- TLS --------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_tls_scheduler_needs_the_security_object():
    pytest.importorskip("cryptography")
    from distributed.security import Security

    sec = Security.temporary()                            # self-signed CA + cert, in memory
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", security=sec) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tls://127.0.0.1:")
        with cluster_client(scheduler=addr, security=sec, log=lambda m: None) as client:
            results, _ = run_tasks(client, operator.add, [(1, 2), (5, 5)], label="tls", log=lambda m: None)
            assert results == [3, 10]
        with pytest.raises(ParticleError, match="speaks TLS: give its credentials"):   # no security
            with cluster_client(scheduler=addr, log=lambda m: None):
                pass
        with pytest.raises(OSError):                                  # plain TCP to a TLS listener
            Client(addr.replace("tls://", "tcp://"), timeout=5)
        # TLS without a client certificate: the scheduler refuses the handshake
        host, port = addr.removeprefix("tls://").rsplit(":", 1)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with pytest.raises(ssl.SSLError, match="CERTIFICATE"):
                with ctx.wrap_socket(raw) as tls:
                    tls.recv(1)
