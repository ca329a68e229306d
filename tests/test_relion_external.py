"""``dparticles-relion`` run as RELION's External job runs it: from the project directory, as
``dparticles-relion --o External/job005/ --in_parts Select/job010/particles.star --label value ... --j 1``,
with RELION's own files already in the job folder. Checked: the outputs, the node file, the exit
files, RELION's files left alone, and (marked ``relion``) RELION 3.1's own pipeliner running the
job, registering the node and running a job that takes it as input.

The project is a temporary folder with links to the real data's ``Extract/`` and ``Select/``:
RELION writes beside its inputs, and the real data are never written to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from helpers import REAL

import dparticles
from dparticles import relion_external

RIBO = REAL / "relion31_sim_ribo70S_b128"
EXE = Path(sys.executable).with_name("dparticles-relion")
JOB = "External/job005/"
RELION_NOTE = "\n ++++ Executing new job on Sun Dec  6 05:12:22 2026\n ++++ with the following command(s): \n"
pytestmark = pytest.mark.skipif(not (RIBO / "Select" / "job010" / "particles.star").exists(),
                                reason=f"shared test data not found at {RIBO}")
needs_relion = pytest.mark.skipif(shutil.which("relion_pipeliner") is None,
                                  reason="RELION 3.1 programs (relion_pipeliner, relion_stack_create) are not on "
                                         "PATH; install the Debian package 'relion' to run the RELION pipeline tests")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A RELION project folder linking the real data, with the job folder RELION has just made."""
    proj = tmp_path / "project"
    proj.mkdir()
    for name in ("Extract", "Select"):
        (proj / name).symlink_to(RIBO / name)
    job = proj / JOB
    job.mkdir(parents=True)
    (job / "note.txt").write_text(RELION_NOTE)
    (job / "job.star").write_text("\n# version 30001\n\ndata_job\n\n_rlnJobType 99\n")
    return proj


def run_external(project: Path, *params: str, job: str = JOB) -> subprocess.CompletedProcess:
    """Call it as RELION does: from the project directory, output appended to run.out and run.err."""
    assert EXE.exists(), f"{EXE} is missing: pip install -e . installs the dparticles-relion script"
    with open(project / job / "run.out", "a") as out, open(project / job / "run.err", "a") as err:
        done = subprocess.run([str(EXE), "--o", job, "--in_parts", "Select/job010/particles.star", *params, "--j", "1"],
                              cwd=project, stdout=out, stderr=err, timeout=300)
    return done


def nodes(folder: Path) -> list[tuple[str, int, str]]:
    table = starfile.read(folder / relion_external.NODES_FILE, always_dict=True)["output_nodes"]
    return list(zip(table["rlnPipeLineNodeName"], table["rlnPipeLineNodeType"], table["rlnPipeLineNodeTypeLabel"]))


def assert_relion_files_kept(job: Path) -> None:
    assert (job / "note.txt").read_text() == RELION_NOTE
    assert (job / "job.star").read_text().startswith("\n# version 30001")


def test_restack_as_relion_calls_it(project: Path) -> None:
    done = run_external(project, "--job", "restack", "--batch_size", "100")
    job = project / JOB
    assert done.returncode == 0, (job / "run.err").read_text()
    assert (job / relion_external.SUCCESS).exists() and not (job / relion_external.FAILURE).exists()
    assert nodes(job) == [("External/job005/particles.star", 3, "ParticlesData.star.relion")]
    assert sorted(os.listdir(job / "stacks")) == [f"batch_{k:06d}.mrcs" for k in range(3)]
    names = starfile.read(job / "particles.star")["particles"]["rlnImageName"]
    assert names.iloc[0] == "000001@External/job005/stacks/batch_000000.mrcs"  # relative to the project
    assert_relion_files_kept(job)
    assert "wrote 284 particles in 3 stacks" in (job / "run.out").read_text()
    cwd = os.getcwd()
    os.chdir(project)
    try:
        ours = dparticles.open_particles("External/job005/particles.star").images.values
        theirs = dparticles.open_particles("Select/job010/particles.star").images.values
    finally:
        os.chdir(cwd)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(("sizes", "stars"), [
    (["64"], ["External/job005/particles.star"]),
    (["64", "32"], ["External/job005/box64/particles.star", "External/job005/box32/particles.star"]),
])
def test_downsample_names_every_particles_star(project: Path, sizes: list[str], stars: list[str]) -> None:
    done = run_external(project, "--job", "downsample", "--fourier_box", *sizes, "--lowpass", "12",
                        "--float16", "No")
    job = project / JOB
    assert done.returncode == 0, (job / "run.err").read_text()
    assert (job / relion_external.SUCCESS).exists()
    assert nodes(job) == [(s, 3, "ParticlesData.star.relion") for s in stars]
    for star, size in zip(stars, sizes):
        with mrcfile.open(project / Path(star).parent / "stacks" / "batch_000000.mrcs", header_only=True) as m:
            assert (int(m.header.nx), int(m.header.mode)) == (int(size), 2)
    assert_relion_files_kept(job)


def test_bad_value_writes_one_line_failure(project: Path) -> None:
    done = run_external(project, "--job", "restack", "--batch_size", "lots")
    job = project / JOB
    assert done.returncode == 1
    failure = (job / relion_external.FAILURE).read_text()
    assert failure.count("\n") == 1 and "--batch_size" in failure and "'lots'" in failure, failure
    assert failure.strip() in (job / "run.err").read_text()
    # refused before any work: the job folder holds RELION's files and the exit file, nothing else
    assert sorted(os.listdir(job)) == ["RELION_JOB_EXIT_FAILURE", "job.star", "note.txt", "run.err", "run.out"]


def test_foreign_file_in_the_job_folder_is_refused(project: Path) -> None:
    (project / JOB / "mine.txt").write_text("keep me")
    done = run_external(project, "--job", "restack")
    job = project / JOB
    assert done.returncode == 1
    failure = (job / relion_external.FAILURE).read_text()
    assert failure.count("\n") == 1 and "not a dparticles output" in failure, failure
    assert (job / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(job)) == ["RELION_JOB_EXIT_FAILURE", "job.star", "mine.txt", "note.txt", "run.err",
                                       "run.out"]


def test_rerun_resumes_and_overwrite_keeps_relion_files(project: Path) -> None:
    """RELION's Continue calls the same command again; a changed one needs the overwrite parameter."""
    job = project / JOB
    assert run_external(project, "--job", "restack", "--batch_size", "100").returncode == 0
    assert run_external(project, "--job", "restack", "--batch_size", "100").returncode == 0
    assert "3 complete stacks kept from an earlier run" in (job / "run.out").read_text()
    assert run_external(project, "--job", "restack", "--batch_size", "50").returncode == 1
    assert "--overwrite" in (job / relion_external.FAILURE).read_text()
    assert run_external(project, "--job", "restack", "--batch_size", "50", "--overwrite", "Yes").returncode == 0
    assert not (job / relion_external.FAILURE).exists() and (job / relion_external.SUCCESS).exists()
    assert len(os.listdir(job / "stacks")) == 6
    assert_relion_files_kept(job)


def test_node_label_follows_the_projects_relion_version(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    assert relion_external._label_version() == 4  # no pipeline yet, or RELION 3.1's and 4's "# version 30001"
    Path("default_pipeline.star").write_text("\n# version 50001\n\ndata_pipeline_general\n\n"
                                             "_rlnPipeLineJobCounter 6\n")
    assert relion_external._label_version() == 5
    text = relion_external.nodes_star([project / JOB / "particles.star"], 5)
    assert "\nExternal/job005/particles.star 3 ParticleGroupMetadata.star.relion\n" in text


def test_abort_file_stops_the_job(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELION's GUI aborts a job by creating RELION_JOB_ABORT_NOW in its folder."""
    def slow_job(_args) -> list[Path]:
        (Path(JOB) / relion_external.ABORT_NOW).touch()
        for _ in range(100):
            time.sleep(0.05)
        raise AssertionError("not aborted")
    monkeypatch.chdir(project)
    monkeypatch.setattr(relion_external, "_run", slow_job)
    status = relion_external.main(["--o", JOB, "--in_parts", "Select/job010/particles.star", "--job", "restack"])
    assert status == 130
    assert (project / JOB / relion_external.ABORTED).exists()
    assert not (project / JOB / relion_external.SUCCESS).exists()


# --- RELION 3.1 itself ---------------------------------------------------------------------------

def pipeliner(project: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["relion_pipeliner", *args], cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"relion_pipeliner {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def run_job(project: Path, job_type: str, options: dict[str, str], name: str) -> dict:
    """Add a job with RELION 3.1's pipeliner, run it and wait for it; return the pipeline's tables."""
    pipeliner(project, "--addJob", job_type, "--addJobOptions", ";".join(f"{k} == {v}" for k, v in options.items()))
    pipeliner(project, "--RunJobs", name, "--sec_wait_after", "1")
    return starfile.read(project / "default_pipeline.star", always_dict=True)


def pairs(pipe: dict, table: str, key: str, value: str) -> dict:
    return dict(zip(pipe[table][key], pipe[table][value]))


@needs_relion
@pytest.mark.relion
def test_relion_pipeliner_runs_it_and_the_next_job_reads_the_node(tmp_path: Path) -> None:
    proj = tmp_path / "project"
    proj.mkdir()
    for name in ("Extract", "Select"):
        (proj / name).symlink_to(RIBO / name)
    (proj / "default_pipeline.star").write_text("\n# version 30001\n\ndata_pipeline_general\n\n"
                                                "_rlnPipeLineJobCounter 1\n")
    external = {"fn_exe": str(EXE), "in_part": "Select/job010/particles.star", "nr_threads": "2"}

    pipe = run_job(proj, "External", {**external, "param1_label": "job", "param1_value": "restack",
                                      "param2_label": "batch_size", "param2_value": "100"}, "External/job001/")
    status = pairs(pipe, "pipeline_processes", "rlnPipeLineProcessName", "rlnPipeLineProcessStatus")
    assert status["External/job001/"] == 2, (proj / "External/job001/run.err").read_text()  # finished, success
    node_types = pairs(pipe, "pipeline_nodes", "rlnPipeLineNodeName", "rlnPipeLineNodeType")
    assert node_types["External/job001/particles.star"] == 3  # particles data
    made = pairs(pipe, "pipeline_output_edges", "rlnPipeLineEdgeToNode", "rlnPipeLineEdgeProcess")
    assert made["External/job001/particles.star"] == "External/job001/"
    assert (proj / ".Nodes" / "3" / "External" / "job001" / "particles.star").exists()  # what the GUI lists

    pipe = run_job(proj, "External", {**external, "param1_label": "job", "param1_value": "downsample",
                                      "param2_label": "fourier_box", "param2_value": "64 32"}, "External/job002/")
    node_types = pairs(pipe, "pipeline_nodes", "rlnPipeLineNodeName", "rlnPipeLineNodeType")
    assert node_types["External/job002/box64/particles.star"] == 3
    assert node_types["External/job002/box32/particles.star"] == 3

    pipe = run_job(proj, "External", {**external, "param1_label": "job", "param1_value": "restack",
                                      "param2_label": "batch_size", "param2_value": "none"}, "External/job003/")
    status = pairs(pipe, "pipeline_processes", "rlnPipeLineProcessName", "rlnPipeLineProcessStatus")
    assert status["External/job003/"] == 3  # finished, failure
    assert "--batch_size" in (proj / "External/job003/RELION_JOB_EXIT_FAILURE").read_text()

    # the next job takes the node as its input: RELION's Join star files, on our particles and the originals
    pipe = run_job(proj, "JoinStar", {"do_part": "Yes", "fn_part1": "External/job001/particles.star",
                                      "fn_part2": "Select/job010/particles.star"}, "JoinStar/job004/")
    status = pairs(pipe, "pipeline_processes", "rlnPipeLineProcessName", "rlnPipeLineProcessStatus")
    assert status["JoinStar/job004/"] == 2, (proj / "JoinStar/job004/run.err").read_text()
    assert len(starfile.read(proj / "JoinStar/job004/join_particles.star")["particles"]) == 2 * 284

    # and RELION reads every image through the names in our particles.star, from the project directory
    (proj / "Check").mkdir()
    done = subprocess.run(["relion_stack_create", "--i", "External/job001/particles.star", "--o", "Check/restacked"],
                          cwd=proj, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with mrcfile.open(proj / "Check" / "restacked.mrcs") as m:
        theirs = np.array(m.data)
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        source = dparticles.open_particles("Select/job010/particles.star").images.values
    finally:
        os.chdir(cwd)
    assert np.array_equal(theirs, source)
