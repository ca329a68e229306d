"""Where jobs run: pick or start a Dask cluster, run independent tasks on it, report.

A job asks for a client with :func:`cluster_client` and fans its batches out with
:func:`run_tasks`. The same job code then runs on a laptop (embedded LocalCluster),
in a notebook (the client already open there) or on HPC (a scheduler started by
dask-jobqueue or inside a batch allocation, reached by address or scheduler file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
import distributed
import distributed.client
import distributed.comm
import psutil
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.security import Security
from tornado.iostream import StreamClosedError

from . import config
from .errors import ParticleError

Log = Callable[[str], Any]


def _fail_setting(name: str, flag: str, value: Any, expected: str) -> ParticleError:
    return ParticleError(f"{name} must be {expected}, got {value!r} "
                         f"(--{flag} or dparticles.cluster.{flag} in the dask config)")


def _cluster_settings(n_workers: int | None, threads_per_worker: int | None,
                      memory_limit: str | int | None) -> tuple[int | None, int, str | int | float | None]:
    """Sizing of an embedded cluster from keywords and config, checked before anything starts.

    ``n_workers`` may stay None (sized to the machine later); ``memory_limit`` is "auto",
    a byte count (``4GB``, ``4e9``), a fraction of RAM (a float up to 1, as distributed reads
    it), or 0/None for no limit.
    """
    n = config.get("cluster.n-workers", n_workers)
    threads = config.get("cluster.threads-per-worker", threads_per_worker)
    mem = config.get("cluster.memory-limit", memory_limit)
    for name, flag, value, may_be_none in (("n_workers", "n-workers", n, True),
                                           ("threads_per_worker", "threads-per-worker", threads, False)):
        if value is None and may_be_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail_setting(name, flag, value, "a whole number of at least 1")
    if isinstance(mem, str) and mem.strip().lower() == "auto":
        mem = "auto"
    elif mem is not None:
        try:
            ok = not isinstance(mem, bool) and (parse_bytes(mem) if isinstance(mem, str) else float(mem)) >= 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise _fail_setting("memory_limit", "memory-limit", mem, '"auto" or a size such as 4GB')
    return n, threads, mem


def _local_cluster_size(n_workers: int | None, threads_per_worker: int | None,
                        memory_limit: str | None) -> tuple[int, int, str | int]:
    """Workers, threads and memory per worker for an embedded cluster on this machine.

    Unless configured, one single-threaded worker per CPU, but no more workers than
    fit 80% of the RAM at ``memory-budget`` each, so a laptop does not swap.
    """
    n, threads, mem = _cluster_settings(n_workers, threads_per_worker, memory_limit)
    if n is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        budget = parse_bytes(str(config.get("memory-budget")))
        n = max(1, min(cpus // threads, int(0.8 * psutil.virtual_memory().total) // budget))
    return int(n), threads, mem


def _dashboard_address(host: str) -> str | None:
    """Configured dashboard address, bound to ``host`` when it names only a port (distributed reads
    ``":8787"`` as all interfaces; we never want that implicitly). The port is not probed here:
    distributed binds it, and takes another free one if it is busy (see :func:`_port_fallback_quiet`)."""
    addr = config.get("cluster.dashboard-address")
    if addr is None:
        return None
    addr = str(addr)
    return f"{unparse_host_port(host)}{addr}" if addr.startswith(":") else addr


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only critical messages from logger ``name`` while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _port_fallback_quiet() -> Iterator[None]:
    """distributed binds the dashboard's port itself and, when it is busy (another job's), binds a
    free one instead and warns: the bind cannot race, and the URL is logged, so the warning goes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
        yield


def _connect_timeout(override: float | str | None) -> float:
    """Seconds to wait for a scheduler (keyword > ``dparticles.cluster.connect-timeout``)."""
    value = config.get("cluster.connect-timeout", override)
    try:
        seconds = parse_timedelta(value, default="s")
    except (ValueError, TypeError, KeyError):
        seconds = None
    if not isinstance(seconds, int | float) or seconds <= 0:
        raise ParticleError(f"connect timeout must be a positive duration such as 20s, got {value!r} "
                            "(dparticles.cluster.connect-timeout in the dask config)")
    return float(seconds)


def _client_security(address: str, security: Any) -> Security:
    """The Security a ``distributed.Client`` would use for ``address``, resolved once for probe and client."""
    if security is None:
        loader = getattr(distributed.client, "_maybe_call_security_loader", None)
        security = loader(address) if loader else None
    if security is None or security is False:
        return Security()
    if isinstance(security, dict):
        return Security(**security)
    if security is True:
        return Security.temporary()
    return security


class _Unreachable(Exception):
    """The probe did not get a scheduler's answer; the message says why, in a few words."""


class _NotAScheduler(Exception):
    """The probe got an answer that is not Dask's."""


def _reason(exc: BaseException) -> str:
    """A few words for why a connection failed, from the innermost cause."""
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, distributed.comm.CommClosedError | StreamClosedError):
        return "the connection was closed at once (a tls:// scheduler addressed as tcp://?)"
    if isinstance(inner, TimeoutError | asyncio.TimeoutError | asyncio.CancelledError):
        return "no answer"
    text = str(inner).strip() or type(inner).__name__
    return text.splitlines()[0]


async def _tcp_state(address: str) -> str | None:
    """Whether a TCP connection to a tcp:// or tls:// address is refused or accepted now (0.25 s at most)."""
    try:
        scheme, location = distributed.comm.parse_address(address)
        if scheme not in ("tcp", "tls"):
            return None
        host, port = parse_host_port(location)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.25)
    except ConnectionRefusedError:
        return "connection refused"
    except (OSError, ValueError, asyncio.TimeoutError):
        return None
    writer.close()
    return "the port accepted the connection but nothing answered"


def _probe_scheduler(address: str, security: Security, timeout: float) -> None:
    """Ask ``address`` who it is, within ``timeout`` seconds, or raise a one-line ParticleError.

    ``distributed.Client`` bounds its TCP (and TLS) connection by its ``timeout`` but then waits
    for the scheduler's handshake without any bound: a port that accepts and never answers
    hangs it for good. This probe runs the same connection and one ``identity`` call under a
    hard deadline, on its own event loop in a thread (the caller may be inside a running loop,
    as in a notebook).
    """
    if security.require_encryption and not address.startswith("tls://"):
        raise ParticleError(f"the dask config requires encryption (distributed.comm.require-encryption) "
                            f"but {address} is not a tls:// address")

    async def probe() -> dict:
        comm = await distributed.comm.connect(address, timeout=timeout, **security.get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})   # every Dask server answers this
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> dict:
        # connect() gives up by itself at `timeout` when refused or unanswered at the TCP/TLS
        # level; the small extra only lets that clearer error win over the bare deadline
        try:
            return await asyncio.wait_for(probe(), timeout + 0.25)
        except asyncio.TimeoutError:
            raise _Unreachable("the port accepted the connection but nothing answered") from None
        except OSError as exc:
            reason = _reason(exc)
            if reason == "no answer":                 # distributed keeps only its last attempt's error
                reason = await _tcp_state(address) or reason
            raise _Unreachable(reason) from None
        except TypeError:
            raise                                     # TLS address without TLS credentials
        except Exception as exc:                      # something else listens there
            raise _NotAScheduler(type(exc).__name__) from None

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["identity"] = asyncio.run(bounded())
        except BaseException as exc:             # handed to the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="dparticles-scheduler-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    error = outcome.get("error")
    if thread.is_alive():
        error = _Unreachable("no answer")
    if isinstance(error, _Unreachable):
        raise ParticleError(f"could not reach the Dask scheduler at {address} within {timeout:g} s: "
                            f"{error}; is it running?") from None
    if isinstance(error, _NotAScheduler):
        raise ParticleError(f"something answered at {address}, but not as a Dask scheduler; "
                            "check the address and port") from None
    if isinstance(error, TypeError) and address.startswith("tls://"):
        raise ParticleError(f"the Dask scheduler at {address} speaks TLS: give its credentials "
                            "(security=..., or distributed.comm.tls.* in the dask config)") from None
    if error is not None:
        raise error
    identity = outcome.get("identity")
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind != "Scheduler":
        what = f"is a Dask {kind}, not a scheduler" if isinstance(kind, str) else "answered, but not as a Dask scheduler"
        raise ParticleError(f"{address} {what}; give the scheduler's address")


def _scheduler_file_address(path: str) -> str:
    """The scheduler address in a scheduler file, or a one-line ParticleError."""
    try:
        with open(path) as f:
            address = json.load(f).get("address")
    except FileNotFoundError:
        raise ParticleError("scheduler file not found; is the scheduler running and the path on a "
                            "file system shared with this node?", path=path) from None
    except (OSError, ValueError, AttributeError) as exc:
        raise ParticleError(f"not a readable scheduler file ({_reason(exc)})", path=path) from None
    if not isinstance(address, str) or "://" not in address:
        raise ParticleError("not a scheduler file: no scheduler address in it", path=path)
    return address


# --- dask-jobqueue: worker jobs dparticles submits itself ---------------------------------------

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


def _duration(key: str, override: float | str | None = None) -> float:
    """A positive number of seconds from ``dparticles.<key>`` (``30s``, ``10 minutes``, a number), or a ParticleError."""
    value = config.get(key, override)
    try:
        seconds = parse_timedelta(value, default="s")
    except (ValueError, TypeError, KeyError):
        seconds = None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        raise ParticleError(f"{key.rsplit('.', 1)[-1]} must be a positive duration such as 30s, got {value!r} "
                            f"(dparticles.{key} in the dask config)")
    return float(seconds)


def _jobqueue_settings(jobqueue: str | None, jobs: int | None, options: dict[str, Any]) -> tuple[str | None, int]:
    """The jobqueue kind and number of worker jobs, checked before anything starts."""
    if jobqueue is None:
        if options:
            raise ParticleError(f"{', '.join(sorted(options))}: unknown cluster keywords (dask-jobqueue settings "
                                "apply only with jobqueue='slurm' or 'pbs')")
        return None, 0
    kind = str(jobqueue).lower()
    if kind not in JOBQUEUES:
        raise ParticleError(f"jobqueue must be one of {', '.join(JOBQUEUES)}, got {jobqueue!r} (--jobqueue)")
    n = config.get("cluster.jobs", jobs)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _fail_setting("jobs", "jobs", n, "a whole number of at least 1")
    return kind, n


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
        scheduler_options["dashboard_address"] = _dashboard_address("127.0.0.1")
    opts["scheduler_options"] = scheduler_options
    if security is not None:
        opts["security"] = security
    opts["job_cls"] = _recording_job_class(cls.job_cls, failures)
    try:
        with _port_fallback_quiet():
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
    report, timeout = _duration("cluster.pending-report"), _duration("cluster.start-timeout")
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
def _jobqueue_client(kind: str, jobs: int, options: dict[str, Any], security: Any,
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


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (an ignored signal stays ignored across exec): Ctrl-C
    in a terminal reaches the whole process group, and only the job itself should answer it, by
    cancelling its tasks and closing the cluster, not every worker with a traceback."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, scheduler_file: str | None = None, *,
                   n_workers: int | None = None, threads_per_worker: int | None = None,
                   memory_limit: str | None = None, processes: bool | None = None, security: Any = None,
                   connect_timeout: float | str | None = None,
                   jobqueue: str | None = None, jobs: int | None = None,
                   log: Log = print, **jobqueue_options: Any) -> Iterator[distributed.Client]:
    """Yield a client, choosing in order: an explicit scheduler, worker jobs of our own, the active
    client, a new LocalCluster.

    - ``scheduler`` (address such as ``tcp://node:8786`` or ``tls://...``) or ``scheduler_file``
      (written by ``dask scheduler --scheduler-file`` or dask-jobqueue): connect; the
      scheduler is left running, only our client is closed. A scheduler that does not answer
      within ``connect_timeout`` (``dparticles.cluster.connect-timeout``, 20 s) is a
      one-line ParticleError.
    - ``jobqueue="slurm"`` or ``"pbs"``: a dask-jobqueue ``SLURMCluster`` / ``PBSCluster`` from the
      ``jobqueue.slurm`` / ``jobqueue.pbs`` profile in the dask config, ``jobqueue_options`` (its
      keywords: ``cores``, ``memory``, ``queue``, ``walltime``, ...) overriding it, kept at ``jobs``
      worker jobs (``dparticles.cluster.jobs``). Unset anywhere, a job is one single-threaded worker
      with ``dparticles.memory-budget`` of memory. Until the first worker connects, the jobs' states
      and the batch system's reasons (``squeue``, ``qstat -f``) are logged every
      ``dparticles.cluster.pending-report`` seconds; a refused submission, jobs that all end first,
      or no worker within ``dparticles.cluster.start-timeout`` is a one-line ParticleError. The
      cluster is closed at exit, which cancels every job it submitted.
    - Otherwise an active ``distributed.Client`` (a notebook's) is reused and left open.
    - Otherwise an embedded ``LocalCluster`` sized to the machine is started, its dashboard URL
      logged, and it is closed at exit. By default (``processes`` False, ``dparticles.cluster.processes``)
      its scheduler and workers run in this process, on threads (the kernels release the GIL:
      ducc0's FFTs, ``copy_file_range``, numpy copies), talking ``inproc://``: nothing listens but
      the dashboard on ``cluster.host`` (127.0.0.1), nothing is spawned, so a plain script needs
      no ``if __name__ == "__main__"`` guard and a small job starts in a fraction of a second;
      no memory limit applies unless ``memory_limit`` is given (the tasks are sized to
      ``dparticles.memory-budget``). With ``processes`` True, workers are processes under
      nannies (which restart one beyond its ``memory_limit``), listening on ``cluster.host``,
      and scheduler, nannies and workers speak TLS with a key and certificate made for this run
      and held only in memory (``Security.temporary()``), so no other account on the machine can
      connect to them. The dashboard is plain HTTP.

    ``security`` (a ``distributed.security.Security``) is needed for ``tls://`` schedulers;
    left as None, distributed's own ``distributed.comm.tls`` config applies. Given for an
    embedded cluster of processes, it replaces the temporary credentials. The sizing keywords
    only apply to an embedded cluster, but are checked first in every case.
    """
    n_workers, threads_per_worker, memory_limit = _cluster_settings(n_workers, threads_per_worker, memory_limit)
    kind, n_jobs = _jobqueue_settings(jobqueue, jobs, jobqueue_options)
    if scheduler and scheduler_file:
        raise ParticleError("give a scheduler address or a scheduler file, not both")
    if kind and (scheduler or scheduler_file):
        raise ParticleError("give a scheduler or a jobqueue to start workers with, not both")
    if kind:
        _duration("cluster.pending-report"), _duration("cluster.start-timeout")   # checked before submitting
        with _jobqueue_client(kind, n_jobs, jobqueue_options, security, log) as client:
            yield client
        return
    if scheduler or scheduler_file:
        timeout = _connect_timeout(connect_timeout)
        address = scheduler or _scheduler_file_address(str(scheduler_file))
        sec = _client_security(address, security)
        _probe_scheduler(address, sec, timeout)
        try:
            client = distributed.Client(scheduler, scheduler_file=scheduler_file, security=sec,
                                        timeout=timeout, set_as_default=False)
        except OSError as exc:
            raise ParticleError(f"could not reach the Dask scheduler at {address} within {timeout:g} s: "
                                f"{_reason(exc)}; is it running?") from None
        with client, client.as_current():
            log(f"Connected to Dask scheduler {client.scheduler.address} (dashboard: {client.dashboard_link})")
            yield client
        return
    try:
        active: distributed.Client | None = distributed.default_client()
    except ValueError:
        active = None
    if active is not None:
        log(f"Using the active Dask client {active.scheduler.address}")
        yield active
        return
    processes = bool(config.get("cluster.processes", processes))
    n, threads, mem = _local_cluster_size(n_workers, threads_per_worker, memory_limit)
    host = str(config.get("cluster.host"))
    if processes:
        where = {"processes": True, "host": host, "security": security if security is not None else Security.temporary()}
    else:  # in this process: inproc:// needs no credentials; a limit only if one is asked for. Each
        # worker keeps an HTTP server (health, metrics) that distributed always starts: on loopback
        where = {"processes": False, "worker_dashboard_address": f"{unparse_host_port(host)}:0"}
        mem = 0 if mem == "auto" else mem
    # workers log a failed task with its traceback, and in-process ones log their connections closing
    # as the cluster closes; the job reports an error once, clearly, and nothing else
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_logger("distributed"))
        # the workers' statistical profiler (for the dashboard and report.html) samples every 10 ms
        # by default, which was measured to cost a worker 10-14% of its task time (4-8% with it off);
        # every 100 ms keeps a useful profile with a tenth of the samples. Workers take the config
        # they start with.
        with _workers_ignore_ctrl_c() if processes else contextlib.nullcontext(), _port_fallback_quiet(), \
                dask.config.set({"distributed.worker.profile.interval": "100ms"}):
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=n, threads_per_worker=threads, memory_limit=mem, dashboard_address=_dashboard_address(host),
                silence_logs=logging.CRITICAL, **where))
        if not processes:  # inproc:// addresses name the machine's IP, not the loopback the dashboard is on
            link = str(dask.config.get("distributed.dashboard.link"))
            stack.enter_context(dask.config.set({"distributed.dashboard.link": link.replace("{host}", host)}))
        client = stack.enter_context(distributed.Client(cluster, security=where.get("security"), set_as_default=False))
        stack.enter_context(client.as_current())
        limits = {w.get("memory_limit") for w in cluster.scheduler_info.get("workers", {}).values()}
        mem_text = ", ".join(f"{format_bytes(m)} memory" if m else "no memory limit" for m in limits) or str(mem)
        kind = "a local Dask cluster" if processes else "an in-process Dask cluster"
        log(f"Started {kind}: {n} worker{'s' * (n != 1)} x {threads} thread{'s' * (threads != 1)}, "
            f"{mem_text} each; "
            f"dashboard: {cluster.dashboard_link or 'off'}")
        yield client


@dataclass(frozen=True)
class RunSummary:
    """What a run cost: tasks, wall time, data volume and worker memory.

    ``peak_worker_memory_bytes`` is the largest peak resident memory of a worker process during
    the run: each worker's peak is reset when the run starts (``5`` written to
    ``/proc/self/clear_refs``) and read after the tasks (``VmHWM`` in ``/proc/self/status``),
    so it counts the worker's own memory only, not a parent's it was forked or spawned from.
    Workers that died are missed; on a worker whose peak could not be reset it is the peak
    since the worker started. Where ``/proc`` is unavailable (macOS) it falls back to
    ``sampled_peak_rss_bytes`` and ``peak_worker_memory_sampled`` is True.
    ``sampled_peak_rss_bytes`` is the largest worker RSS seen in the scheduler's heartbeats,
    sampled at each progress tick during the run (it can miss short spikes). ``in_process``: the
    workers are threads of the calling process, whose peak (the client's included) this then is.
    """

    label: str
    n_tasks: int
    seconds: float
    n_workers: int
    peak_worker_memory_bytes: int | None
    sampled_peak_rss_bytes: int | None
    nbytes: int | None = None
    peak_worker_memory_sampled: bool = False
    in_process: bool = False

    def __str__(self) -> str:
        tasks = "1 task" if self.n_tasks == 1 else f"{self.n_tasks} tasks"
        workers = "1 worker" if self.n_workers == 1 else f"{self.n_workers} workers"
        text = f"{self.label}: {tasks} in {self.seconds:.1f} s on {workers}"
        if self.nbytes is not None:
            text += f", {format_bytes(self.nbytes)} written ({format_bytes(int(self.nbytes / max(self.seconds, 1e-9)))}/s)"
        if self.peak_worker_memory_bytes is not None:
            how = " (sampled)" if self.peak_worker_memory_sampled else ""
            where = "in this process" if self.in_process else "per worker"
            text += f"; at most {format_bytes(self.peak_worker_memory_bytes)} of memory {where}{how}"
        return text + "."


def _reset_peak_memory() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current RSS; False where Linux /proc is absent."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_memory_bytes() -> int | None:
    """This process's peak resident memory (``VmHWM``, in kB in /proc/self/status) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sample_worker_rss(client: distributed.Client) -> tuple[int, int]:
    """(largest current worker RSS, number of workers) from the scheduler's heartbeats."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    rss = [int(w.get("metrics", {}).get("memory") or 0) for w in workers.values()]
    return max(rss, default=0), len(rss)


def run_tasks(client: distributed.Client, func: Callable[..., Any], args_list: list[tuple], *, label: str,
              log: Log = print, nbytes: int | None = None) -> tuple[list, RunSummary]:
    """Run ``func(*args)`` for each tuple in ``args_list`` as independent tasks; results in order.

    Keys are deterministic (``f"{label}-{i}-{token}"``, token from func and all arguments),
    so a task whose result is still held on the cluster is not run twice. If a worker dies,
    the scheduler runs its tasks again elsewhere, so ``func`` must be an idempotent writer.
    Progress shows as :func:`watch` shows it. On an error the remaining tasks are cancelled and the
    task's exception is raised. ``nbytes`` (data volume) only feeds the summary.
    """
    n = len(args_list)
    if len({len(a) for a in args_list}) > 1:
        raise ValueError(f"{label}: all argument tuples must have the same length")
    token = dask.base.tokenize(func, args_list)
    keys = [f"{label}-{i}-{token}" for i in range(n)]
    reset_worker_peaks(client)
    futures = client.map(func, *map(list, zip(*args_list)), key=keys, pure=True) if n else []
    return watch(client, futures, label=label, log=log, nbytes=nbytes, peaks_reset=True)


def _died(exc: BaseException, futures: list, label: str, name_task: Callable[[Any], str] | None) -> ParticleError:
    """One line for a task that ran out of memory or killed its worker: which, and what to change."""
    if isinstance(exc, distributed.KilledWorker):
        key, why = exc.task, "killed its worker each time it ran (the worker's memory limit, or a crash)"
    else:
        key, why = next((f.key for f in futures if f.status == "error"), None), "ran out of memory"
    what = name_task(key) if name_task is not None and key is not None else f"task {key}"
    return ParticleError(f"{label}: {what} {why}; give each worker more memory (--memory-limit) or lower "
                         "dparticles.memory-budget so that a task holds fewer particles, then rerun to resume")


def _progress_bar(label: str, n: int, nbytes: int | None):
    """A tqdm bar in bytes (or tasks) on a terminal or in Jupyter; None elsewhere (log lines then)."""
    in_notebook = "ipykernel" in sys.modules
    if not (sys.stderr.isatty() or in_notebook) or n == 0:
        return None
    try:
        import ipywidgets  # noqa: F401  (the widget needs it)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    unit = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if nbytes else {"unit": "task"}
    return tqdm(total=nbytes or n, desc=label, file=sys.stderr, leave=True, dynamic_ncols=True, **unit)


def _progress_line(label: str, done: int, n: int, seconds: float, nbytes: int | None) -> str:
    """``restack: 40% (8/20 tasks) in 12 s, 85.3 MiB/s, about 18 s left`` for a log."""
    rate = f", {format_bytes(int(nbytes * done / n / seconds))}/s" if nbytes and seconds > 0 else ""
    return (f"{label}: {100 * done // n}% ({done}/{n} tasks) in {seconds:.0f} s{rate}, "
            f"about {seconds * (n - done) / done:.0f} s left")


def reset_worker_peaks(client: distributed.Client) -> None:
    """Start every worker's peak-memory count afresh; call it before submitting a run's tasks."""
    client.run(_reset_peak_memory, on_error="return")


def watch(client: distributed.Client, futures: list, *, label: str, log: Log = print,
          nbytes: int | None = None, peaks_reset: bool = False,
          name_task: Callable[[Any], str] | None = None) -> tuple[list, RunSummary]:
    """Wait for ``futures`` showing progress, then gather their results (in order) and summarise.

    Progress shows as a live bar (tqdm: bytes/s and time left) on a terminal or in Jupyter (a
    widget where ipywidgets is installed: the notebooks extra); elsewhere (a batch log) as a line
    at each further tenth of the tasks done, with the rate and the time left, at most one every
    ``progress-interval`` seconds, so that a small job logs only its summary. On an error the remaining futures are cancelled and the task's exception is
    raised; so they are on an interrupt. A task that runs out of memory (``MemoryError``) or whose
    worker dies each time it runs it (``KilledWorker``) ends the run in one ParticleError naming it
    (``name_task(key)``: which particles, say) and what to change.

    The summary's worker peak memory counts from :func:`reset_worker_peaks`: callers that
    submit the futures themselves should call it first and pass ``peaks_reset=True``;
    otherwise the peaks are reset here, just after submission, and memory a task already
    used and freed by then is missed.
    """
    n = len(futures)
    interval = float(config.get("progress-interval"))
    if not peaks_reset:
        reset_worker_peaks(client)
    t0 = time.monotonic()
    peak_sampled, n_workers, last_line, last_sample, done, last_step = 0, 0, t0, -1.0, 0, 0
    finished = distributed.as_completed(futures)
    bar = _progress_bar(label, n, nbytes)
    try:
        while True:
            batch = finished.next_batch(block=False)  # no per-future loop: cost grows with completions only
            done += len(batch)
            if bar is not None and batch:
                bar.update((nbytes or n) * done / max(n, 1) - bar.n)  # tasks differ in size: share evenly
                bar.set_postfix_str(f"{done}/{n} tasks", refresh=False)
            now = time.monotonic()
            if now - last_sample >= 1.0 or done == n:   # one scheduler round trip per second at most
                rss, n_workers = _sample_worker_rss(client)
                peak_sampled, last_sample = max(peak_sampled, rss), now
            if done == n or any(f.status == "error" for f in batch):
                break
            if bar is None and done * 10 // n > last_step and now - last_line >= interval:
                log(_progress_line(label, done, n, now - t0, nbytes))
                last_line, last_step = now, done * 10 // n
            if not batch:
                time.sleep(min(0.1, interval) if interval > 0 else 0.05)
        results = client.gather(futures)
    except (distributed.KilledWorker, MemoryError) as exc:
        error = _died(exc, futures, label, name_task)  # before cancelling: the failed future names the task
        client.cancel(futures)
        raise error from None
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.monotonic() - t0
    reported = client.run(_peak_memory_bytes, on_error="return")
    peaks = [v for v in reported.values() if isinstance(v, int)]
    sampled = not peaks and bool(peak_sampled)
    summary = RunSummary(label, n, seconds, max(n_workers, len(reported)),
                         max(peaks, default=None) or (peak_sampled or None), peak_sampled or None, nbytes,
                         peak_worker_memory_sampled=sampled,
                         in_process=set(client.run(os.getpid, on_error="return").values()) == {os.getpid()})
    log(str(summary))
    return results, summary
