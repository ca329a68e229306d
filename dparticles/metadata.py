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
"""

from __future__ import annotations

import re
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
_STAR_PARTICLE_DERIVED = {"rlnImageName", "rlnOriginX", "rlnOriginY", "dparticlesDataSign"}
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
    """Interpret STAR blocks (3.0 single table, or 3.1+ optics + particles in any order)."""
    particles_name = _particle_block(blocks, path)
    star = blocks[particles_name].reset_index(drop=True)
    optics = blocks.get("optics")
    if isinstance(optics, dict):  # a key-value block named optics: one group
        optics = pd.DataFrame([optics])
    out = pd.DataFrame(index=star.index)
    version = "3.1" if optics is not None else "3.0"
    detector: dict[str, np.ndarray] = {}  # 3.0-style pixel size inputs found in an optics table

    if "rlnImageName" in star:
        out["image_name"], out["image_index"] = _split_image_names(star["rlnImageName"], path)
    for label, name in _STAR_PARTICLE.items():
        if label in star:
            out[name] = star[label]
    for label, name in _STAR_OPTICS.items():  # 3.0 files carry optics per particle
        if label in star and name not in out:
            out[name] = star[label]
    if SIGN_LABEL in star:
        out["sign"] = _floats(star[SIGN_LABEL], SIGN_LABEL, path)

    if optics is not None:
        if "rlnOpticsGroup" not in optics:
            raise ParticleError("the data_optics table has no rlnOpticsGroup column", path=path)
        if "optics_group" not in out:
            if len(optics) != 1:
                raise ParticleError("particles have no rlnOpticsGroup but data_optics has several groups",
                                    path=path)
            out["optics_group"] = int(optics["rlnOpticsGroup"].iloc[0])
        table = optics.set_index("rlnOpticsGroup")
        missing = ~out["optics_group"].isin(table.index)
        if missing.any():
            row = int(np.flatnonzero(missing.to_numpy())[0])
            raise ParticleError(f"rlnOpticsGroup {out['optics_group'].iloc[row]} is not in data_optics "
                                f"(groups: {sorted(table.index.tolist())})", path=path, particle=row + 1)
        for label in table.columns:
            values = table[label].reindex(out["optics_group"]).to_numpy()
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
    det = star.get("rlnDetectorPixelSize", detector.get("rlnDetectorPixelSize"))
    mag = star.get("rlnMagnification", detector.get("rlnMagnification"))
    if "pixel_size" not in out and det is not None and mag is not None:
        out["pixel_size"] = 1e4 * np.asarray(det, dtype=np.float64) / np.asarray(mag, dtype=np.float64)

    # pixel-valued origins (3.0 convention; also seen inside 3.1 files): to Å
    for axis in "XY":
        label = f"rlnOrigin{axis}"
        if label in star and f"shift_{axis.lower()}" not in out:
            if "pixel_size" not in out:
                out[f"_origin_px_{axis.lower()}"] = star[label].astype(np.float64)
            else:
                out[f"shift_{axis.lower()}"] = star[label].astype(np.float64) * out["pixel_size"].astype(np.float64)

    for label in star.columns:
        if label not in _STAR_PARTICLE and label not in _STAR_PARTICLE_DERIVED and label not in _STAR_OPTICS \
                and label not in _STAR_OPTICS_DERIVED:
            out[f"star:{label}"] = star[label].to_numpy()

    for col in ("optics_group", "class_number", "box"):
        if col in out:
            out[col] = out[col].astype(np.int64)
    labels = {v: k for k, v in (_STAR_PARTICLE | _STAR_OPTICS).items()}
    for col in _FLOAT:  # e.g. 'rlnVoltage 300' parses as an integer; units are float whatever the file wrote
        if col in out:
            out[col] = _floats(out[col], labels.get(col, col), path)
    if "optics_group" not in out:
        out["optics_group"] = np.int64(1)
    if "optics_group_name" not in out:
        out["optics_group_name"] = [f"opticsGroup{g}" for g in out["optics_group"]]
    pose = "3d" if {"angle_rot", "angle_tilt"} <= set(out) else "2d" if "angle_psi" in out else "none"
    return Table(out, {"format": f"relion-{version}", "pose": pose, "particle_block": particles_name})


_FLOAT = ["coord_x", "coord_y", "defocus_u", "defocus_v", "defocus_angle", "phase_shift", "voltage", "cs", "dose",
          "amp_contrast", "pixel_size", "shift_x", "shift_y", "angle_rot", "angle_tilt", "angle_psi"]


def _floats(values: pd.Series, name: str, path: Path) -> pd.Series:
    """A numeric column as float64, or a clear error naming the first particle that is not a number."""
    out = pd.to_numeric(values, errors="coerce").astype(np.float64)
    bad = out.isna() & values.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ParticleError(f"{name} is {values.iloc[row]!r}; expected a number", path=path, particle=row + 1)
    return out


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
    index = parts[0].astype(np.int64).to_numpy() - 1
    if (index < 0).any():
        row = int(np.flatnonzero(index < 0)[0])
        raise ParticleError(f"rlnImageName {s.iloc[row]!r}: image numbers start at 1", path=path, particle=row + 1)
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


def to_star(particles: pd.DataFrame, image_names: np.ndarray | None) -> dict[str, pd.DataFrame]:
    """Canonical table -> RELION 3.1 blocks (optics table, Å origins). ``image_names`` as N@path."""
    groups = particles.drop_duplicates("optics_group").sort_values("optics_group")
    optics = pd.DataFrame({"rlnOpticsGroup": groups["optics_group"].to_numpy(),
                           "rlnOpticsGroupName": groups["optics_group_name"].astype(str).to_numpy()})
    for label, name in _STAR_OPTICS.items():
        if name in groups and label != "rlnOpticsGroupName":
            optics[label] = groups[name].to_numpy()
    if "box" in groups:
        optics["rlnImageDimensionality"] = 2
    if "dose" in groups:
        optics[DOSE_LABEL] = groups["dose"].to_numpy(np.float64)
    for col in groups.columns:
        if col.startswith("star_optics:"):
            optics[col.split(":", 1)[1]] = groups[col].to_numpy()

    out = pd.DataFrame(index=particles.index)
    inverse = {v: k for k, v in _STAR_PARTICLE.items()}
    for name in CANONICAL:
        if name in inverse and name in particles:
            out[inverse[name]] = particles[name].to_numpy()
    for col in particles.columns:
        if col.startswith("star:"):
            out[col.split(":", 1)[1]] = particles[col].to_numpy()
    if "sign" in particles and (particles["sign"].to_numpy() != 1).any():
        out[SIGN_LABEL] = particles["sign"].to_numpy(np.float64)
    if image_names is not None:
        out["rlnImageName"] = image_names
    return {"optics": optics.reset_index(drop=True), "particles": out.reset_index(drop=True)}


def image_names(indices: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """RELION image names ``NNNNNN@path`` from 0-based indices (at least 6 digits, as RELION writes)."""
    idx = pd.Series(np.asarray(indices) + 1).astype(str).str.zfill(6)
    return (idx + "@" + pd.Series(paths, dtype=object).astype(str)).to_numpy(dtype=object)


# ---------------------------------------------------------------------------------------------
# CryoSPARC .cs
# ---------------------------------------------------------------------------------------------

def from_cs(data: np.ndarray, path: Path) -> Table:
    """Interpret a CryoSPARC particle dataset (0-based indices, radians, pixel shifts)."""
    names = set(data.dtype.names)
    out = pd.DataFrame(index=pd.RangeIndex(len(data)))
    used: set[str] = set()

    def take(field_: str):
        used.add(field_)
        return data[field_]

    if "uid" in names:
        out["uid"] = take("uid").astype(np.uint64)
    if "blob/path" in names:
        raw = pd.Series(take("blob/path")).str.decode("utf-8")
        out["image_name"] = raw.str.lstrip(">").to_numpy(dtype=object)
        out["image_index"] = take("blob/idx").astype(np.int64)
    if "blob/shape" in names:
        shape = take("blob/shape")
        if (shape[:, 0] != shape[:, 1]).any():
            row = int(np.flatnonzero(shape[:, 0] != shape[:, 1])[0])
            raise ParticleError(f"blob/shape {tuple(shape[row])} is not square", path=path, particle=row + 1)
        out["box"] = shape[:, 0].astype(np.int64)
    if "blob/psize_A" in names:
        out["pixel_size"] = take("blob/psize_A").astype(np.float64)
    if "blob/sign" in names:
        out["sign"] = take("blob/sign").astype(np.float64)
    simple = {"ctf/accel_kv": "voltage", "ctf/cs_mm": "cs", "ctf/amp_contrast": "amp_contrast",
              "ctf/df1_A": "defocus_u", "ctf/df2_A": "defocus_v", "mscope_params/total_dose_e_per_A2": "dose"}
    for f, name in simple.items():
        if f in names:
            out[name] = take(f).astype(np.float64)
    for f, name in {"ctf/df_angle_rad": "defocus_angle", "ctf/phase_shift_rad": "phase_shift"}.items():
        if f in names:
            out[name] = np.rad2deg(take(f).astype(np.float64))
    if "ctf/exp_group_id" in names:
        out["optics_group"] = take("ctf/exp_group_id").astype(np.int64) + 1
    else:
        out["optics_group"] = np.int64(1)
    out["optics_group_name"] = [f"opticsGroup{g}" for g in out["optics_group"]]
    if "location/micrograph_path" in names:
        out["micrograph"] = pd.Series(take("location/micrograph_path")).str.decode("utf-8").to_numpy(dtype=object)
    if {"location/center_x_frac", "location/micrograph_shape"} <= names:
        shape = take("location/micrograph_shape").astype(np.float64)
        out["coord_x"] = take("location/center_x_frac").astype(np.float64) * shape[:, 1]
        out["coord_y"] = take("location/center_y_frac").astype(np.float64) * shape[:, 0]
        out["micrograph_ny"] = shape[:, 0].astype(np.int64)
        out["micrograph_nx"] = shape[:, 1].astype(np.int64)

    pose = "none"
    for kind in ("alignments3D", "alignments2D"):
        if f"{kind}/shift" in names and pose == "none":
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
            out[key] = col
        else:
            for i in range(col.shape[1]):
                out[f"{key}[{i}]"] = col[:, i]
    return Table(out, {"format": "cryosparc", "pose": pose})


def to_cs(particles: pd.DataFrame, paths: np.ndarray | None, indices: np.ndarray | None,
          pose: str) -> np.ndarray:
    """Canonical table -> CryoSPARC structured array; shifts in pixels of the new ``psize_A``."""
    n = len(particles)
    cols: dict[str, np.ndarray] = {}
    uid = particles["uid"].to_numpy(np.uint64) if "uid" in particles else _new_uids(n)
    cols["uid"] = uid
    if paths is not None:
        cols["blob/path"] = np.array([p.encode("utf-8") for p in paths], dtype=bytes)
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
        cols["location/micrograph_path"] = np.array([str(m).encode("utf-8") for m in particles[mic]], dtype=bytes)
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
            cols[name] = _cs_column(particles[col].to_numpy())
    for name, parts in vectors.items():
        if name not in cols:
            cols[name] = np.stack([_cs_column(parts[i]) for i in sorted(parts)], axis=1)
    dtype = [(k, v.dtype, v.shape[1:]) if v.ndim > 1 else (k, v.dtype) for k, v in cols.items()]
    out = np.empty(n, dtype=dtype)
    for k, v in cols.items():
        out[k] = v
    return out


def _cs_column(values: np.ndarray) -> np.ndarray:
    """Text columns as fixed-width UTF-8 bytes (a .cs file holds no Python objects)."""
    if values.dtype.kind in "OU":
        return np.array([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values], dtype=bytes)
    return values


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
