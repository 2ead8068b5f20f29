# Shared by every sbatch script in slurm/: environment, a job header in the
# log, and requeue after a preemption checkpoint. Sourced from the repository
# root (sbatch runs a spooled copy of the script, in the submit directory).

# 128 + SIGTERM: what chexnet_jax.main exits with after saving a checkpoint on
# SIGTERM (chexnet_jax/training/train.py PREEMPTED_EXIT_CODE); tests check they agree.
CHEXNET_PREEMPTED_EXIT_CODE=143

source "${CHEXNET_ENV:-slurm/env.sh}" || exit 1
# Unbuffered: lines of 16 tasks reach logs/%x-%j.out as they happen, and the
# last words of a crashed task are not lost.
export PYTHONUNBUFFERED=1
# Slurm 22.05+ srun no longer inherits sbatch's --cpus-per-task: without this
# every task (and its grain workers) would be pinned to one CPU.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi

echo "=== $(date -Is) job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) restart" \
  "${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s) [${SLURM_JOB_NODELIST}]," \
  "${SLURM_NTASKS:-1} task(s), python $(command -v python)," \
  "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# Slurm preemption also signals this batch shell. Without a trap bash dies at
# once and the requeue below never runs; with one, bash waits for srun (whose
# tasks are checkpointing) and then goes on.
trap 'echo "$(date -Is) batch script: SIGTERM, waiting for the tasks to checkpoint" >&2' TERM

# Requeues the job when the tasks exited after a preemption checkpoint; the
# requeued job (same id, same --workdir) resumes from it. Exits with `rc`.
finish_or_requeue() {
  local rc="$1"
  if [[ "$rc" == "$CHEXNET_PREEMPTED_EXIT_CODE" ]]; then
    echo "$(date -Is) tasks saved a checkpoint after SIGTERM: requeueing job ${SLURM_JOB_ID}"
    # Fails harmlessly when Slurm's own preemption already requeues the job.
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed (rc=$?)" >&2
  fi
  echo "=== $(date -Is) job ${SLURM_JOB_ID} step exited with ${rc}"
  exit "$rc"
}

# Every srun in slurm/ passes --kill-on-bad-exit=1: when one task fails (a
# dead peer, the step watchdog, an error), Slurm ends the others, including one
# that hangs or is stopped, instead of leaving the job RUNNING until its limit.

# The body of every train_*.sbatch: trains CONFIG into $WORKDIR (default:
# DEFAULT_WORKDIR), resuming from its latest checkpoint, with the script's
# arguments passed on (--config.FIELD=VALUE ...); requeues after a preemption.
train_and_requeue() {
  local config="$1" default_workdir="$2"
  shift 2
  local rc=0
  srun --kill-on-bad-exit=1 python -m chexnet_jax.main --config "$config" \
    --workdir "${WORKDIR:-$default_workdir}" "$@" || rc=$?
  finish_or_requeue "$rc"
}
