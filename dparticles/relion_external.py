"""``dparticles-relion``: restack and downsample as a RELION External job.

RELION 3.1, 4 and 5 run an External job from the project directory as
``fn_exe --o External/job005/ --in_parts Select/job014/particles.star --label value ... --j 1``
(the labels and values of the job's Params tab, then its additional arguments) and learn what
became of it only through files in the job folder: ``RELION_OUTPUT_NODES.star`` names what the job
made, so that later jobs can take it as input, and ``RELION_JOB_EXIT_SUCCESS`` or
``RELION_JOB_EXIT_FAILURE`` give its state (``RELION_JOB_EXIT_ABORTED`` after the GUI's abort, which
asks by creating ``RELION_JOB_ABORT_NOW``). This module parses that call, runs
:func:`dparticles.restack` or :func:`dparticles.downsample` into the job folder, and writes those
files; the particles STAR file is ``particles.star`` in the job folder (``boxN/particles.star`` for
each size of a downsample to several), its stacks named relative to the project directory.
"""

from __future__ import annotations

import _thread
import argparse
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path

from dparticles import __version__
from dparticles.errors import ParticleError
from dparticles.safe import atomic_write, host_folder, is_regular, open_regular

log = logging.getLogger("dparticles")

# what RELION itself puts in a job folder, left as it is: the job's settings, note, logs, its copy
# of the pipeline, the queue script, and the pipeline-control files
RELION_FILES = ("note.txt", "run.out", "run.err", "job.star", "run.job", "*_pipeline.star", "run_submit.script",
                "RELION_*")
NODES_FILE = "RELION_OUTPUT_NODES.star"
SUCCESS, FAILURE, ABORTED = "RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
PARTICLES_TYPE = 3  # RELION 3.1's node type of a particles STAR file (NODE_PART_DATA)
PARTICLES_LABEL = {4: "ParticlesData.star.relion", 5: "ParticleGroupMetadata.star.relion"}  # RELION 4's, 5's


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ParticleError line (written to RELION_JOB_EXIT_FAILURE), not an exit."""

    def error(self, message: str):
        raise ParticleError(message)


def _yes_no(value: str) -> bool:
    """A flag's value from RELION's Params tab: empty (the flag alone), Yes/No, true/false, 1/0."""
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1", "on"):
        return True
    if v in ("no", "n", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected Yes or No, got {value!r}")


def parser(job: str | None) -> argparse.ArgumentParser:
    """The arguments RELION passes, and the options of ``job`` (restack or downsample) by their CLI
    names with underscores (hyphens also accepted)."""
    p = _Parser(prog="dparticles-relion", allow_abbrev=False, description="Run dparticles restack or downsample "
                "as a RELION External job (RELION calls it; see README, In RELION).")

    def opt(name: str, **kw) -> None:
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), dest=name, **kw)

    def flag(name: str, help: str) -> None:
        opt(name, nargs="?", const=True, default=False, type=_yes_no, metavar="Yes|No", help=help)

    p.add_argument("--version", action="version", version=f"dparticles {__version__}")
    p.add_argument("--o", required=True, help="the job folder, relative to the project directory")
    p.add_argument("--in_parts", required=True, help="particles STAR file of an earlier job")
    p.add_argument("--j", type=int, help="threads: single-threaded workers of the in-process cluster")
    p.add_argument("--job", required=True, choices=("restack", "downsample"))
    p.add_argument("--pipeline_control", help=argparse.SUPPRESS)  # added by RELION if the path holds 'relion_'
    opt("batch_size", type=int, help="particles per output stack")
    flag("float16", "write MRC mode 12 (RELION 4.0+ reads it; RELION 3.1 does not)")
    opt("zarr", help="also write a zarr cache here")
    flag("overwrite", "replace what an earlier run of dparticles wrote in the job folder")
    if job == "downsample":
        opt("crop_box", type=int, help="real-space crop or pad to this box first")
        opt("fourier_box", type=int, nargs="+", help="Fourier crop to this box (several: one boxN folder each)")
        opt("approx_pixel_size", type=float, nargs="+", help="desired approx. pixel size (Å), several allowed")
        opt("lowpass", type=float, help="lowpass corner resolution (Å)")
        flag("recenter", "shift each particle by its aligned shift")
        opt("micrograph_pixel_size", type=float, help="micrograph pixel size (Å) for --recenter")
    for name, kind in (("data_dir", str), ("pixel_size", float), ("voltage", float), ("cs", float),
                       ("amp_contrast", float), ("dose", float)):
        opt(name, type=kind, help=f"as dparticles {job or 'restack'} --{name.replace('_', '-')}")
    opt("sign", type=int, choices=(1, -1), help="data sign")
    flag("ignore_pose", "drop 2D/3D poses and shifts")
    for name, kind in (("scheduler", str), ("scheduler_file", str), ("memory_limit", str), ("jobqueue", str),
                       ("jobs", int)):
        opt(name, type=kind, help=f"as dparticles {job or 'restack'} --{name.replace('_', '-')}")
    flag("processes", "run the local workers as processes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job RELION asks for, write its nodes and exit file into the job folder; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = _Parser(add_help=False, allow_abbrev=False)  # the job folder first: every later error is written there
    first.add_argument("--o")
    first.add_argument("--job")
    try:
        known, _ = first.parse_known_args(argv)
    except ParticleError as exc:
        known = argparse.Namespace(o=None, job=None, error=exc)
    if known.o is None and not {"-h", "--help", "--version"} & set(argv):
        why = getattr(known, "error", "give the job folder with --o (RELION's External job does)")
        print(f"dparticles-relion: error: {why}", file=sys.stderr)
        return 2
    folder = Path(known.o or ".")
    handler = logging.StreamHandler(sys.stdout)  # RELION keeps stdout in run.out, stderr in run.err
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    stop = threading.Event()
    try:
        for name in (SUCCESS, FAILURE, ABORTED, ABORT_NOW, NODES_FILE):  # an earlier run's, as RELION removes them
            if is_regular(folder / name):
                os.unlink(folder / name)
        args = parser(known.job).parse_args(argv)
        threading.Thread(target=_watch_abort, args=(folder / ABORT_NOW, stop), daemon=True).start()
        with host_folder(folder, RELION_FILES):
            stars = _run(args)
        stop.set()
        _write(folder / NODES_FILE, nodes_star(stars, _label_version()))
        _write(folder / SUCCESS, "")
        return 0
    except KeyboardInterrupt:
        print("dparticles-relion: aborted; run the same job again to finish it (complete stacks are kept)",
              file=sys.stderr)
        _write(folder / ABORTED, "aborted\n")
        return 130
    except Exception as exc:  # RELION learns of a failure only from the exit file: every error writes it
        if isinstance(exc, (ParticleError, OSError)):
            line = _one_line(exc)
        else:
            traceback.print_exc()
            line = f"internal error: {type(exc).__name__}: {exc}"
        line = " ".join(line.split())
        print(f"dparticles-relion: error: {line}", file=sys.stderr)
        _write(folder / FAILURE, line + "\n")
        return 1
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: ParticleError | OSError) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc)
    return str(exc)


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _watch_abort(path: Path, stop: threading.Event) -> None:
    """Stop the job as on Ctrl-C when RELION's GUI asks it to abort (it creates ``RELION_JOB_ABORT_NOW``)."""
    while not stop.wait(1.0):
        if os.path.lexists(path):
            _thread.interrupt_main()
            return


def _run(a: argparse.Namespace) -> list[Path]:
    """Run the job into the job folder; return the particles STAR files it wrote."""
    opened = {k: getattr(a, k) for k in ("data_dir", "pixel_size", "voltage", "cs", "amp_contrast", "dose", "sign",
                                         "ignore_pose") if getattr(a, k) not in (None, False)}
    cluster = {k: getattr(a, k) for k in ("scheduler", "scheduler_file", "memory_limit", "jobqueue", "jobs")
               if getattr(a, k) is not None}
    if a.processes:
        cluster["processes"] = True
    if a.j is not None:  # RELION's threads: as many workers (of dparticles.cluster.threads-per-worker, 1)
        cluster["n_workers"] = a.j
    common = dict(batch_size=a.batch_size, float16=a.float16, zarr=a.zarr, overwrite=a.overwrite, cluster=cluster,
                  log=log.info, **opened)
    if a.job == "restack":
        from dparticles.jobs.restack import restack
        results = [restack(a.in_parts, a.o, **common)]
    else:
        from dparticles.jobs.downsample import downsample
        results = downsample(a.in_parts, a.o, crop_box=a.crop_box, fourier_box=a.fourier_box,
                             approx_pixel_size=a.approx_pixel_size, lowpass=a.lowpass, recenter=a.recenter,
                             micrograph_pixel_size=a.micrograph_pixel_size, **common)
    for r in results:
        log.info(str(r))
    return [Path(r.out) / "particles.star" for r in results if r.out is not None]


def _label_version() -> int:
    """4 or 5: whose node type labels the project's pipeline uses. RELION 5 writes its STAR files as
    ``# version 50001`` and reads RELION_OUTPUT_NODES.star labels as they are; RELION 4 (and 3.1)
    write ``# version 30001``."""
    try:
        fd = open_regular("default_pipeline.star")
    except OSError:
        return 4
    try:
        head = os.read(fd, 4096)  # the version line is at the top
    finally:
        os.close(fd)
    found = re.search(rb"^# version (\d+)", head, re.MULTILINE)
    return 5 if found and int(found[1]) >= 50000 else 4


def nodes_star(stars: Sequence[Path], version: int = 4) -> str:
    """``RELION_OUTPUT_NODES.star`` naming ``stars`` as particles nodes, read alike by RELION 3.1 (the
    numeric ``rlnPipeLineNodeType``; it ignores the label it does not know, with a warning) and by
    RELION 4 or 5 (``rlnPipeLineNodeTypeLabel``, that version's name for particles). Names are
    relative to the project directory (the current one), as RELION names nodes."""
    rows = "".join(f"{_project_name(s)} {PARTICLES_TYPE} {PARTICLES_LABEL[version]}\n" for s in stars)
    return ("\n# version 30001\n\ndata_output_nodes\n\nloop_ \n_rlnPipeLineNodeName #1 \n"
            f"_rlnPipeLineNodeType #2 \n_rlnPipeLineNodeTypeLabel #3 \n{rows}\n")


def _project_name(path: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path))
    return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def _write(path: Path, text: str) -> None:
    """Write a pipeline-control file atomically, if the job folder exists (RELION made it)."""
    if path.parent.is_dir():
        try:
            atomic_write(path, lambda tmp: tmp.write_text(text))
        except ParticleError as exc:
            print(f"dparticles-relion: error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
