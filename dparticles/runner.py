"""One job runner for import, restack and downsample: where a job's tasks run (the cluster), how they
are watched (progress, and one line for a task that dies), and the record and report the job leaves
in each output folder. A job is its own steps between :class:`JobRun`'s calls; what every job says
about itself (command, version, parameters, inputs, times, cluster, cost) is said here once.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import distributed
import xarray as xr

from dparticles import __version__, config
from dparticles.cluster import cluster_client
from dparticles.progress import RunSummary, reset_worker_peaks, watch
from dparticles.record import (REPORT_FILE, command_line, dask_report, inputs, now, phases, record_report, throughput,
                               write_run_record)


class JobRun:
    """One run of the job ``name`` with these ``parameters``: started when made, its tasks run by
    :meth:`tasks` and :meth:`compute`, its record written by :meth:`record`."""

    def __init__(self, name: str, parameters: dict, *, cluster: dict | None = None, log: Callable = print) -> None:
        self.name, self.parameters, self.cluster, self.log = name, parameters, cluster or {}, log
        self.started, self.t0 = now(), time.monotonic()
        self.summary: RunSummary | None = None
        self.where: dict | None = None
        self.kept: dict | None = None  # what dask_report says of the tasks' times and dask's own report
        self.html: str | None = None

    @contextlib.contextmanager
    def tasks(self, *, report: bool = True) -> Iterator[distributed.Client]:
        """The client the job's tasks run on (:func:`dparticles.cluster.cluster_client`: the embedded
        cluster unless one is given or active), with dask's report of them kept for :meth:`record`.
        The report is gathered in a private temporary folder, and kept only when the tasks succeeded
        (a full output disk must not hide the run's own error behind the report's)."""
        path = Path(tempfile.mkdtemp(prefix="dparticles-report-")) / REPORT_FILE \
            if report and config.get("report") else None
        try:
            with cluster_client(**self.cluster, log=self.log) as client, dask_report(path) as kept:
                self.where = {"scheduler": client.scheduler.address, "dashboard": client.dashboard_link,
                              "workers": len(client.scheduler_info().get("workers", {}))}
                self.kept = kept
                yield client
            self.html = path.read_text() if path is not None and path.is_file() else None
        finally:
            if path is not None:
                shutil.rmtree(path.parent, ignore_errors=True)

    def compute(self, client: distributed.Client, submit: Callable[[distributed.Client], list], *,
                nbytes: int | None = None, name_task: Callable[[Any], str] | None = None) -> list:
        """Submit the job's tasks (``submit(client)`` gives their futures) and watch them to the end:
        progress where the user is, each worker's peak memory from this point, their results."""
        reset_worker_peaks(client)
        results, self.summary = watch(client, submit(client), label=self.name, log=self.log, nbytes=nbytes,
                                      peaks_reset=True, name_task=name_task)
        return results

    def record(self, out: Path, ds: xr.Dataset, fields: dict) -> None:
        """Write the run's record into ``out`` (``job.json``, ``note.txt``, ``report.html``): what every
        job says of itself, then ``fields`` (what this job made: particles, files, notes...);
        ``fields["parameters"]`` adds to the job's parameters (those of this output), and
        ``fields["inputs"]`` replaces the inputs of ``ds`` when given."""
        fields = dict(fields)
        record = {"job": self.name, "command": command_line(), "version": __version__,
                  "parameters": {**self.parameters, **fields.pop("parameters", {})},
                  "inputs": fields.pop("inputs", None) or inputs(ds),
                  "started": self.started, "ended": now(), "seconds": round(time.monotonic() - self.t0, 3), **fields}
        if self.kept is not None:  # the job ran dask tasks
            record.update(phases=phases(self.t0, self.kept), throughput=throughput(fields.get("particles", 0),
                                                                                   self.summary),
                          cluster=self.where, summary=self.summary, dask_report=self.kept["dask_report"])
        write_run_record(out, record, report=record_report(record, self.html))
