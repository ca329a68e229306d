"""The numpy kernels on synthetic images: no files, no RELION (see test_relion_reference.py for that)."""

from __future__ import annotations

import numpy as np
import pytest

from dparticles.kernels import crop_pad, downsample, fourier_box_for_pixel_size

BOXES = [7, 8, 64, 65]


def _noise(n: int, b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, b, b)).astype(np.float32)


def _band_limited(n: int, b: int, radius: float, seed: int = 0) -> np.ndarray:
    """Real images whose spectrum is zero at and beyond ``radius`` Fourier pixels (no Nyquist terms)."""
    spec = np.fft.rfft2(np.random.default_rng(seed).standard_normal((n, b, b)))
    ky = np.fft.fftfreq(b, 1 / b)[:, None]
    kx = np.arange(b // 2 + 1)[None, :]
    spec[:, kx**2 + ky**2 >= radius**2] = 0
    return np.fft.irfft2(spec, s=(b, b)).astype(np.float32) + 5.0


def _reference_crop(images: np.ndarray, o: int) -> np.ndarray:
    """The convention written out in float64: rows 0..o/2 and -(o/2-1)..-1, columns 0..o/2 (even o < b)."""
    b = images.shape[-1]
    spec = np.fft.rfft2(images.astype(np.float64))
    kept = np.concatenate([spec[:, : o // 2 + 1, : o // 2 + 1], spec[:, b - (o // 2 - 1):, : o // 2 + 1]], axis=1)
    return np.fft.irfft2(kept, s=(o, o)) * (o * o) / (b * b)


def _centroid(img: np.ndarray) -> tuple[float, float]:
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    w = img / img.sum()
    return float((w * x).sum()), float((w * y).sum())


def _blob(b: int, cx: float, cy: float, sigma: float = 2.5) -> np.ndarray:
    y, x = np.mgrid[:b, :b]
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


# --- constants and means ------------------------------------------------------------------------

@pytest.mark.parametrize("b", BOXES)
@pytest.mark.parametrize("o", [2, 3, 5, 6, 32, 33, None, 97, 128, 129])
def test_constant_image_stays_the_same_constant(b, o):
    images = np.full((3, b, b), -7.25, dtype=np.float32)
    out_box = b if o is None else o
    for kwargs in ({}, {"lowpass": 4.0}, {"shifts": np.array([[0.3, -2.2], [1.0, 1.0], [-9.5, 4.25]])}):
        (out,) = downsample(images, [o], pixel_size=1.0, **kwargs)
        assert out.shape == (3, out_box, out_box)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, -7.25, atol=2e-5, err_msg=str(kwargs))


@pytest.mark.parametrize("b", BOXES)
def test_mean_is_preserved(b):
    images = _noise(4, b) + np.array([0.0, 3.0, -2.0, 100.0], dtype=np.float32)[:, None, None]
    outs = downsample(images, [2, 3, b // 2, b, 2 * b + 1], pixel_size=1.3, lowpass=6.0,
                      shifts=np.array([[0.5, 1.5], [-3.0, 2.0], [0.0, 0.0], [7.7, -7.7]]))
    for out in outs:
        np.testing.assert_allclose(out.mean(axis=(1, 2), dtype=np.float64),
                                   images.mean(axis=(1, 2), dtype=np.float64), atol=1e-4)


def test_input_is_not_modified_and_float32_out():
    images = _noise(2, 32)
    before = images.copy()
    outs = downsample(images.astype(np.float64), [16, 31, 64], pixel_size=1.0, lowpass=5.0,
                      shifts=np.array([[1.5, 2.0], [0.0, -1.0]]))
    outs += downsample(images, [16], pixel_size=1.0)
    np.testing.assert_array_equal(images, before)
    assert all(o.dtype == np.float32 for o in outs)


# --- the Fourier window -------------------------------------------------------------------------

@pytest.mark.parametrize(("b", "o"), [(64, 32), (64, 48), (128, 64), (130, 64), (64, 2)])
def test_crop_matches_the_convention_written_out(b, o):
    images = _noise(5, b, seed=1)
    (out,) = downsample(images, [o], pixel_size=1.0)
    ref = _reference_crop(images, o)
    assert np.abs(out - ref).max() < 2e-6 * images.std()


def test_nyquist_row_of_an_even_crop_is_the_positive_one():
    """Only the input row ky=+o/2 feeds the output Nyquist row: ky=-o/2 of the input is dropped."""
    b, o = 64, 32
    spec = np.zeros((1, b, b // 2 + 1), dtype=np.complex128)
    spec[0, o // 2, 3] = 1.0  # ky = +16: kept
    image_plus = np.fft.irfft2(spec, s=(b, b)).astype(np.float32)
    spec[:] = 0
    spec[0, b - o // 2, 3] = 1.0  # ky = -16: not kept
    image_minus = np.fft.irfft2(spec, s=(b, b)).astype(np.float32)
    plus, minus = (downsample(x, [o], pixel_size=1.0)[0] for x in (image_plus, image_minus))
    assert np.abs(plus).max() > 1e-5
    assert np.abs(minus).max() < 1e-9


@pytest.mark.parametrize("b", BOXES[2:])
@pytest.mark.parametrize("o", [32, 33, 40])
def test_fourier_crop_then_pad_returns_a_band_limited_image(b, o):
    images = _band_limited(3, b, radius=o // 2 - 1)
    (small,) = downsample(images, [o], pixel_size=1.0)
    (back,) = downsample(small, [b], pixel_size=1.0)
    assert np.abs(back - images).max() < 1e-5 * np.abs(images).max()


def test_fourier_pad_keeps_a_disc_as_relion_does():
    """Padding keeps only input coefficients with kx^2+ky^2 <= (b//2)^2: the corner frequency dies."""
    b, o = 16, 32
    spec = np.zeros((1, b, b // 2 + 1), dtype=np.complex128)
    spec[0, 7, 7] = 1.0  # radius 9.9 > 8: a corner
    spec[0, 3, 7] = 1.0  # radius 7.6 <= 8: inside the disc
    image = np.fft.irfft2(spec, s=(b, b)).astype(np.float32)
    (out,) = downsample(image, [o], pixel_size=1.0)
    got = np.fft.rfft2(out[0].astype(np.float64)) * (b * b) / (o * o)
    assert abs(got[7, 7]) < 1e-6
    assert abs(abs(got[3, 7]) - 1.0) < 1e-5


def test_several_boxes_equal_separate_calls():
    images = _noise(4, 64, seed=3)
    shifts = np.array([[1.25, -0.5], [3.0, 2.0], [-4.4, 0.1], [0.0, 0.0]])
    boxes = [32, None, 33, 20, 96]
    together = downsample(images, boxes, pixel_size=1.1, lowpass=5.0, shifts=shifts, threads=2)
    for o, out in zip(boxes, together, strict=True):
        (alone,) = downsample(images, [o], pixel_size=1.1, lowpass=5.0, shifts=shifts)
        np.testing.assert_array_equal(out, alone)


def test_threads_do_not_change_the_result():
    images = _noise(8, 64, seed=4)
    one = downsample(images, [32, 48], pixel_size=1.0, lowpass=4.0)
    two = downsample(images, [32, 48], pixel_size=1.0, lowpass=4.0, threads=2)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --- shifts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", BOXES)
@pytest.mark.parametrize(("ox", "oy"), [(1, 0), (0, 1), (10, 0), (-3, 5), (7, -2)])
def test_integer_shift_equals_roll(b, ox, oy):
    images = _noise(2, b, seed=5)
    shifts = np.array([[ox, oy], [-oy, ox]], dtype=float)
    (out,) = downsample(images, [None], pixel_size=1.0, shifts=shifts)
    for i, (sx, sy) in enumerate(shifts.astype(int)):
        # +origin moves the image towards higher column (x) and row (y) indices
        expected = np.roll(images[i], (sy, sx), axis=(0, 1))
        assert np.abs(out[i] - expected).max() < 1e-5 * images.std()


@pytest.mark.parametrize("b", BOXES[2:])
def test_sub_pixel_shift_then_inverse_returns_the_image(b):
    images = _band_limited(3, b, radius=b // 2 - 1, seed=6)
    shifts = np.array([[0.37, -2.5], [13.71, 0.02], [-5.5, 6.125]])
    (moved,) = downsample(images, [None], pixel_size=1.0, shifts=shifts)
    assert np.abs(moved - images).max() > 0.1  # it did move
    (back,) = downsample(moved, [None], pixel_size=1.0, shifts=-shifts)
    assert np.abs(back - images).max() < 1e-5 * np.abs(images).max()


@pytest.mark.parametrize(("b", "o"), [(64, None), (64, 32), (65, None), (65, 33), (64, 31), (96, 64)])
def test_recentring_brings_an_off_centre_blob_to_the_centre(b, o):
    origins = np.array([[3.3, -5.7], [-8.25, 2.5], [0.5, 0.5]])
    # origin +ox: the particle sits ox pixels towards lower column index
    images = np.stack([_blob(b, b // 2 - ox, b // 2 - oy) for ox, oy in origins])
    for img, (ox, oy) in zip(images, origins, strict=True):
        cx, cy = _centroid(img)
        assert abs(cx - (b // 2 - ox)) < 1e-3 and abs(cy - (b // 2 - oy)) < 1e-3
    (out,) = downsample(images, [o], pixel_size=1.0, shifts=origins)
    centre = (b if o is None else o) // 2
    for img in out:
        cx, cy = _centroid(img)
        assert abs(cx - centre) < 1e-3 and abs(cy - centre) < 1e-3, (cx, cy)
        assert np.unravel_index(img.argmax(), img.shape) == (centre, centre)


@pytest.mark.parametrize(("b", "o"), [(64, 32), (64, 33), (65, 32), (65, 33), (33, 64), (32, 65)])
def test_the_centre_pixel_stays_the_centre_pixel(b, o):
    (out,) = downsample(_blob(b, b // 2, b // 2)[None], [o], pixel_size=1.0)
    cx, cy = _centroid(out[0])
    assert abs(cx - o // 2) < 1e-3 and abs(cy - o // 2) < 1e-3


# --- lowpass ------------------------------------------------------------------------------------

def _radial_power(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = images.shape[-1]
    spec = np.fft.rfft2(images.astype(np.float64))
    ky = np.fft.fftfreq(b, 1 / b)[:, None]
    kx = np.arange(b // 2 + 1)[None, :]
    return np.sqrt(kx**2 + ky**2), spec


@pytest.mark.parametrize("b", [64, 65, 128])
@pytest.mark.parametrize("edge_width", [0.0, 2.0, 4.0, 5.0])
def test_lowpass_kills_beyond_its_edge_and_keeps_well_inside(b, edge_width):
    pixel_size, lowpass = 1.5, 6.0
    shell = int(np.floor(b * pixel_size / lowpass + 0.5))
    images = _noise(3, b, seed=7)
    (out,) = downsample(images, [None], pixel_size=pixel_size, lowpass=lowpass, edge_width=edge_width)
    r, before = _radial_power(images)
    _, after = _radial_power(out)
    beyond = r > shell + edge_width / 2 + 1e-9
    inside = r <= shell - edge_width / 2 - 1e-9
    assert (np.abs(after[:, beyond]) ** 2).sum() < 1e-12 * (np.abs(before[:, beyond]) ** 2).sum()
    np.testing.assert_allclose(after[:, inside], before[:, inside], rtol=2e-5, atol=1e-3)
    gain = np.abs(after[:, ~(beyond | inside)]) / np.abs(before[:, ~(beyond | inside)])
    assert ((gain > -1e-5) & (gain < 1 + 1e-5)).all()


def test_lowpass_shape_is_the_documented_raised_cosine():
    b, pixel_size, lowpass = 64, 1.0, 8.0  # shell 8
    images = _noise(2, b, seed=8)
    (out,) = downsample(images, [None], pixel_size=pixel_size, lowpass=lowpass, edge_width=4.0)
    r, before = _radial_power(images)
    _, after = _radial_power(out)
    expected = np.clip(0.5 + 0.5 * np.cos(np.pi * (r - 6.0) / 4.0), 0, 1)
    expected[r <= 6.0] = 1.0
    expected[r > 10.0] = 0.0
    got = (after / np.where(before == 0, 1, before)).real
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-4)
    # the half-gain point is the lowpass rounded to a shell: r = 8 <-> 8 Å
    assert abs(got[0, 0, 8] - 0.5) < 1e-4


def test_lowpass_with_crop_equals_crop_of_lowpass():
    images = _noise(3, 128, seed=9)
    (a,) = downsample(images, [64], pixel_size=2.0, lowpass=9.0)
    (full,) = downsample(images, [None], pixel_size=2.0, lowpass=9.0)
    (b,) = downsample(full, [64], pixel_size=2.0)
    assert np.abs(a - b).max() < 1e-5 * images.std()


# --- real-space crop and pad --------------------------------------------------------------------

@pytest.mark.parametrize("b", [7, 8, 64, 65])
@pytest.mark.parametrize("box", [1, 4, 5, 32, 33, 64, 65, 100, 101])
def test_crop_pad_keeps_the_centre_pixel_and_pads_with_the_mean(b, box):
    images = _noise(3, b, seed=10) + np.array([1.0, -2.0, 30.0], dtype=np.float32)[:, None, None]
    images[:, b // 2, b // 2] = 1000.0
    out = crop_pad(images, box)
    assert out.shape == (3, box, box) and out.dtype == np.float32
    assert (out[:, box // 2, box // 2] == 1000.0).all()
    off = b // 2 - box // 2
    if box <= b:
        np.testing.assert_array_equal(out, images[:, off:off + box, off:off + box])
    else:
        np.testing.assert_array_equal(out[:, -off:-off + b, -off:-off + b], images)
        mask = np.ones((box, box), bool)
        mask[-off:-off + b, -off:-off + b] = False
        means = images.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
        for i in range(3):
            assert (out[i][mask] == means[i]).all()
    out[:] = 0  # a copy, never a view
    assert (images[:, b // 2, b // 2] == 1000.0).all()


@pytest.mark.parametrize(("b", "box"), [(64, 100), (65, 101), (65, 100), (8, 9)])
def test_pad_then_crop_is_the_identity(b, box):
    images = _noise(2, b, seed=11)
    np.testing.assert_array_equal(crop_pad(crop_pad(images, box), b), images)


# --- box for a target pixel size ----------------------------------------------------------------

@pytest.mark.parametrize(("box", "pixel_size", "target", "expected"), [
    (128, 2.8, 5.6, 64),         # exact halving
    (256, 2.806, 5.612, 128),
    (320, 1.31, 6.55, 64),       # 64.0
    (128, 2.8, 3.0, 120),        # x = 119.47: nearest even is 120 (RELION's rule gives 118)
    (128, 1.0, 128 / 63, 64),    # x = 63 exactly: a tie goes to the larger box (RELION: 62)
    (128, 1.0, 128 / 61, 62),    # x = 61: tie, larger
    (128, 1.0, 128 / 62.9, 62),  # just below the tie
    (128, 1.0, 128 / 63.1, 64),  # just above the tie
    (100, 1.0, 1.0, 100),        # nothing to do
    (101, 1.0, 1.0, 101),        # odd box, nothing to do: the box itself
    (101, 1.0, 0.5, 101),        # never upsample
    (128, 1.0, 1000.0, 2),       # at least 2
    (128, 1.0, 128 / 2.9, 2),
    (128, 1.0, 128 / 3.1, 4),
])
def test_fourier_box_for_pixel_size(box, pixel_size, target, expected):
    got = fourier_box_for_pixel_size(box, pixel_size, target)
    assert got == expected
    assert isinstance(got, int)


@pytest.mark.parametrize(("args", "match"), [
    ((1, 1.0, 1.0), "at least 2"),
    ((128.0, 1.0, 1.0), "integer"),
    ((128, 0.0, 1.0), "pixel_size"),
    ((128, 1.0, -2.0), "target"),
    ((128, 1.0, float("nan")), "target"),
])
def test_fourier_box_for_pixel_size_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        fourier_box_for_pixel_size(*args)


# --- argument checks ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"images": np.zeros((4, 4), np.float32)}, "shaped \\(n, box, box\\)"),
    ({"images": np.zeros((1, 4, 5), np.float32)}, "square"),
    ({"images": np.zeros((1, 4, 4), np.complex64)}, "real"),
    ({"out_boxes": [0]}, "positive integer"),
    ({"out_boxes": [3.5]}, "positive integer"),
    ({"pixel_size": 0.0}, "pixel_size"),
    ({"lowpass": -1.0}, "lowpass"),
    ({"edge_width": -1.0}, "edge_width"),
    ({"threads": 0}, "threads"),
    ({"shifts": np.zeros((3, 2))}, "shifts"),
    ({"shifts": np.array([[np.nan, 0.0], [0.0, 0.0]])}, "finite"),
])
def test_downsample_rejects_bad_arguments(kwargs, match):
    args = {"images": np.zeros((2, 8, 8), np.float32), "out_boxes": [4], "pixel_size": 1.0} | kwargs
    images = args.pop("images")
    out_boxes = args.pop("out_boxes")
    with pytest.raises(ValueError, match=match):
        downsample(images, out_boxes, **args)


def test_empty_inputs():
    assert downsample(np.zeros((2, 8, 8), np.float32), [], pixel_size=1.0) == []
    (out,) = downsample(np.zeros((0, 8, 8), np.float32), [4], pixel_size=1.0)
    assert out.shape == (0, 4, 4) and out.dtype == np.float32
