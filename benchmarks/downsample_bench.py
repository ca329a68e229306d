"""Downsample: dparticles against a plain single-process loop and RELION 3.1's relion_image_handler.

On a generated set (``--gb``, default 5.2: 256 x 256 float32 images, 160 per stack; every
particle of ``all.star``) each configuration (box 256 -> 64 and -> 128, with and without
lowpass and recentring) is run by

* ``plain loop``: one process, stack by stack: read with numpy, ``rfft2`` with ducc0
  (``--threads``, default 2), crop the spectrum, ``irfft2``, write float32 (with lowpass and
  recentring the spectrum goes through ``dparticles.kernels.downsample``, same threads);
* ``relion_image_handler --i stack.mrcs --angpix P --rescale_angpix Q --o ...``, once per stack
  (with ``--lowpass`` and one ``--shift_x/--shift_y`` for all images: it cannot apply a shift
  per particle, so that row is an estimate of the cost, not the same result);
* dparticles through its Python API with an embedded LocalCluster (total wall time, cluster
  start-up included, and the task time alone), and through its command line (first
  configuration only).

Each run is a fresh process under ``/usr/bin/time``; warm and cold page cache (cold drops the
cache before each run; needs root). The dparticles output is checked against the plain loop's.
Prints a markdown table with ratios measured in this run.

Run: ``python benchmarks/downsample_bench.py [--gb 5.2] [--data bench-data] [--cache both]``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BOX, IMAGE_BYTES, PIXEL_SIZE, Result  # noqa: E402

LOOP = "plain loop"
RELION = "relion_image_handler"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.common_options(p)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128], help="output boxes (default 64 128)")
    p.add_argument("--threads", type=int, default=2, help="FFT threads of the plain loop (default 2)")
    p.add_argument("--filters", choices=("none", "both", "only"), default="both",
                   help="configurations without (none), with and without (both), or only with lowpass and recentring")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each method; the fastest is kept")
    a = p.parse_args()
    if shutil.which("relion_image_handler") is None:
        a.skip.append(RELION)
    ps = common.particle_set(a.data, a.gb)
    nbytes = ps.n * IMAGE_BYTES
    out = ps.root.parent / "out-downsample"
    print(f"downsample {ps.n} particles ({nbytes / 1e9:.2f} GB, {ps.n_stacks} stacks); {common.machine()}",
          flush=True)
    dp = str(Path(sys.executable).with_name("dparticles"))
    configs = [(b, f) for b in a.boxes for f in {"none": [False], "both": [False, True], "only": [True]}[a.filters]]
    results: list[Result] = []
    for cold in common.caches(a.cache):
        if not cold:
            common.warm_up(ps)
        for k, (box, filt) in enumerate(configs):
            lowpass = 2.5 * PIXEL_SIZE * BOX / box if filt else None  # Å, below the new Nyquist
            label = f"{BOX}->{box}" + (f", lowpass {lowpass:g} Å, recentred" if filt else "")
            loop_args = ["--box", str(box), "--threads", str(a.threads)] + (
                ["--lowpass", str(lowpass), "--recenter"] if filt else [])
            # the set has only the movies' pixel size (rlnMicrographOriginalPixelSize): the micrographs' is given
            options = {"fourier_box": box, "lowpass": lowpass, "recenter": filt,
                       "micrograph_pixel_size": PIXEL_SIZE if filt else None}
            methods = {
                f"{LOOP} ({a.threads} threads), {label}": lambda o: common.runner(
                    "fft-loop", str(ps.all_star), str(o), *loop_args),
                f"{RELION}, {label}": lambda o: _relion(ps, o, box, lowpass),
                f"dparticles API, {label}": lambda o: common.runner(
                    "api-downsample", str(ps.all_star), str(o), "--options", json.dumps(options)),
            }
            if k == 0:
                methods[f"dparticles CLI, {label}"] = lambda o: [dp, "downsample", str(ps.all_star), "--out", str(o),
                                                                 "--fourier-box", str(box), "--overwrite"] + (
                    ["--lowpass", str(lowpass), "--recenter", "--micrograph-pixel-size", str(PIXEL_SIZE)]
                    if filt else [])
            for method, cmd in methods.items():
                if not common.wanted(method, a.skip):
                    continue
                best = None
                for _ in range(a.repeats):
                    common.clean(out)
                    out.mkdir(parents=True)
                    wall, peak, stdout, synced = common.run_timed(cmd(out), cwd=ps.root, cold=cold)
                    r = _result(method, wall, peak, stdout, ps.n, nbytes, cold)
                    for row in r:
                        row.sync = synced
                    if best is None or r[0].seconds < best[0].seconds:
                        best = r
                    if method.startswith(LOOP):
                        shutil.copy(out / "stack_0000.mrcs", out.parent / "loop_first_stack.mrcs")
                    if method.startswith("dparticles API"):
                        _check(out / "stacks" / "batch_000000.mrcs", out.parent / "loop_first_stack.mrcs")
                results += best
                print(f"  {'cold' if cold else 'warm'} {method}: {best[0].seconds:.2f} s", flush=True)
    common.clean(out)
    print()
    refs = [f"{LOOP} ({a.threads} threads), {BOX}->{b}" + (f", lowpass {2.5 * PIXEL_SIZE * BOX / b:g} Å, recentred"
                                                           if f else "") for b, f in configs]
    print(_by_config(results, refs))


def _relion(ps: common.ParticleSet, out: Path, box: int, lowpass: float | None) -> list[str]:
    """One relion_image_handler per stack, in one shell (its peak is the largest process's)."""
    extra = f"--lowpass {lowpass} --shift_x 1.3 --shift_y -0.7" if lowpass else ""
    new = PIXEL_SIZE * BOX / box
    script = (f"for s in Extract/*.mrcs; do relion_image_handler --i $s --angpix {PIXEL_SIZE} --rescale_angpix {new} "
              f"{extra} --o {out}/$(basename $s) > /dev/null || exit 1; done")
    return ["bash", "-c", script]


def _result(method: str, wall: float, peak: int, stdout: str, n: int, nbytes: int, cold: bool) -> list[Result]:
    if method.startswith(LOOP):
        rep = common.last_json(stdout)
        return [Result(method, rep["seconds"], n, nbytes, peak, f"process wall {wall:.2f} s", cold)]
    if method.startswith("dparticles API"):
        rep = common.last_json(stdout)
        note = (f"{rep['workers']} workers; client process peak {common.fmt_bytes(rep['client_peak'])}; "
                "peak memory = largest worker's")
        return [Result(method, rep["seconds"], n, nbytes, rep["worker_peak"], note, cold),
                Result(method.replace("API", "API, tasks only"), rep["task_seconds"], n, nbytes, rep["worker_peak"],
                       "cluster start-up and metadata excluded", cold)]
    note = "peak memory = largest of client and workers" if "CLI" in method else "largest of the per-stack runs"
    return [Result(method, wall, n, nbytes, peak, note, cold)]


def _check(mine: Path, loop: Path) -> None:
    """dparticles' first images equal the plain loop's (float32 rounding of different FFT paths)."""
    import mrcfile

    with mrcfile.mmap(mine, permissive=True) as own, mrcfile.mmap(loop, permissive=True) as ref:
        b = np.array(ref.data)
        a = np.array(own.data[:len(b)])
    common.largest_difference(a, b, "dparticles against the plain loop")


def _by_config(results: list[Result], refs: list[str]) -> str:
    """One table; each row's ratio is against the plain loop of its own configuration and cache."""
    rows = []
    for ref in refs:
        config = ref.split(", ", 1)[1]
        group = [r for r in results if r.method.endswith(config)]
        rows.append(common.table(group, [ref]).replace(f"time / {ref}", "time / plain loop"))
    head, *rest = rows
    return "\n".join([head] + ["\n".join(t.splitlines()[2:]) for t in rest])


if __name__ == "__main__":
    main()
