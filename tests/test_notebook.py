"""The quickstart notebook runs from a copy in a temporary folder, shows its figures and its progress
widget, and checks itself: the one run of the notebook in the test suite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the test extras")
nbclient = pytest.importorskip("nbclient", reason="nbclient comes with the test extras")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
MARKER = "# check: written stacks equal the preview"


def _text(output) -> str:
    """What an output shows as text: a stream's text or a result's ``text/plain``."""
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


def test_quickstart_runs_and_shows_figures(tmp_path: Path) -> None:
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors

    with_png = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(with_png) >= 2, f"{len(with_png)} cells have image/png outputs; expected the figures to display"

    widgets = [o for c in code for o in c.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the jobs' progress shows as a widget (tqdm with ipywidgets), not as stderr text"
    bars = [o for c in code for o in c.outputs if o.get("name") == "stderr" and "100%|" in o.get("text", "")]
    assert not bars, bars

    checks = [c for c in code if MARKER in c.source]
    assert len(checks) == 1, f"expected one cell marked {MARKER!r}, found {len(checks)}"
    shown = [_text(o).strip() for o in checks[0].outputs]
    assert any(t == "True" or t.endswith("True") for t in shown), f"the written stacks differ from the preview: {shown}"
