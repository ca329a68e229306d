"""The Downsample job end to end: against RELION 3.1 on real sets, known answers through the whole job
(constants, recentring of simulated off-centre particles, odd and even boxes), optics groups of
different pixel sizes, job output equal to the numpy kernels whatever the batching, several sizes
from one read, metadata (pixel sizes, boxes, origins, coordinates) through STAR and .cs, errors,
and float16."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import distributed
import mrcfile
import numpy as np
import pytest
import starfile
from jobdata import star_text
from helpers import image_names, make_stack, optics_table, read_direct, simple_set, star_images, write_star

from dparticles import kernels
from dparticles.cli import main
from dparticles.dataset import open_particles
from dparticles.jobs.downsample import downsample
from dparticles.errors import ParticleError
from dparticles.formats.cryosparc import write_cs
from dparticles.formats.cryosparc import logmap, matrix_from_euler

RIBO = "relion31_sim_ribo70S_b128"
SELECT = f"{RIBO}/Select/job010/particles.star"
ROUNDING = 1e-5  # float32 rounding of RELION's double-precision result, relative to the image's std


@pytest.fixture(scope="module", autouse=True)
def client():
    """One single-worker cluster for the jobs of this module (the jobs reuse the active client)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as c:
        yield c


def quiet(*_args) -> None:
    """A log that drops progress lines."""


def out_images(folder: Path) -> np.ndarray:
    """The images ``folder/particles.star`` names, in its order, read with mrcfile alone."""
    return star_images(folder / "particles.star")


def in_images(star: Path) -> np.ndarray:
    """The input images in metadata order, as open_particles gives them (checked elsewhere against mrcfile)."""
    return open_particles(star)["images"].values


def star_tables(path: Path) -> dict:
    return starfile.read(path, always_dict=True)


# --- against RELION 3.1, end to end ------------------------------------------------------------

needs_relion = pytest.mark.skipif(shutil.which("relion_image_handler") is None,
                                  reason="RELION 3.1 (relion_image_handler) is not on PATH; install the Debian "
                                         "package 'relion' to compare with it")

RELION_CASES = {
    # id: (metadata, job keywords, RELION --angpix, --rescale_angpix, extra RELION arguments, output box)
    "select-5.6A": (SELECT, {"approx_pixel_size": 5.6}, 2.8, 5.6, [], 64),
    "select-box96": (SELECT, {"fourier_box": 96}, 2.8, 2.8 * 128 / 96, [], 96),
    "select-lowpass15": (SELECT, {"approx_pixel_size": 5.6, "lowpass": 15.0}, 2.8, 5.6, ["--lowpass", 15], 64),
    "relion31-box128": ("cryodrgn/relion31/relion31.star", {"fourier_box": 128}, 2.806, 5.612, [], 128),
    "empiar-6.55A": ("cryodrgn/empiar_10076_7/empiar_10076_7.star", {"approx_pixel_size": 6.55}, 1e4 * 5 / 38168, 6.55,
                     [], 64),
}


@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize("case", list(RELION_CASES))
def test_job_matches_relion_image_handler(real, tmp_path, case):
    meta, kwargs, angpix, new_angpix, extra, box = RELION_CASES[case]
    src = real / meta
    results = downsample(src, tmp_path / "out", batch_size=50, log=quiet, **kwargs)
    assert results[0].n_particles == len(in_images(src))
    ours = out_images(tmp_path / "out")
    # RELION on a copy of the same particles, in metadata order, as one stack
    images = in_images(src)
    with mrcfile.new(tmp_path / "in.mrcs") as mrc:
        mrc.set_data(images.astype(np.float32))
    cmd = ["relion_image_handler", "--i", "in.mrcs", "--angpix", repr(angpix), "--rescale_angpix", repr(new_angpix),
           *map(str, extra), "--o", "relion"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    theirs = read_direct(tmp_path / "in_relion.mrcs")
    assert ours.shape == theirs.shape == (len(images), box, box)
    per_particle = np.abs(ours.astype(np.float64) - theirs).max(axis=(1, 2)) / images.std(axis=(1, 2), dtype=np.float64)
    print(f"\n[relion end to end] {case}: {len(images)} particles {images.shape[-1]} -> {box}, "
          f"max |ours - RELION| / std(particle) = {per_particle.max():.2e} (median {np.median(per_particle):.2e})")
    assert per_particle.max() < ROUNDING
    # metadata: the exact new pixel size, the box, and positions in Å unchanged
    t_in, t_out = star_tables(src), star_tables(tmp_path / "out" / "particles.star")
    optics = t_out["optics"]
    assert optics["rlnImagePixelSize"].tolist() == [angpix * images.shape[-1] / box]
    assert optics["rlnImageSize"].tolist() == [box]
    p_in = t_in["particles"] if "particles" in t_in else next(iter(t_in.values()))
    for col in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU"):
        if col in p_in:
            np.testing.assert_array_equal(t_out["particles"][col].to_numpy(), p_in[col].to_numpy())


# --- known answers through the whole job --------------------------------------------------------

def _set(folder: Path, images: np.ndarray, psize: float, *, origins_px: np.ndarray | None = None,
         coords: np.ndarray | None = None, optics_extra: dict | None = None) -> Path:
    """A 3.1 set of the given images in one stack, with Å origins and coordinates when given."""
    folder.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(folder / "s.mrcs", overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.set_image_stack()
    n = len(images)
    p = {"rlnImageName": image_names(range(n), "s.mrcs"), "rlnOpticsGroup": [1] * n}
    if coords is not None:
        p |= {"rlnMicrographName": ["mic.mrc"] * n, "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1]}
    if origins_px is not None:
        p |= {"rlnAngleRot": [0.0] * n, "rlnAngleTilt": [90.0] * n, "rlnAnglePsi": [0.0] * n,
              "rlnOriginXAngst": origins_px[:, 0] * psize, "rlnOriginYAngst": origins_px[:, 1] * psize}
    optics = optics_table([psize], images.shape[-1])
    for k, v in (optics_extra or {}).items():
        optics[k] = v
    return write_star(folder / "particles.star", p, optics)


@pytest.mark.parametrize(("box", "kwargs"), [
    (64, {"fourier_box": 32}), (64, {"fourier_box": 33}), (63, {"fourier_box": 32}), (63, {"fourier_box": 31}),
    (64, {"crop_box": 48, "fourier_box": 24}), (64, {"crop_box": 80, "fourier_box": 40}),
    (64, {"fourier_box": 80}), (64, {"lowpass": 10.0}), (64, {"fourier_box": 32, "recenter": True}),
], ids=lambda v: str(v) if isinstance(v, int) else "-".join(f"{k}{w}" for k, w in v.items()))
def test_constant_stack_stays_constant(tmp_path, box, kwargs):
    n = 5
    images = np.full((n, box, box), 3.25, dtype=np.float32)
    origins = np.random.default_rng(0).uniform(-4, 4, (n, 2))
    star = _set(tmp_path / "in", images, 1.5, origins_px=origins)
    downsample(star, tmp_path / "out", batch_size=2, log=quiet, **kwargs)
    out = out_images(tmp_path / "out")
    expect = kwargs.get("fourier_box", kwargs.get("crop_box", box))
    assert out.shape == (n, expect, expect)
    np.testing.assert_allclose(out, 3.25, rtol=2e-6)


def _blobs(box: int, centres: np.ndarray, sigma: float = 2.5) -> np.ndarray:
    y, x = np.mgrid[:box, :box].astype(np.float64)
    return np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) for cx, cy in centres])


def _centroid(images: np.ndarray) -> np.ndarray:
    """(x, y) centre of mass of each image."""
    box = images.shape[-1]
    y, x = np.mgrid[:box, :box]
    w = images.astype(np.float64).sum(axis=(1, 2))
    return np.stack([(images * x).sum(axis=(1, 2)) / w, (images * y).sum(axis=(1, 2)) / w], axis=1)


@pytest.mark.parametrize(("box", "out_box"), [(64, 32), (64, 64), (65, 33), (64, 33), (63, 32), (65, 65)])
@pytest.mark.parametrize("mic_psize", [None, 0.75])
def test_recentring_brings_an_off_centre_particle_to_the_box_centre(tmp_path, box, out_box, mic_psize):
    """Particles simulated off-centre as RELION places them (an origin of +o puts the particle o pixels
    towards -x): recentring brings each to box//2, zeroes the origins and moves the coordinates by the
    applied shift in micrograph pixels."""
    psize = 1.5
    origins = np.array([[4.5, -3.25], [-7.0, 2.0], [0.0, 0.0], [2.2, 6.6]])
    c = box // 2
    images = _blobs(box, np.array([[c, c]]) - origins)
    coords = np.array([[1000.0, 2000.0], [1500.5, 300.0], [10.0, 10.0], [3000.0, 3000.0]])
    extra = {"rlnMicrographPixelSize": [mic_psize]} if mic_psize else None
    star = _set(tmp_path / "in", images, psize, origins_px=origins, coords=coords, optics_extra=extra)
    np.testing.assert_allclose(_centroid(images), c - origins, atol=1e-6)  # the simulation is right
    kwargs = {"fourier_box": out_box} if out_box != box else {}
    given = {} if mic_psize else {"micrograph_pixel_size": 1.2}  # without rlnMicrographPixelSize it must be given
    downsample(star, tmp_path / "out", recenter=True, batch_size=3, log=quiet, **kwargs, **given)
    out = out_images(tmp_path / "out")
    assert out.shape == (4, out_box, out_box)
    np.testing.assert_allclose(_centroid(out), out_box // 2, atol=0.01)
    assert all(np.unravel_index(np.argmax(im), im.shape) == (out_box // 2, out_box // 2) for im in out)
    t = star_tables(tmp_path / "out" / "particles.star")["particles"]
    assert (t["rlnOriginXAngst"] == 0).all() and (t["rlnOriginYAngst"] == 0).all()
    mic = mic_psize or 1.2
    np.testing.assert_allclose(t["rlnCoordinateX"], coords[:, 0] - origins[:, 0] * psize / mic, rtol=1e-12)
    np.testing.assert_allclose(t["rlnCoordinateY"], coords[:, 1] - origins[:, 1] * psize / mic, rtol=1e-12)
    # without --recenter the particles stay where they were (scaled), and so do the metadata
    if out_box != box:
        downsample(star, tmp_path / "plain", fourier_box=out_box, log=quiet)
        plain = out_images(tmp_path / "plain")
        np.testing.assert_allclose(_centroid(plain), out_box // 2 - origins * out_box / box, atol=0.01)


def test_micrograph_pixel_size_given_moves_coordinates_in_micrograph_pixels(tmp_path):
    """Particles extracted with rescaling (2.8 Å particles from 0.7 Å micrographs): the coordinate moves
    by the origin in micrograph pixels; without that pixel size recentring is refused, never guessed."""
    origins = np.array([[4.0, -2.0], [1.0, 3.0]])
    images = _blobs(32, np.array([[16, 16]]) - origins)
    coords = np.array([[1000.0, 2000.0], [1500.0, 300.0]])
    star = _set(tmp_path / "in", images, 2.8, origins_px=origins, coords=coords)
    notes: list[str] = []
    downsample(star, tmp_path / "given", recenter=True, micrograph_pixel_size=0.7, log=notes.append)
    assert not any("micrograph pixel size" in n for n in notes)
    t = star_tables(tmp_path / "given" / "particles.star")["particles"]
    np.testing.assert_allclose(t["rlnCoordinateX"], coords[:, 0] - origins[:, 0] * 4, rtol=1e-12)
    np.testing.assert_allclose(t["rlnCoordinateY"], coords[:, 1] - origins[:, 1] * 4, rtol=1e-12)
    with pytest.raises(ParticleError, match="give no micrograph pixel size .*; give --micrograph-pixel-size$"):
        downsample(star, tmp_path / "guessed", recenter=True, log=quiet)
    assert not (tmp_path / "guessed").exists()
    with pytest.raises(ParticleError, match="micrograph pixel size"):
        downsample(star, tmp_path / "bad", recenter=True, micrograph_pixel_size=-1.0, log=quiet)


def test_centred_particle_stays_centred_for_odd_and_even_boxes(tmp_path):
    for box, outs in ((64, [32, 33, 31, 48]), (63, [32, 31, 21])):
        images = _blobs(box, np.array([[box // 2, box // 2]] * 2))
        star = _set(tmp_path / f"in{box}", images, 1.0)
        results = downsample(star, tmp_path / f"out{box}", fourier_box=outs, log=quiet)
        for o, r in zip(outs, results):
            out = out_images(r.out)
            assert out.shape == (2, o, o)
            np.testing.assert_allclose(_centroid(out), o // 2, atol=0.01, err_msg=f"{box} -> {o}")


# --- optics groups with different pixel sizes ---------------------------------------------------

def test_optics_groups_keep_their_own_pixel_sizes_and_filters(tmp_path):
    star, images = simple_set(tmp_path / "p", n_stacks=2, per_stack=7, box=32, pixel_sizes=(1.0, 1.5))
    psize = np.where(np.arange(14) % 2 == 0, 1.0, 1.5)
    downsample(star, tmp_path / "out", crop_box=24, fourier_box=16, lowpass=5.0, batch_size=5, log=quiet)
    ds = open_particles(tmp_path / "out")
    np.testing.assert_array_equal(ds["pixel_size"].values, psize * 24 / 16)
    optics = star_tables(tmp_path / "out" / "particles.star")["optics"]
    assert optics["rlnImagePixelSize"].tolist() == [1.0 * 24 / 16, 1.5 * 24 / 16]
    assert optics["rlnImageSize"].tolist() == [16, 16]
    cropped = kernels.crop_pad(images, 24)
    expected = np.empty((14, 16, 16), np.float32)
    for p in (1.0, 1.5):  # the lowpass is in Å: each group filtered at its own pixel size
        (expected[psize == p],) = kernels.downsample(cropped[psize == p], [16], pixel_size=p, lowpass=5.0)
    # equal to float32 rounding: the FFTs round an image differently with its neighbours in a call
    np.testing.assert_allclose(out_images(tmp_path / "out"), expected, rtol=0, atol=1e-6 * images.std())
    wrong = kernels.downsample(cropped, [16], pixel_size=1.0, lowpass=5.0)[0]
    assert not np.allclose(wrong[psize == 1.5], expected[psize == 1.5])


def test_target_pixel_size_with_groups_giving_different_boxes_is_refused(tmp_path, capsys):
    star, _ = simple_set(tmp_path / "p", box=32, pixel_sizes=(1.0, 1.5))
    with pytest.raises(ParticleError, match=r"different boxes \[16, 24\].*--fourier-box"):
        downsample(star, tmp_path / "out", approx_pixel_size=2.0, log=quiet)
    assert not (tmp_path / "out").exists()
    assert main(["downsample", str(star), "--out", str(tmp_path / "out"), "--approx-pixel-size", "2.0"]) == 1
    assert "optics groups" in capsys.readouterr().err
    # a target both groups reach with the same box is fine
    same, _ = simple_set(tmp_path / "q", box=32, pixel_sizes=(1.0, 1.02))
    downsample(same, tmp_path / "ok", approx_pixel_size=2.0, log=quiet)
    np.testing.assert_array_equal(open_particles(tmp_path / "ok")["pixel_size"].values[:2], [2.0, 1.02 * 32 / 16])


# --- job output equals the kernels, whatever the batching --------------------------------------

@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_job_equals_kernels_across_batch_sizes(tmp_path, batch_size):
    a = make_stack(tmp_path / "a.mrcs", 9, 40, seed=1)
    b = make_stack(tmp_path / "b.mrcs", 9, 40, seed=2)
    order = [("a", 3), ("a", 4), ("b", 0), ("a", 8), ("b", 5), ("b", 6), ("b", 7), ("a", 0), ("a", 1), ("b", 2),
             ("a", 5), ("b", 8), ("a", 6)]  # 13 of 18 images, runs broken and crossing stacks
    rng = np.random.default_rng(5)
    origins = rng.uniform(-3, 3, (len(order), 2))
    star = write_star(tmp_path / "p.star", {
        "rlnImageName": [f"{i + 1}@{s}.mrcs" for s, i in order], "rlnOpticsGroup": [1] * len(order),
        "rlnAnglePsi": [0.0] * len(order), "rlnOriginXAngst": origins[:, 0] * 1.3,
        "rlnOriginYAngst": origins[:, 1] * 1.3}, optics_table([1.3], 40))
    images = np.stack([{"a": a, "b": b}[s][i] for s, i in order])
    results = downsample(star, tmp_path / "out", crop_box=36, fourier_box=[24, 17], lowpass=6.0, recenter=True,
                         batch_size=batch_size, log=quiet)
    expected = kernels.downsample(kernels.crop_pad(images, 36), [24, 17], pixel_size=1.3, lowpass=6.0,
                                  shifts=origins * 1.3 / 1.3)
    for r, e in zip(results, expected):
        assert r.n_files == -(-len(order) // batch_size)
        # the kernels pad their FFT calls to whole vector groups: the same bits whatever the batching
        np.testing.assert_array_equal(out_images(r.out), e)


def test_several_sizes_from_one_read_equal_separate_runs(real, tmp_path):
    src = real / SELECT
    both = downsample(src, tmp_path / "both", fourier_box=[64, 96], batch_size=100, log=quiet)
    assert [r.out for r in both] == [tmp_path / "both" / "box64", tmp_path / "both" / "box96"]
    for b in (64, 96):
        downsample(src, tmp_path / f"alone{b}", fourier_box=b, batch_size=100, log=quiet)
        mine, alone = tmp_path / "both" / f"box{b}", tmp_path / f"alone{b}"
        assert star_text(mine / "particles.star", mine) == star_text(alone / "particles.star", alone)
        stacks = sorted(p.name for p in (alone / "stacks").iterdir())
        assert stacks == sorted(p.name for p in (mine / "stacks").iterdir())
        for name in stacks:
            assert (mine / "stacks" / name).read_bytes() == (alone / "stacks" / name).read_bytes()


# --- metadata through STAR and .cs ---------------------------------------------------------------

def test_star_pixel_sizes_origins_and_coordinates(real, tmp_path):
    src = real / SELECT
    downsample(src, tmp_path / "out", crop_box=112, fourier_box=84, batch_size=100, log=quiet)
    t_in, t_out = star_tables(src), star_tables(tmp_path / "out" / "particles.star")
    assert t_out["optics"]["rlnImagePixelSize"].tolist() == [2.8 * 112 / 84]  # float64, not rounded
    assert t_out["optics"]["rlnImageSize"].tolist() == [84]
    assert t_out["optics"]["rlnMicrographOriginalPixelSize"].tolist() == [0.7]
    p_in, p_out = t_in["particles"], t_out["particles"]
    assert set(p_in.columns) == set(p_out.columns)
    for col in p_in.columns:
        if col != "rlnImageName":
            np.testing.assert_array_equal(p_out[col].to_numpy(), p_in[col].to_numpy(), err_msg=col)
    ds = open_particles(tmp_path / "out")
    assert ds.sizes["x"] == 84 and (ds["pixel_size"].values == 2.8 * 112 / 84).all()
    for h in (mrcfile.open(p, header_only=True) for p in sorted((tmp_path / "out" / "stacks").iterdir())):
        with h as mrc:
            assert float(mrc.voxel_size.x) == pytest.approx(2.8 * 112 / 84) and int(mrc.header.mode) == 2
    # recentred: origins 0, coordinates moved by the origin in micrograph pixels: these 2.8 Å particles
    # were extracted with rescaling from 0.7 Å micrographs (the movies' rlnMicrographOriginalPixelSize:
    # no evidence about the micrographs, so it is given), as the run says
    results = downsample(src, tmp_path / "rec", fourier_box=64, recenter=True, micrograph_pixel_size=0.7,
                         batch_size=100, log=quiet)
    assert "recentred coordinates use the micrograph pixel size from --micrograph-pixel-size" in results[0].notes
    p_rec = star_tables(tmp_path / "rec" / "particles.star")["particles"]
    assert (p_rec["rlnOriginXAngst"] == 0).all() and (p_rec["rlnOriginYAngst"] == 0).all()
    np.testing.assert_allclose(p_rec["rlnCoordinateX"], p_in["rlnCoordinateX"] - p_in["rlnOriginXAngst"] / 0.7,
                               rtol=1e-12)
    np.testing.assert_allclose(p_rec["rlnCoordinateY"], p_in["rlnCoordinateY"] - p_in["rlnOriginYAngst"] / 0.7,
                               rtol=1e-12)


def _cs_set(folder: Path, n: int = 8, box: int = 32) -> tuple[Path, np.ndarray]:
    """A CryoSPARC dataset with 3D alignments whose psize_A differs from the blob's, and locations."""
    make_stack(folder / "J1" / "imported" / "stack.mrcs", n, box, seed=4)
    rng = np.random.default_rng(9)
    m = matrix_from_euler(rng.uniform(-180, 180, n), rng.uniform(5, 175, n), rng.uniform(-180, 180, n))
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
              ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
              ("ctf/exp_group_id", "<u4"), ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"),
              ("alignments3D/pose", "<f4", (3,)), ("alignments3D/class", "<u4"),
              ("location/micrograph_path", "S40"), ("location/micrograph_shape", "<u4", (2,)),
              ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"),
              ("location/micrograph_psize_A", "<f4")]
    d = np.zeros(n, dtype=fields)
    d["uid"] = rng.integers(1, 2**62, n)
    d["blob/path"] = b">J1/imported/stack.mrcs"
    d["blob/idx"] = np.arange(n)[::-1]
    d["blob/shape"] = box
    d["blob/psize_A"] = 1.2
    d["blob/sign"] = -1
    d["ctf/accel_kv"], d["ctf/cs_mm"], d["ctf/amp_contrast"] = 300, 2.7, 0.1
    d["ctf/df1_A"], d["ctf/df2_A"] = rng.uniform(1e4, 2e4, n), rng.uniform(1e4, 2e4, n)
    d["alignments3D/shift"] = rng.uniform(-3, 3, (n, 2))
    d["alignments3D/psize_A"] = 2.4  # shifts in pixels of 2.4 Å, not of the blob's 1.2 Å
    d["alignments3D/pose"] = logmap(np.swapaxes(m, -1, -2))
    d["location/micrograph_path"] = b"J2/motioncorrected/mic.mrc"
    d["location/micrograph_shape"] = (4096, 3072)  # (ny, nx)
    d["location/center_x_frac"] = rng.uniform(0.1, 0.9, n)
    d["location/center_y_frac"] = rng.uniform(0.1, 0.9, n)
    d["location/micrograph_psize_A"] = 0.6
    path = folder / "J3" / "particles.cs"
    path.parent.mkdir(parents=True)
    write_cs(path, d)
    return path, d


def test_cs_fields_after_downsampling_and_recentring(tmp_path):
    src, d = _cs_set(tmp_path / "proj")
    shift_A = d["alignments3D/shift"].astype(np.float64) * 2.4
    downsample(src, tmp_path / "out", fourier_box=16, data_dir=tmp_path / "proj", project_dir=tmp_path / "out",
               log=quiet)
    o = np.load(tmp_path / "out" / "particles.cs")
    np.testing.assert_array_equal(o["uid"], d["uid"])
    assert (o["blob/psize_A"] == np.float32(1.2 * 32 / 16)).all() and (o["blob/shape"] == 16).all()
    assert o["blob/path"].tolist() == [b"stacks/batch_000000.mrcs"] * 8 and o["blob/idx"].tolist() == list(range(8))
    np.testing.assert_allclose(o["alignments3D/shift"] * o["alignments3D/psize_A"].astype(np.float64)[:, None],
                               shift_A, rtol=1e-6)  # a position in Å does not change
    np.testing.assert_allclose(o["alignments3D/pose"], d["alignments3D/pose"], atol=1e-5)
    for f in ("location/center_x_frac", "location/center_y_frac", "location/micrograph_shape", "blob/sign",
              "ctf/df1_A", "location/micrograph_psize_A", "location/micrograph_path"):
        np.testing.assert_array_equal(o[f], d[f], err_msg=f)
    star = star_tables(tmp_path / "out" / "particles.star")
    assert star["optics"]["rlnImagePixelSize"].tolist() == [1.2 * 32 / 16]  # the .cs float32 read as 1.2
    np.testing.assert_allclose(star["particles"]["rlnOriginXAngst"], shift_A[:, 0], rtol=1e-6)
    # the images are the kernel's on the blobs in .cs order
    images = read_direct(tmp_path / "proj" / "J1" / "imported" / "stack.mrcs")[::-1]
    np.testing.assert_array_equal(out_images(tmp_path / "out"), kernels.downsample(images, [16], pixel_size=1.2)[0])

    # recentred: shifts zero, centres moved by the shift in micrograph pixels (location/micrograph_psize_A)
    downsample(src, tmp_path / "rec", fourier_box=16, recenter=True, data_dir=tmp_path / "proj", log=quiet)
    r = np.load(tmp_path / "rec" / "particles.cs")
    assert (r["alignments3D/shift"] == 0).all()
    x = d["location/center_x_frac"].astype(np.float64) * 3072 - shift_A[:, 0] / np.float64(np.float32(0.6))
    y = d["location/center_y_frac"].astype(np.float64) * 4096 - shift_A[:, 1] / np.float64(np.float32(0.6))
    np.testing.assert_allclose(r["location/center_x_frac"], x / 3072, rtol=1e-6)
    np.testing.assert_allclose(r["location/center_y_frac"], y / 4096, rtol=1e-6)
    (rec,) = kernels.downsample(images, [16], pixel_size=1.2, shifts=shift_A / np.float64(np.float32(1.2)))
    np.testing.assert_allclose(out_images(tmp_path / "rec"), rec, rtol=1e-5, atol=1e-4)


# --- errors and float16 --------------------------------------------------------------------------

def test_argument_errors(real, tmp_path, capsys):
    src = real / SELECT
    with pytest.raises(ParticleError, match="not both"):
        downsample(src, tmp_path / "a", fourier_box=64, approx_pixel_size=5.6, log=quiet)
    with pytest.raises(SystemExit) as exit_:
        main(["downsample", str(src), "--out", str(tmp_path / "a"), "--fourier-box", "64", "--approx-pixel-size", "5.6"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(ParticleError, match="nothing to do"):
        downsample(src, tmp_path / "a", log=quiet)
    with pytest.raises(ParticleError, match="lowpass"):
        downsample(src, tmp_path / "a", lowpass=-3, log=quiet)
    with pytest.raises(ParticleError, match="Fourier box"):
        downsample(src, tmp_path / "a", fourier_box=1, log=quiet)
    with pytest.raises(ParticleError, match="crop box"):
        downsample(src, tmp_path / "a", crop_box=0, fourier_box=64, log=quiet)
    no_pose, _ = simple_set(tmp_path / "p")
    with pytest.raises(ParticleError, match="aligned shifts"):
        downsample(real / "cryodrgn/empiar_10076_7/empiar_10076_7.star", tmp_path / "a", recenter=True, log=quiet)
    assert not (tmp_path / "a").exists()
    # an output folder holding inputs, and existing output without --overwrite
    with pytest.raises(ParticleError, match="holds an input"):
        downsample(no_pose, tmp_path / "p", fourier_box=8, overwrite=True, log=quiet)
    downsample(no_pose, tmp_path / "b", fourier_box=8, log=quiet)
    with pytest.raises(ParticleError, match="--overwrite"):
        downsample(no_pose, tmp_path / "b", fourier_box=10, log=quiet)
    downsample(no_pose, tmp_path / "b", fourier_box=10, overwrite=True, log=quiet)
    assert out_images(tmp_path / "b").shape[-1] == 10


def test_float16_writes_mode_12_and_reports_the_error(real, tmp_path, capsys):
    src = real / SELECT
    downsample(src, tmp_path / "f32", fourier_box=64, batch_size=100, log=quiet)
    code = main(["downsample", str(src), "--out", str(tmp_path / "f16"), "--fourier-box", "64", "--float16",
                 "--batch-size", "100"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for p in sorted((tmp_path / "f16" / "stacks").iterdir()):
        with mrcfile.open(p, header_only=True) as mrc:
            assert int(mrc.header.mode) == 12
    f32, f16 = out_images(tmp_path / "f32"), out_images(tmp_path / "f16")
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    e = f16.astype(np.float32) - f32
    m = re.search(r"float16 rounding error against float32: largest ([0-9.e+-]+), RMS ([0-9.e+-]+)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(float(np.abs(e).max()), rel=1e-2)
    assert float(m.group(2)) == pytest.approx(float(np.sqrt(np.mean(np.square(e, dtype=np.float64)))), rel=1e-2)
    assert (star_tables(tmp_path / "f16" / "particles.star")["optics"]["rlnImagePixelSize"] == 5.6).all()


def test_float16_range_error_names_the_particle(tmp_path):
    images = np.zeros((6, 16, 16), np.float32)
    images[1] = 6e4  # a constant stays constant: fits in float16
    images[2, 8, 8] = 1e6  # spread by the Fourier crop, still beyond 65504
    star = _set(tmp_path / "in", images, 1.0)
    with pytest.raises(ParticleError, match=r"particle 3.*float16"):
        downsample(star, tmp_path / "out", fourier_box=8, float16=True, batch_size=2, log=quiet)
    assert not (tmp_path / "out" / "particles.star").exists()
