"""``to_stacks``: write any particle Dataset as MRC stacks of N particles per file (and a zarr cache).

Any Dataset with ``images`` (particle, y, x) and particle metadata: ``open_particles`` output, an
xarray selection of it, a :mod:`dparticles.ops` result, or one's own ``map_blocks``. Tasks are
pieces of dask chunks cut where a file begins, not files: each writes its images at their offset
in its file (created beforehand under a temporary name), and a file is synced and renamed into
place when all its pieces are written. The metadata is written last.

When the images are the stacks' own pixels (opened and at most selected along ``particle``, in
the stacks' mode), bytes move in the kernel (``copy_file_range``) and are never decoded. A rerun
of an interrupted run keeps every complete file after checking it (copies against their sources,
computed files against the CRC of each piece recorded when it was written).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.utils import key_split

from dparticles import config, formats
from dparticles.dataset import table
from dparticles.errors import ParticleError
from dparticles.formats.cryosparc import CS_SOURCE
from dparticles.formats.mrc import (HEADER_BYTES, copy_segments, finish_file, record_path, stack_header, verify_copy,
                                    verify_record, write_segments)
from dparticles.formats.zarr import check_zarr_target, finish_zarr, prepare_zarr
from dparticles.metadata import assign
from dparticles.planning import byte_runs, chunk_bounds
from dparticles.progress import RunSummary
from dparticles.record import inputs, outputs, pixel_sizes
from dparticles.runner import JobRun
from dparticles.safe import (RECORDS, atomic_write, hold_outputs, is_regular, prepare_output, read_json, refuse_inputs,
                             refuse_overlaps, remove_temporaries)
from dparticles.stack import SOURCE_READ

MRC_MODES = {"int8", "int16", "uint16", "float16", "float32"}
MIN_PIECES = 8  # copies are cut into at least this many pieces, so that every worker of a small cluster works


@dataclass
class StoreResult:
    """What one output folder received and what it cost."""

    out: Path | None
    n_particles: int
    n_files: int
    kept_files: int
    summary: RunSummary | None
    notes: list[str] = field(default_factory=list)
    copied: bool = False  # pixels moved unchanged, byte for byte, never decoded

    def __str__(self) -> str:
        lines = []
        if self.out is not None:
            stacks = "stack" if self.n_files == 1 else "stacks"
            lines.append(f"wrote {self.n_particles} particles in {self.n_files} {stacks} to {self.out}"
                         + (f" ({self.kept_files} complete {stacks} kept from an earlier run)" if self.kept_files else ""))
        return "\n".join(lines + self.notes)


@dataclass
class _Plan:
    """One output folder: what goes where."""

    ds: xr.Dataset
    out: Path
    dtype: str
    files: np.ndarray  # file boundaries (particle rows)
    names: list[str]
    token: str
    pixel: np.ndarray  # pixel size of each file (that of its first particle)
    pieces: np.ndarray  # boundaries of the pieces tasks write: dask chunks, or copies of piece-bytes
    copy: tuple | None  # (paths, first_run, codes, starts, lengths): source ranges of each segment
    kept: np.ndarray  # bool per file: complete and verified from an earlier run

    def final(self, k: int) -> str:
        return str(self.out / self.names[k])

    def file(self, k: int, nonce: str) -> tuple:
        """What a task needs to open file ``k``: final name, run nonce, images, box, mode, pixel size."""
        a, b = int(self.files[k]), int(self.files[k + 1])
        return (self.final(k), nonce, b - a, int(self.ds.sizes["x"]), self.dtype, float(self.pixel[k]))

    def header(self, k: int) -> bytes:
        _, _, n, box, dtype, pixel_size = self.file(k, "")
        return stack_header(n, box, np.dtype(dtype), pixel_size, "dparticles")


@hold_outputs
def to_stacks(ds: xr.Dataset | list[xr.Dataset], out: str | os.PathLike | list | None, *,
              batch_size: int | None = None, float16: bool = False, zarr: str | os.PathLike | list | None = None,
              overwrite: bool = False, cluster: dict | None = None, project_dir: str | os.PathLike | None = None,
              label: str = "write", parameters: dict | None = None, log=print) -> StoreResult | list[StoreResult]:
    """Write ``ds`` as ``out/stacks/batch_NNNNNN.mrcs`` of ``batch_size`` particles plus
    ``out/particles.star`` (and ``particles.cs`` with its result group when the particles came
    from CryoSPARC metadata) naming them.

    ``ds`` may be a list of Datasets with a list of folders (and of zarr paths): they are computed
    together, so reads and FFTs they share happen once. ``out`` None writes only the zarr cache.
    ``float16`` writes MRC mode 12 after a range check; otherwise float32 (or the stacks' own mode
    for unchanged pixels). The metadata names each stack as RELION and CryoSPARC do: relative to
    ``project_dir`` (default: the current directory), where those programs run, or by its absolute
    path when the output lies outside it. ``cluster`` holds :func:`dparticles.cluster.cluster_client` keywords.
    An existing output is replaced only with ``overwrite``, unless it is an interrupted run of the
    same data and arguments, which is resumed. Each folder gets a record of the run (``job.json``
    with ``parameters`` and ``note.txt``) and ``report.html`` (see :mod:`dparticles.record`).
    """
    single = isinstance(ds, xr.Dataset)
    dss = [ds] if single else list(ds)
    # absolute before anything is sent: workers elsewhere do not run in this directory
    outs = [None if o is None else Path(o).absolute() for o in _as_list(out, len(dss), "out")]
    zarrs = [None if z is None else Path(z).absolute() for z in _as_list(zarr, len(dss), "zarr")]
    if any(o is None and z is None for o, z in zip(outs, zarrs)):
        raise ParticleError("give an output folder, a zarr cache, or both")
    project = Path(project_dir if project_dir is not None else os.getcwd()).absolute()
    batch_size = int(config.get("batch-size", batch_size))
    if batch_size < 1:
        raise ParticleError(f"batch size must be at least 1, got {batch_size}")
    for d in dss:
        _check_images(d)
    refuse_overlaps([("--out", o) for o in outs if o is not None] + [("--zarr", z) for z in zarrs if z is not None])
    for d, z in zip(dss, zarrs):
        if z is not None:  # before any work: no cache may replace an input or an unasked-for cache
            check_zarr_target(z, d, overwrite=overwrite)
    plans = [None if o is None else _plan(d, o, batch_size, float16) for d, o in zip(dss, outs)]
    stacks = [p for p in plans if p is not None]
    _prepare(stacks, overwrite, label)
    nonce = secrets.token_hex(8)
    run = JobRun(label, dict(parameters or {}, batch_size=batch_size, float16=float16, project_dir=project),
                 cluster=cluster, log=log)
    try:
        with run.tasks(report=bool(stacks)) as client:
            _keep_verified(stacks, client)
            graph, keys, nbytes = _graph(stacks, nonce)
            zarr_jobs = [prepare_zarr(d, z, batch_size) for d, z in zip(dss, zarrs) if z is not None]
            results = run.compute(client, lambda c: (c.get(graph, keys, sync=False) if keys else [])
                                  + [c.compute(job.delayed) for job in zarr_jobs],
                                  nbytes=nbytes + sum(job.raw_bytes for job in zarr_jobs),
                                  name_task=lambda key: _task_name(key, stacks))
    except ParticleError as exc:
        raise _located(exc, dss, plans) from None
    finally:
        for p in stacks:
            remove_temporaries(p.out, nonce)  # and in its stacks and records folders
    for job in zarr_jobs:
        finish_zarr(job)
    by_key = dict(zip(keys, results))
    reports = []
    for d, p, z in zip(dss, plans, zarrs):
        notes = [] if z is None else [next(j.note() for j in zarr_jobs if j.path == z)]
        if p is None:
            reports.append(StoreResult(None, d.sizes["particle"], 0, 0, run.summary, notes))
            continue
        done = [stats for key, r in by_key.items() if key[0] == f"piece-{p.token}" for stats in r.values()]
        _check_written(p)
        if p.dtype == "<f2":
            written = int(np.diff(p.files)[~p.kept].sum())  # the error is over the files written now
            notes.insert(0, float16_report(done, written * d.sizes["y"] * d.sizes["x"], int(p.kept.sum())))
        write_metadata(p.out, d, *_positions(p, project))
        result = StoreResult(p.out, d.sizes["particle"], len(p.names), int(p.kept.sum()), run.summary, notes,
                             copied=p.copy is not None)
        reports.append(result)
        given = inputs(d)
        run.record(p.out, d, {
            "parameters": {"zarr": z}, "inputs": given, "particles": result.n_particles, "files": result.n_files,
            "kept_files": result.kept_files, "pixels_copied_unchanged": result.copied, "box": d.sizes["x"],
            **pixel_sizes(d, given.get("box"), (parameters or {}).get("crop_box")),
            "mode": p.dtype, "micrograph_pixel_size_from": d.attrs.get("micrograph_pixel_size_from"),
            "outputs": outputs(p.out, p.names), "notes": notes})
    return reports[0] if single else reports


def _as_list(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ParticleError(f"give one {what} per dataset: {n} datasets, {len(value)} {what} values")
        return list(value)
    if value is not None and n > 1:
        raise ParticleError(f"{n} datasets need a list of {n} {what} values")
    return [value] * n


def _check_images(ds: xr.Dataset) -> None:
    if "images" not in ds:
        raise ParticleError("these particles have no images (opened with ignore_raw)", path=ds.attrs.get("source"))
    if ds["images"].dims != ("particle", "y", "x") or ds.sizes["y"] != ds.sizes["x"]:
        raise ParticleError(f"images must be square and shaped (particle, y, x); got {dict(ds['images'].sizes)}",
                            path=ds.attrs.get("source"))
    if ds.sizes["particle"] == 0:
        raise ParticleError("no particles to write (the selection is empty)", path=ds.attrs.get("source"))
    if "pixel_size" not in ds.coords:
        raise ParticleError("the particles have no pixel_size coordinate (Å), which the stack headers and "
                            "metadata need", path=ds.attrs.get("source"))


def _plan(ds: xr.Dataset, out: Path, batch_size: int, float16: bool) -> _Plan:
    """Decide the output mode, files and copy ranges (the folder is prepared by :func:`_prepare`)."""
    images = ds["images"].data
    if not isinstance(images, da.Array):
        images = da.from_array(np.asarray(images), chunks=(max(1, 2**26 // max(1, images[0].nbytes)), -1, -1))
        ds = ds.assign(images=(("particle", "y", "x"), images))
    copy = None if float16 or not is_source_read(ds) else ()
    if float16:
        dtype = "<f2"
    elif copy is not None or np.dtype(images.dtype).name in MRC_MODES:
        dtype = np.dtype(images.dtype).newbyteorder("<").str
    else:
        dtype = "<f4"
    n = ds.sizes["particle"]
    files = chunk_bounds(n, batch_size)
    names = [f"stacks/batch_{k:06d}.mrcs" for k in range(len(files) - 1)]
    pixel = ds["pixel_size"].values[files[:-1]]
    token = tokenize("to_stacks", images.name, dtype, batch_size, pixel, *_sources_stamp(ds))
    image_bytes = ds.sizes["y"] * ds.sizes["x"] * np.dtype(dtype).itemsize
    if copy is not None:
        pieces = chunk_bounds(n, max(1, min(_piece_bytes() // image_bytes, -(-n // MIN_PIECES))))
        runs = byte_runs(ds["stack_id"].values, ds["image_index"].values, np.union1d(pieces, files),
                                image_bytes, ds["stack_offset"].values)
        first_run, codes, starts, lengths = runs
        # an object array of the paths is one value to dask (never walked item by item) and pickles fast
        copy = (ds["stack_path"].values.astype(str).astype(object), first_run, codes.astype(np.int32), starts, lengths)
    else:
        pieces = np.concatenate([[0], np.cumsum(images.chunks[0])]).astype(np.int64)
    return _Plan(ds, out, dtype, files, names, token, pixel, pieces, copy, np.zeros(len(names), dtype=bool))


def _prepare(plans: list[_Plan], overwrite: bool, label: str) -> None:
    """Prepare every output folder (refusals, resume), refusing any before changing one: when one
    folder of a list is refused, the others are left as they were, neither created nor emptied."""
    for p in plans:
        refuse_inputs(p.out, p.ds)
        if p.out.exists() and not p.out.is_dir():
            raise ParticleError("output exists and is not a folder", path=p.out)
    # without overwrite, prepare_output refuses (or resumes) a folder an earlier run filled before
    # changing anything in it: those go first, so that a refusal comes before any folder is made
    def filled(p: _Plan) -> bool:
        return not overwrite and p.out.is_dir() and any(p.out.iterdir())
    for p in sorted(plans, key=lambda p: not filled(p)):
        p.out = prepare_output(p.out, p.ds, overwrite=overwrite, job=label, token=p.token, inputs_checked=True)
        (p.out / "stacks").mkdir(exist_ok=True)
        (p.out / RECORDS).mkdir(exist_ok=True)


def _piece_bytes() -> int:
    from dask.utils import parse_bytes
    return int(parse_bytes(str(config.get("piece-bytes"))))


def is_source_read(ds: xr.Dataset) -> bool:
    """Whether the images are the stacks' own pixels, unchanged: the lazy read of ``open_particles``,
    at most indexed along ``particle`` (a selection, a reordering), in the stacks' own mode.

    Decided from public facts, conservatively: ``open_particles`` names its read layer in
    ``images.attrs[SOURCE_READ]``, which an op that makes new images does not carry; the graph
    (``HighLevelGraph.layers``) still holds that layer and besides it only indexing layers
    (``dask.utils.key_split`` is ``getitem``); y and x are whole (their coordinates still run
    0 .. box - 1 in order: an xarray selection or flip along them changes that); and the dtype is
    the stacks' mode. Anything else (arithmetic, ``where``, ``map_blocks``) is computed instead,
    which gives the same bits for float32, only more slowly.
    """
    if not {"stack_id", "image_index", "stack_path", "stack_offset", "stack_dtype"} <= set(ds.coords):
        return False
    images = ds["images"]
    arr = images.data
    modes = {str(m) for m in ds["stack_dtype"].values}
    if not isinstance(arr, da.Array) or len(modes) != 1 or images.attrs.get(SOURCE_READ) not in arr.dask.layers:
        return False
    mode = np.dtype(modes.pop())
    if arr.dtype != mode.newbyteorder("=") or mode.byteorder == ">" or arr.shape[1] != arr.shape[2]:
        return False
    if any(axis not in images.coords or not np.array_equal(images[axis].values, np.arange(arr.shape[1]))
           for axis in ("y", "x")):
        return False
    return all(name == images.attrs[SOURCE_READ] or key_split(name) == "getitem" for name in arr.dask.layers)


def _sources_stamp(ds: xr.Dataset) -> tuple[str, np.ndarray]:
    """Every source file's path (joined in one string) and its size, times and inode (an array): a
    rewritten stack changes ``st_ctime``, whatever its size and modification time, so work kept from
    an earlier run is never stale. One string and one array tokenize in milliseconds at 100,000 stacks."""
    files = list(ds["stack_path"].values.astype(str)) if "stack_path" in ds.coords else []
    if "zarr" in ds.attrs:
        files.append(str(Path(ds.attrs["zarr"]) / "images" / "zarr.json"))
    stats = [(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for st in map(os.stat, files)]
    return "\0".join(files), np.array(stats, dtype=np.int64).reshape(-1, 4)


def _record(plan: _Plan, k: int) -> dict:
    n = int(plan.files[k + 1] - plan.files[k])
    size = HEADER_BYTES + n * plan.ds.sizes["y"] * plan.ds.sizes["x"] * np.dtype(plan.dtype).itemsize
    return {"token": plan.token, "size": size}


def _copy_args(plan: _Plan, s0: int, s1: int) -> tuple:
    """The source ranges of segments ``[s0, s1)`` as compact arrays: paths, codes, starts, lengths."""
    paths, first_run, codes, starts, lengths = plan.copy
    lo, hi = first_run[s0], first_run[s1]
    used, local = np.unique(codes[lo:hi], return_inverse=True)
    return tuple(paths[c] for c in used.tolist()), local.astype(np.int32), starts[lo:hi], lengths[lo:hi]


def _keep_verified(plans: list[_Plan], client) -> None:
    """Find the files an earlier run of the same data completed, check them on the cluster, and mark
    those that pass as kept; remove the rest, so that they are written anew."""
    checks = []
    for plan in plans:
        segments = np.union1d(plan.pieces, plan.files)
        # one listing of each folder, not a look per file: only names there can be kept or stale
        there = set(os.listdir(plan.out / "stacks"))
        there.update(name.removesuffix(".json") for name in os.listdir(plan.out / RECORDS))
        for k, name in enumerate(plan.names):
            if os.path.basename(name) not in there:
                continue
            final = plan.final(k)
            record = read_json(record_path(final))  # None for anything but a regular file of JSON
            if record is None or record.get("token") != plan.token or not is_regular(final):
                for stale in (final, record_path(final)):
                    if os.path.lexists(stale):
                        os.unlink(stale)
                continue
            if plan.copy is None:
                checks.append((plan, k, client.submit(verify_record, final, plan.header(k), record, pure=False)))
            else:
                s0, s1 = np.searchsorted(segments, plan.files[k:k + 2])
                paths, codes, starts, lengths = _copy_args(plan, s0, s1)
                checks.append((plan, k, client.submit(verify_copy, final, plan.header(k), paths, codes, starts,
                                                      lengths, pure=False)))
    for plan, k, future in checks:
        if future.result():
            plan.kept[k] = True
        else:
            os.unlink(plan.final(k))
            os.unlink(record_path(plan.final(k)))


def _graph(plans: list[_Plan], nonce: str) -> tuple[HighLevelGraph, list, int]:
    """One graph for every output: a task per piece (a dask chunk, or piece-bytes of copies) writing
    its rows into each file they belong to, finishing the files that lie wholly in it; a finish task
    per file that spans pieces. Tasks scale with the data, not with the number of files.

    Copies carry their source ranges as three arrays per piece, and name their stacks by number in
    one table of paths, a single value of the graph that each worker receives once: a task's size
    does not grow with the stacks it reads (a shuffled piece reads from most of them)."""
    graphs, keys, nbytes = [], [], 0
    for plan in plans:
        piece, finish = f"piece-{plan.token}", f"finish-{plan.token}"
        image_bytes = plan.ds.sizes["y"] * plan.ds.sizes["x"] * np.dtype(plan.dtype).itemsize
        arr = plan.ds["images"].data
        bounds = np.union1d(plan.pieces, plan.files)  # segments: a piece's rows within one file
        seg_piece = np.searchsorted(plan.pieces, bounds[:-1], side="right") - 1
        seg_file = np.searchsorted(plan.files, bounds[:-1], side="right") - 1
        first_seg = np.searchsorted(bounds, plan.files)  # file k is segments first_seg[k]:first_seg[k+1]
        whole = np.diff(first_seg) == 1  # the file lies in one piece
        todo = np.flatnonzero(~plan.kept[seg_file])
        offsets = HEADER_BYTES + (bounds[:-1] - plan.files[seg_file]) * image_bytes
        # a segment's rows within its piece: images of the chunk, or runs of the piece's copy ranges
        rows = plan.copy[1] if plan.copy is not None else bounds
        starts = rows[np.searchsorted(bounds, plan.pieces[seg_piece])]
        nbytes += int(np.diff(bounds)[todo].sum()) * image_bytes
        records = {k: _record(plan, k) for k in np.flatnonzero(whole & ~plan.kept).tolist()}
        segments: dict[int, list] = {}
        for sg in todo.tolist():
            p, k = int(seg_piece[sg]), int(seg_file[sg])
            lo, hi = int(rows[sg] - starts[sg]), int(rows[sg + 1] - starts[sg])
            segments.setdefault(p, []).append((plan.file(k, nonce), lo, hi, int(offsets[sg]), records.get(k)))
        dsk: dict = {}
        if plan.copy is not None:
            paths, first_run, codes, run_starts, lengths = plan.copy
            table = f"stack-paths-{plan.token}"
            dsk[table] = paths
        for p, segs in segments.items():
            if plan.copy is not None:
                lo, hi = first_run[np.searchsorted(bounds, plan.pieces[p:p + 2])]
                dsk[(piece, p)] = (copy_segments, table, codes[lo:hi], run_starts[lo:hi], lengths[lo:hi], segs)
            else:
                dsk[(piece, p)] = (write_segments, (arr.name, p, 0, 0), segs, int(plan.pieces[p]))
            keys.append((piece, p))
        for k in np.flatnonzero(~plan.kept & ~whole).tolist():
            parts = [(piece, int(p)) for p in np.unique(seg_piece[first_seg[k]:first_seg[k + 1]]).tolist()]
            dsk[(finish, k)] = (finish_file, plan.file(k, nonce), _record(plan, k), parts)
            keys.append((finish, k))
        deps = [] if plan.copy is not None else [arr]
        graphs.append(HighLevelGraph.from_collections(f"store-{plan.token}", dsk, dependencies=deps))
    graph = HighLevelGraph.merge(*graphs) if graphs else HighLevelGraph({}, {})
    return graph, keys, nbytes


def _task_name(key, plans: list[_Plan]) -> str:
    """Which particles a task of the run holds, for a person: its piece or file of an output, or the
    chunk of the images it computes (the pieces of a computed output are the images' chunks)."""
    name, index = (key[0], key[1]) if isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int) \
        else (str(key), None)
    for plan in plans if index is not None else []:
        if name == f"finish-{plan.token}":
            return f"the task finishing {plan.names[index]} in {plan.out}"
        if name == f"piece-{plan.token}" or (plan.copy is None and index < len(plan.pieces) - 1):
            return f"the task of particles {plan.pieces[index] + 1} to {plan.pieces[index + 1]} ({name})"
    return f"task {name}"


def _check_written(plan: _Plan) -> None:
    """Every stack the metadata will name is in place, whole, before the metadata is written: a run
    that says it succeeded has its output."""
    for k in range(len(plan.names)):
        final = plan.final(k)
        size = os.stat(final).st_size if is_regular(final) else None
        if size != _record(plan, k)["size"]:
            raise ParticleError(f"{plan.names[k]} is {'missing' if size is None else f'{size} bytes'} after the "
                                f"run; expected {_record(plan, k)['size']} bytes. Rerun to write it again",
                                path=plan.out)


def _positions(plan: _Plan, project: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's new stack (see :func:`project_path`) and 0-based index in it."""
    sizes = np.diff(plan.files)
    names = [project_path(plan.out / name, project) for name in plan.names]
    paths = np.repeat(np.array(names, dtype=object), sizes)
    indices = np.arange(int(plan.files[-1]), dtype=np.int64) - np.repeat(plan.files[:-1], sizes)
    return paths, indices


def float16_report(done: list[dict], n_values: int, kept: int) -> str:
    """The float16 rounding error against float32 of the files written in this run."""
    sq = sum(r["f16_sq"] for r in done)
    peak = max((r["f16_max"] for r in done), default=0.0)
    rms = float(np.sqrt(sq / n_values)) if n_values else 0.0
    text = f"float16 rounding error against float32: largest {peak:.3g}, RMS {rms:.3g}"
    return text + (f" (over the files written now; {kept} were kept)" if kept else "")


def _located(exc: ParticleError, dss: list[xr.Dataset], plans: list) -> ParticleError:
    """A worker's error about particle N says which metadata file and image that particle is."""
    if exc.particle is None or exc.path is not None or not dss:
        return exc
    ds = dss[0]
    row = exc.particle - 1
    message = str(exc).split(": ", 1)[-1]
    if {"image_path", "image_index"} <= set(ds.coords) and 0 <= row < ds.sizes["particle"]:
        message += f" (from image {int(ds['image_index'].values[row]) + 1} of {ds['image_path'].values[row]})"
    return ParticleError(message, path=ds.attrs.get("source"), particle=exc.particle)


def write_metadata(out: Path, ds: xr.Dataset, paths: np.ndarray | None, indices: np.ndarray | None,
                   *, cs: bool = False, updates: dict | None = None) -> None:
    """Write ``particles.star`` (and ``particles.cs`` with its result group ``particles.csg`` when
    ``cs``, or when the particles came from CryoSPARC metadata) in ``out`` for the particles of
    ``ds``, whose images are now at ``paths`` (named as the metadata names them, see
    :func:`project_path`) / ``indices`` (0-based). ``updates`` replaces canonical columns (new pixel
    size, box, shifts...). Written last, atomically."""
    particles = assign(table(ds, skip=("image_path", "stack_id", "image_name", "image_index")), updates or {})
    cs = cs or CS_SOURCE in ds.attrs  # CryoSPARC metadata came in: it goes out too
    for name in reversed(formats.OUTPUT_METADATA if cs else ("relion",)):  # particles.star last
        engine, written = formats.engine(name), {}
        atomic_write(out / engine.METADATA_FILE, lambda tmp: written.update(
            data=engine.write_particles(tmp, particles, paths, indices, ds.attrs)))
        if name == "cryosparc":
            atomic_write(out / engine.RESULT_GROUP_FILE, lambda tmp: engine.write_result_group(
                tmp, engine.METADATA_FILE, written["data"], f"{len(particles)} particles written by dparticles"))


def project_path(path: Path, project: Path) -> str:
    """``path`` as RELION and CryoSPARC name files: relative to the project directory they run in,
    or absolute when it lies outside (both absolute, links not resolved)."""
    return os.path.relpath(path, project) if project == path or project in path.parents else str(path)
