"""open_particles over every real particle file and over generated sets: metadata, images against
direct mrcfile reads, path resolution, units, round trips, 64-bit offsets and laziness."""

from __future__ import annotations

import os

import pickle
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from dask.array.utils import assert_eq
from helpers import image_names, make_stack, optics_table, read_direct, simple_set, write_star

from dparticles.dataset import open_particles, table
from dparticles.errors import ParticleError
from dparticles.formats.cryosparc import write_cs
from dparticles.formats.mrc import stack_header
from dparticles.formats.cryosparc import euler_from_matrix, expmap, logmap, matrix_from_euler
from dparticles.store import write_metadata

SIM = "relion31_sim_ribo70S_b128"
TOY = "cryodrgn/toy_dir"
# every particle-describing file of the real set: how it must open (options, particles) or the words of its refusal
OPENS = {
    "aspire/rln_proj_64_centered.star": ({}, 4),
    "aspire/rln_proj_64_shifted.star": ({}, 4),
    "cryodrgn/empiar_10076_7/empiar_10076_7.cs": ({}, 7),
    "cryodrgn/empiar_10076_7/empiar_10076_7.star": ({}, 7),
    "cryodrgn/relion31/relion31.star": ({}, 5),
    "cryodrgn/relion31/relion31.v2.star": ({}, 5),
    "cryojax/test_starfile.star": ({}, 3),
    f"{SIM}/Extract/job007/particles.star": ({}, 400),
    f"{SIM}/Select/job010/particles.star": ({}, 284),
    "aspire/rln_proj_64.star": ({"pixel_size": 1.0}, 5),
    f"{TOY}/toy_projections_dir.star": ({"pixel_size": 1.0, "data_dir": f"{TOY}/toy_datadir"}, 1000),
    f"{SIM}/relion_project_input/ang_all.star": ({"ignore_raw": True}, 400),
}
REFUSED = {
    "aspire/rln_proj_64.star": ["data_optics", "pixel size", "--pixel-size"],
    f"{TOY}/toy_projections_dir.star": ["no pixel size", "--pixel-size"],
    "cryodrgn/cryosparc/cryosparc_J2_particles_exported.cs": ["J1/imported/", "not found", "tried", "--data-dir"],
    f"{SIM}/relion_project_input/ang_all.star": ["no image column", "rlnImageName", "--ignore-raw"],
    "starfile/empty_loop.star": ["no particles"],
    "starfile/loop_double_quote.star": ["no particle table", "rlnImageName"],
    "starfile/postprocess.star": ["no particle table", "data_general", "data_particles"],
    "starfile/two_single_line_loop_blocks.star": ["no particle table", "data_block_0"],
    "starfile/rln3.1_data_style.star": ["several blocks", "data_block_2", "data_block_3"],
    "starfile/one_loop.star": ["tomo_ts01.mrc_0000000_5.00A.mrc", "not found", "tried"],
}


def _all_metadata_files(real: Path) -> set[str]:
    return {p.relative_to(real).as_posix() for p in real.rglob("*") if p.suffix in (".star", ".cs")}


def _options(real: Path, options: dict) -> dict:
    return {k: (real / v if k == "data_dir" else v) for k, v in options.items()}


def test_every_real_metadata_file_is_covered(real):
    assert _all_metadata_files(real) == set(OPENS) | set(REFUSED)


@pytest.mark.parametrize("name", sorted(OPENS))
def test_real_file_opens(real, name):
    options, n = OPENS[name]
    ds = open_particles(real / name, **_options(real, options))
    assert ds.sizes["particle"] == n
    if not options.get("ignore_raw"):
        assert ds["images"].shape[0] == n and ds.sizes["y"] == ds.sizes["x"]
        assert (ds["pixel_size"].values > 0).all()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_real_file_refused_with_clear_message(real, name):
    with pytest.raises(ParticleError) as err:
        open_particles(real / name)
    message = str(err.value)
    assert str(real / name) in message, message
    for words in REFUSED[name]:
        assert words in message, (words, message)
    assert "\n" not in message


def _expected_images(real: Path, star: str, root: str) -> np.ndarray:
    """Images of a STAR file read independently: starfile for names, mrcfile for pixels."""
    import starfile

    blocks = starfile.read(real / star, always_dict=True)
    names = next(b for b in blocks.values() if isinstance(b, pd.DataFrame) and "rlnImageName" in b)["rlnImageName"]
    cache: dict[str, np.ndarray] = {}
    out = []
    for name in names:
        index, stack = name.split("@")
        if stack not in cache:
            cache[stack] = read_direct(real / root / stack)
        out.append(cache[stack][int(index) - 1])
    return np.stack(out)


@pytest.mark.parametrize("star, root, options", [
    ("cryodrgn/relion31/relion31.star", "cryodrgn/relion31", {}),  # no MAP id in the header
    ("cryodrgn/relion31/relion31.v2.star", "cryodrgn/relion31", {}),  # optics block after particles
    ("cryodrgn/empiar_10076_7/empiar_10076_7.star", "cryodrgn/empiar_10076_7", {}),  # ispg 1 volume header
    ("aspire/rln_proj_64_centered.star", "aspire", {}),  # mz = 1
    ("aspire/rln_proj_64_shifted.star", "aspire", {}),
    ("aspire/rln_proj_64.star", "aspire", {"pixel_size": 1.0}),
    ("cryojax/test_starfile.star", "cryojax", {}),
    (f"{TOY}/toy_projections_dir.star", f"{TOY}/toy_datadir", {"pixel_size": 1.0, "data_dir": f"{TOY}/toy_datadir"}),
    (f"{SIM}/Extract/job007/particles.star", SIM, {}),  # paths relative to the project directory
    (f"{SIM}/Select/job010/particles.star", SIM, {}),
])
def test_real_images_equal_direct_reads(real, star, root, options):
    ds = open_particles(real / star, **_options(real, options))
    expected = _expected_images(real, star, root)
    assert ds["images"].dtype == expected.dtype
    np.testing.assert_array_equal(ds["images"].values, expected)


def test_toy_dir_crosses_two_stacks_in_metadata_order(real):
    ds = open_particles(real / TOY / "toy_projections_dir.star", pixel_size=1.0, data_dir=real / TOY / "toy_datadir")
    names = ds["image_name"].values
    assert names[0] == "toy_images_b.mrcs" and names[-1] == "toy_images_a.mrcs"
    assert ds.sizes["stack"] == 2
    a = read_direct(real / TOY / "toy_datadir" / "toy_images_a.mrcs")
    b = read_direct(real / TOY / "toy_datadir" / "toy_images_b.mrcs")
    np.testing.assert_array_equal(ds["images"][:900].values, b)
    np.testing.assert_array_equal(ds["images"][900:].values, a)
    assert "star:_dummyVariable" in ds.coords or "star:dummyVariable" in ds.coords


def test_toy_dir_without_data_dir_lists_tried_places(real):
    with pytest.raises(ParticleError, match=r"particle \d+: image stack 'toy_images_[ab].mrcs' not found; tried .*toy_dir/toy_images_[ab].mrcs.*--data-dir"):
        open_particles(real / TOY / "toy_projections_dir.star", pixel_size=1.0)


def test_select_uses_only_particles_in_use(real):
    ds = open_particles(real / SIM / "Select/job010/particles.star")
    assert ds.sizes["particle"] == 284 and ds.sizes["stack"] == 20
    assert int(ds["stack_images"].sum()) == 400
    in_use = np.bincount(ds["stack_id"].values, minlength=20)
    order = np.argsort([Path(p).name for p in ds["stack_path"].values])
    assert in_use[order].tolist() == [14, 18, 15, 14, 14, 8, 19, 17, 13, 20, 17, 5, 12, 13, 26, 7, 7, 3, 37, 5]
    assert ds["images"].nbytes == 284 * 128 * 128 * 4
    np.testing.assert_allclose(ds["pixel_size"].values, 2.8)
    assert set(ds["class_number"].values) <= set(range(1, 9))
    full = open_particles(real / SIM / "Extract/job007/particles.star")
    assert full.sizes["particle"] == 400 and set(full["class_number"].values) == set(range(1, 13))


def test_star_and_cs_of_the_same_particles_agree(real):
    folder = real / "cryodrgn/empiar_10076_7"
    s = open_particles(folder / "empiar_10076_7.star")
    c = open_particles(folder / "empiar_10076_7.cs")
    np.testing.assert_array_equal(s["images"].values, c["images"].values)
    np.testing.assert_array_equal(s["images"].values, read_direct(folder / "empiar_10076_7.mrc"))
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "pixel_size"):
        np.testing.assert_allclose(s[name].values.astype(np.float64), c[name].values.astype(np.float64),
                                   rtol=2e-7, err_msg=name)
    np.testing.assert_allclose(s["pixel_size"].values, 1e4 * 5 / 38168)
    assert (s["image_index"].values == c["image_index"].values).all()
    assert (c["sign"].values == -1).all()  # blob/sign of the .cs is kept


def test_pixel_origins_inside_a_31_file_become_angstrom(real):
    ds = open_particles(real / "aspire/rln_proj_64_shifted.star")
    np.testing.assert_allclose(ds["shift_x"].values, [6.0, 10.0, -8.0, -13.0])
    np.testing.assert_allclose(ds["shift_y"].values, [10.0, -5.0, 11.0, -3.0])


def test_relion30_pixel_size_and_origins(tmp_path):
    make_stack(tmp_path / "s.mrcs", 3, 16)
    p = {"rlnImageName": image_names(range(3), "s.mrcs"), "rlnOriginX": [1.0, -2.0, 0.5],
         "rlnOriginY": [0.0, 3.0, -1.0], "rlnDetectorPixelSize": [5.0] * 3, "rlnMagnification": [25000.0] * 3,
         "rlnVoltage": [300] * 3, "rlnDefocusU": [1e4] * 3}
    ds = open_particles(write_star(tmp_path / "a.star", p, particle_block=""))
    assert ds.attrs["format"] == "relion-3.0"
    np.testing.assert_allclose(ds["pixel_size"].values, 2.0)
    np.testing.assert_allclose(ds["shift_x"].values, [2.0, -4.0, 1.0])
    np.testing.assert_allclose(ds["shift_y"].values, [0.0, 6.0, -2.0])
    assert ds["voltage"].dtype == np.float64 and ds["defocus_u"].dtype == np.float64
    # rlnImagePixelSize wins in a 3.0 table; pixel origins wait for an override when there is no pixel size
    p2 = {k: v for k, v in p.items() if k not in ("rlnDetectorPixelSize", "rlnMagnification")}
    ds = open_particles(write_star(tmp_path / "b.star", p2 | {"rlnImagePixelSize": [1.25] * 3}))
    np.testing.assert_allclose(ds["shift_x"].values, [1.25, -2.5, 0.625])
    ds = open_particles(write_star(tmp_path / "c.star", p2), pixel_size=3.0)
    np.testing.assert_allclose(ds["shift_x"].values, [3.0, -6.0, 1.5])


def test_several_optics_groups_keep_their_pixel_sizes(tmp_path):
    star, images = simple_set(tmp_path, n_stacks=3, per_stack=4, pixel_sizes=(1.1, 2.2, 0.85))
    ds = open_particles(star)
    groups = ds["optics_group"].values
    assert groups.tolist() == [1, 2, 3] * 4
    np.testing.assert_allclose(ds["pixel_size"].values, np.array([1.1, 2.2, 0.85])[groups - 1])
    np.testing.assert_array_equal(ds["images"].values, images)


@pytest.mark.parametrize("variant", ["optics_last", "unnamed_block", "tabs", "quoted", "one_row"])
def test_odd_but_valid_star_layouts(tmp_path, variant):
    n = 1 if variant == "one_row" else 4
    images = make_stack(tmp_path / "my stacks" / "s.mrcs" if variant == "quoted" else tmp_path / "s.mrcs", n, 16)
    stack = "my stacks/s.mrcs" if variant == "quoted" else "s.mrcs"
    p = {"rlnImageName": image_names(range(n), stack), "rlnOpticsGroup": [1] * n,
         "rlnMicrographName": ["mic a.mrc" if variant == "quoted" else "mic.mrc"] * n}
    if variant == "unnamed_block":
        p |= {"rlnImagePixelSize": [1.5] * n}
        star = write_star(tmp_path / "p.star", {k: v for k, v in p.items() if k != "rlnOpticsGroup"},
                          particle_block="")
    else:
        star = write_star(tmp_path / "p.star", p, optics_table([1.5], 16), optics_first=variant != "optics_last",
                          sep="\t" if variant == "tabs" else " ")
    if variant == "quoted":  # names holding a space are written double-quoted
        assert '"000001@my stacks/s.mrcs"' in star.read_text()
    ds = open_particles(star)
    np.testing.assert_allclose(ds["pixel_size"].values, 1.5)
    np.testing.assert_array_equal(ds["images"].values, images)
    if variant == "quoted":
        assert ds["micrograph"].values[0] == "mic a.mrc"


# --- round trips -------------------------------------------------------------------------------

def _roundtrip(ds, out: Path):
    out.mkdir()
    paths = np.array([Path(os.path.relpath(p, out)).as_posix() for p in ds["image_path"].values], dtype=object)
    write_metadata(out, ds, paths, ds["image_index"].values, cs=True)
    return open_particles(out / "particles.star"), open_particles(out / "particles.cs")


def _same_metadata(a: pd.DataFrame, b: pd.DataFrame, columns) -> None:
    for c in columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if c == "image_path":
            x, y = [Path(v).resolve() for v in x], [Path(v).resolve() for v in y]
            assert x == y
        elif x.dtype.kind in "fiu" and y.dtype.kind in "fiu":
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-6, atol=1e-4, err_msg=c)
        else:
            assert x.astype(str).tolist() == y.astype(str).tolist(), c


def test_roundtrip_star_keeps_metadata_and_passthrough_columns(real, tmp_path):
    ds = open_particles(real / SIM / "Select/job010/particles.star")
    s, c = _roundtrip(ds, tmp_path / "out")
    a, b = table(ds), table(s)
    passthrough = [k for k in a.columns if k.startswith(("star:", "star_optics:"))]
    assert "star:rlnCtfBfactor" in passthrough and "star_optics:rlnMicrographOriginalPixelSize" in passthrough
    canonical = [k for k in a.columns if k in b.columns and not k.startswith(("star", "cs:"))
                 and k not in ("stack_id", "image_name")]
    _same_metadata(a, b, canonical + passthrough)
    np.testing.assert_array_equal(s["images"].values, ds["images"].values)
    np.testing.assert_array_equal(c["images"].values, ds["images"].values)
    shared = ["defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "pixel_size", "box",
              "shift_x", "shift_y", "class_number", "optics_group", "micrograph", "image_index"]
    _same_metadata(a, table(c), shared)
    # angles survive the axis-angle round trip as rotations (Euler triplets may differ at gimbal lock)
    for t in (table(s), table(c)):
        m0 = matrix_from_euler(a["angle_rot"], a["angle_tilt"], a["angle_psi"])
        m1 = matrix_from_euler(t["angle_rot"], t["angle_tilt"], t["angle_psi"])
        np.testing.assert_allclose(m0, m1, atol=1e-5)


def test_roundtrip_cs_keeps_passthrough_fields(real, tmp_path):
    ds = open_particles(real / "cryodrgn/empiar_10076_7/empiar_10076_7.cs")
    s, c = _roundtrip(ds, tmp_path / "out")
    a, b = table(ds), table(c)
    passthrough = [k for k in a.columns if k.startswith("cs:")]
    assert "cs:ctf.type" in passthrough and "cs:ctf.anisomag[3]" in passthrough
    _same_metadata(a, b, [k for k in a.columns if k not in ("image_path", "image_name", "stack_id")])
    _same_metadata(a, table(s), ["defocus_u", "defocus_v", "defocus_angle", "pixel_size", "voltage", "sign"])
    np.testing.assert_array_equal(c["images"].values, ds["images"].values)


# --- CryoSPARC .cs -----------------------------------------------------------------------------

def _cs(tmp_path: Path, n: int, kind: str | None = "alignments3D", pose=None, shift=None) -> Path:
    make_stack(tmp_path / "J1" / "imported" / "stack.mrcs", n, 16)
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/df1_A", "<f4")]
    if kind == "alignments3D":
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/psize_A", "<f4"), ("alignments3D/class", "<u4")]
    elif kind == "alignments2D":
        fields += [("alignments2D/pose", "<f4"), ("alignments2D/shift", "<f4", (2,)), ("alignments2D/psize_A", "<f4")]
    data = np.zeros(n, dtype=fields)
    data["uid"] = np.arange(n) + 1000
    data["blob/path"] = b">J1/imported/stack.mrcs"
    data["blob/idx"] = np.arange(n)[::-1]
    data["blob/shape"] = 16
    data["blob/psize_A"] = 1.0
    data["blob/sign"] = -1
    data["ctf/accel_kv"] = 300
    data["ctf/df1_A"] = 12345.5
    if kind is not None:
        data[f"{kind}/pose"] = pose
        data[f"{kind}/shift"] = shift
        data[f"{kind}/psize_A"] = 2.5  # differs from blob/psize_A on purpose
    path = tmp_path / "P1" / "J2" / "particles.cs"
    path.parent.mkdir(parents=True)
    write_cs(path, data)
    return path


def test_cs_prefix_indices_and_3d_alignments(tmp_path):
    rng = np.random.default_rng(3)
    rot, tilt, psi = rng.uniform(-180, 180, 6), rng.uniform(5, 175, 6), rng.uniform(-180, 180, 6)
    m = matrix_from_euler(rot, tilt, psi)
    pose = logmap(np.swapaxes(m, -1, -2))  # CryoSPARC's pose rotates the other way (R_cs = A_relion^T)
    shift = rng.uniform(-3, 3, (6, 2))
    path = _cs(tmp_path, 6, pose=pose, shift=shift)
    ds = open_particles(path, data_dir=tmp_path)
    assert ds["image_name"].values[0] == "J1/imported/stack.mrcs"  # '>' stripped
    assert ds["image_index"].values.tolist() == [5, 4, 3, 2, 1, 0]  # 0-based
    direct = read_direct(tmp_path / "J1/imported/stack.mrcs")
    np.testing.assert_array_equal(ds["images"].values, direct[::-1])
    np.testing.assert_allclose(ds["shift_x"].values, shift[:, 0].astype(np.float32) * 2.5, rtol=1e-6)
    np.testing.assert_allclose(ds["shift_y"].values, shift[:, 1].astype(np.float32) * 2.5, rtol=1e-6)
    np.testing.assert_allclose(ds["angle_rot"].values, rot, atol=1e-3)
    np.testing.assert_allclose(ds["angle_tilt"].values, tilt, atol=1e-3)
    np.testing.assert_allclose(ds["angle_psi"].values, psi, atol=1e-3)
    assert (ds["class_number"].values == 1).all() and (ds["sign"].values == -1).all()


def test_cs_pose_convention_in_plane():
    """A pose of +θ about z is RELION's rot + psi = θ (the convention of pyem and cryoDRGN)."""
    from dparticles.formats.cryosparc import from_cs

    data = np.zeros(1, dtype=[("uid", "<u8"), ("blob/psize_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                              ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4")])
    data["alignments3D/pose"] = [0.0, 0.0, 0.5]
    data["blob/psize_A"] = data["alignments3D/psize_A"] = 1.0
    p = from_cs(data, Path("x.cs")).particles
    assert abs(p["angle_tilt"].iloc[0]) < 1e-6
    np.testing.assert_allclose(p["angle_rot"].iloc[0] + p["angle_psi"].iloc[0], np.rad2deg(0.5), atol=1e-4)


def test_cs_2d_alignments(tmp_path):
    path = _cs(tmp_path, 3, kind="alignments2D", pose=np.deg2rad([10.0, -20.0, 30.0]),
               shift=[[1, 2], [-1, 0], [0.5, -0.5]])
    ds = open_particles(path, data_dir=tmp_path)
    assert ds.attrs["pose"] == "2d"
    np.testing.assert_allclose(ds["angle_psi"].values, [10, -20, 30], atol=1e-4)
    np.testing.assert_allclose(ds["shift_x"].values, [2.5, -2.5, 1.25])
    np.testing.assert_allclose(ds["shift_y"].values, [5.0, 0.0, -1.25])


def test_cs_blob_path_is_found_from_the_project_directory(tmp_path):
    path = _cs(tmp_path, 2, kind=None)
    ds = open_particles(path)  # P1/J2/particles.cs -> two levels up holds J1/imported/
    assert Path(ds["image_path"].values[0]) == tmp_path / "J1/imported/stack.mrcs"


def test_rotation_round_trips():
    rng = np.random.default_rng(0)
    rot, tilt, psi = rng.uniform(-180, 180, 200), rng.uniform(1, 179, 200), rng.uniform(-180, 180, 200)
    m = matrix_from_euler(rot, tilt, psi)
    np.testing.assert_allclose(m @ np.swapaxes(m, -1, -2), np.broadcast_to(np.eye(3), m.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m), 1.0)
    back = expmap(logmap(m))
    np.testing.assert_allclose(back, m, atol=1e-10)
    r2, t2, p2 = euler_from_matrix(back)
    np.testing.assert_allclose(r2, rot, atol=1e-8)
    np.testing.assert_allclose(t2, tilt, atol=1e-8)
    np.testing.assert_allclose(p2, psi, atol=1e-8)
    # near pi and identity
    for v in ([np.pi - 1e-9, 0, 0], [0, 0, 0], [0, np.pi, 0], [1e-9, 0, 0]):
        v = np.array([v])
        np.testing.assert_allclose(expmap(logmap(expmap(v))), expmap(v), atol=1e-7)


# --- 64-bit offsets, laziness, chunking ------------------------------------------------------

def test_offsets_beyond_2_gib(tmp_path):
    n, box = 40000, 128
    path = tmp_path / "big.mrcs"
    image_bytes = box * box * 4
    last = np.arange(box * box, dtype=np.float32).reshape(box, box)
    with open(path, "wb") as f:
        f.write(stack_header(n, box, np.float32, 1.0, "sparse"))
        f.truncate(1024 + n * image_bytes)  # sparse: no disk used
        f.seek(1024 + (n - 1) * image_bytes)
        f.write(last.tobytes())
    assert 1024 + (n - 1) * image_bytes > 2**31
    star = write_star(tmp_path / "p.star", {"rlnImageName": image_names([0, n - 1, n - 2], "big.mrcs"),
                                            "rlnOpticsGroup": [1] * 3}, optics_table([1.0], box))
    ds = open_particles(star)
    np.testing.assert_array_equal(ds["images"][1].values, last)
    assert not ds["images"][2].values.any() and not ds["images"][0].values.any()


def test_opening_reads_no_pixels_and_graph_is_small(tmp_path):
    n_stacks, per = 20, 500
    for k in range(n_stacks):
        with open(tmp_path / f"s{k}.mrcs", "wb") as f:  # headers only: pixel reads would see sparse zeros
            f.write(stack_header(per, 8, np.float32, 1.0, "lazy"))
            f.truncate(1024 + per * 8 * 8 * 4)
    names = [n for k in range(n_stacks) for n in image_names(range(per), f"s{k}.mrcs")]
    star = write_star(tmp_path / "p.star", {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names)},
                      optics_table([1.0], 8))
    from unittest import mock

    import dparticles.formats.mrc as mrc

    with mock.patch.object(mrc, "read_chunk", side_effect=AssertionError("pixels read while opening")), \
            mock.patch("mrcfile.mmap", side_effect=AssertionError("memory map while opening")):
        ds = open_particles(star, chunks=1000)
    images = ds["images"].data
    graph = dict(images.__dask_graph__())
    assert len(graph) == images.npartitions == 10
    size = len(pickle.dumps(graph))
    assert size < 200 * 1024, size
    for task in graph.values():
        for arg in _walk(task):
            assert not isinstance(arg, (np.memmap, mrcfile.mrcobject.MrcObject))
            if isinstance(arg, np.ndarray):
                assert arg.nbytes < 4096


def _walk(obj):
    yield obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _walk(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _walk(o)
    elif hasattr(obj, "args"):  # dask Task objects
        for o in getattr(obj, "args", ()):
            yield from _walk(o)


@pytest.mark.parametrize("chunks", [1, 3, 7, 11, 1000])
def test_chunking_equals_direct_reads(tmp_path, chunks):
    a = make_stack(tmp_path / "a.mrcs", 9, 12, seed=1)
    b = make_stack(tmp_path / "b.mrcs", 5, 12, seed=2)
    order = [("a", 0), ("a", 1), ("a", 2), ("b", 4), ("b", 3), ("a", 8), ("a", 3), ("a", 4), ("b", 0),
             ("b", 1), ("a", 7), ("a", 7)]
    names = [f"{i + 1}@{s}.mrcs" for s, i in order]
    star = write_star(tmp_path / "p.star", {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names)},
                      optics_table([1.0], 12))
    ds = open_particles(star, chunks=chunks)
    expected = np.stack([{"a": a, "b": b}[s][i] for s, i in order])
    assert ds["images"].data.chunks[0][0] == min(chunks, len(order))
    assert_eq(ds["images"].data, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, np.float16, np.int8])
def test_dtypes_and_byte_order(tmp_path, dtype):
    data = make_stack(tmp_path / "s.mrcs", 4, 10, dtype=dtype)
    star = write_star(tmp_path / "p.star", {"rlnImageName": image_names([3, 1], "s.mrcs"), "rlnOpticsGroup": [1, 1]},
                      optics_table([1.0], 10))
    ds = open_particles(star)
    assert ds["images"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds["images"].values, data[[3, 1]])


def test_big_endian_stack(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=">f4").reshape(3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.new(tmp_path / "s.mrcs") as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
    star = write_star(tmp_path / "p.star", {"rlnImageName": image_names([2, 0], "s.mrcs"), "rlnOpticsGroup": [1, 1]},
                      optics_table([1.0], 8))
    ds = open_particles(star)
    assert ds["images"].dtype.byteorder in "=<|"
    np.testing.assert_array_equal(ds["images"].values, data[[2, 0]].astype(np.float32))


def test_apply_sign(particle_set):
    star, images = particle_set
    ds = open_particles(star, sign=-1, apply_sign=True)
    np.testing.assert_array_equal(ds["images"].values, -images)
    assert (open_particles(star)["sign"].values == 1).all()


def test_single_image_mrc_without_index(tmp_path):
    img = make_stack(tmp_path / "one.mrc", 1, 8)
    star = write_star(tmp_path / "p.star", {"rlnImageName": ["one.mrc"], "rlnOpticsGroup": [1]},
                      optics_table([1.0], 8))
    np.testing.assert_array_equal(open_particles(star)["images"].values, img)


def test_data_dir_comes_first_and_project_ancestors_are_searched(tmp_path):
    make_stack(tmp_path / "proj/Extract/job1/s.mrcs", 2, 8, seed=1)
    other = make_stack(tmp_path / "elsewhere/Extract/job1/s.mrcs", 2, 8, seed=2)
    star = write_star(tmp_path / "proj/Select/job2/deep/p.star",
                      {"rlnImageName": image_names([1], "Extract/job1/s.mrcs"), "rlnOpticsGroup": [1]},
                      optics_table([1.0], 8))
    ds = open_particles(star)
    assert Path(ds["image_path"].values[0]) == tmp_path / "proj/Extract/job1/s.mrcs"
    ds = open_particles(star, data_dir=tmp_path / "elsewhere")
    np.testing.assert_array_equal(ds["images"].values, other[[1]])


def test_fast_star_reader_matches_starfile(real, tmp_path):
    """The STAR reader's fast path gives exactly what starfile gives, on every real STAR file and on
    generated layouts (tabs, quotes, optics last, an unnamed block, a key-value block)."""
    import starfile

    from dparticles.formats.relion import _read_fast

    as_string = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName"]
    simple_set(tmp_path / "gen", pixel_sizes=(1.0, 2.0))
    write_star(tmp_path / "tabs.star", {"rlnImageName": ["1@a b.mrcs", "2@x.mrcs"], "rlnVoltage": [300, 200]},
               optics_table([1.0], 8), optics_first=False, sep="\t")
    (tmp_path / "kv.star").write_text("data_general\n\n_rlnFinalResolution 3.5\n_rlnMaskName 'mask a.mrc'\n\n"
                                      "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n# a comment\n1@s.mrcs 1e4\n")
    files = sorted(real.rglob("*.star")) + sorted(tmp_path.rglob("*.star"))
    for f in files:
        ref = starfile.read(f, always_dict=True, parse_as_string=as_string)
        fast = _read_fast(f, as_string)
        assert list(ref) == list(fast), f
        for k, a in ref.items():
            if isinstance(a, pd.DataFrame):
                pd.testing.assert_frame_equal(fast[k].reset_index(drop=True), a.reset_index(drop=True), obj=str(f))
            else:
                assert fast[k] == a, f
