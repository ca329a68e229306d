"""Embedded default: the command line on its in-process cluster against plain scripts and RELION 3.1.

Since the embedded cluster runs in the calling process by default (threads, ``inproc://``; the
cluster of worker processes is ``--processes``) and report.html's dask part is kept only when the
tasks took 10 s or more, this measures what a user sees, in three parts (``--part``):

* ``small``: the real RELION 3.1 project (``--real``, default the 284-particle set of 128 x 128 in
  ``Select/job010/particles.star``), run from a temporary project folder that holds links to its
  stacks and STAR file (RELION writes beside its inputs, so the folders are real and only the files
  are links; the real project is checked unchanged at the end). Restack and downsample
  ``--fourier-box 64``, the command line end to end (``dparticles restack
  Select/job010/particles.star --out out``), in-process and ``--processes``, against a plain
  ~30-line starfile + mrcfile + numpy script doing the same (``PLAIN`` below, written to the project
  folder; downsample: numpy's rfft2, the half-plane cropped as RELION does, irfft2; interpreter
  start and imports included), ``relion_stack_create --one_by_one`` and ``relion_image_handler
  --rescale_angpix`` on the STAR file. Median of ``--small-repeats`` (5). Where the time goes: each
  run's own ``job.json`` (the job's seconds and phases), a fresh process doing the imports alone and
  the imports + opening the STAR file, and ``-X importtime`` by package.
* ``2gb``: the generated set of 40 stacks x 200 of 256 x 256 (2.1 GB; ``common.particle_set``).
  Restack of the 60% in use (``sel.star``) against ``relion_stack_create --one_by_one`` and the
  copy_file_range loop with fsync; downsample 256 -> 64 of every particle (``all.star``) against
  ``relion_image_handler`` run per stack (as ``downsample_bench.py``) and the plain ducc0 loop
  (2 threads, fsync). Both dparticles modes. Median of ``--repeats`` (5).
* ``5gb``: the 5.2 GB set (124 x 160). Peak memory of the whole process of the command line,
  in-process and ``--processes``, restack and downsample; per core, the in-process API on 1 worker x
  1 thread (``common.py api-downsample``) against the plain single-thread loop through the same
  kernel (``fft-loop --threads 1 --fsync --kernels``, as ``workers_bench.py``); from 1 to 2 threads,
  in-process 2 workers x 1 thread and 1 worker x 2 threads against 1 x 1. Median of ``--repeats``.

Times are process wall times under ``/usr/bin/time`` (the plain loops' own loop time, as in the other
benchmarks, with the process wall beside it) plus the ``sync`` right after the run: "to disk" is
their sum, so RELION's and the plain script's unflushed writes count (dparticles fsyncs its
stacks). Methods take turns in each round, each a fresh process after ``wait_quiet``; the ratios
are medians over the rounds against a reference measured in the same rounds; runs that started
while other work kept the CPUs busy are counted in the tables. Warm page cache.

Run: ``python benchmarks/embedded_bench.py [--part all|small|2gb|5gb] [--data bench-data]`` (the
sets are generated once; about 12 minutes on 2 idle CPUs). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from downsample_bench import _relion as relion_per_stack  # noqa: E402

REAL = Path("/work/shared/data/real/relion31_sim_ribo70S_b128")
SMALL_STAR = "Select/job010/particles.star"
SMALL_BOX = 64
BOX_2GB = 64

# The plain script of the small job: what a user would write with starfile, mrcfile and numpy.
PLAIN = '''"""Restack or Fourier-crop the particles of a RELION 3.1 STAR file into one stack."""
import sys
from pathlib import Path

import mrcfile
import numpy as np
import starfile

job, star, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
blocks = starfile.read(star, always_dict=True)
optics, particles = blocks["optics"], blocks["particles"]
stacks, images = {}, []
for name in particles["rlnImageName"]:
    index, path = name.split("@")
    if path not in stacks:
        stacks[path] = mrcfile.mmap(path, mode="r", permissive=True)
    images.append(stacks[path].data[int(index) - 1])
images = np.stack(images).astype(np.float32)
angpix = float(optics["rlnImagePixelSize"].iloc[0])
if job == "downsample":  # keep |ky| < b/2 and ky = b/2, kx <= b/2 of the rfft2 half-plane, as RELION
    n, b = images.shape[-1], int(sys.argv[4])
    f = np.fft.rfft2(images)
    f = np.concatenate([f[:, :b // 2 + 1, :b // 2 + 1], f[:, n - b // 2 + 1:, :b // 2 + 1]], axis=1)
    images = np.fft.irfft2(f, s=(b, b)) * np.float32(b * b / (n * n))  # the same mean
    angpix *= n / b
    optics = optics.assign(rlnImagePixelSize=angpix, rlnImageSize=b)
(out / "stacks").mkdir(parents=True, exist_ok=True)
with mrcfile.new(out / "stacks/batch_000000.mrcs", images.astype(np.float32), overwrite=True) as m:
    m.set_image_stack()
    m.voxel_size = angpix
names = [f"{k:06d}@{out}/stacks/batch_000000.mrcs" for k in range(1, len(images) + 1)]
starfile.write({"optics": optics, "particles": particles.assign(rlnImageName=names)}, out / "particles.star")
'''


# ---------------------------------------------------------------------------------------------
# interleaved runs

@dataclass
class Method:
    name: str
    cmd: list[str]
    cwd: Path
    out: Path  # removed before each run
    parse: str = "wall"  # wall | loop | api | cli
    extra_clean: list[Path] = field(default_factory=list)
    mkdir: bool = True  # create ``out`` before the run (RELION and the loops need it)


@dataclass
class Run:
    wall: float
    sync: float
    peak: int
    busy: bool
    rep: dict

    @property
    def to_disk(self) -> float:
        return self.wall + self.sync


def run_rounds(methods: list[Method], repeats: int, warm: common.ParticleSet | None = None,
               check=None) -> dict[str, list[Run]]:
    """Every method once per round, in turn; ``check(method, run)`` after each run (outputs still there)."""
    runs: dict[str, list[Run]] = {m.name: [] for m in methods}
    for rnd in range(repeats):
        if warm is not None:
            common.warm_up(warm)
        for m in methods:
            common.clean(m.out, *m.extra_clean)
            if m.mkdir:
                m.out.mkdir(parents=True)
            busy_before = len(common.BUSY_RUNS)
            wall, peak, stdout, synced = common.run_timed(m.cmd, cwd=m.cwd)
            rep = {}
            if m.parse in ("loop", "api"):
                rep = common.last_json(stdout)
            elif m.parse == "cli":
                rep = json.loads((m.out / "job.json").read_text())
            run = Run(wall, synced, peak, len(common.BUSY_RUNS) > busy_before, rep)
            if check is not None:
                check(m, run)
            runs[m.name].append(run)
            print(f"  round {rnd + 1}: {m.name}: {wall:.2f} s + sync {synced:.2f} s"
                  + (" (busy)" if run.busy else ""), flush=True)
        for m in methods:
            common.clean(m.out, *m.extra_clean)
    return runs


def med(values) -> float:
    return statistics.median(list(values))


def busy_text(runs: list[Run]) -> str:
    n = sum(r.busy for r in runs)
    return f"{n} of {len(runs)}" if n else "0"


def main_table(runs: dict[str, list[Run]], refs: list[str], notes: dict[str, str] | None = None) -> str:
    """Median wall, sync and wall + sync; ratios of the median to disk against each reference."""
    notes = notes or {}
    ref_t = {r: med(x.to_disk for x in runs[r]) for r in refs}
    head = ("| method | wall s | + sync after | to disk s | range (to disk) | "
            + " | ".join(f"to disk / {r}" for r in refs) + " | peak memory | runs under load | note |")
    rows = [head, "|---|---:|---:|---:|---|" + "---:|" * len(refs) + "---:|---:|---|"]
    for name, rs in runs.items():
        t = med(r.to_disk for r in rs)
        ratios = " | ".join(f"{t / ref_t[r]:.2f}" for r in refs)
        rows.append(f"| {name} | {med(r.wall for r in rs):.2f} | {med(r.sync for r in rs):.2f} | {t:.2f} | "
                    f"{min(r.to_disk for r in rs):.2f}-{max(r.to_disk for r in rs):.2f} | {ratios} | "
                    f"{common.fmt_bytes(max(r.peak for r in rs))} | {busy_text(rs)} | {notes.get(name, '')} |")
    return "\n".join(rows)


def verdict(value: float, limit: float, below: bool = True) -> str:
    ok = value <= limit if below else value >= limit
    if ok:
        return "met"
    over = (value / limit - 1) if below else (1 - value / limit)
    return f"missed by {over:.0%}"


def read_stack(path: Path) -> np.ndarray:
    import mrcfile

    with mrcfile.mmap(path, mode="r", permissive=True) as m:
        return np.array(m.data, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# part 1: the small real project

def project(real: Path, where: Path) -> Path:
    """A project folder of real folders holding links to the real STAR file and stacks."""
    proj = where / "project"
    common.clean(proj)
    for f in [real / SMALL_STAR, *sorted((real / "Extract").rglob("*.mrcs"))]:
        link = proj / f.relative_to(real)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    return proj


def listing(folder: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*"))


def small_part(a: argparse.Namespace, py: str, dp: str) -> str:
    before = listing(a.real)
    tmp = Path(tempfile.mkdtemp(prefix="embedded-bench-", dir=a.data.resolve()))
    proj = project(a.real, tmp)
    (proj / "plain.py").write_text(PLAIN)
    out = proj / "out"
    relion_outputs = [proj / "Select/job010/particles_ds.star",
                      *[p.with_name(p.stem + "_ds.mrcs") for p in (proj / "Extract").rglob("*.mrcs")]]
    n = sum(1 for line in (proj / SMALL_STAR).read_text().splitlines() if "@" in line)
    print(f"small: {n} particles of {a.real}; {common.machine()}", flush=True)
    angpix = 2.8  # the optics block's rlnImagePixelSize (the stacks' headers say 1 Å)
    jobs = {
        "restack": [
            Method("plain script (starfile + mrcfile + numpy)", [py, "plain.py", "restack", SMALL_STAR, "out"], proj,
                   out),
            Method("relion_stack_create --one_by_one",
                   ["relion_stack_create", "--i", SMALL_STAR, "--o", "out/particles", "--one_by_one"], proj, out),
            Method("dparticles CLI (in-process)", [dp, "restack", SMALL_STAR, "--out", "out"], proj, out, "cli",
                   mkdir=False),
            Method("dparticles CLI --processes", [dp, "restack", SMALL_STAR, "--out", "out", "--processes"], proj,
                   out, "cli", mkdir=False),
        ],
        "downsample": [
            Method("plain script (starfile + mrcfile + numpy)",
                   [py, "plain.py", "downsample", SMALL_STAR, "out", str(SMALL_BOX)], proj, out),
            Method("relion_image_handler --rescale_angpix",
                   ["relion_image_handler", "--i", SMALL_STAR, "--o", "ds", "--angpix", str(angpix),
                    "--rescale_angpix", str(angpix * 128 / SMALL_BOX)], proj, out, extra_clean=relion_outputs),
            Method("dparticles CLI (in-process)",
                   [dp, "downsample", SMALL_STAR, "--out", "out", "--fourier-box", str(SMALL_BOX)], proj, out, "cli",
                   mkdir=False),
            Method("dparticles CLI --processes",
                   [dp, "downsample", SMALL_STAR, "--out", "out", "--fourier-box", str(SMALL_BOX), "--processes"],
                   proj, out, "cli", mkdir=False),
        ],
    }
    errors: dict[str, float] = {}

    def check(job: str):
        def f(m: Method, run: Run) -> None:
            if m.name.startswith("relion"):
                return
            images = read_stack(out / "stacks/batch_000000.mrcs")
            if m.name.startswith("plain"):
                check.ref[job] = images
            else:
                errors[f"{job}: {m.name}"] = common.largest_difference(images, check.ref[job], f"{job} {m.name}")
            if len(images) != n:
                raise SystemExit(f"{m.name}: {len(images)} images, expected {n}")
        return f
    check.ref = {}
    sections = []
    all_runs = {}
    for job, methods in jobs.items():
        print(f"small {job}:", flush=True)
        runs = run_rounds(methods, a.small_repeats, check=check(job))
        all_runs[job] = runs
        sections.append(f"{job} ({n} particles{', 128 -> 64' if job == 'downsample' else ''}), "
                        f"median of {a.small_repeats}:\n\n"
                        + main_table(runs, [methods[0].name, methods[1].name]))
    # where the time goes: imports alone, imports + opening, job.json's phases
    probes = [
        Method("python -c pass", [py, "-c", "pass"], proj, out),
        Method("imports (cli, job module, distributed)",
               [py, "-c", "import dparticles.cli, dparticles.jobs.restack, dparticles.jobs.downsample, distributed"],
               proj, out),
        Method("imports + open_particles",
               [py, "-c", "import dparticles.cli, dparticles.jobs.restack, dparticles.jobs.downsample, distributed; "
                f"from dparticles.dataset import open_particles; open_particles({SMALL_STAR!r})"], proj, out),
    ]
    print("small: imports", flush=True)
    probe_runs = run_rounds(probes, a.small_repeats)
    imports_text = import_times(py, proj)
    common.clean(tmp)
    after = listing(a.real)
    if after != before:
        raise SystemExit(f"the real project {a.real} changed during the run")

    # the targets and the breakdown
    lines = ["\n".join(sections[:1]), "", "\n".join(sections[1:]), ""]
    lines += ["| job | dparticles CLI (in-process) / plain script | target | --processes / plain script | "
              "in-process / relion | --processes / in-process |", "|---|---:|---|---:|---:|---:|"]
    for job, methods in jobs.items():
        runs = all_runs[job]
        t = {m.name: med(r.to_disk for r in runs[m.name]) for m in methods}
        plain, relion, inproc, procs = (t[m.name] for m in methods)
        lines.append(f"| {job} | {inproc / plain:.2f} | <= 2.5: {verdict(inproc / plain, 2.5)} | {procs / plain:.2f} | "
                     f"{inproc / relion:.2f} | {procs / inproc:.2f} |")
    p = {m.name: med(r.wall for r in probe_runs[m.name]) for m in probes}
    start, imports, opened = (p[m.name] for m in probes)
    lines += ["", "Where the in-process command line's time goes (medians, seconds):", "",
              "| job | process wall | interpreter start (`python -c pass`) | imports | open STAR | "
              "job in to_stacks (job.json `seconds`) | of which planning + cluster start | computing and writing | "
              "checks and metadata | shut-down and exit (the rest) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for job, methods in jobs.items():
        for m in methods[2:]:
            rs = all_runs[job][m.name]
            wall = med(r.wall for r in rs)
            secs = med(r.rep["seconds"] for r in rs)
            ph = {k: med(r.rep["phases"].get(k, 0.0) for r in rs) for k in
                  ("planning and cluster start", "computing and writing", "checks and metadata")}
            rest = wall - opened - secs
            lines.append(f"| {job}, {m.name.replace('dparticles CLI ', '').strip('()')} | {wall:.2f} | {start:.2f} | "
                         f"{imports - start:.2f} | {opened - imports:.2f} | {secs:.2f} | "
                         f"{ph['planning and cluster start']:.2f} | {ph['computing and writing']:.2f} | "
                         f"{ph['checks and metadata']:.2f} | {rest:.2f} |")
    lines += ["", imports_text, "",
              "largest difference from the plain script's images (x its std): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())]
    return "\n".join(lines)


def import_times(py: str, cwd: Path) -> str:
    """Self import times summed by top-level package, of what the command line loads."""
    total = common.import_micros(py, cwd, "dparticles.cli, dparticles.jobs.restack, dparticles.jobs.downsample, "
                                          "distributed")
    top = sorted(total.items(), key=lambda kv: -kv[1])[:12]
    return (f"`-X importtime` of `dparticles.cli`, both job modules and distributed (self times summed by package, "
            f"one run): {sum(total.values()) / 1e6:.2f} s in all; " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in top))


# ---------------------------------------------------------------------------------------------
# part 2: the 2 GB set against RELION

def part_2gb(a: argparse.Namespace, dp: str) -> str:
    ps = common.particle_set(a.data, n_stacks=40, per_stack=200)
    out = ps.root.parent / "out-embedded"
    sel_n = sum(len(i) for _, i in ps.selection())
    print(f"2gb: restack {sel_n} of {ps.n}, downsample {ps.n}; {common.machine()}", flush=True)
    sel, alls = str(ps.sel_star), str(ps.all_star)
    restack = [
        Method("relion_stack_create --one_by_one",
               ["relion_stack_create", "--i", "sel.star", "--o", str(out / "relion"), "--one_by_one"], ps.root, out),
        Method("copy_file_range loop, fsync", common.runner("copy-loop", sel, str(out), "--fsync"), ps.root, out,
               "loop"),
        Method("dparticles CLI (in-process)", [dp, "restack", sel, "--out", str(out)], ps.root, out, "cli",
               mkdir=False),
        Method("dparticles CLI --processes", [dp, "restack", sel, "--out", str(out), "--processes"], ps.root, out,
               "cli", mkdir=False),
    ]
    down = [
        Method("relion_image_handler, per stack", relion_per_stack(ps, out, BOX_2GB, None), ps.root, out),
        Method("plain ducc0 loop (2 threads), fsync",
               common.runner("fft-loop", alls, str(out), "--box", str(BOX_2GB), "--threads", "2", "--fsync"),
               ps.root, out, "loop"),
        Method("dparticles CLI (in-process)", [dp, "downsample", alls, "--out", str(out), "--fourier-box",
                                               str(BOX_2GB)], ps.root, out, "cli", mkdir=False),
        Method("dparticles CLI --processes", [dp, "downsample", alls, "--out", str(out), "--fourier-box",
                                              str(BOX_2GB), "--processes"], ps.root, out, "cli", mkdir=False),
    ]
    print("2gb restack:", flush=True)
    r_runs = run_rounds(restack, a.repeats, warm=ps)
    print("2gb downsample:", flush=True)
    d_runs = run_rounds(down, a.repeats, warm=ps)
    common.clean(out)
    notes: list[dict[str, str]] = [{}, {}]  # restack, downsample (their method names are the same)
    for runs, note in zip((r_runs, d_runs), notes):
        for name, rs in runs.items():
            if rs[0].rep and name.startswith(("copy", "plain")):
                note[name] = f"the loop alone {med(r.rep['seconds'] for r in rs):.2f} s (fsync'd)"
            elif rs[0].rep:
                note[name] = (f"job {med(r.rep['seconds'] for r in rs):.2f} s, tasks "
                              f"{med(r.rep['summary']['seconds'] for r in rs):.2f} s")
    rr = {k: med(r.to_disk for r in v) for k, v in r_runs.items()}
    dd = {k: med(r.to_disk for r in v) for k, v in d_runs.items()}
    lines = [f"Restack of {sel_n:,} of {ps.n:,} particles (60% of each stack; {sel_n * common.IMAGE_BYTES / 1e9:.2f} GB "
             f"written), median of {a.repeats}:", "",
             main_table(r_runs, [restack[0].name, restack[1].name], notes[0]), "",
             f"Downsample 256 -> {BOX_2GB} of all {ps.n:,} particles ({ps.n * common.IMAGE_BYTES / 1e9:.2f} GB read), "
             f"median of {a.repeats}:", "",
             main_table(d_runs, [down[0].name, down[1].name], notes[1]), "",
             "| target (to disk, medians) | in-process | --processes |", "|---|---|---|"]
    ri, rp = (rr[m.name] / rr[restack[0].name] for m in restack[2:])
    di, dpr = (dd[m.name] / dd[down[0].name] for m in down[2:])
    lines += [f"| restack <= 1.4x relion_stack_create --one_by_one | {ri:.2f}: {verdict(ri, 1.4)} | "
              f"{rp:.2f}: {verdict(rp, 1.4)} |",
              f"| downsample 256->64 <= 0.6x relion_image_handler | {di:.2f}: {verdict(di, 0.6)} | "
              f"{dpr:.2f}: {verdict(dpr, 0.6)} |"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# part 3: the 5.2 GB set: memory, per core, threads

def part_5gb(a: argparse.Namespace, dp: str) -> str:
    ps = common.particle_set(a.data, 5.2)
    out = ps.root.parent / "out-embedded"
    print(f"5gb: {ps.n} particles; {common.machine()}", flush=True)
    alls, sel = str(ps.all_star), str(ps.sel_star)

    def api(shape: tuple[int, int]) -> list[str]:
        return common.runner("api-downsample", alls, str(out), "--options", json.dumps({"fourier_box": 64}),
                             "--cluster", json.dumps({"n_workers": shape[0], "threads_per_worker": shape[1]}))

    methods = [
        Method("plain loop, 1 thread (kernels, fsync)",
               common.runner("fft-loop", alls, str(out), "--box", "64", "--threads", "1", "--fsync", "--kernels"),
               ps.root, out, "loop"),
        Method("API in-process, 1 worker x 1 thread", api((1, 1)), ps.root, out, "api"),
        Method("API in-process, 2 workers x 1 thread", api((2, 1)), ps.root, out, "api"),
        Method("API in-process, 1 worker x 2 threads", api((1, 2)), ps.root, out, "api"),
        Method("plain loop, 2 threads (kernels, fsync)",
               common.runner("fft-loop", alls, str(out), "--box", "64", "--threads", "2", "--fsync", "--kernels"),
               ps.root, out, "loop"),
        Method("CLI downsample 256->64 (in-process)", [dp, "downsample", alls, "--out", str(out), "--fourier-box", "64"],
               ps.root, out, "cli", mkdir=False),
        Method("CLI downsample 256->64 --processes",
               [dp, "downsample", alls, "--out", str(out), "--fourier-box", "64", "--processes"], ps.root, out, "cli",
               mkdir=False),
        Method("CLI restack (in-process)", [dp, "restack", sel, "--out", str(out)], ps.root, out, "cli", mkdir=False),
        Method("CLI restack --processes", [dp, "restack", sel, "--out", str(out), "--processes"], ps.root, out, "cli",
               mkdir=False),
    ]
    runs = run_rounds(methods, a.repeats, warm=ps)
    common.clean(out)
    n = ps.n
    rows = ["| method | process wall s | job s (loop alone / API total) | tasks s (RunSummary) | particles/s of the "
            "tasks | process peak (/usr/bin/time) | RunSummary peak | runs under load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        rs = runs[m.name]
        wall = med(r.wall for r in rs)
        if m.parse == "loop":
            job, tasks, rp = med(r.rep["seconds"] for r in rs), None, None
        elif m.parse == "api":
            job, tasks, rp = (med(r.rep["seconds"] for r in rs), med(r.rep["task_seconds"] for r in rs),
                              max(r.rep["worker_peak"] or 0 for r in rs))
        else:
            job, tasks = med(r.rep["seconds"] for r in rs), med(r.rep["summary"]["seconds"] for r in rs)
            rp = max(r.rep["summary"]["peak_worker_memory_bytes"] or 0 for r in rs)
        count = sum(len(i) for _, i in ps.selection()) if "restack" in m.name else n
        speed = count / (tasks if tasks else job)
        rows.append(f"| {m.name} | {wall:.2f} | {job:.2f} | {'-' if tasks is None else f'{tasks:.2f}'} | {speed:,.0f} | "
                    f"{common.fmt_bytes(max(r.peak for r in rs))} | {common.fmt_bytes(rp)} | {busy_text(rs)} |")
    t = {m.name: runs[m.name] for m in methods}
    loop1 = med(r.rep["seconds"] for r in t[methods[0].name])
    loop2 = med(r.rep["seconds"] for r in t[methods[4].name])
    one_tasks, one_total = (med(r.rep[k] for r in t[methods[1].name]) for k in ("task_seconds", "seconds"))
    two_tasks, two_total = (med(r.rep[k] for r in t[methods[2].name]) for k in ("task_seconds", "seconds"))
    thr_tasks, thr_total = (med(r.rep[k] for r in t[methods[3].name]) for k in ("task_seconds", "seconds"))
    peaks = {m.name: max(r.peak for r in t[m.name]) for m in methods[5:]}
    rows += ["", "| target | measured | verdict |", "|---|---|---|"]
    for name, peak in peaks.items():
        if "processes" in name:
            rows.append(f"| {name}: largest process (comparison) | {common.fmt_bytes(peak)} | - |")
        else:
            rows.append(f"| {name}: the whole process < 1 GB | {common.fmt_bytes(peak)} ({peak / 1e9:.2f} GB) | "
                        f"{verdict(peak / 1e9, 1.0)} |")
    per_core = loop1 / one_tasks
    rows += [f"| per core: plain loop 1 thread / in-process 1 x 1, tasks >= 0.9 | {per_core:.2f} ({loop1:.2f} s / "
             f"{one_tasks:.2f} s); with cluster start, planning and metadata {loop1 / one_total:.2f} | "
             f"{verdict(per_core, 0.9, below=False)} |",
             f"| 1 -> 2 threads in-process, 2 workers x 1 thread (tasks; total) | {one_tasks / two_tasks:.2f}; "
             f"{one_total / two_total:.2f} | - |",
             f"| 1 -> 2 threads in-process, 1 worker x 2 threads (tasks; total) | {one_tasks / thr_tasks:.2f}; "
             f"{one_total / thr_total:.2f} | - |",
             f"| 1 -> 2 threads, the plain loop (ducc0 nthreads) | {loop1 / loop2:.2f} | - |"]
    return (f"All {n:,} particles of the 5.2 GB set downsampled 256 -> 64 (restack rows: the 60% of `sel.star`), "
            f"median of {a.repeats}:\n\n" + "\n".join(rows))


# ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "small", "2gb", "5gb"), default="all")
    p.add_argument("--data", type=Path, default=Path("bench-data"), help="data folder, reused (default ./bench-data)")
    p.add_argument("--real", type=Path, default=REAL, help="the RELION 3.1 project of the small job (read only)")
    p.add_argument("--small-repeats", type=int, default=5, help="rounds of the small job (median; default 5)")
    p.add_argument("--repeats", type=int, default=5, help="rounds on the generated sets (median; default 5)")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="seconds to wait at most for idle CPUs before each timed run (default 10)")
    a = p.parse_args()
    common.QUIET_LIMIT = a.quiet_wait
    a.data.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    dp = str(Path(py).with_name("dparticles"))
    t0 = time.monotonic()
    out = []
    parts = ["small", "2gb", "5gb"] if a.part == "all" else [a.part]
    for part in parts:
        busy0 = len(common.BUSY_RUNS)
        text = {"small": lambda: small_part(a, py, dp), "2gb": lambda: part_2gb(a, dp),
                "5gb": lambda: part_5gb(a, dp)}[part]()
        busy = common.BUSY_RUNS[busy0:]
        load = (f"{len(busy)} timed runs started with the CPUs busy ({min(busy):.0%}-{max(busy):.0%})" if busy
                else "every timed run started on idle CPUs")
        out.append(f"#### {part} ({load})\n\n{text}")
        print(f"\n{out[-1]}\n", flush=True)
    print(f"\n{time.monotonic() - t0:.0f} s; {common.machine()}, {os.cpu_count()} CPUs\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
