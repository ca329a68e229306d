"""The lazy image stack: resolve stack paths, check headers against the metadata, and build a dask
array whose every chunk is one task that reads its particles' runs by path."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PureWindowsPath
from typing import Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize

from dparticles.errors import ParticleError
from dparticles.formats.mrc import StackInfo, read_chunk, read_headers
from dparticles.planning import chunk_bounds, plan_chunks


def search_roots(metadata_path: Path, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where relative image paths are looked for, in order: ``data_dir``, the metadata file's folder,
    then each of its ancestors (RELION writes paths relative to the project directory)."""
    folder = metadata_path.resolve().parent
    roots = [Path(data_dir).resolve()] if data_dir is not None else []
    return roots + [folder, *folder.parents]


def resolve_stacks(names: Sequence[str], roots: Sequence[Path], metadata_path: Path,
                   first_rows: Sequence[int] | None = None) -> list[str]:
    """Absolute path of each distinct stack name; a clear error listing the places tried if missing
    (naming the first particle that uses the stack when ``first_rows``, 0-based, is given).

    Names are looked up in listings of their folders (one ``scandir`` per folder and place tried,
    a ``stat`` only for links), not with a ``stat`` per name and place: 100,000 stacks in a few
    folders take a fraction of a second, also on shared file systems. What a listing does not show
    as a file is looked for name by name as before, which also gives the error.
    """
    names = [str(n) for n in names]
    out: list[str | None] = [None] * len(names)
    folders: dict[str, list[tuple[int, str]]] = {}  # a name's folder part -> (position, file name)
    for k, name in enumerate(names):
        folder, base = os.path.split(name)
        if base not in ("", ".", "..") and name[1:2] != ":" and name[:2] not in _UNC:  # no Windows drive
            folders.setdefault(folder, []).append((k, base))
    wanted = {base for members in folders.values() for _, base in members}  # folders may hold many more
    listings: dict[str, dict[str, os.DirEntry]] = {}
    for folder, members in folders.items():
        where = Path(folder)
        places = [where, roots[0]] if where.is_absolute() else [r / where for r in roots]
        for place in map(str, places):
            if place not in listings:
                listings[place] = _listing(place, wanted)
            entries, left = listings[place], []
            for k, base in members:
                entry = entries.get(base)
                if entry is not None and _is_file(entry):
                    out[k] = os.path.join(place, base)
                else:
                    left.append((k, base))
            members = left
            if not members:
                break
    for k, name in enumerate(names):
        if out[k] is None:
            out[k] = _resolve_one(name, roots, metadata_path, None if first_rows is None else int(first_rows[k]))
    return out


_UNC = ("//", "\\\\", "/\\", "\\/")  # starts of Windows network names (PureWindowsPath gives them a drive)


def _listing(folder: str, wanted: set[str]) -> dict[str, os.DirEntry]:
    """The entries of ``folder`` named in ``wanted``, by name (none if it cannot be listed)."""
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it if e.name in wanted}
    except (OSError, ValueError):
        return {}


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _resolve_one(name: str, roots: Sequence[Path], metadata_path: Path, first_row: int | None) -> str:
    """One stack name looked for place by place; the error names the places tried."""
    tried = _candidates(name, roots)
    found = next((c for c in tried if c.is_file()), None)
    if found is None:
        shown = ", ".join(map(str, tried[:4])) + (f" and {len(tried) - 4} more ancestor folders"
                                                  if len(tried) > 4 else "")
        odd = next((f" ({c} exists but is not a file)" for c in tried if c.exists()), "")
        raise ParticleError(f"image stack {name!r} not found; tried {shown}{odd}. "
                            "Use --data-dir to say where the stacks are", path=metadata_path,
                            particle=None if first_row is None else first_row + 1)
    return str(found)


def _candidates(name: str, roots: Sequence[Path]) -> list[Path]:
    """Places a stack name may point at, in the order they are tried."""
    if PureWindowsPath(name).drive:  # e.g. F:/data/x.mrcs, written on Windows: only its file name helps
        return [r / PureWindowsPath(name).name for r in roots[:1]]
    p = Path(name)
    if p.is_absolute():  # moved data: a data directory may hold the stack under its file name
        return [p] + [r / p.name for r in roots[:1]]
    return [r / p for r in roots]


def read_infos(paths: Sequence[str], threads: int = 16) -> list[StackInfo]:
    """Headers of all stacks, read concurrently in batches (shared file systems reward many requests
    in flight; each batch is decoded at once); the first bad stack in ``paths`` order is the error."""
    if len(paths) < 64:
        return read_headers(paths)
    size = max(16, len(paths) // (threads * 8))  # batches: one task per header costs more than the read
    batches = [paths[i:i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(threads) as pool:
        return [info for batch in pool.map(read_headers, batches) for info in batch]


def check_indices(infos: Sequence[StackInfo], stack_ids: np.ndarray, indices: np.ndarray,
                  names: np.ndarray, metadata_path: Path) -> None:
    """Every index must lie inside its stack, and every stack must hold square images."""
    counts = np.array([i.n for i in infos], dtype=np.int32)  # MRC nz is an int32: 4 bytes a particle below
    beyond = indices >= counts[stack_ids]
    if beyond.any():
        row = int(np.flatnonzero(beyond)[0])
        info = infos[stack_ids[row]]
        raise ParticleError(f"image {indices[row] + 1} of {names[row]!r} is beyond the end of its stack, "
                            f"which holds {info.n} images ({info.path}); expected 1..{info.n}",
                            path=metadata_path, particle=row + 1)
    for k, info in enumerate(infos):
        if info.ny != info.nx:
            row = int(np.flatnonzero(stack_ids == k)[0])
            raise ParticleError(f"the stack {info.path} holds {info.ny}x{info.nx} (rows x columns) images; expected "
                                "square particle images", path=metadata_path, particle=row + 1)


SOURCE_READ = "source_read"  # images.attrs key: the name of open_particles' read layer (see store.is_source_read)


def lazy_images(infos: Sequence[StackInfo], stack_ids: np.ndarray, indices: np.ndarray,
                chunk: int) -> da.Array:
    """A dask array (particle, y, x) in metadata order, ``chunk`` particles per chunk.

    Each chunk is one task holding only what it reads: the headers of its stacks (path, offset,
    mode; an object array, which dask passes as one value and never walks), its runs in source order
    (stack, start, stop) and the order that puts them back in metadata order, as compact integer
    arrays (slices of the plan's, see ``planning.plan_chunks``); no memory map and no whole-table
    array is captured in the graph. Shuffled particles (after classification or random splits) are
    read sorted by stack and image, each run of neighbouring images with one read.
    """
    n = len(indices)
    box = infos[0].ny
    dtypes = {np.dtype(d).newbyteorder("=") for d in {i.dtype for i in infos}}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    bounds = chunk_bounds(n, chunk)
    described = "\n".join(f"{i.path}\0{i.n}\0{i.offset}\0{i.dtype}" for i in infos)  # one string hashes fast
    name = "particles-" + tokenize(described, stack_ids, indices, chunk)
    plan = plan_chunks(stack_ids, indices, bounds)
    at, rb, sb = bounds.tolist(), plan.run_bounds.tolist(), plan.stack_bounds.tolist()
    reorder = plan.reorder.tolist()
    headers = np.empty(len(infos), dtype=object)
    headers[:] = infos
    dsk = {}
    for k in range(len(at) - 1):
        used = headers[plan.stacks[sb[k]:sb[k + 1]]]
        order = plan.order[at[k]:at[k + 1]] if reorder[k] else None
        dsk[(name, k, 0, 0)] = (read_chunk, used, plan.runs[rb[k]:rb[k + 1]], order, dtype.str)
    chunks = (tuple(np.diff(bounds).tolist()), (box,), (box,))
    return da.Array(dsk, name, chunks, dtype=dtype)
