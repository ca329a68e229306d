"""Safe output, in one place: every writer of the package (stacks, metadata, records, zarr caches)
writes through it. A file appears under its final name only when complete (a temporary name, then a
rename); outputs never overwrite inputs nor each other; one run at a time writes an output folder;
existing outputs are replaced only when asked and only if dparticles wrote them; and one rule
(:func:`removable`) decides which temporaries a run may delete. Light imports only: worker tasks
use it.

An output folder holds a run record (:data:`RUN_MARKER`: the job and the token of its inputs and
arguments) and, while a run writes it, a lock file (:data:`LOCK`) that the run holds with an
exclusive ``flock`` for its whole length: the kernel releases it when the process ends, however it
ends, so a second run on the same folder is refused at once (naming the first), and a rerun after a
``kill -9`` takes it over and resumes.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import fnmatch
import functools
import getpass
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dparticles.errors import ParticleError

if TYPE_CHECKING:
    import xarray as xr

RUN_MARKER = ".dparticles-run.json"  # the run record: this folder is a dparticles output, of this job and token
LOCK = ".dparticles-lock"  # held (flock) by the run writing the folder; removed when it ends
RECORDS = ".dparticles"  # folder of an output that holds the records of its finished stacks
METADATA = ("particles.star", "particles.cs", "particles.csg")
RUN_FILES = ("job.json", "note.txt", "report.html")  # the record of the run beside its results (dparticles.record)
_BATCH = re.compile(r"batch_\d{6,}\.mrcs")
TMP_MARK = ".dparticles-tmp"  # in the name of every temporary
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # no link followed, no FIFO waited on


# --- temporaries and atomic writes ---------------------------------------------------------------

def private_dir(path: Path) -> Path:
    """A new folder beside ``path`` with a random name (``.NAME.dparticles-tmp-XXXXXXXX``), readable
    and writable by this account only: what is written in it cannot be planted, linked or guessed
    by anyone else, and it is on the same file system, so a rename from it into place is atomic."""
    path = Path(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}-", dir=path.parent))


def is_regular(path: str | os.PathLike) -> bool:
    """Whether ``path`` itself (not what a link there points to) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` only if it is a regular file, never following a link at its name and never
    waiting on a FIFO or a device; raises OSError otherwise."""
    fd = os.open(path, flags | _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str | os.PathLike, limit: int = 2**20) -> bytes | None:
    """The bytes of a small regular file (a run record, a marker), or None if there is none there,
    it is something else (a link, a FIFO, a folder) or larger than ``limit``."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if len(data) > limit else data


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in the small regular file at ``path`` (a run or file record), or None if there
    is none, or it is not a regular file (a link, a FIFO: never followed or opened) holding one."""
    data = read_small(path)
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None



def tmp_path(final: str, nonce: str) -> str:
    """The temporary name of ``final`` for the run with this ``nonce`` (random, unguessable)."""
    head, name = os.path.split(final)
    return os.path.join(head, f".{name}{TMP_MARK}-{nonce}")


def write_record(path: str, record: dict, indent: int | None = None, nonce: str = "") -> None:
    """Write a small JSON record atomically (temporary name carrying the run ``nonce``, sync, rename)."""
    tmp = f"{path}{TMP_MARK}-{nonce or os.urandom(8).hex()}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        pwrite_all(fd, memoryview(json.dumps(record, indent=indent).encode()), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """pwrite may write less than asked (a full disk): write the rest or fail."""
    while buf:
        n = os.pwrite(fd, buf, offset)
        if n == 0:
            raise OSError(28, "No space left on device")
        buf, offset = buf[n:], offset + n



def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` then rename tmp to ``path``; on any failure remove tmp and re-raise.

    ``tmp`` lies in a new folder beside ``path`` with a random name that only this account may
    enter (:func:`private_dir`), so nobody can plant a link or a FIFO where it
    is written. The data are flushed to disk before the rename, so a crash leaves either the old
    file, no file, or the complete new one, never a partial file under the final name; a link
    planted at ``path`` is replaced, never followed.
    """
    path = Path(path)
    try:
        folder = private_dir(path)
    except OSError as exc:
        raise ParticleError(f"could not write ({exc.strerror or exc})", path=path) from None
    tmp = folder / path.name
    try:
        write(tmp)
        fd = open_regular(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise ParticleError(f"could not write ({exc.strerror or exc})", path=path) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_temporaries(folder: Path, nonce: str = "") -> None:
    """Delete the temporaries a run left in ``folder`` (and in its ``stacks`` and records folders):
    those of the run ``nonce`` only, if given; all of them otherwise, which only the holder of the
    folder's lock may ask, when no other run can be writing. Links and FIFOs with a temporary name
    are removed, never followed or opened; a temporary folder locked by a live run is left."""
    folder = Path(folder)
    mark = f"{TMP_MARK}-{nonce}"
    for sub in (folder, folder / "stacks", folder / RECORDS):
        try:
            entries = list(os.scandir(sub)) if sub == folder or not sub.is_symlink() else []
        except OSError:
            continue
        for e in entries:
            if mark in e.name:
                remove_temporary(Path(e.path), folder_held=True)


LOCK_GRACE = 60.0  # seconds a new temporary folder has to take its lock file (its run does so at once)


def removable(path: Path, *, folder_held: bool) -> bool:
    """The one rule for what a run may delete among temporaries (names with :data:`TMP_MARK`): a
    file, link or FIFO, yes (unlinked, never followed or opened); a folder, unless a live run holds
    the lock file in it (a zarr cache being written). A folder with no lock file yet is removed only
    by the holder of the lock of the folder it lies in (``folder_held``: nobody else writes there),
    or once it is older than :data:`LOCK_GRACE`, when its run died before taking its lock."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return True
    if os.path.lexists(path / "lock"):
        return not lock_is_held(path / "lock")
    return folder_held or time.time() - st.st_mtime > LOCK_GRACE


def remove_temporary(path: Path, *, folder_held: bool) -> None:
    """Delete the temporary ``path`` if :func:`removable` allows it."""
    if not removable(path, folder_held=folder_held):
        return
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def lock_is_held(lock: Path) -> bool:
    """Whether another live process holds ``lock`` (a missing lock file is not held)."""
    try:
        fd = open_regular(lock)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# --- inputs --------------------------------------------------------------------------------------

def _input_paths(ds: xr.Dataset) -> list[str]:
    """Every file a dataset reads, as the dataset names it (links not resolved): its metadata, a zarr
    cache, the .cs whose rows its particles.cs is written from (``cs_source``), its stacks."""
    paths = [str(ds.attrs[k]) for k in ("source", "zarr", "cs_source") if k in ds.attrs]
    for name in ("stack_path", "image_path"):
        if name in ds.coords:
            paths += [str(p) for p in np.unique(ds[name].values.astype(str))]
            break
    return list(dict.fromkeys(paths))


def _reached(path: str, dirs: dict, hops: int = 0) -> tuple[str, tuple[str, ...]]:
    """``(real path, paths met on the way)``: ``path`` as named (made absolute), every link met while
    resolving it (the link itself, wherever it lives) and where it leads. ``dirs`` caches folders."""
    path = os.path.normpath(os.path.join(os.getcwd(), path))
    if path == os.sep:
        return path, ()
    head, name = os.path.split(path)
    if head not in dirs:
        dirs[head] = _reached(head, dirs, hops)
    real_head, met = dirs[head]
    full = os.path.join(real_head, name)
    met = met + (path,) if full != path else met
    if os.path.islink(full):
        if hops >= 40:  # a loop of links: what the system makes of it
            return os.path.realpath(full), met + (full,)
        real, more = _reached(os.path.join(real_head, os.readlink(full)), dirs, hops + 1)
        return real, met + (full,) + more
    return full, met


def refuse_inputs(out: Path, ds: xr.Dataset, flag: str = "--out") -> None:
    """Raise ParticleError if ``out`` is, or is a folder holding, any file ``ds`` reads, comparing
    paths as given and resolved, and counting every link on the way to an input: a stack reached
    through a link inside ``out`` needs that link.

    Inputs are taken a folder at a time: the folder is resolved once and listed once for links
    (100,000 stacks in one folder are not 100,000 looks); a file that is a link, and every file of a
    folder that lies in ``out`` or of a small folder, is followed one by one."""
    named = os.path.normpath(os.path.abspath(out))
    targets = {named, os.path.realpath(named)}
    exact = {os.path.split(t) for t in targets}  # (folder, name) of an input that would be the output itself
    dirs: dict = {}
    cwd = os.getcwd()
    folders: dict[str, list[tuple[str, str]]] = {}
    for f in _input_paths(ds):
        plain = f.startswith(os.sep) and "/." not in f and "//" not in f and not f.endswith(os.sep)
        head, _, name = (f if plain else os.path.normpath(os.path.join(cwd, f))).rpartition(os.sep)
        if name:
            folders.setdefault(head or os.sep, []).append((f, name))
    for head, files in folders.items():
        real_head, met = _reached(head, dirs)
        links = _links(real_head) if len(files) >= 64 else None
        one_by_one = links is None or any(_inside(p, t) for p in (real_head, *met, head) for t in targets)
        for f, name in files:
            if one_by_one or name in links or (real_head, name) in exact or (head, name) in exact:
                _refuse_one(f, out, targets, dirs, flag)


def _links(folder: str) -> set[str] | None:
    """Names of the links in ``folder`` (one listing), or None if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_symlink()}
    except OSError:
        return None


def _inside(p: str, t: str) -> bool:
    """Whether ``p`` is ``t`` or lies in it; for a folder ``p``, whether any file in it could."""
    return p == t or p.startswith(t.rstrip(os.sep) + os.sep)


def _refuse_one(f: str, out: Path, targets: set[str], dirs: dict, flag: str) -> None:
    """Raise ParticleError if the input ``f`` is in ``out``, as named, resolved or through a link."""
    real, met = _reached(f, dirs)
    for p in (real, *met):
        for t in targets:
            if _inside(p, t):
                what = "output folder" if flag == "--out" else f"{flag} path"
                via = "" if p in (real, os.path.normpath(os.path.abspath(f))) else f", reached through {p}"
                raise ParticleError(f"the {what} is or holds an input ({real}{via}); choose another {flag}",
                                    path=out)


def refuse_overlaps(outputs: list[tuple[str, Path]]) -> None:
    """Raise ParticleError if two outputs of one run (``(flag, path)``: ``--out`` folders, ``--zarr``
    caches) would write into each other, comparing paths as named and with links resolved: the same
    place, one inside the other, or a cache where an output folder keeps its own files. Finishing
    one output then never moves or removes what another owns. A cache may lie in an output folder
    (beside ``stacks/`` and the metadata, as ``--zarr OUT/cache.zarr``), nothing else may."""
    places = [(flag, path, {os.path.normpath(os.path.abspath(path)), os.path.realpath(path)})
              for flag, path in outputs]
    for i, (flag_a, a, at_a) in enumerate(places):
        for flag_b, b, at_b in places[i + 1:]:
            if at_a & at_b:
                raise ParticleError(f"{flag_a} {a} and {flag_b} {b} are the same place; give each output "
                                    "its own path")
            for (fin, inner, at_in), (fout, outer, at_out) in (((flag_a, a, at_a), (flag_b, b, at_b)),
                                                                 ((flag_b, b, at_b), (flag_a, a, at_a))):
                first = {os.path.relpath(p, o).split(os.sep)[0] for p in at_in for o in at_out if _inside(p, o)}
                owned = sorted(first & {"stacks", RECORDS, *METADATA, *RUN_FILES, RUN_MARKER, LOCK})
                if not first or (fin, fout) == ("--zarr", "--out") and not owned:
                    continue
                where = f", where it keeps its {owned[0]}" if fout == "--out" and owned else ""
                raise ParticleError(f"{fin} {inner} lies inside {fout} {outer}{where}; give each output its "
                                    "own path")


# --- the output folder: refusals, lock, resume, overwrite ----------------------------------------

@dataclass
class _Held:
    """An output folder this process prepared: its lock, and what it added (to undo on a refusal)."""

    folder: Path
    fd: int
    ino: tuple[int, int]
    created: list[Path] = field(default_factory=list)  # folders made for it, outermost first
    had_marker: bool = False


_SESSION: contextvars.ContextVar[list | None] = contextvars.ContextVar("dparticles_job", default=None)
_HOST: contextvars.ContextVar[tuple[str, tuple[str, ...]] | None] = contextvars.ContextVar("dparticles_host",
                                                                                         default=None)


@contextlib.contextmanager
def host_folder(folder: str | os.PathLike, patterns: tuple[str, ...]) -> Iterator[None]:
    """Within: the output folder ``folder``, made for this run by the program that runs it (RELION's
    job folder of an External job), may also hold that program's own files, regular files named by
    ``patterns`` (fnmatch): they are neither refused, nor counted as work, nor removed by ``overwrite``."""
    token = _HOST.set((os.path.realpath(folder), tuple(patterns)))
    try:
        yield
    finally:
        _HOST.reset(token)


def hosted(path: Path) -> bool:
    """Whether ``path`` is a file of the program that made its folder for this run (:func:`host_folder`),
    which a writer leaves as it is (RELION's ``note.txt`` of the job)."""
    return _hosts(Path(path).parent, Path(path).name)


def _hosts(folder: Path, name: str) -> bool:
    """Whether ``name`` in ``folder`` is a file of the program that made the folder (:func:`host_folder`)."""
    host = _HOST.get()
    return (host is not None and os.path.realpath(folder) == host[0]
            and any(fnmatch.fnmatchcase(name, p) for p in host[1]) and is_regular(folder / name))


def hold_outputs(func: Callable) -> Callable:
    """Decorate a job: the output folders it prepares stay locked until it returns, and what it
    registers with :func:`at_job_end` is done then. If it fails, a folder into which nothing was
    written yet is left as it was found (not created, if it was not there), so that a refusal or an
    error before any work changes nothing."""
    @functools.wraps(func)
    def job(*args, **kwargs):
        ends: list[Callable[[bool], None]] = []
        token = _SESSION.set(ends)
        ok = False
        try:
            result = func(*args, **kwargs)
            ok = True
            return result
        finally:
            _SESSION.reset(token)
            for end in reversed(ends):
                end(ok)
    return job


def at_job_end(end: Callable[[bool], None]) -> None:
    """Have ``end(succeeded)`` called when the running :func:`hold_outputs` job returns or fails
    (nothing outside one)."""
    ends = _SESSION.get()
    if ends is not None:
        ends.append(end)


def prepare_output(out: Path, ds: xr.Dataset, *, overwrite: bool, job: str, token: str,
                   inputs_checked: bool = False) -> Path:
    """Check that ``out`` may be written, lock it for this run, and return it (absolute).

    Refuses a folder that is or holds an input, a file, and a link to nothing; a link to a folder
    is followed, and its target is the output (checked, locked and, if asked, emptied: never
    removed). A folder that another run is writing is refused, naming that run. A non-empty folder
    is reused only if its run record says it is a run of the same job with the same inputs and
    arguments (``token``), which is then resumed; with ``overwrite``, a folder whose run record
    says dparticles wrote it, and that holds nothing else, has what dparticles wrote removed;
    anything else is refused and left as it is. Temporaries of dead runs are removed once the lock
    is ours. Call it from a job decorated with :func:`hold_outputs` (which releases the lock);
    otherwise the lock is held until the process ends. ``inputs_checked``: the caller has just
    refused ``out`` against the inputs (:func:`refuse_inputs`, a look at every stack), not done again.
    """
    named = Path(out).absolute()
    if named.is_symlink() and not named.exists():
        raise ParticleError(f"the output is a symbolic link to {os.readlink(named)}, which does not exist; "
                            "give an existing folder or a new path", path=named)
    if not inputs_checked:
        refuse_inputs(named, ds)
    folder = Path(os.path.realpath(named))
    if folder.exists() and not folder.is_dir():
        raise ParticleError("output exists and is not a folder", path=named)
    created: list[Path] = []
    if folder.is_dir():
        if read_json(folder / RUN_MARKER) is None:  # not ours: refused (if it must be) before anything is put in it
            _check_existing(folder, named, overwrite=overwrite, job=job, token=token)
    else:
        created = _make_folder(folder, named)
    try:
        fd, ino = _lock(folder, named)
    except BaseException:
        _remove_created(created)
        raise
    held = _Held(folder, fd, ino, created, had_marker=read_json(folder / RUN_MARKER) is not None)
    try:
        # under the lock, nobody else changes the folder: check again what the first look saw
        _check_existing(folder, named, overwrite=overwrite, job=job, token=token)
        if overwrite and held.had_marker:
            _empty(folder, named)
            held.had_marker = False
        remove_temporaries(folder)
        for sub in ("stacks", RECORDS):  # our sub-folders are real folders: a link or file there goes
            p = folder / sub
            if os.path.lexists(p) and (p.is_symlink() or not p.is_dir()):
                os.unlink(p)
        for name in (*METADATA, *RUN_FILES):  # a link or FIFO planted where a file will be written goes
            p = folder / name
            if os.path.lexists(p) and not is_regular(p) and (p.is_symlink() or not p.is_dir()):
                os.unlink(p)
        if read_json(folder / RUN_MARKER) is None:
            atomic_write(folder / RUN_MARKER, lambda tmp: tmp.write_text(json.dumps({"job": job, "token": token})))
    except OSError as exc:
        _release(held, undo=True)
        raise ParticleError(f"could not prepare the output folder ({exc.strerror or exc})", path=named) from None
    except BaseException:
        _release(held, undo=True)
        raise
    at_job_end(lambda ok: _release(held, undo=not ok))
    return named


def _check_existing(folder: Path, named: Path, *, overwrite: bool, job: str, token: str) -> None:
    """Refuse an existing folder that may not be written: see :func:`prepare_output`."""
    try:
        entries = [e for e in os.listdir(folder) if e != LOCK and not _hosts(folder, e)]
    except OSError as exc:
        raise ParticleError(f"could not read the output folder ({exc.strerror or exc})", path=named) from None
    if not entries:
        return
    marker = read_json(folder / RUN_MARKER)
    if marker is None:  # not ours: --overwrite would refuse it too, so it is not suggested
        what = "--overwrite replaces only what dparticles wrote: empty it yourself or choose another --out" \
            if overwrite else "choose another --out, or empty it"
        raise ParticleError("the output folder is not empty and is not a dparticles output (it has no run "
                            f"record {RUN_MARKER}); {what}", path=named)
    if not overwrite and (marker.get("job"), marker.get("token")) == (job, token):
        return  # an unfinished run of this job with the same arguments: resumed
    foreign = _foreign(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ParticleError(f"the output folder holds files dparticles did not write ({shown}); --overwrite "
                            "replaces only dparticles outputs: move them or choose another --out", path=named)
    if not overwrite:
        raise ParticleError("output folder exists and is not empty (nor an unfinished run of this job with "
                            "the same arguments); use --overwrite to replace it", path=named)


def _foreign(folder: Path) -> list[str]:
    """What in an output folder dparticles did not write: anything but the run record, the lock,
    the metadata, the record of the run (``job.json``, ``note.txt``, ``report.html``), ``stacks/``
    (batch files, temporaries, links to stacks), the records folder, zarr caches and temporaries."""
    foreign = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if _hosts(folder, e.name):
            continue
        real_dir = e.is_dir(follow_symlinks=False)
        if TMP_MARK in e.name or (e.name in (RUN_MARKER, LOCK, *METADATA, *RUN_FILES) and not real_dir):
            continue
        if e.name in ("stacks", RECORDS) and not real_dir:
            continue
        if e.name == "stacks" and real_dir:
            foreign += [f"stacks/{s.name}" for s in os.scandir(e.path)
                        if s.is_dir(follow_symlinks=False) or not (TMP_MARK in s.name or s.is_symlink()
                                                                   or _BATCH.fullmatch(s.name))]
        elif e.name == RECORDS and real_dir:
            foreign += [f"{RECORDS}/{s.name}" for s in os.scandir(e.path)
                        if s.is_dir(follow_symlinks=False) or not (TMP_MARK in s.name or s.name.endswith(".json"))]
        elif not (real_dir and is_zarr_cache(Path(e.path))):
            foreign.append(e.name + ("/" if real_dir else ""))
    return foreign


def is_zarr_cache(path: Path) -> bool:
    """Whether ``path`` is a real folder holding a dparticles zarr cache (a zarr group with images)."""
    if path.is_symlink() or not path.is_dir():
        return False
    group = any((path / m).is_file() for m in ("zarr.json", ".zgroup"))
    return group and any((path / "images" / m).is_file() for m in ("zarr.json", ".zarray"))


def _empty(folder: Path, named: Path) -> None:
    """Remove what dparticles wrote in ``folder`` (:func:`_foreign` said there is nothing else),
    never following a link: links are removed, not what they point to. The run record goes last,
    so an interrupted removal can be asked again."""
    try:
        for e in os.scandir(folder):
            if e.name in (RUN_MARKER, LOCK) or _hosts(folder, e.name):
                continue
            if e.name in ("stacks", RECORDS) and e.is_dir(follow_symlinks=False):
                for s in os.scandir(e.path):
                    remove_temporary(Path(s.path), folder_held=True)
                os.rmdir(e.path)
            elif e.is_dir(follow_symlinks=False) and TMP_MARK not in e.name:
                shutil.rmtree(e.path)  # a zarr cache (shutil.rmtree does not follow links inside)
            elif TMP_MARK in e.name:
                remove_temporary(Path(e.path), folder_held=True)
            else:
                os.unlink(e.path)
        os.unlink(folder / RUN_MARKER)
    except OSError as exc:
        raise ParticleError(f"could not remove the earlier output ({exc.strerror or exc}: {exc.filename}); "
                            "nothing else was changed", path=named) from None


def _make_folder(folder: Path, named: Path) -> list[Path]:
    """Create ``folder`` and any missing parents; return those made, outermost first."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    made = []
    try:
        for p in reversed(missing):
            os.mkdir(p)
            made.append(p)
    except OSError as exc:
        _remove_created(made)
        raise ParticleError(f"could not create the output folder ({exc.strerror or exc}: {exc.filename})",
                            path=named) from None
    return made


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            os.rmdir(p)
        except OSError:
            break


def _lock(folder: Path, named: Path) -> tuple[int, tuple[int, int]]:
    """Take the folder's lock (exclusive, without waiting) and write who holds it; or refuse,
    naming the run that holds it."""
    path = folder / LOCK
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        except PermissionError as denied:  # another account's lock file in a shared folder: a read lock will do
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                raise ParticleError(f"could not open the lock file {LOCK} ({denied.strerror})", path=named) from None
        except OSError as exc:
            why = "it is a symbolic link: remove it" if os.path.islink(path) else exc.strerror or str(exc)
            raise ParticleError(f"could not open the lock file {LOCK} ({why})", path=named) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ParticleError(f"the lock file {LOCK} is not a regular file; remove it", path=named)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise ParticleError(f"another dparticles run is writing this output folder ({holder}); wait for it to "
                                "end, or stop it and rerun this command to resume", path=named) from None
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            info = {"host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError:
                pass
            return fd, (st.st_dev, st.st_ino)
        os.close(fd)  # the run before removed it as we opened it: take the new one
    raise ParticleError(f"could not take the lock file {LOCK}: it keeps being replaced", path=named)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}"
                + (f" by {info['user']}" if info.get("user") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "its host and pid are not written yet"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def _release(held: _Held, *, undo: bool) -> None:
    """Give up the lock (removing the lock file first). A run that succeeded first removes every
    temporary left in the folder (a worker killed mid-write leaves one; no other run can be writing);
    with ``undo``, when nothing was written yet, take away what this run added: its run record, its
    empty sub-folders and folders it created."""
    if not undo:
        remove_temporaries(held.folder)
    if undo and not held.had_marker and _no_work(held.folder):
        try:
            os.unlink(held.folder / RUN_MARKER)
        except OSError:
            pass
        for sub in ("stacks", RECORDS):
            try:
                os.rmdir(held.folder / sub)
            except OSError:
                pass
    try:
        now = os.stat(held.folder / LOCK, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == held.ino:
            os.unlink(held.folder / LOCK)
    except OSError:
        pass
    os.close(held.fd)
    if undo:
        _remove_created(held.created)


def _no_work(folder: Path) -> bool:
    """Whether ``folder`` holds only a run record, a lock and empty sub-folders."""
    try:
        for e in os.scandir(folder):
            if e.name in (RUN_MARKER, LOCK) or _hosts(folder, e.name):
                continue
            if e.name in ("stacks", RECORDS) and e.is_dir(follow_symlinks=False) and not os.listdir(e.path):
                continue
            return False
    except OSError:
        return False
    return True
