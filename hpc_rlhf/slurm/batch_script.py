"""Readable batch scripts (`sbatch sbatch/X.sh`) rendered from a config, with a comment on every choice.

A script is the config's `#SBATCH` options (`hpc_rlhf.slurm.job_spec`), its `slurm.setup` lines, NCCL hints, the stop
trap and one background `srun` of the per-rank entry (`hpc_rlhf.slurm.requeue`), so plain sbatch users and
`python -m hpc_rlhf.submit` share one entry and one checkpoint-restart mechanism. tools/make_sbatch.py writes the
shipped scripts and checks that they still match their configs.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from hpc_rlhf.config.schema import Config
from hpc_rlhf.slurm.job_spec import sbatch_options
from hpc_rlhf.slurm.requeue import (
    RANK_GUARD,
    STOP_FLAG_NAME,
    rank_guard_lines,
    requeue_limit_lines,
    srun_wait_lines,
    stop_flag_ready_lines,
    stop_trap_lines,
)

NCCL_HINTS = (
    ("NCCL_DEBUG=INFO", "print the transports and NICs NCCL picked (WARN once it works)"),
    ("NCCL_SOCKET_IFNAME=ib0", "the interface for NCCL's bootstrap and socket traffic (or ^lo,docker)"),
    ("GLOO_SOCKET_IFNAME=ib0", "the same for gloo, which carries the control plane"),
    ("NCCL_IB_HCA=mlx5_0,mlx5_1", "the InfiniBand / RoCE adapters to use (leave out storage NICs)"),
    ("NCCL_IB_GID_INDEX=3", "RoCE v2 on many Ethernet fabrics"),
)


@dataclass(frozen=True)
class BatchScriptSpec:
    """One shipped script: sbatch/<name>.sh runs <config_path> with `overrides` before the user's own arguments."""

    name: str
    config_path: str  # relative to the repository root, where the job is submitted from
    overrides: tuple[str, ...] = field(default_factory=tuple)
    description: tuple[str, ...] = field(default_factory=tuple)  # extra header lines (the config's own come first)

    @property
    def script_path(self) -> str:
        return f"sbatch/{self.name}.sh"


def config_header(yaml_text: str) -> list[str]:
    """The comment lines at the top of a YAML config (its description), without the leading '# '."""
    lines = []
    for line in yaml_text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    return lines


def _comment(text: str) -> str:
    return f"# {text}" if text else "#"


def render_batch_script(spec: BatchScriptSpec, cfg: Config, header: Sequence[str] = ()) -> str:
    """The text of sbatch/<spec.name>.sh for `cfg` (the config at spec.config_path with spec.overrides applied)."""
    slurm = cfg.slurm
    lines = ["#!/bin/bash", *map(_comment, [*header, *spec.description])]
    lines += [
        "#",
        f"# Written by tools/make_sbatch.py from {spec.config_path}"
        + (" and the overrides below" if spec.overrides else "") + ": edit the config and run the tool again",
        "# (`python tools/make_sbatch.py --check` fails while this file and the config disagree).",
        "#",
        "# Submit from the repository root (relative paths below start there); arguments reach every rank:",
        f"#   mkdir -p logs && sbatch {spec.script_path} [--section.key=value ...]",
        "#   squeue -j JOBID                          # state; reason BeginTime while a requeued run waits",
        f"{'#   tail -f logs/' + slurm.job_name + '_JOBID.out':<44} # every run of the job appends here",
        "#   scancel --signal=USR1 --batch JOBID      # stop early: checkpoint, requeue, resume",
        "# docs/slurm.md explains the options, the requeue and the logs.",
        "",
    ]
    for option in sbatch_options(cfg):  # sbatch reads #SBATCH lines up to the first command; comments may sit between
        lines += [_comment(option.why), f"#SBATCH {option.flag()}"]
    lines += [
        "",
        "# First of all, the stop trap: USR1 (see --signal above, or `scancel --signal=USR1 --batch`) writes",
        f"# RUN_DIR/{STOP_FLAG_NAME} (a USR1 before RUN_DIR is known is remembered and written once it is);",
        "# every rank sees the flag at its next safe point, the job saves a checkpoint and requeues itself, and the",
        "# next run resumes from it. A file instead of a forwarded signal: it cannot kill a rank that is still",
        "# starting, and NCCL may claim USR1. A shell without its trap would die of USR1, so nothing comes before it.",
        *stop_trap_lines(),
        "# Restarts the script itself may ask for (slurm.max_requeue) when a rank died of a stop signal in its first",
        "# instant, before it could catch it.",
        *requeue_limit_lines(slurm.max_requeue),
        "",
        "set -uo pipefail  # not -e: the wait loop below must see srun's status, and the trap's interruptions",
        "",
    ]
    lines.append("# Environment of every rank (slurm.setup in the config): modules, the Python environment, exports.")
    lines += list(slurm.setup) or ["# (none set: put `module load ...` or `source /shared/venv/bin/activate` here "
                                   "through slurm.setup)"]
    lines += [
        "# One OpenMP pool per rank, sized to its cores.",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "# A failed collective aborts the process instead of hanging until the time limit.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "# Multi-node NCCL: uncomment what your site needs (docs/slurm.md, section Multi-node NCCL).",
        *(f"# export {setting:<28} # {why}" for setting, why in NCCL_HINTS),
        "",
    ]
    config = shlex.quote(spec.config_path)
    if spec.overrides:
        lines += ["# The layout and settings of this job on top of the config; arguments given to sbatch come after "
                  "and win.",
                  "set -- \\", *(f"  {shlex.quote(o)} \\" for o in spec.overrides), '  "$@"']
    lines += [
        "# The run directory (train.run_dir after the overrides, checked now): rollouts, checkpoints, the stop flag.",
        "# Every node must see it: a shared file system, not /tmp.",
        f'RUN_DIR="$(python -m hpc_rlhf.submit --config {config} --print-run-dir "$@")" || exit 1',
        'mkdir -p "$RUN_DIR"',
        "# From here on the trap writes the flag; a USR1 that came earlier is written now.",
        *stop_flag_ready_lines(),
        "",
        "# Every rank runs under rank_guard: a USR1/USR2 sent to the tasks (`scancel --signal=USR1 JOBID`) becomes the",
        "# stop flag from the task's first instant, before Python could catch it.",
        *rank_guard_lines(),
        "# One rank per task. srun runs in the background so that the trap can run; the loop waits for it to really",
        "# end. --cpus-per-task: some SLURM releases do not hand sbatch's value to srun. --kill-on-bad-exit: one rank",
        "# failing ends the step instead of leaving the others waiting. --label: lines start with the rank. After it:",
        "# a step that failed after a stop request (a rank killed by USR1/USR2 before it could catch it) requeues",
        "# the job from here, and a finished job removes a stop flag that came too late to matter.",
        *srun_wait_lines('srun --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 --label '
                         f'{RANK_GUARD} python -m hpc_rlhf.launch --config {config} "$@"'),
    ]
    return "\n".join(lines) + "\n"
