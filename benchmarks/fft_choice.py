"""Which FFT library should the downsample kernels use?

Times the work of one downsample call on a batch of 256 x 256 float32 images: one forward
real FFT per image, then a Fourier crop and an inverse real FFT to 128 and to 64 (the two
outputs of a typical multi-resolution job). Prints particles per second per library and
the ratio to ``numpy.fft``, and the same for ``dparticles.kernels.downsample`` itself.

Run: ``python benchmarks/fft_choice.py [--n 256] [--repeats 5]``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

BOX = 256
OUT_BOXES = (128, 64)


def _crop(spec: np.ndarray, out: int) -> np.ndarray:
    """RELION's crop of an rfft2 half-plane: rows 0..out//2 and -((out-1)//2)..-1, columns 0..out//2."""
    top = out // 2 + 1
    bottom = (out - 1) // 2
    rows = np.concatenate([spec[:, :top, : out // 2 + 1], spec[:, spec.shape[1] - bottom:, : out // 2 + 1]],
                          axis=1)
    return rows


def _numpy(images: np.ndarray) -> list[np.ndarray]:
    spec = np.fft.rfft2(images)
    return [np.fft.irfft2(_crop(spec, o), s=(o, o)).astype(np.float32, copy=False) for o in OUT_BOXES]


def _scipy(workers: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import scipy.fft

    def run(images: np.ndarray) -> list[np.ndarray]:
        spec = scipy.fft.rfft2(images, workers=workers)
        return [scipy.fft.irfft2(_crop(spec, o), s=(o, o), workers=workers) for o in OUT_BOXES]

    return run


def _ducc(nthreads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import ducc0.fft

    def run(images: np.ndarray) -> list[np.ndarray]:
        spec = ducc0.fft.r2c(images, axes=(1, 2), nthreads=nthreads)
        return [ducc0.fft.c2r(_crop(spec, o), axes=(1, 2), lastsize=o, forward=False, inorm=2,
                              nthreads=nthreads, allow_overwriting_input=True) for o in OUT_BOXES]

    return run


def _kernel(threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    from dparticles.kernels import downsample

    def run(images: np.ndarray) -> list[np.ndarray]:
        return downsample(images, OUT_BOXES, pixel_size=1.0, threads=threads)

    return run


def _rate(fn: Callable[[np.ndarray], list[np.ndarray]], images: np.ndarray, repeats: int) -> float:
    outs = fn(images)  # warm-up: plans, caches, thread pools
    assert [o.dtype for o in outs] == [np.float32] * len(OUT_BOXES), [o.dtype for o in outs]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images)
        best = min(best, time.perf_counter() - t0)
    return images.shape[0] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the best is kept (default 5)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.n, BOX, BOX), dtype=np.float32)
    print(f"{args.n} x {BOX}x{BOX} float32 -> rfft2, crop, irfft2 to {OUT_BOXES}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

    # all candidates must agree with numpy before their speed counts
    reference = _numpy(images[:4])
    candidates: dict[str, Callable[[np.ndarray], list[np.ndarray]]] = {"numpy.fft": _numpy}
    for w in (1, 2):
        candidates[f"scipy.fft workers={w}"] = _scipy(w)
    for t in (1, 2):
        candidates[f"ducc0.fft nthreads={t}"] = _ducc(t)
    for t in (1, 2):
        candidates[f"kernels.downsample threads={t}"] = _kernel(t)
    rates = {}
    for name, fn in candidates.items():
        got = fn(images[:4])
        for r, g in zip(reference, got, strict=True):
            if name.startswith("kernels"):
                g = g * (BOX * BOX) / (r.shape[-1] ** 2)  # the kernel preserves the mean, numpy does not
            err = float(np.abs(r - g).max() / r.std())
            if err > 1e-5:
                raise SystemExit(f"{name} disagrees with numpy.fft: max relative difference {err:.2e}")
        rates[name] = _rate(fn, images, args.repeats)

    base = rates["numpy.fft"]
    width = max(map(len, rates))
    print(f"{'library':<{width}}  particles/s  x numpy")
    for name, rate in rates.items():
        print(f"{name:<{width}}  {rate:11.0f}  {rate / base:7.2f}")


if __name__ == "__main__":
    main()
