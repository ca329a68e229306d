"""RELION STAR files: blocks in, blocks out. Knows the file format, not the science."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

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
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName", "rlnMicrographName",
                                                                      "rlnOpticsGroupName"])
    except Exception as exc:  # the parser raises many types; the user needs one message
        raise ParticleError(f"could not parse as a STAR file ({type(exc).__name__}: {exc})", path=path) from exc
    if not blocks:
        raise ParticleError("no data blocks found; expected a STAR file with a particle table", path=path)
    return blocks


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
