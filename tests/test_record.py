"""Every output folder keeps a record of its run: job.json (what, on what, when, where, results),
a RELION-style note.txt with the command line, and report.html: the record as a page that fetches
nothing, with dask's performance report below it when dparticles.report keeps it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import dask
import pytest
from helpers import simple_set

import dparticles
from dparticles.record import record_report

SELECT = "relion31_sim_ribo70S_b128/Select/job010/particles.star"


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
        assert record["command"] in report and f"{record['inputs']['box']} → {box} px" in report
        assert "not kept: the tasks took" in report  # under the default 10 s: the record alone


def test_python_runs_record_their_parameters(tmp_path):
    star, _ = simple_set(tmp_path / "project")
    result = dparticles.restack(star, tmp_path / "out", batch_size=4, cluster={"n_workers": 1}, log=lambda *_: None)
    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert record["job"] == "restack" and record["pixels_copied_unchanged"] is True
    assert record["particles"] == result.n_particles == 12 and record["files"] == 3 and record["kept_files"] == 0
    assert record["outputs"]["files"] == 4 and record["phases"]["computing and writing"] > 0
    assert "<h2>What ran</h2>" in (tmp_path / "out" / "report.html").read_text()


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
    assert page.index("What ran") < page.index("Notes and warnings") < page.index("The whole record")
    assert "/x/s.mrcs" in page and "1 stacks, ?" not in page and "1 stacks" not in page
    assert "Notes and warnings" not in record_report(dict(record, notes=[]))


def _fetched(page: str) -> list[str]:
    """What a page's script and link tags would fetch: their src and href."""
    return [m.group(2) for tag in re.findall(r"<(?:script|link)\b[^>]*>", page)
            for m in [re.search(r"\b(src|href)\s*=\s*[\"']?([^\"' >]+)", tag)] if m]


@pytest.mark.parametrize("keep", [True, False], ids=["with-dask-report", "record-only"])
def test_report_of_a_real_restack_renders_offline_and_says_what_ran(real, tmp_path, keep):
    with dask.config.set({"dparticles.report": keep}):
        dparticles.restack(real / SELECT, tmp_path / "r", project_dir=tmp_path, cluster={"n_workers": 1},
                           log=lambda *_: None)
    record = json.loads((tmp_path / "r" / "job.json").read_text())
    page = (tmp_path / "r" / "report.html").read_text()
    assert _fetched(page) == []
    assert record["particles"] == 284 and record["box"] == record["inputs"]["box"] == 128
    assert record["pixel_size"] == record["pixel_size_in"] == [2.8]
    assert record["outputs"]["metadata"] == ["particles.star"] and record["outputs"]["stacks"] == 1
    assert record["outputs"]["bytes"] == sum(f.stat().st_size for f in (tmp_path / "r").rglob("*")
                                             if f.name == "particles.star" or f.suffix == ".mrcs")
    for text in (record["command"], "284 (of 400 images in the stacks)", "128 px", "2.8 Å",
                 "2 files, 17.8", "particles.star and 1 stack)", "particles/s", "stacks/batch_000000.mrcs"):
        assert text in page, text
    dask_part = page[page.index("<h2>Dask performance report</h2>"):]
    if keep:  # bokeh inline, and the command instead of our own source as dask's "calling code"
        assert record["dask_report"] == "below" and "BEGIN bokeh.min.js" in page and "embed_items" in dask_part
        assert "def to_stacks" not in page and record["phases"]["dask report"] > 0
    else:
        assert "bokeh" not in page.lower() and "off (dparticles.report: false)" in dask_part
        assert "dask report" not in record["phases"]


def test_report_of_a_real_downsample_names_both_boxes_and_pixel_sizes(real, tmp_path):
    with dask.config.set({"dparticles.report": "1 hour"}):
        dparticles.downsample(real / SELECT, tmp_path / "d", fourier_box=[64, 96], project_dir=tmp_path,
                              cluster={"n_workers": 1}, log=lambda *_: None)
    for box, psize in ((64, "5.6"), (96, "3.73333")):
        out = tmp_path / "d" / f"box{box}"
        record = json.loads((out / "job.json").read_text())
        page = (out / "report.html").read_text()
        assert _fetched(page) == [] and "bokeh" not in page.lower()
        assert record["box"] == box and record["pixel_size_in"] == [2.8]
        for text in (record["command"], "284 (of 400 images in the stacks)", f"128 → {box} px",
                     f"2.8 → {psize}", "particles.star and 1 stack)", "not kept: the tasks took"):
            assert text in page, text


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("unshare") is None,
                    reason="needs chromium and unshare to render a page without network")
def test_report_renders_without_network(real, tmp_path):
    with dask.config.set({"dparticles.report": True}):
        dparticles.restack(real / SELECT, tmp_path / "r", cluster={"n_workers": 1}, log=lambda *_: None)
    page = tmp_path / "r" / "report.html"
    dom = subprocess.run(["unshare", "-n", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    if dom.returncode != 0 and "unshare" in dom.stderr:
        pytest.skip(f"cannot run without network here: {dom.stderr.strip()[:200]}")
    assert "What ran" in dom.stdout
    drawn = r'data-root-id="[^"]+"[^>]*><div class="bk-Tabs'  # bokeh's script put dask's tabs in its root
    assert re.search(drawn, dom.stdout) and not re.search(drawn, page.read_text())
