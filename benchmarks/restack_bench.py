"""Restack: dparticles against a plain copy_file_range loop and RELION 3.1's relion_stack_create.

On a generated set (``--gb``, default 5.2: 256 x 256 float32 images, 160 per stack) the 60% of
particles named in ``sel.star`` (random per stack, in order: runs of consecutive images) are
written into new stacks of ``--batch-size`` particles by

* ``copy_file_range loop``: the fastest plain Python loop, one ``os.copy_file_range`` per run of
  consecutive particles into one file per batch; with an ``fsync`` per batch file (the same
  durability as dparticles, which syncs each batch before renaming it) and without;
* ``relion_stack_create --one_by_one`` and, if the RAM allows, its default mode (which holds
  every image in memory);
* dparticles through its Python API with an embedded LocalCluster (total wall time, cluster
  start-up included, and the task time alone), and through its command line;
* dparticles ``--float16`` (decodes every image) with workers limited to ``--memory-limit``
  (default 1GB), to show that a worker's memory does not grow with the stacks or the set.

Each run is a fresh process under ``/usr/bin/time``; warm and cold page cache (cold drops the
cache before each run; needs root). Prints a markdown table with ratios measured in this run.

Run: ``python benchmarks/restack_bench.py [--gb 5.2] [--data bench-data] [--cache both]``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import IMAGE_BYTES, Result  # noqa: E402

REFERENCE = "copy_file_range loop, fsync"
FASTEST = "copy_file_range loop, no fsync"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.common_options(p)
    p.add_argument("--batch-size", type=int, default=5000, help="particles per output stack (default 5000)")
    p.add_argument("--memory-limit", default="1GB", help="worker memory limit of the float16 run (default 1GB)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each method, the fastest kept (default 2; the in-memory RELION run once)")
    a = p.parse_args()
    if shutil.which("relion_stack_create") is None:
        a.skip += ["relion"]
    ps = common.particle_set(a.data, a.gb)
    n = sum(len(i) for _, i in ps.selection())
    nbytes = n * IMAGE_BYTES
    out = ps.root.parent / "out-restack"
    print(f"restack {n} of {ps.n} particles ({nbytes / 1e9:.2f} GB in use of {ps.n * IMAGE_BYTES / 1e9:.2f} GB, "
          f"{ps.n_stacks} stacks) into stacks of {a.batch_size}; {common.machine()}", flush=True)
    dp = str(Path(sys.executable).with_name("dparticles"))
    sel = str(ps.sel_star)
    memory_ok = _available() > 2.5 * nbytes  # RELION's default mode holds the images (as doubles)

    methods = {
        FASTEST: lambda o: common.runner("copy-loop", sel, str(o), "--batch", str(a.batch_size)),
        REFERENCE: lambda o: common.runner("copy-loop", sel, str(o), "--batch", str(a.batch_size), "--fsync"),
        "relion_stack_create --one_by_one": lambda o: ["relion_stack_create", "--i", "sel.star", "--o",
                                                       str(o / "relion"), "--one_by_one"],
        "relion_stack_create (in memory)": lambda o: ["relion_stack_create", "--i", "sel.star", "--o",
                                                      str(o / "relion")],
        "dparticles API": lambda o: common.runner("api-restack", sel, str(o), "--options",
                                                  json.dumps({"batch_size": a.batch_size})),
        "dparticles CLI": lambda o: [dp, "restack", sel, "--out", str(o), "--batch-size", str(a.batch_size),
                                     "--overwrite"],
        f"dparticles API --float16, memory limit {a.memory_limit}": lambda o: common.runner(
            "api-restack", sel, str(o), "--options", json.dumps({"batch_size": a.batch_size, "float16": True}),
            "--cluster", json.dumps({"memory_limit": a.memory_limit})),
    }
    if not memory_ok:
        print("relion_stack_create's default mode left out: not enough free memory")
        a.skip.append("relion_stack_create (in memory)")
    results: list[Result] = []
    for cold in common.caches(a.cache):
        if not cold:
            common.warm_up(ps)
        for method, cmd in methods.items():
            if not common.wanted(method, a.skip):
                continue
            best: list[Result] | None = None
            for _ in range(1 if "in memory" in method else a.repeats):
                common.clean(out)
                out.mkdir(parents=True)
                wall, peak, stdout, synced = common.run_timed(cmd(out), cwd=ps.root, cold=cold)
                if method.startswith("relion"):
                    _check_relion(out / "relion.mrcs", n)
                rows = _result(method, wall, peak, stdout, n, nbytes, cold)
                for row in rows:
                    row.sync = synced
                if best is None or rows[0].seconds < best[0].seconds:
                    best = rows
            results += best
            print(f"  {'cold' if cold else 'warm'} {method}: {best[0].seconds:.2f} s", flush=True)
    common.clean(out)
    print()
    print(common.table(results, [REFERENCE, FASTEST, "relion_stack_create --one_by_one"]))


def _result(method: str, wall: float, peak: int, stdout: str, n: int, nbytes: int, cold: bool) -> list[Result]:
    if method.startswith("relion"):
        return [Result(method, wall, n, nbytes, peak, "", cold)]
    if method.startswith("copy"):
        rep = common.last_json(stdout)
        return [Result(method, rep["seconds"], n, nbytes, peak, f"process wall {wall:.2f} s", cold)]
    if "API" in method:
        rep = common.last_json(stdout)
        note = (f"{rep['workers']} workers; client process peak {common.fmt_bytes(rep['client_peak'])}; "
                "peak memory = largest worker's")
        return [Result(method, rep["seconds"], n, nbytes, rep["worker_peak"], note, cold),
                Result(method.replace("API", "API, tasks only"), rep["task_seconds"], n, nbytes, rep["worker_peak"],
                       "cluster start-up and metadata excluded", cold)]
    return [Result(method, wall, n, nbytes, peak, "peak memory = largest of client and workers", cold)]


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _check_relion(path: Path, n: int) -> None:
    size = os.path.getsize(path)
    if size != 1024 + n * IMAGE_BYTES:
        raise SystemExit(f"{path}: {size} bytes, expected {1024 + n * IMAGE_BYTES}")


if __name__ == "__main__":
    main()
