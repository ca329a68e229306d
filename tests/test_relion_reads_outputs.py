"""RELION 3.1 itself reads what dparticles writes: our particles.star and stacks, restacked and
downsampled, go through RELION's own STAR and MRC readers and come out with the same images and values."""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
from helpers import REAL

from dparticles.dataset import open_particles
from dparticles.jobs.downsample import downsample
from dparticles.jobs.importer import import_particles
from dparticles.jobs.restack import restack

SELECT = REAL / "relion31_sim_ribo70S_b128" / "Select" / "job010" / "particles.star"
pytestmark = [pytest.mark.relion,
              pytest.mark.skipif(shutil.which("relion_stack_create") is None,
                                 reason="RELION 3.1 (relion_stack_create, relion_star_handler) is not on PATH; "
                                        "install the Debian package relion, as .ci/run does"),
              pytest.mark.skipif(not SELECT.is_file(), reason=f"real test data not found at {REAL}")]


def quiet(*_: object) -> None:
    pass


@pytest.fixture(params=[False, True], ids=["in-process", "processes"])
def cluster(request) -> dict:
    """One worker, on a thread of this process (the default) or as a process of its own."""
    return {"n_workers": 1, "processes": request.param}


def _relion(*args: object, cwd) -> None:
    run = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_relion_reads_restacked_particles_bit_for_bit(tmp_path, cluster):
    out = tmp_path / "restacked"
    restack(SELECT, out, batch_size=100, cluster=cluster, log=quiet)
    # RELION gathers every particle named in our particles.star from our stacks into one stack
    _relion("relion_stack_create", "--i", "particles.star", "--o", tmp_path / "relion", "--one_by_one", cwd=out)
    with mrcfile.open(tmp_path / "relion.mrcs", permissive=True) as mrc:
        relion = np.array(mrc.data)
    ours = open_particles(SELECT).images.values
    assert relion.shape == ours.shape == (284, 128, 128)
    assert relion.tobytes() == ours.tobytes()


def test_relion_reads_downsampled_metadata_as_written(tmp_path, cluster):
    out = tmp_path / "small"
    downsample(SELECT, out, fourier_box=64, recenter=True, micrograph_pixel_size=0.7, batch_size=100,
               cluster=cluster, log=quiet)
    _relion("relion_star_handler", "--i", "particles.star", "--o", tmp_path / "relion.star", cwd=out)
    relion = starfile.read(tmp_path / "relion.star", always_dict=True)
    ours = starfile.read(out / "particles.star", always_dict=True)
    assert relion["optics"]["rlnImagePixelSize"].tolist() == [5.6]
    assert relion["optics"]["rlnImageSize"].tolist() == [64]
    assert len(relion["particles"]) == 284
    assert (relion["particles"]["rlnOriginXAngst"] == 0).all()
    np.testing.assert_allclose(relion["particles"]["rlnCoordinateX"], ours["particles"]["rlnCoordinateX"], rtol=1e-6)
    assert relion["particles"]["rlnImageName"].tolist() == ours["particles"]["rlnImageName"].tolist()
    _relion("relion_stack_create", "--i", "particles.star", "--o", tmp_path / "relion", "--one_by_one", cwd=out)
    with mrcfile.open(tmp_path / "relion.mrcs", permissive=True) as mrc:
        assert np.array(mrc.data).tobytes() == open_particles(out).images.values.tobytes()


def test_relion_run_from_the_project_directory_reads_our_outputs(tmp_path, monkeypatch, cluster):
    """RELION resolves image names relative to the project directory it runs in; our outputs inside
    a project name their stacks that way (the current directory by default), so RELION finds them."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    import_particles(SELECT, "Import/job005")
    restack("Import/job005", "Restack/job020", batch_size=100, cluster=cluster, log=quiet)
    downsample("Restack/job020/particles.star", "Downsample/job021", fourier_box=64, batch_size=100,
               cluster=cluster, log=quiet)
    names = starfile.read(project / "Restack/job020/particles.star")["particles"]["rlnImageName"]
    assert names.iloc[0] == "000001@Restack/job020/stacks/batch_000000.mrcs"
    ours = {"Import/job005": open_particles(SELECT).images.values,
            "Restack/job020": open_particles(SELECT).images.values,
            "Downsample/job021": open_particles(project / "Downsample/job021").images.values}
    for job, images in ours.items():
        _relion("relion_stack_create", "--i", f"{job}/particles.star", "--o", f"{job}/relion", "--one_by_one",
                cwd=project)
        with mrcfile.open(project / job / "relion.mrcs", permissive=True) as mrc:
            assert np.array(mrc.data).tobytes() == images.tobytes(), job
