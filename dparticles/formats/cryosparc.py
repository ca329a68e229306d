"""CryoSPARC ``.cs`` datasets: numpy structured arrays, one row per particle. No science here."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dparticles.errors import ParticleError
from dparticles.metadata import (Table, categorical, finite, first_bad, float32_decimal, floats, group_names, same,
                                 same_or, shown, values_of)


NAME = "cryosparc"
SUFFIXES = (".cs",)
METADATA_FILE = "particles.cs"  # what an output folder holds


def guess_can_open(path: Path) -> bool:
    """A CryoSPARC dataset, by its name."""
    return path.suffix.lower() in SUFFIXES and not path.is_dir()


def open_table(path: Path) -> Table:
    """The particles of a ``.cs`` dataset as the canonical table."""
    return from_cs(read_cs(path), path)


RESULT_GROUP_FILE = "particles.csg"  # beside METADATA_FILE: what CryoSPARC's Import Result Group job reads
CS_SOURCE = "cs_source"  # attrs: the .cs whose rows (coordinate ``cs_row``) the particles are


def write_particles(path: Path, particles: pd.DataFrame, paths: np.ndarray | None, indices: np.ndarray | None,
                    attrs: dict) -> np.ndarray:
    """Write the canonical table as a CryoSPARC dataset at ``path`` (the caller makes it atomic) and
    return it. Particles that came from a ``.cs`` (``attrs[CS_SOURCE]``, rows ``cs_row``) keep its
    rows: every field as it was, bit for bit and in its dtype, but those the job changed (where the
    images are, their box and pixel size, shifts and coordinates after recentring)."""
    data = to_cs(particles, paths, indices, attrs.get("pose", "none"))
    source = attrs.get(CS_SOURCE)
    if source and "cs_row" in particles:
        original = read_cs(source, mapped=True)[particles["cs_row"].to_numpy()]  # the rows in use, one copy
        if "uid" not in particles and "uid" in original.dtype.names:  # a STAR file beside it holds none
            data["uid"] = original["uid"]
        data = kept_as_they_were(original, data)
    write_cs(path, data)
    return data


def kept_as_they_were(original: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``new`` in the layout of ``original`` (its fields, order, dtypes and shapes; new fields after
    them): each value of ``original`` kept bit for bit unless ``new`` changed it. A number counts as
    changed by more than 4 units in the last place of the original's float type (the round trip
    through the canonical table's degrees and Euler angles moves one by one or two), text by any
    difference; text longer than its field widens the field."""
    fields = [(name, original.dtype.fields[name][0]) for name in original.dtype.names]
    for k, (name, dtype) in enumerate(fields):
        if name in new.dtype.names and dtype.base.kind == "S":
            width = max(dtype.base.itemsize, new.dtype.fields[name][0].base.itemsize)
            fields[k] = (name, np.dtype((f"S{width}", dtype.shape)))
    fields += [(name, new.dtype.fields[name][0]) for name in new.dtype.names if name not in original.dtype.names]
    out = np.empty(len(original), dtype=fields)
    for name in original.dtype.names:
        out[name] = original[name]
        if name not in new.dtype.names:
            continue
        old, now = original[name], new[name]
        if old.dtype.kind == "f":
            tol = 4 * np.spacing(np.abs(old).astype(old.dtype))
            same_value = (np.abs(now.astype(np.float64) - old) <= tol) | (np.isnan(now) & np.isnan(old))
        else:
            same_value = now == old
        changed = ~same_value.reshape(len(old), -1).all(axis=1)
        if changed.any():
            out[name][changed] = now[changed]
    for name in new.dtype.names:
        if name not in original.dtype.names:
            out[name] = new[name]
    return out


def write_result_group(path: Path, metafile: str, data: np.ndarray, description: str) -> None:
    """Write the result group (``.csg``) of the dataset ``metafile`` beside it, as CryoSPARC's own
    exports write one (a YAML file: the group, then one result per slot of the dataset, each naming
    the dataset relative to the group's folder with CryoSPARC's ``>`` prefix), so that CryoSPARC's
    Import Result Group job takes the particles back."""
    import datetime

    import yaml

    from dparticles import __version__

    slots = sorted({name.split("/", 1)[0] for name in data.dtype.names if "/" in name})
    group = {"created": datetime.datetime.now().isoformat(sep=" "),
             "group": {"description": description, "name": "particles", "title": "Particles", "type": "particle"},
             "results": {slot: {"metafile": f">{metafile}", "num_items": int(len(data)), "type": f"particle.{slot}"}
                         for slot in slots},
             "version": f"dparticles-{__version__}"}
    with open(path, "w") as f:
        yaml.safe_dump(group, f, sort_keys=True)


def read_cs(path: str | os.PathLike, *, mapped: bool = False) -> np.ndarray:
    """Load a ``.cs`` file as a structured array (never pickled objects); ``mapped``: memory-mapped,
    read only as its rows are used."""
    path = Path(path)
    if not path.is_file():
        raise ParticleError("no such CryoSPARC dataset", path=path)
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r" if mapped else None)
    except Exception as exc:
        raise ParticleError(f"could not read as a CryoSPARC .cs dataset ({exc})", path=path) from exc
    if not isinstance(data, np.ndarray) or data.dtype.names is None:
        raise ParticleError("not a CryoSPARC dataset: expected a numpy structured array", path=path)
    if data.ndim != 1:
        raise ParticleError(f"not a CryoSPARC dataset: the array has shape {data.shape}; expected one row per "
                            "particle (a one-dimensional array)", path=path)
    return data


def write_cs(path: str | os.PathLike, data: np.ndarray) -> None:
    """Save a structured array exactly as CryoSPARC does (``np.save`` to an open file: no ``.npy`` suffix)."""
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)


def import_signatures(paths: Sequence[str]) -> np.ndarray:
    """CryoSPARC's 64-bit import signature of each path: the first 8 bytes of the SHA-1 of the path's
    UTF-8 text, read as a little-endian ``uint64`` (``cryosparc.tools.get_import_signatures``, the scheme
    CryoSPARC documents for ``import_sig``). An empty path (nothing to sign) gives 0."""
    digests = b"".join(hashlib.sha1(p.encode("utf-8")).digest()[:8] if p else bytes(8) for p in paths)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# CryoSPARC fields to the canonical table and back
# ---------------------------------------------------------------------------------------------

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
            raise ParticleError(f"blob/shape is {shown(shape[row])}; expected a square image (ny = nx)", path=path,
                                particle=row + 1)
        out["box"] = same_or(shape[:, 0].astype(np.int64))
    if "blob/psize_A" in names:
        out["pixel_size"] = same_or(float32_decimal(take("blob/psize_A")))
    if "blob/sign" in names:
        out["sign"] = same_or(float32_decimal(take("blob/sign")))
    simple = {"ctf/accel_kv": "voltage", "ctf/cs_mm": "cs", "ctf/amp_contrast": "amp_contrast",
              "ctf/df1_A": "defocus_u", "ctf/df2_A": "defocus_v", "mscope_params/total_dose_e_per_A2": "dose"}
    for f, name in simple.items():
        if f in names:
            out[name] = float32_decimal(take(f))
            if name in ("voltage", "cs", "amp_contrast", "dose"):
                out[name] = same_or(out[name])
    for f, name in {"ctf/df_angle_rad": "defocus_angle", "ctf/phase_shift_rad": "phase_shift"}.items():
        if f in names:
            out[name] = np.rad2deg(take(f).astype(np.float64))
    if "ctf/exp_group_id" in names:
        out["optics_group"] = same_or(take("ctf/exp_group_id").astype(np.int64) + 1)
    else:
        out["optics_group"] = same(np.int64(1), len(data))
    out["optics_group_name"] = group_names(out["optics_group"])
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
        if f"{kind}/psize_A" in names:  # shifts are in pixels of the alignments' own pixel size
            psize = out["alignment_pixel_size"] = same_or(float32_decimal(take(f"{kind}/psize_A")))
        else:
            psize = out["pixel_size"]
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
    out["cs_row"] = np.arange(len(data), dtype=np.int64)  # each particle's row here, for write_particles
    return Table(pd.DataFrame(out, index=pd.RangeIndex(len(data)), copy=False),
                 {"format": "cryosparc", "pose": pose, CS_SOURCE: str(Path(path).resolve())})


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
            _check_cs_type(data[name], name, fields[name], path)
            checked.append(name)
        elif len(data.dtype.fields[name][0].shape) > 1:  # kept as cs:<field>[i] columns, which a matrix is not
            raise ParticleError(f"field {name} has shape {data.dtype.fields[name][0].shape} per particle; "
                                "expected a value or a vector per particle", path=path)
    rows = max(1, 2**20 // data.dtype.itemsize)
    for a in range(0, len(data), rows):
        block = data[a:a + rows]
        try:
            for name in checked:
                _check_cs_values(block[name], name, fields[name], path)
        except ParticleError as exc:
            raise ParticleError(exc.message, path=path, particle=a + exc.particle) from None


def _check_cs_type(values: np.ndarray, name: str, spec: tuple, path: Path) -> None:
    """A field's shape per particle and its dtype against its entry (``spec``) in :data:`_CS_FIELDS`."""
    shape, type_, _, meaning = spec
    kinds, one, many = _CS_TYPES[type_]
    if values.shape[1:] != shape:
        raise ParticleError(f"field {name} has shape {values.shape[1:]} per particle; expected "
                            f"{'one value' if shape == () else f'shape {shape}'} per particle ({meaning})", path=path)
    if values.dtype.kind not in kinds:
        if values.dtype.kind in "SU" and shape == ():  # text where numbers belong: the first that is not one
            floats(values, name, path, f"{one} ({meaning})")
        raise ParticleError(f"field {name} holds {values.dtype}; expected {many} ({meaning})", path=path)


def _check_cs_values(values: np.ndarray, name: str, spec: tuple, path: Path) -> None:
    """A field's values against its entry (``spec``) in :data:`_CS_FIELDS`: an error names the first
    particle that is wrong."""
    shape, type_, bound, meaning = spec
    _, one, many = _CS_TYPES[type_]
    expected = f"{one if shape == () else f'{shape[0]} {many}'}{' ' + bound if bound else ''} ({meaning})"
    if type_ == "finite":
        finite(values, name, path, expected)
    if type_ == "sign":
        first_bad((values != 1) & (values != -1), values, name, path, expected)
    if bound == "> 0":
        first_bad(values <= 0, values, name, path, expected)
    if bound == ">= 0" and values.dtype.kind != "u":
        first_bad(values < 0, values, name, path, expected)


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
            first_bad(values == u, values, name, path, f"UTF-8 text{meaning}")
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
        own = "alignment_pixel_size" if "alignment_pixel_size" in particles else "pixel_size"
        psize = particles[own].to_numpy(np.float64)  # the alignments' pixel size stays theirs
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
            cols[name] = _cs_column(values_of(particles[col]))
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

