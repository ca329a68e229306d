"""The embedded cluster on a shared host: another local account must not get in.

A second, unprivileged account (``nobody``) runs a small script against a live embedded
cluster: plain ``distributed.Client`` over tcp:// and tls:// (no credentials, or a certificate
of its own), raw connections to the scheduler, nannies and workers, and a look at every
process's command line for key material. As a control, the same script against a LocalCluster
without TLS gets in and runs code as this process's user, so the harness does detect an open
cluster. Needs root (to switch to ``nobody``) and a Python the other account can execute with
this environment's packages; skips saying which is missing.
"""

from __future__ import annotations

import json
import operator
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from urllib.parse import urlparse

import dask
import psutil
import pytest
from distributed import LocalCluster

from dparticles.cluster import cluster_client
from dparticles.progress import watch

OTHER_USER = "nobody"

# Runs as the other account: argv = [--plain-only] scheduler address, then worker and nanny addresses.
# Prints one JSON list of attempts: {"name", "ok", "detail"}. --plain-only tries plain tcp:// alone.
ATTACK = r'''
import asyncio, json, os, socket, ssl, sys
from distributed import Client
from distributed.comm import connect
from distributed.security import Security

plain_only = sys.argv[1] == "--plain-only"
scheduler, *others = sys.argv[2:] if plain_only else sys.argv[1:]
results = []

def attempt(name, fn):
    try:
        results.append({"name": name, "ok": True, "detail": repr(fn())})
    except BaseException as exc:
        results.append({"name": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]})

def client(address, **kwargs):
    with Client(address, timeout=5, set_as_default=False, **kwargs) as c:
        return c.run_on_scheduler(os.getuid)           # code run as the cluster's user

def identity(address, security):
    async def go():
        args = security.get_connection_args("client") if security else {}
        comm = await connect(address, timeout=5, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()
    return asyncio.run(asyncio.wait_for(go(), 10))

def raw_tls_without_client_certificate(address):
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"\0" * 8)
        data = tls.recv(1)
        if not data:
            raise ConnectionError("closed by the server")
        return data

def key_material_in_command_lines():
    found, marker = [], b"-----BEGIN " + b"PRIVATE KEY-----"    # split: not in this script's own command line
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read() and int(pid) != os.getpid():
                    found.append(pid)
        except OSError:
            pass
    if found:
        return found
    raise LookupError("no private key in any readable command line")

where = scheduler.split("://", 1)[1]
attempt("whoami", os.getuid)
attempt("Client tcp://", lambda: client("tcp://" + where))
if plain_only:
    print(json.dumps(results))
    sys.exit(0)
attempt("Client tls:// without credentials", lambda: client("tls://" + where))
attempt("Client tls:// with its own temporary certificate", lambda: client("tls://" + where, security=Security.temporary()))
for address in [scheduler] + others:
    host_port = address.split("://", 1)[1]
    attempt(f"identity over tcp:// at {host_port}", lambda: identity("tcp://" + host_port, None))
    attempt(f"identity over tls:// with its own certificate at {host_port}",
            lambda: identity("tls://" + host_port, Security.temporary()))
    attempt(f"TLS without a client certificate at {host_port}", lambda: raw_tls_without_client_certificate(address))
attempt("key material in /proc/*/cmdline", key_material_in_command_lines)
print(json.dumps(results))
'''


def _switch_user() -> list[str] | None:
    """Command prefix that runs a program as OTHER_USER with no supplementary groups."""
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid", OTHER_USER, "--regid", str(pwd.getpwnam(OTHER_USER).pw_gid), "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", OTHER_USER, "--"]
    return None


def _python_for_other_user(prefix: list[str], env: dict[str, str]) -> list[str] | None:
    """An interpreter OTHER_USER can execute that imports this environment's distributed.

    A virtualenv's interpreter often lives under root's home (0700): then a system Python of
    the same version is tried with the environment's site-packages on PYTHONPATH.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), shutil.which(f"python{version}"), f"/usr/bin/python{version}"]
    for python in dict.fromkeys(c for c in candidates if c):
        probe = subprocess.run([*prefix, python, "-c", "import distributed, cryptography"], env=env,
                               capture_output=True, timeout=120, cwd="/")
        if probe.returncode == 0:
            return [python]
    return None


@pytest.fixture(scope="module")
def as_other_user():
    """``run(argv) -> list of attempts``, running the attack script as OTHER_USER."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to run a second, unprivileged account ({OTHER_USER}) against the cluster")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.skip(f"no {OTHER_USER!r} account on this machine")
    prefix = _switch_user()
    if prefix is None:
        pytest.skip("neither setpriv nor runuser is installed to switch to another account")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
           "PYTHONPATH": sysconfig.get_paths()["purelib"], "PYTHONDONTWRITEBYTECODE": "1"}
    python = _python_for_other_user(prefix, env)
    if python is None:
        pytest.skip(f"no Python that {OTHER_USER} may execute imports this environment's distributed "
                    f"(the interpreter {sys.executable} is not readable by {OTHER_USER})")

    def run(argv: list[str]) -> dict[str, dict]:
        out = subprocess.run([*prefix, *python, "-c", ATTACK, *argv], env=env, capture_output=True, text=True,
                             timeout=180, cwd="/")
        assert out.returncode == 0, out.stderr[-3000:]
        attempts = json.loads(out.stdout.strip().splitlines()[-1])
        return {a["name"]: a for a in attempts}

    return run


def _addresses(client) -> list[str]:
    info = client.scheduler_info()["workers"]
    return [*info, *(w["nanny"] for w in info.values() if w.get("nanny"))]


@pytest.mark.timeout(300)
def test_other_account_cannot_connect_to_the_embedded_cluster(as_other_user):
    log: list[str] = []
    with dask.config.set({"dparticles.cluster.dashboard-address": "127.0.0.1:0"}), \
            cluster_client(n_workers=1, threads_per_worker=1, processes=True, log=log.append) as client:
        scheduler = client.scheduler.address
        assert scheduler.startswith("tls://127.0.0.1:"), scheduler
        others = _addresses(client)
        assert len(others) == 2 and all(a.startswith("tls://127.0.0.1:") for a in others), others

        attempts = as_other_user([scheduler, *others])
        assert attempts["whoami"]["ok"] and attempts["whoami"]["detail"] == str(pwd.getpwnam(OTHER_USER).pw_uid)
        got_in = {name: a["detail"] for name, a in attempts.items() if a["ok"] and name != "whoami"}
        assert not got_in, got_in
        assert len(attempts) == 1 + 3 + 3 * 3 + 1

        # our own client still works, during and after the attempts
        results, _ = watch(client, client.map(operator.add, [1, 3], [2, 4]), label="own", log=log.append)
        assert results == [3, 7]

        # the dashboard: plain HTTP on 127.0.0.1 only, URL printed
        link = urlparse(client.dashboard_link)
        assert link.scheme == "http" and link.hostname == "127.0.0.1", client.dashboard_link
        assert any(client.dashboard_link in m for m in log), log
        listeners = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == link.port]
        assert listeners and {a.ip for a in listeners} == {"127.0.0.1"}, listeners
        with urllib.request.urlopen(client.dashboard_link, timeout=10) as page:
            assert page.status == 200


@pytest.mark.timeout(300)
def test_control_other_account_does_get_into_a_cluster_without_tls(as_other_user):
    """Without TLS the same script connects and runs code as this process's user: the harness can tell."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        attempts = as_other_user(["--plain-only", cluster.scheduler_address])
    assert attempts["Client tcp://"]["ok"], attempts["Client tcp://"]
    assert attempts["Client tcp://"]["detail"] == str(os.getuid())     # ran as us, not as nobody

