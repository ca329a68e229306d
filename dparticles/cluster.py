"""Where jobs run: choose or start the Dask cluster a job's client talks to.

A job asks for a client with :func:`cluster_client`. The same job code then runs on a laptop (an
embedded LocalCluster, in this process or of worker processes over TLS), in a notebook (the client
already open there) or on HPC (a scheduler reached by address or scheduler file, checked by a
bounded probe first, or worker jobs submitted through dask-jobqueue: :mod:`dparticles.jobqueue`).
Watching the job's tasks is :mod:`dparticles.progress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import dask
import distributed
import distributed.client
import distributed.comm
import psutil
from dask.utils import format_bytes, parse_bytes
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.security import Security
from tornado.iostream import StreamClosedError

from . import config
from .dashboard import dashboard_address, port_fallback_quiet
from .errors import ParticleError
from .jobqueue import JOBQUEUES, Log, jobqueue_client, wait_times


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
        wait_times()   # checked before submitting
        with jobqueue_client(kind, n_jobs, jobqueue_options, security, log) as client:
            yield client
        return
    if scheduler or scheduler_file:
        timeout = config.seconds("cluster.connect-timeout", connect_timeout, "connect timeout")
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
        # worker keeps an HTTP server (health, metrics) that distributed always starts: on loopback.
        # The dashboard's port is bound now, its pages come after the first second (see _LateDashboard)
        where = {"processes": False, "worker_dashboard_address": f"{unparse_host_port(host)}:0",
                 "worker_class": _InProcessWorker, "scheduler_kwargs": {"dashboard": False}}
        mem = 0 if mem == "auto" else mem
    # workers log a failed task with its traceback, and in-process ones log their connections closing
    # as the cluster closes; the job reports an error once, clearly, and nothing else
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_logger("distributed"))
        # the workers' statistical profiler (for the dashboard and report.html) samples every 10 ms
        # by default, which was measured to cost a worker 10-14% of its task time (4-8% with it off);
        # every 100 ms keeps a useful profile with a tenth of the samples. Workers take the config
        # they start with.
        with _workers_ignore_ctrl_c() if processes else contextlib.nullcontext(), port_fallback_quiet(), \
                dask.config.set({"distributed.worker.profile.interval": "100ms"}):
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=n, threads_per_worker=threads, memory_limit=mem, dashboard_address=dashboard_address(host),
                silence_logs=logging.CRITICAL, **where))
        if not processes:  # inproc:// addresses name the machine's IP, not the loopback the dashboard is on
            link = str(dask.config.get("distributed.dashboard.link"))
            stack.enter_context(dask.config.set({"distributed.dashboard.link": link.replace("{host}", host)}))
        client = stack.enter_context(distributed.Client(cluster, security=where.get("security"), set_as_default=False))
        stack.enter_context(client.as_current())
        limits = {w.get("memory_limit") for w in cluster.scheduler_info.get("workers", {}).values()}
        mem_text = ", ".join(f"{format_bytes(m)} memory" if m else "no memory limit" for m in limits) or str(mem)
        kind = "a local Dask cluster" if processes else "an in-process Dask cluster"
        late = "" if processes or not cluster.dashboard_link else f" (from {DASHBOARD_AFTER:g} s on)"
        log(f"Started {kind}: {n} worker{'s' * (n != 1)} x {threads} thread{'s' * (threads != 1)}, "
            f"{mem_text} each; "
            f"dashboard: {cluster.dashboard_link or 'off'}{late}")
        if late:
            stack.enter_context(_LateDashboard(client))
        yield client


DASHBOARD_AFTER = 1.0  # seconds: an in-process cluster shows its dashboard once it has run this long


class _InProcessWorker(distributed.Worker):
    """A worker of the in-process cluster: its HTTP server (health, metrics) listens where it is told
    (loopback), without a bokeh page of its own (the scheduler's dashboard shows every worker)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["dashboard"] = False
        super().__init__(*args, **kwargs)


class _LateDashboard:
    """Give the in-process scheduler its dashboard pages after :data:`DASHBOARD_AFTER` seconds, on
    the HTTP server it already listens with (so the port never changes hands). Importing bokeh for
    the pages takes about 0.4 s, most of a small job's run; a job that short is over before anyone
    could look at them."""

    def __init__(self, client: distributed.Client) -> None:
        self.timer = threading.Timer(DASHBOARD_AFTER, self._attach, args=(client,))
        self.timer.daemon = True

    def __enter__(self) -> _LateDashboard:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.timer.join()

    @staticmethod
    def _attach(client: distributed.Client) -> None:
        try:
            client.run_on_scheduler(_connect_dashboard)
        except Exception:  # the cluster closing meanwhile: nothing to show any more
            pass


def _connect_dashboard(dask_scheduler: distributed.Scheduler) -> None:
    """Add the dashboard's pages to the scheduler's HTTP server, in the scheduler's event loop, as
    distributed does when it starts a scheduler with its dashboard."""
    import distributed.dashboard.scheduler

    distributed.dashboard.scheduler.connect(dask_scheduler.http_application, dask_scheduler.http_server,
                                            dask_scheduler, prefix="/")
