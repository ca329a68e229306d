"""Memory: a downsample that pads far beyond its input, on one worker of one thread, against the budget.

346 particles of 128 x 128 float32 (the first 346 of ``relion31_sim_ribo70S_b128``, one 64 MB input
chunk), padded in real space to ``--crop-box`` (2048) and Fourier-cropped to ``--fourier-box`` (32),
written in batches of 5 on dparticles' embedded cluster of 1 worker x 1 thread, once per
``--budgets`` value of ``dparticles.memory-budget`` (default 2GB, and 1TB, under which no chunk is
cut: the tasks as they were before tasks were sized by their peak, one per 64 MB of input).

For each run: the particles per task (``ops.downsample``'s chunks), the model's peak of the largest
task (``kernels.task_peak_bytes``), the worker's peak resident memory
(``RunSummary.peak_worker_memory_bytes``), the job's wall time (cluster start-up included) and the
whole process tree's peak (``/usr/bin/time``). The outputs of all runs must be the same bytes.

Run: ``python benchmarks/memory_bench.py [--data DIR] [--budgets 2GB 1TB]`` (the 1TB run needs
about 12 GiB of free memory; leave it out with ``--budgets 2GB``). Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SOURCE = Path("/work/shared/data/real/relion31_sim_ribo70S_b128/Extract/job007/particles.star")
N = 346


def run(source: Path, out: Path, n: int, crop_box: int, fourier_box: int, budget: str) -> dict:
    """One job in this process (the runner), reported as one JSON line."""
    import dask

    import dparticles
    from dparticles import kernels, ops

    t0 = time.perf_counter()
    with dask.config.set({"dparticles.memory-budget": budget, "dparticles.report": False}):
        ds = dparticles.open_particles(source).isel(particle=slice(n))
        chunks = ops.downsample(ds, crop_box=crop_box, fourier_box=fourier_box).images.data.chunks[0]
        report = {"tasks": len(chunks), "per_task": max(chunks),
                  "model": kernels.task_peak_bytes(max(chunks), int(ds.sizes["x"]), crop_box, [fourier_box])}
        try:
            result = dparticles.downsample(ds, out, crop_box=crop_box, fourier_box=fourier_box, batch_size=5,
                                           cluster={"n_workers": 1, "threads_per_worker": 1}, log=lambda line: None)
        except Exception as exc:  # noqa: BLE001 - a run that dies is a result here
            return {**report, "seconds": time.perf_counter() - t0, "worker_peak": None, "pixels": None,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    digest = hashlib.sha256()
    for stack in sorted((out / "stacks").glob("*.mrcs")):
        digest.update(stack.read_bytes()[1024:])  # the pixels; headers name the run's time
    return {**report, "seconds": time.perf_counter() - t0, "worker_peak": result[0].summary.peak_worker_memory_bytes,
            "pixels": digest.hexdigest(), "error": ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--source", type=Path, default=SOURCE, help="STAR file of 128-px particles")
    p.add_argument("--n", type=int, default=N, help="particles (the first n)")
    p.add_argument("--crop-box", type=int, default=2048)
    p.add_argument("--fourier-box", type=int, default=32)
    p.add_argument("--budgets", nargs="+", default=["2GB", "1TB"], help="dparticles.memory-budget values")
    p.add_argument("--data", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    p.add_argument("--run", nargs=2, metavar=("BUDGET", "OUT"), help=argparse.SUPPRESS)  # the runner
    a = p.parse_args()
    if a.run:
        print(json.dumps(run(a.source, Path(a.run[1]), a.n, a.crop_box, a.fourier_box, a.run[0])))
        return
    work = Path(tempfile.mkdtemp(prefix="memory-bench-", dir=a.data))
    rows = ["| memory budget | particles per task | tasks | model peak of a task | worker peak | process tree "
            "peak | seconds | result |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    pixels = set()
    try:
        for budget in a.budgets:
            out = work / f"out-{budget}"
            wall, peak, stdout, _ = common.run_timed(
                [sys.executable, __file__, "--source", str(a.source), "--n", str(a.n), "--crop-box", str(a.crop_box),
                 "--fourier-box", str(a.fourier_box), "--run", budget, str(out)])
            r = common.last_json(stdout)
            pixels |= {r["pixels"]} - {None}
            rows.append(f"| {budget} | {r['per_task']} | {r['tasks']} | {common.fmt_bytes(r['model'])} | "
                        f"{common.fmt_bytes(r['worker_peak'])} | {common.fmt_bytes(peak)} | {r['seconds']:.1f} | "
                        f"{r['error'] or 'written'} |")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.n} particles of 128 px, crop box {a.crop_box}, Fourier box {a.fourier_box}, 1 worker x 1 thread; "
          f"{common.machine()}")
    print("\n".join(rows))
    print("outputs: " + ("DIFFERENT between runs" if len(pixels) > 1 else "the same bytes in every run written"))


if __name__ == "__main__":
    main()
