"""xarray opens particle sets itself: ``xr.open_dataset(path, engine="dparticles")`` (or with the
engine guessed from the file) gives what ``open_particles`` gives, lazily."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

import dparticles

SELECT = "relion31_sim_ribo70S_b128/Select/job010/particles.star"
CS = "cryodrgn/empiar_10076_7/empiar_10076_7.cs"


def test_open_dataset_with_the_engine_equals_open_particles(real):
    for rel in (SELECT, CS):
        got = xr.open_dataset(real / rel, engine="dparticles")
        want = dparticles.open_particles(real / rel)
        assert isinstance(got["images"].data, da.Array)  # nothing read yet
        assert got.sizes == want.sizes and set(got.coords) == set(want.coords)
        np.testing.assert_array_equal(got["images"][:4].values, want["images"][:4].values)
        np.testing.assert_array_equal(got["defocus_u"].values, want["defocus_u"].values)


def test_engine_is_guessed_and_takes_open_options(real, tmp_path):
    ds = xr.open_dataset(real / SELECT, pixel_size=3.0, drop_variables=["angle_rot"], particle_chunks=10)
    assert (ds["pixel_size"].values == 3.0).all() and "angle_rot" not in ds
    assert ds["images"].data.chunks[0][0] == 10
    dparticles.restack(real / SELECT, tmp_path / "out", batch_size=100, cluster={"n_workers": 1}, log=lambda *_: None)
    folder = xr.open_dataset(tmp_path / "out")  # a dparticles output folder
    np.testing.assert_array_equal(folder["images"].values, dparticles.open_particles(real / SELECT)["images"].values)


def test_plain_xarray_opens_a_zarr_cache_without_warnings(real, tmp_path):
    import warnings
    dparticles.restack(real / SELECT, None, zarr=tmp_path / "c.zarr", cluster={"n_workers": 1}, log=lambda *_: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = xr.open_zarr(tmp_path / "c.zarr")
    np.testing.assert_array_equal(z["images"].values, dparticles.open_particles(real / SELECT)["images"].values)


def test_coordinates_carry_units_through_transforms(real):
    ds = dparticles.open_particles(real / SELECT)
    small = dparticles.ops.downsample(ds, fourier_box=64, recenter=True, micrograph_pixel_size=0.7)
    for d in (ds, small):
        assert d["defocus_u"].attrs["units"] == "angstrom" and d["pixel_size"].attrs["units"] == "angstrom"
        assert d["shift_x"].attrs["units"] == "angstrom" and d["coord_x"].attrs["units"] == "pixel"
        assert d["angle_rot"].attrs["units"] == "degree" and d["voltage"].attrs["units"] == "kV"
