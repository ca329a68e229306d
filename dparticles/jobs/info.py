"""``info``: what a particle set holds and what it costs on disk, from metadata and headers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from dparticles.dataset import table


def describe(ds: xr.Dataset) -> dict:
    """A JSON-ready summary of an opened particle set (no pixel data is read)."""
    p = table(ds)
    n = len(p)
    info: dict = {"source": ds.attrs.get("source"), "format": ds.attrs.get("format"), "n_particles": n}
    groups = []
    for g, rows in p.groupby("optics_group", sort=True):
        first = rows.iloc[0]
        groups.append({k: _plain(first[c]) for k, c in
                       [("optics_group", "optics_group"), ("name", "optics_group_name"),
                        ("pixel_size", "pixel_size"), ("box", "box"), ("voltage", "voltage"),
                        ("cs", "cs"), ("amp_contrast", "amp_contrast")] if c in rows}
                      | {"n_particles": len(rows)})
    sizes = sorted({g["pixel_size"] for g in groups if "pixel_size" in g})
    info["pixel_size"] = sizes[0] if len(sizes) == 1 else {str(g["optics_group"]): g.get("pixel_size") for g in groups}
    info["optics_groups"] = groups
    info["box"] = int(p["box"].iloc[0]) if "box" in p and p["box"].nunique() == 1 else None
    image_bytes = ds["images"].dtype.itemsize * ds.sizes["y"] * ds.sizes["x"] if "images" in ds else 0
    if "images" in ds and "zarr" in ds.attrs:  # a zarr cache holds exactly the particles in use, compressed
        stored = sum(f.stat().st_size for f in Path(ds.attrs["zarr"]).rglob("*") if f.is_file())
        info |= {"format": f"zarr cache of {info['format']} metadata", "n_stacks": 0,
                 "dtype": str(ds["images"].dtype), "particles_on_disk": n, "bytes_in_use": int(n * image_bytes),
                 "bytes_on_disk": int(stored), "stacks": []}
    elif "images" in ds:
        in_use = np.bincount(ds["stack_id"].values, minlength=ds.sizes["stack"])
        info |= {"n_stacks": ds.sizes["stack"], "dtype": str(ds["images"].dtype),
                 "particles_on_disk": int(ds["stack_images"].sum()),
                 "bytes_in_use": int(n * image_bytes), "bytes_on_disk": int(sum(n * np.dtype(d).itemsize for n, d in zip(ds["stack_images"].values,
                                                                                   ds["stack_dtype"].values))
                                      * ds.sizes["y"] * ds.sizes["x"]),
                 "stacks": [{"path": str(path), "in_use": int(k), "on_disk": int(m)} for path, k, m in
                            zip(ds["stack_path"].values, in_use, ds["stack_images"].values)]}
    else:
        info |= {"n_stacks": 0, "dtype": None, "particles_on_disk": 0, "bytes_in_use": 0, "bytes_on_disk": 0,
                 "stacks": []}
    signs = sorted({float(s) for s in p["sign"]}) if "sign" in p else [1.0]
    info["sign"] = signs[0] if len(signs) == 1 else signs
    info["ctf"] = bool(ds.attrs.get("has_ctf", False))
    info["alignments"] = ds.attrs.get("pose", "none")
    info["exposures"] = int((p["exposure"] != "").sum()) if "exposure" in p else 0
    duplicates = p.duplicated(["image_path", "image_index"]).sum() if "image_path" in p else 0
    info["duplicate_images"] = int(duplicates)
    return info


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
    lines.append(f"metadata:    CTF {'yes' if info['ctf'] else 'no'}, alignments {info['alignments']}, "
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
