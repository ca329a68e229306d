"""The Python API from a plain script, as a user pastes the README's lines into ``analysis.py`` and
runs ``python analysis.py``: no ``if __name__ == "__main__"`` guard, the in-process cluster, no
worker process re-running the script, no dask warning."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from helpers import simple_set, star_images

from dparticles import open_particles


def test_the_readme_lines_run_as_a_plain_script(tmp_path: Path) -> None:
    star, images = simple_set(tmp_path / "project", n_stacks=3, per_stack=8, box=32)
    script = tmp_path / "project" / "analysis.py"
    script.write_text(textwrap.dedent(f"""\
        import dparticles
        ds = dparticles.open_particles({str(star)!r})
        sel = ds.where(ds.defocus_u < 15000, drop=True)
        small = dparticles.ops.downsample(sel, fourier_box=16, lowpass=8, recenter=True, micrograph_pixel_size=0.7)
        print(small.images[:4].values.shape)
        dparticles.to_stacks(small, "Downsample/job030", batch_size=10)
        dparticles.restack(sel, "Restack/job020")
        print("done")
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, script.name], cwd=script.parent, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "(4, 16, 16)" and done.stdout.splitlines()[-1] == "done", done.stdout
    assert "Traceback" not in done.stderr and "distributed" not in done.stderr, done.stderr  # no dask warning
    assert done.stdout.count("Started an in-process Dask cluster") == 2, done.stdout
    assert star_images(script.parent / "Restack" / "job020" / "particles.star", script.parent).tobytes() == \
        images[(sel := np.asarray(open_particles(star).defocus_u) < 15000)].tobytes() and 0 < sel.sum() < len(images)
    assert (script.parent / "Downsample" / "job030" / "particles.star").is_file()


def test_two_jobs_at_once_share_no_port_and_print_no_dask_warning(tmp_path: Path) -> None:
    """Two terminals in one project: both ask for the dashboard's port 8787; distributed binds it for
    one and a free port for the other, and neither prints distributed's warning about it."""
    star, _ = simple_set(tmp_path / "project", n_stacks=3, per_stack=8, box=32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    with socket.socket() as first:  # a first job holds 8787 (unless something else already does)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado binds: past TIME_WAIT
        with contextlib.suppress(OSError):
            first.bind(("127.0.0.1", 8787))
            first.listen()
        outputs, runs = _two_jobs(star, tmp_path, env)
    assert [run.returncode for run in runs] == [0, 0], outputs
    links = set()
    for _, err in outputs:
        assert "Warning" not in err and "already in use" not in err, err
        links.update(line.rsplit("dashboard: ", 1)[1].split()[0] for line in err.splitlines() if "dashboard: http" in line)
    assert len(links) == 2 and not any(":8787/" in link for link in links), outputs
    assert all(link.startswith("http://127.0.0.1:") for link in links), links


def _two_jobs(star: Path, cwd: Path, env: dict) -> tuple[list, list]:
    runs = [subprocess.Popen([sys.executable, "-m", "dparticles", "downsample", str(star), "--out", f"d{k}",
                              "--fourier-box", "16"], cwd=cwd, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
    return [run.communicate(timeout=120) for run in runs], runs
