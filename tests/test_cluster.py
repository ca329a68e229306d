"""Choosing and starting the cluster (:func:`dparticles.cluster.cluster_client`) and the config tiers, on
real LocalClusters (in-process, worker processes, sockets, TLS): the embedded cluster, a scheduler by
address or file and its bounded probe, the active client, argument checks.

Task functions are builtins (``operator.add``) so that spawned workers unpickle them without
importing this file.
"""

from __future__ import annotations

import operator
import os
import socket
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlparse
from urllib.request import urlopen

import dask
import psutil
import pytest
import yaml
from distributed import Client, LocalCluster

from dparticles import cli, config
from dparticles import cluster as cluster_module
from dparticles.cluster import cluster_client
from dparticles.dashboard import dashboard_address
from dparticles.errors import ParticleError
from dparticles.progress import watch

REPO = Path(__file__).resolve().parents[1]


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


def test_the_in_process_dashboard_binds_its_port_at_once_and_shows_its_pages_after_a_second():
    """A small job does not pay for bokeh (about 0.4 s): the port is bound when the cluster starts
    (its health page answers), the dashboard's pages are added to it after the first second."""
    with dask.config.set({"dparticles.cluster.dashboard-address": "127.0.0.1:0"}), \
            cluster_client(n_workers=1, log=lambda m: None) as client:
        link = client.dashboard_link
        assert urlopen(link.replace("/status", "/health"), timeout=10).read() == b"ok"
        with pytest.raises(HTTPError):
            urlopen(link, timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                page = urlopen(link, timeout=10).read().decode()
                break
            except HTTPError:
                assert time.monotonic() < deadline, "the dashboard never came"
                time.sleep(0.2)
        assert "bokeh" in page.lower()


def test_explicit_address_and_scheduler_file_are_used_and_left_running(shared_cluster):
    cluster, sfile = shared_cluster
    for kwargs in ({"scheduler": cluster.scheduler_address}, {"scheduler_file": sfile}):
        log: list[str] = []
        with cluster_client(**kwargs, log=log.append) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.cluster is None                     # connected, nothing started
            results, _ = watch(client, client.map(operator.add, [1, 3], [2, 4]), label="add", log=log.append)
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
        assert dashboard_address("127.0.0.1") == f"127.0.0.1:{free}"


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
            results, _ = watch(client, client.map(operator.add, [1, 5], [2, 5]), label="tls", log=lambda m: None)
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
