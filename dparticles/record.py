"""The record of a run kept in its output folder, as RELION keeps ``note.txt`` and CryoSPARC ``job.json``:
what ran (command line, version, parameters), on what (inputs and their sizes), when, where (the
cluster), what came out (particles, boxes, pixel sizes, files and bytes, notes, warnings) and what it
cost (time per phase, throughput, peak memory).

``report.html`` beside them is that record as a page (:func:`record_report`) that renders offline:
it fetches nothing. Below the record, a job that ran dask tasks keeps dask's performance report (task
stream, worker and scheduler profiles, bandwidth, system, scheduler logs) with bokeh's JavaScript
inline, once per page; dask's "calling code" section shows the command line instead of our own
source. That part is costly, so ``dparticles.report`` keeps it only for runs whose tasks took at least
that long (default 10 s; ``true`` always, ``false`` never); the record part is always written.

Measured on 2 CPUs (restack of the 284 particles of relion31_sim_ribo70S_b128/Select/job010, 18 MB
written, median of 7 runs): the record page is 5 kB and takes 0.1 ms to build. Dask's part adds 0.4 s:
the CLI run goes from 1.78 s to 2.20 s and a ``restack()`` call in a Python session from 0.18 s to 0.56 s
(the scheduler builds the profiles and bokeh figures and serialises them), the same with
bokeh's scripts inline as from its CDN; the page grows from 5 kB to 1.7 MB (bokeh.min.js 1.27 MB and
bokeh-widgets 0.38 MB, against 69 kB when they were fetched from cdn.bokeh.org). At the default of
10 s the 0.4 s is at most 4% of a run's tasks, and a shorter run pays only for starting dask's report
(1.83 s against 1.78 s, within the noise). One copy of bokeh's scripts shared by the pages would need
a file beside them, which a copied page would lose.
"""

from __future__ import annotations

import datetime
import html
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import xarray as xr
from dask.utils import format_bytes, parse_timedelta

from dparticles import config
from dparticles.formats.mrc import read_info
from dparticles.safe import METADATA, atomic_write, hosted, write_record

JOB_FILE, NOTE_FILE, REPORT_FILE = "job.json", "note.txt", "report.html"


def now() -> str:
    """The local time with its offset, to the second, as ISO 8601."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    """How this run was started: the command line of a ``dparticles`` command, else the Python program."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("dparticles", "cli.py", "__main__.py"):
        return shlex.join(["dparticles", *argv[1:]])
    if argv and Path(argv[0]).name == "dparticles-relion":  # RELION's External job
        return shlex.join(["dparticles-relion", *argv[1:]])
    return shlex.join(["python", *argv]) if argv and argv[0] else "python (interactive)"


def inputs(ds: xr.Dataset) -> dict:
    """The files a dataset reads: its metadata file and the stacks, with their sizes, images and box."""
    source = ds.attrs.get("source")
    info: dict = {"metadata": source, "metadata_bytes": os.path.getsize(source) if source and os.path.isfile(source)
                  else None}
    if "stack_path" in ds.coords:
        paths = ds["stack_path"].values.astype(str)
        info["stacks"] = len(paths)
        info["stack_bytes"] = int(sum(os.path.getsize(p) for p in paths))
        if "stack_images" in ds.coords:
            info["stack_images"] = int(ds["stack_images"].sum())
        info["box"] = read_info(paths[0]).nx if len(paths) else None
        info["first_stacks"] = paths[:3].tolist()
    return info


def outputs(out: Path, stacks: Sequence[str]) -> dict:
    """The files a run leaves in ``out``: its metadata and the ``stacks`` (paths relative to ``out``)."""
    metadata = [name for name in METADATA if (out / name).is_file()]
    files = metadata + list(stacks)
    return {"folder": out, "files": len(files), "bytes": int(sum(os.path.getsize(out / f) for f in files)),
            "metadata": metadata, "stacks": len(stacks), "first_stacks": list(stacks[:3])}


def pixel_sizes(ds: xr.Dataset, box_in: int | None, crop_box: int | None = None) -> dict:
    """The distinct pixel sizes (Å) the images of ``ds`` have, and those they had in their input of box
    ``box_in``: the Fourier crop to box ``b`` of a box ``C`` (``crop_box``, else ``box_in``) makes
    ``pixel_size = input * C / b`` (:mod:`dparticles.ops`)."""
    if "pixel_size" not in ds.coords:
        return {"pixel_size": None, "pixel_size_in": None}
    out = np.unique(ds["pixel_size"].values.astype(np.float64))
    scale = ds.sizes["x"] / (crop_box or box_in or ds.sizes["x"])
    return {"pixel_size": [round(float(v), 6) for v in out],
            "pixel_size_in": [round(float(v), 6) for v in np.unique(out * scale)]}


def throughput(particles: int, summary) -> dict | None:
    """Particles and megabytes written per second of the run's tasks (:class:`~dparticles.progress.RunSummary`)."""
    if summary is None or not summary.seconds:
        return None
    return {"particles_per_s": round(particles / summary.seconds, 1),
            "MB_per_s": None if summary.nbytes is None else round(summary.nbytes / 1e6 / summary.seconds, 1)}


@contextmanager
def dask_report(path: Path | None) -> Iterator[dict]:
    """Time the tasks of a run and keep dask's performance report of them in ``path`` (None: never),
    when ``dparticles.report`` asks for it (see the module docstring). Yields a dict that gets the
    monotonic ``times`` the tasks began and ended and dask's report was done (for :func:`phases`), and
    ``dask_report``, what became of that report."""
    setting = config.get("report")
    least = None if setting is False or setting is None else 0.0 if setting is True \
        else parse_timedelta(setting, default="s")
    kept: dict = {"dask_report": "off (dparticles.report: false)"}
    report = None
    if path is not None and least is not None:
        from distributed import performance_report

        report = performance_report(filename=str(path), mode="inline")
        report.__enter__()
    start = time.monotonic()
    yield kept  # an error skips dask's report: it would be thrown away
    done = time.monotonic()
    if report is not None and done - start < least:
        kept["dask_report"] = (f"not kept: the tasks took {done - start:.1f} s, under dparticles.report ({setting}); "
                               "set it to true to keep it for every run")
    elif report is not None:
        from distributed import get_client

        get_client().sync(report.__aexit__, None, None, None, code=command_line())
        kept["dask_report"] = "below"
    kept["times"] = (start, done, time.monotonic())


def phases(t0: float, kept: dict) -> dict:
    """Seconds of each phase of a run that began at monotonic ``t0``, from :func:`dask_report`'s
    ``kept``, until now."""
    start, done, reported = kept["times"]
    times = {"planning and cluster start": start - t0, "computing and writing": done - start}
    if kept["dask_report"] == "below":
        times["dask report"] = reported - done
    times["checks and metadata"] = time.monotonic() - reported
    return {k: round(v, 3) for k, v in times.items()}


def write_run_record(out: Path, record: dict, report: str | None = None) -> None:
    """Write ``job.json``, a RELION-style ``note.txt`` and the ``report`` page (HTML) in ``out``,
    each atomically; a ``note.txt`` that the program running the job keeps there (RELION's, in an
    External job's folder: :func:`dparticles.safe.hosted`) is left as it is."""
    write_record(str(out / JOB_FILE), _plain(record), indent=1)
    note = (f" ++++ Executing new job on {record.get('started', now())}\n"
            f" ++++ with the following command(s): \n{record.get('command', command_line())}\n ++++ \n")
    if not hosted(out / NOTE_FILE):
        atomic_write(out / NOTE_FILE, lambda tmp: tmp.write_text(note))
    if report is not None:
        atomic_write(out / REPORT_FILE, lambda tmp: tmp.write_text(report))


def record_report(record: dict, performance: str | None = None) -> str:
    """A run record as a self-contained HTML page: what ran, on what and what came out, then notes and
    warnings, the whole record, and dask's ``performance`` report (its page, from
    :func:`dask_report`) when given, with its scripts inline and nothing fetched."""
    plain = _plain(record)
    notes = plain.get("notes") or []
    title = f"dparticles {plain.get('job', 'run')}: {plain.get('particles', '?')} particles"
    scripts, body = _dask_parts(performance) if performance else ([], "")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}"
             ".dask{position:relative;height:85vh;min-height:600px;border:1px solid #ccc}</style>",
             *scripts, "</head><body>", f"<h1>{html.escape(title)}</h1>", _summary(plain)]
    if notes:
        parts.append("<h2>Notes and warnings</h2><ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
                     + "</ul>")
    parts.append(f"<details><summary>The whole record (as in {JOB_FILE})</summary>"
                 + _html_table({k: v for k, v in plain.items() if k != "notes"}) + "</details>")
    parts.append("<h2>Dask performance report</h2>")
    if body:
        parts.append(f"<div class=\"dask\">{body}</div>")
    elif "dask_report" in plain:
        parts.append(f"<p>{html.escape(str(plain['dask_report']))}.</p>")
    else:
        parts.append("<p>This job runs no dask tasks, so there is no performance report.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _summary(r: dict) -> str:
    """The first table of the page: the facts of a record in words."""
    def size(n) -> str:
        return "" if n is None else f", {format_bytes(n)}"

    def pair(a, b, unit: str) -> str:
        a, b = (", ".join(f"{v:g}" for v in x) if isinstance(x, list) else x for x in (a, b))
        return f"{b} {unit}" if a is None or a == b else f"{a} → {b} {unit}"

    i, o, s = r.get("inputs") or {}, r.get("outputs") or {}, r.get("summary") or {}
    rows = {"command": f"<code>{html.escape(str(r.get('command')))}</code>",
            "when": html.escape(f"{r.get('started')} to {r.get('ended')} ({r.get('seconds')} s)")}
    if i:
        stacks = f"; {_count(i['stacks'], 'stack')}{size(i.get('stack_bytes'))}" if "stacks" in i else ""
        rows["input"] = html.escape(f"{i.get('metadata')}{size(i.get('metadata_bytes'))}{stacks}")
    images = f" (of {i['stack_images']} images in the stacks)" if "stack_images" in i else ""
    rows["particles"] = html.escape(f"{r.get('particles')}{images}")
    if "box" in r or "box" in i:
        rows["box"] = html.escape(pair(i.get("box"), r.get("box", i.get("box")), "px"))
    if r.get("pixel_size"):
        rows["pixel size"] = html.escape(pair(r.get("pixel_size_in"), r["pixel_size"], "Å"))
    if o:
        rows["output"] = html.escape(f"{o['folder']}: {_count(o['files'], 'file')}{size(o['bytes'])} "
                                     f"({', '.join(o['metadata'])} and {_count(o['stacks'], 'stack')})")
    if r.get("phases"):
        rows["time"] = html.escape(", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()))
    if r.get("throughput"):
        t = r["throughput"]
        rows["throughput"] = html.escape(f"{t['particles_per_s']:g} particles/s" + (
            f", {t['MB_per_s']:g} MB/s written" if t.get("MB_per_s") is not None else "") + " (tasks)")
    if s.get("peak_worker_memory_bytes") is not None:
        where = "in this process" if s.get("in_process") else f"per worker, {s.get('n_workers')} workers"
        rows["peak memory"] = html.escape(f"{format_bytes(s['peak_worker_memory_bytes'])} {where}")
    notes = r.get("notes") or []
    rows["notes"] = f"{len(notes)}, below" if notes else "none"
    return "<h2>What ran</h2><table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows.items()) \
        + "</table>"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _dask_parts(page: str) -> tuple[list[str], str]:
    """The script elements of the head of dask's performance report page and its body, read past the
    scripts (bokeh's inline JavaScript holds the texts ``</head>`` and ``<body>``), without the links
    it fetches (its icon; bokeh's scripts are inline when it was made with ``mode="inline"``)."""
    scripts, body, in_body = [], [], False
    for k, piece in enumerate(re.split(r"(<script\b.*?</script>)", page, flags=re.S)):
        if k % 2:  # a script element
            (body if in_body else scripts).append(piece)
        elif in_body:
            body.append(piece)
        elif re.search(r"<body\b", piece):
            in_body = True
            body.append(re.split(r"<body\b[^>]*>", piece, maxsplit=1)[1])
    return scripts, "".join(body).rpartition("</body>")[0]


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
