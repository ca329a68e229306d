"""Every output folder keeps a record of its run: job.json (what, on what, when, where, results),
a RELION-style note.txt with the command line, and report.html: dask's performance report, or for the
import, which runs no dask tasks, the record itself as a page."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import simple_set

import dparticles
from dparticles.record import record_report


def _run_cli(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "dparticles.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env=env)


def test_cli_runs_leave_job_json_note_and_report(tmp_path):
    star, _ = simple_set(tmp_path / "project")
    done = _run_cli("downsample", star, "--out", "Downsample/job002", "--fourier-box", "8", "12", "--batch-size", "5",
                    "--n-workers", "1", cwd=tmp_path / "project")
    assert done.returncode == 0, done.stderr
    for box in (8, 12):
        out = tmp_path / "project" / "Downsample" / "job002" / f"box{box}"
        record = json.loads((out / "job.json").read_text())
        assert record["job"] == "downsample" and record["version"] == dparticles.__version__
        assert record["command"].startswith("dparticles downsample ") and "--fourier-box 8 12" in record["command"]
        assert record["parameters"]["fourier_box"] == [8, 12] and record["parameters"]["batch_size"] == 5
        assert record["inputs"]["metadata"] == str(star.resolve()) and record["inputs"]["stacks"] == 2
        assert record["inputs"]["stack_bytes"] == sum(p.stat().st_size for p in (tmp_path / "project").rglob("*.mrcs")
                                                      if "Downsample" not in p.parts)
        assert record["particles"] == 12 and record["files"] == 3 and record["box"] == box
        assert record["started"] <= record["ended"] and record["seconds"] > 0
        assert record["cluster"]["workers"] == 1 and record["summary"]["n_tasks"] >= 1
        note = (out / "note.txt").read_text()
        assert "++++ with the following command(s)" in note and record["command"] in note
        report = (out / "report.html").read_text()
        assert "<html" in report.lower() and len(report) > 10_000  # dask's performance report, not a stub


def test_python_runs_record_their_parameters(tmp_path):
    star, _ = simple_set(tmp_path / "project")
    result = dparticles.restack(star, tmp_path / "out", batch_size=4, cluster={"n_workers": 1}, log=lambda *_: None)
    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert record["job"] == "restack" and record["pixels_copied_unchanged"] is True
    assert record["particles"] == result.n_particles == 12 and record["files"] == 3 and record["kept_files"] == 0
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def test_import_leaves_job_json_note_and_its_own_report(tmp_path):
    star, _ = simple_set(tmp_path / "project")
    done = _run_cli("import", star, "--out", "Import/job001", "--voltage", "200", cwd=tmp_path / "project")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "project" / "Import" / "job001"
    record = json.loads((out / "job.json").read_text())
    assert record["job"] == "import" and record["parameters"]["voltage"] == 200.0 and record["particles"] == 12
    assert record["stacks_linked"] == 2 and "dparticles import" in (out / "note.txt").read_text()
    report = (out / "report.html").read_text()
    assert "<html" in report and "no performance report" in report
    for text in ("dparticles import: 12 particles", record["command"], str(star.resolve()), ">stacks_linked<",
                 ">200.0<", record["started"]):
        assert text in report, text


def test_record_report_escapes_and_puts_notes_first():
    record = {"job": "import", "particles": 3, "command": "dparticles import '<a>&b.star'",
              "inputs": {"metadata": "/x/<a>&b.star", "stacks": 1, "first_stacks": ["/x/s.mrcs"]},
              "parameters": {"exposures": None, "trim_prefix": ""}, "notes": ["micrograph <m> not found"]}
    page = record_report(record)
    assert "<a>" not in page and "&lt;a&gt;&amp;b.star" in page and "micrograph &lt;m&gt; not found" in page
    assert page.index("Notes and warnings") < page.index("<h2>Run</h2>") and "/x/s.mrcs" in page
    assert "Notes and warnings" not in record_report(dict(record, notes=[]))
