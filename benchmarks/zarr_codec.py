"""Which compressor for the zarr cache: ratio and speed of blosc/zstd/lz4 on real particle images.

Particle images are mostly noise, so compression buys little; this measures how little, and at
what cost, on the RELION-written stacks in ../shared/data/real (or any stacks given as arguments).

    python benchmarks/zarr_codec.py [STACK.mrcs ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
from numcodecs import LZ4, Blosc, Zstd

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/real/relion31_sim_ribo70S_b128/Extract/job007/Movies"
CODECS = {
    "blosc zstd 1 shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
    "blosc zstd 5 shuffle": Blosc("zstd", 5, Blosc.SHUFFLE),
    "blosc zstd 5 bitshuffle": Blosc("zstd", 5, Blosc.BITSHUFFLE),
    "blosc lz4 5 shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
    "zstd 3": Zstd(3),
    "lz4": LZ4(),
}


def _read(path: str) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data).reshape(-1, *mrc.data.shape[-2:])


def main(paths: list[str]) -> None:
    files = paths or sorted(str(p) for p in DEFAULT.glob("*.mrcs"))
    data = np.concatenate([_read(f) for f in files]).astype("<f4")
    for label, arr in (("float32", data), ("float16", data.astype("<f2"))):
        raw = arr.tobytes()
        print(f"{label}: {len(raw) / 1e6:.1f} MB of {len(arr)} images")
        for name, codec in CODECS.items():
            t = time.perf_counter()
            enc = codec.encode(raw)
            te = time.perf_counter() - t
            t = time.perf_counter()
            codec.decode(enc)
            td = time.perf_counter() - t
            print(f"  {name:26s} ratio {len(raw) / len(enc):6.3f}  encode {len(raw) / te / 1e6:7.0f} MB/s  "
                  f"decode {len(raw) / td / 1e6:7.0f} MB/s")


if __name__ == "__main__":
    main(sys.argv[1:])
