"""Golden runs: short GRPO, PPO, SFT and DPO trainings on the CPU whose numbers a refactor must reproduce bit for bit.

    python tools/record_golden.py                  # rerun every golden run, rewrite this CPU's recording
    python tools/record_golden.py --check          # rerun and compare with the recording (exit 1 on a difference)
    python tools/record_golden.py --check --runs ppo sft

Each run is `python -m hpc_rlhf.train` on the CPU with the tiny built-in models (real gloo processes, DeepSpeed, hf
generation), from a config in configs/ plus the overrides below. What is kept of a run: every row of metrics.jsonl
(each value as its repr string, so nothing is rounded), a sha256 per iteration of the rollout shards' rows, and a
sha256 per saved model in RUN_DIR/hf over its tensors (name, dtype, shape, bytes, in name order).
tests/golden/test_golden_runs.py reruns the runs with the code of the checkout and compares (`differences`).

Re-record only when a change of the numbers is intended, and say why in the commit message. The numbers belong to
the CPU kernels torch and MKL dispatch to and the pinned torch, so there is one recording per kernel set,
tests/golden/golden_runs_<kernel set>.json, each noting its environment. The kernel set is torch's CPU capability
(`torch.backends.cpu.get_cpu_capability()`: AVX512, AVX2, ...), with "-amx" on CPUs with AMX tiles (Sapphire Rapids
and later), whose AVX-512 runs round differently from older AVX-512 CPUs; a CPU of a kernel set without a recording
records it from an unchanged commit first (the test skips until then).
A change that is meant to change the numbers re-records every kernel set it can reach and says which it could not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.ipc as ipc
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "golden"
RECORD_COMMAND = "python tools/record_golden.py"
# Metrics that measure the clock, not the training: they differ from run to run and are left out.
TIMING_PREFIXES = ("time/", "throughput/")
# Whatever a run needs for run-to-run bit identity: one intra-op thread per rank (the reduction order of a kernel
# depends on its thread count), fixed hash seeds, no GPU, and no SLURM variables leaking into the local launcher.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1", "HPC_RLHF_DEBUG": "1"}
COMMON = (
    "--train.device=cpu", "--train.seed=1", "--ds.zero_stage=2", "--actor.attn_implementation=eager",
    "--logger.use_tensorboard=false", "--logger.plot=false", "--logger.progress_bar=false",
    "--ckpt.save_hf_model=true", "--ckpt.save_steps=0", "--actor.lr_warmup_ratio=0",
)
RL_SMALL = (  # 4 prompts x 4 samples per iteration, two optimizer steps of 8 samples, up to 6 response tokens
    "--rollout.batch_size=4", "--rollout.n_samples_per_prompt=4", "--rollout.generate_max_len=6",
    "--rollout.micro_batch_size=16", "--train.train_batch_size=8", "--train.micro_train_batch_size=4",
    "--train.max_iterations=4", "--eval.steps=2", "--eval.max_samples=8",
)


@dataclass(frozen=True)
class GoldenRun:
    """One golden run: a config in configs/, the overrides that make it short, and the ranks it starts."""

    name: str
    config: str
    overrides: tuple[str, ...]
    ranks: int

    def command(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "hpc_rlhf.train", "--config", str(REPO / self.config), *COMMON,
                *self.overrides, f"--slurm.gpus_per_node={self.ranks}", f"--train.run_dir={run_dir}"]


RUNS = (
    # GRPO, colocated on 2 data-parallel ranks (ZeRO-2), KL loss against a reference, greedy eval every 2 iterations.
    GoldenRun("grpo", "configs/tiny_cpu.yaml", (
        *RL_SMALL, "--algo.advantage_estimator=group_norm", "--algo.use_kl_loss=true", "--algo.kl_loss_coef=0.01",
        "--algo.kl_estimator=k3", "--layout.actor.gpus=2", "--layout.generator.gpus=2", "--layout.reference.gpus=2",
    ), ranks=2),
    # PPO with a critic, disaggregated on 3 ranks: generator, actor, critic (+ the reference on the critic's rank);
    # KL penalty in the reward, weights sent from the actor to the generator every iteration.
    GoldenRun("ppo", "configs/tiny_cpu.yaml", (
        *RL_SMALL, "--algo.advantage_estimator=gae", "--algo.init_kl_coef=0.01", "--critic.learning_rate=1e-3",
        "--critic.attn_implementation=eager", "--layout.colocate=false", "--layout.generator.gpus=1",
        "--layout.actor.gpus=1", "--layout.critic.gpus=1", "--layout.reference.gpus=1",
        "--layout.reference.share_with=critic",
    ), ranks=3),
    # SFT on one process (the single-rank path of the launcher), packed samples, held-out loss every 3 steps.
    GoldenRun("sft", "configs/sft_tiny.yaml", (
        "--train.max_iterations=6", "--eval.steps=3", "--eval.max_samples=16",
    ), ranks=1),
    # DPO on 2 data-parallel ranks, reference = the initial policy, held-out loss and accuracy every 3 steps.
    GoldenRun("dpo", "configs/dpo_tiny.yaml", (
        "--train.max_iterations=6", "--eval.steps=3", "--eval.max_samples=16", "--layout.actor.gpus=2",
        "--layout.generator.gpus=2",
    ), ranks=2),
)


def exact(value: object) -> str:
    """A metric value as the string that round-trips it exactly (numbers as float repr; null stays 'None')."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return repr(value)


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl, in file order, without the timing metrics: its step, and the values as exact
    strings."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            values = {key: exact(value) for key, value in sorted(row.items())
                      if key != "step" and not key.startswith(TIMING_PREFIXES)}
            rows.append({"step": row.get("step"), **values})
    return rows


def rollout_digests(run_dir: Path) -> list[str]:
    """sha256 per iteration over the rows of its rollout shards (every .arrow file, in name order)."""
    digests = []
    for iteration in sorted((run_dir / "rollouts").glob("iter_*")):
        digest = hashlib.sha256()
        for shard in sorted(iteration.glob("*.arrow")):
            with ipc.open_file(shard) as reader:
                rows = reader.read_all().to_pylist()
            digest.update(shard.name.encode() + b"\0" + json.dumps(rows, sort_keys=True).encode() + b"\0")
        digests.append(digest.hexdigest())
    return digests


def safetensors_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """{name: (dtype, shape, raw bytes)} of a .safetensors file, read from its documented layout (no framework)."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    body = data[8 + header_len:]
    return {name: (spec["dtype"], spec["shape"], body[spec["data_offsets"][0]:spec["data_offsets"][1]])
            for name, spec in header.items() if name != "__metadata__"}


def weights_digest(model_dir: Path) -> str:
    """sha256 over a saved model's tensors in name order: name, dtype, shape, bytes."""
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(safetensors_tensors(file))
    if not tensors:
        raise RuntimeError(f"{model_dir}: no .safetensors weights")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        digest.update(f"{name}\0{dtype}\0{shape}\0".encode() + raw)
    return digest.hexdigest()


def run_env() -> dict[str, str]:
    """The environment of a golden run: this one without SLURM's variables, plus RUN_ENV and this checkout's code."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(RUN_ENV, PYTHONPATH=str(REPO))
    return env


def check_imported_code(env: dict[str, str]) -> None:
    """Fail unless the runs import hpc_rlhf from this checkout (an editable install may point at another one)."""
    where = subprocess.run([sys.executable, "-c", "import hpc_rlhf; print(hpc_rlhf.__file__)"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if Path(where).resolve() != REPO / "hpc_rlhf" / "__init__.py":
        raise RuntimeError(f"the golden runs would import hpc_rlhf from {where}, not from {REPO}")


def run_golden(run: GoldenRun, workdir: Path) -> dict:
    """Run one golden run in workdir/<name> and return what is compared: metrics, rollouts, weights."""
    run_dir = workdir / run.name
    env = run_env()
    check_imported_code(env)
    done = subprocess.run(run.command(run_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"golden run {run.name} failed ({done.returncode}): {' '.join(run.command(run_dir))}\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
    result: dict = {"metrics": metric_rows(run_dir)}
    if (run_dir / "rollouts").is_dir():
        result["rollouts_sha256"] = rollout_digests(run_dir)
    result["weights_sha256"] = {model.name: weights_digest(model)
                                for model in sorted((run_dir / "hf").iterdir()) if model.is_dir()}
    return result


def differences(name: str, recorded: dict, fresh: dict, limit: int = 12) -> list[str]:
    """What differs between a recorded run and a fresh one, one line each naming the step and metric (or model)."""
    out = []
    old_rows, new_rows = recorded["metrics"], fresh["metrics"]
    if len(old_rows) != len(new_rows):
        out.append(f"{name}: metrics.jsonl has {len(new_rows)} rows, the recording {len(old_rows)}")
    for old, new in zip(old_rows, new_rows):
        step = old["step"]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{name}: step {step} {key}: recorded {old.get(key, '(absent)')}, "
                           f"now {new.get(key, '(absent)')}")
    old_rollouts, new_rollouts = recorded.get("rollouts_sha256", []), fresh.get("rollouts_sha256", [])
    if len(old_rollouts) != len(new_rollouts):
        out.append(f"{name}: {len(new_rollouts)} rollout iterations, the recording {len(old_rollouts)}")
    for iteration, (old, new) in enumerate(zip(old_rollouts, new_rollouts)):
        if old != new:
            out.append(f"{name}: rollouts of iteration {iteration} differ (tokens, log-probs, rewards or values)")
    old_weights, new_weights = recorded["weights_sha256"], fresh["weights_sha256"]
    for model in sorted(set(old_weights) | set(new_weights)):
        if old_weights.get(model) != new_weights.get(model):
            out.append(f"{name}: final weights of hf/{model} differ: recorded sha256 {old_weights.get(model)}, "
                       f"now {new_weights.get(model)}")
    return out[:limit] + ([f"{name}: ... and {len(out) - limit} more"] if len(out) > limit else [])


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def kernel_set() -> str:
    """This machine's CPU kernel set: torch's capability, plus "-amx" where the CPU has AMX tiles."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{capability}-amx" if "amx_tile" in cpu_flags() else capability


def environment() -> dict[str, str]:
    """Where the numbers were recorded (they depend on the CPU kernels and library versions)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel_set": kernel_set()}


def recorded_kernel_set(golden: dict) -> str:
    """The kernel set a recording belongs to (recordings made before kernel sets had a name: the capability)."""
    return golden["environment"].get("kernel_set", golden["environment"]["cpu_capability"])


def golden_file(name: Optional[str] = None) -> Path:
    """The recording for a CPU kernel set (default: this machine's)."""
    return GOLDEN_DIR / f"golden_runs_{(name or kernel_set()).lower()}.json"


def load_golden(path: Optional[Path] = None) -> dict:
    return json.loads((path or golden_file()).read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=[run.name for run in RUNS], help="only these runs")
    parser.add_argument("--check", action="store_true", help="compare with the recording instead of writing it")
    parser.add_argument("--out", type=Path, default=golden_file(),
                        help="the recording (default: this CPU's, %(default)s)")
    args = parser.parse_args(argv)
    chosen = [run for run in RUNS if not args.runs or run.name in args.runs]
    golden = load_golden(args.out) if args.check or args.runs else {"environment": {}, "runs": {}}
    problems = []
    with tempfile.TemporaryDirectory(prefix="golden_") as workdir:
        for run in chosen:
            start = time.monotonic()
            fresh = run_golden(run, Path(workdir))
            print(f"{run.name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
            if args.check:
                problems += differences(run.name, golden["runs"][run.name], fresh)
            else:
                golden["runs"][run.name] = fresh
    if args.check:
        print("\n".join(problems) or "every golden run matches the recording", file=sys.stderr)
        return 1 if problems else 0
    golden["environment"] = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
