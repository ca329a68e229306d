"""Particle metadata: RELION STAR and CryoSPARC ``.cs`` tables to one canonical table and back.

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
``star:<label>@number`` (the number), and written back as one column (see :mod:`dparticles.io.star`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dparticles.errors import ParticleError
from dparticles.io.star import NUMBER, line_of_row

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


@dataclass
class Table:
    """A canonical particle table plus what is known of the file it came from."""

    particles: pd.DataFrame
    attrs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# RELION STAR
# ---------------------------------------------------------------------------------------------

def from_star(blocks: dict, path: Path) -> Table:
    """Interpret STAR blocks (3.0 single table, or 3.1+ optics + particles in any order), as
    :func:`dparticles.io.star.read_star` gives them (compact or not). An error about a particle
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
            out[name] = _values(star[label])
    for label, name in _STAR_OPTICS.items():  # 3.0 files carry optics per particle
        if label in star and name not in out:
            out[name] = _values(star[label])
    if SIGN_LABEL in star:
        out["sign"] = _signs(floats(_values(star[SIGN_LABEL]), SIGN_LABEL, path), SIGN_LABEL, path)

    if optics is not None:
        if "rlnOpticsGroup" not in optics:
            raise ParticleError("the data_optics table has no rlnOpticsGroup column", path=path)
        groups = _check_optics(optics, path)
        if "optics_group" not in out:
            if len(optics) != 1:
                raise ParticleError("particles have no rlnOpticsGroup but data_optics has several groups",
                                    path=path)
            out["optics_group"] = _same(groups[0], n)
        else:  # checked before the look-up, so that an error names the particle that is wrong
            out["optics_group"] = _ints(_whole(out["optics_group"], "rlnOpticsGroup", path,
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
            detector[label] = floats(_values(star[label]), label, path)
            _finite(detector[label], label, path)
    det, mag = detector.get("rlnDetectorPixelSize"), detector.get("rlnMagnification")
    if "pixel_size" not in out and det is not None and mag is not None:
        out["pixel_size"] = _same_or(1e4 * np.asarray(det, dtype=np.float64) / np.asarray(mag, dtype=np.float64))

    # pixel-valued origins (3.0 convention; also seen inside 3.1 files): to Å
    for axis in "XY":
        label = f"rlnOrigin{axis}"
        if label in star and f"shift_{axis.lower()}" not in out:
            origin = floats(_values(star[label]), label, path)
            if "pixel_size" not in out:
                out[f"_origin_px_{axis.lower()}"] = origin
            else:
                out[f"shift_{axis.lower()}"] = origin * np.asarray(out["pixel_size"], dtype=np.float64)

    for label in star.columns:
        if label not in _STAR_PARTICLE and label not in _STAR_PARTICLE_DERIVED and label not in _STAR_OPTICS \
                and label not in _STAR_OPTICS_DERIVED:
            values = _values(star[label])
            out[f"star:{label}"] = _same_or(values) if isinstance(values, np.ndarray) else values

    labels = {v: k for k, v in (_STAR_PARTICLE | _STAR_OPTICS).items()}
    for col in ("optics_group", "class_number", "box"):
        if col in out:
            out[col] = _ints(_whole(out[col], labels.get(col, col), path))
    for col in _FLOAT:  # e.g. 'rlnVoltage 300' parses as an integer; units are float whatever the file wrote
        if col in out:
            out[col] = floats(out[col], labels.get(col, col), path)
            if col in _FINITE:
                _finite(out[col], labels.get(col, col), path)
    if "optics_group" not in out:
        out["optics_group"] = _same(np.int64(1), n)
    if "optics_group_name" not in out:
        out["optics_group_name"] = _group_names(out["optics_group"])
    pose = "3d" if {"angle_rot", "angle_tilt"} <= set(out) else "2d" if "angle_psi" in out else "none"
    particles = pd.DataFrame(out, index=pd.RangeIndex(n), copy=False)
    return Table(particles, {"format": f"relion-{version}", "pose": pose, "particle_block": particles_name})


def assign(particles: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """``particles`` with ``columns`` set, sharing every array (``df[name] = values`` copies, and makes
    a zero-stride view a full array)."""
    if not columns:
        return particles
    out = {c: _values(particles[c]) for c in particles.columns} | {k: _values(v) if isinstance(v, pd.Series) else v
                                                                   for k, v in columns.items()}
    return pd.DataFrame(out, index=particles.index, copy=False)


def _values(s: pd.Series):
    """A column's values without a copy: a Categorical as it is, anything else as a numpy array."""
    return s.array if isinstance(s.dtype, pd.CategoricalDtype) else s.to_numpy()


def _same(value, n: int) -> np.ndarray:
    """``value`` for each of ``n`` particles, in no memory (a read-only zero-stride view)."""
    return np.broadcast_to(np.asarray(value), (n,))


def _same_or(values: np.ndarray) -> np.ndarray:
    """``values``, as a zero-stride view when they are all the same number."""
    values = np.asarray(values)
    if values.ndim == 1 and len(values) > 1 and values.dtype.kind in "iufb" and values.strides != (0,) \
            and (values == values[0]).all():
        return _same(values[0], len(values))
    return values


def _ints(values) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == np.int64:
        return values
    if values.ndim == 1 and values.strides == (0,) and len(values):
        return _same(values[:1].astype(np.int64)[0], len(values))
    return values.astype(np.int64)


def _rows_of(groups, keys: pd.Index) -> np.ndarray:
    """For each particle, the row of its optics group in the optics table (-1 if absent)."""
    groups = np.asarray(groups)
    if groups.ndim == 1 and groups.strides == (0,) and len(groups):
        return _same(keys.get_indexer(groups[:1])[0], len(groups))
    if groups.dtype.kind in "iu" and len(groups) and keys.dtype.kind in "iu":
        lo, hi = int(groups.min()), int(groups.max())
        if lo >= 0 and hi < 2**20:  # small group numbers: a lookup table instead of hashing each particle
            lut = np.full(hi + 1, -1, dtype=np.int64)
            inside = (keys >= 0) & (keys <= hi)
            lut[np.asarray(keys[inside], dtype=np.int64)] = np.flatnonzero(inside)
            rows = lut[groups]
            return _same(rows[0], len(rows)) if (rows == rows[0]).all() else rows
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
        return _same(values[rows[0]], len(rows))
    return values[rows]


def _group_names(groups) -> pd.Categorical:
    """``opticsGroupN`` for each particle's group N."""
    groups = np.asarray(groups)
    if groups.strides == (0,) or not len(groups):
        codes, uniques = np.zeros(len(groups), np.int8), groups[:1]
    else:
        codes, uniques = pd.factorize(groups)
    return pd.Categorical.from_codes(codes, categories=pd.Index([f"opticsGroup{g}" for g in uniques], dtype=object))


_FLOAT = ["coord_x", "coord_y", "defocus_u", "defocus_v", "defocus_angle", "phase_shift", "voltage", "cs", "dose",
          "amp_contrast", "pixel_size", "shift_x", "shift_y", "angle_rot", "angle_tilt", "angle_psi"]


def floats(values, name: str, path: Path, expected: str = "a number") -> np.ndarray:
    """A numeric column as float64 (a view when it is one already), or a clear error naming the first
    particle that is not a number (and saying what was ``expected``)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iufb":
        if values.dtype == np.float64:
            return values
        if values.ndim == 1 and values.strides == (0,) and len(values):
            return _same(np.float64(values[0]), len(values))
        return values.astype(np.float64)
    series = pd.Series(np.asarray(values, dtype=object))
    out = pd.to_numeric(series, errors="coerce").astype(np.float64)
    bad = out.isna() & series.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ParticleError(f"{name} is {_shown(series.iloc[row])}; expected {expected}", path=path,
                            particle=row + 1)
    return _same_or(out.to_numpy())


_FINITE = ["defocus_u", "defocus_v", "pixel_size", "voltage", "cs"]  # NaN or inf here would spoil every image


def _shown(value) -> str:
    """A value as a message shows it: ``1.31``, ``'abc'``, ``b'\\xff'``, ``(16, 0)`` (not ``np.float32(1.31)``)."""
    if isinstance(value, np.ndarray):
        return f"({', '.join(_shown(v) for v in value)})"
    if isinstance(value, (np.integer, np.floating)):
        return str(value)
    return repr(value.item() if isinstance(value, np.generic) else value)


def _probe(values: np.ndarray) -> np.ndarray:
    """The values to test: one for a zero-stride column (all the same), else all of them."""
    return values[:1] if values.ndim == 1 and values.strides == (0,) else values


def _first(bad: np.ndarray, values: np.ndarray, name: str, path: Path, expected: str) -> None:
    """An error naming the first particle where ``bad`` is set (anywhere in its row of a vector field)."""
    bad = bad.any(axis=tuple(range(1, bad.ndim)))
    if bad.any():
        row = int(np.argmax(bad))
        raise ParticleError(f"{name} is {_shown(values[row])}; expected {expected}", path=path, particle=row + 1)


def _finite(values: np.ndarray, name: str, path: Path, expected: str = "a finite number") -> None:
    """An error naming the first particle whose value is NaN or infinite."""
    probe = _probe(np.asarray(values))
    _first(~np.isfinite(probe), probe, name, path, expected)


def _whole(values, name: str, path: Path, expected: str = "a whole number") -> np.ndarray:
    """A column of whole numbers, or an error naming the first particle whose value is not one."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values
    numbers = floats(values, name, path, expected)
    probe = _probe(numbers)
    _first(~np.isfinite(probe) | (probe != np.trunc(probe)), probe, name, path, expected)
    return numbers


def _signs(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    """A data sign per particle, or an error naming the first that is not +1 or -1."""
    probe = _probe(values)
    _first((probe != 1) & (probe != -1), probe, name, path, "+1 or -1 (the data sign)")
    return values


def _check_optics(optics: pd.DataFrame, path: Path) -> np.ndarray:
    """Numbers in data_optics that every particle of a group takes, or an error naming the line;
    returns the group numbers (int64)."""
    try:
        groups = _ints(_whole(_values(optics["rlnOpticsGroup"]), "rlnOpticsGroup", path))
        _first(pd.Index(groups).duplicated(), groups, "rlnOpticsGroup", path, "each optics group once")
        for label in ("rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                      "rlnImageSize", "rlnDetectorPixelSize", "rlnMagnification"):
            if label in optics:
                values = _values(optics[label])
                values = _whole(values, label, path) if label == "rlnImageSize" else floats(values, label, path)
                if label != "rlnAmplitudeContrast":
                    _finite(values, label, path)
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
    :func:`dparticles.io.star.write_star` writes as one."""
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
            out[inverse[name]] = _values(particles[name])
    for col in particles.columns:
        if col.startswith("star:"):
            out[col.split(":", 1)[1]] = _values(particles[col])
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


# ---------------------------------------------------------------------------------------------
# CryoSPARC .cs
# ---------------------------------------------------------------------------------------------

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


def from_cs(data: np.ndarray, path: Path) -> Table:
    """Interpret a CryoSPARC particle dataset (0-based indices, radians, pixel shifts)."""
    names = set(data.dtype.names)
    _check_cs(data, path)
    out: dict[str, object] = {}
    used: set[str] = set()

    def take(field_: str):
        used.add(field_)
        return data[field_]

    if "uid" in names:
        out["uid"] = take("uid").astype(np.uint64)
    if "blob/path" in names:
        paths = _decoded(take("blob/path"), "blob/path", path)
        out["image_name"] = paths.rename_categories([c.lstrip(">") for c in paths.categories]) \
            if len(set(c.lstrip(">") for c in paths.categories)) == len(paths.categories) \
            else categorical(np.asarray(paths.categories.str.lstrip(">"), dtype=object)[paths.codes])
        out["image_index"] = take("blob/idx").astype(np.int64)
    if "blob/shape" in names:
        shape = take("blob/shape")
        if (shape[:, 0] != shape[:, 1]).any():
            row = int(np.flatnonzero(shape[:, 0] != shape[:, 1])[0])
            raise ParticleError(f"blob/shape is {_shown(shape[row])}; expected a square image (ny = nx)", path=path,
                                particle=row + 1)
        out["box"] = _same_or(shape[:, 0].astype(np.int64))
    if "blob/psize_A" in names:
        out["pixel_size"] = _same_or(float32_decimal(take("blob/psize_A")))
    if "blob/sign" in names:
        out["sign"] = _same_or(float32_decimal(take("blob/sign")))
    simple = {"ctf/accel_kv": "voltage", "ctf/cs_mm": "cs", "ctf/amp_contrast": "amp_contrast",
              "ctf/df1_A": "defocus_u", "ctf/df2_A": "defocus_v", "mscope_params/total_dose_e_per_A2": "dose"}
    for f, name in simple.items():
        if f in names:
            out[name] = float32_decimal(take(f))
            if name in ("voltage", "cs", "amp_contrast", "dose"):
                out[name] = _same_or(out[name])
    for f, name in {"ctf/df_angle_rad": "defocus_angle", "ctf/phase_shift_rad": "phase_shift"}.items():
        if f in names:
            out[name] = np.rad2deg(take(f).astype(np.float64))
    if "ctf/exp_group_id" in names:
        out["optics_group"] = _same_or(take("ctf/exp_group_id").astype(np.int64) + 1)
    else:
        out["optics_group"] = _same(np.int64(1), len(data))
    out["optics_group_name"] = _group_names(out["optics_group"])
    if "location/micrograph_path" in names:
        out["micrograph"] = _decoded(take("location/micrograph_path"), "location/micrograph_path", path)
    if set(_CS_LOCATION) <= names:
        shape = take("location/micrograph_shape").astype(np.float64)
        out["coord_x"] = take("location/center_x_frac").astype(np.float64) * shape[:, 1]
        out["coord_y"] = take("location/center_y_frac").astype(np.float64) * shape[:, 0]
        out["micrograph_ny"] = shape[:, 0].astype(np.int64)
        out["micrograph_nx"] = shape[:, 1].astype(np.int64)

    pose = "none"
    kind = _alignments(names)
    if kind is not None:
        pose = "3d" if kind == "alignments3D" else "2d"
        psize = take(f"{kind}/psize_A").astype(np.float64) if f"{kind}/psize_A" in names else out["pixel_size"]
        shift = take(f"{kind}/shift").astype(np.float64)
        out["shift_x"] = shift[:, 0] * psize
        out["shift_y"] = shift[:, 1] * psize
        if f"{kind}/pose" in names:
            p = take(f"{kind}/pose").astype(np.float64)
            if kind == "alignments3D":
                # CryoSPARC's pose is the inverse rotation of RELION's matrix (as pyem and cryoDRGN read it)
                out["angle_rot"], out["angle_tilt"], out["angle_psi"] = euler_from_matrix(
                    np.swapaxes(expmap(p), -1, -2))
            else:
                out["angle_psi"] = np.rad2deg(p)
        if f"{kind}/class" in names:
            out["class_number"] = take(f"{kind}/class").astype(np.int64) + 1
    for f in data.dtype.names:
        if f in used:
            continue
        col = data[f]
        key = f"cs:{f.replace('/', '.')}"
        if col.ndim == 1:
            out[key] = _decoded(col, f, path) if col.dtype.kind == "S" else np.ascontiguousarray(col)
        else:
            for i in range(col.shape[1]):
                out[f"{key}[{i}]"] = np.ascontiguousarray(col[:, i])
    return Table(pd.DataFrame(out, index=pd.RangeIndex(len(data)), copy=False), {"format": "cryosparc", "pose": pose})


# The .cs fields read above: (shape per particle, type, bound, what the field means). A type is "int"
# (integers), "number", "finite" (a number, not NaN or infinite), "sign" (+1 or -1) or "text" (bytes,
# decoded as UTF-8 when read); a bound is "", ">= 0" or "> 0".
_CS_FIELDS: dict[str, tuple[tuple[int, ...], str, str, str]] = {
    "uid": ((), "int", ">= 0", "the particle's unique id"),
    "blob/path": ((), "text", "", "the stack path"),
    "blob/idx": ((), "int", ">= 0", "the 0-based image index"),
    "blob/shape": ((2,), "int", "> 0", "the image size ny, nx in pixels"),
    "blob/psize_A": ((), "finite", "", "the pixel size in Å"),
    "blob/sign": ((), "sign", "", "the data sign"),
    "ctf/accel_kv": ((), "finite", "", "the voltage in kV"),
    "ctf/cs_mm": ((), "finite", "", "the spherical aberration in mm"),
    "ctf/amp_contrast": ((), "finite", "", "the amplitude contrast"),
    "ctf/df1_A": ((), "finite", "", "defocus U in Å"),
    "ctf/df2_A": ((), "finite", "", "defocus V in Å"),
    "ctf/df_angle_rad": ((), "finite", "", "the astigmatism angle in radians"),
    "ctf/phase_shift_rad": ((), "finite", "", "the phase shift in radians"),
    "ctf/exp_group_id": ((), "int", ">= 0", "the 0-based exposure group"),
    "mscope_params/total_dose_e_per_A2": ((), "number", "", "the total dose in e/Å²"),
    "location/micrograph_path": ((), "text", "", "the micrograph path"),
    "location/micrograph_shape": ((2,), "int", "> 0", "the micrograph size ny, nx in pixels"),
    "location/center_x_frac": ((), "finite", "", "x as a fraction of the micrograph width"),
    "location/center_y_frac": ((), "finite", "", "y as a fraction of the micrograph height"),
}
_CS_LOCATION = ("location/micrograph_shape", "location/center_x_frac", "location/center_y_frac")  # read together
_CS_ALIGNMENTS = {"shift": ((2,), "finite", "", "the shift x, y in pixels"),
                  "psize_A": ((), "finite", "> 0", "the pixel size of the shift in Å"),
                  "class": ((), "int", ">= 0", "the 0-based class")}
_CS_POSE = {"alignments3D": ((3,), "finite", "", "the rotation as an axis-angle vector in radians"),
            "alignments2D": ((), "finite", "", "the in-plane rotation in radians")}
# type: (dtype kinds, one value, several values)
_CS_TYPES = {"int": ("iu", "an integer", "integers"), "number": ("iuf", "a number", "numbers"),
             "finite": ("iuf", "a finite number", "finite numbers"), "sign": ("iuf", "+1 or -1", "numbers"),
             "text": ("S", "UTF-8 text", "bytes (UTF-8 text)")}


def _alignments(names: set[str]) -> str | None:
    """The alignments a .cs dataset's pose is read from: 3D where given, else 2D, else none."""
    return next((k for k in ("alignments3D", "alignments2D") if f"{k}/shift" in names), None)


def _check_cs(data: np.ndarray, path: Path) -> None:
    """Every .cs field that :func:`from_cs` reads as CryoSPARC writes it (shape, type, range), or one
    error naming the field and, for a bad value, the particle (1-based): a wrong index would silently
    give another particle's image. The values are checked a block of rows at a time, all fields of a
    block while it is in the cache (a field's values are strided through the whole row)."""
    names = set(data.dtype.names)
    if "blob/path" in names and "blob/idx" not in names:
        raise ParticleError("field blob/path is given without blob/idx; expected both", path=path)
    fields = dict(_CS_FIELDS)
    kind = _alignments(names)
    if kind is not None:
        if f"{kind}/psize_A" not in names and "blob/psize_A" not in names:
            raise ParticleError(f"field {kind}/shift is given without {kind}/psize_A or blob/psize_A; expected "
                                "one of them (the pixel size of the shift)", path=path)
        fields |= {f"{kind}/{k}": spec for k, spec in _CS_ALIGNMENTS.items()} | {f"{kind}/pose": _CS_POSE[kind]}
    checked = []
    for name in data.dtype.names:
        if name in fields:
            _check_cs_type(data[name], name, *fields[name], path)
            checked.append(name)
        elif len(data.dtype.fields[name][0].shape) > 1:  # kept as cs:<field>[i] columns, which a matrix is not
            raise ParticleError(f"field {name} has shape {data.dtype.fields[name][0].shape} per particle; "
                                "expected a value or a vector per particle", path=path)
    rows = max(1, 2**20 // data.dtype.itemsize)
    for a in range(0, len(data), rows):
        block = data[a:a + rows]
        try:
            for name in checked:
                _check_cs_values(block[name], name, *fields[name], path)
        except ParticleError as exc:
            raise ParticleError(exc.message, path=path, particle=a + exc.particle) from None


def _check_cs_type(values: np.ndarray, name: str, shape: tuple[int, ...], type_: str, bound: str, meaning: str,
                   path: Path) -> None:
    """A field's shape per particle and its dtype against its entry in :data:`_CS_FIELDS`."""
    kinds, one, many = _CS_TYPES[type_]
    if values.shape[1:] != shape:
        raise ParticleError(f"field {name} has shape {values.shape[1:]} per particle; expected "
                            f"{'one value' if shape == () else f'shape {shape}'} per particle ({meaning})", path=path)
    if values.dtype.kind not in kinds:
        if values.dtype.kind in "SU" and shape == ():  # text where numbers belong: the first that is not one
            floats(values, name, path, f"{one} ({meaning})")
        raise ParticleError(f"field {name} holds {values.dtype}; expected {many} ({meaning})", path=path)


def _check_cs_values(values: np.ndarray, name: str, shape: tuple[int, ...], type_: str, bound: str, meaning: str,
                     path: Path) -> None:
    """A field's values against its entry in :data:`_CS_FIELDS`: an error names the first particle that is wrong."""
    _, one, many = _CS_TYPES[type_]
    expected = f"{one if shape == () else f'{shape[0]} {many}'}{' ' + bound if bound else ''} ({meaning})"
    if type_ == "finite":
        _finite(values, name, path, expected)
    if type_ == "sign":
        _first((values != 1) & (values != -1), values, name, path, expected)
    if bound == "> 0":
        _first(values <= 0, values, name, path, expected)
    if bound == ">= 0" and values.dtype.kind != "u":
        _first(values < 0, values, name, path, expected)


def _decoded(values: np.ndarray, name: str, path: Path) -> pd.Categorical:
    """A fixed-width bytes field as a Categorical of its distinct values decoded from UTF-8, a
    million rows at a time (no Python object per row), or an error naming the first particle whose
    bytes are not UTF-8."""
    index: dict = {}
    codes = np.empty(len(values), dtype=np.int32)
    for a in range(0, len(values), 1_000_000):
        part, uniques = pd.factorize(values[a:a + 1_000_000].astype(object))
        mapping = np.array([index.setdefault(u, len(index)) for u in uniques.tolist()], dtype=np.int32)
        codes[a:a + len(part)] = mapping[part]
    categories = []
    for u in index:  # in the order of their first particle
        try:
            categories.append(u.decode("utf-8"))
        except UnicodeDecodeError:
            meaning = f" ({_CS_FIELDS[name][3]})" if name in _CS_FIELDS else ""
            _first(values == u, values, name, path, f"UTF-8 text{meaning}")
    return pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype=object))


def to_cs(particles: pd.DataFrame, paths: np.ndarray | None, indices: np.ndarray | None,
          pose: str) -> np.ndarray:
    """Canonical table -> CryoSPARC structured array; shifts in pixels of the new ``psize_A``."""
    n = len(particles)
    cols: dict[str, np.ndarray] = {}
    uid = particles["uid"].to_numpy(np.uint64) if "uid" in particles else _new_uids(n)
    cols["uid"] = uid
    if paths is not None:
        cols["blob/path"] = _encoded(paths)
        cols["blob/idx"] = np.asarray(indices, dtype=np.uint32)
    if "box" in particles:
        cols["blob/shape"] = np.stack([particles["box"].to_numpy(np.uint32)] * 2, axis=1)
    if "pixel_size" in particles:
        cols["blob/psize_A"] = particles["pixel_size"].to_numpy(np.float32)
    cols["blob/sign"] = (particles["sign"] if "sign" in particles else pd.Series(np.ones(n))).to_numpy(np.float32)
    for name, f in {"voltage": "ctf/accel_kv", "cs": "ctf/cs_mm", "amp_contrast": "ctf/amp_contrast",
                    "defocus_u": "ctf/df1_A", "defocus_v": "ctf/df2_A",
                    "dose": "mscope_params/total_dose_e_per_A2"}.items():
        if name in particles:
            cols[f] = particles[name].to_numpy(np.float32)
    for name, f in {"defocus_angle": "ctf/df_angle_rad", "phase_shift": "ctf/phase_shift_rad"}.items():
        if name in particles:
            cols[f] = np.deg2rad(particles[name].to_numpy(np.float64)).astype(np.float32)
    cols["ctf/exp_group_id"] = (particles["optics_group"].to_numpy(np.int64) - 1).astype(np.uint32)
    mic = "exposure" if "exposure" in particles else "micrograph"  # a linked exposure is the better path
    if mic in particles:
        cols["location/micrograph_path"] = _encoded(particles[mic])
    if {"coord_x", "micrograph_nx"} <= set(particles):
        ny, nx = particles["micrograph_ny"].to_numpy(), particles["micrograph_nx"].to_numpy()
        cols["location/micrograph_shape"] = np.stack([ny, nx], axis=1).astype(np.uint32)
        cols["location/center_x_frac"] = (particles["coord_x"].to_numpy() / nx).astype(np.float32)
        cols["location/center_y_frac"] = (particles["coord_y"].to_numpy() / ny).astype(np.float32)
    if pose != "none" and "shift_x" in particles:
        kind = "alignments3D" if pose == "3d" else "alignments2D"
        psize = particles["pixel_size"].to_numpy(np.float64)
        cols[f"{kind}/shift"] = np.stack([particles["shift_x"].to_numpy() / psize,
                                          particles["shift_y"].to_numpy() / psize], axis=1).astype(np.float32)
        cols[f"{kind}/psize_A"] = psize.astype(np.float32)
        if pose == "3d" and {"angle_rot", "angle_tilt", "angle_psi"} <= set(particles):
            m = matrix_from_euler(particles["angle_rot"].to_numpy(), particles["angle_tilt"].to_numpy(),
                                  particles["angle_psi"].to_numpy())
            cols[f"{kind}/pose"] = logmap(np.swapaxes(m, -1, -2)).astype(np.float32)
        elif pose == "2d" and "angle_psi" in particles:
            cols[f"{kind}/pose"] = np.deg2rad(particles["angle_psi"].to_numpy()).astype(np.float32)
        if "class_number" in particles:
            cols[f"{kind}/class"] = (particles["class_number"].to_numpy(np.int64) - 1).astype(np.uint32)
    vectors: dict[str, dict[int, np.ndarray]] = {}
    for col in particles.columns:
        if not col.startswith("cs:"):
            continue
        name = col[3:].replace(".", "/")
        m = re.fullmatch(r"(.+)\[(\d+)\]", name)
        if m:
            vectors.setdefault(m.group(1), {})[int(m.group(2))] = particles[col].to_numpy()
        elif name not in cols:
            cols[name] = _cs_column(_values(particles[col]))
    for name, parts in vectors.items():
        if name not in cols:
            cols[name] = np.stack([_cs_column(parts[i]) for i in sorted(parts)], axis=1)
    dtype = [(k, v.dtype, v.shape[1:]) if v.ndim > 1 else (k, v.dtype) for k, v in cols.items()]
    out = np.empty(n, dtype=dtype)
    for k, v in cols.items():
        out[k] = v
    return out


def _cs_column(values) -> np.ndarray:
    """Text columns as fixed-width UTF-8 bytes (a .cs file holds no Python objects)."""
    if isinstance(values, pd.Categorical) or values.dtype.kind in "OU":
        return _encoded(values)
    return values


def _encoded(values) -> np.ndarray:
    """Text (any array of str or bytes, or a Categorical) as fixed-width UTF-8 bytes, encoding each
    distinct value once."""
    cat = categorical(values.array if isinstance(values, pd.Series) else values)
    table = np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in cat.categories.tolist()] + [b"nan"],
                     dtype=bytes)
    return table[np.where(cat.codes < 0, len(table) - 1, cat.codes)]


def _new_uids(n: int) -> np.ndarray:
    return np.random.default_rng().integers(1, np.iinfo(np.int64).max, size=n, dtype=np.int64).astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# rotations: CryoSPARC axis-angle <-> RELION ZYZ Euler angles (RELION's Euler_angles2matrix)
# ---------------------------------------------------------------------------------------------

def matrix_from_euler(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's rotation matrix A(rot, tilt, psi) (degrees), shape (n, 3, 3)."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def euler_from_matrix(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`matrix_from_euler` (RELION's Euler_matrix2angles), degrees."""
    abs_sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]), 0.0)
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), np.arctan2(-m[..., 1, 0], m[..., 0, 0]))
    sign_sb = np.where(np.sin(psi) > 0, np.sign(m[..., 1, 2]), -np.sign(m[..., 1, 2]))
    sign_sb = np.where(np.abs(np.sin(psi)) < np.finfo(np.float64).eps, np.sign(-m[..., 0, 2]) / np.cos(psi), sign_sb)
    tilt = np.where(regular, np.arctan2(sign_sb * abs_sb, m[..., 2, 2]),
                    np.where(np.sign(m[..., 2, 2]) > 0, 0.0, np.pi))
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def expmap(v: np.ndarray) -> np.ndarray:
    """Axis-angle vectors (n, 3) -> rotation matrices (Rodrigues), as CryoSPARC's ``pose``."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)
    k = np.where(theta[..., None] > 0, v / np.where(theta > 0, theta, 1)[..., None], 0.0)
    kx = np.zeros(v.shape[:-1] + (3, 3))
    kx[..., 0, 1], kx[..., 0, 2] = -k[..., 2], k[..., 1]
    kx[..., 1, 0], kx[..., 1, 2] = k[..., 2], -k[..., 0]
    kx[..., 2, 0], kx[..., 2, 1] = -k[..., 1], k[..., 0]
    s, c = np.sin(theta)[..., None, None], np.cos(theta)[..., None, None]
    return np.eye(3) + s * kx + (1 - c) * (kx @ kx)


def logmap(m: np.ndarray) -> np.ndarray:
    """Rotation matrices -> axis-angle vectors, the inverse of :func:`expmap`."""
    cos = np.clip((np.trace(m, axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    theta = np.arccos(cos)
    w = np.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], axis=-1)
    s = np.sin(theta)
    small = s < 1e-6
    v = np.where(small[..., None], w / 2, w * (theta / np.where(small, 1, 2 * s))[..., None])
    near_pi = small & (cos < 0)
    if near_pi.any():  # theta ~ pi: axis from the symmetric part
        b = (m[near_pi] + np.eye(3)) / 2
        axis = np.sqrt(np.clip(np.diagonal(b, axis1=-2, axis2=-1), 0, None))
        i = np.argmax(axis, axis=-1)
        col = b[np.arange(len(i)), :, i]
        axis = col / np.linalg.norm(col, axis=-1, keepdims=True)
        v[near_pi] = axis * theta[near_pi][..., None]
    return v
