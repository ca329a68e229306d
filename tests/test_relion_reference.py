"""The kernels against RELION 3.1 itself, on the real stacks in the shared test data.

RELION runs on copies of a few images in ``tmp_path``; our kernels run on the same images as
``mrcfile`` reads them, and the results are compared pixel by pixel. Differences are reported
relative to the standard deviation of the input images: RELION computes in double precision and
writes float32, we compute in float32, so about 1e-6 is float32 rounding.

Tests that run RELION programs are marked ``relion`` and skipped when they are not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from helpers import REAL

from dparticles.kernels import crop_pad, downsample, fourier_box_for_pixel_size

DATA = REAL
RIBO = DATA / "relion31_sim_ribo70S_b128" / "Extract" / "job007" / "Movies"
RIBO_STACK = RIBO / "20240311_FoilHole_0012_fractions.mrcs"  # 6 images, 128 px, 2.80 Å
RELION31_STACK = DATA / "cryodrgn" / "relion31" / "relion31.mrcs"  # 5 images, 256 px, 2.806 Å
EMPIAR_STACK = DATA / "cryodrgn" / "empiar_10076_7" / "empiar_10076_7.mrc"  # 7 images, 320 px, 1.31 Å
RIBO_MAP = DATA / "aspire" / "clean70SRibosome_vol_65p.mrc"  # 65^3, 4.48 Å assumed

# float32 rounding of a double-precision result, relative to the image standard deviation
ROUNDING = 1e-5

needs_relion = pytest.mark.skipif(
    shutil.which("relion_image_handler") is None,
    reason="RELION 3.1 programs (relion_image_handler, relion_preprocess, relion_project) are not on PATH; "
           "install the Debian package 'relion' to run the RELION reference tests")
needs_data = pytest.mark.skipif(not RIBO_STACK.exists(), reason=f"shared test data not found at {DATA} "
                                "(set DPARTICLES_TEST_DATA to the folder of real test inputs)")
pytestmark = [needs_data]


def _read(path: Path) -> np.ndarray:
    with warnings.catch_warnings():  # relion31.mrcs has no map id or machine stamp: known, and sound data
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.array(mrc.data, dtype=np.float32)
    return data if data.ndim == 3 else data[None]


def _stage(src: Path, tmp_path: Path, name: str) -> Path:
    """Copy a shared input into tmp_path (RELION writes its outputs beside its input)."""
    dst = tmp_path / name
    shutil.copyfile(src, dst)
    return dst


def _relion(*args: object, cwd: Path) -> None:
    cmd = [str(a) for a in args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr}"


def _rel_diff(ours: np.ndarray, theirs: np.ndarray, scale_of: np.ndarray, name: str) -> float:
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    value = float(np.abs(ours.astype(np.float64) - theirs).max() / scale_of.astype(np.float64).std())
    print(f"\n[relion reference] {name}: max |ours - RELION| / std(input) = {value:.2e}")
    return value


# --- relion_image_handler --rescale_angpix and relion_preprocess --scale ------------------------

@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize(("source", "angpix", "new_angpix", "box"), [
    (RIBO_STACK, 2.80, 5.60, 64),
    (RIBO_STACK, 2.80, 2.80 * 128 / 96, 96),
    (RIBO_STACK, 2.80, 3.00, 118),  # RELION: ROUND(119.47) = 119, made even by dropping to 118
    (RELION31_STACK, 2.806, 5.612, 128),
    (EMPIAR_STACK, 1.31, 6.55, 64),
    (RIBO_STACK, 2.80, 2.00, 178),  # upsampling: RELION keeps a disc of the input spectrum
], ids=["ribo128-64", "ribo128-96", "ribo128-118", "relion31_256-128", "empiar320-64", "ribo128-178-up"])
def test_rescale_angpix_matches_image_handler(tmp_path, source, angpix, new_angpix, box):
    # .mrcs so that RELION reads a stack whatever the header says (empiar_10076_7.mrc claims a volume)
    staged = _stage(source, tmp_path, "in.mrcs")
    _relion("relion_image_handler", "--i", staged, "--angpix", angpix, "--rescale_angpix", repr(new_angpix),
            "--o", "out", cwd=tmp_path)
    theirs = _read(tmp_path / "in_out.mrcs")
    images = _read(staged)
    assert theirs.shape == (images.shape[0], box, box)
    (ours,) = downsample(images, [box], pixel_size=angpix)
    assert _rel_diff(ours, theirs, images, f"rescale_angpix {source.name} {images.shape[-1]}->{box}") < ROUNDING


@needs_relion
@pytest.mark.relion
def test_relion_box_rule_is_not_nearest_even(tmp_path):
    """RELION rounds then drops odd boxes by one; fourier_box_for_pixel_size takes the nearest even."""
    staged = _stage(RIBO_STACK, tmp_path, "in.mrcs")
    _relion("relion_image_handler", "--i", staged, "--angpix", 2.8, "--rescale_angpix", 3.0, "--o", "out",
            cwd=tmp_path)
    assert _read(tmp_path / "in_out.mrcs").shape[-1] == 118
    assert fourier_box_for_pixel_size(128, 2.8, 3.0) == 120  # 128 * 2.8 / 3 = 119.47


@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize(("source", "box"), [(RIBO_STACK, 64), (RIBO_STACK, 96), (RELION31_STACK, 128)],
                         ids=["ribo128-64", "ribo128-96", "relion31_256-128"])
def test_preprocess_scale_matches(tmp_path, source, box):
    staged = _stage(source, tmp_path, "in.mrcs")
    _relion("relion_preprocess", "--operate_on", staged, "--scale", box, "--operate_out", "out", cwd=tmp_path)
    theirs = _read(tmp_path / "out.mrcs")
    images = _read(staged)
    (ours,) = downsample(images, [box], pixel_size=1.0)
    assert _rel_diff(ours, theirs, images, f"preprocess --scale {source.name} {images.shape[-1]}->{box}") < ROUNDING


# --- lowpass ------------------------------------------------------------------------------------

@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize(("lowpass", "relion_width", "our_width", "new_angpix", "box"), [
    (20.0, 2, 2.0, None, None),
    (11.0, 2, 2.0, None, None),
    (20.0, 4, 4.0, None, None),
    (9.0, 6, 6.0, None, None),
    (20.0, 5, 4.0, None, None),  # RELION halves the width with integer division: 5 acts as 4
    (15.0, 2, 2.0, 5.6, 64),  # lowpass (in shells of the 128 box) then rescale, in one RELION call
])
def test_lowpass_matches_image_handler(tmp_path, lowpass, relion_width, our_width, new_angpix, box):
    staged = _stage(RIBO_STACK, tmp_path, "in.mrcs")
    extra = [] if new_angpix is None else ["--rescale_angpix", new_angpix]
    _relion("relion_image_handler", "--i", staged, "--angpix", 2.8, "--lowpass", lowpass,
            "--filter_edge_width", relion_width, *extra, "--o", "out", cwd=tmp_path)
    theirs = _read(tmp_path / "in_out.mrcs")
    images = _read(staged)
    (ours,) = downsample(images, [box], pixel_size=2.8, lowpass=lowpass, edge_width=our_width)
    name = f"lowpass {lowpass} Å width {relion_width}" + ("" if box is None else f" + rescale 128->{box}")
    assert _rel_diff(ours, theirs, images, name) < ROUNDING
    if box is None:  # and the filter did something
        assert np.abs(ours - images).max() > 0.1 * images.std()


# --- shifts -------------------------------------------------------------------------------------

@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize(("sx", "sy"), [(3, -5), (-7, 2)])
def test_integer_shift_matches_image_handler_inside_the_box(tmp_path, sx, sy):
    """``--shift_x/--shift_y`` shift in real space without wrapping (zeros come in at the edges);
    for integer shifts ours (origin = shift) is the same image, wrapped."""
    staged = _stage(RIBO_STACK, tmp_path, "in.mrcs")
    _relion("relion_image_handler", "--i", staged, "--shift_x", sx, "--shift_y", sy, "--o", "out", cwd=tmp_path)
    theirs = _read(tmp_path / "in_out.mrcs")
    images = _read(staged)
    (ours,) = downsample(images, [None], pixel_size=2.8, shifts=np.tile([sx, sy], (images.shape[0], 1)))
    b = images.shape[-1]
    inside = (slice(None), slice(max(sy, 0), b + min(sy, 0)), slice(max(sx, 0), b + min(sx, 0)))
    assert _rel_diff(ours[inside], theirs[inside], images, f"--shift_x {sx} --shift_y {sy} (inside)") < ROUNDING
    assert np.abs(theirs).sum() - np.abs(theirs[inside]).sum() == 0.0  # RELION: zeros outside


def _project(tmp_path: Path, volume: Path, out: str, xoff: float = 0.0, yoff: float = 0.0) -> np.ndarray:
    _relion("relion_project", "--i", volume, "--angpix", 4.48, "--rot", 20, "--tilt", 70, "--psi", 10,
            "--xoff", xoff, "--yoff", yoff, "--o", out, cwd=tmp_path)
    return _read(tmp_path / out)


@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize("box", [65, 64])
def test_sub_pixel_recentring_undoes_relion_project_offsets(tmp_path, box):
    """``relion_project --xoff/--yoff`` shift the projection in Fourier space by -offset
    (``shiftImageInFourierTransform``); recentring by the same origin must give the centred projection.

    Odd box (the 65^3 map as it is): float32 rounding. Even box (cropped to 64 by RELION): RELION's
    projection has non-Hermitian Nyquist terms that the written image cannot hold, so the results
    differ on the Nyquist row and column only; elsewhere they agree to rounding."""
    volume = _stage(RIBO_MAP, tmp_path, "map.mrc")
    if box != 65:
        _relion("relion_image_handler", "--i", volume, "--new_box", box, "--o", "map_b.mrc", cwd=tmp_path)
        volume = tmp_path / "map_b.mrc"
    centred = _project(tmp_path, volume, "p0.mrc")
    origin = (2.5, -1.25)
    off = _project(tmp_path, volume, "p1.mrc", *origin)
    assert centred.shape == off.shape == (1, box, box)
    (ours,) = downsample(off, [None], pixel_size=4.48, shifts=np.array([origin]))
    (forward,) = downsample(centred, [None], pixel_size=4.48, shifts=-np.array([origin]))
    name = f"relion_project box {box} origin {origin}"
    if box % 2:
        assert _rel_diff(ours, centred, centred, name + " recentred") < ROUNDING
        assert _rel_diff(forward, off, centred, name + " shifted") < ROUNDING
    else:
        assert _rel_diff(ours, centred, centred, name + " recentred (with Nyquist)") < 1e-4
        assert _rel_diff(forward, off, centred, name + " shifted (with Nyquist)") < 1e-4
        spec = np.fft.rfft2((ours - centred)[0].astype(np.float64))
        nyquist = np.abs(spec).max()
        spec[box // 2, :] = 0
        spec[:, box // 2] = 0
        rest = np.abs(spec).max() / np.abs(np.fft.rfft2(centred[0].astype(np.float64))).max()
        print(f"\n[relion reference] {name}: off-Nyquist spectral difference / max |F| = {rest:.2e}; "
              f"Nyquist difference {nyquist:.2e}")
        assert rest < 1e-6


def test_integer_recentring_restores_relion_project_centred_images():
    """ASPIRE's RELION-written pair: the same projections centred and with integer pixel origins."""
    aspire = DATA / "aspire"
    if not (aspire / "rln_proj_64_shifted.mrcs").exists():
        pytest.skip(f"ASPIRE projections not found in {aspire}")
    centred = _read(aspire / "rln_proj_64_centered.mrcs")
    off = _read(aspire / "rln_proj_64_shifted.mrcs")
    origins = np.array([[6, 10], [10, -5], [-8, 11], [-13, -3]], dtype=float)  # rlnOriginX/Y of the STAR file
    (ours,) = downsample(off, [None], pixel_size=1.0, shifts=origins)
    assert _rel_diff(ours, centred, centred, "ASPIRE rln_proj_64 recentred by rlnOriginX/Y") < ROUNDING
    (wrong,) = downsample(off, [None], pixel_size=1.0, shifts=-origins)
    assert np.abs(wrong - centred).max() > 0.5 * centred.std()


# --- real-space window --------------------------------------------------------------------------

@needs_relion
@pytest.mark.relion
@pytest.mark.parametrize("box", [100, 101, 160, 161])
def test_crop_pad_matches_new_box_inside_the_input(tmp_path, box):
    """``--new_box`` centres as we do; it pads with 0 where we pad with each image's mean."""
    staged = _stage(RIBO_STACK, tmp_path, "in.mrcs")
    _relion("relion_image_handler", "--i", staged, "--new_box", box, "--o", "out", cwd=tmp_path)
    theirs = _read(tmp_path / "in_out.mrcs")
    images = _read(staged)
    ours = crop_pad(images, box)
    b = images.shape[-1]
    if box <= b:
        np.testing.assert_array_equal(ours, theirs)
    else:
        off = box // 2 - b // 2
        inner = (slice(None), slice(off, off + b), slice(off, off + b))
        np.testing.assert_array_equal(ours[inner], theirs[inner])
        border = np.ones((box, box), bool)
        border[off:off + b, off:off + b] = False
        assert (theirs[:, border] == 0).all()
        means = images.mean(axis=(1, 2), dtype=np.float64)
        np.testing.assert_allclose(ours[:, border], np.broadcast_to(means[:, None], ours[:, border].shape),
                                   rtol=1e-6, atol=1e-9)
