"""Stand-in for the `dparticles` command in tests of deploy/sbatch-restack.sh: takes the same
arguments as `dparticles restack`, connects through the scheduler file and runs tasks there."""

import argparse
import json
import sys
from pathlib import Path

from dparticles.cluster import cluster_client, run_tasks

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("input")
    p.add_argument("--out", required=True)
    p.add_argument("--scheduler-file", required=True)
    a = p.parse_args()
    with cluster_client(scheduler_file=a.scheduler_file) as client:
        results, summary = run_tasks(client, sum, [(range(i, i + 1000),) for i in range(8)], label=a.command)
        n_workers = len(client.scheduler_info()["workers"])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "result.json").write_text(json.dumps({"argv": sys.argv[1:], "results": results,
                                                          "n_workers": n_workers, "summary": str(summary)}))
