#!/usr/bin/env bash
# Restack a particle set inside one SLURM allocation, or with worker jobs from dask-jobqueue.
#
#   sbatch deploy/sbatch-restack.sh INPUT OUT_DIR [extra dparticles restack options...]
#
# MODE=allocation (default): the scheduler runs in this job, `srun` starts one Dask worker per
#   task of the allocation (any number of nodes), and dparticles connects through the
#   scheduler file. Size it with the #SBATCH lines below.
# MODE=jobqueue: this job only holds a SLURMCluster (profile: deploy/jobqueue-slurm.yaml in the
#   dask config) that submits WORKER_JOBS worker jobs of its own; this job needs 1-2 cores.
# Settings: MODE, WORKER_JOBS (jobqueue mode, default 4), DASK_INTERFACE (network interface for
#   scheduler and workers, e.g. ib0; default: the node's hostname address), DPARTICLES (command,
#   default "dparticles"). The scheduler file lives in the submit folder, which must be on a file
#   system that all nodes share; worker scratch goes to node-local $TMPDIR.
#SBATCH --job-name=dparticles-restack
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=4
#SBATCH --mem-per-cpu=4G
#SBATCH --time=02:00:00
#SBATCH --output=dparticles-restack-%j.log
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: sbatch $0 INPUT OUT_DIR [options...]" >&2; exit 2; }
INPUT="$1" OUT="$2"; shift 2
MODE="${MODE:-allocation}"
DPARTICLES="${DPARTICLES:-dparticles}"
WORK="${SLURM_SUBMIT_DIR:-$PWD}/dask-${SLURM_JOB_ID:-$$}"     # shared: scheduler file and logs
SCRATCH="${TMPDIR:-/tmp}/dask-${SLURM_JOB_ID:-$$}"            # node-local: spilling
SCHED_FILE="$WORK/scheduler.json"
mkdir -p "$WORK" "$SCRATCH"
IFACE_ARGS=(); [ -n "${DASK_INTERFACE:-}" ] && IFACE_ARGS=(--interface "$DASK_INTERFACE")
PIDS=()
cleanup() {   # stop only what this script started, then its scratch
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$SCRATCH"
}
trap cleanup EXIT

wait_for_file() {
  for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.2; done
  echo "no scheduler file $1 after 120 s; see $WORK" >&2; return 1
}

case "$MODE" in
  allocation)
    # dashboard on the node's loopback only: ssh -L 8787:127.0.0.1:8787 <node>
    python -m distributed.cli.dask_scheduler --scheduler-file "$SCHED_FILE" "${IFACE_ARGS[@]}" \
      --dashboard-address 127.0.0.1:8787 > "$WORK/scheduler.log" 2>&1 &
    PIDS+=($!)
    wait_for_file "$SCHED_FILE"
    srun --ntasks="${SLURM_NTASKS:-1}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 \
      python -m distributed.cli.dask_worker --scheduler-file "$SCHED_FILE" "${IFACE_ARGS[@]}" \
      --nthreads "${SLURM_CPUS_PER_TASK:-1}" --memory-limit "$(( ${SLURM_MEM_PER_CPU:-4096} * ${SLURM_CPUS_PER_TASK:-1} ))MiB" \
      --local-directory "$SCRATCH" > "$WORK/workers.log" 2>&1 &
    PIDS+=($!)
    ;;
  jobqueue)
    # the cluster object must live as long as the run: hold it in a background python
    python - "$SCHED_FILE" "${WORKER_JOBS:-4}" > "$WORK/cluster.log" 2>&1 <<'PY' &
import signal, sys, time
from dask_jobqueue import SLURMCluster
cluster = SLURMCluster(scheduler_options={"scheduler_file": sys.argv[1]})   # rest from jobqueue.slurm config
cluster.adapt(minimum_jobs=int(sys.argv[2]), maximum_jobs=int(sys.argv[2]))  # replace pre-empted jobs
print(cluster.job_script(), flush=True)
signal.signal(signal.SIGTERM, lambda *_: (cluster.close(), sys.exit(0)))
while True:
    time.sleep(60)
PY
    PIDS+=($!)
    wait_for_file "$SCHED_FILE"
    ;;
  *) echo "MODE must be allocation or jobqueue, not $MODE" >&2; exit 2 ;;
esac

"$DPARTICLES" restack "$INPUT" --out "$OUT" --scheduler-file "$SCHED_FILE" "$@"
