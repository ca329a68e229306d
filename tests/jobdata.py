"""Generated particle sets big enough for many batches, output trees compared byte for byte, and a
watcher that kills a worker while it writes a batch. Shared by tests/test_faults.py and tests/hpc."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import image_names, make_stack, optics_table, write_star

TMP_MARK = ".dparticles-tmp"   # what dparticles.safe.tmp_path puts in a temporary file's name


def shuffled_set(folder: Path, *, n_stacks: int, per_stack: int, box: int, pixel_size: float = 1.2,
                 seed: int = 0) -> Path:
    """``n_stacks`` stacks of ``per_stack`` random float32 images; a 3.1 ``particles.star`` naming
    nine in ten of them in a shuffled order (so every batch reads pieces of several stacks), with
    poses and shifts so that downsample can recentre. Returns the STAR path."""
    rng = np.random.default_rng(seed)
    names = []
    for k in range(n_stacks):
        make_stack(folder / "Extract" / f"s{k}.mrcs", per_stack, box, seed=seed + 1 + k)
        names += image_names(range(per_stack), f"Extract/s{k}.mrcs")
    names = np.array(names, dtype=object)
    keep = rng.permutation(len(names))[: len(names) * 9 // 10]
    n = len(keep)
    particles = pd.DataFrame({
        "rlnImageName": names[keep], "rlnMicrographName": [f"mic_{i % 7:03d}.mrc" for i in keep],
        "rlnCoordinateX": rng.uniform(0, 4000, n).round(1), "rlnCoordinateY": rng.uniform(0, 4000, n).round(1),
        "rlnDefocusU": rng.uniform(1e4, 2e4, n).round(2), "rlnDefocusV": rng.uniform(1e4, 2e4, n).round(2),
        "rlnDefocusAngle": rng.uniform(0, 180, n).round(2), "rlnAngleRot": rng.uniform(-180, 180, n).round(3),
        "rlnAngleTilt": rng.uniform(0, 180, n).round(3), "rlnAnglePsi": rng.uniform(-180, 180, n).round(3),
        "rlnOriginXAngst": rng.uniform(-6, 6, n).round(3), "rlnOriginYAngst": rng.uniform(-6, 6, n).round(3),
        "rlnOpticsGroup": np.ones(n, dtype=int)})
    return write_star(folder / "particles.star", particles, optics_table([pixel_size], box))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def star_text(path: Path, folder: Path) -> str:
    """A STAR file's text with ``folder`` written as ``OUT``: outputs outside the project directory
    name their stacks by absolute path, so two runs into two folders differ only there."""
    return Path(path).read_text().replace(str(Path(folder).absolute()), "OUT")


def assert_same_output(got: Path, want: Path) -> None:
    """The same files under both folders, byte for byte: stacks/*.mrcs, the run marker and records
    (of each size's folder), particles.star as text but for the folder's own path, a run record
    (job.json, note.txt, report.html: when it ran differs), and nothing else (no temporary left)."""
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    stars = [k for k in b if k.rsplit("/", 1)[-1] == "particles.star"]
    assert stars and [k for k in b if "stacks/" in k and k.endswith(".mrcs")]
    for k in stars:
        assert star_text(Path(got) / k, got) == star_text(Path(want) / k, want), k
    records = [k for k in b if k.rsplit("/", 1)[-1] in ("job.json", "note.txt", "report.html")]  # times differ
    assert len(records) == 3 * len(stars)
    differ = [k for k in b if a[k] != b[k] and k not in stars and k not in records]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:5]}"


def batch_files(dirs: list[Path]) -> int:
    """Batch files complete under their final name, over the output folders."""
    return sum(1 for d in dirs if (d / "stacks").is_dir()
               for e in os.scandir(d / "stacks") if e.name.endswith(".mrcs"))


def mid_write(dirs: list[Path], pid: int) -> bool:
    """Whether process ``pid`` has a batch open under its temporary name in one of ``dirs``."""
    mark = f"{TMP_MARK}-{pid}"
    try:
        return any(e.name.endswith(mark) for d in dirs if (d / "stacks").is_dir() for e in os.scandir(d / "stacks"))
    except FileNotFoundError:   # renamed while listing
        return False


class Killer(threading.Thread):
    """Runs ``kill()`` once, while the job runs: as soon as ``pid`` writes a batch (its temporary
    file is there) after at least ``min_done`` batch files are complete, or, failing that, once a third
    of ``n_files`` are complete and ``busy()`` says the victim is working. Records how far the job was."""

    def __init__(self, dirs: list[Path], pid: int, n_files: int, kill: Callable[[], object],
                 busy: Callable[[], bool] = lambda: True, min_done: int = 2, timeout: float = 120):
        super().__init__(daemon=True)
        self.dirs, self.pid, self.n_files, self._kill, self.busy = dirs, pid, n_files, kill, busy
        self.min_done, self.timeout = min_done, timeout
        self.done_before: int | None = None
        self.during_write = False
        self.result: object = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            done = batch_files(self.dirs)
            writing = mid_write(self.dirs, self.pid)
            if done >= self.min_done and (writing or (done >= self.n_files // 3 and self.busy())):
                self.done_before, self.during_write = done, writing
                self.result = self._kill()
                return
            time.sleep(0.001)
