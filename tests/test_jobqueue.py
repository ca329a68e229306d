"""dask-jobqueue clusters without a batch system (:mod:`dparticles.jobqueue`): the profiles in deploy/,
jobqueue arguments and durations checked before anything is submitted, and ``squeue`` / ``qstat -f``
output read into job states and described with the batch system's reasons. Real SLURM jobs are
tests/hpc/test_jobqueue_slurm.py.
"""

from __future__ import annotations

from pathlib import Path

import dask
import pytest
import yaml

from dparticles import jobqueue
from dparticles.cluster import cluster_client
from dparticles.errors import ParticleError

REPO = Path(__file__).resolve().parents[1]


def test_deploy_jobqueue_profiles_make_job_scripts():
    """The dask-jobqueue profiles in deploy/ load and render a job script for their scheduler."""
    jq = pytest.importorskip("dask_jobqueue")
    for name, job_cls, directive in [("slurm", jq.slurm.SLURMJob, "#SBATCH"), ("pbs", jq.pbs.PBSJob, "#PBS")]:
        profile = yaml.safe_load((REPO / "deploy" / f"jobqueue-{name}.yaml").read_text())["jobqueue"][name]
        with dask.config.set({f"jobqueue.{name}.{k}": v for k, v in profile.items()}):   # merged as a site file is
            script = job_cls(scheduler="tcp://127.0.0.1:8786", name="w", python="python").job_script()
        assert directive in script and "distributed.cli.dask_worker" in script


@pytest.mark.parametrize("kwargs,match", [
    ({"jobqueue": "lsf"}, "jobqueue must be one of slurm, pbs"),
    ({"jobqueue": "slurm", "jobs": 0}, "jobs must be a whole number"),
    ({"queue": "debug"}, "queue: unknown cluster keywords"),
    ({"jobqueue": "slurm", "scheduler": "tcp://127.0.0.1:1"}, "not both"),
])
def test_bad_jobqueue_arguments_fail_before_anything_is_submitted(kwargs, match):
    with pytest.raises(ParticleError, match=match):
        with cluster_client(log=lambda m: None, **kwargs):
            pass


def test_bad_durations_in_the_config_are_named(monkeypatch):
    with dask.config.set({"dparticles.cluster.start-timeout": "soon"}):
        with pytest.raises(ParticleError, match="start-timeout must be a positive duration.*cluster.start-timeout"):
            with cluster_client(jobqueue="slurm", log=lambda m: None):
                pass


def test_squeue_and_qstat_output_become_states_and_reasons():
    assert jobqueue._parse_squeue("17 PENDING PartitionConfig\n18 RUNNING None\n") == {
        "17": ("PENDING", "PartitionConfig"), "18": ("RUNNING", "None")}
    qstat = ("Job Id: 4242.pbs01\n    Job_Name = dparticles-worker\n    job_state = Q\n"
             "    comment = Not Running: Insufficient amount of resource: ncpus (R: 4 A: 1 T\n"
             "\t: 1)\n    queue = workq\n\n"
             "Job Id: 4243.pbs01\n    job_state = R\n")
    states = jobqueue._parse_qstat(qstat)
    assert states == {"4242": ("PENDING", "Not Running: Insufficient amount of resource: ncpus (R: 4 A: 1 T: 1)"),
                      "4243": ("RUNNING", "None")}
    text = jobqueue._describe_jobs("pbs", ["4242", "4243", "4244"], states, "4 cores")
    assert text == ("1 job pending (Not Running: Insufficient amount of resource: ncpus (R: 4 A: 1 T: 1)), "
                    "1 job running, no worker connected yet, 1 job no longer in the queue")
    slurm = jobqueue._describe_jobs("slurm", ["1", "2"], {"1": ("PENDING", "Priority"),
                                                                "2": ("PENDING", "QOSMaxJobsPerUserLimit")}, "x")
    assert slurm == ("1 job pending (Priority: other jobs come first), 1 job pending (QOSMaxJobsPerUserLimit: "
                     "a limit of your account or QOS; ask for fewer or smaller jobs)")
    assert jobqueue._describe_jobs("slurm", ["1"], None, "x") == "1 job submitted (squeue not available here to say more)"
    assert jobqueue._ended({"1": ("COMPLETED", "None")}, ["1", "2"])
    assert not jobqueue._ended({"1": ("PENDING", "Resources")}, ["1", "2"])
    assert not jobqueue._ended(None, ["1"])
