"""Opening 1,000,000 particles in 10,000 stacks: ``open_particles`` against the plain loop
``starfile.read`` + ``mrcfile.open(header_only=True)`` of every stack.

    python benchmarks/open_1m.py [FOLDER]      (default ./bench-data/open1m, reused when present)

The stacks are sparse files (a real header, the size set with truncate), so the 10,000 stacks of
120 images of 64x64 float32 take almost no disk. 100 images of each stack are in use (20 are
skipped, at scattered places), 1,000,000 in all, in one RELION 3.1 STAR file. Each measurement runs
in a fresh process, so the peak memory (ru_maxrss) is its own; "seconds" excludes the time to import
the libraries (shown apart); "cold" runs follow a page-cache drop when this process is allowed to
write /proc/sys/vm/drop_caches.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_STACKS, PER_STACK, IN_USE, BOX = 10_000, 120, 100, 64


def generate(folder: Path) -> Path:
    """Write the stacks and particles.star unless a complete set is already there."""
    star = folder / "particles.star"
    if star.is_file():
        return star
    import pandas as pd

    from dparticles.formats.mrc import stack_header

    stacks = folder / "Extract" / "job001" / "Movies"
    stacks.mkdir(parents=True, exist_ok=True)
    header = stack_header(PER_STACK, BOX, np.float32, 1.1, "dparticles benchmark")
    size = 1024 + PER_STACK * BOX * BOX * 4
    for k in range(N_STACKS):
        with open(stacks / f"mic_{k:05d}.mrcs", "wb") as f:
            f.write(header)
            f.truncate(size)
    rng = np.random.default_rng(0)
    skip = np.sort(np.stack([rng.choice(PER_STACK, PER_STACK - IN_USE, replace=False) for _ in range(N_STACKS)]))
    used = np.ones((N_STACKS, PER_STACK), dtype=bool)
    used[np.arange(N_STACKS)[:, None], skip] = False
    stack_of, index = np.nonzero(used)
    n = len(index)
    assert n == 1_000_000
    names = pd.Series(index + 1).astype(str).str.zfill(6) + "@Extract/job001/Movies/mic_" + \
        pd.Series(stack_of).astype(str).str.zfill(5) + ".mrcs"
    mics = "MotionCorr/job002/Movies/mic_" + pd.Series(stack_of).astype(str).str.zfill(5) + ".mrc"
    df = pd.DataFrame({
        "rlnImageName": names, "rlnMicrographName": mics,
        "rlnCoordinateX": rng.uniform(0, 4096, n).round(1), "rlnCoordinateY": rng.uniform(0, 4096, n).round(1),
        "rlnDefocusU": rng.uniform(8000, 25000, n).round(2), "rlnDefocusV": rng.uniform(8000, 25000, n).round(2),
        "rlnDefocusAngle": rng.uniform(-180, 180, n).round(2), "rlnAngleRot": rng.uniform(-180, 180, n).round(3),
        "rlnAngleTilt": rng.uniform(0, 180, n).round(3), "rlnAnglePsi": rng.uniform(-180, 180, n).round(3),
        "rlnOriginXAngst": rng.uniform(-10, 10, n).round(3), "rlnOriginYAngst": rng.uniform(-10, 10, n).round(3),
        "rlnClassNumber": rng.integers(1, 11, n), "rlnOpticsGroup": np.ones(n, dtype=np.int64)})
    tmp = star.with_suffix(".star.tmp")
    with open(tmp, "w") as f:
        f.write("\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
                "_rlnVoltage #3\n_rlnSphericalAberration #4\n_rlnAmplitudeContrast #5\n_rlnImagePixelSize #6\n"
                f"_rlnImageSize #7\n_rlnImageDimensionality #8\n1 opticsGroup1 300.0 2.7 0.1 1.1 {BOX} 2\n\n")
        f.write("\n# version 30001\n\ndata_particles\n\nloop_\n")
        f.writelines(f"_{c} #{i}\n" for i, c in enumerate(df.columns, start=1))
        df.to_csv(f, sep=" ", header=False, index=False, lineterminator="\n")
    tmp.rename(star)
    return star


def measure(kind: str, star: Path) -> dict:
    """One measurement, in this process: seconds and peak memory."""
    t0 = time.perf_counter()
    if kind == "open_particles":
        from dparticles.dataset import open_particles
    else:
        import mrcfile
        import starfile
    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kind == "open_particles":
        ds = open_particles(star)
        n, stacks = ds.sizes["particle"], ds.sizes["stack"]
    else:
        blocks = starfile.read(star, always_dict=True)
        names = blocks["particles"]["rlnImageName"].str.split("@", n=1).str[1]
        paths = names.unique()
        for p in paths:
            with mrcfile.open(star.parent / p, mode="r", header_only=True, permissive=True) as mrc:
                int(mrc.header.nz)
        n, stacks = len(names), len(paths)
    seconds = time.perf_counter() - t0
    return {"kind": kind, "seconds": seconds, "imports": imports, "particles": n, "stacks": stacks,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def drop_caches() -> bool:
    """Drop the page cache (root only, and only where the kernel lets this container)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run(kind: str, star: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", kind, str(star)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], Path(sys.argv[3]))))
        return
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-data/open1m").resolve()
    t0 = time.perf_counter()
    star = generate(folder)
    print(f"data: {folder} ({N_STACKS} stacks x {PER_STACK} images of {BOX}x{BOX}, {N_STACKS * IN_USE} in use; "
          f"STAR {star.stat().st_size / 1e6:.0f} MB; ready in {time.perf_counter() - t0:.1f} s)")
    rows = []
    for mode in ("warm", "cold"):
        for kind in ("reference", "open_particles"):
            if mode == "cold" and not drop_caches():
                break
            if mode == "warm":
                run(kind, star)  # fill the page cache
            rows.append((mode, run(kind, star)))
    if not any(m == "cold" for m, _ in rows):
        print("cold: not measured (cannot write /proc/sys/vm/drop_caches here)")
    print(f"{'cache':<6} {'what':<16} {'seconds':>8} {'imports':>8} {'peak MB':>8} {'particles':>10} {'stacks':>7}")
    for mode, r in rows:
        print(f"{mode:<6} {r['kind']:<16} {r['seconds']:>8.2f} {r['imports']:>8.2f} {r['peak_mb']:>8.0f} "
              f"{r['particles']:>10} {r['stacks']:>7}")
    for mode in ("warm", "cold"):
        got = {r["kind"]: r for m, r in rows if m == mode}
        if len(got) == 2:
            ratio = got["open_particles"]["seconds"] / got["reference"]["seconds"]
            print(f"{mode}: open_particles / plain loop = {ratio:.2f}x time, "
                  f"{got['open_particles']['peak_mb'] / got['reference']['peak_mb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
