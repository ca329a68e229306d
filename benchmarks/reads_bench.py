"""Reads: one chunk task's read of particle images, dparticles against plain os.preadv loops and
the earlier mrcfile memory-map read, in file order and shuffled.

On the generated set (``--gb``, default 5.2: 256 x 256 float32 images, 160 per stack) the 60% of
particles of ``sel.star`` are cut into chunks of ``--chunk`` particles (default 256, the default
64 MB dask chunk), in two orders:

* ``file order``: as ``sel.star`` lists them (a random 60% of each stack, in stack order, so runs
  of consecutive images, as after a 2D classification);
* ``shuffled``: the same particles in a random order (as after classification and a random
  split: almost every particle of a chunk is a run of its own, and the stacks come in any order).

``--chunks`` chunks (default 16, 1 GB) spread over the set are read, one after the other, by

* ``preadv loop, per particle``: the plainest loop: stacks opened once per chunk, one
  ``os.preadv`` per particle, in metadata order, into its row of a preallocated buffer;
* ``preadv loop, per run``: one ``os.preadv`` per run of consecutive images in metadata order;
* ``preadv loop, sorted runs, scattered``: runs in source order (sorted by stack and image,
  as ``plan_reads`` gives them), each one ``os.preadv`` whose buffers are the particles' rows
  in metadata order, so there is nothing to reorder;
* ``preadv loop, sorted runs, then reordered``: the same runs, each one ``os.preadv`` into one
  buffer in reading order, then one fancy-index copy into metadata order;
* ``dparticles read_chunk``: the chunk task (``plan_reads`` made beforehand, as when the graph
  is built; the reading is done as in the scattered loop);
* ``mrcfile mmap (earlier read_runs)``: the read this replaced: runs in metadata order, each
  stack opened as an ``mrcfile.mmap`` for each group of consecutive runs, slices copied out.

Every (cache, order, method) runs in fresh single-threaded processes, so the time is per core
and the peak memory its own (VmHWM, reset before the reads; the baseline after imports and
planning is in the note): ``--rounds`` of them (default 3), the methods taking turns so that
other work on the machine hits them alike, the fastest kept. Warm: the set was read once
before, each process makes ``--repeats`` passes (default 3) and keeps the fastest. Cold: the page
cache is dropped just before the process's one pass (needs root). Each method's images are
checked against the per-particle loop's (CRC of every chunk).

Run: ``python benchmarks/reads_bench.py [--gb 5.2] [--chunk 256] [--cache both]``, about 15 minutes.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
import zlib
from itertools import groupby
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BOX, IMAGE_BYTES  # noqa: E402

PER_PARTICLE = "preadv loop, per particle"
PER_RUN = "preadv loop, per run"
SCATTER = "preadv loop, sorted runs, scattered"
GATHER = "preadv loop, sorted runs, then reordered"
DPARTICLES = "dparticles read_chunk"
MMAP = "mrcfile mmap (earlier read_runs)"
LOOPS = [PER_PARTICLE, PER_RUN, SCATTER, GATHER]
METHODS = LOOPS + [DPARTICLES, MMAP]
ORDERS = ["file order", "shuffled"]


# ---------------------------------------------------------------------------------------------
# the chunks

def chunks(ps: common.ParticleSet, order: str, size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(stack ids, image indices) of ``count`` chunks of ``size`` particles spread over the selection."""
    sel = ps.selection()
    stack_ids = np.concatenate([np.full(len(i), s) for s, i in sel])
    indices = np.concatenate([i for _, i in sel])
    if order == "shuffled":
        perm = np.random.default_rng(7).permutation(len(indices))
        stack_ids, indices = stack_ids[perm], indices[perm]
    total = len(indices) // size
    picks = np.linspace(0, total - 1, min(count, total)).round().astype(int)
    return [(stack_ids[k * size:(k + 1) * size], indices[k * size:(k + 1) * size]) for k in picks]


# ---------------------------------------------------------------------------------------------
# the methods: prepare (untimed, like building the graph) and read (timed, one chunk task)

def _bytes(buf: np.ndarray) -> memoryview:
    return memoryview(buf.reshape(-1).view(np.uint8))


def _metadata_runs(stack_ids: np.ndarray, indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of neighbouring images of one stack in metadata order, ``(stack, start, stop)``."""
    new = np.flatnonzero((np.diff(stack_ids) != 0) | (np.diff(indices) != 1)) + 1
    starts, stops = np.concatenate([[0], new]), np.concatenate([new, [len(indices)]])
    return list(zip(stack_ids[starts].tolist(), indices[starts].tolist(), (indices[stops - 1] + 1).tolist()))


def _source_order(stack_ids: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """All particles as one chunk, planned as lazy_images plans a chunk: runs in source order (with
    the stacks' own numbers) and the order that puts the images read back in metadata order."""
    from dparticles.planning import plan_chunks

    plan = plan_chunks(stack_ids, indices, np.array([0, len(indices)]))
    runs = plan.runs.astype(np.int64)
    runs[:, 0] = plan.stacks[runs[:, 0]]
    return runs, plan.order if plan.reorder[0] else None


def prepare(method: str, infos, stack_ids: np.ndarray, indices: np.ndarray):
    if method == PER_PARTICLE:
        return list(zip(stack_ids.tolist(), indices.tolist()))
    if method in (PER_RUN, MMAP):
        return _metadata_runs(stack_ids, indices)
    runs, order = _source_order(stack_ids, indices)
    if method == GATHER:
        return runs.tolist(), order
    if method == SCATTER:
        order = np.arange(len(indices)) if order is None else order.astype(np.int64)
        if len(np.unique(order)) != len(order):
            raise SystemExit("the scattered loop takes no duplicates")
        dest = np.argsort(order)  # metadata row of each image read, in reading order
        out, pos = [], 0
        for s, a, b in runs.tolist():
            out.append((s, a, dest[pos:pos + b - a].tolist()))
            pos += b - a
        return out
    used, local = np.unique(runs[:, 0], return_inverse=True)  # as lazy_images does
    runs[:, 0] = local
    return tuple(infos[s] for s in used.tolist()), runs, order


def read(method: str, infos, plan, n: int) -> np.ndarray:
    if method == DPARTICLES:
        from dparticles.formats.mrc import read_chunk

        stacks, runs, order = plan
        return read_chunk(stacks, runs, order, "<f4")
    if method == MMAP:
        return _mmap_read([(infos[s], a, b) for s, a, b in plan], "<f4")
    if method == GATHER:
        runs, order = plan
        plan = runs
    buf = np.empty((n, BOX, BOX), dtype=np.float32)
    raw, ib = _bytes(buf), IMAGE_BYTES
    fds: dict[int, int] = {}
    try:
        if method == PER_PARTICLE:
            for k, (s, i) in enumerate(plan):
                fd = fds.get(s)
                if fd is None:
                    fd = fds[s] = os.open(infos[s].path, os.O_RDONLY)
                _full(os.preadv(fd, [raw[k * ib:(k + 1) * ib]], 1024 + i * ib), ib)
        elif method in (PER_RUN, GATHER):
            pos = 0
            for s, a, b in plan:
                fd = fds.get(s)
                if fd is None:
                    fd = fds[s] = os.open(infos[s].path, os.O_RDONLY)
                _full(os.preadv(fd, [raw[pos * ib:(pos + b - a) * ib]], 1024 + a * ib), (b - a) * ib)
                pos += b - a
        else:  # SCATTER
            for s, a, dest in plan:
                fd = fds.get(s)
                if fd is None:
                    fd = fds[s] = os.open(infos[s].path, os.O_RDONLY)
                for j in range(0, len(dest), 1024):  # IOV_MAX
                    part = dest[j:j + 1024]
                    _full(os.preadv(fd, [raw[k * ib:(k + 1) * ib] for k in part], 1024 + (a + j) * ib),
                          len(part) * ib)
    finally:
        for fd in fds.values():
            os.close(fd)
    if method == GATHER and order is not None:
        return buf[order]
    return buf


def _full(got: int, want: int) -> None:
    if got != want:  # regular files on local disks give whole reads; a loop would be needed otherwise
        raise SystemExit(f"short read: {got} of {want} bytes")


def _mmap_read(runs, dtype: str) -> np.ndarray:
    """The earlier ``dparticles.formats.mrc.read_runs``, as it was: an mrcfile memory map per stack for
    each group of consecutive runs, slices copied out."""
    import mrcfile

    first = runs[0][0]
    total = sum(stop - start for _, start, stop in runs)
    out = np.empty((total, first.ny, first.nx), dtype=np.dtype(dtype or first.dtype).newbyteorder("="))
    pos = 0
    for info, group in groupby(runs, key=lambda run: run[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(info.path, mode="r", permissive=True) as mrc:
                data = mrc.data.reshape(-1, info.ny, info.nx)
                for _, start, stop in group:
                    out[pos:pos + stop - start] = data[start:stop]
                    pos += stop - start
                del data
    return out


# ---------------------------------------------------------------------------------------------
# one (cache, order, method) in this process

def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(a: argparse.Namespace) -> dict:
    from dparticles.formats.mrc import read_info

    ps = common.particle_set(a.data, a.gb)
    infos = [read_info(str(ps.root / s)) for s in ps.stacks]
    work = [(len(i), prepare(a.method, infos, s, i)) for s, i in chunks(ps, a.order, a.chunk, a.chunks)]
    cold = a.cache == "cold"
    common.prepare(cold)  # sync, wait for idle CPUs; cold: drop the page cache
    base = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5\n")  # reset VmHWM to the current RSS
    except OSError:
        pass
    best, cpu, crcs = float("inf"), 0.0, []
    for _ in range(1 if cold else a.repeats):
        seconds, used, crcs = 0.0, 0.0, []
        for n, plan in work:
            t0, c0 = time.perf_counter(), time.process_time()
            images = read(a.method, infos, plan, n)
            seconds += time.perf_counter() - t0
            used += time.process_time() - c0
            crcs.append(zlib.crc32(images.data))
            del images
        if seconds < best:
            best, cpu = seconds, used
    return {"seconds": best, "cpu": cpu, "n": sum(n for n, _ in work), "chunks": len(work),
            "peak": _status("VmHWM"), "base": base, "crc": crcs}


# ---------------------------------------------------------------------------------------------
# the table

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.common_options(p)
    p.add_argument("--chunk", type=int, default=256, help="particles per chunk (default 256: 64 MB)")
    p.add_argument("--chunks", type=int, default=16, help="chunks read per pass (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="warm passes per process; the fastest is kept (default 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="fresh processes per method, methods interleaved; the fastest is kept (default 3)")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "ORDER", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.method, a.order, a.cache = a.child
        print(json.dumps(child(a)))
        return
    ps = common.particle_set(a.data, a.gb)
    print(f"reads of {a.chunks} chunks of {a.chunk} particles ({a.chunk * IMAGE_BYTES / 2**20:.0f} MiB each) from "
          f"{ps.n_stacks} stacks; one thread per process; {common.machine()}", flush=True)
    rows = []
    for cold in common.caches(a.cache):
        if not cold:
            common.warm_up(ps)
        cache = "cold" if cold else "warm"
        for order in ORDERS:
            reports: dict[str, dict] = {}
            for _ in range(a.rounds):  # methods interleaved, so that other work on the machine hits all alike
                for method in METHODS:
                    if not common.wanted(method, a.skip):
                        continue
                    rep = _child(a, method, order, cache)
                    print(f"  {cache} {order} {method}: {rep['seconds']:.3f} s", flush=True)
                    if method in reports and rep["crc"] != reports[method]["crc"]:
                        raise SystemExit(f"{method} read other images in another round")
                    if method not in reports or rep["seconds"] < reports[method]["seconds"]:
                        rep["peak"] = max(rep["peak"], reports.get(method, rep)["peak"])
                        reports[method] = rep
            rows += _rows_of(cache, order, reports)
    print()
    print(_table(rows))


def _child(a: argparse.Namespace, method: str, order: str, cache: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--data", str(a.data), "--gb", str(a.gb),
           "--chunk", str(a.chunk), "--chunks", str(a.chunks), "--repeats", str(a.repeats),
           "--child", method, order, cache]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return common.last_json(proc.stdout)


def _rows_of(cache: str, order: str, reports: dict) -> list[dict]:
    check = reports.get(PER_PARTICLE, next(iter(reports.values())))["crc"]
    for method, rep in reports.items():
        if rep["crc"] != check:
            raise SystemExit(f"{cache} {order}: {method} read other images than the per-particle loop")
    loops = {m: r["seconds"] for m, r in reports.items() if m in LOOPS}
    fastest = min(loops, key=loops.get) if loops else None
    out = []
    for method, rep in reports.items():
        out.append(dict(rep, cache=cache, order=order, method=method,
                        ref=rep["seconds"] / loops[fastest] if fastest else None,
                        old=rep["seconds"] / reports[MMAP]["seconds"] if MMAP in reports else None,
                        note=("fastest loop" if method == fastest else "")
                        + f"{'; ' if method == fastest else ''}baseline {common.fmt_bytes(rep['base'])}"))
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| cache | order | method | seconds | ms per chunk | particles/s per core | GB/s | CPU s "
             "| time / fastest loop | time / mrcfile mmap | peak memory | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {r['cache']} | {r['order']} | {r['method']} | {r['seconds']:.3f} | "
                     f"{1e3 * r['seconds'] / r['chunks']:.1f} | {r['n'] / r['seconds']:,.0f} | "
                     f"{r['n'] * IMAGE_BYTES / r['seconds'] / 1e9:.2f} | {r['cpu']:.3f} | {ratio(r['ref'])} | "
                     f"{ratio(r['old'])} | {common.fmt_bytes(r['peak'])} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
