"""Ten million particles on a laptop: ``open_particles``, ``dparticles info --json`` and writing
``particles.star`` (through ``dparticles.store.write_metadata``) at 1M and 10M particles, in file
order and shuffled.

    python benchmarks/scale_bench.py [--sizes 1e6 1e7] [--data bench-data/scale] [--layout relion|compact]

Each size is a RELION 3.1 set of N particles in N / 100 stacks of 167 images of 256 x 256 float32,
100 of each stack listed (60%, at random places), in one ``particles.star`` (15 columns: image and
micrograph names, coordinates, CTF, angles, origins, class, random subset, optics group). The stacks
are sparse files (a real header from ``dparticles.formats.mrc.stack_header``, the size set with truncate:
44 MB each on paper, 4 kB on disk), shared by the sizes, and deleted at the end with the STAR files
(``--keep`` keeps them). The same particles are listed twice: in file order and shuffled.
``--layout relion`` (default) writes fields as RELION does (right-aligned, 6 decimals, about 270 bytes a
row); ``compact`` writes single spaces and short decimals as dparticles and starfile do (about 160).

Every step runs in a fresh process under ``/usr/bin/time``: its peak resident memory is its own.
"seconds" is the step alone (imports excluded) for ``open_particles`` and the write, and the whole
process for ``info --json`` (a user's wait). "bytes/particle" is the peak less the resident memory of
a process that has imported dparticles, pandas, xarray and dask, over the particles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.QUIET_LIMIT = 60.0
BOX, PER_STACK, IN_USE = 256, 167, 100  # 100 of 167: 60% of each stack in use
COLUMNS = ["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU", "rlnDefocusV",
           "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
           "rlnClassNumber", "rlnRandomSubset", "rlnOpticsGroup"]
DECIMALS = {"rlnCoordinateX": 1, "rlnCoordinateY": 1, "rlnDefocusU": 2, "rlnDefocusV": 2, "rlnDefocusAngle": 2,
            "rlnAngleRot": 3, "rlnAngleTilt": 3, "rlnAnglePsi": 3, "rlnOriginXAngst": 3, "rlnOriginYAngst": 3}
ROWS = 1_000_000  # rows generated at a time


# ---------------------------------------------------------------------------------------------
# the generated sets

def stack_name(k: int) -> str:
    return f"Extract/job001/Movies/mic_{k:06d}.mrcs"


def make_stacks(root: Path, n_stacks: int) -> None:
    """Sparse stacks 0 .. n_stacks-1 under ``root`` (those already there are kept)."""
    from dparticles.formats.mrc import stack_header

    header = stack_header(PER_STACK, BOX, np.float32, 1.1, "dparticles scale benchmark")
    size = 1024 + PER_STACK * BOX * BOX * 4
    (root / stack_name(0)).parent.mkdir(parents=True, exist_ok=True)
    for k in range(n_stacks):
        path = root / stack_name(k)
        if path.exists():
            continue
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(size)


def make_star(path: Path, n: int, shuffled: bool, layout: str) -> None:
    """``particles.star`` of ``n`` particles, 100 in each of n / 100 stacks, in file order or shuffled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if path.is_file():
        return
    rng = np.random.default_rng(n)
    n_stacks = n // IN_USE
    stack = np.repeat(np.arange(n_stacks), IN_USE)
    index = np.argsort(rng.random((n_stacks, PER_STACK)), axis=1)[:, :IN_USE]
    index = np.sort(index, axis=1).ravel()
    values = {"rlnCoordinateX": rng.uniform(0, 4096, n), "rlnCoordinateY": rng.uniform(0, 4096, n),
              "rlnDefocusU": rng.uniform(8000, 25000, n), "rlnDefocusV": rng.uniform(8000, 25000, n),
              "rlnDefocusAngle": rng.uniform(-180, 180, n), "rlnAngleRot": rng.uniform(-180, 180, n),
              "rlnAngleTilt": rng.uniform(0, 180, n), "rlnAnglePsi": rng.uniform(-180, 180, n),
              "rlnOriginXAngst": rng.uniform(-10, 10, n), "rlnOriginYAngst": rng.uniform(-10, 10, n),
              "rlnClassNumber": rng.integers(1, 11, n), "rlnRandomSubset": rng.integers(1, 3, n),
              "rlnOpticsGroup": np.ones(n, dtype=np.int64)}
    order = rng.permutation(n) if shuffled else np.arange(n)
    width = 12 if layout == "relion" else 0

    def text(a: int, b: int) -> bytes:
        rows = order[a:b]
        cells = [pc.binary_join_element_wise(_digits(index[rows] + 1, 6), _names(stack[rows], stack_name), "@"),
                 _names(stack[rows], lambda k: f"MotionCorr/job002/Movies/mic_{k:06d}.mrc")]
        for name in COLUMNS[2:]:
            v = values[name][rows]
            cell = _fixed(v, DECIMALS[name], layout) if name in DECIMALS else pc.cast(pa.array(v), pa.string())
            cells.append(pc.utf8_lpad(cell, width, " ") if width else cell)
        cells[-1] = pc.binary_join_element_wise(cells[-1], "", " \n" if layout == "relion" else "\n")
        lines = pc.binary_join_element_wise(*cells, " ")
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1)
        return bytes(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])

    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(b"\n# version 30001\n\ndata_optics\n\nloop_ \n")
        f.write("".join(f"_{c} #{i} \n" for i, c in enumerate(
            ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
             "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
             "rlnImageDimensionality"], start=1)).encode())
        f.write(f"opticsGroup1 1 0.55 300.0 2.7 0.1 1.1 {BOX} 2\n \n\n# version 30001\n\ndata_particles\n\n"
                "loop_ \n".encode())
        f.write("".join(f"_{c} #{i} \n" for i, c in enumerate(COLUMNS, start=1)).encode())
        for a in range(0, n, ROWS):
            f.write(text(a, min(n, a + ROWS)))
        f.write(b" \n")
    tmp.rename(path)


def _digits(values: np.ndarray, width: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width, "0")


def _names(ids: np.ndarray, name) -> object:
    import pyarrow as pa

    uniq, inverse = np.unique(ids, return_inverse=True)
    return pa.array([name(int(k)) for k in uniq], type=pa.string()).take(pa.array(inverse))


def _fixed(v: np.ndarray, decimals: int, layout: str):
    """Fixed-point text: ``decimals`` places, then RELION's six (relion) or as few as needed (compact)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    places = 6 if layout == "relion" else decimals
    k = np.rint(np.round(v, decimals) * 10**places).astype(np.int64)
    whole = pc.cast(pa.array(np.abs(k) // 10**places), pa.string())
    frac = _digits(np.abs(k) % 10**places, places)
    if layout != "relion":
        frac = pc.utf8_rtrim(frac, "0")
        frac = pc.if_else(pc.equal(pc.utf8_length(frac), 0), "0", frac)
    text = pc.binary_join_element_wise(whole, frac, ".")
    return pc.if_else(pa.array(k < 0), pc.binary_join_element_wise("-", text, ""), text)


# ---------------------------------------------------------------------------------------------
# one step, in this (fresh) process

def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return int(next(v for v in Path("/proc/self/status").read_text().splitlines()
                    if v.startswith("VmHWM:")).split()[1]) * 1024


OPEN_PHASES = {"read_star": "STAR read", "from_star": "canonical table", "_coords": "coordinates",
               "resolve_stacks": "resolve_stacks", "read_infos": "read_infos", "lazy_images": "lazy_images",
               "_attach_images": "all of the stack part"}


def open_phases() -> dict:
    """Time the stages of ``open_particles`` (wrapping the functions ``dparticles.dataset`` calls):
    {stage: [seconds, CPU seconds (all threads), peak resident memory so far in bytes]}, filled as they run."""
    import dparticles.dataset as dataset

    phases: dict = {}

    def timed_stage(fn, label):
        def run(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            phases[label] = [time.perf_counter() - t0, time.process_time() - c0, peak_rss()]
            return result
        return run

    for name, label in OPEN_PHASES.items():
        setattr(dataset, name, timed_stage(getattr(dataset, name), label))
    return phases


def child(step: str, star: Path, out: Path | None) -> dict:
    t0 = time.perf_counter()
    import dask.array  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401
    import xarray  # noqa: F401

    from dparticles.dataset import open_particles
    from dparticles.store import write_metadata

    imports, base = time.perf_counter() - t0, rss()
    if step == "baseline":
        return {"imports": imports, "rss": base}
    phases = open_phases() if step == "open" else {}
    t0 = time.perf_counter()
    ds = open_particles(star)
    opened = time.perf_counter() - t0
    report = {"imports": imports, "rss": base, "open": opened, "particles": ds.sizes["particle"],
              "stacks": ds.sizes["stack"], "phases": phases}
    if step == "write":
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_metadata(out, ds, ds["image_path"].values, ds["image_index"].values)
        report["write"] = time.perf_counter() - t0
        report["star_bytes"] = (out / "particles.star").stat().st_size
    report["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


# ---------------------------------------------------------------------------------------------
# the runs

def timed(cmd: list[str]) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS in bytes, stdout, CPU busy fraction before) of ``cmd`` under
    /usr/bin/time, after waiting up to a minute for idle CPUs (``common.run_timed``)."""
    wall, peak, stdout, _ = common.run_timed(cmd)
    return wall, peak, stdout, common.LAST_LOAD


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6], help="numbers of particles (default 1e6)")
    p.add_argument("--data", type=Path, default=Path("bench-data/scale"), help="data folder (default bench-data/scale)")
    p.add_argument("--layout", choices=("relion", "compact"), default="relion", help="how the STAR files are written")
    p.add_argument("--orders", nargs="+", choices=("file", "shuffled"), default=["file", "shuffled"])
    p.add_argument("--keep", action="store_true", help="keep the generated stacks and STAR files")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        step, star, out = a.child[0], Path(a.child[1]), Path(a.child[2]) if len(a.child) > 2 else None
        print(json.dumps(child(step, star, out)))
        return

    root = a.data.resolve()
    sizes = [int(s) for s in a.sizes]
    t0 = time.perf_counter()
    make_stacks(root, max(sizes) // IN_USE)
    print(f"stacks: {max(sizes) // IN_USE} sparse stacks in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = json.loads(subprocess.run(me("--child", "baseline", "-"), capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])["rss"]
    rows = []
    try:
        for n in sizes:
            for order in a.orders:
                star = root / "Select" / f"{n}_{order}_{a.layout}" / "particles.star"
                t0 = time.perf_counter()
                make_star(star, n, order == "shuffled", a.layout)
                size = star.stat().st_size
                print(f"{n:,} particles, {order} order: {star} ({size / 1e9:.2f} GB, "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
                wall, peak, stdout, load = timed(me("--child", "open", str(star)))
                r = json.loads(stdout.splitlines()[-1])
                stages = "; ".join(f"{k} {t:.1f} s, CPU {c:.1f} s, peak {m / 2**30:.2f} GiB"
                                   for k, (t, c, m) in r["phases"].items())
                rows.append((n, r["stacks"], order, "open_particles", r["open"], peak, load,
                             f"STAR {size / 1e9:.2f} GB; imports {r['imports']:.1f} s; {stages}"))
                print(rows[-1], flush=True)
                wall, peak, stdout, load = timed([sys.executable, "-m", "dparticles.cli", "info", "--json", str(star)])
                info = json.loads(stdout)
                assert info["n_particles"] == n, info["n_particles"]
                rows.append((n, info["n_stacks"], order, "info --json", wall, peak, load, "whole process"))
                print(rows[-1], flush=True)
                out = star.parent / "written"
                wall, peak, stdout, load = timed(me("--child", "write", str(star), str(out)))
                r = json.loads(stdout.splitlines()[-1])
                rows.append((n, r["stacks"], order, "write particles.star", r["write"], peak, load,
                             f"{r['star_bytes'] / 1e9:.2f} GB at {r['star_bytes'] / r['write'] / 1e6:.0f} MB/s; "
                             f"peak includes opening"))
                print(rows[-1], flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(root / "Select", ignore_errors=True)
            shutil.rmtree(root / "Extract", ignore_errors=True)
    print(f"\nbaseline (a process that imported dparticles, pandas, xarray, dask): {base / 2**20:.0f} MiB\n")
    print("| particles | stacks | order | step | seconds | peak memory | bytes/particle | note |")
    print("|---:|---:|---|---|---:|---:|---:|---|")
    for n, stacks, order, step, seconds, peak, load, note in rows:
        busy = f"; machine {load:.0%} busy before" if load > 0.15 else ""
        print(f"| {n:,} | {stacks:,} | {order} | {step} | {seconds:.1f} | {peak / 2**30:.2f} GiB | "
              f"{(peak - base) / n:.0f} | {note}{busy} |")


if __name__ == "__main__":
    main()
