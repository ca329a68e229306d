"""Worker jobs dparticles submits itself through dask-jobqueue (SLURM, PBS): the cluster from the
``jobqueue.<kind>`` profile, the jobs' states and the batch system's reasons (``squeue``, ``qstat -f``)
while they wait, and a one-line error when they cannot start."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import dask
import distributed
from dask.utils import parse_bytes

from dparticles import config
from dparticles.dashboard import dashboard_address, port_fallback_quiet
from dparticles.errors import ParticleError

Log = Callable[[str], Any]

JOBQUEUES = {"slurm": ("SLURMCluster", "sbatch", "squeue"), "pbs": ("PBSCluster", "qsub", "qstat")}

_SLURM_HINTS = {
    "PartitionConfig": "each asks for {request}, more than the partition's nodes or limits allow; "
                       "ask for less (cores, memory, walltime in jobqueue.{kind}) or another queue",
    "Resources": "waiting for a node with {request} free",
    "Priority": "other jobs come first",
    "ReqNodeNotAvail": "the nodes it may use are down, drained or reserved",
    "PartitionTimeLimit": "the walltime is above the partition's limit",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is not accepting jobs",
    "InvalidAccount": "the account is not valid here",
    "InvalidQOS": "the QOS is not valid here",
    "JobHeldUser": "held by you (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
}


def wait_times() -> tuple[float, float]:
    """Seconds between reports on the pending jobs, and before no worker is an error
    (``dparticles.cluster.pending-report``, ``dparticles.cluster.start-timeout``)."""
    return config.seconds("cluster.pending-report"), config.seconds("cluster.start-timeout")


def _queue_states(kind: str, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """``{job id: (state, reason)}`` from ``squeue`` (SLURM) or ``qstat -f`` (PBS) for the jobs still
    listed; None when the command is not here or fails. PBS states are spelled as SLURM's."""
    command = JOBQUEUES[kind][2]
    if not job_ids or shutil.which(command) is None:
        return None
    args = ([command, "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"] if kind == "slurm"
            else [command, "-f", *job_ids])
    try:
        run = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if run.returncode != 0 and not run.stdout.strip():
        # both fail on job ids they have forgotten (ended and purged): then none of ours is listed
        return {} if "Invalid job id" in run.stderr or "Unknown Job Id" in run.stderr else None
    return _parse_squeue(run.stdout) if kind == "slurm" else _parse_qstat(run.stdout)


def _parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """``squeue -h -o "%i %T %r"`` lines to ``{id: (state, reason)}``."""
    out = {}
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            out[parts[0]] = (parts[1], parts[2].strip() if len(parts) > 2 else "None")
    return out


_PBS_STATES = {"Q": "PENDING", "W": "PENDING", "T": "PENDING", "H": "HELD", "S": "SUSPENDED", "R": "RUNNING",
               "B": "RUNNING", "E": "COMPLETING", "C": "COMPLETED", "F": "COMPLETED", "X": "COMPLETED"}


def _parse_qstat(text: str) -> dict[str, tuple[str, str]]:
    """``qstat -f`` blocks (PBS Pro, Torque, OpenPBS) to ``{id: (state, comment)}``; the id is the
    number before the server name (``123.server`` -> ``123``), as dask-jobqueue records it."""
    out: dict[str, tuple[str, str]] = {}
    job, attrs, key = None, {}, None

    def flush() -> None:
        if job is not None:
            out[job] = (_PBS_STATES.get(attrs.get("job_state", "?")[:1], attrs.get("job_state", "?")),
                        attrs.get("comment", "None"))

    for line in text.splitlines():
        if line.startswith("Job Id:"):
            flush()
            job, attrs, key = line.split(":", 1)[1].strip().split(".")[0], {}, None
        elif line.startswith("\t") and key is not None:          # continuation of a long value
            attrs[key] += line.strip()
        elif " = " in line:
            key, value = (s.strip() for s in line.split(" = ", 1))
            attrs[key] = value
    flush()
    return out


def _job_request(cluster: Any) -> str:
    """What each worker job asks for, in words: ``1 core, 4 GB, walltime 02:00:00``."""
    job = cluster._dummy_job                     # what cluster.job_script() shows
    cores = int(getattr(job, "worker_cores", 0) or 0)
    memory = getattr(job, "worker_memory", None)
    text = f"{cores} core{'s' if cores != 1 else ''}"
    if memory:
        gb = int(memory) / 1e9
        text += f", {gb:.3g} GB" if gb < 1000 else f", {gb:.0f} GB"
    walltime = [line.rsplit(" ", 1)[-1].split("walltime=")[-1] for line in job.job_header.splitlines()
                if " -t " in line or "walltime=" in line]
    return text + (f", walltime {walltime[0]}" if walltime else "")


def _describe_jobs(kind: str, job_ids: list[str], states: dict[str, tuple[str, str]] | None,
                   request: str) -> str:
    """``2 jobs pending (PartitionConfig: ...), 1 running`` for the jobs submitted so far."""
    if not job_ids:
        return "no job submitted yet"
    if states is None:
        jobs = f"{len(job_ids)} job{'s' if len(job_ids) != 1 else ''}"
        return f"{jobs} submitted ({JOBQUEUES[kind][2]} not available here to say more)"
    groups: dict[str, int] = {}
    for job in job_ids:
        state, reason = states.get(job, ("GONE", ""))
        if state == "PENDING":
            hint = _SLURM_HINTS.get(reason, "") if kind == "slurm" else ""
            if kind == "slurm" and not hint and reason.startswith(("QOS", "Assoc")):
                hint = "a limit of your account or QOS; ask for fewer or smaller jobs"
            reason_text = reason if reason not in ("", "None") else ""
            if hint:
                reason_text += ": " + hint.format(request=request, kind=kind)
            what = f"pending ({reason_text})" if reason_text else "pending"
        elif state in ("RUNNING", "CONFIGURING"):
            what = "running, no worker connected yet"
        elif state == "GONE":
            what = "no longer in the queue"
        else:
            what = state.lower() + (f" ({reason})" if reason not in ("", "None") else "")
        groups[what] = groups.get(what, 0) + 1
    parts = [f"{n} job{'s' if n != 1 else ''} {what}" for what, n in groups.items()]
    return ", ".join(parts)


def _ended(states: dict[str, tuple[str, str]] | None, job_ids: list[str]) -> bool:
    """Whether every submitted job has left the queue or ended (as far as the queue says)."""
    live = {"PENDING", "RUNNING", "CONFIGURING", "HELD", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING"}
    return bool(states is not None and job_ids) and all(states.get(j, ("GONE", ""))[0] not in live for j in job_ids)


def _one_line(text: str) -> str:
    return "; ".join(s.strip() for s in str(text).splitlines() if s.strip())


def _submission_error(exc: BaseException) -> str:
    """What the submit command said, in one line (dask-jobqueue wraps it in a RuntimeError)."""
    text = str(exc)
    if "stderr:" in text:
        err = _one_line(text.split("stderr:", 1)[1])
        out = _one_line(text.split("stdout:", 1)[1].split("stderr:", 1)[0]) if "stdout:" in text else ""
        return err or out or _one_line(text)
    return _one_line(text) or type(exc).__name__


def _recording_job_class(base: type, failures: list[str]) -> type:
    """``base`` (SLURMJob, PBSJob) whose failed submissions are recorded in ``failures`` instead of
    raised inside the cluster's event loop, where they would only be logged with a traceback (the job
    is then marked running with no job id: nothing to cancel, and the wait for workers reports it)."""

    class Job(base):  # type: ignore[misc, valid-type]
        async def start(self) -> None:
            try:
                await super().start()
            except Exception as exc:
                failures.append(_submission_error(exc))
                self.job_id = None
                self.status = distributed.core.Status.running

    Job.__name__ = Job.__qualname__ = base.__name__
    return Job


def _jobqueue_cluster(kind: str, options: dict[str, Any], security: Any, failures: list[str]) -> Any:
    """A dask-jobqueue cluster of ``kind`` from the ``jobqueue.<kind>`` profile, ``options`` overriding it.

    Unset anywhere, a job is one single-threaded worker (``cores: 1``, ``processes: 1``) with
    ``cores x dparticles.memory-budget`` of memory, and the dashboard listens on
    ``dparticles.cluster.dashboard-address`` (loopback) unless the profile's scheduler options say otherwise.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ParticleError(f"jobqueue={kind!r} needs dask-jobqueue: pip install 'dparticles[hpc]'") from None
    cls_name, submit, _ = JOBQUEUES[kind]
    if shutil.which(submit) is None:
        raise ParticleError(f"{submit} is not on PATH: jobqueue={kind!r} must run where {kind.upper()} jobs "
                            "can be submitted (a login node, or inside a job)")
    cls = getattr(dask_jobqueue, cls_name)

    def profile(key: str) -> Any:
        return dask.config.get(f"jobqueue.{kind}.{key}", None)

    opts = {k: v for k, v in options.items() if v is not None}
    if "cores" not in opts and profile("cores") is None:
        opts["cores"] = 1
    if "processes" not in opts and profile("processes") is None:
        opts["processes"] = 1
    if "memory" not in opts and profile("memory") is None:
        cores = int(opts.get("cores") or profile("cores") or 1)
        opts["memory"] = str(cores * parse_bytes(str(config.get("memory-budget"))))   # bytes
    scheduler_options = dict(opts.get("scheduler_options") or profile("scheduler-options") or {})
    if "dashboard_address" not in scheduler_options:
        scheduler_options["dashboard_address"] = dashboard_address("127.0.0.1")
    opts["scheduler_options"] = scheduler_options
    if security is not None:
        opts["security"] = security
    opts["job_cls"] = _recording_job_class(cls.job_cls, failures)
    try:
        with port_fallback_quiet():
            return cls(**opts)
    except (TypeError, ValueError) as exc:
        raise ParticleError(f"bad jobqueue.{kind} settings: {_one_line(exc).split('; job_kwargs=')[0]}") from None


def _wait_for_job_workers(cluster: Any, client: distributed.Client, kind: str, failures: list[str],
                          log: Log) -> int:
    """Wait until a worker of the submitted jobs connects; number of workers then.

    Every ``dparticles.cluster.pending-report`` seconds the jobs' states and the batch system's
    reasons are logged; a failed submission, every job having ended without a worker, or no
    worker within ``dparticles.cluster.start-timeout`` is a one-line ParticleError (the caller
    closes the cluster, which cancels the jobs).
    """
    report, timeout = wait_times()
    request = _job_request(cluster)
    name = kind.upper()
    t0 = time.monotonic()
    next_report = t0 + report

    def job_ids() -> list[str]:
        return [str(j.job_id) for j in list(cluster.workers.values()) if getattr(j, "job_id", None)]

    while True:
        if failures:
            raise ParticleError(f"could not submit the {name} worker jobs ({request} each): {failures[0]}")
        n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        if n:
            return n
        now = time.monotonic()
        if now - t0 >= timeout:
            ids = job_ids()
            raise ParticleError(f"no worker job started within {timeout:g} s: "
                                f"{_describe_jobs(kind, ids, _queue_states(kind, ids), request)}; "
                                f"the jobs were cancelled")
        if now >= next_report:
            ids = job_ids()
            states = _queue_states(kind, ids)
            if _ended(states, ids):
                logs = getattr(cluster._dummy_job, "log_directory", None)
                raise ParticleError(f"the {name} worker jobs ended before a Dask worker connected: "
                                    f"{_describe_jobs(kind, ids, states, request)}; see the jobs' output"
                                    + (f" in {os.path.abspath(logs)}" if logs else ""))
            log(f"Waiting for Dask workers after {now - t0:.0f} s: {_describe_jobs(kind, ids, states, request)}")
            next_report = now + report
        time.sleep(0.2)


@contextlib.contextmanager
def jobqueue_client(kind: str, jobs: int, options: dict[str, Any], security: Any,
                     log: Log) -> Iterator[distributed.Client]:
    """Start a dask-jobqueue cluster of ``jobs`` worker jobs, wait for the first worker, yield a client.

    Once a worker is up, ``adapt(minimum_jobs=jobs, maximum_jobs=jobs)`` keeps the number of jobs,
    replacing pre-empted ones. Closing the cluster cancels every job it submitted, at the end or on
    any failure (also a failed start).
    """
    failures: list[str] = []
    cluster = _jobqueue_cluster(kind, options, security, failures)
    try:
        with distributed.Client(cluster, security=getattr(cluster, "security", None), set_as_default=False) as client:
            log(f"Submitting {jobs} {kind.upper()} worker job{'s' if jobs != 1 else ''} "
                f"({_job_request(cluster)} each); dashboard: {cluster.dashboard_link or 'off'}")
            cluster.scale(jobs=jobs)
            n = _wait_for_job_workers(cluster, client, kind, failures, log)
            cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
            want = jobs * int(getattr(cluster._dummy_job, "worker_processes", 1) or 1)
            more = "; the others join as their jobs start" if n < want else ""
            log(f"Dask workers up: {n} of {want} connected{more}")
            with client.as_current():
                yield client
    finally:
        cluster.close()
