"""Workers: the downsample job per core against the plain loop, and from 1 to 2 workers.

On one generated set (``--stacks`` x ``--per-stack`` images of 256 x 256 float32, default 40 x 200:
8,000 particles, 2.1 GB; every particle of ``all.star``), downsample 256 -> ``--box`` (64), warm
page cache (the stacks are read again before every timed run), measured in the same run by:

* ``plain loop``: one process, one thread, stack by stack: ``os.preadv`` into one array,
  ``dparticles.kernels.downsample`` with 1 FFT thread, write, ``fsync`` (``common.fft_loop``);
* ``plain loop in a worker``: the same function submitted as one task to dparticles' embedded
  cluster of 1 worker x 1 thread: the worker process itself, without the job's task graph;
* ``dparticles, 1 x 1`` and ``dparticles, 2 x 1``: ``to_stacks(ops.downsample(open_particles(star),
  fourier_box=box), out)`` on dparticles' embedded cluster (``cluster_client``: processes, TLS,
  dashboard) of 1 and 2 workers of 1 thread, its performance report off (a fixed cost at the end,
  measured in ``pipeline_bench.py``). Job wall: opening, planning, tasks and metadata, cluster
  start and shut-down excluded. From the scheduler's task stream: time in tasks (the sum of every
  task's compute time, by layer), their span (first start to last stop), transfers between workers;
  CPU seconds of the worker processes (all threads) and of the client process, which also runs the
  scheduler (``LocalCluster``).

Per core: the plain loop's seconds over the 1 x 1 worker's time in tasks (target >= 0.9), over the
tasks' span and over the job wall; and per particle, the median over the loop's stacks (read,
FFTs, write; syncs apart) against the median over the job's chunks (their read, FFT and write
tasks; the file syncs apart). Scaling: 1 x 1 over 2 x 1, job wall and tasks' span (target >= 1.8).
Peak worker memory is ``RunSummary.peak_worker_memory_bytes``. Every job's output is checked
against the loop's (float32 rounding of different FFT groupings: largest difference <= 1e-4 x std).

Each method is a fresh process under ``/usr/bin/time``; methods take turns, ``--repeats`` rounds
(default 3), and the round with the shortest job wall (loop: loop time) of each is kept. Prints a
markdown table to paste into ``benchmarks/README.md``.

Run: ``python benchmarks/workers_bench.py [--data bench-data] [--repeats 3]`` (12 timed runs; about
6 minutes on 2 CPUs busy with other work, less on idle ones; the set, shared with
``pipeline_bench.py``, is generated once). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BOX, IMAGE_BYTES  # noqa: E402

LOOP, IN_WORKER, ONE, TWO = "plain loop", "plain loop in a worker", "dparticles, 1 x 1", "dparticles, 2 x 1"
PER_CORE_TARGET, SCALING_TARGET = 0.9, 1.8


# ---------------------------------------------------------------------------------------------
# the children, each in its own process

def _quiet(line: str) -> None:
    """The job's log, dropped: the timings are the report."""


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    t = os.times()
    return t.user + t.system


def loop_in_worker(star: str, out: str, box: int) -> dict:
    """``common.fft_loop`` (1 thread, fsync, dparticles' kernels) as one task on a 1 x 1 cluster."""
    from dparticles.cluster import cluster_client
    from dparticles.progress import watch

    with cluster_client(n_workers=1, threads_per_worker=1, processes=True, log=_quiet) as client:
        client.wait_for_workers(1)
        future = client.submit(common.fft_loop, Path(star), Path(out), box, None, False, 1, True, True, pure=False)
        results, summary = watch(client, [future], label="loop", log=_quiet)
    return dict(results[0], worker_peak=summary.peak_worker_memory_bytes)


def job(star: str, out: str, box: int, workers: int, batch: int) -> dict:
    """The downsample job on an embedded cluster of ``workers`` x 1 thread, timed from opening to the
    metadata; the task stream summed by layer, and per chunk."""
    import dask
    import distributed

    from dparticles import ops
    from dparticles.cluster import cluster_client
    from dparticles.dataset import open_particles
    from dparticles.store import to_stacks

    with dask.config.set({"dparticles.report": False}), \
            cluster_client(n_workers=workers, threads_per_worker=1, processes=True, log=_quiet) as client:
        client.wait_for_workers(workers)
        cpu0 = client.run(_cpu), _cpu()  # the workers; this process, which also runs the scheduler
        t0 = time.perf_counter()
        ds = ops.downsample(open_particles(star), fourier_box=box)
        with distributed.get_task_stream(client) as stream:
            result = to_stacks(ds, out, batch_size=batch, log=_quiet)
        wall = time.perf_counter() - t0
        cpu1 = client.run(_cpu), _cpu()
    chunks = ds["images"].data.chunks[0]
    return dict(_tasks(stream.data, chunks), wall=wall, summary_seconds=result.summary.seconds,
                worker_peak=result.summary.peak_worker_memory_bytes, workers=result.summary.n_workers,
                worker_cpu=sum(cpu1[0][w] - cpu0[0][w] for w in cpu1[0]), client_cpu=cpu1[1] - cpu0[1])


def _layer_and_chunk(key: object) -> tuple[str, int | None]:
    """A task key's layer (its name less the token) and its chunk along ``particle`` (None for a
    file-finishing task, whose index is a file)."""
    name, index = (key[0], key[1]) if isinstance(key, tuple) else (str(key), None)
    layer = name.rsplit("-", 1)[0]
    return layer, None if layer == "finish" else index


def _tasks(stream: list[dict], chunks: tuple[int, ...]) -> dict:
    """Compute seconds by layer, their sum and span, transfers, and the median seconds per particle
    over the chunks (every task of a chunk: read, FFT, pick, write)."""
    by_layer: dict[str, float] = defaultdict(float)
    by_chunk: dict[int, float] = defaultdict(float)
    starts, stops, transfer, transfers = [], [], 0.0, defaultdict(int)
    for task in stream:
        layer, chunk = _layer_and_chunk(task["key"])
        for ss in task["startstops"]:
            seconds = ss["stop"] - ss["start"]
            if ss["action"] == "compute":
                by_layer[layer] += seconds
                if chunk is not None:
                    by_chunk[chunk] += seconds
                starts.append(ss["start"])
                stops.append(ss["stop"])
            elif ss["action"] == "transfer":  # the inputs of this task, fetched from another worker
                transfer += seconds
                transfers[layer] += 1
    per_particle = [by_chunk[k] / chunks[k] for k in by_chunk]
    return {"tasks": sum(by_layer.values()), "span": max(stops) - min(starts), "by_layer": dict(by_layer),
            "transfer": transfer, "transfers": dict(transfers), "per_particle": statistics.median(per_particle),
            "n_tasks": len(stream)}


# ---------------------------------------------------------------------------------------------
# runs and results

@dataclass
class Run:
    method: str
    seconds: float  # loops: the loop alone; jobs: the job wall
    rep: dict  # the run's own report (JSON line)
    process_peak: int  # bytes, /usr/bin/time


def commands(ps: common.ParticleSet, box: int, batch: int, out: Path) -> dict[str, list[str]]:
    star, me = str(ps.all_star), str(Path(__file__).resolve())
    child = [sys.executable, me, "--child"]
    return {
        LOOP: common.runner("fft-loop", star, str(out), "--box", str(box), "--threads", "1", "--fsync", "--kernels"),
        IN_WORKER: [*child, "loop-in-worker", star, str(out), "--box", str(box)],
        ONE: [*child, "job", star, str(out), "--box", str(box), "--workers", "1", "--batch", str(batch)],
        TWO: [*child, "job", star, str(out), "--box", str(box), "--workers", "2", "--batch", str(batch)],
    }


def read_outputs(folder: Path) -> np.ndarray:
    """Every image of the ``.mrcs`` files under ``folder``, in name order (the loop's stacks, or the job's batches)."""
    from dparticles.formats.mrc import read_chunk, read_info

    infos = [read_info(str(p)) for p in sorted(folder.rglob("*.mrcs"))]
    return np.concatenate([read_chunk([info], [(0, 0, info.n)]) for info in infos])


# ---------------------------------------------------------------------------------------------
# tables

def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def tables(best: dict[str, Run], n: int, errors: dict[str, float]) -> str:
    """The per-core table, the scaling table and one row per run."""
    loop, inw, one, two = (best[m] for m in (LOOP, IN_WORKER, ONE, TWO))
    lr, o, t = loop.rep, one.rep, two.rep
    loop_pp = statistics.median(s / (lr["n"] / len(lr["stack_seconds"])) for s in lr["stack_seconds"])
    per_core = lr["seconds"] / o["tasks"]
    lines = [
        "| per core: plain loop (1 thread) against 1 worker x 1 thread | plain loop | worker | loop / worker | target |",
        "|---|---:|---:|---:|---|",
        f"| time in tasks, s (sum of the job's task compute times) | {lr['seconds']:.2f} | {o['tasks']:.2f} | "
        f"{per_core:.2f} | >= {PER_CORE_TARGET}: {_verdict(per_core, PER_CORE_TARGET)} |",
        f"| tasks' span, s (first start to last stop) | {lr['seconds']:.2f} | {o['span']:.2f} | "
        f"{_ratio(lr['seconds'], o['span'])} | |",
        f"| job wall, s (open to metadata; cluster start excluded) | {lr['seconds']:.2f} | {o['wall']:.2f} | "
        f"{_ratio(lr['seconds'], o['wall'])} | |",
        f"| CPU s (the loop's process / the worker process over the job, all threads) | {lr['cpu_seconds']:.2f} | "
        f"{o['worker_cpu']:.2f} | {_ratio(lr['cpu_seconds'], o['worker_cpu'])} | |",
        f"| per particle, µs (median over the loop's stacks / the job's chunks; syncs apart) | {loop_pp * 1e6:,.0f} | "
        f"{o['per_particle'] * 1e6:,.0f} | {_ratio(loop_pp, o['per_particle'])} | |",
        f"| the plain loop itself, s (a fresh process / one task in a worker) | {lr['seconds']:.2f} | "
        f"{inw.rep['seconds']:.2f} | {_ratio(lr['seconds'], inw.rep['seconds'])} | |",
        "",
        "| from 1 to 2 workers (1 thread each) | 1 x 1 | 2 x 1 | speed-up | target |",
        "|---|---:|---:|---:|---|",
        f"| job wall, s (cluster start excluded) | {o['wall']:.2f} | {t['wall']:.2f} | {_ratio(o['wall'], t['wall'])} | "
        f">= {SCALING_TARGET}: {_verdict(o['wall'] / t['wall'], SCALING_TARGET)} |",
        f"| tasks' span, s | {o['span']:.2f} | {t['span']:.2f} | {_ratio(o['span'], t['span'])} | "
        f">= {SCALING_TARGET}: {_verdict(o['span'] / t['span'], SCALING_TARGET)} |",
        f"| time in tasks, s (sum over workers) | {o['tasks']:.2f} | {t['tasks']:.2f} | "
        f"{_ratio(o['tasks'], t['tasks'])} | |",
        f"| worker CPU s (sum over workers) | {o['worker_cpu']:.2f} | {t['worker_cpu']:.2f} | "
        f"{_ratio(o['worker_cpu'], t['worker_cpu'])} | |",
        f"| RunSummary.seconds (submission to the last result) | {o['summary_seconds']:.2f} | "
        f"{t['summary_seconds']:.2f} | {_ratio(o['summary_seconds'], t['summary_seconds'])} | |",
        "",
        "| run | seconds | particles/s | tasks | time in tasks by layer, s | transfers (fetching layer) | "
        "CPU s: workers / client and scheduler | peak worker memory | process peak | largest difference from the loop |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in (loop, inw, one, two):
        rep = r.rep
        layers = ", ".join(f"{k} {v:.2f}" for k, v in sorted(rep.get("by_layer", {}).items(), key=lambda kv: -kv[1]))
        if "transfers" in rep:
            count = sum(rep["transfers"].values())
            fetching = ", ".join(f"{k} {v}" for k, v in sorted(rep["transfers"].items()))
            transfers = f"{count} in {rep['transfer']:.2f} s" + (f" ({fetching})" if fetching else "")
            cpu = f"{rep['worker_cpu']:.2f} / {rep['client_cpu']:.2f}"
            what = "job wall"
        else:
            transfers, cpu, what = "-", f"{rep['cpu_seconds']:.2f} (the loop)", "the loop"
        lines.append(f"| {r.method} | {r.seconds:.2f} ({what}) | {n / r.seconds:,.0f} | {rep.get('n_tasks', 1 if r.method == IN_WORKER else '-')} | "
                     f"{layers or '-'} | {transfers} | {cpu} | {common.fmt_bytes(rep.get('worker_peak'))} | "
                     f"{common.fmt_bytes(r.process_peak)} | {errors.get(r.method, 0.0):.1e} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("bench-data"), help="data folder, reused (default ./bench-data)")
    p.add_argument("--stacks", type=int, default=40, help="stacks in the generated set (default 40)")
    p.add_argument("--per-stack", type=int, default=200, help="images per stack (default 200)")
    p.add_argument("--box", type=int, default=64, help="output box (default 64)")
    p.add_argument("--batch", type=int, default=5000, help="particles per output file of the job (default 5000)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all methods; the fastest of each kept")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="seconds to wait at most for idle CPUs before each timed run (default 10)")
    a = p.parse_args()
    common.QUIET_LIMIT = a.quiet_wait
    ps = common.particle_set(a.data, n_stacks=a.stacks, per_stack=a.per_stack)
    out = ps.root.parent / "out-workers"
    print(f"workers: downsample {BOX} -> {a.box} of {ps.n} particles ({ps.n * IMAGE_BYTES / 1e9:.2f} GB, "
          f"{ps.n_stacks} stacks of {ps.per_stack}), warm page cache; {common.machine()}", flush=True)
    cmds = commands(ps, a.box, a.batch, out)
    best: dict[str, Run] = {}
    errors: dict[str, float] = {}
    reference = None
    t0 = time.monotonic()
    for rnd in range(a.repeats):
        for method, cmd in cmds.items():
            common.clean(out)
            common.warm_up(ps)
            _, peak, stdout, _ = common.run_timed(cmd)
            rep = common.last_json(stdout)
            images = read_outputs(out)
            if method == LOOP and reference is None:
                reference = images
            errors[method] = max(errors.get(method, 0.0), common.largest_difference(images, reference, method))
            run = Run(method, rep["wall"] if "wall" in rep else rep["seconds"], rep, peak)
            if method not in best or run.seconds < best[method].seconds:
                best[method] = run
            print(f"  round {rnd + 1}: {method}: {run.seconds:.2f} s", flush=True)
    common.clean(out)
    runs = len(cmds) * a.repeats
    busy = (f"{len(common.BUSY_RUNS)} of the {runs} timed runs started while other work kept the CPUs busy "
            f"({min(common.BUSY_RUNS):.0%}-{max(common.BUSY_RUNS):.0%})" if common.BUSY_RUNS
            else f"the CPUs were idle before each of the {runs} timed runs")
    print(f"\n{runs} timed runs in {time.monotonic() - t0:.0f} s\n")
    print(f"Downsample {BOX} -> {a.box} of {ps.n:,} particles ({ps.n_stacks} stacks of {ps.per_stack}), warm page "
          f"cache, best of {a.repeats}; {common.machine()}; {busy}.\n")
    print(tables(best, ps.n, errors))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        c = argparse.ArgumentParser()
        c.add_argument("kind", choices=("loop-in-worker", "job"))
        c.add_argument("star")
        c.add_argument("out")
        c.add_argument("--box", type=int, required=True)
        c.add_argument("--workers", type=int, default=1)
        c.add_argument("--batch", type=int, default=5000)
        ca = c.parse_args(sys.argv[2:])
        if ca.kind == "job":
            print(json.dumps(job(ca.star, ca.out, ca.box, ca.workers, ca.batch)))
        else:
            print(json.dumps(loop_in_worker(ca.star, ca.out, ca.box)))
    else:
        main()
