"""The record of a run kept in its output folder, as RELION keeps ``note.txt`` and CryoSPARC ``job.json``:
what ran (command line, version, parameters), on what (inputs and their sizes), when, where (the
cluster), what came out (counts, notes, warnings) and what it cost. ``report.html`` beside it is the
dask performance report of the run, so the dashboard's view outlives the job; a job that runs no dask
tasks (import) keeps :func:`record_report` there instead, the same record as a page."""

from __future__ import annotations

import datetime
import html
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import xarray as xr

from dparticles.output import atomic_write
from dparticles.writer import write_record

JOB_FILE, NOTE_FILE, REPORT_FILE = "job.json", "note.txt", "report.html"


def now() -> str:
    """The local time with its offset, to the second, as ISO 8601."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    """How this run was started: the command line of a ``dparticles`` command, else the Python program."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("dparticles", "cli.py", "__main__.py"):
        return shlex.join(["dparticles", *argv[1:]])
    return shlex.join(["python", *argv]) if argv and argv[0] else "python (interactive)"


def inputs(ds: xr.Dataset) -> dict:
    """The files a dataset reads: its metadata file and the stacks, with their sizes."""
    source = ds.attrs.get("source")
    info: dict = {"metadata": source, "metadata_bytes": os.path.getsize(source) if source and os.path.isfile(source)
                  else None}
    if "stack_path" in ds.coords:
        paths = ds["stack_path"].values.astype(str)
        info["stacks"] = len(paths)
        info["stack_bytes"] = int(sum(os.path.getsize(p) for p in paths))
        info["first_stacks"] = paths[:3].tolist()
    return info


def write_run_record(out: Path, record: dict, report: str | None = None) -> None:
    """Write ``job.json``, a RELION-style ``note.txt`` and the performance ``report`` (HTML) in ``out``,
    each atomically."""
    write_record(str(out / JOB_FILE), _plain(record), indent=1)
    note = (f" ++++ Executing new job on {record.get('started', now())}\n"
            f" ++++ with the following command(s): \n{record.get('command', command_line())}\n ++++ \n")
    atomic_write(out / NOTE_FILE, lambda tmp: tmp.write_text(note))
    if report is not None:
        atomic_write(out / REPORT_FILE, lambda tmp: tmp.write_text(report))


def record_report(record: dict) -> str:
    """A run record as a small self-contained HTML page: what ran, on what, when and what came out,
    notes first. For jobs that run no dask tasks, which have no performance report to keep."""
    plain = _plain(record)
    notes = plain.get("notes") or []
    title = f"dparticles {plain.get('job', 'run')}: {plain.get('particles', '?')} particles"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p>This job runs no dask tasks, so there is no performance report: this page is the run's record "
             f"(also in {JOB_FILE}).</p>"]
    if notes:
        parts.append("<h2>Notes and warnings</h2><ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
                     + "</ul>")
    parts.append("<h2>Run</h2>" + _html_table({k: v for k, v in plain.items() if k != "notes"}))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_table(value) -> str:
    """Nested dicts and lists of a JSON-ready record as HTML tables, every text escaped."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_html_table(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, list):
        return "<br>".join(_html_table(v) for v in value) if value else "none"
    return "none" if value is None else html.escape(str(value))


def _plain(value):
    """``value`` with numpy scalars, arrays, paths and dataclasses made JSON-ready."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
