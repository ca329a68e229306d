"""Malformed metadata gets one clear ParticleError naming the file, the line or particle, and what
was expected; values RELION keeps verbatim are kept verbatim."""

from __future__ import annotations

import numpy as np
import pytest

import dparticles
from dparticles.cli import main
from dparticles.errors import ParticleError
from dparticles.formats.relion import read_star, write_star as write_blocks
from tests.helpers import OPTICS_ROW, OPTICS_STAR as OPTICS, make_stack

HEAD = """
data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnClassNumber #5
_rlnOpticsGroup #6
"""
HEAD_LINES = (OPTICS + HEAD).count("\n")  # lines before the first particle row


def rows(n=4, mic="mic1.mrc"):
    return [f"{i + 1:06d}@s.mrcs {mic} 10000.0 11000.0 1 1" for i in range(n)]


def star(tmp_path, lines, *, head=HEAD, tail="\n", extra=""):
    make_stack(tmp_path / "s.mrcs", 4)
    path = tmp_path / "particles.star"
    path.write_text(OPTICS + head + "\n".join(lines) + tail + extra)
    return path


def check(path, *words, line=None, particle=None, capsys=None):
    with pytest.raises(ParticleError) as info:
        dparticles.open_particles(path)
    message = str(info.value)
    assert str(path) in message
    for w in words:
        assert w in message, message
    if line is not None:
        assert f"line {line}" in message, message
    if particle is not None:
        assert f"particle {particle}" in message, message
    if capsys is not None:
        capsys.readouterr()
        assert main(["info", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return message


# 1. rows with too few or too many fields

@pytest.mark.parametrize("k", [0, 2])
def test_short_row(tmp_path, capsys, k):
    lines = rows()
    lines[k] = lines[k].rsplit(" ", 1)[0]
    check(star(tmp_path, lines), "expected 6 fields (one per label), got 5", line=HEAD_LINES + 1 + k,
          capsys=capsys)


@pytest.mark.parametrize("k", [0, 3])
def test_long_row(tmp_path, capsys, k):
    lines = rows()
    lines[k] += " 7"
    check(star(tmp_path, lines), "expected 6 fields (one per label), got 7", line=HEAD_LINES + 1 + k,
          capsys=capsys)


def test_truncated_last_row(tmp_path, capsys):
    lines = rows()
    lines[-1] = lines[-1][:20]
    check(star(tmp_path, lines, tail=""), "expected 6 fields (one per label), got 2", line=HEAD_LINES + 4,
          capsys=capsys)


# 2. duplicate labels

def test_duplicate_label(tmp_path, capsys):
    head = HEAD + "_rlnDefocusU #7\n"
    lines = [r + " 12000.0" for r in rows()]
    check(star(tmp_path, lines, head=head), "rlnDefocusU", "twice", line=HEAD_LINES + 1, capsys=capsys)


# 3. two particle blocks

def test_two_particle_blocks(tmp_path, capsys):
    path = star(tmp_path, rows(), extra=HEAD + "\n".join(rows(2)) + "\n")
    check(path, "file holds 2 data_particles blocks; expected one", capsys=capsys)


# 4. numbers

@pytest.mark.parametrize("col,value,label", [(4, "abc", "rlnClassNumber"), (2, "x", "rlnDefocusU")])
def test_not_a_number(tmp_path, capsys, col, value, label):
    lines = rows()
    cells = lines[2].split()
    cells[col] = value
    lines[2] = " ".join(cells)
    check(star(tmp_path, lines), label, repr(value), "expected", line=HEAD_LINES + 3, capsys=capsys)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_not_finite_defocus(tmp_path, capsys, value):
    lines = rows()
    cells = lines[1].split()
    cells[3] = value
    lines[1] = " ".join(cells)
    check(star(tmp_path, lines), "rlnDefocusV", "finite", line=HEAD_LINES + 2, capsys=capsys)


@pytest.mark.parametrize("label,value", [("rlnImagePixelSize", "nan"), ("rlnVoltage", "inf"),
                                         ("rlnSphericalAberration", "nan")])
def test_not_finite_optics(tmp_path, capsys, label, value):
    path = star(tmp_path, rows())
    cells = OPTICS_ROW.split()
    cells[{"rlnVoltage": 2, "rlnSphericalAberration": 3, "rlnImagePixelSize": 5}[label]] = value
    path.write_text(path.read_text().replace(OPTICS_ROW, " ".join(cells)))
    check(path, label, "finite", capsys=capsys)


def test_nan_never_written_empty(tmp_path):
    import pandas as pd
    out = tmp_path / "out.star"
    write_blocks(out, {"particles": pd.DataFrame({"rlnA": [1.0, np.nan, 2.5], "rlnB": [1, 2, 3]})})
    body = [ln for ln in out.read_text().splitlines() if ln and not ln.startswith(("_", "#", "data_", "loop_"))]
    assert all(len(ln.split()) == 2 for ln in body), body
    back = read_star(out, compact=True)["particles"]
    assert np.isnan(back["rlnA"][1]) and back["rlnB"].tolist() == [1, 2, 3]


# 5. image indices

@pytest.mark.parametrize("name", ["000000@s.mrcs", "-00001@s.mrcs", "99999999999999999999@s.mrcs",
                                  "9223372036854775808@s.mrcs"])
def test_bad_image_index(tmp_path, capsys, name):
    lines = rows()
    lines[1] = name + " " + lines[1].split(" ", 1)[1]
    check(star(tmp_path, lines), "rlnImageName", line=HEAD_LINES + 2, capsys=capsys)


def cs_file(tmp_path, **change):
    make_stack(tmp_path / "s.mrcs", 4)
    fields = {"uid": np.arange(4, dtype=np.uint64), "blob/path": np.array([b"s.mrcs"] * 4),
              "blob/idx": np.arange(4, dtype=np.uint32), "blob/shape": np.full((4, 2), 16, np.uint32),
              "blob/psize_A": np.full(4, 1.5, np.float32)}
    for k, v in change.items():
        k = k.replace("__", "/")
        if v is None:
            fields.pop(k)
        else:
            fields[k] = v
    data = np.empty(4, dtype=[(k, v.dtype, v.shape[1:]) for k, v in fields.items()])
    for k, v in fields.items():
        data[k] = v
    path = tmp_path / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, data)
    return path


def test_cs_negative_index(tmp_path, capsys):
    path = cs_file(tmp_path, blob__idx=np.array([0, 1, -2, 3], dtype=np.int32))
    check(path, "blob/idx", "-2", particle=3, capsys=capsys)


# 6. quotes and hashes inside tokens are kept as RELION keeps them

@pytest.mark.parametrize("mic", ["mic#1.mrc", "it's.mrc", "a#b'c#.mrc"])
def test_verbatim_tokens(tmp_path, mic):
    path = star(tmp_path, rows(mic=mic))
    ds = dparticles.open_particles(path)
    assert ds["micrograph"].values.tolist() == [mic] * 4
    assert ds["defocus_u"].values.tolist() == [10000.0] * 4
    blocks = read_star(path, compact=True)
    out = tmp_path / "again.star"
    write_blocks(out, blocks)
    again = read_star(out, compact=True)["particles"]
    assert list(again["rlnMicrographName"]) == [mic] * 4
    assert f" {mic} " in out.read_text()


def test_comment_lines_and_trailing_comments(tmp_path):
    lines = rows()
    lines.insert(1, "# a comment line")
    lines[2] += "   # trailing comment"
    ds = dparticles.open_particles(star(tmp_path, lines))
    assert ds["defocus_u"].values.tolist() == [10000.0] * 4


# 7. malformed .cs fields

@pytest.mark.parametrize("change,words", [
    ({"blob__idx": np.arange(8, dtype=np.uint32).reshape(4, 2)}, ["blob/idx", "shape"]),
    ({"blob__idx": np.arange(4, dtype=np.float32)}, ["blob/idx", "integer"]),
    ({"blob__path": np.arange(4, dtype=np.int64)}, ["blob/path", "bytes"]),
    ({"blob__path": None}, ["blob/path"]),
])
def test_cs_bad_fields(tmp_path, capsys, change, words):
    check(cs_file(tmp_path, **change), *words, capsys=capsys)


def test_good_files_still_open(tmp_path):
    ds = dparticles.open_particles(star(tmp_path, rows()))
    assert ds["image_index"].values.tolist() == [0, 1, 2, 3]
    ds = dparticles.open_particles(cs_file(tmp_path))
    assert ds["image_index"].values.tolist() == [0, 1, 2, 3]


def test_star_written_from_a_cs_shows_float32_values_as_they_are(real, tmp_path):
    """A STAR file made from a .cs says 2.7, not 2.700000047683716, and the .cs written back holds the
    same float32 bits as the input."""
    src = real / "cryodrgn/empiar_10076_7/empiar_10076_7.cs"
    dparticles.restack(src, tmp_path / "out", batch_size=100, cluster={"n_workers": 1}, log=lambda *_: None)
    text = (tmp_path / "out" / "particles.star").read_text()
    assert " 2.7 " in text and "2.700000047683716" not in text and "0.07000000029802322" not in text
    before, after = np.load(src), np.load(tmp_path / "out" / "particles.cs")
    for name in ("ctf/cs_mm", "ctf/amp_contrast", "ctf/df1_A", "ctf/df2_A", "blob/psize_A"):
        assert after[name].tobytes() == before[name].tobytes(), name


# 8. every field checked before use; the error names the row that is wrong

OPTICS_LINE = OPTICS.split("\n").index(OPTICS_ROW) + 1  # the line of the optics group


def cells(line, col, value):
    parts = line.split()
    parts[col] = value
    return " ".join(parts)


@pytest.mark.parametrize("k,value,shown", [(2, "abc", "'abc'"), (0, "abc", "'abc'"), (3, "1.5", "1.5")])
def test_optics_group_not_a_number(tmp_path, capsys, k, value, shown):
    lines = rows()
    lines[k] = cells(lines[k], 5, value)
    path = star(tmp_path, lines)
    assert check(path, capsys=capsys) == (f"{path}, line {HEAD_LINES + 1 + k}, particle {k + 1}: rlnOpticsGroup is "
                                          f"{shown}; expected a whole number (an optics group of data_optics)")


def test_optics_group_not_in_optics_names_its_particle(tmp_path, capsys):
    lines = rows()
    lines[2] = cells(lines[2], 5, "2")
    path = star(tmp_path, lines)
    assert check(path, capsys=capsys) == (f"{path}, line {HEAD_LINES + 3}, particle 3: rlnOpticsGroup 2 is not in "
                                          "data_optics (groups: [1])")


@pytest.mark.parametrize("col,value,expected", [
    (0, "1.5", "rlnOpticsGroup is 1.5; expected a whole number"),
    (0, "abc", "rlnOpticsGroup is 'abc'; expected a whole number"),
    (6, "16.5", "rlnImageSize is 16.5; expected a whole number"),
    (6, "abc", "rlnImageSize is 'abc'; expected a whole number"),
])
def test_optics_table_values_name_their_line(tmp_path, capsys, col, value, expected):
    path = star(tmp_path, rows())
    path.write_text(path.read_text().replace(OPTICS_ROW, cells(OPTICS_ROW, col, value)))
    assert check(path, capsys=capsys) == f"{path}, line {OPTICS_LINE}: data_optics: {expected}"


def test_optics_group_given_twice(tmp_path, capsys):
    path = star(tmp_path, rows())
    path.write_text(path.read_text().replace(OPTICS_ROW, OPTICS_ROW + "\n" + cells(OPTICS_ROW, 5, "3.0")))
    assert check(path, capsys=capsys) == (f"{path}, line {OPTICS_LINE + 1}: data_optics: rlnOpticsGroup is 1; "
                                          "expected each optics group once")


@pytest.mark.parametrize("label,value,expected", [
    ("rlnOriginX", "abc", "rlnOriginX is 'abc'; expected a number"),
    ("rlnOriginYAngst", "x1", "rlnOriginYAngst is 'x1'; expected a number"),
    ("dparticlesDataSign", "0", "dparticlesDataSign is 0.0; expected +1 or -1 (the data sign)"),
    ("dparticlesDataSign", "up", "dparticlesDataSign is 'up'; expected a number"),
])
def test_other_particle_columns_name_their_particle(tmp_path, capsys, label, value, expected):
    lines = [f"{r} 1" for r in rows()]
    lines[2] = cells(lines[2], 6, value)
    path = star(tmp_path, lines, head=HEAD + f"_{label} #7\n")
    assert check(path, capsys=capsys) == f"{path}, line {HEAD_LINES + 4}, particle 3: {expected}"


@pytest.mark.parametrize("col,value,expected", [
    (2, "abc", "rlnDetectorPixelSize is 'abc'; expected a number"),
    (3, "inf", "rlnMagnification is inf; expected a finite number"),
])
def test_star_30_pixel_size_inputs_name_their_particle(tmp_path, capsys, col, value, expected):
    make_stack(tmp_path / "s.mrcs", 4)
    head = "\ndata_\n\nloop_\n_rlnImageName\n_rlnMicrographName\n_rlnDetectorPixelSize\n_rlnMagnification\n"
    lines = [f"{i + 1:06d}@s.mrcs mic1.mrc 5.0 33333.3" for i in range(4)]
    lines[1] = cells(lines[1], col, value)
    path = tmp_path / "particles.star"
    path.write_text(head + "\n".join(lines) + "\n")
    assert check(path, capsys=capsys) == f"{path}, line {head.count(chr(10)) + 2}, particle 2: {expected}"


F4 = np.float32
A3D = {"alignments3D__shift": np.zeros((4, 2), F4), "alignments3D__psize_A": np.full(4, 1.5, F4),
       "alignments3D__pose": np.zeros((4, 3), F4), "alignments3D__class": np.zeros(4, np.uint32)}


def four(values, k, value, dtype=None):
    """``values`` with the one at row ``k`` replaced."""
    out = list(values)
    out[k] = value
    return np.array(out, dtype=dtype)


@pytest.mark.parametrize("change,particle,message", [
    # the three of the issue
    ({"blob__path": four([b"s.mrcs"] * 4, 2, b"\xffs.mrcs")}, 3,
     r"blob/path is b'\xffs.mrcs'; expected UTF-8 text (the stack path)"),
    ({"blob__shape": np.full(4, 16, np.uint32)}, None,
     "field blob/shape has shape () per particle; expected shape (2,) per particle (the image size ny, nx in pixels)"),
    ({"ctf__df1_A": np.array([b"1.5", b"2", b"x", b"3"])}, 3, "ctf/df1_A is b'x'; expected a finite number (defocus U in Å)"),
    # non-UTF-8: the first particle of the first bad value, in any text field read
    ({"blob__path": np.array([b"s.mrcs", b"\xfes.mrcs", b"\xffs.mrcs", b"\xfes.mrcs"])}, 2,
     r"blob/path is b'\xfes.mrcs'; expected UTF-8 text (the stack path)"),
    ({"location__micrograph_path": four([b"m.mrc"] * 4, 3, b"m\xe9.mrc")}, 4,
     r"location/micrograph_path is b'm\xe9.mrc'; expected UTF-8 text (the micrograph path)"),
    ({"ctf__type": four([b"imported"] * 4, 1, b"\x80")}, 2, r"ctf/type is b'\x80'; expected UTF-8 text"),
    # types
    ({"ctf__df1_A": np.array([b"1.5", b"2", b"3", b"4"])}, None,
     "field ctf/df1_A holds |S3; expected finite numbers (defocus U in Å)"),
    ({"uid": np.arange(4, dtype=np.float64)}, None, "field uid holds float64; expected integers (the particle's unique id)"),
    ({"blob__shape": np.full((4, 2), 16, np.float32)}, None,
     "field blob/shape holds float32; expected integers (the image size ny, nx in pixels)"),
    ({"ctf__exp_group_id": np.zeros(4, np.float32)}, None,
     "field ctf/exp_group_id holds float32; expected integers (the 0-based exposure group)"),
    ({"alignments3D__class": np.zeros(4, np.float32)} | {k: v for k, v in A3D.items() if k != "alignments3D__class"},
     None, "field alignments3D/class holds float32; expected integers (the 0-based class)"),
    ({"mscope_params__total_dose_e_per_A2": np.array([b"50", b"50", b"50", b"lots"])}, 4,
     "mscope_params/total_dose_e_per_A2 is b'lots'; expected a number (the total dose in e/Å²)"),
    # shapes
    ({"ctf__df2_A": np.zeros((4, 2), F4)}, None,
     "field ctf/df2_A has shape (2,) per particle; expected one value per particle (defocus V in Å)"),
    (A3D | {"alignments3D__pose": np.zeros(4, F4)}, None, "field alignments3D/pose has shape () per particle; "
     "expected shape (3,) per particle (the rotation as an axis-angle vector in radians)"),
    ({"alignments2D__shift": np.zeros((4, 2), F4), "alignments2D__pose": np.zeros((4, 3), F4)}, None,
     "field alignments2D/pose has shape (3,) per particle; expected one value per particle (the in-plane rotation "
     "in radians)"),
    ({"location__micrograph_shape": np.full(4, 4096, np.uint32)}, None, "field location/micrograph_shape has shape () "
     "per particle; expected shape (2,) per particle (the micrograph size ny, nx in pixels)"),
    ({"extra__matrix": np.zeros((4, 2, 2), F4)}, None,
     "field extra/matrix has shape (2, 2) per particle; expected a value or a vector per particle"),
    # ranges
    ({"uid": np.array([1, 2, -3, 4])}, 3, "uid is -3; expected an integer >= 0 (the particle's unique id)"),
    ({"blob__shape": four(np.full((4, 2), 16), 1, (16, 0), np.uint32)}, 2,
     "blob/shape is (16, 0); expected 2 integers > 0 (the image size ny, nx in pixels)"),
    ({"blob__shape": four(np.full((4, 2), 16), 1, (16, 18), np.uint32)}, 2,
     "blob/shape is (16, 18); expected a square image (ny = nx)"),
    ({"blob__psize_A": four(np.full(4, 1.5), 3, np.nan, F4)}, 4,
     "blob/psize_A is nan; expected a finite number (the pixel size in Å)"),
    ({"blob__sign": np.array([0, -1, -1, -1], F4)}, 1, "blob/sign is 0.0; expected +1 or -1 (the data sign)"),
    ({"ctf__accel_kv": four(np.full(4, 300), 2, np.inf, F4)}, 3,
     "ctf/accel_kv is inf; expected a finite number (the voltage in kV)"),
    ({"ctf__phase_shift_rad": four(np.zeros(4), 1, -np.inf, F4)}, 2,
     "ctf/phase_shift_rad is -inf; expected a finite number (the phase shift in radians)"),
    ({"ctf__exp_group_id": np.array([0, 0, 1, -1], np.int32)}, 4,
     "ctf/exp_group_id is -1; expected an integer >= 0 (the 0-based exposure group)"),
    ({"location__micrograph_shape": four(np.full((4, 2), 4096), 2, (0, 4096), np.uint32),
      "location__center_x_frac": np.full(4, 0.5, F4), "location__center_y_frac": np.full(4, 0.5, F4)}, 3,
     "location/micrograph_shape is (0, 4096); expected 2 integers > 0 (the micrograph size ny, nx in pixels)"),
    ({"location__micrograph_shape": np.full((4, 2), 4096, np.uint32),
      "location__center_x_frac": np.full(4, 0.5, F4), "location__center_y_frac": four(np.full(4, 0.5), 0, np.nan, F4)},
     1, "location/center_y_frac is nan; expected a finite number (y as a fraction of the micrograph height)"),
    (A3D | {"alignments3D__shift": four(np.zeros((4, 2)), 1, (np.nan, 1.0), F4)}, 2,
     "alignments3D/shift is (nan, 1.0); expected 2 finite numbers (the shift x, y in pixels)"),
    (A3D | {"alignments3D__psize_A": four(np.full(4, 1.5), 2, 0, F4)}, 3,
     "alignments3D/psize_A is 0.0; expected a finite number > 0 (the pixel size of the shift in Å)"),
    (A3D | {"alignments3D__pose": four(np.zeros((4, 3)), 3, (0, np.inf, 0), F4)}, 4,
     "alignments3D/pose is (0.0, inf, 0.0); expected 3 finite numbers (the rotation as an axis-angle vector in "
     "radians)"),
    (A3D | {"alignments3D__class": np.array([0, -2, 0, 0], np.int64)}, 2,
     "alignments3D/class is -2; expected an integer >= 0 (the 0-based class)"),
    ({k: v for k, v in A3D.items() if k != "alignments3D__psize_A"} | {"blob__psize_A": None}, None, "field alignments3D/shift is given without "
     "alignments3D/psize_A or blob/psize_A; expected one of them (the pixel size of the shift)"),
])
def test_cs_fields_checked_before_use(tmp_path, capsys, change, particle, message):
    path = cs_file(tmp_path, **change)
    where = f"{path}, particle {particle}" if particle else str(path)
    assert check(path, capsys=capsys) == f"{where}: {message}"


def test_cs_alignments_not_read_are_not_checked(tmp_path):
    """A .cs with 3D and 2D alignments is read from the 3D ones; the 2D ones are kept as they are."""
    path = cs_file(tmp_path, **A3D, alignments2D__shift=np.full((4, 2), np.nan, F4),
                   alignments2D__pose=np.zeros((4, 3), F4))
    ds = dparticles.open_particles(path)
    assert ds.attrs["pose"] == "3d" and np.isnan(ds["cs:alignments2D.shift[0]"].values).all()


def test_cs_of_several_dimensions(tmp_path, capsys):
    path = tmp_path / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 2), dtype=[("uid", np.uint64)]))
    assert check(path, capsys=capsys) == (f"{path}: not a CryoSPARC dataset: the array has shape (2, 2); expected "
                                          "one row per particle (a one-dimensional array)")


def test_cs_bad_value_found_past_the_first_block(tmp_path):
    """Values are checked a block of rows at a time: a particle in a later block is named as itself."""
    n = 60_000  # rows of 40 bytes: three blocks of 2**20 bytes
    make_stack(tmp_path / "s.mrcs", 1)
    data = np.zeros(n, dtype=[("uid", np.uint64), ("blob/path", "S8"), ("blob/idx", np.uint32),
                              ("blob/shape", np.uint32, (2,)), ("blob/psize_A", F4), ("ctf/df1_A", F4),
                              ("ctf/df2_A", F4)])
    data["uid"], data["blob/path"], data["blob/shape"], data["blob/psize_A"] = np.arange(n), b"s.mrcs", 16, 1.5
    data["ctf/df1_A"][n - 2] = np.nan
    data["ctf/df2_A"][n - 1] = np.nan
    assert data.dtype.itemsize == 40
    path = tmp_path / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, data)
    with pytest.raises(ParticleError) as info:
        dparticles.open_particles(path, ignore_raw=True)
    assert str(info.value) == f"{path}, particle {n - 1}: ctf/df1_A is nan; expected a finite number (defocus U in Å)"


@pytest.mark.parametrize("kind", ["cs path", "cs shape", "cs ctf", "star"])
def test_import_of_malformed_metadata_prints_one_line(tmp_path, capsys, kind):
    """`dparticles import` stops before any output with the one line that names the file, field and row."""
    if kind == "star":
        lines = rows()
        lines[2] = cells(lines[2], 5, "abc")
        path = star(tmp_path, lines)
    else:
        change = {"cs path": {"blob__path": four([b"s.mrcs"] * 4, 2, b"\xffs.mrcs")},
                  "cs shape": {"blob__shape": np.full(4, 16, np.uint32)},
                  "cs ctf": {"ctf__df1_A": np.array([b"1.5", b"2", b"x", b"3"])}}[kind]
        path = cs_file(tmp_path, **change)
    with pytest.raises(ParticleError) as info:
        dparticles.open_particles(path)
    capsys.readouterr()
    assert main(["import", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(info.value) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
