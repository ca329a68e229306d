"""The ``dparticles`` command: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

from dparticles import __version__
from dparticles.errors import ParticleError

log = logging.getLogger("dparticles")

EXAMPLES = {
    "import": """examples:
  dparticles import Extract/job007/particles.star --out Import/job010
  dparticles import P3/J42/particles.cs --out Import/job011 --pixel-size 1.06 --voltage 300 --cs 2.7
  dparticles import particles.star --out Import/job012 --exposures CtfFind/job004/micrographs_ctf.star""",
    "info": """examples:
  dparticles info Select/job010/particles.star
  dparticles info Restack/job020 --json""",
    "restack": """examples:
  dparticles restack Select/job010/particles.star --out Restack/job020 --batch-size 10000
  dparticles restack Select/job010/particles.star --out Restack/job021 --float16    # MRC mode 12
  dparticles restack Select/job010/particles.star --zarr cache.zarr --scheduler-file scheduler.json""",
    "downsample": """examples:
  dparticles downsample Restack/job020 --out Downsample/job030 --fourier-box 128
  dparticles downsample Restack/job020 --out Downsample/job031 --approx-pixel-size 2.1 4.2   # one folder each
  dparticles downsample Restack/job020 --out Downsample/job032 --fourier-box 160 --lowpass 8 --recenter
  dparticles downsample Extract/job007/particles.star --out Downsample/job033 --recenter --micrograph-pixel-size 0.7""",
    "demo": """examples:
  dparticles demo --out dparticles-demo
  dparticles demo --out /tmp/dparticles-demo --n-workers 2""",
}
INPUT_HELP = "RELION .star, CryoSPARC .cs, a bare .mrcs/.mrc stack, an earlier output folder or a zarr cache"


def _default(key: str) -> str:
    """A setting's place in help text, shown as its value when the help is printed (see _HelpFormatter)."""
    return "{setting:" + key + "}"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each setting's default as the dask config in effect gives it, e.g. ``default:
    5000 (dparticles.batch-size)``, read only when help is printed: building the parser for a run or
    ``--version`` imports no dask."""

    def _expand_help(self, action: argparse.Action) -> str:
        from dparticles import config

        def value(m: re.Match) -> str:
            v = config.get(m.group(1))
            return f"default: {str(v).lower() if isinstance(v, bool) else v} (dparticles.{m.group(1)})"

        return re.sub(r"\{setting:([\w.-]+)\}", value, super()._expand_help(action))


def _open_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading the input")
    g.add_argument("--data-dir", help="folder holding the stacks, tried before the metadata's folder and its ancestors")
    g.add_argument("--pixel-size", type=float, help="override the input pixel size (Å)")
    g.add_argument("--voltage", type=float, help="override the accelerating voltage (kV)")
    g.add_argument("--cs", type=float, help="override the spherical aberration (mm)")
    g.add_argument("--amp-contrast", type=float, help="override the amplitude contrast")
    g.add_argument("--dose", type=float, help="total exposure dose (e/Å²)")
    g.add_argument("--sign", type=int, choices=(1, -1), help="data sign: 1 dark on light, -1 light on dark")
    g.add_argument("--ignore-pose", action="store_true", help="drop 2D/3D poses and shifts")


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs (default: an in-process cluster on this machine)")
    g.add_argument("--scheduler", help="address of a running dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--scheduler-file", help="scheduler file written by dask-scheduler or dask-jobqueue")
    g.add_argument("--n-workers", type=int, help="workers of the local cluster; default: as many as fit, "
                                                 "min(CPUs, 80%% of RAM / dparticles.memory-budget)")
    g.add_argument("--threads-per-worker", type=int,
                   help=f"threads per local worker; {_default('cluster.threads-per-worker')}")
    g.add_argument("--memory-limit", help="memory limit per local worker, e.g. 4GB (auto: none in-process, RAM / "
                                          f"workers for --processes); {_default('cluster.memory-limit')}")
    g.add_argument("--processes", action="store_true", default=None,
                   help="run the local workers as processes (each under a nanny that restarts it beyond "
                        f"--memory-limit) instead of threads in this process; {_default('cluster.processes')}")
    g.add_argument("--jobqueue", choices=("slurm", "pbs"),
                   help="submit worker jobs with dask-jobqueue (profile: jobqueue.slurm / jobqueue.pbs in the "
                        "dask config); pending jobs are reported with the batch system's reason")
    g.add_argument("--jobs", type=int, help=f"worker jobs to keep with --jobqueue; {_default('cluster.jobs')}")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project-dir", help="the project directory that RELION or CryoSPARC run in: stacks are named "
                                         "relative to it in the metadata (default: the current directory)")
    p.add_argument("--float16", action="store_true",
                   help="write MRC mode 12 (half the size; range checked, rounding error reported). RELION 4.0+, "
                        "CryoSPARC, IMOD and mrcfile read it; RELION 3.1 does not")
    p.add_argument("--zarr", help="also (or, for restack without --out, only) write a zarr cache here")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _open_kwargs(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in ("data_dir", "pixel_size", "voltage", "cs", "amp_contrast", "dose", "sign",
                                       "ignore_pose") if getattr(a, k, None) not in (None, False)}


def _cluster_kwargs(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in ("scheduler", "scheduler_file", "n_workers", "threads_per_worker",
                                       "memory_limit", "processes", "jobqueue", "jobs")
            if getattr(a, k, None) is not None}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dparticles", description="Lazy, chunked cryo-EM particle stacks on Dask: "
                                  "import, restack and downsample RELION and CryoSPARC particles.")
    top.add_argument("--version", action="version", version=f"dparticles {__version__}")
    verbosity = top.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print only results, warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also print details (debug messages)")
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, epilog=EXAMPLES.get(name), formatter_class=_HelpFormatter,
                              **kw)

    p = add("import", help="link stacks and write particles.star/.cs (Import Particle Stack)")
    p.add_argument("input", help="RELION .star or CryoSPARC .cs")
    p.add_argument("--out", required=True, help="output folder")
    _open_options(p)
    p.add_argument("--ignore-raw", action="store_true", help="metadata only: no stacks needed or linked")
    p.add_argument("--exposures", help="micrographs .star or a folder of micrographs/movies to link particles to")
    p.add_argument("--trim-prefix", default="", help="removed from exposure and micrograph names before matching")
    p.add_argument("--trim-suffix", default="", help="removed from exposure and micrograph names before matching")
    p.add_argument("--keep-unmatched", action="store_true", help="keep particles that match no exposure")
    p.add_argument("--project-dir", help="the project directory that RELION or CryoSPARC run in: stacks are named "
                                         "relative to it in the metadata (default: the current directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = add("info", help="what a particle set holds: counts, bytes, box, optics, metadata")
    p.add_argument("input", help=INPUT_HELP)
    _open_options(p)
    p.add_argument("--ignore-raw", action="store_true", help="metadata only")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("restack", help="write the particles in use into new stacks of N (Restack Particles)")
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("--out", help="output folder (stacks/ and particles.star)")
    p.add_argument("--batch-size", type=int, help=f"particles per output stack; {_default('batch-size')}")
    _output_options(p)
    _open_options(p)
    _cluster_options(p)

    p = add("downsample", help="crop, Fourier crop, lowpass, recentre (Downsample Particles)")
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("--out", required=True, help="output folder (one sub-folder boxN per size when several)")
    p.add_argument("--crop-box", type=int, help="real-space crop or pad (with each image's mean) to this box first")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fourier-box", type=int, nargs="+", help="Fourier crop to this box (several: one output each)")
    size.add_argument("--approx-pixel-size", type=float, nargs="+",
                      help="desired approx. pixel size (Å): Fourier crop to the even box nearest it; several allowed")
    p.add_argument("--lowpass", type=float, help="lowpass corner resolution (Å); raised-cosine edge 2 shells wide")
    p.add_argument("--recenter", action="store_true", help="shift each particle by its aligned shift (3D, else 2D)")
    p.add_argument("--micrograph-pixel-size", type=float,
                   help="pixel size (Å) of the micrographs the picking coordinates refer to, for --recenter "
                        "when the metadata give none (no rlnMicrographPixelSize or location/micrograph_psize_A)")
    p.add_argument("--batch-size", type=int, help=f"particles per output stack; {_default('batch-size')}")
    _output_options(p)
    _open_options(p)
    _cluster_options(p)

    p = add("demo", help="make a small demo particle set and run the jobs on a local cluster")
    p.add_argument("--out", default="dparticles-demo", help="folder for the demo data and results")
    _cluster_options(p)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra:  # say it with the subcommand's usage, not the top level's
        sub = next(a for a in top._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    handler = logging.StreamHandler(sys.stderr)  # our own messages only: dask's loggers keep their settings
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]  # one handler however often main() runs in a process (tests, notebooks)
    log.propagate = False
    log.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a batch system's time limit: stop as on Ctrl-C
    try:
        return _run(args)
    except ParticleError as exc:
        print(f"dparticles {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (``info ... | head``): stop quietly (an OSError: first)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a file system error no step turned into a message (full disk, permissions)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dparticles {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dparticles {args.command}: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run(a: argparse.Namespace) -> int:
    if a.command == "import":
        from dparticles.jobs.importer import import_particles
        result = import_particles(a.input, a.out, exposures=a.exposures, trim_prefix=a.trim_prefix,
                                  trim_suffix=a.trim_suffix, keep_unmatched=a.keep_unmatched,
                                  overwrite=a.overwrite, ignore_raw=a.ignore_raw, project_dir=a.project_dir,
                                  **_open_kwargs(a))
        print(result)
    elif a.command == "info":
        from dparticles.dataset import open_particles
        from dparticles.jobs.info import describe, format_text
        info = describe(open_particles(a.input, ignore_raw=a.ignore_raw, **_open_kwargs(a)))
        print(json.dumps(info, indent=1) if a.json else format_text(info))
    elif a.command == "restack":
        from dparticles.jobs.restack import restack
        if a.out is None and a.zarr is None:
            raise ParticleError("give --out (stacks), --zarr (cache), or both")
        print(restack(a.input, a.out, batch_size=a.batch_size, float16=a.float16, zarr=a.zarr,
                      overwrite=a.overwrite, cluster=_cluster_kwargs(a), project_dir=a.project_dir, log=log.info,
                      **_open_kwargs(a)))
    elif a.command == "downsample":
        from dparticles.jobs.downsample import downsample
        for result in downsample(a.input, a.out, crop_box=a.crop_box, fourier_box=a.fourier_box,
                                 approx_pixel_size=a.approx_pixel_size, lowpass=a.lowpass, recenter=a.recenter,
                                 micrograph_pixel_size=a.micrograph_pixel_size,
                                 float16=a.float16, batch_size=a.batch_size, zarr=a.zarr, overwrite=a.overwrite,
                                 cluster=_cluster_kwargs(a), project_dir=a.project_dir, log=log.info,
                                 **_open_kwargs(a)):
            print(result)
    elif a.command == "demo":
        from dparticles.demo import run_demo
        run_demo(a.out, **_cluster_kwargs(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
