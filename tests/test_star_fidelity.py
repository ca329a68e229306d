"""STAR values are read as RELION 3.1 reads them, with RELION itself as the reference: quotes, ``#``
and whitespace in and around values, in files that mix them. RELION's reading of a loop row
(``MetaDataTable::readStarLoop``, ``nextTokenInSTAR``): the line is simplified (tabs to spaces, runs of
spaces to one, inside quotes too), a value starting with a quote runs to the same quote followed by a
space or the end of the line, a value starting with ``#`` starts a comment, and a ``#`` or quote
anywhere else is part of the value."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import OPTICS_STAR as OPTICS, make_stack

import dparticles
from dparticles.errors import ParticleError
from dparticles.formats import relion as star
from dparticles.formats.relion import read_star, tokens, write_star

HEAD = """
# version 30001

data_particles

loop_
_rlnMicrographName #1
_rlnImageName #2
_rlnDefocusU #3
_rlnGroupName #4
_rlnOpticsGroup #5
"""
# hostile rows, and the values RELION 3.1.3 keeps for them (relion_star_handler reads and writes them:
# measured, and checked again by the tests marked relion below)
ROWS = [
    ("mic#1.mrc 000001@s.mrcs 100.0 g1 1", "mic#1.mrc", 100.0, "g1"),
    ("it's.mrc 000002@s.mrcs 200.0 'a  b' 1", "it's.mrc", 200.0, "a b"),
    ('"x y.mrc" 000003@s.mrcs 300.0 "a\\"b c\\"" 1', "x y.mrc", 300.0, 'a\\"b c\\"'),
    ("a#b'c#.mrc\t000004@s.mrcs    400.0 \"\"   1 # trailing", "a#b'c#.mrc", 400.0, ""),
    ("'q\"uo te' 000005@s.mrcs 500.0 g5 1 #c \"unclosed", 'q"uo te', 500.0, "g5"),
    ('"a"b c" 000006@s.mrcs 600.0 g6 1', 'a"b c', 600.0, "g6"),
    ("m7 000007@s.mrcs 700.0 \"x'y\"z\" 1", "m7", 700.0, "x'y\"z"),
    ('  m8   000008@s.mrcs "800.5" "g \t 8" 1  ', "m8", 800.5, "g 8"),
    ("m9 000009@s.mrcs 9e2 g#9 1", "m9", 900.0, "g#9"),
    ("\"#m10\" 000010@s.mrcs 1000.0 '\"' 1", "#m10", 1000.0, '"'),
]
RELION = pytest.mark.skipif(shutil.which("relion_star_handler") is None,
                            reason="RELION 3.1 (relion_star_handler) is not on PATH; install the Debian package relion")


def hostile(folder: Path, rows=ROWS) -> Path:
    make_stack(folder / "s.mrcs", len(rows), 16)
    path = folder / "hostile.star"
    path.write_text(OPTICS + HEAD + "\n".join(r[0] for r in rows) + "\n\n")
    return path


def relion_rows(path: Path) -> list[list[str]]:
    """The particle rows of a STAR file RELION wrote: values separated by spaces; one holding
    whitespace or starting with a quote is written in double quotes (an inner quote followed by
    whitespace is preceded by BEL, ``\\a``)."""
    text = path.read_text()
    body = text[text.index("data_particles"):].splitlines()
    value = re.compile(r'"((?:[^"]|"(?=\S)|(?<=\a)")*)"(?=\s|$)|(\S+)')
    rows = [ln for ln in body if ln.strip() and not ln.startswith(("_", "loop_", "data_", "# version"))]
    return [[(m.group(1) if m.group(1) is not None else m.group(2)).replace("\a", "") for m in value.finditer(r)]
            for r in rows]


def relion_star_handler(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["relion_star_handler", "--i", str(src), "--o", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=src.parent)


# --- the reading of one line -----------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=[str(k) for k in range(len(ROWS))])
def test_tokens_as_relion_reads_them(row):
    line, mic, defocus, group = row
    values = tokens(line)
    assert len(values) == 5, values
    assert values[0] == mic and float(values[2]) == defocus and values[3] == group and values[4] == "1"


@pytest.mark.parametrize("line", ['a "b c', "a 'b", 'a "b"c', "'"])
def test_a_quote_not_closed_is_an_error(line):
    with pytest.raises(ValueError, match="no closing"):
        tokens(line)


def test_simplify_and_resolve_whole_pieces():
    piece = b"  a\t\tb  \r\n\n c \"d  e\" #x\n'' f\x07g\n"
    text, marked = star.resolve(star.simplify(piece))
    assert marked
    assert text == b"a b\n\nc d" + star.SPACE + b"e\n" + star.EMPTY + b" fg\n"


# --- whole files, read as RELION reads them --------------------------------------------------------

@pytest.mark.parametrize("piece", [star.PIECE_BYTES, 64, 16])
def test_hostile_file_reads_as_relion_reads_it(tmp_path, monkeypatch, piece):
    """One path for every file: quoted values elsewhere in the file leave ``#`` and quotes inside
    unquoted values alone (in one piece, in pieces of a line or two, in pieces shorter than a line)."""
    monkeypatch.setattr(star, "PIECE_BYTES", piece)
    path = hostile(tmp_path)
    p = read_star(path, compact=True)["particles"]
    assert p["rlnMicrographName"].tolist() == [r[1] for r in ROWS]
    assert p["rlnGroupName"].tolist() == [r[3] for r in ROWS]
    assert p["rlnDefocusU"].tolist() == [r[2] for r in ROWS]
    assert p["rlnImageName@number"].tolist() == list(range(1, len(ROWS) + 1))
    assert set(p["rlnImageName"]) == {"s.mrcs"}
    plain = read_star(path)["particles"]
    assert plain["rlnMicrographName"].tolist() == [r[1] for r in ROWS]
    assert plain["rlnImageName"].tolist() == [f"{k:06d}@s.mrcs" for k in range(1, len(ROWS) + 1)]
    ds = dparticles.open_particles(path)
    assert ds["micrograph"].values.tolist() == [r[1] for r in ROWS]


def test_written_back_and_read_again(tmp_path):
    path = hostile(tmp_path)
    blocks = read_star(path, compact=True)
    out = tmp_path / "again.star"
    write_star(out, blocks)
    again = read_star(out, compact=True)["particles"]
    for c in blocks["particles"].columns:
        assert again[c].tolist() == blocks["particles"][c].tolist(), c
    text = out.read_text()
    assert "\nmic#1.mrc 000001@" in text and '\n"#m10" ' in text and ' """ ' in text and ' "" ' in text


def test_a_value_relion_cannot_read_back_is_not_written(tmp_path):
    df = pd.DataFrame({"rlnMicrographName": ['a" b'], "rlnDefocusU": [1.0]})
    with pytest.raises(ParticleError, match="would not read it back"):
        write_star(tmp_path / "p.star", {"particles": df})


@pytest.mark.parametrize("row,words", [
    ('m1 000001@s.mrcs 100.5 "g1 1', ["no closing"]),
    ("m1 000001@s.mrcs 100.5 g1 #1", ["expected 5 fields", "got 4"]),
    ("m1 000001@s.mrcs 100.5 g#1", ["expected 5 fields", "got 4"]),
])
def test_faults_name_the_line(tmp_path, row, words):
    path = hostile(tmp_path, ROWS[:3] + [(row,)] + ROWS[3:])
    with pytest.raises(ParticleError) as info:
        read_star(path, compact=True)
    message = str(info.value)
    assert str(path) in message and f"line {(OPTICS + HEAD).count(chr(10)) + 4}" in message, message
    assert all(w in message for w in words), message
    assert "\n" not in message


def test_hex_is_text_not_a_number(tmp_path):
    """pyarrow would read 0x10 as 16; RELION's sscanf reads it as 0 and keeps the text of a text label."""
    path = hostile(tmp_path, [("m1 000001@s.mrcs 100.0 0x10 1",), ("m2 000002@s.mrcs 0X1f 0x11 1",)])
    p = read_star(path, compact=True)["particles"]
    assert p["rlnGroupName"].tolist() == ["0x10", "0x11"] and p["rlnDefocusU"].tolist() == ["100.0", "0X1f"]
    with pytest.raises(ParticleError, match="rlnDefocusU"):
        dparticles.open_particles(path)


# --- RELION 3.1 itself -----------------------------------------------------------------------------

@pytest.mark.relion
@RELION
def test_relion_keeps_what_we_read(tmp_path):
    path = hostile(tmp_path)
    run = relion_star_handler(path, tmp_path / "relion.star")
    assert run.returncode == 0, run.stdout + run.stderr
    kept = relion_rows(tmp_path / "relion.star")
    assert [r[0] for r in kept] == [r[1] for r in ROWS]  # the table above is what RELION keeps
    assert [r[3] for r in kept] == [r[3] for r in ROWS]
    p = read_star(path, compact=True)["particles"]
    assert p["rlnMicrographName"].tolist() == [r[0] for r in kept]
    assert p["rlnGroupName"].tolist() == [r[3] for r in kept]
    np.testing.assert_allclose(p["rlnDefocusU"], [float(r[2]) for r in kept], rtol=1e-6)
    assert [f"{n:06d}@{s}" for n, s in zip(p["rlnImageName@number"], p["rlnImageName"])] == [r[1] for r in kept]


@pytest.mark.relion
@RELION
def test_relion_reads_what_we_write(tmp_path):
    path = hostile(tmp_path)
    blocks = read_star(path, compact=True)
    ours = tmp_path / "ours.star"
    write_star(ours, blocks)
    run = relion_star_handler(ours, tmp_path / "relion.star")
    assert run.returncode == 0, run.stdout + run.stderr
    kept = relion_rows(tmp_path / "relion.star")
    assert [r[0] for r in kept] == [r[1] for r in ROWS]
    assert [r[3] for r in kept] == [r[3] for r in ROWS]


@pytest.mark.relion
@RELION
@pytest.mark.parametrize("row", ['m1 000001@s.mrcs 100.5 "g1 1', "m1 000001@s.mrcs 100.5 g1 #1"])
def test_relion_refuses_what_we_refuse(tmp_path, row):
    path = hostile(tmp_path, ROWS[:2] + [(row,)])
    run = relion_star_handler(path, tmp_path / "relion.star")
    assert run.returncode != 0 and "ERROR" in run.stdout + run.stderr
    with pytest.raises(ParticleError, match=f"line {(OPTICS + HEAD).count(chr(10)) + 3}"):
        read_star(path, compact=True)
