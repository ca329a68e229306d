"""RELION STAR files: blocks in, blocks out. Knows the file format, not the science.

Values are read as RELION 3.1 reads them (``MetaDataTable::readStarLoop`` and ``nextTokenInSTAR``):

- each loop line is first simplified: tabs become spaces; carriage returns and the control characters
  ``\\v \\b \\f \\a`` are dropped; leading and trailing spaces go and a run of spaces becomes one space,
  inside quotes too;
- values are then separated by spaces. A value that starts with ``'`` or ``"`` runs to the first same
  quote that is followed by a space or the end of the line; the quotes around it are removed, and any
  quote or ``#`` inside it is kept (``"a"b c"`` is ``a"b c``; ``""`` is the empty string). A quote with
  no closing one is an error;
- a value that starts with ``#`` starts a comment, to the end of the line. A ``#`` or a quote anywhere
  else in a value is part of it (``mic#1.mrc``, ``it's.mrc``).

Where we differ from RELION 3.1, we are stricter or keep more, never alter a value: a comment line
inside a loop is skipped (RELION counts it as a row with no values and stops), numbers must be whole
numbers (RELION's ``sscanf`` reads ``1#x`` as 1).

``read_star(path)`` gives every block with text as Python strings (as ``starfile`` gives them);
``read_star(path, compact=True)`` is for particle tables of millions of rows. Both come from one
reader: the file is read in pieces of :data:`PIECE_BYTES` of whole lines, each loop piece is simplified
(vectorised), has its quoted values and comments resolved (only when it holds any), and is parsed by
pyarrow's CSV reader in a thread. Columns come back compact:

- numbers as int64 / float64 arrays (the type inferred over the whole column);
- text as a ``pandas.Categorical`` (a code per row into the distinct values, which repeat:
  micrograph and stack names, optics group names);
- a column of :data:`NUMBERED` labels whose every value is ``<digits>@<text>`` (RELION image names,
  ``000012@Extract/job007/x.mrcs``) as two: ``label`` (the text after ``@``, categorical) and
  ``label + NUMBER`` (the number before it, int64). :func:`write_star` writes such a pair back as
  one column, the number zero-padded to six digits as RELION writes it.

:func:`write_star` formats whole columns at once (pyarrow) and gives, byte for byte, the text
``DataFrame.to_csv(na_rep="nan")`` gives (shortest round-trip floats, ``NaN`` as ``nan``, as RELION
writes it; never an empty field, which would shift the columns after it).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from dparticles.errors import ParticleError
from dparticles.metadata import (CANONICAL, FINITE_COLUMNS, FLOAT_COLUMNS, Table, categorical, finite, first_bad, floats,
                                 group_names, ints, same, same_or, signs, values_of, whole)

AS_STRING = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName"]  # text even when they look numeric
NUMBERED = ("rlnImageName",)
NUMBER = "@number"
PIECE_BYTES = 4 * 2**20  # lines parsed per task; a few pieces per thread are in memory at once
WRITE_ROWS = 200_000  # rows formatted per task when writing
_NA = ["nan", "NaN", "<NA>"]


NAME = "relion"
SUFFIXES = (".star",)
METADATA_FILE = "particles.star"  # what an output folder holds


def guess_can_open(path: Path) -> bool:
    """A RELION STAR file, by its name."""
    return path.suffix.lower() in SUFFIXES and not path.is_dir()


def open_table(path: Path) -> Table:
    """The particles of a STAR file (3.0 single table, 3.1+ optics and particles) as the canonical table."""
    return from_star(read_star(path, compact=True), path)


def write_particles(path: Path, particles: pd.DataFrame, paths: np.ndarray | None, indices: np.ndarray | None,
                    attrs: dict) -> None:
    """Write the canonical table as a RELION 3.1 STAR file at ``path`` (the caller makes it atomic);
    the images at ``paths`` / ``indices`` (0-based)."""
    write_star(path, to_star(particles, paths, indices))


def read_star(path: str | os.PathLike, *, compact: bool = False) -> dict[str, pd.DataFrame | dict]:
    """Read every data block of a STAR file, keyed by block name ('' for an unnamed ``data_``).

    ``compact``: loops as described in the module docstring. Raises ParticleError naming the file
    (and the line, when one is at fault) when it cannot be read or parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleError("no such STAR file", path=path)
    try:
        blocks = _read_compact(path) if compact else _read_fast(path, AS_STRING)
    except Exception as exc:  # a fault somewhere in the file: the line scan finds the line and words it
        check_star(path)
        why = (str(exc).strip().splitlines() or [""])[0]
        raise ParticleError(f"could not parse as a STAR file ({type(exc).__name__}: {why})", path=path) from exc
    if not blocks:
        raise ParticleError("no data blocks found; expected a STAR file with a particle table", path=path)
    return blocks


# ---------------------------------------------------------------------------------------------
# RELION's reading of a line, for whole pieces of lines at once
# ---------------------------------------------------------------------------------------------

_TABS = bytes.maketrans(b"\t", b" ")
_DROPPED = b"\r\x0b\x08\x0c\x07"  # RELION's unescape() drops these before anything else
SPACE, EMPTY = b"\x07", b"\x08"  # stand-ins, inside quoted values, for a space and for an empty value:
# bytes that simplifying drops, so never in simplified text
_SPECIAL = re.compile(rb"""(?:(?<= )|^)(["'])(?:([^\n]*?)\1(?= |$))?|(?: |^)\#[^\n]*""", re.M)
_SPECIAL_STARTS = [a + b for a in (b" ", b"\n") for b in (b'"', b"'", b"#")]


def simplify(piece: bytes) -> bytes:
    """Lines as RELION's ``simplify()`` leaves them: tabs as spaces, ``\\r \\v \\b \\f \\a`` dropped,
    no leading or trailing spaces, one space between values. Vectorised: the spaces to keep are
    found by numpy (the last of each run, unless a newline or the end follows) and picked by
    pyarrow's filter, which copies the long runs of kept bytes whole (several times numpy's speed)."""
    if any(c in piece for c in _DROPPED + b"\t"):  # memchr each: rare bytes, so cheaper than translate
        piece = piece.translate(_TABS, _DROPPED)
    if not (b"  " in piece or b"\n " in piece or b" \n" in piece or piece[:1] == b" " or piece[-1:] == b" "):
        return piece
    a = np.frombuffer(piece, np.uint8)
    space = a == 32
    keep = np.empty_like(space)
    np.logical_and(space[:-1], space[1:] | (a[1:] == 10), out=keep[:-1])  # a space before a space or newline
    keep[-1] = space[-1]
    np.logical_not(keep, out=keep)
    mask = pa.BooleanArray.from_buffers(pa.bool_(), len(keep), [None, pa.py_buffer(np.packbits(keep, bitorder="little"))])
    kept = pc.filter(pa.UInt8Array.from_buffers(pa.uint8(), len(a), [None, pa.py_buffer(piece)]), mask)
    out = kept.buffers()[1].slice(kept.offset, len(kept)).to_pybytes()
    if out[:1] == b" ":  # a run that opens a line leaves its last space: remove it
        out = out[1:]
    return out.replace(b"\n ", b"\n") if b"\n " in out else out


def resolve(text: bytes) -> tuple[bytes, bool]:
    """Simplified lines with comments removed and each quoted value unquoted, its spaces as
    :data:`SPACE` (an empty one as :data:`EMPTY`), so that single spaces separate the values; and
    whether anything was unquoted. Raises ValueError for a quote with no closing one."""
    if not ((b'"' in text or b"'" in text or b"#" in text)  # memchr: fast, as these bytes are rare
            and (text[:1] in (b'"', b"'", b"#") or any(s in text for s in _SPECIAL_STARTS))):
        return text, False
    return _SPECIAL.sub(_resolve_one, text), True


def _resolve_one(m: re.Match) -> bytes:
    if m.group(1) is None:  # a comment
        return b""
    if m.group(2) is None:
        raise ValueError(f"a value opens with {m.group(1).decode()} and has no closing {m.group(1).decode()} "
                         f"(followed by a space or the end of the line)")
    return m.group(2).replace(b" ", SPACE) or EMPTY


def unmark(value: str) -> str:
    """A value as read, from its form in resolved text."""
    return "" if value == EMPTY.decode() else value.replace(SPACE.decode(), " ")


def tokens(line: str) -> list[str]:
    """The values of one line as RELION reads them (comments dropped, quotes removed)."""
    text, marked = resolve(simplify(line.encode("utf-8")))
    values = text.decode("utf-8").split(" ") if text else []
    return [unmark(v) for v in values] if marked else values


# ---------------------------------------------------------------------------------------------
# the line scan: slow and exact, run only to find the line at fault once something is known wrong
# ---------------------------------------------------------------------------------------------

def _scan(path: Path):
    """(block name, kind, 1-based line number, tokens) for each line of a STAR file that matters:
    kind 'data' (a block opens), 'label' (a loop label), 'row' (a loop row), 'pair' (key value)."""
    block, in_loop, labels_done = None, False, False
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s.startswith("data_"):
                block, in_loop, labels_done = s[5:].strip(), False, False
                yield block, "data", number, []
            elif s.startswith("loop_"):
                in_loop, labels_done = True, False
            elif s.startswith("_"):
                if in_loop and labels_done:  # a label after rows: a new loop in the same block
                    labels_done = False
                yield block, "label" if in_loop else "pair", number, s.split()[:1 if in_loop else 2]
            elif in_loop:
                labels_done = True
                try:
                    values = tokens(s)
                except ValueError as exc:
                    raise ParticleError(f"data_{block} row: {exc}", path=path, line=number) from None
                yield block, "row", number, values


def check_star(path: Path) -> None:
    """Raise ParticleError naming the line when a STAR file's structure is faulty: a loop row whose
    number of values is not its number of labels, a quote not closed, a label given twice in one loop,
    or more than one data_particles block."""
    labels: list[str] = []
    seen: dict[str, int] = {}
    particles: list[int] = []
    for block, kind, number, values in _scan(path):
        if kind == "data":
            labels, seen = [], {}
            if block == "particles":
                particles.append(number)
        elif kind == "label":
            if seen.get("row"):
                labels, seen = [], {}
            label = values[0][1:]
            if label in seen:
                raise ParticleError(f"label _{label} appears twice in the loop of data_{block} (first on line "
                                    f"{seen[label]}); expected each label once", path=path, line=number)
            seen[label] = number
            labels.append(label)
        elif kind == "row":
            seen["row"] = number
            if len(values) != len(labels):
                raise ParticleError(f"data_{block} row: expected {len(labels)} fields (one per label), got "
                                    f"{len(values)}", path=path, line=number)
    if len(particles) > 1:
        raise ParticleError(f"file holds {len(particles)} data_particles blocks; expected one (they open on "
                            f"lines {', '.join(map(str, particles))}; RELION would read only the first)", path=path)


def line_of_row(path: Path, block: str, row: int) -> int | None:
    """The 1-based line number of row ``row`` (0-based) of the loop of ``block``."""
    k = 0
    for name, kind, number, _ in _scan(path):
        if kind == "row" and name == block:
            if k == row:
                return number
            k += 1
    return None


# ---------------------------------------------------------------------------------------------
# text as Python strings, as starfile gives it
# ---------------------------------------------------------------------------------------------

def _read_fast(path: Path, as_string: list[str]) -> dict[str, pd.DataFrame | dict]:
    """What ``starfile.read`` returns (text as Python strings, ``N@text`` values whole), read as
    RELION reads values: the compact reader's blocks, with its text columns made plain."""
    blocks = _read_compact(path, split=False, as_string=as_string)
    return {k: _plain(v) if isinstance(v, pd.DataFrame) else v for k, v in blocks.items()}


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: np.asarray(df[c].array.astype(object)) if isinstance(df[c].dtype, pd.CategoricalDtype)
                         else df[c].to_numpy() for c in df.columns}, index=pd.RangeIndex(len(df)), copy=False)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(np.zeros((0, len(columns))), columns=columns)


def _pairs(lines: list[str], as_string: list[str]) -> dict:
    """Key-value lines (``_label value``) as a dict; values read as loop values are."""
    out: dict = {}
    for line in lines:
        if line.startswith("_"):
            values = tokens(line)
            if len(values) < 2:
                raise ValueError(f"no value after {values[0]}")
            out[values[0][1:]] = values[1] if values[0][1:] in as_string else _number(values[1])
    return out


def _number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _is_text(s: pd.Series) -> bool:
    return s.dtype.kind in "OUST" or isinstance(s.dtype, (pd.StringDtype, pd.CategoricalDtype))


# ---------------------------------------------------------------------------------------------
# the reader: whole lines in pieces, parsed in threads
# ---------------------------------------------------------------------------------------------

class _Unusual(Exception):
    """A layout the reader does not take (the line scan then says where and why)."""


class _Retype(Exception):
    """Columns thought numeric hold text further down, or ``N@text`` columns hold other values:
    parse the loop again with them as text (``plain``: as whole values, not split at ``@``)."""

    def __init__(self, labels: list[str], plain: bool = False):
        super().__init__(", ".join(labels))
        self.labels, self.plain = labels, plain


_NEXT_DATA = re.compile(rb"\n[ \t]*data_")
_DATA_HERE = re.compile(rb"[ \t]*data_")


class _Source:
    """A file as whole lines, read :data:`PIECE_BYTES` at a time (each read cut after its last
    newline, so that a loop body is handed on as the buffer itself, not a copy of it)."""

    def __init__(self, f):
        self.fd, self.size = f.fileno(), os.fstat(f.fileno()).st_size
        self.buf, self.pos, self.base, self.eof = b"", 0, 0, False  # base: file offset of buf[0]

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = os.pread(self.fd, PIECE_BYTES, self.base + len(self.buf))
        if not chunk:
            self.eof = True
            return False
        cut = chunk.rfind(b"\n") + 1
        if 0 < cut < len(chunk):
            chunk = chunk[:cut]
        rest = self.buf[self.pos:]
        self.base += self.pos
        self.buf, self.pos = (rest + chunk if rest else chunk), 0
        return True

    def tell(self) -> int:
        return self.base + self.pos

    def seek(self, offset: int) -> None:
        self.buf, self.pos, self.base, self.eof = b"", 0, offset, False

    def line(self) -> tuple[bytes | None, int]:
        """The next line without its newline, and where it starts (for :meth:`unread`, right after)."""
        while True:
            stop = self.buf.find(b"\n", self.pos)
            if stop >= 0:
                start, self.pos = self.pos, stop + 1
                return self.buf[start:stop], start
            if not self._more():
                start, self.pos = self.pos, len(self.buf)
                return (self.buf[start:], start) if start < len(self.buf) else (None, start)

    def unread(self, start: int) -> None:
        self.pos = start

    def body(self):
        """(file offset, bytes read, length of its whole lines) for pieces of whole lines from here to
        the end of the file, each read by one ``pread``; a line cut at the end of a read is read again
        with the next piece, and the parsers, not this thread, cut it off. Where a loop ends is also
        found by the parsers, in parallel (see :func:`_loop_end`)."""
        offset, size = self.tell(), PIECE_BYTES
        while True:
            piece = os.pread(self.fd, size, offset)
            if not piece:
                break
            cut = piece.rfind(b"\n") + 1 or len(piece)
            if cut == len(piece) == size and not piece.endswith(b"\n"):  # a line longer than a piece: read more
                size *= 2
                continue
            yield offset, piece, cut
            offset += cut
        self.seek(offset)


def _loop_end(piece: bytes, end: int) -> int | None:
    """Where the first line of ``piece[:end]`` (whole lines) that opens a data_ block starts; None if none."""
    if _DATA_HERE.match(piece, 0, end):
        return 0
    m = _next_data(piece, 0, end)
    return None if m is None else m + 1


def _next_data(buf: bytes, start: int, end: int) -> int | None:
    """Offset of the newline before the first line in ``[start, end)`` that opens a data_ block."""
    pos = start
    for _ in range(100):  # "data_" elsewhere (in paths) is rare: check each, then let a regex scan
        hit = buf.find(b"data_", pos, end)
        if hit < 0:
            return None
        line = buf.rfind(b"\n", start, hit)
        if line >= 0 and not buf[line + 1:hit].strip(b" \t"):
            return line
        pos = hit + 5
    m = _NEXT_DATA.search(buf, pos, end)
    return None if m is None else m.start()


def _is_data(line: bytes) -> bool:
    return line.lstrip(b" \t").startswith(b"data_")


def _read_compact(path: Path, split: bool = True, as_string: list[str] = AS_STRING) -> dict[str, pd.DataFrame | dict]:
    """Every block; loops compact. ``split``: ``N@text`` columns as two (else whole, as text)."""
    blocks: dict[str, pd.DataFrame | dict] = {}
    with open(path, "rb") as f, _Pool(_threads()) as pool:
        src = _Source(f)
        line, _ = src.line()
        while line is not None:
            if not _is_data(line):
                line, _ = src.line()
                continue
            name = line.lstrip(b" \t")[5:].decode("utf-8").strip()
            block, line = _compact_block(src, pool, split, as_string)
            if name in blocks:
                raise _Unusual(f"a second data_{name} block")
            if block is not None:
                blocks[name] = block
    return blocks


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class _Pool(ThreadPoolExecutor):
    def __init__(self, workers: int):
        super().__init__(workers)
        self.workers = workers


def _compact_block(src: _Source, pool, split: bool, as_string: list[str]) -> tuple[pd.DataFrame | dict | None, bytes | None]:
    """One block (a loop, or key-value pairs as a dict) and the line that opens the next one."""
    while True:
        line, _ = src.line()
        if line is None or _is_data(line):
            return None, line
        s = line.strip()
        if s.startswith(b"loop_"):
            break
        if s.startswith(b"_"):
            lines = [s.decode("utf-8")]
            line, _ = src.line()
            while line is not None and not _is_data(line):
                lines.append(line.strip().decode("utf-8"))
                line, _ = src.line()
            return _pairs(lines, as_string), line
    labels: list[str] = []
    while True:
        line, start = src.line()
        if line is None or _is_data(line):
            return _empty(labels), line
        s = line.strip()
        if s.startswith(b"_"):
            labels.append(s.split()[0][1:].decode("utf-8"))
            if labels[-1] in labels[:-1]:
                raise _Unusual("a label given twice")
        elif s:
            src.unread(start)
            break
    text = {c for c in labels if c in as_string}
    plain = set() if split else set(labels)
    at = src.tell()
    for _ in range(2 * len(labels) + 1):
        try:
            df = _loop(labels, text, plain, as_string, src, pool)
            break
        except _Retype as exc:
            (plain if exc.plain else text).update(exc.labels)
            src.seek(at)
    else:
        raise _Unusual("column types keep changing")
    line, _ = src.line()
    return df, line


def _loop(labels: list[str], text: set[str], plain: set[str], as_string: list[str], src: _Source, pool) -> pd.DataFrame:
    """Parse a loop body piece by piece, keeping at most a few pieces in flight. The first piece is
    parsed alone: the column types found in it are given to the parser for the others (faster than
    inferring them again, and pieces that do not fit are parsed again, inferring)."""
    at = src.tell()
    remaining = src.size - at
    pieces = src.body()
    first, numbered, stop = b"", None, None
    for _, piece, cut in pieces:  # up to the first data line
        stop = _loop_end(piece, cut)
        first += piece[:cut if stop is None else stop]
        numbered = _numbered_columns(first, labels)
        if numbered is not None or stop is not None:
            break
    if numbered is None:
        src.seek(at + len(first))
        return _empty(labels)
    numbered = [c for c in numbered if c not in plain]
    names = []  # the parser's columns: each numbered label as (number, text)
    for c in labels:
        names += [c + NUMBER, c] if c in numbered else [c]
    categorical = [j for j, c in enumerate(names) if c in text or c in numbered
                   or (c[:-len(NUMBER)] in numbered and c[:-len(NUMBER)] not in NUMBERED)]
    acc = _Columns(names, categorical, numbered, [c for c in labels if c in as_string], remaining)
    acc.add(*_parse_piece(first, names, categorical, None)[:3])
    if stop is not None:
        src.seek(at + len(first))
        return acc.frame()
    types = acc.types()
    pending: deque = deque()
    try:
        for offset, piece, cut in pieces:
            pending.append((offset, pool.submit(_parse_piece, piece, names, categorical, types, cut)))
            while len(pending) > pool.workers and stop is None:
                offset, fut = pending.popleft()
                *result, stop = fut.result()
                acc.add(*result)
            if stop is not None:
                break
        while pending and stop is None:
            offset, fut = pending.popleft()
            *result, stop = fut.result()
            acc.add(*result)
    finally:
        for _, fut in pending:
            fut.cancel()
    if stop is not None:  # the loop ends inside this piece: the next block opens there
        src.seek(offset + stop)
    if acc.n == 0:
        return _empty(labels)
    return acc.frame()


_NUMBERED_VALUE = re.compile(r"\d+@[^@]+")


def _numbered_columns(piece: bytes, labels: list[str]) -> list[str] | None:
    """Labels whose value on the first data line is ``<digits>@<text>`` (None: no data line)."""
    for line in piece.split(b"\n"):
        values = tokens(line.decode("utf-8"))
        if values:
            if len(values) != len(labels):
                raise _Unusual("row length differs from the number of columns")
            return [c for c, v in zip(labels, values) if _NUMBERED_VALUE.fullmatch(v)]
    return None


_PARSE = pcsv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False, escape_char=False,
                           newlines_in_values=False, ignore_empty_lines=True)
_KINDS = {"i": pa.int64(), "f": pa.float64(), "b": pa.bool_()}


def _parse_piece(piece: bytes, names: list[str], categorical: list[int], types: dict[str, pa.DataType] | None,
                 end: int | None = None):
    """One piece of a loop body: its columns (arrays, or (codes, distinct values)), rows, bytes, and
    where in the piece the loop ends (None: it goes on), the piece being parsed up to there.

    The piece is simplified and resolved as RELION reads lines, then parsed by pyarrow with one space
    as the delimiter. With ``N@text`` columns every ``@`` becomes a separator: the piece must then
    hold exactly that many per row. ``types``: column types known from an earlier piece; ``end``:
    where the piece's whole lines end."""
    end = len(piece) if end is None else end
    stop = _loop_end(piece, end)
    piece = piece[:end if stop is None else stop]
    size = len(piece)
    piece, marked = resolve(simplify(piece))
    numbered = [n[:-len(NUMBER)] for n in names if n.endswith(NUMBER)]
    ats = None
    if numbered:
        ats = piece.count(b"@")
        piece = piece.replace(b"@", b" ")
    try:
        table = _csv(piece, names, categorical, types)
    except pa.ArrowInvalid as exc:
        if str(exc).startswith("Empty CSV file"):  # blank lines and comments only
            return None, 0, size, stop
        if types is not None and "conversion error" in str(exc):
            table = _csv(piece, names, categorical, None)
        elif numbered:
            raise _Retype(numbered, plain=True) from exc
        else:
            raise
    if table.num_rows == 0:
        if ats:
            raise _Retype(numbered, plain=True)
        return None, 0, size, stop
    if ats is not None and ats != len(numbered) * table.num_rows:
        raise _Retype(numbered, plain=True)
    parts = []
    for j, name in enumerate(names):
        col = table.column(j).combine_chunks()
        if j in categorical:
            parts.append(_codes_values(col, marked))
        elif pa.types.is_null(col.type):  # every value missing
            parts.append(np.full(len(col), np.nan))
        elif col.type in (pa.int64(), pa.float64(), pa.bool_()):
            parts.append(col.to_numpy(zero_copy_only=False))
        else:  # text (or a date, a time...) in a column thought numeric
            raise _Retype([name[:-len(NUMBER)]], plain=True) if name.endswith(NUMBER) else _Retype([name])
    if _x_outside_text(piece, parts, categorical):  # pyarrow reads 0x10 as 16: such a value is text
        _refuse_hex(piece, names, categorical)
    return parts, table.num_rows, size, stop


def _x_outside_text(piece: bytes, parts: list, categorical: list[int]) -> bool:
    """Whether a column parsed as numbers may hold an ``x`` (as in ``0x10``): the piece's x's are
    counted (memchr speed) and those of its text columns, value by distinct value, taken away."""
    total = piece.count(b"x") + (piece.count(b"X") if b"X" in piece else 0)
    for j in categorical:
        if not total:
            break
        codes, values = parts[j]
        xs = np.array([v.count("x") + v.count("X") for v in values], dtype=np.int64)
        if xs.any():
            total -= int(np.bincount(codes[codes >= 0], minlength=len(values)) @ xs)
    return total > 0


def _refuse_hex(piece: bytes, names: list[str], categorical: list[int]) -> None:
    raw = _csv(piece, names, list(range(len(names))), None)
    for j, name in enumerate(names):
        if j not in categorical and pc.any(pc.match_substring_regex(raw.column(j), r"^[+-]?0[xX]")).as_py():
            raise _Retype([name[:-len(NUMBER)]], plain=True) if name.endswith(NUMBER) else _Retype([name])


def _csv(piece: bytes, names: list[str], categorical: list[int], types: dict | None) -> pa.Table:
    column_types = {names[j]: pa.string() for j in categorical} | (types or {})
    return pcsv.read_csv(
        pa.BufferReader(piece),
        read_options=pcsv.ReadOptions(column_names=names, use_threads=False, block_size=max(len(piece) + 1, 2**20)),
        parse_options=_PARSE,
        convert_options=pcsv.ConvertOptions(column_types=column_types, null_values=_NA, strings_can_be_null=True,
                                            true_values=["True", "TRUE", "true"], false_values=["False", "FALSE", "false"]))


def _codes_values(col: pa.Array, marked: bool) -> tuple[np.ndarray, list[str]]:
    """(a code per row, -1 where missing; the distinct values) of a text column."""
    if pa.types.is_null(col.type):
        return np.full(len(col), -1, dtype=np.int32), []
    enc = col.dictionary_encode()
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
    values = enc.dictionary.to_pylist()
    return codes, [unmark(v) for v in values] if marked else values


class _Columns:
    """Loop pieces as they come, in order, copied into whole-loop arrays (allocated once, from the
    rows per byte of the first piece, so that no piece is kept and nothing is concatenated); text
    codes mapped onto one table of distinct values per column."""

    def __init__(self, names: list[str], categorical: list[int], numbered: list[str], as_string: list[str],
                 body_bytes: int):
        self.names, self.numbered, self.as_string, self.body_bytes = names, numbered, as_string, body_bytes
        self.arrays: list[np.ndarray | None] = [None] * len(names)
        self.index = {j: _Distinct() for j in categorical}  # column -> its distinct values so far
        self.n = self.seen = 0

    def add(self, parts, n: int, nbytes: int) -> None:
        self.seen += nbytes
        if parts is None:
            return
        for j, part in enumerate(parts):
            values = self._codes(j, part) if j in self.index else part
            kind = values.dtype.kind
            if self.names[j].endswith(NUMBER) and j not in self.index and kind != "i":
                raise _Retype([self.names[j][:-len(NUMBER)]], plain=True)
            if kind not in "ifb":
                raise _Retype([self.names[j]])
            self._store(j, values, n)
        self.n += n

    def types(self) -> dict[str, pa.DataType]:
        """The pyarrow type of each column found so far that is not text."""
        return {self.names[j]: _KINDS[a.dtype.kind] for j, a in enumerate(self.arrays)
                if j not in self.index and a is not None}

    def _store(self, j: int, values: np.ndarray, n: int) -> None:
        a = self.arrays[j]
        if a is None:
            rows = int(max(self.body_bytes - self.seen, 0) / max(self.seen, 1) * max(self.n + n, 1) * 1.05)
            a = np.empty(self.n + n + rows + 1024, dtype=values.dtype)
        elif a.dtype != values.dtype:
            kinds = {a.dtype.kind, values.dtype.kind}
            if not kinds <= {"i", "f"}:
                raise _Retype([self.names[j]])
            if a.dtype.kind == "i":
                a = a.astype(np.float64)
        if self.n + n > len(a):  # more rows than the first piece foretold
            a = np.concatenate([a[:self.n], np.empty(max(self.n + n, len(a) + len(a) // 4) - self.n, a.dtype)])
        a[self.n:self.n + n] = values
        self.arrays[j] = a

    def _codes(self, j: int, part: tuple[np.ndarray, list]) -> np.ndarray:
        """A piece's codes into its own distinct values, as codes into the loop's."""
        codes, values = part
        mapping = np.append(self.index[j].codes(values), -1).astype(np.int32)
        return mapping[np.where(codes < 0, len(mapping) - 1, codes)]

    def frame(self) -> pd.DataFrame:
        out: dict[str, object] = {}
        for j, name in enumerate(self.names):
            a, self.arrays[j] = self.arrays[j], None
            try:
                a.resize(self.n, refcheck=False)  # in place: the unused tail goes back to the system
            except ValueError:
                a = a[:self.n].copy()
            out[name] = (a, self.index[j].values()) if j in self.index else a
            if j in self.index and name not in self.as_string and name not in self.numbered \
                    and not name.endswith(NUMBER):
                out[name] = _numbers_or_text(*out[name])
        for label in self.numbered:
            number, (tcodes, texts) = out.pop(label + NUMBER), out.pop(label)
            if label in NUMBERED:  # read as integers: whatever their padding, the number is what counts
                out[label], out[label + NUMBER] = (tcodes, texts), number
                continue
            pair = _pair(*number, tcodes, texts, keep_number=False)
            if pair is None:
                raise _Retype([label], plain=True)
            out[label], out[label + NUMBER] = pair
        frame = {}
        for name in self.names:  # the text part under the label, its number beside it
            for k in ((name,) if not name.endswith(NUMBER) else ()) + ((name + NUMBER,) if name in self.numbered else ()):
                value = out[k]
                if isinstance(value, tuple):
                    frame[k] = pd.Categorical.from_codes(value[0], categories=pd.Index(value[1], dtype=object))
                elif value is not None:
                    frame[k] = value
        return pd.DataFrame(frame, index=pd.RangeIndex(self.n), copy=False)


def _numbers_or_text(codes: np.ndarray, values: list[str]):
    """A text column whose every value is a number or empty (``""``) as numbers, empty ones as NaN,
    as starfile reads it (``pandas.to_numeric``); else (codes, values) as they are."""
    if not values or not any(values):
        return codes, values
    try:
        numbers = pd.to_numeric(pd.Series(values, dtype=object))
    except (ValueError, TypeError):
        return codes, values
    if numbers.isna().all():
        return codes, values
    numbers = numbers.to_numpy()
    if numbers.dtype.kind == "i" and (codes >= 0).all():
        return numbers[codes]
    return np.append(numbers.astype(np.float64), np.nan)[np.where(codes < 0, len(values), codes)]


class _Distinct:
    """The distinct values of a text column, numbered in order of appearance, for pieces that come
    one after another: a piece's distinct values are looked up in a hashed index (C speed), those
    not in it in a dict of the values met since the index was last rebuilt, which it is when that
    dict has grown to a quarter of it (so each value is hashed a few times at most, however many
    pieces)."""

    def __init__(self):
        self.index = pd.Index([], dtype=object)
        self.recent: dict = {}

    def codes(self, values: list) -> np.ndarray:
        found = self.index.get_indexer(pd.Index(values, dtype=object)) if len(values) else np.zeros(0, dtype=np.intp)
        known, recent = len(self.index), self.recent
        for k in np.flatnonzero(found < 0).tolist():
            found[k] = recent.setdefault(values[k], known + len(recent))
        if len(recent) > max(4096, known // 4):  # object dtype kept: a str (arrow) index is many times slower here
            self.index = pd.Index(np.array(self.index.tolist() + list(recent), dtype=object), dtype=object)
            self.recent = {}
        return found

    def values(self) -> list:
        return self.index.tolist() + list(self.recent)


def _pair(ncodes: np.ndarray, numbers: list[str], tcodes: np.ndarray, texts: list[str], keep_number: bool):
    """A ``N@text`` column read apart as (text codes + values, number as int64), or, when its numbers
    are not all written as RELION writes them (six digits or more, no extra zeros) and ``keep_number``
    is false, the whole text as codes + values. None if a number is not digits or a value is missing."""
    if (ncodes < 0).any() or (tcodes < 0).any() or not all(v.isdigit() for v in numbers) \
            or any(len(v) > 18 and int(v) >= 2**63 for v in numbers):  # beyond int64: left as text, for the caller
        return None
    as_int = np.array([int(v) for v in numbers], dtype=np.int64)
    if keep_number or all(v == str(i).zfill(6) for v, i in zip(numbers, as_int.tolist())):
        return (tcodes, texts), as_int[ncodes]
    key = ncodes.astype(np.int64) * len(texts) + tcodes
    codes, uniques = pd.factorize(key)
    whole = [f"{numbers[k // len(texts)]}@{texts[k % len(texts)]}" for k in uniques.tolist()]
    return (codes, whole), None


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame]) -> None:
    """Write blocks as loops, RELION 3.1 style (``# version 30001`` before each block).

    A ``label`` / ``label + NUMBER`` pair of columns is written as one column ``NNNNNN@text``.
    Writes to ``path`` directly; callers make it atomic (temporary name, then rename).
    """
    with open(path, "wb") as f:
        for name, df in blocks.items():
            labels = [c for c in df.columns if not _is_number_of(c, df)]
            head = [f"\n# version 30001\n\ndata_{name}\n\nloop_ \n"] + [f"_{c} #{i} \n" for i, c in enumerate(labels, 1)]
            f.write("".join(head).encode("utf-8"))
            if len(df):
                _write_rows(f, df, labels)
            f.write(b"\n")


def _is_number_of(column: str, df: pd.DataFrame) -> bool:
    return column.endswith(NUMBER) and column[:-len(NUMBER)] in df.columns


def _write_rows(f, df: pd.DataFrame, labels: list[str]) -> None:
    """One row per line, space separated; floats at full precision; strings that are empty or hold
    whitespace are double-quoted (such tables take the slower csv path)."""
    columns = _fast_columns(df, labels)
    if columns is None:
        _write_rows_csv(f, _joined(df, labels))
        return
    n = len(df)
    bounds = list(range(0, n, WRITE_ROWS)) + [n]
    with ThreadPoolExecutor(_threads()) as pool:
        for text in pool.map(lambda ab: _format_rows(columns, *ab), zip(bounds[:-1], bounds[1:])):
            f.write(text)


def _joined(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """``df`` with each numbered pair of columns as one column of ``NNNNNN@text`` strings."""
    out = {}
    for c in labels:
        if c + NUMBER in df.columns:
            number = pd.Series(df[c + NUMBER].to_numpy()).astype(str).str.zfill(6)
            out[c] = (number + "@" + pd.Series(df[c].to_numpy(), dtype=object).astype(str)).to_numpy(dtype=object)
        else:
            out[c] = df[c]
    return pd.DataFrame(out, index=df.index, copy=False)


def _write_rows_csv(f, df: pd.DataFrame) -> None:
    text_cols = [c for c in df.columns if _is_text(df[c])]
    needs_quotes = any(df[c].astype(str).str.contains(_MUST_QUOTE.pattern, regex=True).any() for c in text_cols)
    out = io.TextIOWrapper(f, encoding="utf-8", newline="")
    try:
        if not needs_quotes:
            df.to_csv(out, sep=" ", header=False, index=False, lineterminator="\n", quoting=csv.QUOTE_NONE,
                      quotechar="\x07", na_rep="nan")
            return
        quoted = df.copy()
        for c in text_cols:
            quoted[c] = quoted[c].astype(str).map(_quoted)
        for row in quoted.itertuples(index=False):
            out.write(" ".join(map(str, row)) + "\n")
    finally:
        out.flush()
        out.detach()


def _fast_columns(df: pd.DataFrame, labels: list[str]) -> list | None:
    """What each column needs to be formatted a block of rows at a time, or None when the table
    needs the csv path (pyarrow missing, or text that must be quoted)."""
    try:
        import pyarrow as pa
        import pyarrow.csv  # noqa: F401
    except ImportError:
        return None
    out = []
    for c in labels:
        s = df[c]
        if c + NUMBER in df.columns:
            text = _text_table(s)
            if text is None or _needs_quotes(text[1], numbered=True):
                return None
            out.append(("numbered", df[c + NUMBER].to_numpy(), text[0], pa.array(text[1], type=pa.string())))
        elif _is_text(s):
            text = _text_table(s)
            if text is None or _needs_quotes(text[1]):
                return None
            out.append(("text", text[0], pa.array(text[1], type=pa.string())))
        elif s.dtype == np.float64:
            out.append(("float", s.to_numpy()))
        elif s.dtype.kind in "iu" and isinstance(s.dtype, np.dtype):
            out.append(("int", s.to_numpy()))
        else:
            out.append(("csv", s))
    return out


def _text_table(s: pd.Series) -> tuple[np.ndarray, list[str]] | None:
    """(codes, distinct values) of a text column, -1 for missing; None if a value is not a str."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes, values = s.cat.codes.to_numpy(), s.cat.categories.tolist()
    else:
        codes, uniques = pd.factorize(s.to_numpy(dtype=object), use_na_sentinel=True)
        values = list(uniques)
    if not all(isinstance(v, str) for v in values):
        return None
    return codes, values


# values RELION writes quoted: empty, holding whitespace or starting with a quote; and one starting with
# '#', which would otherwise read as a comment
_MUST_QUOTE = re.compile(r"^$|\s|^[\"'#]")


def _quoted(value: str) -> str:
    """A text value as written: double-quoted when it must be. Raises ParticleError for a value that
    no quoting lets RELION read back (a quote then whitespace inside one that must be quoted: RELION
    ends the value there, and drops the escape it writes itself)."""
    if not _MUST_QUOTE.search(value):
        return value
    if re.search(r'"\s', value) or "\n" in value:
        raise ParticleError(f"cannot write the value {value!r} to a STAR file: RELION would not read it back")
    return f'"{value}"'


def _needs_quotes(values: list[str], numbered: bool = False) -> bool:
    """Whether a value must be quoted; ``numbered``: the text after ``N@`` (only whitespace counts)."""
    pattern = re.compile(r"\s") if numbered else _MUST_QUOTE
    return any(pattern.search(v) for v in values)


def _format_rows(columns: list, a: int, b: int) -> bytes:
    """Rows ``[a, b)`` as text, one line per row: each column's cells made here, the lines by
    pyarrow's CSV writer (no quoting; missing values as empty fields)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    table = pa.table({str(k): _format(col, a, b) for k, col in enumerate(columns)})
    out = io.BytesIO()
    pcsv.write_csv(table, out, pcsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none"))
    return out.getvalue()


def _format(col: tuple, a: int, b: int):
    """One column's cells of rows ``[a, b)`` as a pyarrow array whose text is what ``to_csv`` writes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = col[0]
    if kind == "float":
        return _format_floats(col[1][a:b])
    if kind == "int":
        return pa.array(col[1][a:b])
    if kind == "text":  # a missing value as nan, as to_csv(na_rep="nan") writes it: never an empty field
        codes = col[1][a:b]
        text = _dictionary(codes, col[2])
        return pc.fill_null(text.cast(pa.string()), "nan") if (codes < 0).any() else text
    if kind == "numbered":
        number = pc.utf8_lpad(pc.cast(pa.array(col[1][a:b]), pa.string()), 6, "0")
        return pc.binary_join_element_wise(number, _dictionary(col[2][a:b], col[3]).cast(pa.string()), "@")
    text = col[1].iloc[a:b].to_frame().to_csv(sep=" ", header=False, index=False, lineterminator="\n",
                                               quoting=csv.QUOTE_NONE, quotechar="\x07", na_rep="nan")
    return pa.array(text.split("\n")[:-1], type=pa.string())


def _dictionary(codes: np.ndarray, values):
    import pyarrow as pa

    missing = codes < 0
    return pa.DictionaryArray.from_arrays(pa.array(codes, mask=missing if missing.any() else None), values)


def _format_floats(x: np.ndarray):
    """Shortest round-trip text of float64 values exactly as numpy's ``astype(str)`` (Python's
    ``repr``) writes them, which is what ``to_csv`` writes, with NaN as ``nan``. pyarrow's
    shortest digits are the same; it writes integral values without ``.0`` and switches to exponent
    notation at other magnitudes, so those cells are patched."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(x) > 1 and x.strides == (0,):  # one value for every row: format it once
        return _dictionary(np.zeros(len(x), dtype=np.int8), pa.array(_format_floats(x[:1].copy()).to_pylist()))
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(x)
        odd = ((magnitude >= 1e10) & (magnitude != np.inf)) | ((magnitude < 1e-4) & (magnitude != 0))
        whole = (x == np.trunc(x)) & (magnitude < 1e10)  # repr's exponent range or pyarrow's are odd
    if whole.all() and not np.signbit(x).any():  # integral values (picking coordinates often are)
        return pc.binary_join_element_wise(pc.cast(pa.array(x.astype(np.int64)), pa.string()), ".0", "")
    values = pa.array(x, from_pandas=True)
    text = pc.cast(values, pa.string())
    if whole.any():
        mask = pa.array(whole)
        text = pc.replace_with_mask(text, mask, pc.binary_join_element_wise(pc.filter(text, mask), ".0", ""))
    if odd.any():
        text = pc.replace_with_mask(text, pa.array(odd), pa.array([repr(v) for v in x[odd].tolist()], type=pa.string()))
    return pc.fill_null(text, "nan") if values.null_count else text  # an empty field would shift the columns


# ---------------------------------------------------------------------------------------------
# RELION labels to the canonical table and back
# ---------------------------------------------------------------------------------------------

# RELION particle-table labels that map one to one onto canonical columns (same units)
_STAR_PARTICLE = {
    "rlnMicrographName": "micrograph", "rlnCoordinateX": "coord_x", "rlnCoordinateY": "coord_y",
    "rlnDefocusU": "defocus_u", "rlnDefocusV": "defocus_v", "rlnDefocusAngle": "defocus_angle",
    "rlnPhaseShift": "phase_shift", "rlnAngleRot": "angle_rot", "rlnAngleTilt": "angle_tilt",
    "rlnAnglePsi": "angle_psi", "rlnClassNumber": "class_number", "rlnOpticsGroup": "optics_group",
    "rlnOriginXAngst": "shift_x", "rlnOriginYAngst": "shift_y",
}


# optics-table labels (also found in 3.0 particle tables)
_STAR_OPTICS = {
    "rlnOpticsGroupName": "optics_group_name", "rlnVoltage": "voltage", "rlnSphericalAberration": "cs",
    "rlnAmplitudeContrast": "amp_contrast", "rlnImagePixelSize": "pixel_size", "rlnImageSize": "box",
}


_STAR_OPTICS_DERIVED = {"rlnDetectorPixelSize", "rlnMagnification", "rlnImageDimensionality", "rlnOpticsGroup"}


_STAR_PARTICLE_DERIVED = {"rlnImageName", "rlnImageName" + NUMBER, "rlnOriginX", "rlnOriginY", "dparticlesDataSign"}


# RELION has no label for the data sign: ours (RELION ignores labels it does not know), written only when
# some particle is -1, so that a sign given at import survives in particles.star
SIGN_LABEL = "dparticlesDataSign"


DOSE_LABEL = "dparticlesTotalDose"  # optics table, e/Å²; likewise ours, written only when a dose is known


def from_star(blocks: dict, path: Path) -> Table:
    """Interpret STAR blocks (3.0 single table, or 3.1+ optics + particles in any order), as
    :func:`read_star` gives them (compact or not). An error about a particle
    names its line in the file too (found by a line scan, once the error is known)."""
    particles_name = _particle_block(blocks, path)
    try:
        return _from_star(blocks, path, particles_name)
    except ParticleError as exc:
        if exc.particle is None or exc.line is not None or str(exc.path) != str(path):
            raise
        line = line_of_row(Path(path), particles_name, exc.particle - 1) if Path(path).is_file() else None
        raise ParticleError(exc.message, path=path, line=line, particle=exc.particle) from None


def _from_star(blocks: dict, path: Path, particles_name: str) -> Table:
    star = blocks[particles_name].reset_index(drop=True)
    optics = blocks.get("optics")
    if isinstance(optics, dict):  # a key-value block named optics: one group
        optics = pd.DataFrame([optics])
    n = len(star)
    out: dict[str, object] = {}
    version = "3.1" if optics is not None else "3.0"
    detector: dict[str, np.ndarray] = {}  # 3.0-style pixel size inputs found in an optics table

    if "rlnImageName" in star:
        out["image_name"], out["image_index"] = _image_names(star, path)
    for label, name in _STAR_PARTICLE.items():
        if label in star:
            out[name] = values_of(star[label])
    for label, name in _STAR_OPTICS.items():  # 3.0 files carry optics per particle
        if label in star and name not in out:
            out[name] = values_of(star[label])
    if SIGN_LABEL in star:
        out["sign"] = signs(floats(values_of(star[SIGN_LABEL]), SIGN_LABEL, path), SIGN_LABEL, path)

    if optics is not None:
        if "rlnOpticsGroup" not in optics:
            raise ParticleError("the data_optics table has no rlnOpticsGroup column", path=path)
        groups = _check_optics(optics, path)
        if "optics_group" not in out:
            if len(optics) != 1:
                raise ParticleError("particles have no rlnOpticsGroup but data_optics has several groups",
                                    path=path)
            out["optics_group"] = same(groups[0], n)
        else:  # checked before the look-up, so that an error names the particle that is wrong
            out["optics_group"] = ints(whole(out["optics_group"], "rlnOpticsGroup", path,
                                               "a whole number (an optics group of data_optics)"))
        table = optics.drop(columns="rlnOpticsGroup").set_axis(pd.Index(groups), axis=0)
        rows = _rows_of(out["optics_group"], table.index)
        missing = rows < 0
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise ParticleError(f"rlnOpticsGroup {out['optics_group'][row]} is not in data_optics "
                                f"(groups: {sorted(table.index.tolist())})", path=path, particle=row + 1)
        for label in table.columns:
            values = _per_group(table[label], rows)
            name = _STAR_OPTICS.get(label)
            if name is not None:
                out[name] = values
            elif label == DOSE_LABEL:
                out["dose"] = values
            elif label in ("rlnDetectorPixelSize", "rlnMagnification"):
                detector[label] = values
            elif label not in _STAR_OPTICS_DERIVED:
                out[f"star_optics:{label}"] = values
    elif "optics_group" in out and "pixel_size" not in out and "rlnDetectorPixelSize" not in star:
        version = "3.1"  # rlnOpticsGroup without data_optics: a 3.1 file missing its optics table

    # pixel size from detector pixel (µm) and magnification when not given directly (3.0)
    for label in ("rlnDetectorPixelSize", "rlnMagnification"):
        if label in star:  # optics-table values were checked with the optics table
            detector[label] = floats(values_of(star[label]), label, path)
            finite(detector[label], label, path)
    det, mag = detector.get("rlnDetectorPixelSize"), detector.get("rlnMagnification")
    if "pixel_size" not in out and det is not None and mag is not None:
        out["pixel_size"] = same_or(1e4 * np.asarray(det, dtype=np.float64) / np.asarray(mag, dtype=np.float64))

    # pixel-valued origins (3.0 convention; also seen inside 3.1 files): to Å
    for axis in "XY":
        label = f"rlnOrigin{axis}"
        if label in star and f"shift_{axis.lower()}" not in out:
            origin = floats(values_of(star[label]), label, path)
            if "pixel_size" not in out:
                out[f"_origin_px_{axis.lower()}"] = origin
            else:
                out[f"shift_{axis.lower()}"] = origin * np.asarray(out["pixel_size"], dtype=np.float64)

    for label in star.columns:
        if label not in _STAR_PARTICLE and label not in _STAR_PARTICLE_DERIVED and label not in _STAR_OPTICS \
                and label not in _STAR_OPTICS_DERIVED:
            values = values_of(star[label])
            out[f"star:{label}"] = same_or(values) if isinstance(values, np.ndarray) else values

    labels = {v: k for k, v in (_STAR_PARTICLE | _STAR_OPTICS).items()}
    for col in ("optics_group", "class_number", "box"):
        if col in out:
            out[col] = ints(whole(out[col], labels.get(col, col), path))
    for col in FLOAT_COLUMNS:  # e.g. 'rlnVoltage 300' parses as an integer; units are float whatever the file wrote
        if col in out:
            out[col] = floats(out[col], labels.get(col, col), path)
            if col in FINITE_COLUMNS:
                finite(out[col], labels.get(col, col), path)
    if "optics_group" not in out:
        out["optics_group"] = same(np.int64(1), n)
    if "optics_group_name" not in out:
        out["optics_group_name"] = group_names(out["optics_group"])
    pose = "3d" if {"angle_rot", "angle_tilt"} <= set(out) else "2d" if "angle_psi" in out else "none"
    particles = pd.DataFrame(out, index=pd.RangeIndex(n), copy=False)
    return Table(particles, {"format": f"relion-{version}", "pose": pose, "particle_block": particles_name})


def _rows_of(groups, keys: pd.Index) -> np.ndarray:
    """For each particle, the row of its optics group in the optics table (-1 if absent)."""
    groups = np.asarray(groups)
    if groups.ndim == 1 and groups.strides == (0,) and len(groups):
        return same(keys.get_indexer(groups[:1])[0], len(groups))
    if groups.dtype.kind in "iu" and len(groups) and keys.dtype.kind in "iu":
        lo, hi = int(groups.min()), int(groups.max())
        if lo >= 0 and hi < 2**20:  # small group numbers: a lookup table instead of hashing each particle
            lut = np.full(hi + 1, -1, dtype=np.int64)
            inside = (keys >= 0) & (keys <= hi)
            lut[np.asarray(keys[inside], dtype=np.int64)] = np.flatnonzero(inside)
            rows = lut[groups]
            return same(rows[0], len(rows)) if (rows == rows[0]).all() else rows
    return keys.get_indexer(groups)


def _per_group(column: pd.Series, rows: np.ndarray):
    """An optics-table column for each particle: a view when one group, text as a Categorical."""
    values = column.to_numpy()
    if values.dtype == object or isinstance(column.dtype, (pd.CategoricalDtype, pd.StringDtype)):
        codes, uniques = pd.factorize(np.asarray(values, dtype=object))
        if rows.strides == (0,) and len(rows):
            codes = np.full(len(rows), codes[rows[0]], dtype=np.int8 if len(uniques) < 128 else np.int32)
        else:
            codes = codes[rows]
        return pd.Categorical.from_codes(codes, categories=pd.Index(uniques, dtype=object))
    if rows.ndim == 1 and rows.strides == (0,) and len(rows):
        return same(values[rows[0]], len(rows))
    return values[rows]


def _check_optics(optics: pd.DataFrame, path: Path) -> np.ndarray:
    """Numbers in data_optics that every particle of a group takes, or an error naming the line;
    returns the group numbers (int64)."""
    try:
        groups = ints(whole(values_of(optics["rlnOpticsGroup"]), "rlnOpticsGroup", path))
        first_bad(pd.Index(groups).duplicated(), groups, "rlnOpticsGroup", path, "each optics group once")
        for label in ("rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                      "rlnImageSize", "rlnDetectorPixelSize", "rlnMagnification"):
            if label in optics:
                values = values_of(optics[label])
                values = whole(values, label, path) if label == "rlnImageSize" else floats(values, label, path)
                if label != "rlnAmplitudeContrast":
                    finite(values, label, path)
    except ParticleError as exc:  # its 'particle' is a row of the optics table
        line = line_of_row(Path(path), "optics", exc.particle - 1) if Path(path).is_file() else None
        raise ParticleError(f"data_optics: {exc.message}", path=path, line=line) from None
    return groups


def _particle_block(blocks: dict, path: Path) -> str:
    """The block holding particles: 'particles', else the one loop naming images or coordinates."""
    if isinstance(blocks.get("particles"), pd.DataFrame):
        return "particles"
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and k != "optics"}
    with_images = [k for k, v in loops.items() if "rlnImageName" in v]
    if len(with_images) == 1:
        return with_images[0]
    if len(with_images) > 1:
        names = ", ".join(f"data_{k}" for k in with_images)
        raise ParticleError(f"several blocks name particle images ({names}); expected one particle table "
                            "(data_particles)", path=path)
    with_coords = [k for k, v in loops.items() if {"rlnCoordinateX", "rlnMicrographName"} & set(v)]
    if len(with_coords) == 1:
        return with_coords[0]
    found = ", ".join(f"data_{k}" for k in blocks) or "none"
    raise ParticleError(f"no particle table found (blocks: {found}); expected a data_particles loop with "
                        "rlnImageName", path=path)


_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


def _image_names(star: pd.DataFrame, path: Path) -> tuple[pd.Categorical, np.ndarray]:
    """(stack names as a Categorical, 0-based indices) of ``rlnImageName``, read apart or not."""
    if "rlnImageName" + NUMBER in star:
        index = star["rlnImageName" + NUMBER].to_numpy() - 1
        names = star["rlnImageName"].array
        if (index < 0).any():
            row = int(np.flatnonzero(index < 0)[0])
            raise ParticleError(f"rlnImageName {f'{index[row] + 1:06d}@{names[row]}'!r}: image numbers start at 1; "
                                "expected N@stack with N >= 1",
                                path=path, particle=row + 1)
        return names, index
    names, index = _split_image_names(star["rlnImageName"], path)
    codes, uniques = pd.factorize(names)
    return pd.Categorical.from_codes(codes, categories=pd.Index(uniques, dtype=object)), index


def _split_image_names(names: pd.Series, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``000012@Extract/x.mrcs`` -> ('Extract/x.mrcs', 11). Names without ``@`` are single images."""
    fast = _split_image_names_arrow(names)
    if fast is not None:
        return fast
    s = names.astype(str)
    parts = s.str.extract(_IMAGE_NAME)
    bad = parts[0].isna()
    if bad.any():
        no_at = ~s.str.contains("@", regex=False)
        if (bad & ~no_at).any():
            row = int(np.flatnonzero((bad & ~no_at).to_numpy())[0])
            raise ParticleError(f"rlnImageName {s.iloc[row]!r} is not of the form N@stack", path=path,
                                particle=row + 1)
        parts.loc[no_at, 0] = "1"
        parts.loc[no_at, 1] = s[no_at].str.strip()
    digits = parts[0].str.lstrip("0")
    big = (digits.str.len() > 19) | ((digits.str.len() == 19) & (digits >= str(2**63)))
    if big.any():
        row = int(np.flatnonzero(big.to_numpy())[0])
        raise ParticleError(f"rlnImageName {s.iloc[row]!r}: the image number is too large; expected N@stack with "
                            f"N from 1 to {2**63 - 1}", path=path, particle=row + 1)
    index = parts[0].astype(np.int64).to_numpy() - 1
    if (index < 0).any():
        row = int(np.flatnonzero(index < 0)[0])
        raise ParticleError(f"rlnImageName {s.iloc[row]!r}: image numbers start at 1; "
                            "expected N@stack with N >= 1", path=path, particle=row + 1)
    return parts[1].to_numpy(dtype=object), index


def _split_image_names_arrow(names: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """The common case (every name is ``N@stack``, N >= 1) in vectorised pyarrow: a million names in
    a fraction of a second. None when pyarrow is missing or any name needs the careful path."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        return None
    try:
        parts = pc.split_pattern(pa.array(names.astype(str), type=pa.large_string()), "@", max_splits=1)
        if pc.min(pc.list_value_length(parts)).as_py() != 2:
            return None
        head = pc.utf8_trim_whitespace(pc.list_element(parts, 0))
        if not pc.all(pc.match_substring_regex(head, r"^\d+$")).as_py():
            return None
        index = np.asarray(pc.cast(head, pa.int64())) - 1
        stack = pc.utf8_trim_whitespace(pc.list_element(parts, 1))
    except (pa.ArrowException, TypeError, ValueError):
        return None
    if (index < 0).any() or pc.any(pc.equal(pc.utf8_length(stack), 0)).as_py():
        return None
    return stack.to_numpy(zero_copy_only=False).astype(object), index


def to_star(particles: pd.DataFrame, paths: np.ndarray | None = None,
            indices: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
    """Canonical table -> RELION 3.1 blocks (optics table, Å origins). Images at ``paths`` (one per
    particle) / ``indices`` (0-based) become ``rlnImageName`` ``NNNNNN@path``, as the pair of columns
    :func:`write_star` writes as one."""
    groups = particles.iloc[_first_rows(particles["optics_group"].to_numpy())].sort_values("optics_group")
    optics = {"rlnOpticsGroup": groups["optics_group"].to_numpy(),
              "rlnOpticsGroupName": groups["optics_group_name"].astype(str).to_numpy(dtype=object)}
    for label, name in _STAR_OPTICS.items():
        if name in groups and label != "rlnOpticsGroupName":
            optics[label] = groups[name].to_numpy()
    if "box" in groups:
        optics["rlnImageDimensionality"] = np.full(len(groups), 2)
    if "dose" in groups:
        optics[DOSE_LABEL] = groups["dose"].to_numpy(np.float64)
    for col in groups.columns:
        if col.startswith("star_optics:"):
            optics[col.split(":", 1)[1]] = groups[col].to_numpy()

    out: dict[str, object] = {}
    inverse = {v: k for k, v in _STAR_PARTICLE.items()}
    for name in CANONICAL:
        if name in inverse and name in particles:
            out[inverse[name]] = values_of(particles[name])
    for col in particles.columns:
        if col.startswith("star:"):
            out[col.split(":", 1)[1]] = values_of(particles[col])
    if "sign" in particles and (particles["sign"].to_numpy() != 1).any():
        out[SIGN_LABEL] = particles["sign"].to_numpy(np.float64)
    if paths is not None:
        out["rlnImageName"] = categorical(paths)
        out["rlnImageName" + NUMBER] = np.asarray(indices, dtype=np.int64) + 1
    return {"optics": pd.DataFrame(optics), "particles": pd.DataFrame(out, index=pd.RangeIndex(len(particles)), copy=False)}


def _first_rows(values: np.ndarray) -> np.ndarray:
    """The first row of each distinct value, in row order."""
    if values.ndim == 1 and values.strides == (0,) or len(values) < 2:
        return np.arange(min(len(values), 1))
    return pd.Series(values).drop_duplicates().index.to_numpy()

