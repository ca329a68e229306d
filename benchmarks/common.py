"""Shared pieces of the job benchmarks: a generated particle set, timed runs, the result table.

The particle set (``--data``, default ``./bench-data``, kept between runs) is ``n_stacks`` MRC
stacks of ``per_stack`` random 256 x 256 float32 images in ``Extract/``, with two RELION 3.1
STAR files: ``all.star`` names every image (with origins and coordinates, for recentring) and
``sel.star`` a selection of 60% of them: in each stack a random 60% subset, in stack order, so
the particles in use come in runs of consecutive images as after a 2D classification.

Every method is run as its own process under ``/usr/bin/time`` so that its peak resident
memory is its own; the dparticles runs print their own report (task time, workers' peak) as
one JSON line. Before each timed run the outputs are removed and ``sync`` is called; a cold
run also drops the page cache (``echo 3 > /proc/sys/vm/drop_caches``, as root).

This file is also the runner of the plain reference loops and of the dparticles API runs:
``python benchmarks/common.py copy-loop|fft-loop|api-restack|api-downsample ...`` (one JSON
line out); the benchmark scripts call it, it is not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOX = 256
PER_STACK = 160
PIXEL_SIZE = 1.0  # Å
KEEP = 0.6  # fraction of particles in use in sel.star
IMAGE_BYTES = BOX * BOX * 4
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# the generated particle set

@dataclass(frozen=True)
class ParticleSet:
    root: Path
    n_stacks: int
    per_stack: int

    @property
    def stacks(self) -> list[str]:
        """Stack names relative to ``root`` (RELION resolves them from its working directory)."""
        return [f"Extract/stack_{k:04d}.mrcs" for k in range(self.n_stacks)]

    @property
    def n(self) -> int:
        return self.n_stacks * self.per_stack

    @property
    def all_star(self) -> Path:
        return self.root / "all.star"

    @property
    def sel_star(self) -> Path:
        return self.root / "sel.star"

    def selection(self) -> list[tuple[int, np.ndarray]]:
        """(stack number, sorted 0-based indices in use) for each stack, as written in sel.star."""
        rng = np.random.default_rng(1)
        k = round(KEEP * self.per_stack)
        return [(s, np.sort(rng.choice(self.per_stack, k, replace=False))) for s in range(self.n_stacks)]


def particle_set(data: Path, gb: float | None = None, *, n_stacks: int | None = None,
                 per_stack: int = PER_STACK) -> ParticleSet:
    """The set of about ``gb`` GB (1e9 bytes) of images, or of ``n_stacks`` stacks of ``per_stack``
    images, under ``data``, generated if missing."""
    if n_stacks is None:
        n_stacks = max(2, round(gb * 1e9 / (per_stack * IMAGE_BYTES)))
    ps = ParticleSet(data.resolve() / f"set_{n_stacks}x{per_stack}_{BOX}", n_stacks, per_stack)
    done = ps.root / "complete"
    if done.exists():
        return ps
    print(f"generating {ps.n} images of {BOX}x{BOX} float32 in {n_stacks} stacks "
          f"({ps.n * IMAGE_BYTES / 1e9:.2f} GB) under {ps.root}", flush=True)
    from dparticles.formats.mrc import stack_header

    (ps.root / "Extract").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header = stack_header(per_stack, BOX, np.dtype("<f4"), PIXEL_SIZE, "dparticles benchmark")
    for name in ps.stacks:
        images = rng.standard_normal((per_stack, BOX, BOX), dtype=np.float32)
        images += 0.5 * np.sin(np.arange(BOX, dtype=np.float32) / 7.0)  # some structure
        with open(ps.root / name, "wb") as f:
            f.write(header)
            f.write(images.tobytes())
    _write_star(ps.all_star, [(s, np.arange(ps.per_stack)) for s in range(n_stacks)], ps)
    _write_star(ps.sel_star, ps.selection(), ps)
    done.write_text("ok\n")
    return ps


def _write_star(path: Path, chosen: list[tuple[int, np.ndarray]], ps: ParticleSet) -> None:
    """A RELION 3.1 STAR file (optics + particles) naming the chosen images, in that order."""
    rng = np.random.default_rng(2)
    lines = ["", "# version 30001", "", "data_optics", "", "loop_",
             "_rlnOpticsGroupName #1", "_rlnOpticsGroup #2", "_rlnMicrographOriginalPixelSize #3",
             "_rlnVoltage #4", "_rlnSphericalAberration #5", "_rlnAmplitudeContrast #6",
             "_rlnImagePixelSize #7", "_rlnImageSize #8", "_rlnImageDimensionality #9",
             f"opticsGroup1 1 {PIXEL_SIZE:.6f} 300.0 2.7 0.1 {PIXEL_SIZE:.6f} {BOX} 2", "", "",
             "data_particles", "", "loop_"]
    cols = ["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU",
            "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
            "rlnOriginXAngst", "rlnOriginYAngst", "rlnOpticsGroup"]
    lines += [f"_{c} #{i}" for i, c in enumerate(cols, start=1)]
    for s, indices in chosen:
        mic = f"MotionCorr/mic_{s:04d}.mrc"
        for i in indices:
            u, v = rng.uniform(1e4, 2e4, 2)
            x, y = rng.uniform(200, 3800, 2)
            ox, oy = rng.uniform(-6, 6, 2)
            rot, tilt, psi = rng.uniform(-180, 180), rng.uniform(0, 180), rng.uniform(-180, 180)
            lines.append(f"{i + 1:06d}@Extract/stack_{s:04d}.mrcs {mic} {x:.1f} {y:.1f} {u:.2f} {v:.2f} "
                         f"{rng.uniform(0, 180):.2f} {rot:.3f} {tilt:.3f} {psi:.3f} {ox:.4f} {oy:.4f} 1")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# timed runs

@dataclass
class Result:
    method: str
    seconds: float
    n: int  # particles
    nbytes: int  # bytes of images read (for GB/s)
    peak: int | None  # bytes
    note: str = ""
    cold: bool = False
    sync: float = 0.0  # seconds os.sync() took right after the run: its writes not yet on disk


def clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of the machine's CPU time spent busy over the next ``seconds``."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


QUIET_LIMIT = 30.0  # seconds wait_quiet waits at most (a script may change it)
BUSY_RUNS: list[float] = []  # CPU busy fraction before each timed run that started on a busy machine
LAST_LOAD = 0.0  # CPU busy fraction wait_quiet saw last, just before the last timed run


def wait_quiet(limit: float | None = None, busy: float = 0.15) -> None:
    """Wait (up to ``limit`` s, default ``QUIET_LIMIT``) until other processes leave the CPUs nearly
    idle, so that they do not distort a timed run; say so when they do not."""
    global LAST_LOAD
    limit = QUIET_LIMIT if limit is None else limit
    t0 = time.monotonic()
    while (LAST_LOAD := _cpu_busy()) > busy:
        if time.monotonic() - t0 > limit:
            BUSY_RUNS.append(LAST_LOAD)
            print(f"  note: the machine is busy ({LAST_LOAD:.0%} CPU) with other work; timings may be slower",
                  flush=True)
            return


def prepare(cold: bool) -> None:
    """Flush earlier writes, wait for idle CPUs; for a cold run also drop the page cache (needs root)."""
    os.sync()
    wait_quiet()
    if cold:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as exc:
            raise SystemExit(f"cannot drop the page cache ({exc}); run as root or without --cold") from None


LAST_CPU = 0.0  # CPU seconds (user + system) of the last run_timed process and its waited-for children
LAST_STDERR = ""  # its standard error


def run_timed(cmd: list[str], *, cwd: Path | None = None, cold: bool = False) -> tuple[float, int, str, float]:
    """Run ``cmd`` under /usr/bin/time: (wall seconds, peak RSS in bytes of the process and its
    waited-for children, stdout, seconds of the ``sync`` right after it). The caller removes
    earlier outputs first."""
    prepare(cold)
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-time-{os.getpid()}.txt"
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats), *cmd], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    t0 = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - t0
    peak_kib, user, system = stats.read_text().split()[-3:]
    stats.unlink()
    global LAST_CPU, LAST_STDERR
    LAST_CPU, LAST_STDERR = float(user) + float(system), proc.stderr
    return wall, int(peak_kib) * 1024, proc.stdout, synced


def runner(*args: str) -> list[str]:
    """The command that runs one of this file's runners in a fresh Python process."""
    return [sys.executable, str(Path(__file__).resolve()), *args]


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON report in the output:\n{stdout[-2000:]}")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(results: list[Result], references: list[str]) -> str:
    """Markdown table; a ratio is the method's time over the reference's time in the same cache
    state and run (below 1: faster than the reference)."""
    refs = [{r.cold: r.seconds for r in results if r.method == name} for name in references]
    rows = ["| cache | method | seconds | particles/s | GB/s | " + " | ".join(f"time / {n}" for n in references)
            + " | + sync after | peak memory | note |",
            "|---|---|---:|---:|---:|" + "---:|" * len(references) + "---:|---:|---|"]
    for r in results:
        ratios = " | ".join(f"{r.seconds / ref[r.cold]:.2f}" if r.cold in ref else "-" for ref in refs)
        rows.append(f"| {'cold' if r.cold else 'warm'} | {r.method} | {r.seconds:.2f} | {r.n / r.seconds:,.0f} | "
                    f"{r.nbytes / r.seconds / 1e9:.2f} | {ratios} | {r.sync:.2f} | {fmt_bytes(r.peak)} | {r.note} |")
    return "\n".join(rows)


def machine() -> str:
    import platform

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {mem / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}")


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gb", type=float, default=5.2,
                   help="size of the generated set in GB (default 5.2: 19,840 images in 124 stacks)")
    p.add_argument("--data", type=Path, default=Path("bench-data"), help="data folder, reused (default ./bench-data)")
    p.add_argument("--cache", choices=("warm", "cold", "both"), default="both",
                   help="page cache state before each timed run (cold drops it; needs root)")
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out (prefixes of their names)")


def caches(choice: str) -> list[bool]:
    return {"warm": [False], "cold": [True], "both": [False, True]}[choice]


def warm_up(ps: ParticleSet) -> None:
    """Read every stack once, so that a warm run finds them in the page cache."""
    for name in ps.stacks:
        with open(ps.root / name, "rb") as f:
            while f.read(64 * 2**20):
                pass


def wanted(method: str, skip: list[str]) -> bool:
    return not any(method.startswith(s) for s in skip)


# ---------------------------------------------------------------------------------------------
# runners, each in its own process

def _runs(star: Path) -> list[tuple[str, int, int]]:
    """(stack path, start, stop) runs of consecutive images in the STAR file's order (0-based)."""
    runs: list[list] = []
    pat = re.compile(r"^(\d+)@(\S+)")
    for line in star.read_text().splitlines():
        m = pat.match(line)
        if not m:
            continue
        i, path = int(m.group(1)) - 1, str(star.parent / m.group(2))
        if runs and runs[-1][0] == path and runs[-1][2] == i:
            runs[-1][2] += 1
        else:
            runs.append([path, i, i + 1])
    return [tuple(r) for r in runs]


def split_runs(runs: list[tuple], max_images: int) -> list[list[tuple]]:
    """Runs ``(stack, start, stop)`` cut into consecutive groups of at most ``max_images`` images, in
    order: the output files of a job with that batch size (file k holds particles k*N to (k+1)*N)."""
    groups: list[list[tuple]] = [[]]
    room = max_images
    for stack, start, stop in runs:
        while start < stop:
            if room == 0:
                groups.append([])
                room = max_images
            take = min(room, stop - start)
            groups[-1].append((stack, start, start + take))
            start += take
            room -= take
    return [g for g in groups if g]


def copy_loop(star: Path, out: Path, batch: int, fsync: bool) -> dict:
    """Reference: the particles' bytes moved with os.copy_file_range, one output file per batch
    (header from dparticles' stack_header, so the files are valid stacks like dparticles')."""
    from dparticles.formats.mrc import stack_header

    runs = _runs(star)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    for k, piece in enumerate(split_runs(runs, batch)):  # the same batches as the job's
        count = sum(b - a for _, a, b in piece)
        with open(out / f"batch_{k:06d}.mrcs", "wb") as f:
            f.write(stack_header(count, BOX, np.dtype("<f4"), PIXEL_SIZE, "copy loop"))
            f.flush()
            fd, pos = f.fileno(), 1024
            srcs: dict[str, int] = {}
            for path, a, b in piece:
                src = srcs.get(path)
                if src is None:
                    src = srcs[path] = os.open(path, os.O_RDONLY)
                length, off = (b - a) * IMAGE_BYTES, 1024 + a * IMAGE_BYTES
                while length:
                    moved = os.copy_file_range(src, fd, length, off, pos)
                    length, off, pos = length - moved, off + moved, pos + moved
            for src in srcs.values():
                os.close(src)
            if fsync:
                os.fsync(fd)
        n += count
    return {"seconds": time.perf_counter() - t0, "n": n}


def fft_loop(star: Path, out: Path, box: int, lowpass: float | None, recenter: bool, threads: int,
             fsync: bool = False, use_kernels: bool = False) -> dict:
    """Reference: per stack, read its particles in use into one array, rfft2 (ducc0), crop the
    spectrum, irfft2, write float32 (one output file per source stack; ``fsync`` syncs each).

    With lowpass, recentring or ``use_kernels`` the spectrum goes through
    ``dparticles.kernels.downsample`` (the same ducc0 calls plus the filter and phase ramp, and
    the padding to whole groups of images that makes outputs independent of the chunking), still
    one stack at a time. Reports each stack's seconds (read, FFTs, write), the syncs' apart, and the
    process's CPU seconds.
    """
    import ducc0.fft

    from dparticles import kernels
    from dparticles.formats.mrc import stack_header

    runs = _runs(star)
    shifts = _origins(star) / PIXEL_SIZE if recenter else None
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    top, bottom, cols = box // 2 + 1, box // 2 - 1, box // 2 + 1
    row = 0
    stack_seconds, synced = [], 0.0
    for path, group in itertools.groupby(runs, key=lambda r: r[0]):  # one output file per source stack
        t_stack = time.perf_counter()
        group = list(group)  # one run per stack for all.star; several for a selection
        images = np.empty((sum(b - a for _, a, b in group), BOX, BOX), dtype="<f4")
        with open(path, "rb", buffering=0) as f:
            k = 0
            for _, a, b in group:
                view, pos = memoryview(images[k:k + b - a]).cast("B"), 1024 + a * IMAGE_BYTES
                while view:  # os.preadv may return fewer bytes than asked
                    got = os.preadv(f.fileno(), [view], pos)
                    if not got:
                        raise SystemExit(f"{path}: shorter than its header says")
                    view, pos = view[got:], pos + got
                k += b - a
        if lowpass is None and shifts is None and not use_kernels:
            spec = ducc0.fft.r2c(images, axes=(1, 2), nthreads=threads)
            crop = np.concatenate([spec[:, :top, :cols], spec[:, BOX - bottom:, :cols]], axis=1)
            crop *= np.float32(1.0 / (BOX * BOX))  # keep the mean, as RELION and dparticles do
            small = ducc0.fft.c2r(crop, axes=(1, 2), lastsize=box, forward=False, nthreads=threads,
                                  allow_overwriting_input=True)
        else:
            small = kernels.downsample(images, [box], pixel_size=PIXEL_SIZE, lowpass=lowpass, threads=threads,
                                       shifts=None if shifts is None else shifts[row:row + len(images)])[0]
        with open(out / Path(path).name, "wb") as f:
            f.write(stack_header(len(small), box, np.dtype("<f4"), PIXEL_SIZE * BOX / box, "fft loop"))
            f.write(small.astype("<f4", copy=False).data)
            f.flush()
            t_sync = time.perf_counter()
            if fsync:
                os.fsync(f.fileno())
        stack_seconds.append(t_sync - t_stack)
        synced += time.perf_counter() - t_sync
        row += len(images)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0, "n": row,
            "stack_seconds": stack_seconds, "fsync_seconds": synced}


def _origins(star: Path) -> np.ndarray:
    """(ox, oy) in Å of each particle of a STAR file written by ``_write_star``."""
    rows = [line.split() for line in star.read_text().splitlines() if re.match(r"^\d+@", line)]
    return np.array([[float(r[10]), float(r[11])] for r in rows])


def api(job: str, star: Path, out: Path, options: dict, cluster: dict, piece_mb: float | None = None) -> dict:
    """dparticles through its Python API with an embedded LocalCluster: total wall time (cluster
    start-up included), task time, workers' peak (ru_maxrss) and this client process's peak."""
    import resource

    import dask

    import dparticles

    t0 = time.perf_counter()

    def log(line: str) -> None:  # the job's log with elapsed times, on stderr (shown on failure)
        print(f"{time.perf_counter() - t0:7.2f} s  {line}", file=sys.stderr, flush=True)

    fn = dparticles.restack if job == "restack" else dparticles.downsample
    knobs = {} if piece_mb is None else {"dparticles.piece-bytes": int(piece_mb * 2**20)}
    with dask.config.set(knobs):  # an A/B knob: read by the client when it plans the pieces of a copy
        result = fn(star, out, overwrite=True, cluster=cluster, log=log, **options)
    log("done")
    total = time.perf_counter() - t0
    summary = (result[0] if isinstance(result, list) else result).summary
    return {"seconds": total, "task_seconds": summary.seconds, "workers": summary.n_workers,
            "worker_peak": summary.peak_worker_memory_bytes,
            "client_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _main() -> None:
    p = argparse.ArgumentParser(description="benchmark runners (called by the benchmark scripts)")
    p.add_argument("what", choices=("copy-loop", "fft-loop", "api-restack", "api-downsample"))
    p.add_argument("star", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--box", type=int)
    p.add_argument("--lowpass", type=float)
    p.add_argument("--recenter", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernels", action="store_true", help="fft-loop: every stack through dparticles.kernels")
    p.add_argument("--options", default="{}", help="JSON keywords for the API call")
    p.add_argument("--cluster", default="{}", help="JSON cluster_client keywords")
    p.add_argument("--piece-mb", type=float, help="dparticles.piece-bytes (largest piece of a copy), in MiB")
    a = p.parse_args()
    if a.what == "copy-loop":
        report = copy_loop(a.star, a.out, a.batch, a.fsync)
    elif a.what == "fft-loop":
        report = fft_loop(a.star, a.out, a.box, a.lowpass, a.recenter, a.threads, a.fsync, a.kernels)
    else:
        report = api(a.what[4:], a.star, a.out, json.loads(a.options), json.loads(a.cluster), a.piece_mb)
    print(json.dumps(report))


if __name__ == "__main__":
    _main()


def import_micros(py: str, cwd: Path, modules: str) -> dict[str, int]:
    """Microseconds of ``import modules`` in a fresh interpreter (``-X importtime``), the self times
    summed by top-level package."""
    proc = subprocess.run([py, "-X", "importtime", "-c", f"import {modules}"], cwd=cwd, capture_output=True,
                          text=True, check=True)
    total: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            root = m.group(2).split(".")[0]
            total[root] = total.get(root, 0) + int(m.group(1))
    return total


def largest_difference(images: np.ndarray, reference: np.ndarray, what: str, tolerance: float = 1e-4) -> float:
    """The largest difference of ``images`` from ``reference``, in standard deviations of the
    reference (float32 rounding of different FFT paths); stops the benchmark above ``tolerance``."""
    if images.shape != reference.shape:
        raise SystemExit(f"{what}: images of shape {images.shape}, the reference's {reference.shape}")
    err = float(np.abs(images - reference).max() / reference.std())
    if err > tolerance:
        raise SystemExit(f"{what}: output differs from the reference: largest difference {err:.2e} x std")
    return err
