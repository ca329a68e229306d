"""The format engines and their registry (``dparticles.formats``): every engine is picked for its own
inputs, and every engine goes through the same read -> write -> read suite (as xarray's
``DatasetIOBase`` does for its backends): the images come back byte for byte and every metadata
column the format carries comes back as it was. A bare ``.mrcs`` stack is a particle source."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import xarray as xr
from helpers import REAL, read_direct, simple_set, star_images

import dparticles
from dparticles import formats
from dparticles.cli import main

HAND = REAL / "cryodrgn" / "hand.mrcs"  # EMAN stack, 100 x 64 x 64, header pixel size 1 Å
RIBO = REAL / "relion31_sim_ribo70S_b128"
NO_PIXEL_SIZE = RIBO / "Extract" / "job007" / "Movies" / "20240311_FoilHole_0001_fractions.mrcs"  # cell 0
ANISOTROPIC = REAL / "cryojax" / "000000.mrcs"
SELECT = RIBO / "Select" / "job010" / "particles.star"  # 284 of 400 particles, stacks relative to RIBO  # voxel 1 Å along x, 12 Å along y


@pytest.mark.parametrize("path, name", [
    (RIBO / "Select" / "job010" / "particles.star", "relion"),
    (REAL / "cryodrgn" / "empiar_10076_7" / "empiar_10076_7.cs", "cryosparc"),
    (HAND, "mrc"),
    (REAL / "cryodrgn" / "empiar_10076_7" / "empiar_10076_7.mrc", "mrc"),
    (REAL / "mrcfile" / "EMD-3197.map", None),
    (REAL / "README.md", None),
])
def test_the_registry_picks_the_engine_of_each_input(path, name):
    engine = formats.engine_for(formats.resolve(path))
    assert (engine.NAME if engine else None) == name
    assert xr.backends.list_engines()["dparticles"].guess_can_open(path) == (name is not None)


def test_an_output_folder_and_a_cache_are_opened_by_what_they_hold(tmp_path):
    star, _ = simple_set(tmp_path / "p")
    dparticles.restack(star, tmp_path / "out", zarr=tmp_path / "c.zarr", log=lambda m: None)
    assert formats.resolve(tmp_path / "out") == tmp_path / "out" / "particles.star"
    assert formats.engine_for(formats.resolve(tmp_path / "c.zarr")).NAME == "zarr"
    (tmp_path / "empty").mkdir()
    with pytest.raises(dparticles.ParticleError, match="folder holds no particles.star, particles.cs or zarr cache"):
        dparticles.open_particles(tmp_path / "empty")


# --- a bare stack --------------------------------------------------------------------------------

def test_a_bare_stack_opens_with_its_header_pixel_size_and_restacks_bit_for_bit(tmp_path, capsys):
    ds = dparticles.open_particles(HAND)
    assert ds.sizes["particle"] == 100 and ds.sizes["x"] == 64 and ds.attrs["format"] == "mrc"
    with mrcfile.open(HAND, permissive=True, header_only=True) as mrc:
        assert float(ds["pixel_size"][0]) == float(mrc.voxel_size.x) == 1.0
    assert ds["image_index"].values.tolist() == list(range(100))
    assert main(["info", str(HAND)]) == 0 and "100 in use of 100 on disk" in capsys.readouterr().out
    result = dparticles.restack(HAND, tmp_path / "r", batch_size=40, log=lambda m: None)
    assert result.copied and result.n_files == 3  # bytes moved, never decoded
    written = starfile.read(tmp_path / "r" / "particles.star", always_dict=True)
    assert len(written["particles"]) == 100 and float(written["optics"]["rlnImagePixelSize"][0]) == 1.0
    again = np.concatenate([read_direct(p) for p in sorted((tmp_path / "r" / "stacks").glob("*.mrcs"))])
    assert again.tobytes() == read_direct(HAND).tobytes()


@pytest.mark.parametrize("stack, why", [
    (NO_PIXEL_SIZE, "it gives none (cell size or sampling 0)"),
    (ANISOTROPIC, "its x and y pixel sizes differ (1 and 12 Å)"),
])
def test_a_bare_stack_without_one_pixel_size_asks_for_it(tmp_path, capsys, stack, why):
    code = main(["restack", str(stack), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0] == (f"dparticles restack: error: {stack}: the stack header gives no pixel size to use: {why}; "
                      "give --pixel-size")
    assert not (tmp_path / "r").exists()
    assert main(["-q", "restack", str(stack), "--out", str(tmp_path / "r"), "--pixel-size", "2.8"]) == 0
    assert float(dparticles.open_particles(tmp_path / "r")["pixel_size"][0]) == 2.8


# --- every engine through one round-trip suite -----------------------------------------------------

KEPT_ASIDE = {"image_name", "image_index", "image_path", "stack_id", "stack_path", "stack_images", "stack_offset",
              "stack_dtype", "x", "y", "particle"}  # where the images are: what a write changes


class RoundTrip:
    """Read a real input of the engine, write it in the same format, read that: the same images and
    the same metadata."""

    engine: str

    def source(self, tmp_path: Path) -> Path:
        raise NotImplementedError

    def write(self, ds: xr.Dataset, tmp_path: Path) -> Path:
        """Write ``ds`` in this engine's format; the path to read it back from."""
        raise NotImplementedError

    def reference(self) -> np.ndarray:
        """The source's images read without dparticles (starfile and mrcfile)."""
        return star_images(SELECT, RIBO)

    def test_read_write_read(self, tmp_path):
        source = self.source(tmp_path)
        assert formats.engine_for(formats.resolve(source)).NAME == self.engine
        ds = dparticles.open_particles(source)
        assert ds["images"].values.tobytes() == self.reference().tobytes()  # read as an independent reader reads it
        back = self.write(ds, tmp_path)
        assert formats.engine_for(formats.resolve(back)).NAME == self.engine
        again = dparticles.open_particles(back)
        assert again["images"].values.tobytes() == ds["images"].values.tobytes()
        assert again["images"].dtype == ds["images"].dtype
        names = [n for n in ds.coords if ds[n].dims == ("particle",) and n not in KEPT_ASIDE]
        assert names and not set(names) - set(again.coords), set(names) - set(again.coords)
        for name in names:
            a, b = ds[name].values, again[name].values
            if a.dtype.kind == "f":
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                assert a.astype(str).tolist() == b.astype(str).tolist(), name


class TestRelion(RoundTrip):
    engine = "relion"

    def source(self, tmp_path):
        return SELECT

    def write(self, ds, tmp_path):
        dparticles.to_stacks(ds, tmp_path / "out", batch_size=100, log=lambda m: None)
        return tmp_path / "out" / "particles.star"


class TestCryosparc(RoundTrip):
    engine = "cryosparc"

    def source(self, tmp_path):
        return REAL / "cryodrgn" / "empiar_10076_7" / "empiar_10076_7.cs"

    def reference(self):
        return read_direct(REAL / "cryodrgn" / "empiar_10076_7" / "empiar_10076_7.mrc")  # blob/idx 0..6 in order

    def write(self, ds, tmp_path):
        dparticles.to_stacks(ds, tmp_path / "out", batch_size=3, log=lambda m: None)
        return tmp_path / "out" / "particles.cs"


class TestZarr(RoundTrip):
    engine = "zarr"

    def source(self, tmp_path):
        dparticles.restack(SELECT, None, zarr=tmp_path / "in.zarr",
                           log=lambda m: None)
        return tmp_path / "in.zarr"

    def write(self, ds, tmp_path):
        dparticles.to_stacks(ds, None, zarr=tmp_path / "out.zarr", log=lambda m: None)
        return tmp_path / "out.zarr"


class TestMrc(RoundTrip):
    engine = "mrc"

    def source(self, tmp_path):
        return HAND

    def reference(self):
        return read_direct(HAND)

    def write(self, ds, tmp_path):
        dparticles.to_stacks(ds, tmp_path / "out", batch_size=1000, log=lambda m: None)
        return tmp_path / "out" / "stacks" / "batch_000000.mrcs"  # a stack we wrote, opened bare
