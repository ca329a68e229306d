"""One memory model: a task's particles follow from what the kernel holds at its peak, not from its
input's bytes. The model (``kernels.task_peak_bytes``) against hand arithmetic and against what the
kernel allocates; chunks cut to fit a small budget for pad, crop and multi-size downsamples, the common
case left whole; sizes no budget holds refused before any graph; and a job under a small budget
writing the same bytes as under a large one."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import dask
import distributed
import numpy as np
import pytest
from helpers import simple_set

from dparticles import kernels, ops, planning
from dparticles.cli import main
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.jobs.downsample import downsample

MiB = 2**20


# --- the model ----------------------------------------------------------------------------------

def _hand(n: int, b: int, c: int, o: int) -> int:
    """The model written out for one output box below ``c``, float32 input, n a multiple of 16."""
    inputs, cropped = n * b * b * 4, n * c * c * 4
    spectra = n * c * (c // 2 + 1) * 8
    window, out, ramp = n * o * (o // 2 + 1) * 8, n * o * o * 4, n * (o + o // 2 + 1) * 16 * 3
    filters = o * (o // 2 + 1) * 8 * 6
    return inputs + cropped + spectra + window + out + ramp + filters


@pytest.mark.parametrize("n, box, crop, boxes, expected", [
    (32, 128, 2048, [32], _hand(32, 128, 2048, 32)),  # the pad: 1.00 GiB for 32 particles
    (1024, 128, None, [64], _hand(1024, 128, 128, 64) - 1024 * 128 * 128 * 4),  # no crop: no working copy
    (16, 64, 256, [64], _hand(16, 64, 256, 64)),
    # one particle still transforms a whole group of 16: the padded working images and spectra are 16's
    (1, 128, 2048, [32], 128 * 128 * 4 + 2048**2 * 4 + 16 * 2048**2 * 4 + 16 * 2048 * 1025 * 8
     + 16 * (32 * 17 * 8 + 32 * 32 * 4 + 49 * 16 * 3) + 32 * 17 * 8 * 6),
])
def test_model_by_hand(n, box, crop, boxes, expected):
    assert kernels.task_peak_bytes(n, box, crop, boxes) == expected


def test_model_of_a_crop_alone_and_of_16_bit_input():
    assert kernels.task_peak_bytes(10, 128, 512, [512], fourier=False) == 10 * (128 * 128 * 4 + 512 * 512 * 4)
    # int16 input: 2 bytes a pixel read, its float32 copy only while cropping (the crop is larger)
    assert kernels.task_peak_bytes(10, 128, 512, [512], itemsize=2, fourier=False) == \
        10 * (128 * 128 * 2 + 128 * 128 * 4 + 512 * 512 * 4)


MEASURED = {
    # id: (n, box, crop box, output boxes, input dtype, lowpass, recentre, pixel sizes)
    "no-crop-128-64": (100, 128, None, (64,), "f4", None, False, 1),
    "pad-1024-32": (20, 64, 1024, (32,), "f4", None, False, 1),
    "pad-1024-32-group": (32, 64, 1024, (32,), "f4", None, False, 1),
    "pad-512-sizes-recentred": (17, 64, 512, (32, 64, 512), "f4", 8.0, True, 1),
    "crop-256-64-sizes": (40, 256, 64, (32, 128), "f4", None, False, 1),
    "pad-only-512": (40, 128, 512, (512,), "f4", None, False, 1),
    "fourier-pad-float16": (40, 64, 128, (256,), "f2", 8.0, False, 1),
    "two-pixel-sizes-lowpass": (40, 64, None, (48, 32), "f4", 8.0, False, 2),
    "int16-recentred": (5, 64, 512, (16,), "i2", None, True, 1),
}


@pytest.mark.parametrize("case", list(MEASURED))
def test_model_bounds_what_the_kernel_allocates(case):
    """The model is at least what numpy allocates at the kernel's peak (tracemalloc, the input added),
    less 1 MiB of reduction buffers, and at most 25% more."""
    n, box, crop, boxes, dtype, lowpass, recenter, groups = MEASURED[case]
    rng = np.random.default_rng(0)
    images = (rng.standard_normal((n, box, box)) * 10).astype(dtype)
    psize = np.where(np.arange(n) % groups, 2.0, 1.5)
    shift = rng.normal(size=n) if recenter else None
    c = crop or box
    tracemalloc.start()
    try:
        out = kernels.downsample_chunk(images, psize, shift, shift, crop_box=crop, boxes=boxes, lowpass=lowpass)
        measured = tracemalloc.get_traced_memory()[1] + images.nbytes
    finally:
        tracemalloc.stop()
    assert [o.shape for o in out] == [(n, b, b) for b in boxes]
    model = kernels.task_peak_bytes(n, box, crop, boxes, itemsize=images.itemsize,
                                    fourier=lowpass is not None or recenter or any(b != c for b in boxes),
                                    split=groups > 1 and lowpass is not None)
    assert measured - MiB <= model <= 1.25 * measured + MiB, (model / MiB, measured / MiB)


def test_fit_chunks_keeps_fitting_chunks_and_cuts_the_rest_to_fit():
    peak = lambda n: kernels.task_peak_bytes(n, 128, 2048, [32])  # noqa: E731
    budget = int(0.75 * 2e9)
    assert planning.fit_chunks([400], lambda n: kernels.task_peak_bytes(n, 128, None, [64]), budget, 16) == (400,)
    for chunks in ([346], [400, 100, 31], [17], [1]):
        cut = planning.fit_chunks(chunks, peak, budget, 16)
        assert sum(cut) == sum(chunks) and all(peak(c) <= budget for c in cut), cut
    assert planning.fit_chunks([346], peak, budget, 16)[0] == 32  # whole groups: 33 would pad to 48
    for budget in (peak(1), peak(7), peak(15) - 1, peak(31), peak(48) + 1):  # below and above a group
        for c in range(1, 120):
            cut = planning.fit_chunks([c], peak, budget, 16)
            assert sum(cut) == c and max(map(peak, cut)) <= budget, (budget, c, cut)
    with pytest.raises(ValueError, match="one particle"):
        planning.fit_chunks([4], peak, peak(1) - 1, 16)


# --- chunks of a lazy downsample -----------------------------------------------------------------

@pytest.fixture(scope="module")
def star(tmp_path_factory) -> Path:
    """40 particles of 32 px in two stacks, pixel sizes alternating (1.5, 2.0 Å)."""
    return simple_set(tmp_path_factory.mktemp("memory"), per_stack=20, box=32, pixel_sizes=(1.5, 2.0))[0]


CHUNKS = {
    # id: (downsample keywords, memory budget)
    "pad": ({"crop_box": 512, "fourier_box": 16}, "100MB"),
    "pad-only": ({"crop_box": 1024}, "100MB"),
    "crop-fourier-pad": ({"crop_box": 24, "fourier_box": 96, "lowpass": 6.0}, "4MB"),
    "sizes-recentred": ({"crop_box": 256, "fourier_box": [16, 64, 256], "lowpass": 6.0, "recenter": True,
                         "micrograph_pixel_size": 1.0}, "40MB"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # odd requests, said elsewhere
@pytest.mark.parametrize("case", list(CHUNKS))
def test_chunks_fit_a_small_budget(star, case):
    kwargs, budget = CHUNKS[case]
    ds = open_particles(star)
    assert ds["images"].data.chunks[0] == (40,)
    with dask.config.set({"dparticles.memory-budget": budget}):
        out = ops.downsample(ds, **kwargs)
    chunks = (out[0] if isinstance(out, list) else out)["images"].data.chunks[0]
    boxes = [kwargs.get("fourier_box", kwargs["crop_box"])]
    boxes = boxes[0] if isinstance(boxes[0], list) else boxes
    fourier = "lowpass" in kwargs or any(b != kwargs["crop_box"] for b in boxes)
    peak = [kernels.task_peak_bytes(c, 32, kwargs["crop_box"], boxes, fourier=fourier, split="lowpass" in kwargs)
            for c in chunks]
    assert len(chunks) > 1 and sum(chunks) == 40
    assert max(peak) <= ops.TASK_SHARE * dask.utils.parse_bytes(budget), (chunks, peak)


def test_common_case_keeps_its_chunks(real):
    ds = open_particles(real / "relion31_sim_ribo70S_b128/Extract/job007/particles.star")
    assert ops.downsample(ds, fourier_box=64)["images"].data.chunks[0] == ds["images"].data.chunks[0] == (400,)
    assert ops.crop(ds, 96)["images"].data.chunks[0] == ds["images"].data.chunks[0]


# --- refused before any graph ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Fourier box 8192 is larger")
@pytest.mark.parametrize("kwargs, message", [
    ({"crop_box": 300000}, r"^crop box 300000 \(--crop-box\) would need 335\.28 GiB for a task of one particle, "
                           r"more than 75% of the memory budget of 2GB per worker \(dparticles.memory-budget\)"),
    ({"crop_box": 300000, "fourier_box": 64}, r"^crop box 300000 \(--crop-box\) would need"),
    ({"crop_box": 4096, "fourier_box": 32}, r"^crop box 4096 \(--crop-box\) would need 2.06 GiB"),
    ({"crop_box": 2048, "fourier_box": 8192}, r"^Fourier box 8192 \(--fourier-box\) from a 2048-pixel box would "
                                              r"need 8.86 GiB"),
    ({"crop_box": 2048, "fourier_box": [32, 8192]}, r"^Fourier box 8192 \(--fourier-box\)"),
])
def test_sizes_beyond_the_budget_are_refused_before_any_graph(star, monkeypatch, kwargs, message):
    ds = open_particles(star)
    monkeypatch.setattr(ops, "da", None)  # any dask call would now fail with something other than ParticleError
    with pytest.raises(ParticleError, match=message):
        ops.downsample(ds, **kwargs)


def test_a_larger_budget_allows_them(star):
    with dask.config.set({"dparticles.memory-budget": "4GB"}):
        ops.downsample(open_particles(star), crop_box=4096, fourier_box=32)


def test_cli_refuses_in_one_line_and_creates_nothing(star, tmp_path, capsys):
    assert main(["downsample", str(star), "--crop-box", "300000", "--fourier-box", "32", "--batch-size", "5",
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--crop-box" in err[0] and "dparticles.memory-budget" in err[0], err
    assert not (tmp_path / "x").exists()


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_job_under_a_small_budget_writes_the_same_bytes(star, tmp_path):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as cluster, distributed.Client(cluster):
        for budget in ("64MB", "2GB"):
            with dask.config.set({"dparticles.memory-budget": budget, "dparticles.report": False}):
                downsample(star, tmp_path / budget, crop_box=512, fourier_box=[16, 24], lowpass=6.0, recenter=True,
                           micrograph_pixel_size=1.0, batch_size=7, log=lambda line: None)
    for budget, tasks in (("64MB", 7), ("2GB", 1)):  # under 64 MB, tasks of 6 particles (16 would not fit)
        with dask.config.set({"dparticles.memory-budget": budget}):
            out = ops.downsample(open_particles(star), crop_box=512, fourier_box=[16, 24], lowpass=6.0, recenter=True,
                                 micrograph_pixel_size=1.0)
        assert len(out[0]["images"].data.chunks[0]) == tasks
    for box in ("box16", "box24"):
        small, large = tmp_path / "64MB" / box / "stacks", tmp_path / "2GB" / box / "stacks"
        names = sorted(p.name for p in large.iterdir())
        assert names == sorted(p.name for p in small.iterdir()) and len(names) == 6
        for name in names:
            assert (small / name).read_bytes() == (large / name).read_bytes()
