"""Pipeline: the rebuilt restack and downsample (open_particles -> ops -> to_stacks) against their targets.

One run on a generated set of 40 stacks x 200 particles of 256 x 256 float32 (8,000 particles,
2.1 GB) of which 60% are in use (4,800 particles, 1.26 GB: a random 60% of each stack, in stack
order), warm page cache (the stacks are read again before every timed run, in case other work
dropped the cache). Every method is a fresh process under ``/usr/bin/time``; methods take turns
(``--repeats`` rounds, the fastest of each kept), so that other work on the machine hits them
alike. Everything runs from one folder holding ``particles.star`` (the selection),
``shuffled.star`` (the same particles in a random order) and ``Extract/`` (links to the stacks),
as a user runs RELION: its relative image paths resolve from there.

Most dparticles rows are a small driver (``--child driver``): the job as ``open_particles`` ->
``ops.downsample`` -> ``to_stacks``, on a cluster it starts first and passes as the active client,
timed phase by phase: interpreter start (from the process's start time in ``/proc``), imports,
cluster start, opening (+ ops), planning, graph and submission, tasks, metadata, cluster
shut-down and exit; the file-finishing tasks (sync, record, rename) from the scheduler's task
stream. Clusters: ``dparticles`` (its own embedded cluster, as the command line starts it),
``processes`` (a plain ``LocalCluster(processes=True)``, 2 workers x 1 thread) and ``threads``
(``LocalCluster(processes=False)``, 1 worker x 2 threads, inproc://).

Targets, and what measures them (ratios of process wall times in this run; tasks beside them):

1. one output file (batch size >= particles) against the same job written as files of 200
   particles, restack and downsample 256 -> 64 (driver, ``dparticles`` cluster): the slower within
   1.15x of the faster;
2. the same particles listed in a shuffled order restack within 1.3x of the time in file order;
3. the command line as a user runs it (``python -m dparticles.cli restack|downsample ...``):
   restack <= 1.0x ``relion_stack_create --i particles.star --o out --one_by_one``; downsample
   256 -> 64 <= 0.33x ``relion_image_handler --i particles.star --o out --rescale_angpix 4``
   (pixel size 1 Å; with a STAR input RELION writes ``Extract/stack_NNNN_out.mrcs`` beside the
   input stacks and ``particles_out.star``);
4. the lazy API in one Python process,
   ``to_stacks(ops.downsample(open_particles(star), fourier_box=64), out)``, with the embedded
   cluster it starts (and, as a second row, under a user's ``distributed.Client()``), within 10%
   of the command line;
5. peak worker memory (``RunSummary.peak_worker_memory_bytes``) below 500 MB (5e8 bytes) in every
   run, from files of 200 particles to one file of 4,800 (1.26 GB);
6. the fixed cost of the 4,800-particle job, phase by phase, and the ``processes`` against the
   ``threads`` cluster for both jobs; ``-X importtime`` says which packages the imports are.
   A downsample with 8 MiB dask chunks (``open_particles(chunks=32)``) instead of the default
   64 MiB shows what the chunk size does to time and memory.

References in the same run: the fastest plain loops of ``common.py`` (``os.copy_file_range`` with
an ``fsync`` per output file, the same durability as dparticles; ducc0 FFTs per stack with 2
threads) and RELION 3.1.

Run: ``python benchmarks/pipeline_bench.py [--data bench-data] [--repeats 3]`` (a round of 21 timed
runs takes about 3 minutes on 2 CPUs). Not a test.
"""

from __future__ import annotations

import time

T_TOP = (time.clock_gettime(time.CLOCK_BOOTTIME), time.perf_counter())  # a driver child's first moment

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BOX, IMAGE_BYTES, PIXEL_SIZE  # noqa: E402

N_STACKS, PER_STACK = 40, 200
MANY = 200  # particles per file of the many-files runs
ONE = 5000  # particles per file of the one-file runs (dparticles' default batch size, >= 4,800)
SMALL = 64  # downsample 256 -> 64
SMALL_CHUNK = 32  # particles per dask chunk of the row that reads 8 MiB chunks instead of the default 64 MiB
PEAK_LIMIT = 500 * 10**6  # bytes
RELION_SUFFIX = "out"  # relion_image_handler --o with a STAR input: a suffix of each stack's name


# ---------------------------------------------------------------------------------------------
# the run folder

def run_folder(ps: common.ParticleSet, data: Path) -> Path:
    """``data/pipeline`` with links to the stacks, ``particles.star`` (the selection) and
    ``shuffled.star`` (the same rows in a random order)."""
    work = data.resolve() / "pipeline"
    (work / "Extract").mkdir(parents=True, exist_ok=True)
    for name in ps.stacks:
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ps.root / name)
    text = ps.sel_star.read_text()
    (work / "particles.star").write_text(text)
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if re.match(r"^\d+@", line)]
    import numpy as np

    order = np.random.default_rng(3).permutation(len(rows))
    shuffled = lines[:rows[0]] + [lines[rows[k]] for k in order] + lines[rows[-1] + 1:]
    (work / "shuffled.star").write_text("\n".join(shuffled) + "\n")
    return work


# ---------------------------------------------------------------------------------------------
# methods and their results

@dataclass
class Method:
    name: str
    table: str  # "restack" or "downsample"
    kind: str  # "loop", "relion", "cli", "lazy" or "driver"
    cmd: Callable[[Path], list[str]]
    check: Callable[[Path], None] | None = None
    strays: Callable[[], list[Path]] = lambda: []  # outputs a method writes outside its folder
    cluster: str = ""  # driver runs: "dparticles", "processes" or "threads"
    variant: str = ""  # driver runs: "1 file", "24 files of 200", "1 file, shuffled", ...


@dataclass
class Row:
    method: str
    wall: float  # process wall time
    cpu: float = 0.0  # user + system seconds of the process and its waited-for children (the workers)
    sync: float = 0.0  # seconds a sync right after the run took: its writes not yet on disk
    job: float | None = None  # the loop alone; for a driver, opening + to_stacks (cluster start excluded)
    tasks: float | None = None  # RunSummary.seconds
    worker_peak: int | None = None
    process_peak: int | None = None
    note: str = ""
    phases: dict = field(default_factory=dict)
    workers: str = ""


SUMMARY = re.compile(r"tasks? in ([\d.]+) s.*? on (\d+) workers?.*?(?:peak worker memory|peak memory per worker|"
                     r"at most) ([\d.]+ [kKMGT]i?B)")


def parse(m: Method, wall: float, peak: int, stdout: str, out: Path) -> Row:
    from dask.utils import parse_bytes

    cpu = common.LAST_CPU
    if m.kind == "relion":
        return Row(m.name, wall, cpu, process_peak=peak)
    if m.kind == "cli":
        record = out / "job.json"
        if record.is_file():  # the run record the command writes
            s = json.loads(record.read_text())["summary"]
            return Row(m.name, wall, cpu, tasks=s["seconds"], worker_peak=s["peak_worker_memory_bytes"],
                       process_peak=peak, workers=f"{s['n_workers']} x 1")
        found = SUMMARY.search(stdout + common.LAST_STDERR)  # older versions: the summary line of the log
        if not found:
            raise SystemExit(f"{m.name}: no run summary in its output:\n{stdout[-2000:]}")
        return Row(m.name, wall, cpu, tasks=float(found.group(1)), worker_peak=parse_bytes(found.group(3)),
                   process_peak=peak, workers=f"{found.group(2)} x 1")
    rep = common.last_json(stdout)
    if m.kind == "loop":
        return Row(m.name, wall, cpu, job=rep["seconds"], process_peak=peak, note="job s: the loop alone")
    if m.kind == "lazy":
        return Row(m.name, wall, cpu, job=rep["seconds"], tasks=rep["task_seconds"], worker_peak=rep["worker_peak"],
                   process_peak=peak, workers=f"{rep['workers']} x 1", note="job s: from `import dparticles` on")
    phases = dict(rep["phases"])
    phases["exit"] = max(0.0, wall - rep["elapsed"])
    note = (f"{rep['graph_tasks']} tasks in the image graph, {rep['store_tasks']} store tasks; file finishing "
            f"{rep['finish_seconds']:.2f} s, of it after the last piece {rep['tail']:.2f} s")
    return Row(m.name, wall, cpu, job=rep["job"], tasks=rep["task_seconds"], worker_peak=rep["worker_peak"],
               process_peak=peak, phases=phases, workers=rep["workers"], note=note)


def out_size(out: Path, n: int, box: int, files: int) -> None:
    """The output folder holds ``files`` stacks of ``n`` images of ``box`` float32 in all."""
    stacks = sorted((out / "stacks").glob("*.mrcs"))
    size = sum(p.stat().st_size for p in stacks)
    if len(stacks) != files or size != files * 1024 + n * box * box * 4:
        raise SystemExit(f"{out}: {len(stacks)} stacks of {size} bytes, expected {files} of "
                         f"{files * 1024 + n * box * box * 4}")


def images_in(paths: list[Path], box: int) -> int:
    import numpy as np

    total = 0
    for p in paths:
        nx, ny, nz = np.fromfile(p, dtype="<i4", count=3)
        if (nx, ny) != (box, box) or p.stat().st_size != 1024 + int(nz) * box * box * 4:
            raise SystemExit(f"{p}: {nx}x{ny}x{nz} in {p.stat().st_size} bytes")
        total += int(nz)
    return total


def methods(work: Path, n: int) -> list[Method]:
    py, me = sys.executable, str(Path(__file__).resolve())
    files = -(-n // MANY)
    sel, shuf = str(work / "particles.star"), str(work / "shuffled.star")

    def stacks(box: int, k: int) -> Callable[[Path], None]:
        return lambda o: out_size(o, n, box, k)

    def relion_stack(o: Path) -> None:
        if images_in([o / "particles.mrcs"], BOX) != n:
            raise SystemExit("relion_stack_create wrote the wrong number of images")

    def relion_outputs() -> list[Path]:
        return [Path(p) for p in glob.glob(str(work / "Extract" / f"*_{RELION_SUFFIX}.mrcs"))] + \
            [work / f"particles_{RELION_SUFFIX}.star"]

    def relion_small(o: Path) -> None:
        if images_in([p for p in relion_outputs() if p.suffix == ".mrcs"], SMALL) != n:
            raise SystemExit("relion_image_handler wrote the wrong number of images")

    def driver(job: str, cluster: str, variant: str, *, star: str = sel, batch: int = ONE,
               chunks: int | None = None) -> Method:
        box, k = (BOX if job == "restack" else SMALL), -(-n // batch)
        extra = [] if chunks is None else ["--chunks", str(chunks)]
        return Method(f"driver {job}, {cluster}, {variant}", job, "driver",
                      lambda o: [py, me, "--child", "driver", star, str(o), "--job", job, "--cluster", cluster,
                                 "--batch", str(batch), *extra],
                      stacks(box, k), cluster=cluster, variant=variant)

    rescale = f"{PIXEL_SIZE * BOX / SMALL:g}"
    return [
        # restack: targets 1, 2, 3, 5, 6
        Method("copy_file_range loop, fsync, 1 file", "restack", "loop",
               lambda o: common.runner("copy-loop", sel, str(o / "stacks"), "--batch", str(ONE), "--fsync"),
               stacks(BOX, 1)),
        Method(f"copy_file_range loop, fsync, {files} files of {MANY}", "restack", "loop",
               lambda o: common.runner("copy-loop", sel, str(o / "stacks"), "--batch", str(MANY), "--fsync"),
               stacks(BOX, files)),
        Method("copy_file_range loop, fsync, 1 file, shuffled", "restack", "loop",
               lambda o: common.runner("copy-loop", shuf, str(o / "stacks"), "--batch", str(ONE), "--fsync"),
               stacks(BOX, 1)),
        Method("relion_stack_create --one_by_one", "restack", "relion",
               lambda o: ["relion_stack_create", "--i", "particles.star", "--o", str(o / "particles"), "--one_by_one"],
               relion_stack),
        Method("relion_stack_create --one_by_one, shuffled", "restack", "relion",
               lambda o: ["relion_stack_create", "--i", "shuffled.star", "--o", str(o / "particles"), "--one_by_one"],
               relion_stack),
        Method("dparticles CLI restack", "restack", "cli",
               lambda o: [py, "-m", "dparticles.cli", "restack", "particles.star", "--out", str(o)], stacks(BOX, 1)),
        driver("restack", "dparticles", "1 file"),
        driver("restack", "dparticles", f"{files} files of {MANY}", batch=MANY),
        driver("restack", "dparticles", "1 file, shuffled", star=shuf),
        driver("restack", "processes", "1 file"),
        driver("restack", "threads", "1 file"),
        # downsample 256 -> 64: targets 1, 3, 4, 5, 6
        Method("plain loop (2 threads)", "downsample", "loop",
               lambda o: common.runner("fft-loop", sel, str(o), "--box", str(SMALL), "--threads", "2")),
        Method(f"relion_image_handler --i particles.star --o {RELION_SUFFIX} --rescale_angpix {rescale}",
               "downsample", "relion",
               lambda o: ["relion_image_handler", "--i", "particles.star", "--o", RELION_SUFFIX, "--rescale_angpix",
                          rescale],
               relion_small, strays=relion_outputs),
        Method("dparticles CLI downsample", "downsample", "cli",
               lambda o: [py, "-m", "dparticles.cli", "downsample", "particles.star", "--out", str(o),
                          "--fourier-box", str(SMALL)], stacks(SMALL, 1)),
        Method("lazy API, embedded cluster", "downsample", "lazy",
               lambda o: [py, me, "--child", "lazy", sel, str(o)], stacks(SMALL, 1)),
        Method("lazy API, distributed.Client()", "downsample", "lazy",
               lambda o: [py, me, "--child", "lazy-client", sel, str(o)], stacks(SMALL, 1)),
        driver("downsample", "dparticles", "1 file"),
        driver("downsample", "dparticles", f"{files} files of {MANY}", batch=MANY),
        driver("downsample", "dparticles", f"1 file, chunks of {SMALL_CHUNK} (8 MiB)", chunks=SMALL_CHUNK),
        driver("downsample", "processes", "1 file"),
        driver("downsample", "threads", "1 file"),
    ]


CLUSTERS = {
    "dparticles": "dparticles' embedded cluster (cluster_client(), what the CLI starts): LocalCluster(processes=True), "
                  "2 workers x 1 thread on this machine, dashboard on, TLS in versions that have it",
    "processes": "LocalCluster(processes=True), 2 workers x 1 thread, no dashboard",
    "threads": "LocalCluster(processes=False), 1 worker x 2 threads (inproc://), no dashboard",
}


# ---------------------------------------------------------------------------------------------
# the children: lazy API and the phase driver

def _process_start() -> float:
    """This process's start, in seconds since boot (``/proc/self/stat``, field 22, clock ticks)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def lazy_child(star: str, out: str, own_client: bool) -> None:
    """The lazy API as a user writes it; with ``own_client`` under ``distributed.Client()``."""
    t0 = time.perf_counter()
    import dparticles

    def run():
        return dparticles.to_stacks(dparticles.ops.downsample(dparticles.open_particles(star), fourier_box=SMALL), out)

    if own_client:
        import distributed

        with distributed.Client():
            result = run()
    else:
        result = run()
    s = result.summary
    print(json.dumps({"seconds": time.perf_counter() - t0, "task_seconds": s.seconds, "workers": s.n_workers,
                      "worker_peak": s.peak_worker_memory_bytes}))


def driver_child(star: str, out: str, job: str, cluster: str, batch: int, chunks: int | None) -> None:
    """The job, phase by phase, on the given kind of cluster (the active client of the job); the
    duration of its file finishing tasks from the scheduler's task stream."""
    boot, t = T_TOP
    phases = {"interpreter": boot - _process_start()}
    start = t - phases["interpreter"]  # on the perf_counter clock

    def mark(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    import contextlib
    import logging

    import distributed

    import dparticles.store as store
    from dparticles import ops
    from dparticles.cluster import cluster_client
    from dparticles.dataset import open_particles

    mark("imports")
    at: dict[str, float] = {}

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            at[name] = time.perf_counter()
            return result
        return wrapper

    planner = "_prepare" if hasattr(store, "_prepare") else "_plan"  # the last step before the cluster is used
    setattr(store, planner, timed(getattr(store, planner), "planned"))
    watch = store.watch

    def timed_watch(*args, **kwargs):
        at["submitted"] = time.perf_counter()
        result = watch(*args, **kwargs)
        at["watched"] = time.perf_counter()
        return result

    store.watch = timed_watch
    quiet = logging.CRITICAL
    with contextlib.ExitStack() as stack:
        if cluster == "dparticles":
            client = stack.enter_context(cluster_client(log=lambda line: None))
        elif cluster == "processes":
            lc = stack.enter_context(distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                              host="127.0.0.1", dashboard_address=None,
                                                              silence_logs=quiet))
            client = stack.enter_context(distributed.Client(lc))
        else:  # in-process workers speak inproc://; no host
            lc = stack.enter_context(distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                                              dashboard_address=None, silence_logs=quiet))
            client = stack.enter_context(distributed.Client(lc))
        workers = client.scheduler_info(n_workers=-1)["workers"]
        shape = f"{len(workers)} x {max(w['nthreads'] for w in workers.values())}"
        mark("cluster start")
        t_job = time.perf_counter()
        ds = open_particles(star, chunks=chunks)
        if job == "downsample":
            ds = ops.downsample(ds, fourier_box=SMALL)
        graph_tasks = len(ds["images"].data.__dask_graph__())
        mark("open")
        with distributed.get_task_stream(client) as stream:
            result = store.to_stacks(ds, out, batch_size=batch, label=job, log=lambda line: None)
        for name, key in (("plan", "planned"), ("graph + submit", "submitted"), ("tasks", "watched")):
            if key in at:
                phases[name] = at[key] - t
                t = at[key]
        # dask's report (when kept) is timed by the run itself, in its record
        phases["report"] = json.loads((Path(out) / "job.json").read_text()).get("phases", {}).get("dask report", 0.0)
        t += phases["report"]
        mark("metadata")
        t_job = time.perf_counter() - t_job
    mark("shut-down")
    finish, pieces, last = 0.0, 0.0, 0.0
    for task in stream.data:
        spans = [(ss["start"], ss["stop"]) for ss in task["startstops"] if ss["action"] == "compute"]
        if not spans:
            continue
        if "finish-" in str(task["key"]):
            finish += sum(b - a for a, b in spans)
        elif "piece-" in str(task["key"]):
            pieces = max(pieces, max(b for _, b in spans))
        last = max(last, max(b for _, b in spans))
    s = result.summary
    print(json.dumps({"phases": phases, "elapsed": time.perf_counter() - start, "job": t_job,
                      "task_seconds": s.seconds, "worker_peak": s.peak_worker_memory_bytes, "workers": shape,
                      "finish_seconds": finish, "tail": max(0.0, last - pieces), "graph_tasks": graph_tasks,
                      "store_tasks": s.n_tasks}))


# ---------------------------------------------------------------------------------------------
# tables

def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _r(x: float | None, ref: float | None) -> str:
    return "-" if x is None or not ref else f"{x / ref:.2f}"


def main_table(rows: list[Row], refs: list[tuple[str, str]], n: int) -> str:
    """Rows with their wall time over each reference's (given as (method prefix, column label))."""
    by = {r.method: r for r in rows}
    refs = [(next((k for k in by if k.startswith(prefix)), ""), label) for prefix, label in refs]
    head = ("| method | process wall s | + sync after | CPU s | job s | tasks s | particles/s | "
            + " | ".join(f"wall / {label}" for _, label in refs)
            + " | workers x threads | peak worker memory | process peak | note |")
    lines = [head, "|---|" + "---:|" * (6 + len(refs)) + "---|---:|---:|---|"]
    for r in rows:
        ratios = " | ".join(_r(r.wall, by[ref].wall if ref in by else None) for ref, _ in refs)
        lines.append(f"| {r.method} | {_s(r.wall)} | {_s(r.sync)} | {_s(r.cpu)} | {_s(r.job)} | {_s(r.tasks)} | {n / r.wall:,.0f} | "
                     f"{ratios} | {r.workers or '-'} | {common.fmt_bytes(r.worker_peak)} | "
                     f"{common.fmt_bytes(r.process_peak)} | {r.note} |")
    return "\n".join(lines)


PHASES = ["interpreter", "imports", "cluster start", "open", "plan", "graph + submit", "tasks", "report",
          "metadata", "shut-down", "exit"]


def phases_table(rows: list[tuple[Method, Row]]) -> str:
    lines = ["| job | cluster | run | process wall s | " + " | ".join(PHASES) + " | RunSummary s | CPU s |",
             "|---|---|---|" + "---:|" * (len(PHASES) + 3)]
    for m, r in rows:
        cells = " | ".join(_s(r.phases.get(p)) for p in PHASES)
        lines.append(f"| {m.table} | {m.cluster} | {m.variant} | {_s(r.wall)} | {cells} | {_s(r.tasks)} | {_s(r.cpu)} |")
    return "\n".join(lines)


def _verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed: {value:.2f} against {limit:g} ({value / limit - 1:.0%} over)"


def targets(by: dict[str, Row], files: int) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for job in ("restack", "downsample"):
        one, many = by[f"driver {job}, dparticles, 1 file"], by[f"driver {job}, dparticles, {files} files of {MANY}"]
        wall = max(one.wall, many.wall) / min(one.wall, many.wall)
        slower = "1 file" if one.wall > many.wall else f"{files} files"
        lines.append(f"| 1. {job}, 1 file vs {files} files of {MANY}: slower / faster <= 1.15 | {wall:.2f}, slower: "
                     f"{slower} ({one.wall:.2f} s / {many.wall:.2f} s; tasks {one.tasks:.2f} s / {many.tasks:.2f} s) "
                     f"| {_verdict(wall, 1.15)} |")
    a, b = by["driver restack, dparticles, 1 file, shuffled"], by["driver restack, dparticles, 1 file"]
    la, lb = by["copy_file_range loop, fsync, 1 file, shuffled"], by["copy_file_range loop, fsync, 1 file"]
    ra, rb = by["relion_stack_create --one_by_one, shuffled"], by["relion_stack_create --one_by_one"]
    lines.append(f"| 2. restack, shuffled / file order <= 1.3 | {a.wall / b.wall:.2f} ({a.wall:.2f} s / {b.wall:.2f} s; "
                 f"tasks {a.tasks / b.tasks:.2f}; copy loop {la.job / lb.job:.2f}, RELION {ra.wall / rb.wall:.2f}) "
                 f"| {_verdict(a.wall / b.wall, 1.3)} |")
    cli, rel = by["dparticles CLI restack"], by["relion_stack_create --one_by_one"]
    lines.append(f"| 3. CLI restack / relion_stack_create --one_by_one <= 1.0 | {cli.wall / rel.wall:.2f} "
                 f"({cli.wall:.2f} s / {rel.wall:.2f} s) | {_verdict(cli.wall / rel.wall, 1.0)} |")
    cli = by["dparticles CLI downsample"]
    rel = next(r for k, r in by.items() if k.startswith("relion_image_handler"))
    lines.append(f"| 3. CLI downsample 256->64 / relion_image_handler <= 0.33 | {cli.wall / rel.wall:.2f} "
                 f"({cli.wall:.2f} s / {rel.wall:.2f} s) | {_verdict(cli.wall / rel.wall, 0.33)} |")
    for name in ("lazy API, embedded cluster", "lazy API, distributed.Client()"):
        lazy = by[name]
        lines.append(f"| 4. {name} / CLI downsample <= 1.10 | {lazy.wall / cli.wall:.2f} "
                     f"({lazy.wall:.2f} s / {cli.wall:.2f} s) | {_verdict(lazy.wall / cli.wall, 1.10)} |")
    peaks = [(r.worker_peak, k) for k, r in by.items() if r.worker_peak and ", threads," not in k]
    top, where = max(peaks)
    lines.append(f"| 5. peak worker memory < 500 MB in every run on worker processes | largest {top / 1e6:.0f} MB "
                 f"({common.fmt_bytes(top)}, {where}) | {'met' if top < PEAK_LIMIT else 'missed'} |")
    threaded = [(r.worker_peak, k) for k, r in by.items() if r.worker_peak and ", threads," in k]
    if threaded:
        top, where = max(threaded)
        lines.append(f"| 5. the same, in-process cluster (the worker is the client process) | {top / 1e6:.0f} MB "
                     f"({common.fmt_bytes(top)}, {where}) | {'met' if top < PEAK_LIMIT else 'missed'} |")
    for job in ("restack", "downsample"):
        p, t = by[f"driver {job}, processes, 1 file"], by[f"driver {job}, threads, 1 file"]
        d = by[f"driver {job}, dparticles, 1 file"]
        faster = "threads" if t.wall < p.wall else "processes"
        lines.append(f"| 6. {job}: in-process threads vs process cluster (wall) | threads {t.wall:.2f} s, processes "
                     f"{p.wall:.2f} s (dparticles' own {d.wall:.2f} s); tasks {t.tasks:.2f} s vs {p.tasks:.2f} s; "
                     f"CPU {t.cpu:.2f} s vs {p.cpu:.2f} s | {faster} faster by {abs(p.wall - t.wall):.2f} s "
                     f"({abs(p.wall - t.wall) / max(p.wall, t.wall):.0%} of the slower) |")
    return "\n".join(lines)


def import_times(py: str, cwd: Path) -> str:
    """Import time by top-level package (self times summed) of what the downsample command loads."""
    total = common.import_micros(py, cwd, "dparticles.cli, dparticles.jobs.downsample")
    everything = sum(total.values())
    top = sorted(total.items(), key=lambda kv: -kv[1])[:10]
    return (f"imports of `dparticles.cli` + `dparticles.jobs.downsample` (`-X importtime`, self times summed "
            f"by package): {everything / 1e6:.2f} s in all; " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in top))


# ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("bench-data"), help="data folder, reused (default ./bench-data)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all methods; the fastest of each kept")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="seconds to wait at most for idle CPUs before each timed run (default 10)")
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out (prefixes of their names)")
    a = p.parse_args()
    common.QUIET_LIMIT = a.quiet_wait
    import importlib.util

    where = Path(importlib.util.find_spec("dparticles").origin).parent
    ps = common.particle_set(a.data, n_stacks=N_STACKS, per_stack=PER_STACK)
    n = sum(len(i) for _, i in ps.selection())
    work = run_folder(ps, a.data)
    files = -(-n // MANY)
    print(f"pipeline: {n} of {ps.n} particles ({n * IMAGE_BYTES / 1e9:.2f} GB in use, {ps.n_stacks} stacks of "
          f"{ps.per_stack}), warm; {common.machine()}; dparticles from {where}", flush=True)
    todo = [m for m in methods(work, n) if common.wanted(m.name, a.skip)]
    best: dict[str, Row] = {}
    t0 = time.monotonic()
    for rep in range(a.repeats):
        for m in todo:
            out = work / "out"
            common.clean(out, *m.strays())
            out.mkdir()
            common.warm_up(ps)
            wall, peak, stdout, synced = common.run_timed(m.cmd(out), cwd=work)
            if m.check:
                m.check(out)
            row = parse(m, wall, peak, stdout, out)
            row.sync = synced
            if m.name not in best or row.wall < best[m.name].wall:
                best[m.name] = row
            print(f"  round {rep + 1}: {m.name}: {wall:.2f} s", flush=True)
    common.clean(work / "out", *{s for m in todo for s in m.strays()})
    print(f"\n{len(todo) * a.repeats} timed runs in {time.monotonic() - t0:.0f} s; "
          f"{len(common.BUSY_RUNS)} of them started while other work kept the CPUs busy"
          + (f" ({min(common.BUSY_RUNS):.0%}-{max(common.BUSY_RUNS):.0%})" if common.BUSY_RUNS else ""))
    print(import_times(sys.executable, work))
    for table, refs in (("restack", [("copy_file_range loop, fsync, 1 file", "copy loop, fsync, 1 file"),
                                     ("relion_stack_create --one_by_one", "relion_stack_create --one_by_one")]),
                        ("downsample", [("plain loop", "plain loop"), ("relion_image_handler", "relion_image_handler")])):
        print(f"\n{table}:\n")
        print(main_table([best[m.name] for m in todo if m.table == table], refs, n))
    print("\nphases of the driver runs (seconds):\n")
    print(phases_table([(m, best[m.name]) for m in todo if m.kind == "driver"]))
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in CLUSTERS.items()))
    if not a.skip:
        print("\ntargets:\n")
        print(targets({m.name: best[m.name] for m in todo}, files))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, star, out, *rest = sys.argv[2:]
        if kind == "driver":
            opts = dict(zip(rest[::2], rest[1::2]))
            driver_child(star, out, opts["--job"], opts["--cluster"], int(opts["--batch"]),
                         int(opts["--chunks"]) if "--chunks" in opts else None)
        else:
            lazy_child(star, out, own_client=kind == "lazy-client")
    else:
        main()
