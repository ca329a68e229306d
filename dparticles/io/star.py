"""RELION STAR files: blocks in, blocks out. Knows the file format, not the science."""

from __future__ import annotations

import csv
import os
import re
import shlex
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from dparticles.errors import ParticleError


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame | dict]:
    """Read every data block of a STAR file, keyed by block name ('' for an unnamed ``data_``).

    Raises ParticleError naming the file when it cannot be read or parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleError("no such STAR file", path=path)
    as_string = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName"]
    try:
        blocks = _read_fast(path, as_string)
    except Exception:  # anything unusual: the reference parser decides, and words the error
        blocks = None
    try:
        if blocks is None:
            blocks = starfile.read(path, always_dict=True, parse_as_string=as_string)
    except Exception as exc:  # the parser raises many types; the user needs one message
        raise ParticleError(f"could not parse as a STAR file ({type(exc).__name__}: {exc})", path=path) from exc
    if not blocks:
        raise ParticleError("no data blocks found; expected a STAR file with a particle table", path=path)
    return blocks


_DATA = re.compile(r"^[ \t]*data_([^\n]*)$", re.M)


def _read_fast(path: Path, as_string: list[str]) -> dict[str, pd.DataFrame | dict]:
    """What ``starfile.read`` returns, without its line-by-line loop: block boundaries are found by
    one regex pass and each loop body goes to the C CSV reader in one piece (a million-row particle
    table in about a second instead of several)."""
    text = path.read_text(encoding="utf-8")
    heads = list(_DATA.finditer(text))
    blocks: dict[str, pd.DataFrame | dict] = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        block = _block(text, m.end(), end, as_string)
        if block is not None:
            blocks[m.group(1).strip()] = block
    return blocks


def _block(text: str, pos: int, end: int, as_string: list[str]) -> pd.DataFrame | dict | None:
    """One data block: a loop (DataFrame) or key-value pairs (dict), as starfile reads them."""
    lines = iter(_lines(text, pos, end))
    for line, _ in lines:
        if line.startswith("loop_"):
            break
        if line.startswith("_"):
            return _pairs([line] + [ln for ln, _ in lines], as_string)
    else:
        return None
    columns: list[str] = []
    body = end
    for line, start in lines:
        if line.startswith("_"):
            columns.append(line.split()[0][1:])
        elif line:
            body = start
            break
    data = text[body:end]
    if not data.strip():
        return pd.DataFrame(np.zeros((0, len(columns))), columns=columns)
    index = {c: i for i, c in enumerate(columns)}
    df = pd.read_csv(StringIO(data.replace("'", '"')), sep=r"\s+", header=None, comment="#",
                     dtype={index[c]: str for c in as_string if c in index}, keep_default_na=False,
                     na_values=["nan", "NaN", "<NA>"], engine="c")
    if df.shape[1] != len(columns):
        raise ValueError("row length differs from the number of columns")
    df.columns = columns
    for c in columns:
        if c in as_string:
            continue
        try:
            numeric = pd.to_numeric(df[c])
        except (ValueError, TypeError):
            continue
        if not numeric.isna().all():
            df[c] = numeric
    return df


def _lines(text: str, pos: int, end: int):
    """(stripped line, start offset) from ``pos`` to ``end``."""
    while pos < end:
        stop = text.find("\n", pos, end)
        stop = end if stop < 0 else stop
        yield text[pos:stop].strip(), pos
        pos = stop + 1


def _pairs(lines: list[str], as_string: list[str]) -> dict:
    out: dict = {}
    for line in lines:
        if line.startswith("_"):
            key, value = shlex.split(line)
            out[key[1:]] = value if key[1:] in as_string else _number(value)
    return out


def _number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame]) -> None:
    """Write blocks as loops, RELION 3.1 style (``# version 30001`` before each block).

    Writes to ``path`` directly; callers make it atomic (temporary name, then rename).
    """
    with open(path, "w", encoding="utf-8") as f:
        for name, df in blocks.items():
            f.write(f"\n# version 30001\n\ndata_{name}\n\nloop_ \n")
            for i, col in enumerate(df.columns, start=1):
                f.write(f"_{col} #{i} \n")
            if len(df):
                _write_rows(f, df)
            f.write("\n")


def _write_rows(f, df: pd.DataFrame) -> None:
    """One row per line, space separated; floats at full precision; strings that are empty or hold
    whitespace are double-quoted (the fast csv path cannot quote, so such tables take a slower path)."""
    text_cols = [c for c in df.columns if df[c].dtype.kind in "OUST" or isinstance(df[c].dtype, pd.StringDtype)]
    needs_quotes = any(df[c].astype(str).str.contains(r"^$|\s", regex=True).any() for c in text_cols)
    if not needs_quotes:
        df.to_csv(f, sep=" ", header=False, index=False, lineterminator="\n", quoting=csv.QUOTE_NONE,
                  quotechar="\x07")
        return
    quoted = df.copy()
    for c in text_cols:
        quoted[c] = quoted[c].astype(str).map(lambda v: f'"{v}"' if (v == "" or re.search(r"\s", v)) else v)
    for row in quoted.itertuples(index=False):
        f.write(" ".join(map(str, row)) + "\n")
