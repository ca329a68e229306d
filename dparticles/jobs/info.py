"""``info``: what a particle set holds and what it costs on disk, from metadata and headers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr


def describe(ds: xr.Dataset) -> dict:
    """A JSON-ready summary of an opened particle set (no pixel data is read). Whole-array numpy
    operations on the coordinates: no Python loop runs per particle."""
    c = ds.coords
    n = ds.sizes["particle"]
    info: dict = {"source": ds.attrs.get("source"), "format": ds.attrs.get("format"), "n_particles": n}
    groups = []
    if "optics_group" in c and n:
        for g, first, count in zip(*_groups(c["optics_group"].values)):
            groups.append({k: _plain(c[name].values[first]) for k, name in
                           [("optics_group", "optics_group"), ("name", "optics_group_name"),
                            ("pixel_size", "pixel_size"), ("box", "box"), ("voltage", "voltage"),
                            ("cs", "cs"), ("amp_contrast", "amp_contrast")] if name in c}
                          | {"n_particles": int(count)})
    sizes = sorted({g["pixel_size"] for g in groups if "pixel_size" in g})
    info["pixel_size"] = sizes[0] if len(sizes) == 1 else {str(g["optics_group"]): g.get("pixel_size") for g in groups}
    info["optics_groups"] = groups
    boxes = _distinct(c["box"].values) if "box" in c else []
    info["box"] = int(boxes[0]) if len(boxes) == 1 else None
    image_bytes = ds["images"].dtype.itemsize * ds.sizes["y"] * ds.sizes["x"] if "images" in ds else 0
    if "images" in ds and "zarr" in ds.attrs:  # a zarr cache holds exactly the particles in use, compressed
        stored = sum(f.stat().st_size for f in Path(ds.attrs["zarr"]).rglob("*") if f.is_file())
        info |= {"format": f"zarr cache of {info['format']} metadata", "n_stacks": 0,
                 "dtype": str(ds["images"].dtype), "particles_on_disk": n, "bytes_in_use": int(n * image_bytes),
                 "bytes_on_disk": int(stored), "stacks": []}
    elif "images" in ds:
        on_disk = c["stack_images"].values
        in_use = np.bincount(c["stack_id"].values, minlength=ds.sizes["stack"])
        kinds, kind = np.unique(c["stack_dtype"].values.astype(str), return_inverse=True)
        itemsize = np.array([np.dtype(k).itemsize for k in kinds], dtype=np.int64)[kind]
        info |= {"n_stacks": ds.sizes["stack"], "dtype": str(ds["images"].dtype),
                 "particles_on_disk": int(on_disk.sum()), "bytes_in_use": int(n * image_bytes),
                 "bytes_on_disk": int((on_disk * itemsize).sum() * ds.sizes["y"] * ds.sizes["x"]),
                 "stacks": [{"path": path, "in_use": k, "on_disk": m} for path, k, m in
                            zip(c["stack_path"].values.tolist(), in_use.tolist(), on_disk.tolist())]}
    else:
        info |= {"n_stacks": 0, "dtype": None, "particles_on_disk": 0, "bytes_in_use": 0, "bytes_on_disk": 0,
                 "stacks": []}
    signs = [float(s) for s in _distinct(c["sign"].values)] if "sign" in c else [1.0]
    info["sign"] = signs[0] if len(signs) == 1 else signs
    info["ctf"] = bool(ds.attrs.get("has_ctf", False))
    info["alignments"] = ds.attrs.get("pose", "none")
    info["shifts"] = info["alignments"] != "none" and "shift_x" in c and "shift_y" in c  # what --recenter applies
    info["exposures"] = int((c["exposure"].values != "").sum()) if "exposure" in c else 0
    info["duplicate_images"] = _duplicates(ds) if "image_path" in c else 0
    return info


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (one look when every particle has the same, as a zero-stride view)."""
    if values.ndim == 1 and values.strides == (0,) and len(values):
        return values[:1]
    return np.unique(values)


def _groups(values: np.ndarray) -> tuple[list, list, list]:
    """(group, first row, particles) of each distinct value, by group."""
    if values.ndim == 1 and values.strides == (0,):
        return [values[0]], [0], [len(values)]
    uniq, first, counts = np.unique(values, return_index=True, return_counts=True)
    return uniq.tolist(), first.tolist(), counts.tolist()


def _duplicates(ds: xr.Dataset) -> int:
    """Particles that name an image (stack path and index) another particle named before."""
    c = ds.coords
    ids, index = c["stack_id"].values, c["image_index"].values
    if not len(ids):
        return 0
    path_of, paths = pd.factorize(c["stack_path"].values)  # two names may lead to one file
    ids = path_of[ids]
    sizes = np.zeros(len(paths), dtype=np.int64)
    np.maximum.at(sizes, path_of, c["stack_images"].values.astype(np.int64))
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    inside = (index >= 0) & (index < sizes[ids])
    seen = np.bincount(start[ids[inside]] + index[inside], minlength=int(sizes.sum()))  # a slot per image on disk
    return int((seen - 1).clip(min=0).sum()) + _duplicates_of(ids[~inside], index[~inside])


def _duplicates_of(ids: np.ndarray, index: np.ndarray) -> int:
    if not len(ids):
        return 0
    pairs = np.unique(np.stack([ids.astype(np.int64), index.astype(np.int64)], axis=1), axis=0)
    return len(ids) - len(pairs)


def format_text(info: dict) -> str:
    """The human-readable form of :func:`describe`."""
    gb = 1e9
    lines = [f"source:      {info['source']} ({info['format']})",
             f"particles:   {info['n_particles']} in use of {info['particles_on_disk']} on disk, "
             f"in {info['n_stacks']} stacks",
             f"bytes:       {info['bytes_in_use'] / gb:.3f} GB in use of {info['bytes_on_disk'] / gb:.3f} GB on disk",
             f"box:         {info['box']} px, dtype {info['dtype']}, data sign {info['sign']}"]
    for g in info["optics_groups"]:
        lines.append(f"optics {g['optics_group']}:    {g.get('name')}: {g['n_particles']} particles, "
                     f"{_num(g.get('pixel_size'))} Å/px, {_num(g.get('voltage'))} kV, Cs {_num(g.get('cs'))} mm, "
                     f"Q0 {_num(g.get('amp_contrast'))}")
    alignments = info["alignments"] + ("" if info["alignments"] == "none" or info["shifts"] else " (angles, no shifts)")
    lines.append(f"metadata:    CTF {'yes' if info['ctf'] else 'no'}, alignments {alignments}, "
                 f"exposures linked {info['exposures']}, duplicate image references {info['duplicate_images']}")
    if info["stacks"]:
        lines.append("stacks (in use / on disk):")
        for s in info["stacks"][:20]:
            lines.append(f"  {s['in_use']:>8} / {s['on_disk']:<8} {s['path']}")
        if len(info["stacks"]) > 20:
            lines.append(f"  ... and {len(info['stacks']) - 20} more stacks")
    return "\n".join(lines)


def _num(v) -> str:
    return "?" if v is None or v != v else f"{v:.6g}"


def _plain(v):
    """numpy scalars to plain Python for JSON."""
    return v.item() if isinstance(v, np.generic) else v
