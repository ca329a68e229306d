"""The store step, Dataset in, Dataset out: ``to_stacks`` (and ``restack`` / ``downsample`` on a
Dataset) writes xarray selections, ``ops`` results and one's own ``map_blocks`` as stacks whose
bytes equal the Dataset's values, whatever the chunking and batch size; pixels are moved unchanged
only when they really are unchanged; pieces cross chunk and file boundaries correctly; a rerun keeps
only intact files; refusals come before any work. Every check reads the output with mrcfile alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import dask
import distributed
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from helpers import read_direct, star_images
from jobdata import shuffled_set, tree

import dparticles
from dparticles import ops
from dparticles.errors import ParticleError
from dparticles.formats.mrc import HEADER_BYTES

RIBO = "relion31_sim_ribo70S_b128"
EXTRACT = f"{RIBO}/Extract/job007/particles.star"  # 400 particles, classes 1..12, 20 stacks
SELECT = f"{RIBO}/Select/job010/particles.star"    # 284 of them
RUN_FILES = {"job.json", "note.txt", "report.html"}  # the record of a run (times, cluster): not its results


@pytest.fixture(scope="module", autouse=True)
def client():
    """One single-worker cluster for the in-process jobs of this module (the jobs reuse the active client)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as c:
        yield c


def quiet(*_args) -> None:
    """A log that drops progress lines."""


def results(out: Path) -> dict[str, bytes]:
    """Every file of an output folder (relative path -> bytes) but the record of the run that wrote it."""
    return {k: v for k, v in tree(out).items() if k not in RUN_FILES}


def stacks_of(out: Path) -> list[Path]:
    return sorted((out / "stacks").glob("batch_*.mrcs"))


def written(out: Path) -> np.ndarray:
    """Every image of the output's stacks, in file order, read with mrcfile alone."""
    return np.concatenate([read_direct(p) for p in stacks_of(out)])


def assert_same_elsewhere(got: Path, want: Path) -> None:
    """The same files, byte for byte, in two output folders in different places: particles.star may
    name its stacks by a path through its own folder, so image names are compared from ``stacks/``."""
    a, b = results(got), results(want)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for k in b:
        if k.rsplit("/", 1)[-1] == "particles.star":
            strip = lambda text: re.sub(r"@\S*?stacks/batch_", "@stacks/batch_", text.decode())  # noqa: E731
            assert strip(a[k]) == strip(b[k]), k
        else:
            assert a[k] == b[k], k
    assert stacks_of(got)


def assert_headers(out: Path, n: int, box: int, mode: int, pixel_size: float, batch_size: int) -> None:
    """Files of ``batch_size`` particles (the last may hold fewer), each exactly header + data, with
    a valid MRC2014 header giving its particle count, mode and pixel size."""
    files = stacks_of(out)
    itemsize = {2: 4, 12: 2}[mode]
    assert [p.name for p in files] == [f"batch_{k:06d}.mrcs" for k in range(-(-n // batch_size))]
    for k, p in enumerate(files):
        count = min(batch_size, n - k * batch_size)
        assert p.stat().st_size == HEADER_BYTES + count * box * box * itemsize, p
        with open(os.devnull, "w") as devnull:
            assert mrcfile.validate(str(p), print_file=devnull), p
        with mrcfile.open(p, header_only=True, permissive=False) as mrc:
            h = mrc.header
            assert (int(h.nx), int(h.ny), int(h.nz), int(h.mode)) == (box, box, count, mode), p
            assert int(h.mz) == 1 and int(h.ispg) == 0
            assert float(mrc.voxel_size.x) == pytest.approx(pixel_size, rel=1e-6)
            assert float(mrc.voxel_size.y) == pytest.approx(pixel_size, rel=1e-6)


def float16_note(result) -> tuple[float, float]:
    text = str(result)
    m = re.search(r"float16 rounding error against float32: largest ([0-9.e+-]+), RMS ([0-9.e+-]+)", text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def assert_rows_are_the_selection(real: Path, out: Path, sel) -> None:
    """particles.star holds the selection's rows of the source STAR file, in the selection's order,
    every column unchanged but the image name (which names the written copy of the same pixels)."""
    src = starfile.read(real / EXTRACT, always_dict=True)
    got = starfile.read(out / "particles.star", always_dict=True)
    want = src["particles"].iloc[sel["particle"].values].reset_index(drop=True)
    assert set(got["particles"].columns) == set(want.columns)
    assert len(got["particles"]) == sel.sizes["particle"]
    for col in want.columns:
        if col != "rlnImageName":
            pd.testing.assert_series_equal(got["particles"][col], want[col], check_names=False, check_dtype=False)
    assert set(got["optics"].columns) == set(src["optics"].columns)
    pd.testing.assert_frame_equal(got["optics"][src["optics"].columns], src["optics"], check_dtype=False)


# --- 1. xarray selections, from Python ------------------------------------------------------------

SELECTIONS = {
    "open": lambda ds: ds,
    "where-class": lambda ds: ds.where(ds.class_number == 10, drop=True),  # a class Select/job010 left out
    "where-defocus": lambda ds: ds.where(ds.defocus_u > 18000, drop=True),
    "isel-shuffled": lambda ds: ds.isel(particle=np.random.default_rng(5).permutation(ds.sizes["particle"])[:150]),
    "sortby": lambda ds: ds.sortby("defocus_u"),
}


@pytest.mark.parametrize("name, how", [("open", "restack"), ("where-class", "restack"), ("where-defocus", "to_stacks"),
                                       ("isel-shuffled", "restack"), ("isel-shuffled", "to_stacks"),
                                       ("sortby", "to_stacks")])
def test_xarray_selection_written_bit_for_bit_in_its_order(real, tmp_path, name, how):
    ds = dparticles.open_particles(real / EXTRACT, chunks=32)  # selections cut across chunks and stacks
    sel = SELECTIONS[name](ds)
    n = sel.sizes["particle"]
    assert 0 < n and (n < 400 or name in ("open", "sortby"))
    if name == "sortby":
        assert (np.diff(sel["defocus_u"].values) >= 0).all() and (np.diff(sel["particle"].values) != 1).any()
    expected = sel.images.values
    write = dparticles.restack if how == "restack" else dparticles.to_stacks
    result = write(sel, tmp_path / "out", batch_size=60, log=quiet)
    out = tmp_path / "out"
    assert (result.n_particles, result.n_files, result.kept_files) == (n, -(-n // 60), 0)
    if not name.startswith("where"):
        assert result.copied  # bytes moved unchanged; a where() may be computed, but must be the same bits
    got = written(out)
    assert got.dtype == np.float32 and got.shape == expected.shape and got.tobytes() == expected.tobytes()
    assert star_images(out / "particles.star").tobytes() == expected.tobytes()
    assert_rows_are_the_selection(real, out, sel)
    assert_headers(out, n, 128, 2, 2.8, 60)


def test_a_where_selection_names_its_own_rows(real):
    """The where() selections above are what they claim: the rows of that class or defocus only."""
    ds = dparticles.open_particles(real / EXTRACT, ignore_raw=True)
    sel = SELECTIONS["where-class"](dparticles.open_particles(real / EXTRACT))
    assert (sel["class_number"].values == 10).all()
    assert sel["particle"].values.tolist() == np.flatnonzero(ds["class_number"].values == 10).tolist()


# --- 2. the fast path is taken only for pixels that are really unchanged --------------------------

TRANSFORMS = {
    "flip-x": (lambda ds: ds.isel(x=slice(None, None, -1)), lambda v: v[:, :, ::-1]),
    "flip-y-after-isel": (lambda ds: ds.isel(particle=[5, 3, 1]).isel(y=slice(None, None, -1)),
                          lambda v: v[[5, 3, 1], ::-1, :]),
    "times-2": (lambda ds: ds.assign(images=ds.images * 2), lambda v: v * np.float32(2)),
    "map_blocks": (lambda ds: ds.assign(images=(("particle", "y", "x"), ds.images.data.map_blocks(
        lambda b: b + np.float32(1), dtype=np.float32))), lambda v: v + np.float32(1)),
    "map_blocks-identity": (lambda ds: ds.assign(images=(("particle", "y", "x"), ds.images.data.map_blocks(
        lambda b: b.copy(), dtype=np.float32))), lambda v: v),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_changed_pixels_are_computed_not_copied(real, tmp_path, name):
    transform, numpy_equivalent = TRANSFORMS[name]
    ds = dparticles.open_particles(real / SELECT, chunks=9).isel(particle=slice(0, 30))
    source = ds.images.values
    changed = transform(ds)
    expected = numpy_equivalent(source)
    assert changed.images.values.tobytes() == expected.tobytes()
    result = dparticles.to_stacks(changed, tmp_path / "out", batch_size=8, log=quiet)
    assert result.copied is False
    got = written(tmp_path / "out")
    assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
    if name.startswith("flip"):
        assert got.tobytes() != source[:len(got)].tobytes()  # written flipped, not copied from the source
    assert star_images(tmp_path / "out" / "particles.star").tobytes() == expected.tobytes()


# --- 3. one's own map_blocks, read back by RELION 3.1 ---------------------------------------------

@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_stack_create") is None,
                    reason="RELION 3.1 relion_stack_create is not on PATH; install the Debian package relion, as "
                           ".ci/run does")
def test_own_map_blocks_written_as_stacks_relion_reads(real, tmp_path):
    ds = dparticles.open_particles(real / SELECT, chunks=9).isel(particle=slice(0, 40))
    centred = ds.assign(images=(("particle", "y", "x"), ds.images.data.map_blocks(
        lambda b: b - b.mean(axis=(1, 2), keepdims=True), dtype=np.float32)))
    source = ds.images.values
    expected = np.stack([im - im.mean() for im in source])  # image by image, independently of the chunks
    out = tmp_path / "out"
    result = dparticles.to_stacks(centred, out, batch_size=15, log=quiet)
    assert not result.copied and result.n_files == 3
    run = subprocess.run(["relion_stack_create", "--i", "particles.star", "--o", "check"], cwd=out,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    with mrcfile.open(out / "check.mrcs", permissive=True) as mrc:
        relion = np.array(mrc.data)
    assert relion.shape == (40, 128, 128) and relion.dtype == np.float32
    assert relion.tobytes() == expected.tobytes()
    assert np.abs(relion.mean(axis=(1, 2))).max() < 1e-4  # and they are centred


# --- 4. ops previews are what is written, whatever the chunking and batch size --------------------

@pytest.fixture(scope="module")
def preview(client, real):
    """The Select set downsampled lazily (box 64, lowpass 25 Å, recentred), computed once."""
    src = real / SELECT
    ds = dparticles.open_particles(src)
    prev = ops.downsample(ds, fourier_box=64, lowpass=25, recenter=True,  # coarser than the new Nyquist limit, 11.2 Å
                          micrograph_pixel_size=0.7)
    return src, prev, prev.images.values


def test_preview_equals_the_written_stacks(preview, tmp_path):
    src, prev, values = preview
    first = prev.images[:16].values
    assert first.tobytes() == values[:16].tobytes()
    result = dparticles.to_stacks(prev, tmp_path / "out", batch_size=100, log=quiet)
    assert result.copied is False and result.n_files == 3
    got = written(tmp_path / "out")
    assert got[:16].tobytes() == first.tobytes()
    assert got.tobytes() == values.tobytes()
    assert_headers(tmp_path / "out", 284, 64, 2, 5.6, 100)
    names = starfile.read(tmp_path / "out" / "particles.star", always_dict=True)
    assert names["optics"]["rlnImagePixelSize"].tolist() == [5.6]
    assert (names["particles"]["rlnOriginXAngst"] == 0).all()


@pytest.mark.parametrize("batch_size, chunks", [(1000, None), (50, 284), (13, 30), (7, 7)],
                         ids=["one-file", "several-files-one-chunk", "13-of-chunks-30", "7-of-chunks-7"])
def test_downsample_job_bytes_do_not_depend_on_chunks_or_batch_size(preview, tmp_path, batch_size, chunks):
    src, _, values = preview
    out = tmp_path / "out"
    (result,) = dparticles.downsample(src, out, fourier_box=64, lowpass=25, recenter=True, micrograph_pixel_size=0.7,
                                      batch_size=batch_size, chunks=chunks, log=quiet)
    assert result.n_files == -(-284 // batch_size)
    got = written(out)
    assert got.tobytes() == values.tobytes()


@pytest.mark.parametrize("batch_size, chunks", [(1, 1), (1, 5), (4, 1)])
def test_small_pieces_give_the_same_bytes(tmp_path, batch_size, chunks):
    """Down to one particle per chunk and per file (a generated set with shifts, recentred)."""
    star = shuffled_set(tmp_path / "src", n_stacks=3, per_stack=10, box=32, pixel_size=1.3)
    options = dict(fourier_box=16, lowpass=8, recenter=True, micrograph_pixel_size=0.65)
    expected = ops.downsample(dparticles.open_particles(star), **options).images.values
    (result,) = dparticles.downsample(star, tmp_path / "out", batch_size=batch_size, chunks=chunks, log=quiet,
                                      **options)
    assert result.n_particles == 27 and result.n_files == -(-27 // batch_size)
    assert written(tmp_path / "out").tobytes() == expected.tobytes()
    assert_headers(tmp_path / "out", 27, 16, 2, 1.3 * 32 / 16, batch_size)


# --- 5. a list of Datasets with a list of folders -------------------------------------------------

def test_list_of_datasets_equals_writing_each_alone(real, tmp_path):
    ds = dparticles.open_particles(real / SELECT, chunks=25).isel(particle=slice(10, 110))
    a, b = ops.downsample(ds, fourier_box=[64, 32], lowpass=30)
    both = dparticles.to_stacks([a, b], [tmp_path / "a", tmp_path / "b"], batch_size=30, log=quiet)
    assert [r.out for r in both] == [tmp_path / "a", tmp_path / "b"]
    assert [(r.n_particles, r.n_files, r.copied) for r in both] == [(100, 4, False)] * 2
    dparticles.to_stacks(a, tmp_path / "a_alone", batch_size=30, log=quiet)
    dparticles.to_stacks(b, tmp_path / "b_alone", batch_size=30, log=quiet)
    assert_same_elsewhere(tmp_path / "a", tmp_path / "a_alone")
    assert_same_elsewhere(tmp_path / "b", tmp_path / "b_alone")
    assert written(tmp_path / "a").tobytes() == a.images.values.tobytes()
    assert written(tmp_path / "b").tobytes() == b.images.values.tobytes()
    assert_headers(tmp_path / "b", 100, 32, 2, 2.8 * 128 / 32, 30)
    # a copy and a computed output in one call
    sel = ds.isel(particle=slice(None, None, -1))
    mixed = dparticles.to_stacks([sel, a], [tmp_path / "c", tmp_path / "d"], batch_size=45, log=quiet)
    assert [r.copied for r in mixed] == [True, False]
    assert written(tmp_path / "c").tobytes() == sel.images.values.tobytes()
    assert written(tmp_path / "d").tobytes() == a.images.values.tobytes()


# --- 6. pieces cross chunk and file boundaries ----------------------------------------------------

@pytest.fixture
def small_set(tmp_path):
    """43 particles of 16x16 from 4 stacks, shuffled, pixel size 1.37 Å."""
    return shuffled_set(tmp_path / "src", n_stacks=4, per_stack=12, box=16, pixel_size=1.37)


@pytest.mark.parametrize("kind", ["copy", "computed"])
@pytest.mark.parametrize("batch_size", [5, 1, 43])
def test_pieces_cross_files_correctly(small_set, tmp_path, kind, batch_size):
    ds = dparticles.open_particles(small_set, chunks=7)  # chunk and file boundaries interleave
    n = ds.sizes["particle"]
    assert n == 43
    source = ds.images.values
    sel = ds if kind == "copy" else ds.assign(images=ds.images * 2)
    expected = source if kind == "copy" else source * np.float32(2)
    with dask.config.set({"dparticles.piece-bytes": 3 * 16 * 16 * 4}):  # copies too, in pieces of 3 images
        result = dparticles.to_stacks(sel, tmp_path / "out", batch_size=batch_size, log=quiet)
    assert result.copied is (kind == "copy")
    got = written(tmp_path / "out")
    assert got.shape == (43, 16, 16)
    for k in range(n):  # particle by particle, so that a failure says which
        assert got[k].tobytes() == expected[k].tobytes(), f"particle {k}"
    assert_headers(tmp_path / "out", n, 16, 2, 1.37, batch_size)
    assert star_images(tmp_path / "out" / "particles.star").tobytes() == expected.tobytes()
    assert not [p for p in (tmp_path / "out").rglob("*") if "tmp" in p.name]


# --- 7. a rerun keeps only intact files -----------------------------------------------------------

def _damage(out: Path) -> list[str]:
    """Delete one stack, flip one bit of another's pixels, damage the record of a third; the names."""
    files = stacks_of(out)
    files[0].unlink()
    with open(files[2], "r+b") as f:
        f.seek(HEADER_BYTES + 123)
        byte = f.read(1)[0]
        f.seek(HEADER_BYTES + 123)
        f.write(bytes([byte ^ 0x01]))
    record = out / ".dparticles" / f"{files[4].name}.json"
    assert record.is_file()
    record.write_text(record.read_text()[:-5])
    return [files[k].name for k in (0, 2, 4)]


RESUMED = {
    "restack": lambda ds, out, **kw: dparticles.restack(ds, out, batch_size=10, log=quiet, **kw),
    "downsample": lambda ds, out, **kw: dparticles.downsample(ds, out, fourier_box=16, recenter=True,
                                                              micrograph_pixel_size=1.2, batch_size=10, log=quiet,
                                                              **kw)[0],
    "float16": lambda ds, out, **kw: dparticles.to_stacks(ds.isel(particle=slice(None, None, -1)), out,
                                                          batch_size=10, float16=True, log=quiet, **kw),
}


@pytest.mark.parametrize("job", list(RESUMED))
def test_rerun_keeps_only_intact_files(tmp_path, job):
    star = shuffled_set(tmp_path / "src", n_stacks=4, per_stack=15, box=32)  # 54 particles: 6 files of 10
    ds = dparticles.open_particles(star, chunks=7)
    run, out = RESUMED[job], tmp_path / "out"
    first = run(ds, out)
    assert (first.n_files, first.kept_files, first.copied) == (6, 0, job == "restack")
    complete = results(out)
    if job == "restack":  # a complete output, rerun: everything checked and kept
        again = run(ds, out)
        assert again.kept_files == 6 and results(out) == complete
    damaged = _damage(out)
    intact = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stacks_of(out) if p.name not in damaged}
    assert len(intact) == 3
    result = run(ds, out)
    assert (result.n_files, result.kept_files) == (6, 3)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stacks_of(out) if p.name in intact} == intact
    assert results(out) == complete  # the same bytes as the run before the damage, records included
    if job == "float16":  # the error reported is over the three files written again
        values = ds.isel(particle=slice(None, None, -1)).images.values
        rewritten = np.concatenate([values[0:10], values[20:30], values[40:50]])
        err = rewritten.astype(np.float16).astype(np.float32) - rewritten
        largest, rms = float16_note(result)
        assert "3 were kept" in str(result)
        assert largest == pytest.approx(float(np.abs(err).max()), rel=1e-2)
        assert rms == pytest.approx(float(np.sqrt(np.mean(np.square(err, dtype=np.float64)))), rel=1e-2)
    # and equal to a fresh run in the same place
    resumed = results(out)
    fresh = run(ds, out, overwrite=True)
    assert fresh.kept_files == 0
    assert results(out) == resumed


def test_rewritten_source_with_the_same_size_and_mtime_is_not_trusted(tmp_path):
    star = shuffled_set(tmp_path / "src", n_stacks=3, per_stack=10, box=16)
    ds = dparticles.open_particles(star, chunks=7)
    out = tmp_path / "out"
    assert dparticles.restack(ds, out, batch_size=5, log=quiet).kept_files == 0
    assert dparticles.restack(ds, out, batch_size=5, log=quiet).kept_files == 6  # unchanged sources: kept
    before = results(out)
    stack = tmp_path / "src" / "Extract" / "s0.mrcs"
    st = stack.stat()
    data = bytearray(stack.read_bytes())
    data[HEADER_BYTES:] = bytes(b ^ 0xFF for b in data[HEADER_BYTES:])  # every pixel changes
    stack.write_bytes(bytes(data))
    os.utime(stack, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = stack.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    # the same call: the earlier output is of other inputs now, so nothing of it is kept; it is refused
    # as any other output would be, and left as it was
    with pytest.raises(ParticleError, match="--overwrite"):
        dparticles.restack(ds, out, batch_size=5, log=quiet)
    assert results(out) == before
    result = dparticles.restack(ds, out, batch_size=5, overwrite=True, log=quiet)
    assert result.kept_files == 0
    assert written(out).tobytes() == ds.images.values.tobytes()  # the new pixels
    after = results(out)
    assert after["particles.star"] == before["particles.star"]
    changed = {k for k in after if after[k] != before[k]}
    from_s0 = np.flatnonzero([Path(p).name == "s0.mrcs" for p in ds["image_path"].values])
    files_of_s0 = {f"stacks/batch_{k // 5:06d}.mrcs" for k in from_s0}
    assert {k for k in changed if k.startswith("stacks/")} == files_of_s0


# --- 8. refusals before any work -------------------------------------------------------------------

REFUSALS = {  # case: (call(ds, other, out, busy, log), what the message says)
    "empty isel": (lambda ds, other, out, busy, log: dparticles.to_stacks(ds.isel(particle=[]), out, log=log),
                   "no particles to write"),
    "empty where": (lambda ds, other, out, busy, log: dparticles.to_stacks(
        ds.where(ds.defocus_u < 0, drop=True), out, log=log), "no particles to write"),
    "restack empty": (lambda ds, other, out, busy, log: dparticles.restack(ds.isel(particle=slice(0, 0)), out,
                                                                           log=log), "no particles to write"),
    "ignore_raw": (lambda ds, other, out, busy, log: dparticles.to_stacks(
        dparticles.open_particles(ds.attrs["source"], ignore_raw=True), out, log=log), "no images"),
    "too few folders": (lambda ds, other, out, busy, log: dparticles.to_stacks([ds, other], [out], log=log),
                        "give one out per dataset: 2 datasets, 1 out values"),
    "too many folders": (lambda ds, other, out, busy, log: dparticles.to_stacks(
        [ds, other], [out, out.with_name("b"), out.with_name("c")], log=log), "give one out per dataset"),
    "one folder for two": (lambda ds, other, out, busy, log: dparticles.to_stacks([ds, other], out, log=log),
                           "2 datasets need a list of 2 out values"),
    "same folder twice": (lambda ds, other, out, busy, log: dparticles.to_stacks(
        [ds, other], [out, out], overwrite=True, log=log), "are the same place"),
    "batch size 0": (lambda ds, other, out, busy, log: dparticles.to_stacks(ds, out, batch_size=0, log=log),
                     "batch size must be at least 1, got 0"),
    "negative batch size": (lambda ds, other, out, busy, log: dparticles.restack(ds, out, batch_size=-5, log=log),
                            "batch size must be at least 1"),
    "second folder busy": (lambda ds, other, out, busy, log: dparticles.to_stacks([ds, other], [out, busy], log=log),
                           "not empty"),
    "second folder holds inputs": (lambda ds, other, out, busy, log: dparticles.to_stacks(
        [ds, other], [out, Path(ds.attrs["source"]).parent / "Extract"], overwrite=True, log=log),
        "is or holds an input"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_before_any_work(small_set, tmp_path, case):
    ds = dparticles.open_particles(small_set)
    out, busy = tmp_path / "out", tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    call, message = REFUSALS[case]
    log: list = []
    with pytest.raises(ParticleError, match=re.escape(message)):
        call(ds, ds.isel(particle=slice(0, 5)), out, busy, log.append)
    assert log == []  # refused before a cluster was asked for anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "src"]  # no folder made
    assert tree(tmp_path) == before  # nor anything changed


# --- 9. float16 from a selection --------------------------------------------------------------------

def test_float16_of_a_selection(real, tmp_path):
    ds = dparticles.open_particles(real / EXTRACT, chunks=40)
    sel = ds.where((ds.class_number >= 3) & (ds.class_number <= 4), drop=True).sortby("coord_x")
    n = sel.sizes["particle"]
    values = sel.images.values
    result = dparticles.to_stacks(sel, tmp_path / "out", batch_size=25, float16=True, log=quiet)
    assert result.copied is False and result.n_files == -(-n // 25)
    assert_headers(tmp_path / "out", n, 128, 12, 2.8, 25)
    got = written(tmp_path / "out")
    assert got.dtype == np.float16
    assert got.tobytes() == values.astype(np.float16).tobytes()
    assert star_images(tmp_path / "out" / "particles.star").tobytes() == values.astype(np.float16).tobytes()
    err = got.astype(np.float32) - values
    largest, rms = float16_note(result)
    assert largest == pytest.approx(float(np.abs(err).max()), rel=1e-2)
    assert rms == pytest.approx(float(np.sqrt(np.mean(np.square(err, dtype=np.float64)))), rel=1e-2)
    assert_rows_are_the_selection(real, tmp_path / "out", sel)


def test_outputs_are_refused_against_many_stacks_of_one_folder(tmp_path):
    """A folder of many stacks is looked at once, not stack by stack: the same refusals as one by one,
    including a stack that is a link into the output and a folder reached through a link in it."""
    import xarray as xr

    from dparticles.safe import refuse_inputs

    movies = tmp_path / "Extract" / "Movies"
    movies.mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.mrcs").write_bytes(b"")
    paths = []
    for k in range(70):
        (movies / f"mic_{k:03d}.mrcs").write_bytes(b"")
        paths.append(str(movies / f"mic_{k:03d}.mrcs"))

    def check(stacks: list[str], out: Path) -> str | None:
        ds = xr.Dataset(coords={"stack_path": ("stack", np.array(stacks, dtype=object))})
        try:
            refuse_inputs(out, ds)
        except ParticleError as exc:
            return str(exc)
        return None

    assert check(paths, tmp_path / "elsewhere") is None
    assert check(paths, movies / "new") is None
    assert "is or holds an input" in check(paths, movies)
    assert "is or holds an input" in check(paths, tmp_path / "Extract")
    assert "mic_005.mrcs" in check(paths, movies / "mic_005.mrcs")
    os.unlink(movies / "mic_007.mrcs")
    os.symlink(tmp_path / "out" / "kept.mrcs", movies / "mic_007.mrcs")
    assert "out/kept.mrcs" in check(paths, tmp_path / "out")
    os.unlink(movies / "mic_007.mrcs")
    (movies / "mic_007.mrcs").write_bytes(b"")
    assert check(paths, tmp_path / "out") is None
    os.symlink(movies, tmp_path / "out" / "linked")
    linked = [str(tmp_path / "out" / "linked" / os.path.basename(p)) for p in paths]
    assert "reached through" in check(linked, tmp_path / "out")
