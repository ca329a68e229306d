"""Reading particle images in source order: the read plan (pure arithmetic, as tables), the reader
(``os.preadv`` into one buffer, then one reordering) against direct mrcfile reads of real and
generated stacks, shuffled orders, duplicates, byte orders, mixed modes and truncated stacks."""

from __future__ import annotations

import doctest
import os
import pickle
import warnings
from pathlib import Path
from unittest import mock

import mrcfile
import numpy as np
import pytest
import starfile
from dask.array.utils import assert_eq
from helpers import make_stack, optics_table, read_direct, star_images, write_star

import dparticles.planning
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError
from dparticles.formats.mrc import read_chunk, read_info
from dparticles.planning import chunk_bounds, plan_chunks

SIM = "relion31_sim_ribo70S_b128"
TOY = "cryodrgn/toy_dir"


# --- the plan, as tables --------------------------------------------------------------------

def test_planning_doctests():
    result = doctest.testmod(dparticles.planning)
    assert result.attempted >= 10 and result.failed == 0


def _chunks(stack_ids, indices, bounds) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Each chunk's part of ``plan_chunks``, sliced as ``lazy_images`` slices it: the chunk's stack ids,
    its runs (stack numbered within the chunk, start, stop) and its order (None: the identity)."""
    plan = plan_chunks(stack_ids, indices, bounds)
    return [(plan.stacks[plan.stack_bounds[j]:plan.stack_bounds[j + 1]],
             plan.runs[plan.run_bounds[j]:plan.run_bounds[j + 1]], plan.order[a:b] if plan.reorder[j] else None)
            for j, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist()))]


def _stack_runs(stacks: np.ndarray, runs: np.ndarray) -> list[list[int]]:
    """A chunk's runs with their stack ids: rows ``[stack_id, start, stop]``."""
    return [[int(stacks[s]), a, b] for s, a, b in runs.tolist()]


# (stack ids, image indices, chunk bounds) -> per chunk: runs (stack, start, stop) and order (None: identity)
PLANS = [
    # in source order: one run per stack and chunk, nothing to reorder
    (([0, 0, 0, 1, 1], [0, 1, 2, 0, 1], [0, 5]), [([(0, 0, 3), (1, 0, 2)], None)]),
    # a chunk boundary inside a run cuts it
    (([0, 0, 0, 0], [0, 1, 2, 3], [0, 2, 4]), [([(0, 0, 2)], None), ([(0, 2, 4)], None)]),
    # reversed: one run, read forwards, reordered
    (([0, 0, 0, 0], [3, 2, 1, 0], [0, 4]), [([(0, 0, 4)], [3, 2, 1, 0])]),
    # interleaved stacks (a random split): two runs instead of six
    (([0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2], [0, 6]), [([(0, 0, 3), (1, 0, 3)], [0, 3, 1, 4, 2, 5])]),
    # gaps break runs; stacks come in stack-id order whatever the metadata order
    (([2, 2, 0, 0], [5, 7, 1, 2], [0, 4]), [([(0, 1, 3), (2, 5, 6), (2, 7, 8)], [2, 3, 0, 1])]),
    # the same image three times: read once
    (([0, 0, 0, 0], [4, 4, 3, 4], [0, 4]), [([(0, 3, 5)], [1, 1, 0, 1])]),
    # duplicates in different chunks are read by each
    (([0, 0], [4, 4], [0, 1, 2]), [([(0, 4, 5)], None), ([(0, 4, 5)], None)]),
    # one particle per chunk
    (([1, 0, 1], [9, 0, 8], [0, 1, 2, 3]), [([(1, 9, 10)], None), ([(0, 0, 1)], None), ([(1, 8, 9)], None)]),
]


@pytest.mark.parametrize("given, expected", PLANS)
def test_plan_chunks_table(given, expected):
    stack_ids, indices, bounds = (np.array(v) for v in given)
    got = [([tuple(r) for r in _stack_runs(stacks, runs)], None if order is None else order.tolist())
           for stacks, runs, order in _chunks(stack_ids, indices, bounds)]
    assert got == expected


def test_plan_chunks_empty_and_bad_bounds():
    assert _chunks(np.zeros(0), np.zeros(0), chunk_bounds(0, 5)) == []
    with pytest.raises(ValueError, match="bounds"):
        plan_chunks(np.zeros(3), np.arange(3), np.array([0, 2]))


@pytest.mark.parametrize("seed", range(6))
def test_plan_chunks_random_against_a_plain_loop(seed):
    """Shuffled particles with duplicates, several chunkings: runs are the chunk's distinct images
    sorted and coalesced, compact, and ``order`` rebuilds metadata order from them."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    stack_ids = rng.integers(0, 5, n)
    indices = rng.integers(0, 30, n)
    bounds = chunk_bounds(n, int(rng.integers(1, 60)))
    plan = _chunks(stack_ids, indices, bounds)
    assert len(plan) == len(bounds) - 1
    for (a, b), (stacks, runs, order) in zip(zip(bounds[:-1], bounds[1:]), plan):
        wanted = list(zip(stack_ids[a:b].tolist(), indices[a:b].tolist()))
        distinct = sorted(set(wanted))
        expected_runs = []
        for s, i in distinct:  # the plain loop: extend the last run or start one
            if expected_runs and expected_runs[-1][0] == s and expected_runs[-1][2] == i:
                expected_runs[-1][2] += 1
            else:
                expected_runs.append([s, i, i + 1])
        assert _stack_runs(stacks, runs) == expected_runs
        assert runs.dtype == np.int16 and stacks.dtype == np.int16
        read_back = [(s, i) for s, start, stop in _stack_runs(stacks, runs) for i in range(start, stop)]
        if order is None:
            assert read_back == wanted
        else:
            assert order.dtype == np.int16 and len(order) == b - a
            assert [read_back[r] for r in order.tolist()] == wanted


def test_plan_chunks_large_values_and_sizes():
    """Indices and stack ids beyond int16 make wider arrays; a combined sort key that would overflow
    falls back to a lexicographic sort with the same answer."""
    stack_ids = np.array([70000, 3, 70000, 3])
    indices = np.array([2**40, 5, 2**40 - 1, 4])
    ((stacks, runs, order),) = _chunks(stack_ids, indices, np.array([0, 4]))
    assert runs.dtype == np.int64 and stacks.dtype == np.int32
    assert _stack_runs(stacks, runs) == [[3, 4, 6], [70000, 2**40 - 1, 2**40 + 1]]
    assert order.tolist() == [3, 1, 2, 0]


# --- the reader against direct reads --------------------------------------------------------

def _infos(paths) -> list:
    return [read_info(str(p)) for p in paths]


def _expected(stacks: list[np.ndarray], stack_ids, indices) -> np.ndarray:
    return np.stack([stacks[s][i] for s, i in zip(stack_ids, indices)])


def _read_all(infos, stack_ids, indices, chunk, dtype=None) -> np.ndarray:
    """Every chunk through plan_chunks and read_chunk, concatenated (what a dask chunk task does)."""
    parts = []
    for stacks, runs, order in _chunks(stack_ids, indices, chunk_bounds(len(indices), chunk)):
        parts.append(read_chunk([infos[s] for s in stacks.tolist()], runs, order, dtype))
    return np.concatenate(parts)


def test_real_stacks_in_random_order_with_duplicates(real):
    """The 20 stacks of the RELION simulation, 600 particles drawn at random (many twice), read in
    chunks of several sizes; every image equals mrcfile's."""
    paths = sorted((real / SIM / "Extract/job007/Movies").glob("*.mrcs"))
    infos = _infos(paths)
    stacks = [read_direct(p) for p in paths]
    rng = np.random.default_rng(3)
    stack_ids = rng.integers(0, len(paths), 600)
    indices = np.array([rng.integers(0, infos[s].n) for s in stack_ids])
    expected = _expected(stacks, stack_ids, indices)
    for chunk in (1, 7, 64, 600):
        got = _read_all(infos, stack_ids, indices, chunk)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def _star_images(star: Path, root: Path) -> np.ndarray:
    """The images a STAR file names (its one table with rlnImageName, named or not), read with
    starfile and mrcfile alone, stacks under ``root``."""
    blocks = starfile.read(star, always_dict=True)
    names = next(b for b in blocks.values() if hasattr(b, "columns") and "rlnImageName" in b.columns)["rlnImageName"]
    cache: dict[str, np.ndarray] = {}
    out = []
    for name in names.astype(str):
        index, stack = name.split("@", 1)
        if stack not in cache:
            cache[stack] = read_direct(root / stack)
        out.append(cache[stack][int(index) - 1])
    return np.stack(out)


@pytest.mark.parametrize("star, root, options", [
    (f"{SIM}/Select/job010/particles.star", SIM, {}),  # paths relative to the project directory
    (f"{SIM}/Extract/job007/particles.star", SIM, {}),
    (f"{TOY}/toy_projections_dir.star", f"{TOY}/toy_datadir", {"pixel_size": 1.0, "data_dir": f"{TOY}/toy_datadir"}),
    ("cryodrgn/relion31/relion31.star", "cryodrgn/relion31", {}),  # no MAP id in the header
    ("cryodrgn/empiar_10076_7/empiar_10076_7.star", "cryodrgn/empiar_10076_7", {}),  # ispg 1 volume header
    ("aspire/rln_proj_64.star", "aspire", {"pixel_size": 1.0}),
])
@pytest.mark.parametrize("chunks", [3, 50, None])
def test_real_sets_equal_direct_reads(real, star, root, options, chunks):
    options = {k: (real / v if k == "data_dir" else v) for k, v in options.items()}
    ds = open_particles(real / star, chunks=chunks, **options)
    np.testing.assert_array_equal(ds["images"].values, _star_images(real / star, real / root))


def test_real_selection_shuffled_with_duplicates(real, tmp_path):
    """The 284-particle selection, shuffled as a random split would leave it and with 40 particles
    listed twice, read through open_particles (stacks found with data_dir) equals mrcfile's reads."""
    blocks = starfile.read(real / SIM / "Select/job010/particles.star", always_dict=True)
    particles = blocks["particles"]
    rng = np.random.default_rng(5)
    rows = np.concatenate([rng.permutation(len(particles)), rng.integers(0, len(particles), 40)])
    rng.shuffle(rows)
    star = write_star(tmp_path / "shuffled.star", particles.iloc[rows].reset_index(drop=True), blocks["optics"])
    expected = star_images(star, real / SIM)
    for chunks in (1, 16, None):
        ds = open_particles(star, data_dir=real / SIM, chunks=chunks)
        np.testing.assert_array_equal(ds["images"].values, expected)
        if chunks == 16:
            assert_eq(ds["images"].data, expected)


def _write_stack(path: Path, data: np.ndarray) -> None:
    """An MRC stack holding ``data`` in its own byte order: mrcfile writes native order, so for
    big-endian data its header is swapped (machine stamp included) and the data written as given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data.astype(data.dtype.newbyteorder("=")))
            mrc.set_image_stack()
            header = mrc.header.copy()
    if data.dtype.byteorder != ">":
        return
    swapped = header.byteswap().view(header.dtype.newbyteorder())
    swapped.machst = mrcfile.utils.machine_stamp_from_byte_order(">")
    with open(path, "wb") as f:
        f.write(swapped.tobytes())
        f.write(np.ascontiguousarray(data).tobytes())


def _shuffled_star(tmp_path: Path, counts: dict[str, int], seed: int, extra: int = 30,
                   box: int = 12) -> tuple[Path, list]:
    """A STAR file naming every image of each stack once in a random order, plus ``extra`` repeats."""
    rng = np.random.default_rng(seed)
    order = [(s, i) for s, n in counts.items() for i in range(n)]
    order = [order[k] for k in np.concatenate([rng.permutation(len(order)), rng.integers(0, len(order), extra)])]
    rng.shuffle(order)
    names = [f"{i + 1:06d}@{s}" for s, i in order]
    star = write_star(tmp_path / "p.star", {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names)},
                      optics_table([1.0], box))
    return star, order


@pytest.mark.parametrize("chunks", [1, 5, 13, 1000])
def test_generated_shuffled_set_with_duplicates(tmp_path, chunks):
    data = {f"s{k}.mrcs": make_stack(tmp_path / f"s{k}.mrcs", 9 + k, 12, seed=k) for k in range(4)}
    star, order = _shuffled_star(tmp_path, {s: len(d) for s, d in data.items()}, seed=chunks)
    expected = np.stack([data[s][i] for s, i in order])
    ds = open_particles(star, chunks=chunks)
    with mock.patch("mrcfile.mmap", side_effect=AssertionError("memory map in the read path")), \
            mock.patch("mrcfile.open", side_effect=AssertionError("mrcfile in the read path")), \
            mock.patch("numpy.memmap", side_effect=AssertionError("memory map in the read path")):
        got = ds["images"].values
    np.testing.assert_array_equal(got, expected)
    graph = dict(ds["images"].data.__dask_graph__())
    for task in graph.values():
        blob = pickle.dumps(task)
        assert len(blob) < 2048 + 200 * min(chunks, len(order)), len(blob)
        assert b"memmap" not in blob and b"mrcobject" not in blob


def test_big_endian_and_little_endian_stacks_shuffled(tmp_path):
    big = (np.arange(7 * 12 * 12).reshape(7, 12, 12) / 3).astype(">f4")
    _write_stack(tmp_path / "big.mrcs", big)
    little = make_stack(tmp_path / "little.mrcs", 6, 12, seed=4)
    assert read_info(str(tmp_path / "big.mrcs")).dtype == ">f4"
    star, order = _shuffled_star(tmp_path, {"big.mrcs": 7, "little.mrcs": 6}, seed=9)
    ds = open_particles(star, chunks=4)
    assert ds["images"].dtype == np.float32 and ds["images"].dtype.byteorder in "=<"
    expected = np.stack([{"big.mrcs": big, "little.mrcs": little}[s][i] for s, i in order]).astype(np.float32)
    np.testing.assert_array_equal(ds["images"].values, expected)


def test_mixed_modes_read_as_float32(tmp_path):
    """int16, big-endian int16 and float32 stacks in one set: read as stored, converted to float32."""
    ints = make_stack(tmp_path / "ints.mrcs", 8, 12, dtype=np.int16, seed=1)
    big_ints = (np.arange(5 * 12 * 12) - 300).astype(">i2").reshape(5, 12, 12)
    _write_stack(tmp_path / "bigints.mrcs", big_ints)
    floats = make_stack(tmp_path / "floats.mrcs", 6, 12, seed=2)
    data = {"ints.mrcs": ints, "bigints.mrcs": big_ints, "floats.mrcs": floats}
    star, order = _shuffled_star(tmp_path, {s: len(d) for s, d in data.items()}, seed=11)
    for chunks in (1, 6, 100):
        ds = open_particles(star, chunks=chunks)
        assert ds["images"].dtype == np.float32
        expected = np.stack([data[s][i].astype(np.float32) for s, i in order])
        np.testing.assert_array_equal(ds["images"].values, expected)


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", "<f2", ">f4", "|i1", "<f4"])
def test_read_chunk_modes_in_place_and_converted(tmp_path, dtype):
    data = (np.arange(6 * 10 * 10) % 120 - 50).astype(dtype).reshape(6, 10, 10)
    _write_stack(tmp_path / "s.mrcs", data)
    infos = _infos([tmp_path / "s.mrcs"])
    assert np.dtype(infos[0].dtype) == np.dtype(dtype)
    runs, order = np.array([[0, 1, 3], [0, 4, 6]]), np.array([3, 0, 0, 2, 1])
    own = read_chunk(infos, runs, order)
    assert own.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(own, data[[5, 1, 1, 4, 2]])
    as_f4 = read_chunk(infos, runs, order, "<f4")
    np.testing.assert_array_equal(as_f4, data[[5, 1, 1, 4, 2]].astype(np.float32))


def test_shuffled_chunk_is_read_without_a_reordering_copy(tmp_path):
    """Images land in their rows as they are read: a shuffled chunk allocates about one result's
    worth of memory (numpy reports its allocations to tracemalloc), not a buffer and a copy."""
    import tracemalloc

    data = make_stack(tmp_path / "s.mrcs", 64, 32, seed=3)
    infos = _infos([tmp_path / "s.mrcs"])
    order = np.random.default_rng(0).permutation(64)
    tracemalloc.start()
    try:
        got = read_chunk(infos, np.array([[0, 0, 64]]), order)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, data[order])
    assert peak < 1.3 * got.nbytes, (peak, got.nbytes)


@pytest.mark.parametrize("limit", [1, 1000, 4096])
def test_partial_reads_and_few_buffers_per_call(tmp_path, monkeypatch, limit):
    """Reads that return less than asked are continued (inside a row too), with at most a few
    buffers per call, and without preadv at all."""
    import dparticles.formats.mrc as mrc

    data = {f"s{k}.mrcs": make_stack(tmp_path / f"s{k}.mrcs", 7, 16, seed=k) for k in range(2)}
    infos = _infos([tmp_path / "s0.mrcs", tmp_path / "s1.mrcs"])
    calls = []

    def stingy_preadv(fd, buffers, offset):
        assert len(buffers) <= 3
        calls.append(len(buffers))
        want = min(sum(map(len, buffers)), limit)
        got = os.pread(fd, want, offset)
        at = 0
        for b in buffers:
            take = min(len(b), len(got) - at)
            b[:take] = got[at:at + take]
            at += take
        return len(got)

    monkeypatch.setattr(mrc, "_IOV_MAX", 3)
    monkeypatch.setattr(mrc, "_PREADV", stingy_preadv)
    stack_ids = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0])
    indices = np.array([6, 2, 0, 1, 3, 2, 2, 3, 4, 5, 0])
    expected = np.stack([data[f"s{s}.mrcs"][i] for s, i in zip(stack_ids, indices)])
    np.testing.assert_array_equal(_read_all(infos, stack_ids, indices, 11), expected)
    assert max(calls) == 3
    monkeypatch.setattr(mrc, "_PREADV", None)
    np.testing.assert_array_equal(_read_all(infos, stack_ids, indices, 4), expected)


def test_bad_order_refused(tmp_path):
    make_stack(tmp_path / "s.mrcs", 4, 8)
    infos = _infos([tmp_path / "s.mrcs"])
    with pytest.raises(ValueError, match="unused"):
        read_chunk(infos, np.array([[0, 0, 3]]), np.array([0, 2]))
    with pytest.raises(ValueError, match="index"):
        read_chunk(infos, np.array([[0, 0, 3]]), np.array([0, 1, 2, 3]))


# --- failures --------------------------------------------------------------------------------

def test_truncated_stack_names_stack_and_bytes(tmp_path):
    make_stack(tmp_path / "a.mrcs", 6, 8, seed=1)
    make_stack(tmp_path / "b.mrcs", 6, 8, seed=2)
    star, _ = _shuffled_star(tmp_path, {"a.mrcs": 6, "b.mrcs": 6}, seed=1, extra=0, box=8)
    ds = open_particles(star, chunks=100)  # headers checked against the file sizes here
    image = 8 * 8 * 4
    with open(tmp_path / "b.mrcs", "r+b") as f:  # then the stack shrinks: 3.5 images left
        f.truncate(1024 + 3 * image + image // 2)
    with pytest.raises(ParticleError) as err:
        ds["images"].values
    message = str(err.value)
    assert str(tmp_path / "b.mrcs") in message
    # the run of b is images 0..5 (one read): 6 images expected from byte 1024, 3.5 there
    assert f"stack ended early: expected {6 * image} bytes at byte 1024, read {3 * image + image // 2}" in message


def test_missing_stack_at_read_time(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3, 8)
    infos = _infos([tmp_path / "a.mrcs"])
    os.remove(tmp_path / "a.mrcs")
    with pytest.raises(ParticleError, match="image stack not found"):
        read_chunk(infos, np.array([[0, 0, 1]]))


def test_images_of_another_size_refused(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3, 8)
    make_stack(tmp_path / "b.mrcs", 3, 10)
    infos = _infos([tmp_path / "a.mrcs", tmp_path / "b.mrcs"])
    with pytest.raises(ParticleError, match="10x10"):
        read_chunk(infos, np.array([[0, 0, 1], [1, 0, 1]]))


def test_no_file_descriptor_left_open(tmp_path):
    data = {f"s{k}.mrcs": make_stack(tmp_path / f"s{k}.mrcs", 4, 8, seed=k) for k in range(30)}
    star, order = _shuffled_star(tmp_path, {s: 4 for s in data}, seed=2, box=8)
    ds = open_particles(star, chunks=50)
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    ds["images"].values
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before
