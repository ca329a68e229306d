"""A real dask-jobqueue SLURMCluster for the tests marked ``slurm``.

Start SLURM first (``eval "$(bash .ci/slurm.sh start)"`` exports SLURM_CONF). Without it the
tests are skipped with the reason. Everything listens on the loopback interface.
Functions run through ``slurm_client`` must be importable by the workers, which are fresh
Python processes started by SLURM: builtins or functions of the installed dparticles package.

The cluster lives for the tests of this folder only (package scope): its worker jobs hold every
CPU of the one-node SLURM cluster and are cancelled before the rest of the test run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

N_JOBS = 2


def _slurm_unavailable() -> str | None:
    """Why SLURM cannot be used here, or None if it can."""
    if not os.environ.get("SLURM_CONF"):
        return 'SLURM_CONF is not set; start SLURM with: eval "$(bash .ci/slurm.sh start)"'
    if not os.path.isfile(os.environ["SLURM_CONF"]):
        return f"SLURM_CONF={os.environ['SLURM_CONF']} is not a file; is SLURM started?"
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH (Debian package slurm-client)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within 20 s (SLURM_CONF={os.environ['SLURM_CONF']})"
    if out.returncode != 0:
        return f"sinfo failed (exit {out.returncode}, SLURM_CONF={os.environ['SLURM_CONF']}): {out.stderr.strip()}"
    if not out.stdout.strip():
        return "sinfo lists no partitions"
    return None


@pytest.fixture(scope="session")
def slurm_available() -> None:
    """Skip, saying why, unless a SLURM cluster answers."""
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="package")
def slurm_cluster(slurm_available, tmp_path_factory) -> Iterator[object]:
    """SLURMCluster kept at N_JOBS single-core worker jobs in partition 'debug', closed (its jobs
    cancelled) after the last test of tests/hpc.

    ``adapt(minimum_jobs=N, maximum_jobs=N)`` rather than ``scale``: a worker job that is
    cancelled (pre-empted) is then replaced.
    """
    jq = pytest.importorskip("dask_jobqueue")
    cluster = jq.SLURMCluster(
        cores=1, processes=1, memory="2GB", walltime="00:20:00", queue="debug",
        interface="lo", scheduler_options={"dashboard_address": "127.0.0.1:0"},
        python=sys.executable, log_directory=str(tmp_path_factory.mktemp("slurm-logs")),
        local_directory=str(tmp_path_factory.mktemp("dask-scratch")),
        job_extra_directives=[f"--chdir={tmp_path_factory.mktemp('slurm-job-cwd')}"],   # the jobs' own folder
    )
    cluster.adapt(minimum_jobs=N_JOBS, maximum_jobs=N_JOBS)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def n_jobs() -> int:
    """Number of worker jobs the SLURM cluster is kept at."""
    return N_JOBS


@pytest.fixture
def slurm_client(slurm_cluster) -> Iterator[object]:
    """A Client on the SLURM cluster, with all N_JOBS workers up."""
    from distributed import Client

    with Client(slurm_cluster) as client:
        client.wait_for_workers(N_JOBS, timeout=180)
        yield client
