#!/usr/bin/env bash
# Restack a particle set inside one SLURM allocation, or with worker jobs from dask-jobqueue.
#
#   sbatch deploy/sbatch-restack.sh INPUT OUT_DIR [extra dparticles restack options...]
#
# MODE=allocation (default): the scheduler runs in this job, `srun` starts one single-threaded
#   Dask worker per task of the allocation (on any of its nodes), and dparticles connects through
#   the scheduler file. Size it with the #SBATCH lines below or on the sbatch command line
#   (sbatch --ntasks=16 ...): one core and 4 GB per task by default; more tasks scale out.
# MODE=jobqueue: dparticles runs in this job with `--jobqueue slurm --jobs WORKER_JOBS` and submits
#   worker jobs of its own (profile: deploy/jobqueue-slurm.yaml in the dask config); it logs
#   pending worker jobs with SLURM's reason and gives up after dparticles.cluster.start-timeout.
#   This job then needs one task and 1-2 cores: sbatch --ntasks=1 --cpus-per-task=2 ...
# Settings: MODE, WORKER_JOBS (jobqueue mode, default 4), DASK_INTERFACE (network interface for
#   scheduler and workers, e.g. ib0; default: the node's hostname address), DPARTICLES (command,
#   default "dparticles"). The scheduler file lives in the submit folder, which must be on a file
#   system that all nodes share; worker scratch goes to node-local $TMPDIR.
#SBATCH --job-name=dparticles-restack
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=4G
#SBATCH --time=02:00:00
#SBATCH --output=dparticles-restack-%j.log
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: sbatch $0 INPUT OUT_DIR [options...]" >&2; exit 2; }
INPUT="$1" OUT="$2"; shift 2
MODE="${MODE:-allocation}"
DPARTICLES="${DPARTICLES:-dparticles}"
case "$MODE" in allocation|jobqueue) ;; *) echo "MODE must be allocation or jobqueue, not $MODE" >&2; exit 2 ;; esac
if [ "$MODE" = jobqueue ]; then
  # dparticles holds the worker jobs' scheduler and cancels its jobs when it ends (scancel of this job too)
  if [ -n "${DASK_INTERFACE:-}" ]; then export DASK_JOBQUEUE__SLURM__INTERFACE="$DASK_INTERFACE"; fi
  exec "$DPARTICLES" restack "$INPUT" --out "$OUT" --jobqueue slurm --jobs "${WORKER_JOBS:-4}" "$@"
fi
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

# MODE=allocation; dashboard on the node's loopback only: ssh -L 8787:127.0.0.1:8787 <node>
python -m distributed.cli.dask_scheduler --scheduler-file "$SCHED_FILE" "${IFACE_ARGS[@]}" \
  --dashboard-address 127.0.0.1:8787 > "$WORK/scheduler.log" 2>&1 &
PIDS+=($!)
wait_for_file "$SCHED_FILE"
srun --ntasks="${SLURM_NTASKS:-1}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 \
  python -m distributed.cli.dask_worker --scheduler-file "$SCHED_FILE" "${IFACE_ARGS[@]}" \
  --nthreads "${SLURM_CPUS_PER_TASK:-1}" --memory-limit "$(( ${SLURM_MEM_PER_CPU:-4096} * ${SLURM_CPUS_PER_TASK:-1} ))MiB" \
  --local-directory "$SCRATCH" > "$WORK/workers.log" 2>&1 &
PIDS+=($!)

"$DPARTICLES" restack "$INPUT" --out "$OUT" --scheduler-file "$SCHED_FILE" "$@"
