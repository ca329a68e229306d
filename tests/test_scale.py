"""Large particle sets: 200,000 generated particles in sparse stacks open in seconds and take little
memory per particle, and the STAR file written from them gives back the input, column for column;
the compact STAR reader gives what the careful one gives on every real file and on odd layouts; the
STAR writer's text is ``DataFrame.to_csv``'s, byte for byte; ``info`` counts without Python loops."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from helpers import image_names, make_stack, optics_table, write_star

from dparticles.dataset import open_particles, table
from dparticles.formats import relion as star
from dparticles.formats.mrc import stack_header
from dparticles.jobs.info import describe
from dparticles.store import write_metadata

N, PER_STACK, IN_USE, BOX = 200_000, 167, 100, 64
LIMIT_SECONDS = 10.0  # 1.3 s measured on a busy 2-CPU machine
LIMIT_BYTES = 250  # metadata kept per particle: 180 measured for these 17 columns; a string per text value is 60 more each


# --- 200,000 particles -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_set(tmp_path_factory) -> Path:
    """200,000 particles, 100 of each of 2,000 sparse stacks of 167, shuffled, as dparticles and
    starfile write STAR files (single spaces, shortest decimals), with an image-name column RELION
    keeps (``rlnImageOriginalName``) and a constant one."""
    root = tmp_path_factory.mktemp("scale")
    stacks = root / "Extract" / "job001"
    stacks.mkdir(parents=True)
    header = stack_header(PER_STACK, BOX, np.float32, 1.1, "sparse")
    for k in range(N // IN_USE):
        with open(stacks / f"mic_{k:05d}.mrcs", "wb") as f:
            f.write(header)
            f.truncate(1024 + PER_STACK * BOX * BOX * 4)
    rng = np.random.default_rng(7)
    stack = np.repeat(np.arange(N // IN_USE), IN_USE)
    index = np.sort(np.argsort(rng.random((N // IN_USE, PER_STACK)), axis=1)[:, :IN_USE], axis=1).ravel()
    order = rng.permutation(N)
    stack, index = stack[order], index[order]
    name = pd.Series(stack).map(lambda k: f"Extract/job001/mic_{k:05d}.mrcs")
    number = pd.Series(index + 1).astype(str).str.zfill(6)
    p = pd.DataFrame({
        "rlnImageName": number + "@" + name,
        "rlnMicrographName": pd.Series(stack).map(lambda k: f"MotionCorr/job002/mic_{k:05d}.mrc"),
        "rlnCoordinateX": rng.uniform(0, 4096, N).round(1), "rlnCoordinateY": rng.uniform(0, 4096, N).round(1),
        "rlnDefocusU": rng.uniform(8000, 25000, N).round(2), "rlnDefocusV": rng.uniform(8000, 25000, N).round(2),
        "rlnDefocusAngle": rng.uniform(-180, 180, N).round(2), "rlnAngleRot": rng.uniform(-180, 180, N),
        "rlnAngleTilt": rng.uniform(0, 180, N).round(3), "rlnAnglePsi": rng.uniform(-180, 180, N).round(3),
        "rlnOriginXAngst": rng.uniform(-10, 10, N).round(3), "rlnOriginYAngst": rng.uniform(-10, 10, N).round(3),
        "rlnClassNumber": rng.integers(1, 11, N), "rlnCtfBfactor": np.zeros(N),
        "rlnImageOriginalName": number + "@Extract/job000/" + name.str.slice(15),
        "rlnRandomSubset": rng.integers(1, 3, N), "rlnOpticsGroup": np.ones(N, dtype=np.int64)})
    path = root / "Select" / "job002" / "particles.star"
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        f.write("\n# version 30001\n\ndata_optics\n\nloop_\n")
        optics = optics_table([1.1], BOX)
        f.write("".join(f"_{c} #{i}\n" for i, c in enumerate(optics.columns, 1)))
        optics.to_csv(f, sep=" ", header=False, index=False, lineterminator="\n")
        f.write("\n\n# version 30001\n\ndata_particles\n\nloop_\n")
        f.write("".join(f"_{c} #{i}\n" for i, c in enumerate(p.columns, 1)))
        p.to_csv(f, sep=" ", header=False, index=False, lineterminator="\n")
    return path


_MEASURE = """
import json, resource, sys, time, tracemalloc
from dparticles.dataset import open_particles
path = sys.argv[1]
open_particles(path, ignore_raw=True)  # warm the page cache and every import
t0 = time.perf_counter()
ds = open_particles(path)
seconds = time.perf_counter() - t0
del ds
tracemalloc.start()
ds = open_particles(path)
retained, peak = tracemalloc.get_traced_memory()
print(json.dumps({"seconds": seconds, "retained": retained, "peak": peak, "n": ds.sizes["particle"]}))
"""


def test_200k_particles_open_in_seconds_in_little_memory(big_set):
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(big_set)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout.splitlines()[-1])
    assert r["n"] == N
    assert r["seconds"] < LIMIT_SECONDS, r
    assert r["retained"] / N < LIMIT_BYTES, r
    assert r["peak"] / N < 4 * LIMIT_BYTES, r


def test_200k_particles_write_back_the_same_star_text(big_set, tmp_path):
    ds = open_particles(big_set)
    out = tmp_path / "out"
    out.mkdir()
    names = ds["image_name"].values
    assert names[0] is names[int(np.flatnonzero(names == names[0])[1])]  # one string per stack, shared
    write_metadata(out, ds, names, ds["image_index"].values)
    written, given = _loop(out / "particles.star"), _loop(big_set)
    assert len(written) == len(given) == N
    for label in given.columns:
        assert written[label].tolist() == given[label].tolist(), label
    assert set(written.columns) == set(given.columns)


def _loop(path: Path) -> pd.DataFrame:
    """The particle loop's cells as written (text), by label."""
    text = path.read_text()
    body = text[text.index("data_particles"):]
    labels = [line.split()[0][1:] for line in body.splitlines() if line.startswith("_")]
    rows = [line for line in body.splitlines()[1:] if line and not line.startswith(("_", "loop_"))]
    return pd.DataFrame([r.split(" ") for r in rows], columns=labels, dtype=object)


def test_200k_particles_compact_in_xarray_and_pandas(big_set):
    ds = open_particles(big_set)
    assert isinstance(ds.indexes["particle"], pd.RangeIndex)
    assert ds["pixel_size"].values.strides == (0,) and ds["box"].values.strides == (0,)  # one value, no memory
    assert ds["star:rlnImageOriginalName@number"].dtype == np.int64
    t = table(ds)
    for name in ("image_name", "micrograph", "image_path", "optics_group_name", "star:rlnImageOriginalName"):
        assert isinstance(t[name].dtype, pd.CategoricalDtype), name
    assert len(t["image_name"].cat.categories) == N // IN_USE
    # selections copy what they keep and stay consistent with the images they point at
    cls = ds["class_number"].values
    sub = ds.isel(particle=np.flatnonzero(cls == 3))
    sel = ds.where(ds.class_number == 3, drop=True)
    for name in ("micrograph", "image_name", "image_path", "defocus_u", "pixel_size", "image_index"):
        assert (sub[name].values == sel[name].values).all(), name
        assert (sub[name].values == ds[name].values[cls == 3]).all(), name


def test_info_counts_without_python_loops(big_set):
    ds = open_particles(big_set)
    info = describe(ds)
    assert info["n_particles"] == N and info["n_stacks"] == N // IN_USE and info["particles_on_disk"] == PER_STACK * N // IN_USE
    assert info["box"] == BOX and info["pixel_size"] == 1.1 and info["duplicate_images"] == 0
    assert info["optics_groups"] == [{"optics_group": 1, "name": "opticsGroup1", "pixel_size": 1.1, "box": BOX,
                                      "voltage": 300.0, "cs": 2.7, "amp_contrast": 0.1, "n_particles": N}]
    twice = ds.isel(particle=np.r_[np.arange(10), np.arange(3), np.arange(10, 50)])
    p = table(twice)
    assert describe(twice)["duplicate_images"] == p.duplicated(["image_path", "image_index"]).sum() == 3


# --- the compact reader against the careful one --------------------------------------------------

def _odd_files(folder: Path) -> list[Path]:
    """Layouts the fast path must read right, or hand to the careful reader."""
    folder.mkdir()
    make_stack(folder / "s.mrcs", 3, 8)
    base = {"rlnImageName": image_names(range(3), "s.mrcs"), "rlnOpticsGroup": [1] * 3}
    files = [write_star(folder / "tabs.star", base | {"rlnMicrographName": ["a", "b", "c"]}, optics_table([1.0], 8), sep="\t"),
             write_star(folder / "quoted.star", base | {"rlnMicrographName": ["a b", "c", "d"]}, optics_table([1.0], 8)),
             write_star(folder / "last.star", base, optics_table([1.0], 8), optics_first=False),
             write_star(folder / "numeric_names.star", base | {"rlnMicrographName": ["001", "002", "1e5"],
                                                               "rlnGroupName": ["7", "x", "9"]}, optics_table([1.0], 8)),
             write_star(folder / "short_numbers.star", base | {"rlnImageOriginalName": ["1@a.mrcs", "22@b.mrcs", "3@a.mrcs"]},
                        optics_table([1.0], 8)),
             write_star(folder / "unpadded.star", {"rlnImageName": ["1@s.mrcs", "3@s.mrcs", "2@s.mrcs"],
                                                   "rlnOpticsGroup": [1] * 3}, optics_table([1.0], 8)),
             write_star(folder / "data_in_paths.star", {"rlnImageName": image_names(range(3), "data_x/s.mrcs"),
                                                        "rlnOpticsGroup": [1] * 3}, optics_table([1.0], 8)),
             write_star(folder / "nan.star", base | {"rlnDefocusU": [1.0, float("nan"), 3.0]}, optics_table([1.0], 8))]
    crlf = folder / "crlf.star"
    crlf.write_bytes(files[0].read_bytes().replace(b"\n", b"\r\n"))
    comments = folder / "comments.star"
    comments.write_text(files[2].read_text().replace("\n1 ", "\n# a comment\n1 ", 1) + "\n   \n# the end\n")
    return files + [crlf, comments]


def _same_blocks(fast: dict, careful: dict, name: str) -> None:
    assert list(fast) == list(careful), name
    for k, b in careful.items():
        a = fast[k]
        if not isinstance(b, pd.DataFrame):
            assert a == b, (name, k)
            continue
        assert list(a.columns) == list(b.columns), (name, k)
        for c in b.columns:
            x, y = a[c], b[c]
            if isinstance(y.dtype, pd.CategoricalDtype):
                assert isinstance(x.dtype, pd.CategoricalDtype), (name, k, c, x.dtype)
                assert x.astype(object).fillna("<missing>").tolist() == y.astype(object).fillna("<missing>").tolist()
            else:
                assert x.dtype == y.dtype, (name, k, c, x.dtype, y.dtype)
                np.testing.assert_array_equal(x.to_numpy(), y.to_numpy(), err_msg=f"{name} {k} {c}")


@pytest.mark.parametrize("piece", [16 * 2**20, 64])
def test_compact_reader_equals_starfile(real, tmp_path, monkeypatch, piece):
    """The compact reader gives what starfile reads, in compact form, on every real STAR file and on
    odd layouts; in small pieces (64 bytes: a line or two each) as well as in large ones."""
    monkeypatch.setattr(star, "PIECE_BYTES", piece)
    for f in sorted(real.rglob("*.star")) + _odd_files(tmp_path / "odd"):
        ref = starfile.read(f, always_dict=True, parse_as_string=star.AS_STRING)
        careful = {k: compact_loop(v) if isinstance(v, pd.DataFrame) else v for k, v in ref.items()}
        _same_blocks(star.read_star(f, compact=True), careful, str(f))


def compact_loop(df: pd.DataFrame) -> pd.DataFrame:
    """A loop as starfile reads it (text as Python strings) in the compact form of
    ``read_star(compact=True)``: text as categories, ``N@text`` split where RELION writes it so."""
    out: dict[str, object] = {}
    for c in df.columns:
        s = df[c]
        if not star._is_text(s):
            out[c] = s.to_numpy()
            continue
        values = s.to_numpy(dtype=object)
        parts = pd.Series(values, dtype=object).str.extract(r"^(\d+)@(.+)$") if len(s) else None
        if parts is not None and not parts.isna().any().any():
            number, text = _categorical(parts[0].to_numpy(dtype=object)), _categorical(parts[1].to_numpy(dtype=object))
            pair = star._pair(number.codes, number.categories.tolist(), text.codes, text.categories.tolist(), c in star.NUMBERED)
            if pair is not None and pair[1] is not None:
                out[c] = pd.Categorical.from_codes(pair[0][0], categories=pd.Index(pair[0][1], dtype=object))
                out[c + star.NUMBER] = pair[1]
                continue
        out[c] = s.array if isinstance(s.dtype, pd.CategoricalDtype) else _categorical(values)
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)), copy=False)


def _categorical(values: np.ndarray) -> pd.Categorical:
    """Distinct values in order of first appearance, by hashing (no sort)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    return pd.Categorical.from_codes(codes, categories=pd.Index(uniques, dtype=object))



def test_compact_reader_handles_text_late_in_a_numeric_column(tmp_path, monkeypatch):
    monkeypatch.setattr(star, "PIECE_BYTES", 4096)
    n = 2000
    group = np.arange(n).astype(str).astype(object)
    group[-1] = "late_text"
    path = write_star(tmp_path / "p.star", {"rlnImageName": image_names(range(n), "s.mrcs"), "rlnGroupName": group,
                                            "rlnDefocusU": np.r_[np.arange(n - 1), 0.5]}, optics_table([1.0], 8))
    fast = star.read_star(path, compact=True)
    assert fast["particles"]["rlnGroupName"].tolist() == group.tolist()
    assert fast["particles"]["rlnDefocusU"].dtype == np.float64
    assert fast["particles"]["rlnImageName@number"].tolist() == list(range(1, n + 1))
    assert star._read_compact(path) is not None  # the fast path itself, not a fallback


# --- the writer ------------------------------------------------------------------------------------

def _both(df: pd.DataFrame) -> tuple[bytes, bytes]:
    labels = [c for c in df.columns if not star._is_number_of(c, df)]
    fast, csv = io.BytesIO(), io.BytesIO()
    star._write_rows(fast, df, labels)
    star._write_rows_csv(csv, star._joined(df, labels))
    return fast.getvalue(), csv.getvalue()


def test_writer_text_is_to_csv_text():
    rng = np.random.default_rng(1)
    n = 300_000
    x = np.concatenate([rng.integers(0, 2**64, n, dtype=np.uint64).view(np.float64),  # any bit pattern
                        rng.uniform(-1e6, 1e6, n).round(3), rng.normal(0, 1e-3, 1000),
                        [0.0, -0.0, 1.0, -1.0, 300.0, 1e15, 1e16, 1e-4, 9.9999e-5, 1e10, 9999999999.5, 1e-5, 5e-324,
                         np.inf, -np.inf, np.nan, 2.5e-7, 123456789.0, 0.1, 1 / 3]])
    fast, csv = _both(pd.DataFrame({"k": np.arange(len(x)), "x": x}))
    assert fast == csv
    m = 1000
    mixed = pd.DataFrame({
        "i": rng.integers(-5, 5, m), "u": rng.integers(0, 5, m).astype(np.uint32), "f": rng.normal(size=m),
        "c": pd.Categorical.from_codes(rng.integers(-1, 3, m), ["a", "b/c.mrc", "x"]),
        "o": np.array(["p", None, "q", np.nan] * (m // 4), dtype=object), "b": rng.integers(0, 2, m).astype(bool),
        "f32": rng.normal(size=m).astype(np.float32), "s": pd.Series(["x"] * (m - 1) + [None], dtype="str"),
        "n": pd.Categorical.from_codes(rng.integers(0, 2, m), ["Extract/a.mrcs", "b.mrcs"]),
        "n@number": rng.integers(1, 2_000_000, m)})
    fast, csv = _both(mixed)
    assert fast == csv
    quoted = mixed.assign(c=pd.Categorical.from_codes(rng.integers(0, 2, m), ["a b", ""]))
    assert star._fast_columns(quoted, list(quoted.columns)) is None  # quoting takes the csv path


def test_write_star_joins_numbered_pairs(tmp_path):
    df = pd.DataFrame({"rlnImageName": pd.Categorical(["a.mrcs", "b.mrcs"]), "rlnImageName@number": [3, 1234567],
                       "rlnDefocusU": [1.5, 2.0]})
    star.write_star(tmp_path / "p.star", {"particles": df})
    text = (tmp_path / "p.star").read_text()
    assert "_rlnImageName #1 \n_rlnDefocusU #2 \n000003@a.mrcs 1.5\n1234567@b.mrcs 2.0\n" in text
    back = star.read_star(tmp_path / "p.star", compact=True)["particles"]
    assert back["rlnImageName@number"].tolist() == [3, 1234567] and back["rlnImageName"].tolist() == ["a.mrcs", "b.mrcs"]
