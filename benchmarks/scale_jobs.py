"""Restack and downsample at scale: from the ``restack()`` / ``downsample()`` call to the first task on a
worker, the store step's planning phases, the client's peak memory, and the scheduler's share of a job.

    python benchmarks/scale_jobs.py [--sizes 1e6 1e7] [--batches 100 1000 5000] [--box 16]
                                    [--data bench-data/scale-jobs] [--out bench-data/scale-jobs-out]
                                    [--e2e 2e6 --e2e-box 64]

The sets are those of ``scale_bench.py`` (its generator, with the box set to ``--box``): N particles in
N / 100 sparse stacks of 167 images, 100 of each listed, in file order and shuffled. The copies read
the sparse stacks' zeros, which exercises the whole path; box 16 keeps the outputs small (1 kB a
particle restacked, 256 B downsampled to box 8). Outputs are deleted after each run, the sets at the end.

Every run is a fresh process under ``/usr/bin/time``. It starts dparticles' own embedded cluster first
(as ``cluster_client`` does for a job; 2 workers x 1 thread here), opens the set, then calls the job
on the opened Dataset, which reuses that cluster: cluster start and opening are timed apart from the
call. Definitions:

- *call to first task*: from a ``time.time()`` stamp taken just before the call to the earliest start
  of a task's computation on any worker (the workers' ``startstops``; same machine, same clock).
- *phases*: the store step's functions (``dparticles.store``: ``_plan``, ``_prepare``,
  ``_keep_verified``, ``_graph``, ``write_metadata``, ``write_run_record``, ...), timed by wrapping
  them in this process; "submit" is from the end of ``_graph`` to the first task, "tail" from the end
  of ``watch`` (every result gathered) to the metadata write (the performance report, cluster context).
- *peak client memory*: the client process's peak resident memory during the call (its ``VmHWM``
  reset after opening), and over the whole process (opening included); the scheduler runs in this
  process, as with every embedded cluster. *bytes/particle*: the process's peak less its resident
  memory once the cluster had started (imports, scheduler, dashboard), over the particles; and the
  call's own: its peak less the resident memory just before it (the opened set), over the particles.
- *scheduler share* = 1 - (sum of task compute durations / worker threads) / job wall, where the job
  is from the end of ``_graph`` (graph built, about to be submitted) to the end of ``watch`` (every
  result back in the client); the same against the whole call is given too (planning and metadata
  writing included). Cluster start is excluded from both.

``--e2e N`` adds an end-to-end comparison on a set of N particles of ``--e2e-box`` (file order):
restack against the plain ``copy_file_range`` loop of ``common.py`` (fsync per file, batches of 5000)
and downsample to half the box against its plain FFT loop (ducc0, one stack at a time, 2 threads). It
writes N x box² x 4 bytes (32 GB at 2M of box 64) twice, one after the other; it is refused when the
output's file system has less than 1.5 times that free.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import scale_bench
from scale_bench import IN_USE, make_stacks, make_star, peak_rss, rss, timed

PHASES = ("_check_images", "_plan", "_prepare", "_keep_verified", "_graph", "reset_worker_peaks", "watch",
          "write_metadata", "write_run_record")
SHOWN = {"_plan": "plan", "_prepare": "prepare", "_keep_verified": "keep", "_graph": "graph",
         "submit": "submit", "watch": "tasks", "tail": "tail", "write_metadata": "metadata",
         "write_run_record": "record"}


# ---------------------------------------------------------------------------------------------
# one run, in this (fresh) process

def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def task_clock():
    """A worker plugin summing its tasks' compute time (``startstops``) and noting the first start and
    last stop; defined here so that it is sent by value to the workers."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class TaskClock(WorkerPlugin):
        name = "scale-jobs-task-clock"

        def setup(self, worker) -> None:
            self.worker, self.first, self.last, self.busy, self.n = worker, float("inf"), 0.0, 0.0, 0

        def transition(self, key, start: str, finish: str, **kwargs) -> None:
            ts = self.worker.state.tasks.get(key) if start == "executing" else None
            for ss in ts.startstops if ts is not None else ():
                if ss["action"] == "compute":
                    self.first, self.last = min(self.first, ss["start"]), max(self.last, ss["stop"])
                    self.busy += ss["stop"] - ss["start"]
                    self.n += 1

    return TaskClock()


def clock_of(dask_worker) -> dict:
    c = dask_worker.plugins["scale-jobs-task-clock"]
    return {"first": c.first, "last": c.last, "busy": c.busy, "n": c.n, "threads": dask_worker.state.nthreads}


def instrument(phases: dict[str, list[float]]) -> None:
    """Wrap the store step's functions so that each call's wall-clock start and end land in ``phases``
    (first start, last end, summed seconds, this process's peak memory at the end)."""
    import dparticles.store as store

    for name in PHASES:
        def wrapped(*args, _fn=getattr(store, name), _name=name, **kwargs):
            t0 = time.time()
            try:
                return _fn(*args, **kwargs)
            finally:
                t1 = time.time()
                first, _, total, _ = phases.get(_name, (t0, t1, 0.0, 0))
                phases[_name] = [first, t1, total + t1 - t0, peak_rss()]
        setattr(store, name, wrapped)


def loop_child(job: str, star: Path, out: Path, batch: int, box: int) -> dict:
    """A plain loop of ``common.py`` on a set of ``box`` (its module constants are for box 256)."""
    import common

    common.BOX, common.IMAGE_BYTES = box, box * box * 4
    if job == "copy-loop":
        return common.copy_loop(star, out, batch, fsync=True)
    return common.fft_loop(star, out, box // 2, None, False, threads=2)


def child(job: str, star: Path, out: Path, batch: int, box: int) -> dict:
    if job.endswith("-loop"):
        return loop_child(job, star, out, batch, box)
    t0 = time.perf_counter()
    import dparticles
    from dparticles.cluster import cluster_client

    imports, base = time.perf_counter() - t0, rss()
    phases: dict[str, list[float]] = {}
    instrument(phases)
    quiet = lambda line: None  # noqa: E731
    t0 = time.perf_counter()
    with cluster_client(log=quiet) as client:
        client.register_plugin(task_clock())
        started, cluster_rss = time.perf_counter() - t0, rss()
        t0 = time.perf_counter()
        ds = dparticles.open_particles(star)
        opened, open_peak = time.perf_counter() - t0, peak_rss()
        reset_peak()
        before = rss()
        stamp = time.time()
        if job == "restack":
            dparticles.restack(ds, out, batch_size=batch, log=quiet)
        else:
            dparticles.downsample(ds, out, fourier_box=box // 2, batch_size=batch, log=quiet)
        ended = time.time()
        call_peak = peak_rss()
        clocks = list(client.run(clock_of).values())
    first = min(c["first"] for c in clocks)
    last = max(c["last"] for c in clocks)
    busy = sum(c["busy"] for c in clocks) / sum(c["threads"] for c in clocks)
    job_start, job_end = phases["_graph"][1], phases["watch"][1]
    seconds = {name: phases[name][2] for name in PHASES if name in phases}
    seconds.update(submit=first - job_start, tail=phases["write_metadata"][0] - job_end,
                   before_store=phases["_check_images"][0] - stamp)
    ends = sorted((end, peak, name) for name, (_, end, _, peak) in phases.items())
    peak_in = next((name for _, peak, name in ends if peak >= call_peak - 2**20), "after the store step")
    return {"n": ds.sizes["particle"], "imports": imports, "base": base, "cluster": started,
            "cluster_rss": cluster_rss, "open": opened,
            "open_peak": open_peak, "before": before, "call_peak": call_peak, "call": ended - stamp,
            "first_task": first - stamp, "tasks_wall": last - first, "busy": busy,
            "tasks": sum(c["n"] for c in clocks), "threads": sum(c["threads"] for c in clocks),
            "job_wall": job_end - job_start, "phases": seconds, "peak_in": SHOWN.get(peak_in, peak_in)}


# ---------------------------------------------------------------------------------------------
# the runs

def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def run(job: str, star: Path, out: Path, batch: int, box: int) -> dict:
    wall, peak, stdout, load = timed(me("--child", job, str(star), str(out), str(batch), str(box)))
    shutil.rmtree(out, ignore_errors=True)
    r = json.loads(stdout.splitlines()[-1])
    r.update(process=wall, process_peak=peak, load=load, job=job, batch=batch)
    print(json.dumps(r), flush=True)
    return r


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def tables(rows: list[tuple[str, dict]]) -> str:
    """The runs as markdown: one table of the call, one of the store's phases."""
    lines = ["| particles | order | job | batch | open s | call to first task s | call s | tasks | tasks wall s "
             "| job wall s | scheduler share (job) | scheduler share (call) | call peak GiB | call peak in "
             "| process peak GiB | bytes/particle | bytes/particle (call) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for order, r in rows:
        peak = max(r["call_peak"], r["open_peak"])
        busy = f" (machine {r['load']:.0%} busy before)" if r["load"] > 0.15 else ""
        lines.append(
            f"| {r['n']:,} | {order} | {r['job']} | {r['batch']:,} | {r['open']:.1f} | {r['first_task']:.2f}{busy} "
            f"| {r['call']:.2f} | {r['tasks']:,} | {r['tasks_wall']:.2f} | {r['job_wall']:.2f} "
            f"| {1 - r['busy'] / r['job_wall']:.1%} | {1 - r['busy'] / r['call']:.1%} | {gib(r['call_peak'])} "
            f"| {r['peak_in']} "
            f"| {gib(peak)} | {(peak - r['cluster_rss']) / r['n']:.0f} | {(r['call_peak'] - r['before']) / r['n']:.0f} |")
    names = list(SHOWN)
    lines += ["", "phases of the call (seconds; submit: graph built to first task; tail: results back to the "
              "metadata write):", "",
              "| particles | order | job | batch | before store | " + " | ".join(SHOWN[k] for k in names) + " |",
              "|---:|---|---|---:|---:|" + "---:|" * len(names)]
    for order, r in rows:
        p = r["phases"]
        lines.append(f"| {r['n']:,} | {order} | {r['job']} | {r['batch']:,} | {p['before_store']:.2f} | "
                     + " | ".join(f"{p.get(k, 0.0):.2f}" for k in names) + " |")
    return "\n".join(lines)


def e2e(root: Path, out: Path, n: int, box: int) -> str:
    """Restack and downsample of ``n`` particles of ``box`` against the plain loops, as markdown."""
    need = n * box * box * 4 * 1.5
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need:
        raise SystemExit(f"--e2e {n}: {need / 1e9:.0f} GB free needed in {out}, {free / 1e9:.0f} GB there")
    scale_bench.BOX = box
    make_stacks(root, n // IN_USE)
    star = root / f"e2e_{n}.star"  # beside Extract/: the loops resolve stacks from the STAR file's folder
    make_star(star, n, False, "relion")
    lines = ["| job | method | seconds | process wall s | process peak GiB | seconds / plain loop | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for job, loop in (("restack", "copy-loop"), ("downsample", "fft-loop")):
        wall, peak, stdout, load = timed(me("--child", loop, str(star), str(out / loop), "5000", str(box)))
        shutil.rmtree(out / loop, ignore_errors=True)
        base = json.loads(stdout.splitlines()[-1])["seconds"]
        lines.append(f"| {job} | plain {loop.replace('-', ' ')} | {base:.1f} | {wall:.1f} | {gib(peak)} | 1.00 "
                     f"| the loop alone{f'; machine {load:.0%} busy before' if load > 0.15 else ''} |")
        r = run(job, star, out / job, 5000, box)
        lines.append(f"| {job} | dparticles, call on the opened set | {r['call']:.1f} | {r['process']:.1f} "
                     f"| {gib(r['process_peak'])} | {r['call'] / base:.2f} | tasks {r['tasks_wall']:.1f} s, open "
                     f"{r['open']:.1f} s, cluster start {r['cluster']:.1f} s |")
    star.unlink()
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", type=float, default=[1e6],
                   help="numbers of particles (default 1e6; none: only --e2e)")
    p.add_argument("--box", type=int, default=16, help="image box of the generated stacks (default 16)")
    p.add_argument("--batches", nargs="+", type=int, default=[100, 1000, 5000],
                   help="batch sizes of the restacks at --share-size particles (default 100 1000 5000); "
                        "other runs use 5000, the packaged default")
    p.add_argument("--share-size", type=float, default=1e6, help="size of the batch-size runs (default 1e6)")
    p.add_argument("--data", type=Path, default=Path("bench-data/scale-jobs"), help="data folder")
    p.add_argument("--out", type=Path, default=Path("bench-data/scale-jobs-out"), help="output folder (deleted)")
    p.add_argument("--orders", nargs="+", choices=("file", "shuffled"), default=["file", "shuffled"])
    p.add_argument("--jobs", nargs="+", choices=("restack", "downsample"), default=["restack", "downsample"])
    p.add_argument("--keep", action="store_true", help="keep the generated stacks and STAR files")
    p.add_argument("--e2e", type=float, default=0, help="particles of the end-to-end comparison (default: none)")
    p.add_argument("--e2e-box", type=int, default=64, help="box of the end-to-end comparison (default 64)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        job, star, out, batch, box = a.child
        print(json.dumps(child(job, Path(star), Path(out), int(batch), int(box))))
        return

    out, sizes = a.out.resolve(), sorted(int(s) for s in a.sizes)
    root = {box: (a.data / f"box{box}").resolve() for box in (a.box, a.e2e_box)}  # one set of stacks per box
    try:
        if sizes:
            print(tables(scaled(root[a.box], out, sizes, a)))
        if a.e2e:
            print(f"\nend to end, {int(a.e2e):,} particles of box {a.e2e_box} in file order, batches of 5000:\n")
            print(e2e(root[a.e2e_box], out, int(a.e2e), a.e2e_box))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not a.keep:
            for folder in root.values():
                shutil.rmtree(folder, ignore_errors=True)


def scaled(root: Path, out: Path, sizes: list[int], a: argparse.Namespace) -> list[tuple[str, dict]]:
    """The runs of each size and order; the batch-size runs at ``--share-size``."""
    scale_bench.BOX = a.box  # the generator's box (a module constant of scale_bench)
    t0 = time.perf_counter()
    make_stacks(root, sizes[-1] // IN_USE)
    print(f"stacks: {sizes[-1] // IN_USE} sparse stacks of box {a.box} in {root} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows: list[tuple[str, dict]] = []
    for n in sizes:
        for order in a.orders:
            star = root / "Select" / f"{n}_{order}" / "particles.star"
            make_star(star, n, order == "shuffled", "relion")
            batches = a.batches if n == int(a.share_size) else [5000]
            for job in a.jobs:
                for batch in batches if job == "restack" else [5000]:
                    rows.append((order, run(job, star, out / f"{job}-{n}-{order}-{batch}", batch, a.box)))
    print(f"\nbox {a.box}; 2 CPUs; embedded cluster of {rows[0][1]['threads']} worker threads, started before "
          f"the call (cluster start {rows[0][1]['cluster']:.1f} s, not in the call)\n")
    return rows

if __name__ == "__main__":
    main()
