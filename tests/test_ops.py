"""dparticles.ops: lazy transforms equal the numpy kernels over any chunking (each op on its own kernel
byte for byte the fused pass it used to be), read nothing when built, update the metadata, check their
arguments before building a graph, and several sizes share one read and one forward FFT per image;
map_particles runs one's own kernel."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
from dask.array.utils import assert_eq
from helpers import simple_set

from dparticles import kernels, ops
from dparticles.dataset import open_particles
from dparticles.errors import ParticleError

SELECT = "relion31_sim_ribo70S_b128/Select/job010/particles.star"


@pytest.fixture(scope="module", params=[(1.5,), (1.5, 2.0)], ids=["one-group", "two-groups"])
def star(request, tmp_path_factory) -> Path:
    """12 particles of 16 px in two stacks; with two optics groups, pixel sizes alternate particle by
    particle, so every chunk of more than one particle mixes them."""
    return simple_set(tmp_path_factory.mktemp("ops"), pixel_sizes=request.param)[0]


def reference(ds: xr.Dataset, boxes: list[int], *, crop_box: int | None = None, lowpass: float | None = None,
              recenter: bool = False) -> list[np.ndarray]:
    """The kernels applied image by image to the computed input, each with its own pixel size and shift."""
    images, psize = ds["images"].values, ds["pixel_size"].values
    out: list[list[np.ndarray]] = [[] for _ in boxes]
    for i in range(len(images)):
        image = images[i:i + 1] if crop_box is None else kernels.crop_pad(images[i:i + 1], crop_box)
        shifts = np.array([[ds["shift_x"].values[i], ds["shift_y"].values[i]]]) / psize[i] if recenter else None
        for k, o in enumerate(kernels.downsample(image, boxes, pixel_size=float(psize[i]), lowpass=lowpass,
                                                 shifts=shifts)):
            out[k].append(o)
    return [np.concatenate(o) for o in out]


def assert_close(got: xr.Dataset, want: np.ndarray) -> None:
    """Equal to float32 rounding (FFTs batched differently may differ in the last bit)."""
    data = got["images"].data
    assert got["images"].dtype == np.float32 and data.chunks[1:] == ((want.shape[1],), (want.shape[2],))
    values = data.compute()
    assert values.dtype == np.float32 and values.shape == want.shape
    np.testing.assert_allclose(values, want, rtol=0, atol=1e-5 * float(want.std()))


# (name, transform, the same by the kernels image by image)
CASES = [
    ("crop", lambda ds: ops.crop(ds, 12), lambda ds: [kernels.crop_pad(ds["images"].values, 12)]),
    ("pad", lambda ds: ops.crop(ds, 20), lambda ds: [kernels.crop_pad(ds["images"].values, 20)]),
    ("fourier-crop", lambda ds: ops.fourier_crop(ds, 8), lambda ds: reference(ds, [8])),
    ("fourier-pad", lambda ds: ops.fourier_crop(ds, 20), lambda ds: reference(ds, [20])),
    ("fourier-crop-odd", lambda ds: ops.fourier_crop(ds, 9), lambda ds: reference(ds, [9])),
    ("lowpass", lambda ds: ops.lowpass(ds, 4.0), lambda ds: reference(ds, [16], lowpass=4.0)),
    ("recenter", lambda ds: ops.recenter(ds, micrograph_pixel_size=1.0), lambda ds: reference(ds, [16], recenter=True)),
    ("sizes", lambda ds: ops.fourier_crop(ds, [8, 6]), lambda ds: reference(ds, [8, 6])),
    ("all", lambda ds: ops.downsample(ds, crop_box=12, fourier_box=[8, 6], lowpass=5.0, recenter=True,
                                      micrograph_pixel_size=1.0),
     lambda ds: reference(ds, [8, 6], crop_box=12, lowpass=5.0, recenter=True)),
    ("pad-lowpass", lambda ds: ops.downsample(ds, crop_box=20, fourier_box=10, lowpass=4.0),
     lambda ds: reference(ds, [10], crop_box=20, lowpass=4.0)),
    ("nothing", lambda ds: ops.downsample(ds), lambda ds: [ds["images"].values]),
]


@pytest.mark.parametrize("chunks", [1, 3, 5, 12], ids=lambda c: f"chunks{c}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_kernels_whatever_the_chunking(star, case, chunks):
    ds = open_particles(star, chunks=chunks)
    _, transform, want = case
    got = transform(ds)
    want = want(ds)
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["images"].data.chunks[0] == ds["images"].data.chunks[0]
        assert_close(g, w)


def fused(ds: xr.Dataset, *, boxes: tuple[int, ...], crop_box: int | None = None, lowpass: float | None = None,
          recenter: bool = False) -> np.ndarray:
    """The fused pass (kernels.downsample_chunk) over the whole computed input in one call: what every op
    computed before each had its own kernel (its output does not depend on the chunking)."""
    psize = ds["pixel_size"].values
    shifts = [ds["shift_x"].values / psize, ds["shift_y"].values / psize] if recenter else []
    return kernels.downsample_chunk(ds["images"].values, psize, *shifts, crop_box=crop_box, boxes=boxes,
                                    lowpass=lowpass)[0]


# (name, op, the same request to the fused pass)
OWN_KERNELS = [
    ("crop", lambda ds: ops.crop(ds, 12), {"crop_box": 12, "boxes": (12,)}),
    ("pad", lambda ds: ops.crop(ds, 21), {"crop_box": 21, "boxes": (21,)}),
    ("fourier-crop", lambda ds: ops.fourier_crop(ds, 8), {"boxes": (8,)}),
    ("fourier-pad", lambda ds: ops.fourier_crop(ds, 20), {"boxes": (20,)}),
    ("fourier-crop-odd", lambda ds: ops.fourier_crop(ds, 9), {"boxes": (9,)}),
    ("fourier-same-box", lambda ds: ops.fourier_crop(ds, 16), {"boxes": (16,)}),
    ("lowpass", lambda ds: ops.lowpass(ds, 4.0), {"boxes": (16,), "lowpass": 4.0}),
    ("recenter", lambda ds: ops.recenter(ds, micrograph_pixel_size=1.0), {"boxes": (16,), "recenter": True}),
]


@pytest.mark.filterwarnings("ignore:Fourier box")
@pytest.mark.parametrize("chunks", [1, 3, 5, 12], ids=lambda c: f"chunks{c}")
@pytest.mark.parametrize("case", OWN_KERNELS, ids=[c[0] for c in OWN_KERNELS])
def test_each_op_equals_the_fused_pass_byte_for_byte(star, case, chunks):
    ds = open_particles(star, chunks=chunks)
    _, op, request = case
    got, want = op(ds)["images"].data, fused(ds, **request)
    assert_eq(got, want)  # dask's check: chunks, dtype and meta as computed, values equal
    assert got.compute().tobytes() == want.tobytes()


def test_map_particles_runs_ones_own_kernel_with_the_metadata_kept(star):
    ds = open_particles(star, chunks=5)
    inverted = ds.assign(images=(("particle", "y", "x"), ops.map_particles(ds, lambda images: -images)))
    assert inverted["images"].data.chunks == ds["images"].data.chunks
    assert_eq(inverted["images"].data, -ds["images"].values)
    xr.testing.assert_identical(inverted.drop_vars("images"), ds.drop_vars("images"))
    assert inverted.attrs == ds.attrs


def test_map_particles_passes_per_particle_values_and_fits_the_budget(star):
    """A kernel given each particle's pixel size (one value for all with one optics group), a new box,
    and its peak: 1 MB a particle under 75% of 4 MB makes tasks of 3."""
    ds = open_particles(star, chunks=12)
    psize = ds["pixel_size"].values

    def scaled(images: np.ndarray, p: np.ndarray) -> np.ndarray:
        return kernels.crop_pad(images, 8) * p[:, None, None].astype(np.float32)

    with dask.config.set({"dparticles.memory-budget": "4MB"}):
        got = ops.map_particles(ds, scaled, out_box=8, per_particle=[psize], peak=lambda n: n * 10**6)
    assert got.chunks == ((3, 3, 3, 3), (8,), (8,))
    want = kernels.crop_pad(ds["images"].values, 8) * psize[:, None, None].astype(np.float32)
    assert_eq(got, want)


def test_optics_groups_get_their_own_filter(tmp_path):
    """Filtering the whole chunk with the first particle's pixel size would differ (a failable test)."""
    star, _ = simple_set(tmp_path / "p", pixel_sizes=(1.5, 2.0))
    ds = open_particles(star, chunks=12)
    psize = ds["pixel_size"].values
    got = ops.lowpass(ds, 4.0)["images"].values
    one_filter = kernels.downsample(ds["images"].values, [16], pixel_size=float(psize[0]), lowpass=4.0)[0]
    second = psize != psize[0]
    assert not np.allclose(got[second], one_filter[second], atol=1e-3)
    assert_close(ops.lowpass(ds, 4.0), reference(ds, [16], lowpass=4.0)[0])


def test_images_chunked_along_y_and_x_are_rechunked(star):
    ds = open_particles(star, chunks=5)
    split = ds.assign(images=ds["images"].chunk({"y": 4, "x": 8}))
    assert split["images"].data.numblocks == (3, 4, 2)
    got = ops.downsample(split, fourier_box=8, lowpass=5.0)
    assert got["images"].data.numblocks == (3, 1, 1)
    assert_close(got, reference(ds, [8], lowpass=5.0)[0])


def test_per_particle_arrays_travel_as_one_slice_per_block(star):
    ds = open_particles(star, chunks=5)
    graph = ops.downsample(ds, lowpass=5.0, recenter=True, micrograph_pixel_size=1.0)["images"].data.dask
    pieces = [np.asarray(v) for name, layer in graph.layers.items() if name.startswith("array-")
              for v in dict(layer).values()]
    assert len(pieces) == 3 * 3  # pixel size, shift x, shift y: one piece of each per chunk of 5, 5, 2
    assert sorted(len(p) for p in pieces) == [2] * 3 + [5] * 6


def test_real_set_several_sizes_equal_kernels(real):
    ds = open_particles(real / SELECT, chunks=50)
    assert ds.sizes["particle"] == 284 and ds["images"].data.numblocks[0] == 6
    outs = ops.downsample(ds, fourier_box=[64, 32], lowpass=8.0, recenter=True, micrograph_pixel_size=0.7)
    psize = ds["pixel_size"].values
    shifts = np.stack([ds["shift_x"].values, ds["shift_y"].values], axis=1) / psize[:, None]
    want = kernels.downsample(ds["images"].values, [64, 32], pixel_size=2.8, lowpass=8.0, shifts=shifts)
    computed = dask.compute(*(o["images"] for o in outs))
    for got, w in zip(computed, want):
        np.testing.assert_allclose(got.values, w, rtol=0, atol=1e-5 * float(w.std()))


def test_target_pixel_size_gives_nearest_even_box(real):
    ds = open_particles(real / SELECT)
    out = ops.fourier_crop(ds, pixel_size=5.6)
    assert isinstance(out, xr.Dataset) and out.sizes["x"] == 64
    assert out["pixel_size"].dtype == np.float64 and (out["pixel_size"].values == 2.8 * 128 / 64).all()
    several = ops.fourier_crop(ds, pixel_size=[3.0, 5.6])
    assert isinstance(several, list) and [o.sizes["x"] for o in several] == [120, 64]
    assert [o.sizes["x"] for o in ops.fourier_crop(ds, [48])] == [48]  # a list of one is still a list


# --- nothing is read at build time --------------------------------------------------------------

def test_building_reads_nothing(tmp_path):
    star, _ = simple_set(tmp_path / "p")
    ds = open_particles(star, chunks=3)
    for stack in (tmp_path / "p" / "Extract").glob("*.mrcs"):
        os.truncate(stack, 1024)  # the header only: every image is gone
    with pytest.raises(ParticleError, match="shorter than its header says"):
        open_particles(star)  # opening again checks the stacks, so they are really broken
    mic = {"micrograph_pixel_size": 1.0}
    built = [ops.crop(ds, 8), ops.fourier_crop(ds, 8), ops.lowpass(ds, 4.0), ops.recenter(ds, **mic),
             *ops.downsample(ds, crop_box=12, fourier_box=[8, 6], lowpass=5.0, recenter=True, **mic)]
    for out in built:
        assert out["box"].values[0] == out.sizes["x"]  # metadata are ready without any pixel
        with pytest.raises(ParticleError, match="ended early"):
            out["images"].values


# --- metadata -----------------------------------------------------------------------------------

def test_metadata_updated_and_everything_else_kept(real):
    ds = open_particles(real / SELECT, chunks=50)
    before = ds.copy(deep=True)
    outs = ops.downsample(ds, crop_box=100, fourier_box=[64, 50], recenter=True, micrograph_pixel_size=0.7)
    changed = ["pixel_size", "box", "shift_x", "shift_y", "coord_x", "coord_y"]
    pixels = ["y", "x"]  # the images and anything on their pixel grid, which the new box replaces
    psize = ds["pixel_size"].values
    mic = 0.7  # given: the file has only rlnMicrographOriginalPixelSize, the movies' pixel size
    for out, b in zip(outs, [64, 50]):
        assert out.sizes["x"] == out.sizes["y"] == b
        assert out["pixel_size"].dtype == np.float64
        np.testing.assert_array_equal(out["pixel_size"].values, psize * 100 / b)  # float64, exact
        assert out["box"].dtype == np.int64 and (out["box"].values == b).all()
        assert (out["shift_x"].values == 0).all() and (out["shift_y"].values == 0).all()
        for axis in "xy":
            np.testing.assert_allclose(out[f"coord_{axis}"].values,
                                       ds[f"coord_{axis}"].values - ds[f"shift_{axis}"].values / mic, rtol=1e-15)
        kept, before_kept = out.drop_vars(changed).drop_dims(pixels), ds.drop_vars(changed).drop_dims(pixels)
        xr.testing.assert_equal(kept, before_kept)
        assert set(kept.coords) == set(before_kept.coords)  # stack_path, image_index, ...: the sources stay known
        assert out.attrs == ds.attrs | {"micrograph_pixel_size_from": "--micrograph-pixel-size"}
    assert ds.attrs == before.attrs
    xr.testing.assert_identical(ds.drop_vars("images"), before.drop_vars("images"))  # the input is untouched


def test_crop_keeps_pixel_size_and_shifts(real):
    ds = open_particles(real / SELECT)
    out = ops.crop(ds, 96)
    assert (out["box"].values == 96).all() and "micrograph_pixel_size_from" not in out.attrs
    for name in ("pixel_size", "shift_x", "shift_y", "coord_x", "coord_y"):
        np.testing.assert_array_equal(out[name].values, ds[name].values)


# (coordinates added to the real file, argument, label of the evidence used, its value)
EVIDENCE = [
    ({"cs:location.micrograph_psize_A": 1.3}, None, "location/micrograph_psize_A", 1.3),
    ({"star:rlnMicrographPixelSize": 1.4, "cs:location.micrograph_psize_A": 1.3}, None, "rlnMicrographPixelSize", 1.4),
    ({"star_optics:rlnMicrographPixelSize": 1.5, "star:rlnMicrographPixelSize": 1.4}, None,
     "rlnMicrographPixelSize", 1.5),
    ({"star_optics:rlnMicrographPixelSize": 1.5}, 2.0, "--micrograph-pixel-size", 2.0),
    ({}, 0.7, "--micrograph-pixel-size", 0.7),
]


@pytest.mark.parametrize("added, argument, source, value", EVIDENCE)
def test_micrograph_pixel_size_best_evidence_first(real, added, argument, source, value):
    ds = open_particles(real / SELECT)
    ds = ds.assign_coords({k: ("particle", np.full(ds.sizes["particle"], v)) for k, v in added.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the pixel size of the micrographs is known
        out = ops.recenter(ds, micrograph_pixel_size=argument)
    assert out.attrs["micrograph_pixel_size_from"] == source
    np.testing.assert_allclose(out["coord_x"].values, ds["coord_x"].values - ds["shift_x"].values / value,
                               rtol=1e-15)


@pytest.mark.parametrize("added", [{}, {"star:rlnMicrographOriginalPixelSize": 0.9}])
def test_movie_pixel_size_is_no_evidence(real, added):
    """rlnMicrographOriginalPixelSize is the movies' (motion correction may bin): with coordinates to
    move and nothing about the micrographs, recentring is refused, whatever the particle pixel size."""
    ds = open_particles(real / SELECT)
    ds = ds.assign_coords({k: ("particle", np.full(ds.sizes["particle"], v)) for k, v in added.items()})
    with pytest.raises(ParticleError, match=r"give no micrograph pixel size .*rlnMicrographOriginalPixelSize 0.7 Å "
                                            r"is the movies'.*give --micrograph-pixel-size$"):
        ops.downsample(ds, fourier_box=[64, 32], recenter=True)
    assert "micrograph_pixel_size_from" not in ops.recenter(ds.drop_vars(["coord_x", "coord_y"])).attrs
    # a second recentring without coordinates does not keep what the first one said of them
    once = ops.recenter(ds, micrograph_pixel_size=0.7).drop_vars(["coord_x", "coord_y"])
    assert once.attrs["micrograph_pixel_size_from"] == "--micrograph-pixel-size"
    assert "micrograph_pixel_size_from" not in ops.recenter(once).attrs


# --- argument errors, before any graph ----------------------------------------------------------

ERRORS = [
    (lambda ds: ops.crop(ds, 1), "crop box must be a whole number of pixels of at least 2, got 1"),
    (lambda ds: ops.crop(ds, 12.0), "got 12.0"),
    (lambda ds: ops.crop(ds, True), "got True"),
    (lambda ds: ops.fourier_crop(ds, 0), "Fourier box must be a whole number of pixels of at least 2, got 0"),
    (lambda ds: ops.fourier_crop(ds, [8, 7.5]), "got 7.5"),
    (lambda ds: ops.fourier_crop(ds, []), "empty list"),
    (lambda ds: ops.fourier_crop(ds, [8, 10, 8]), "box 8 is asked for twice; give each output size once"),
    (lambda ds: ops.fourier_crop(ds, 200000), "Fourier box 200000 is more than 4 times the box 16"),
    (lambda ds: ops.fourier_crop(ds), "give a Fourier box or a target pixel size"),
    (lambda ds: ops.fourier_crop(ds, 8, pixel_size=2.0), "not both"),
    (lambda ds: ops.fourier_crop(ds, pixel_size=0), "target pixel size must be greater than 0 Å, got 0"),
    (lambda ds: ops.fourier_crop(ds, pixel_size=[3.0, -1.0]), "got -1.0"),
    (lambda ds: ops.fourier_crop(ds, pixel_size=float("nan")), "got nan"),
    (lambda ds: ops.fourier_crop(ds, pixel_size=3.0), r"give different boxes \[8, 10\] for 3.0 Å"),
    (lambda ds: ops.lowpass(ds, 0), "lowpass must be a finite resolution in Å greater than 0, got 0"),
    (lambda ds: ops.lowpass(ds, -4.0), "got -4.0"),
    (lambda ds: ops.lowpass(ds, float("inf")), "got inf"),
    (lambda ds: ops.lowpass(ds, "8"), "got '8'"),
    (lambda ds: ops.recenter(ds, micrograph_pixel_size=0.0),
     "micrograph pixel size must be greater than 0 Å, got 0.0"),
    (lambda ds: ops.recenter(ds.drop_vars("shift_x")), "--recenter needs aligned shifts"),
    (lambda ds: ops.downsample(ds.drop_vars("images"), fourier_box=8), "no images"),
]


@pytest.mark.parametrize("call, message", ERRORS)
def test_bad_arguments_refused_before_any_graph(tmp_path, monkeypatch, call, message):
    star, _ = simple_set(tmp_path / "p", pixel_sizes=(1.5, 2.0))
    ds = open_particles(star, chunks=5)
    monkeypatch.setattr(ops, "da", None)  # any dask call would now fail with something other than ParticleError
    with pytest.raises(ParticleError, match=message):
        call(ds)


def test_recenter_refused_without_poses(tmp_path):
    star, _ = simple_set(tmp_path / "p")
    ds = open_particles(star, ignore_pose=True)
    with pytest.raises(ParticleError, match="--recenter needs aligned shifts .* these particles have none"):
        ops.recenter(ds)
    with pytest.raises(ParticleError, match="needs aligned shifts"):
        ops.downsample(ds, fourier_box=[8, 6], recenter=True)


def test_non_finite_shift_names_the_particle(tmp_path):
    star, _ = simple_set(tmp_path / "p")
    ds = open_particles(star)
    shift = ds["shift_x"].values.copy()
    shift[4] = np.nan
    with pytest.raises(ParticleError, match="particle 5: shift"):
        ops.recenter(ds.assign_coords(shift_x=("particle", shift)), micrograph_pixel_size=1.0)


# --- several sizes: one read, one forward FFT per image --------------------------------------------

def test_several_sizes_share_one_read_and_fft_in_the_graph(real):
    ds = open_particles(real / SELECT, chunks=50)
    a, b = ops.downsample(ds, fourier_box=[64, 32])
    la, lb = a["images"].data.dask.layers, b["images"].data.dask.layers
    assert len(set(la) ^ set(lb)) == 2  # only the two picks differ
    graph = dict(a["images"].data.dask) | dict(b["images"].data.dask)  # the graph computing both runs
    names = [key[0] for key in graph]
    reads = [n for n in names if n.startswith("particles-")]
    passes = [n for n in names if n.startswith("downsample-") and not n.startswith("downsample-box")]
    assert len(reads) == len(passes) == 6  # one per chunk, for both sizes
    assert sum(n.startswith("downsample-box64-") for n in names) == sum(n.startswith("downsample-box32-")
                                                                        for n in names) == 6


def test_several_sizes_run_the_kernel_once_per_chunk(real, monkeypatch):
    ds = open_particles(real / SELECT, chunks=50)
    calls: list[tuple[int, tuple]] = []
    downsample = kernels.downsample

    def counting(images, out_boxes, **kwargs):
        calls.append((len(images), tuple(out_boxes)))
        return downsample(images, out_boxes, **kwargs)

    monkeypatch.setattr(kernels, "downsample", counting)  # only to count calls
    a, b = ops.downsample(ds, fourier_box=[64, 32])
    got = dask.compute(a["images"], b["images"], scheduler="sync")
    assert len(calls) == 6 and sum(n for n, _ in calls) == 284 and {boxes for _, boxes in calls} == {(64, 32)}
    want = downsample(ds["images"].values, [64, 32], pixel_size=2.8)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.values, w, rtol=0, atol=1e-5 * float(w.std()))
    calls.clear()
    a["images"].data.compute(scheduler="sync")  # computed apart, each size pays its own pass
    b["images"].data.compute(scheduler="sync")
    assert len(calls) == 12
