"""`python -m hpc_rlhf.submit --config configs/X.yaml --nodes N ...`: submit one SLURM job through submitit.

    python -m hpc_rlhf.submit --config configs/ppo_70b.yaml --nodes 6 --partition gpu --account proj --time 24:00:00
    python -m hpc_rlhf.submit --config configs/ppo_70b.yaml --nodes 6 --dry-run     # print the sbatch script only

The flags fill the config's `slurm` section (they win over the YAML, and the merged config is validated like any other);
`--section.key=value` overrides any other key. Every task of the job runs the same per-rank entry as the batch scripts
(`hpc_rlhf.launch.rank_main`), one task per GPU, and the job uses the same checkpoint-restart mechanism: submitit asks
SLURM for USR2 `slurm.signal_delay_s` seconds before the limit, every rank records it, the loop saves a checkpoint at the
next safe point and global rank 0 requeues the job. Before submitting: the layout must fill nodes x gpus-per-node, the
run directory must be writable, and it (and the model and data paths) should be on a file system every node sees.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from hpc_rlhf.cli import DEBUG_ENV, build_parser, run_entry
from hpc_rlhf.config.schema import Config, ConfigError
from hpc_rlhf.config.loading import LoadedConfig, config_to_dict, config_to_yaml, load_config
from hpc_rlhf.data.records import DatasetError, dataset_paths
from hpc_rlhf.slurm.filesystem import shared_path_problem, writable_dir_problem
from hpc_rlhf.slurm.job_spec import allocation_problems, node_count, parse_time_limit, time_limit_minutes, uses_gpus

SUBMITIT_FOLDER = "submitit"  # under the run directory: pickled entry, submission script, one log per task
CHECKPOINTS_FOLDER = "checkpoints"  # under the run directory, where the trainer saves and resumes
SLURM_FLAGS = (  # (flag, config key, type, help)
    ("--nodes", "slurm.nodes", str, "nodes of the job: N, or MIN-MAX for a job that may start on MIN to MAX "
                                    "nodes (sets slurm.min_nodes; needs layout.scale: proportional)"),
    ("--gpus-per-node", "slurm.gpus_per_node", int, "GPUs per node = ranks per node (processes per node on CPU)"),
    ("--cpus-per-task", "slurm.cpus_per_task", int, "CPU cores per rank"),
    ("--mem", "slurm.mem", str, "memory per node, e.g. 480G"),
    ("--partition", "slurm.partition", str, "partition"),
    ("--account", "slurm.account", str, "account to charge"),
    ("--qos", "slurm.qos", str, "quality of service"),
    ("--constraint", "slurm.constraint", str, "node feature constraint"),
    ("--time", "slurm.time", str, "time limit of one run, e.g. 24:00:00 (the job requeues itself before it)"),
    ("--job-name", "slurm.job_name", str, "job name"),
)
RL_INPUT_KEYS = ("actor.pretrain", "critic.pretrain", "ref.pretrain", "reward.pretrain", "data.prompt_data",
                 "eval.data")
SUPERVISED_INPUT_KEYS = ("actor.pretrain", "ref.pretrain", "data.dataset", "data.prompt_data", "eval.data",
                         "kd.teacher_pretrain")


def make_parser() -> argparse.ArgumentParser:
    """The entry's flags: the shared --config/--print-config/--help plus the allocation flags."""
    parser = build_parser("python -m hpc_rlhf.submit", __doc__.strip().splitlines()[0])
    group = parser.add_argument_group("allocation (each fills one key of the config's slurm section)")
    for flag, key, kind, text in SLURM_FLAGS:
        group.add_argument(flag, type=kind, default=None, metavar=key.split(".")[1].upper(), help=f"{text} ({key})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script submitit would write, then exit without submitting")
    parser.add_argument("--print-run-dir", action="store_true",
                        help="print the absolute run directory of the resolved config and exit (the batch scripts "
                             "use it)")
    return parser


def slurm_overrides(args: argparse.Namespace) -> list[str]:
    """The allocation flags that were given, as `--slurm.key=value` overrides."""
    overrides = []
    for flag, key, _, _ in SLURM_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides += node_range_overrides(value) if key == "slurm.nodes" else [f"--{key}={value}"]
    return overrides


def node_range_overrides(value: str) -> list[str]:
    """`--nodes 4` -> slurm.nodes=4 (slurm.min_nodes=0: exactly 4); `--nodes 2-6` -> min_nodes=2, nodes=6. A value
    that is neither passes through for the config's own error."""
    low, dash, high = value.partition("-")
    if dash and low.strip().isdigit() and high.strip().isdigit():
        return [f"--slurm.min_nodes={int(low)}", f"--slurm.nodes={int(high)}"]
    return [f"--slurm.nodes={value}", "--slurm.min_nodes=0"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, LoadedConfig]:
    """Flags and the validated config (YAML <- overrides <- allocation flags); a config error exits with status 2."""
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        loaded = load_config(args.config, [*rest, *slurm_overrides(args)])
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run_dir = Path(loaded.config.train.run_dir).expanduser().absolute()
    # the tasks and every requeued run must find the same directory, whatever their working directory
    loaded.config.train = replace(loaded.config.train, run_dir=str(run_dir))
    return args, loaded


@dataclass
class Preflight:
    """What the checks before submitting found: errors stop the submission, warnings are printed, and the checkpoint
    the job will resume from (None for a fresh run)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resume_from: Path | None = None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def preflight(cfg: Config) -> Preflight:
    """Check the allocation, the run directory and the paths the ranks will read, before anything is submitted."""
    found = Preflight(errors=allocation_problems(cfg.slurm))
    nodes = cfg.slurm.nodes
    run_dir = cfg.train.run_dir
    problem = writable_dir_problem(run_dir)
    if problem:
        found.errors.append(f"train.run_dir: {problem}")
    problem = shared_path_problem(run_dir, nodes)
    if problem:
        found.warnings.append(f"train.run_dir: {problem}; the ranks on other nodes will not see the rollouts and "
                              f"checkpoints")
    for key in RL_INPUT_KEYS if cfg.train.trainer == "ppo" else SUPERVISED_INPUT_KEYS:  # the paths the ranks read
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not isinstance(value, str) or not value:
            continue
        try:  # a data key may name several datasets (the readers' own rule); each is checked
            paths = [str(p) for p in dataset_paths(value)] if section in ("data", "eval") else [value]
        except DatasetError:
            continue  # a malformed list: the ranks' pre-flight names it in one line
        for path in (p for p in paths if _looks_like_path(p)):
            if not Path(path).expanduser().exists():
                found.warnings.append(f"{key}: {path} does not exist on this machine; every compute node must see it")
                continue
            problem = shared_path_problem(path, nodes)
            if problem:
                found.warnings.append(f"{key}: {problem}")
    found.resume_from, problem = resume_check(cfg)
    if problem:
        found.errors.append(problem)
    return found


def resume_check(cfg: Config) -> tuple[Path | None, str | None]:
    """The checkpoint the job would resume from, and why it cannot (a config that differs in fingerprinted fields),
    found now rather than after the job has waited in the queue."""
    root = Path(cfg.train.run_dir) / CHECKPOINTS_FOLDER
    if not cfg.ckpt.load_checkpoint or not root.is_dir():
        return None, None
    from hpc_rlhf.run.checkpoint import IncompatibleCheckpointError, config_fingerprint, latest_checkpoint, read_metadata

    path = latest_checkpoint(root)
    if path is None:
        return None, None
    meta = read_metadata(path)
    current = config_fingerprint(config_to_dict(cfg))
    if meta.get("config_fingerprint") == str(current):
        return path, None
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    differences = {key: (saved.get(key, "<absent>"), current.fields.get(key, "<absent>"))
                   for key in sorted(set(saved) | set(current.fields))
                   if saved.get(key, "<absent>") != current.fields.get(key, "<absent>")}
    error = IncompatibleCheckpointError(path, differences, str(meta.get("config_fingerprint")), str(current))
    return path, f"train.run_dir: {error}"


def submitit_folder(cfg: Config) -> Path:
    """Where submitit keeps the pickled entry, the submission script and one log per task: RUN_DIR/submitit."""
    return Path(cfg.train.run_dir) / SUBMITIT_FOLDER


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """`SlurmExecutor.update_parameters` keywords for the config's allocation (sbatch options in submitit's names)."""
    slurm = cfg.slurm
    additional: dict[str, Any] = {"requeue": True}  # the job may go back to the queue under its id and resume
    if slurm.mem:
        additional["mem"] = slurm.mem  # submitit's own `mem` wants gigabytes as a number; pass SLURM's form through
    params: dict[str, Any] = {
        "job_name": slurm.job_name,
        "nodes": slurm.nodes if node_count(slurm) == str(slurm.nodes) else node_count(slurm),  # "2-6": a range
        "ntasks_per_node": slurm.gpus_per_node,  # one task (rank) per GPU
        "cpus_per_task": slurm.cpus_per_task,
        "time": time_limit_minutes(slurm.time),
        "signal_delay_s": slurm.signal_delay_s,  # submitit asks for --signal=USR2@this, delivered to every task
        "setup": [*slurm.setup, 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"'],
        "stderr_to_stdout": True,  # one log per task to follow
        # some SLURM releases do not hand sbatch's --cpus-per-task to srun
        "srun_args": [f"--cpus-per-task={slurm.cpus_per_task}", "--kill-on-bad-exit=1"],
        "additional_parameters": additional,
    }
    if uses_gpus(cfg):
        params["gpus_per_node"] = slurm.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    if slurm.exclusive:
        params["exclusive"] = True
    return params


def submitit_command(folder: Path) -> str:
    """The command submitit's script runs in every task (as submitit 1.5's SlurmExecutor builds it)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_submitit_script(cfg: Config) -> str:
    """The sbatch script `submit` would hand to SLURM (submitit's own renderer; works without SLURM installed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(cfg)
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **executor_parameters(cfg))


@dataclass(frozen=True)
class RankEntry:
    """What every task of the job runs: this rank's part of the job described by `cfg` (pickled by submitit)."""

    cfg: Config

    def __call__(self) -> dict[str, float]:
        # launch first: importing it installs the stop handlers before torch loads (replacing submitit's)
        from hpc_rlhf.launch import rank_main
        from hpc_rlhf.distributed import detect_world

        return rank_main(detect_world(), self.cfg)

    def checkpoint(self) -> None:
        """submitit's hook for a USR2 that arrives before our handlers exist: requeue with a prompt restart."""
        from hpc_rlhf.slurm import requeue_promptly_and_exit

        requeue_promptly_and_exit(self.cfg.slurm.max_requeue)


@dataclass(frozen=True)
class Submitted:
    """A submitted job: its id and where to look."""

    job_id: str
    run_dir: Path
    folder: Path
    num_tasks: int

    def log_path(self, task: int) -> Path:
        """The log of one task (stdout and stderr; every run of the job appends to it)."""
        return self.folder / f"{self.job_id}_{task}_log.out"


def submit(loaded: LoadedConfig, *, overwrite_run_dir: bool = False) -> Submitted:
    """Write the run directory (refused when it holds another run, unless `overwrite_run_dir`), then submit one job
    whose tasks all run `RankEntry(cfg)`."""
    import submitit

    from hpc_rlhf.launch import prepare_run_dir

    cfg = loaded.config
    prepare_run_dir(loaded, overwrite=overwrite_run_dir)
    folder = submitit_folder(cfg)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**executor_parameters(cfg))
    # Pickle the entry by reference to this module, also when it runs as `python -m` (as __main__ it would be
    # pickled by value): the tasks import hpc_rlhf anyway.
    from hpc_rlhf.submit import RankEntry as entry

    job = executor.submit(entry(cfg))
    return Submitted(job_id=str(job.job_id), run_dir=Path(cfg.train.run_dir), folder=folder,
                     num_tasks=cfg.slurm.nodes * cfg.slurm.gpus_per_node)


def how_to_follow(job: Submitted, cfg: Config) -> str:
    """What to print after submitting: the job, its logs, and the commands to watch, stop and resume it."""
    slurm = cfg.slurm
    last = job.num_tasks - 1
    return "\n".join([
        f"submitted job {job.job_id}: {slurm.job_name}, {node_count(slurm)} node(s) x {slurm.gpus_per_node} rank(s), "
        f"time limit {slurm.time} ({parse_time_limit(slurm.time)} s) per run",
        f"  run dir   {job.run_dir}",
        f"  logs      {job.log_path(0)}   (rank 0; rank R writes {job.job_id}_R_log.out, up to R={last})",
        f"  follow    squeue -j {job.job_id}",
        f"            tail -f {job.log_path(0)}",
        f"  metrics   {job.run_dir / 'metrics.jsonl'}",
        f"  stop      scancel --signal=USR2 {job.job_id}   # checkpoint, requeue, resume",
        f"  cancel    scancel {job.job_id}   # submit the same command again to resume from the last checkpoint",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Check, then submit (or print the script); 0 when submitted or printed cleanly, 2 when a check failed; any
    other error is one line (--debug or HPC_RLHF_DEBUG=1 for its traceback)."""
    return run_entry("python -m hpc_rlhf.submit", lambda: _checked_submit(argv))


def _checked_submit(argv: Sequence[str] | None) -> int:
    args, loaded = parse_args(argv)
    cfg = loaded.config
    if args.print_run_dir:
        print(cfg.train.run_dir)
        return 0
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    found = preflight(cfg)
    for warning in found.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        for error in found.errors:
            print(f"error (submitting would stop here): {error}", file=sys.stderr)
        print(render_submitit_script(cfg), end="")
        return 2 if found.errors else 0
    missing = [program for program in ("sbatch", "srun") if shutil.which(program) is None]
    if missing:
        found.errors.append(f"{' and '.join(missing)} not found on PATH: submit from a SLURM login node "
                            f"(--dry-run prints the script anywhere)")
    if found.errors:
        print("python -m hpc_rlhf.submit: not submitted:\n  - " + "\n  - ".join(found.errors), file=sys.stderr)
        return 2
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        job = submit(loaded, overwrite_run_dir=args.overwrite_run_dir)
    except (FailedJobError, FailedSubmissionError, OSError) as err:  # sbatch's refusal, with its message
        print(f"python -m hpc_rlhf.submit: sbatch did not accept the job: {err}", file=sys.stderr)
        return 1
    print(how_to_follow(job, cfg))
    if found.resume_from is not None:
        print(f"  resumes   from {found.resume_from}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
