"""Write the batch scripts in sbatch/ from their configs, or check that they still match (`--check`, run by the tests).

    python tools/make_sbatch.py            # (re)write sbatch/*.sh
    python tools/make_sbatch.py --check    # exit 1 and show a diff for every script that differs from its config

Each script is rendered by `hpc_rlhf.slurm.batch_script.render_batch_script` from configs/<name>.yaml (its #SBATCH
options come from the config's slurm section, its header from the config's leading comments), so editing a config and
running this tool is the only way the scripts change.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from hpc_rlhf.config.schema import ConfigError  # noqa: E402
from hpc_rlhf.config.loading import load_config  # noqa: E402
from hpc_rlhf.slurm.batch_script import BatchScriptSpec, config_header, render_batch_script  # noqa: E402

SCRIPTS = (
    BatchScriptSpec("ppo_70b", "configs/ppo_70b.yaml"),
    BatchScriptSpec("grpo_7b", "configs/grpo_7b.yaml"),
    BatchScriptSpec("reinforce_baseline_1node", "configs/reinforce_baseline_1node.yaml"),
    BatchScriptSpec("colocated_8gpu", "configs/colocated_8gpu.yaml"),
    BatchScriptSpec("ppo_7b_8gpu", "configs/ppo_7b_8gpu.yaml"),
    # The tiny CPU task spread over three nodes: one generator and two actor ranks, one per node. The tests submit it
    # to the local SLURM cluster; it also shows a CPU-only job (no GPUs requested). Two actor ranks split each
    # optimizer step, so the micro-batch is half the config's (train_batch_size must stay a multiple of 2 x it).
    BatchScriptSpec(
        "tiny_cpu_3node", "configs/tiny_cpu.yaml",
        overrides=("--layout.colocate=false", "--layout.generator.gpus=1", "--layout.actor.gpus=2",
                   "--train.micro_train_batch_size=16", "--slurm.nodes=3", "--slurm.gpus_per_node=1", "--slurm.cpus_per_task=1",
                   "--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=tiny_cpu_3node",
                   "--train.run_dir=runs/tiny_cpu_3node"),
        description=("",
                     "sbatch/tiny_cpu_3node.sh: the same job as a disaggregated 3-node layout on CPUs (generator 1, actor 2,",
                     "one rank per node).")),
    # Small CPU jobs of the supervised trainers (docs/supervised.md): every rank is an actor.
    BatchScriptSpec(
        "sft_tiny_2node", "configs/sft_tiny.yaml",
        overrides=("--layout.generator.gpus=2", "--layout.actor.gpus=2", "--slurm.nodes=2", "--slurm.gpus_per_node=1",
                   "--slurm.cpus_per_task=1", "--slurm.exclusive=false", "--slurm.signal_delay_s=60",
                   "--slurm.job_name=sft_tiny_2node", "--train.run_dir=runs/sft_tiny_2node"),
        description=("", "sbatch/sft_tiny_2node.sh: the same SFT as two data-parallel CPU ranks, one per node.")),
    BatchScriptSpec(
        "rm_tiny", "configs/rm_tiny.yaml",
        overrides=("--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=rm_tiny"),
        description=("", "sbatch/rm_tiny.sh: the reward model job on one CPU node.")),
    BatchScriptSpec(
        "dpo_tiny_2rank", "configs/dpo_tiny.yaml",
        overrides=("--layout.generator.gpus=2", "--layout.actor.gpus=2", "--slurm.gpus_per_node=2",
                   "--train.micro_train_batch_size=8", "--slurm.cpus_per_task=1", "--slurm.exclusive=false",
                   "--slurm.signal_delay_s=60", "--slurm.job_name=dpo_tiny_2rank",
                   "--train.run_dir=runs/dpo_tiny_2rank"),
        description=("", "sbatch/dpo_tiny_2rank.sh: DPO with two data-parallel CPU ranks on one node.")),
    BatchScriptSpec(
        "iterative_dpo_tiny", "configs/iterative_dpo_tiny.yaml",
        overrides=("--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=iterative_dpo_tiny"),
        description=("", "sbatch/iterative_dpo_tiny.sh: iterative DPO (sample, score, pair, train) on one CPU node.")),
    BatchScriptSpec(
        "kto_tiny", "configs/kto_tiny.yaml",
        overrides=("--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=kto_tiny"),
        description=("", "sbatch/kto_tiny.sh: the KTO job on one CPU node.")),
    BatchScriptSpec(
        "prm_tiny", "configs/prm_tiny.yaml",
        overrides=("--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=prm_tiny"),
        description=("", "sbatch/prm_tiny.sh: the process reward model job on one CPU node.")),
    BatchScriptSpec(
        "kd_tiny", "configs/kd_tiny.yaml",
        overrides=("--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=kd_tiny"),
        description=("", "sbatch/kd_tiny.sh: the distillation job on one CPU node.")),
    BatchScriptSpec(
        "rejection_sampling_tiny", "configs/rejection_sampling_tiny.yaml",
        overrides=("--slurm.exclusive=false", "--slurm.signal_delay_s=60", "--slurm.job_name=rejection_sampling_tiny"),
        description=("", "sbatch/rejection_sampling_tiny.sh: best-of-N sampling and RAFT fine-tuning on one CPU "
                         "node.")),
)


def render(spec: BatchScriptSpec, root: Path = REPO_ROOT) -> str:
    """The script text for `spec`, from the config under `root` (raises ConfigError naming the config)."""
    config_path = root / spec.config_path
    loaded = load_config(config_path, spec.overrides)
    return render_batch_script(spec, loaded.config, config_header(config_path.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when a script differs")
    parser.add_argument("--sbatch-dir", type=Path, default=REPO_ROOT / "sbatch",
                        help="where the scripts are (default: sbatch/ of this checkout)")
    args = parser.parse_args(argv)

    stale = []
    for spec in SCRIPTS:
        try:
            text = render(spec)
        except ConfigError as err:
            print(f"{spec.config_path}: {err}", file=sys.stderr)
            return 2
        path = args.sbatch_dir / f"{spec.name}.sh"
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(path)
            diff = difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                        fromfile=f"{path} (committed)", tofile=f"{path} (from {spec.config_path})")
            sys.stdout.writelines(diff)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        print(f"wrote {path}")
    known = {f"{spec.name}.sh" for spec in SCRIPTS}
    unknown = sorted(path for path in args.sbatch_dir.glob("*.sh") if path.name not in known)
    if unknown:  # a script written by hand or by an older spec would drift from its config unnoticed
        print(f"not generated by this tool: {', '.join(map(str, unknown))}; add a BatchScriptSpec to SCRIPTS in "
              f"tools/make_sbatch.py (or delete the script)", file=sys.stderr)
    if stale:
        names = ", ".join(str(p) for p in stale)
        print(f"out of date: {names}; run `python tools/make_sbatch.py` and commit the result", file=sys.stderr)
    return 1 if stale or (unknown and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
