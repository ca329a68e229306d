"""The canonical particle table that every format engine reads into and writes from (see
:mod:`dparticles.formats`), with the checks and conversions they share.

The canonical table has one row per particle, in metadata order, with these columns (units fixed
whatever the source; absent columns mean the source did not say):

==================  =====================================================================
``image_name``      stack file as written in the metadata (before path resolution)
``image_index``     0-based index of the image in its stack (RELION's is 1-based)
``micrograph``      ``rlnMicrographName`` / ``location/micrograph_path``
``coord_x/_y``      picking coordinate, micrograph pixels
``defocus_u/_v``    Å; ``defocus_angle`` and ``phase_shift`` in degrees
``voltage``         kV; ``cs`` mm; ``amp_contrast`` fraction; ``dose`` e/Å² (only if given)
``pixel_size``      Å per image pixel; ``box`` image size in pixels (from optics, when known)
``optics_group``    1-based; ``optics_group_name``
``shift_x/_y``      RELION origin (``rlnOriginXAngst``) in Å, RELION's sign
``angle_rot/_tilt/_psi``  RELION Euler angles, degrees
``class_number``    1-based
``sign``            data sign, +1 (dark on light) or -1
==================  =====================================================================

Columns the reader does not interpret are kept under ``star:<label>`` (particle table),
``star_optics:<label>`` (optics table) or ``cs:<field>`` (``/`` written as ``.``; vector fields as ``cs:<field>[i]``) and
written back unchanged.

The table is compact, so that ten million particles fit in a laptop's memory: numbers are numpy
arrays (a value the same for every particle, such as an optics value of a single optics group, is
a zero-stride read-only ``np.broadcast_to`` view); text is a ``pandas.Categorical``, whose values
repeat (``image_name`` holds the stack part of ``rlnImageName`` only, the index being
``image_index``). An uninterpreted column of RELION image names (``N@stack``, e.g.
``rlnImageOriginalName``) is kept as the pair ``star:<label>`` (the stack, categorical) and
``star:<label>@number`` (the number), and written back as one column (see :mod:`dparticles.formats.relion`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dparticles.errors import ParticleError

CANONICAL = ["image_name", "image_index", "micrograph", "coord_x", "coord_y", "defocus_u", "defocus_v",
             "defocus_angle", "phase_shift", "voltage", "cs", "amp_contrast", "dose", "pixel_size", "box",
             "optics_group", "optics_group_name", "shift_x", "shift_y", "angle_rot", "angle_tilt",
             "angle_psi", "class_number", "sign", "exposure", "uid"]


POSE = ["shift_x", "shift_y", "angle_rot", "angle_tilt", "angle_psi"]


# units of the canonical columns, as xarray ``units`` attributes (CF style); the others have none
UNITS = {"coord_x": "pixel", "coord_y": "pixel", "defocus_u": "angstrom", "defocus_v": "angstrom",
         "defocus_angle": "degree", "phase_shift": "degree", "voltage": "kV", "cs": "mm", "dose": "e/angstrom^2",
         "pixel_size": "angstrom", "box": "pixel", "shift_x": "angstrom", "shift_y": "angstrom",
         "angle_rot": "degree", "angle_tilt": "degree", "angle_psi": "degree"}


@dataclass
class Table:
    """A canonical particle table plus what is known of the file it came from."""

    particles: pd.DataFrame
    attrs: dict = field(default_factory=dict)


def assign(particles: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """``particles`` with ``columns`` set, sharing every array (``df[name] = values`` copies, and makes
    a zero-stride view a full array)."""
    if not columns:
        return particles
    out = {c: values_of(particles[c]) for c in particles.columns} | {k: values_of(v) if isinstance(v, pd.Series) else v
                                                                   for k, v in columns.items()}
    return pd.DataFrame(out, index=particles.index, copy=False)


def values_of(s: pd.Series):
    """A column's values without a copy: a Categorical as it is, anything else as a numpy array."""
    return s.array if isinstance(s.dtype, pd.CategoricalDtype) else s.to_numpy()


def same(value, n: int) -> np.ndarray:
    """``value`` for each of ``n`` particles, in no memory (a read-only zero-stride view)."""
    return np.broadcast_to(np.asarray(value), (n,))


def same_or(values: np.ndarray) -> np.ndarray:
    """``values``, as a zero-stride view when they are all the same number."""
    values = np.asarray(values)
    if values.ndim == 1 and len(values) > 1 and values.dtype.kind in "iufb" and values.strides != (0,) \
            and (values == values[0]).all():
        return same(values[0], len(values))
    return values


def ints(values) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == np.int64:
        return values
    if values.ndim == 1 and values.strides == (0,) and len(values):
        return same(values[:1].astype(np.int64)[0], len(values))
    return values.astype(np.int64)


def group_names(groups) -> pd.Categorical:
    """``opticsGroupN`` for each particle's group N."""
    groups = np.asarray(groups)
    if groups.strides == (0,) or not len(groups):
        codes, uniques = np.zeros(len(groups), np.int8), groups[:1]
    else:
        codes, uniques = pd.factorize(groups)
    return pd.Categorical.from_codes(codes, categories=pd.Index([f"opticsGroup{g}" for g in uniques], dtype=object))


FLOAT_COLUMNS = ["coord_x", "coord_y", "defocus_u", "defocus_v", "defocus_angle", "phase_shift", "voltage", "cs", "dose",
          "amp_contrast", "pixel_size", "shift_x", "shift_y", "angle_rot", "angle_tilt", "angle_psi"]


def floats(values, name: str, path: Path, expected: str = "a number") -> np.ndarray:
    """A numeric column as float64 (a view when it is one already), or a clear error naming the first
    particle that is not a number (and saying what was ``expected``)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iufb":
        if values.dtype == np.float64:
            return values
        if values.ndim == 1 and values.strides == (0,) and len(values):
            return same(np.float64(values[0]), len(values))
        return values.astype(np.float64)
    series = pd.Series(np.asarray(values, dtype=object))
    out = pd.to_numeric(series, errors="coerce").astype(np.float64)
    bad = out.isna() & series.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ParticleError(f"{name} is {shown(series.iloc[row])}; expected {expected}", path=path,
                            particle=row + 1)
    return same_or(out.to_numpy())


FINITE_COLUMNS = ["defocus_u", "defocus_v", "pixel_size", "voltage", "cs"]  # NaN or inf here would spoil every image


def shown(value) -> str:
    """A value as a message shows it: ``1.31``, ``'abc'``, ``b'\\xff'``, ``(16, 0)`` (not ``np.float32(1.31)``)."""
    if isinstance(value, np.ndarray):
        return f"({', '.join(shown(v) for v in value)})"
    if isinstance(value, (np.integer, np.floating)):
        return str(value)
    return repr(value.item() if isinstance(value, np.generic) else value)


def _probe(values: np.ndarray) -> np.ndarray:
    """The values to test: one for a zero-stride column (all the same), else all of them."""
    return values[:1] if values.ndim == 1 and values.strides == (0,) else values


def first_bad(bad: np.ndarray, values: np.ndarray, name: str, path: Path, expected: str) -> None:
    """An error naming the first particle where ``bad`` is set (anywhere in its row of a vector field)."""
    bad = bad.any(axis=tuple(range(1, bad.ndim)))
    if bad.any():
        row = int(np.argmax(bad))
        raise ParticleError(f"{name} is {shown(values[row])}; expected {expected}", path=path, particle=row + 1)


def finite(values: np.ndarray, name: str, path: Path, expected: str = "a finite number") -> None:
    """An error naming the first particle whose value is NaN or infinite."""
    probe = _probe(np.asarray(values))
    first_bad(~np.isfinite(probe), probe, name, path, expected)


def whole(values, name: str, path: Path, expected: str = "a whole number") -> np.ndarray:
    """A column of whole numbers, or an error naming the first particle whose value is not one."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values
    numbers = floats(values, name, path, expected)
    probe = _probe(numbers)
    first_bad(~np.isfinite(probe) | (probe != np.trunc(probe)), probe, name, path, expected)
    return numbers


def signs(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    """A data sign per particle, or an error naming the first that is not +1 or -1."""
    probe = _probe(values)
    first_bad((probe != 1) & (probe != -1), probe, name, path, "+1 or -1 (the data sign)")
    return values


def categorical(values) -> pd.Categorical:
    """Text values (an array of shared or repeated strings) as a Categorical, by hashing."""
    if isinstance(values, pd.Categorical):
        return values
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        return values.array
    values = np.asarray(values, dtype=object)
    if values.ndim == 1 and values.strides == (0,) and len(values):
        values, codes = values[:1], np.zeros(len(values), np.int8)
    elif values.ndim == 1 and len(values) > 1 and values.flags.c_contiguous:
        # by identity first (the elements are a few shared objects: hashing pointers is cheap), then
        # by value among those few (equal strings may be different objects)
        codes, _ = pd.factorize(np.frombuffer(values.data, dtype=np.intp))
        first = np.searchsorted(np.maximum.accumulate(codes), np.arange(codes.max() + 1))
        values, codes = values[first], codes
    else:
        codes = None
    by_value, uniques = pd.factorize(values, use_na_sentinel=True)
    if codes is not None:
        by_value = by_value[codes]
    return pd.Categorical.from_codes(by_value, categories=pd.Index(uniques, dtype=object))


def float32_decimal(values: np.ndarray) -> np.ndarray:
    """float32 values as the float64 of their shortest decimal (what ``str(np.float32(x))`` shows), so
    a STAR file written from a ``.cs`` says ``2.7``, not ``2.700000047683716``; converting back to
    float32 gives the same bits. Vectorised: one pass per significant digit, nine at most.

    >>> float32_decimal(np.float32([2.7, 0.07, 15301.1, -1.31e-5, 0.0])).tolist()
    [2.7, 0.07, 15301.1, -1.31e-05, 0.0]
    """
    x = np.asarray(values)
    if x.dtype != np.float32:
        return x.astype(np.float64)
    out = x.astype(np.float64)
    todo = np.isfinite(out) & (out != 0)
    mag = np.zeros(out.shape)
    mag[todo] = np.floor(np.log10(np.abs(out[todo])))
    for digits in range(1, 10):
        idx = np.flatnonzero(todo)
        if not len(idx):
            break
        e = digits - 1 - mag[idx]  # decimal places kept
        up = 10.0 ** np.abs(e)  # exact powers of ten: multiply or divide by them, never by 10**-k
        cand = np.where(e >= 0, np.round(out[idx] * up) / up, np.round(out[idx] / up) * up)
        ok = cand.astype(np.float32) == x[idx]
        out[idx[ok]] = cand[ok]
        todo[idx[ok]] = False
    return out

