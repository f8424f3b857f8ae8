#!/bin/bash
# Knowledge distillation on a CPU: a random tiny student learns the arithmetic-warmed tiny teacher's distributions.
#   python tools/make_preference_data.py data/arithmetic_supervised   # once: writes the held-out rows
#   python -m hpc_rlhf.train --config configs/kd_tiny.yaml
# The student goes to runs/kd_tiny/hf/actor; eval/kd_loss is the held-out distillation loss.
#
# sbatch/kd_tiny.sh: the distillation job on one CPU node.
#
# Written by tools/make_sbatch.py from configs/kd_tiny.yaml and the overrides below: edit the config and run the tool again
# (`python tools/make_sbatch.py --check` fails while this file and the config disagree).
#
# Submit from the repository root (relative paths below start there); arguments reach every rank:
#   mkdir -p logs && sbatch sbatch/kd_tiny.sh [--section.key=value ...]
#   squeue -j JOBID                          # state; reason BeginTime while a requeued run waits
#   tail -f logs/kd_tiny_JOBID.out           # every run of the job appends here
#   scancel --signal=USR1 --batch JOBID      # stop early: checkpoint, requeue, resume
# docs/slurm.md explains the options, the requeue and the logs.

# shown by squeue; %x in the log file name
#SBATCH --job-name=kd_tiny
# 1 node x 1 process = the 1 rank of the layout (colocated: every rank is generator, actor)
#SBATCH --nodes=1
# one task (one rank, one torch.distributed process) each; train.device is cpu: no GPUs
#SBATCH --ntasks-per-node=1
# cores per rank: tokenisation, data loading, DeepSpeed's CPU optimizer
#SBATCH --cpus-per-task=2
# the limit of one run; the job checkpoints and requeues itself before it
#SBATCH --time=00:30:00
# may go back to the queue under its id (scontrol requeue, preemption, node failure) and resume
#SBATCH --requeue
# USR1 to this batch shell (B:) 60 s before the limit: one safe point plus a checkpoint must fit
#SBATCH --signal=B:USR1@60
# every run of a requeued job appends to the log instead of overwriting it
#SBATCH --open-mode=append
# stdout and stderr of all ranks; the folder must exist before the job starts
#SBATCH --output=logs/%x_%j.out

# First of all, the stop trap: USR1 (see --signal above, or `scancel --signal=USR1 --batch`) writes
# RUN_DIR/.stop_requested (a USR1 before RUN_DIR is known is remembered and written once it is);
# every rank sees the flag at its next safe point, the job saves a checkpoint and requeues itself, and the
# next run resumes from it. A file instead of a forwarded signal: it cannot kill a rank that is still
# starting, and NCCL may claim USR1. A shell without its trap would die of USR1, so nothing comes before it.
STOP_FLAG=""
STOP_PENDING=""
request_stop() {
  if [ -z "$STOP_FLAG" ]; then STOP_PENDING=1; return; fi
  printf "%s %s\n" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" > "$STOP_FLAG.tmp.$$" && mv -f "$STOP_FLAG.tmp.$$" "$STOP_FLAG"
}
trap request_stop USR1
# Restarts the script itself may ask for (slurm.max_requeue) when a rank died of a stop signal in its first
# instant, before it could catch it.
MAX_REQUEUE=20

set -uo pipefail  # not -e: the wait loop below must see srun's status, and the trap's interruptions

# Environment of every rank (slurm.setup in the config): modules, the Python environment, exports.
# (none set: put `module load ...` or `source /shared/venv/bin/activate` here through slurm.setup)
# One OpenMP pool per rank, sized to its cores.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# A failed collective aborts the process instead of hanging until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Multi-node NCCL: uncomment what your site needs (docs/slurm.md, section Multi-node NCCL).
# export NCCL_DEBUG=INFO              # print the transports and NICs NCCL picked (WARN once it works)
# export NCCL_SOCKET_IFNAME=ib0       # the interface for NCCL's bootstrap and socket traffic (or ^lo,docker)
# export GLOO_SOCKET_IFNAME=ib0       # the same for gloo, which carries the control plane
# export NCCL_IB_HCA=mlx5_0,mlx5_1    # the InfiniBand / RoCE adapters to use (leave out storage NICs)
# export NCCL_IB_GID_INDEX=3          # RoCE v2 on many Ethernet fabrics

# The layout and settings of this job on top of the config; arguments given to sbatch come after and win.
set -- \
  --slurm.exclusive=false \
  --slurm.signal_delay_s=60 \
  --slurm.job_name=kd_tiny \
  "$@"
# The run directory (train.run_dir after the overrides, checked now): rollouts, checkpoints, the stop flag.
# Every node must see it: a shared file system, not /tmp.
RUN_DIR="$(python -m hpc_rlhf.submit --config configs/kd_tiny.yaml --print-run-dir "$@")" || exit 1
mkdir -p "$RUN_DIR"
# From here on the trap writes the flag; a USR1 that came earlier is written now.
STOP_FLAG="$RUN_DIR"/.stop_requested
export HPC_RLHF_STOP_FLAG="$STOP_FLAG"  # a rank that catches USR1/USR2 writes the flag there too
if [ -n "$STOP_PENDING" ]; then request_stop; fi

# Every rank runs under rank_guard: a USR1/USR2 sent to the tasks (`scancel --signal=USR1 JOBID`) becomes the
# stop flag from the task's first instant, before Python could catch it.
rank_guard() {
  trap request_stop USR1 USR2
  trap : TERM
  "$@" &
  local pid=$!
  while true; do wait "$pid"; local status=$?; kill -0 "$pid" 2>/dev/null || return "$status"; done
}
export -f request_stop rank_guard
export STOP_FLAG STOP_PENDING
# One rank per task. srun runs in the background so that the trap can run; the loop waits for it to really
# end. --cpus-per-task: some SLURM releases do not hand sbatch's value to srun. --kill-on-bad-exit: one rank
# failing ends the step instead of leaving the others waiting. --label: lines start with the rank. After it:
# a step that failed after a stop request (a rank killed by USR1/USR2 before it could catch it) requeues
# the job from here, and a finished job removes a stop flag that came too late to matter.
srun --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 --label bash -c 'rank_guard "$@"' rank python -m hpc_rlhf.launch --config configs/kd_tiny.yaml "$@" &
SRUN_PID=$!
while true; do wait "$SRUN_PID"; STATUS=$?; kill -0 "$SRUN_PID" 2>/dev/null || break; done
STOPPED=""  # asked to stop: the flag of this run exists (written by the trap or by a rank), or USR1/USR2
[ "$STATUS" -eq 138 ] || [ "$STATUS" -eq 140 ] && STOPPED=1  # killed a rank (srun returns 128 + signal)
[ -n "${STOP_FLAG:-}" ] && grep -qx "${SLURM_JOB_ID:-} ${SLURM_RESTART_COUNT:-0}" "$STOP_FLAG" 2>/dev/null && STOPPED=1
# a rank ended by a signal (status > 128, not a Python error) after a stop request: requeue, as rank 0 would
if [ "$STATUS" -gt 128 ] && [ -n "$STOPPED" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUE:-0}" ]; then
  echo "the step failed (exit $STATUS) after a stop request, probably a rank that was still starting: requeueing" >&2
  trap '' TERM  # SLURM answers the requeue with SIGTERM
  scontrol requeue "$SLURM_JOB_ID" && scontrol update JobId="$SLURM_JOB_ID" StartTime=now+10
elif [ "$STATUS" -eq 0 ] && [ -n "${STOP_FLAG:-}" ]; then
  rm -f "$STOP_FLAG"  # the stop came after the last iteration: nothing is left to stop
fi
exit "$STATUS"
