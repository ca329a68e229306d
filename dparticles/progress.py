"""Watching a run's tasks: a progress bar on a terminal or in Jupyter, a line at each further tenth
in a batch log, and a summary of what the run cost (:class:`RunSummary`: tasks, time, bytes, each
worker's peak memory, counted afresh for the run). A task that runs out of memory or kills its
worker ends the run in one line that names it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import distributed
from dask.utils import format_bytes

from dparticles import config
from dparticles.errors import ParticleError

Log = Callable[[str], Any]


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
    in_notebook = _in_jupyter()
    if not (sys.stderr.isatty() or in_notebook) or n == 0:
        return None
    try:
        if not in_notebook:
            raise ImportError  # a terminal: the text bar
        import ipywidgets  # noqa: F401  (the widget needs it)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    unit = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if nbytes else {"unit": "task"}
    return tqdm(total=nbytes or n, desc=label, file=sys.stderr, leave=True, dynamic_ncols=True, **unit)


def _in_jupyter() -> bool:
    """Whether this runs in a Jupyter kernel (its IPython shell is the ZMQ one), not merely in a
    process that has imported ipykernel or IPython."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


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
    peak_sampled, n_workers, last_line, last_sample, done, last_step, nap = 0, 0, t0, -1.0, 0, 0, 0.005
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
            # a short wait while tasks end at once (a small job), up to 0.1 s while they take longer
            nap = min(nap * 2, 0.1, interval if interval > 0 else 0.05) if not batch else 0.005
            if not batch:
                time.sleep(nap)
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
