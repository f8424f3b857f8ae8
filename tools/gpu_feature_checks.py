"""The GPU checks of the training-loop features whose CPU tests cannot show what matters on GPUs (NCCL collectives,
bf16, vLLM): short real jobs, each compared with its reference run, one JSON line per check.

    python tools/gpu_feature_checks.py one-gpu OUT    # MoE loss, LoRA actor, vision prompts, dynamic sampling,
                                                      # universal-checkpoint resume (one GPU)
    python tools/gpu_feature_checks.py two-gpu OUT    # sequence parallelism and AutoTP, 2 ranks against 1; a LoRA
                                                      # actor broadcasting merged weights to a generator over NCCL
    python tools/gpu_feature_checks.py one-gpu OUT --device cpu   # the same jobs on the CPU (to try the tool)

OUT/checks.jsonl gets one line per check: its name, whether it passed, the figures it compared and the run folders.
The generator backend is vLLM where it is installed, else the hf engine (the line says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--rollout.batch_size=4", "--rollout.n_samples_per_prompt=4", "--rollout.generate_max_len=32",
          "--train.train_batch_size=16", "--train.micro_train_batch_size=8", "--train.max_iterations=4",
          "--eval.data=", "--logger.use_tensorboard=false", "--logger.plot=false", "--logger.progress_bar=false",
          "--actor.lr_warmup_ratio=0", "--ckpt.save_hf_model=false"]
COLOUR_REWARD = '''
def reward_func(queries, prompts, labels, **_):
    rewards = [1.0 if label in query[len(prompt):] else 0.0 for query, prompt, label in zip(queries, prompts, labels)]
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
'''


def backend() -> str:
    """vllm where it can be imported, else hf."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def train(run_dir: Path, device: str, *overrides: str, config: str = "configs/tiny_cpu.yaml") -> list[dict]:
    """Run one job to the end in a fresh run directory and return its metrics rows; raise with its log tail if it
    fails."""
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [sys.executable, "-m", "hpc_rlhf.train", "--config", config, f"--train.device={device}",
            f"--train.run_dir={run_dir}", *COMMON, *overrides]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    (run_dir.parent / f"{run_dir.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed ({result.returncode}): {(result.stdout + result.stderr)[-2000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trained(rows: list[dict], key: str) -> list[float]:
    """`key` of every row that trained the actor, in step order."""
    return [row[key] for row in sorted(rows, key=lambda r: r["step"]) if "train/policy_loss" in row and key in row]


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) > 0 and all(math.isclose(x, y, rel_tol=rel, abs_tol=rel) for x, y in zip(a, b))


def check_moe(out: Path, device: str) -> dict:
    rows = train(out / "moe", device, "--actor.pretrain=builtin:tiny-moe", "--actor.aux_loss_coef=0.01",
                 f"--vllm.backend={backend()}")
    aux = trained(rows, "train/aux_loss")
    return {"passed": len(aux) == 4 and all(math.isfinite(a) and a > 0 for a in aux), "aux_loss": aux}


def check_lora(out: Path, device: str) -> dict:
    """Generator log-probs of a LoRA actor's merged weights against the actor's own (train/rollout_kl near 0)."""
    rows = train(out / "lora", device, "--lora.rank=8", "--lora.alpha=16", "--algo.off_policy_correction=tis",
                 f"--vllm.backend={backend()}", "--actor.learning_rate=1e-4")
    gap = trained(rows, "train/rollout_kl")
    return {"passed": len(gap) == 4 and all(abs(g) < 2e-2 for g in gap), "rollout_kl": gap}


def check_vision(out: Path, device: str) -> dict:
    data = out / "colours"
    data.mkdir(parents=True, exist_ok=True)
    colours = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    for name, rgb in colours.items():
        Image.new("RGB", (20, 20), rgb).save(data / f"{name}.png")
    (data / "colours.jsonl").write_text("".join(
        json.dumps({"input": "Which colour is this image?", "label": name, "images": [f"{name}.png"]}) + "\n"
        for name in colours for _ in range(4)))
    (data / "reward.py").write_text(COLOUR_REWARD)
    rows = train(out / "vision", device, "--actor.pretrain=builtin:tiny-vlm",
                 f"--data.prompt_data={data}/colours.jsonl",
                 "--data.input_key=input", "--data.label_key=label", "--data.apply_chat_template=true",
                 "--data.max_images_per_prompt=1", f"--reward.reward_func_path={data}/reward.py",
                 "--rollout.prompt_max_len=128",
                 "--algo.off_policy_correction=tis", f"--vllm.backend={backend()}")
    gap = trained(rows, "train/rollout_kl")
    return {"passed": len(gap) >= 2 and all(abs(g) < 2e-2 for g in gap), "rollout_kl": gap}


def check_dynamic_sampling(out: Path, device: str) -> dict:
    rows = train(out / "dapo", device, "--rollout.dynamic_filtering=true", f"--vllm.backend={backend()}",
                 "--actor.pretrain=builtin:tiny-llama-arith")
    kept = [row["generate/filter_groups_kept"] for row in rows if "generate/filter_groups_kept" in row]
    capped = [row["generate/filter_capped"] for row in rows if "generate/filter_capped" in row]
    full = [k == 4 for k, c in zip(kept, capped) if not c]
    return {"passed": bool(kept) and all(full), "groups_kept": kept, "capped": capped}


def check_universal_resume(out: Path, device: str) -> dict:
    """Two iterations, then the rest resumed through DeepSpeed's universal checkpoint (bf16 on GPUs), against one
    uninterrupted run."""
    whole = train(out / "universal_whole", device, "--ds.zero_stage=2", "--ckpt.save_steps=2")
    run = out / "universal_split"
    train(run, device, "--ds.zero_stage=2", "--ckpt.save_steps=2", "--train.max_iterations=2")
    args = [sys.executable, "-m", "hpc_rlhf.train", "--config", "configs/tiny_cpu.yaml", f"--train.device={device}",
            f"--train.run_dir={run}", *COMMON, "--ds.zero_stage=2", "--ckpt.save_steps=2", "--ds.universal_ckpt=true"]
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    split = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    a, b = trained(whole, "train/grad_norm"), trained(split, "train/grad_norm")
    return {"passed": close(a, b, 1e-2), "grad_norm_uninterrupted": a, "grad_norm_resumed": b}


def check_sequence_parallel(out: Path, device: str) -> dict:
    base = ["--train.packing_samples=true", "--layout.colocate=true", f"--vllm.backend={backend()}",
            "--actor.attn_implementation=sdpa", "--rollout.generate_max_len=256"]
    one = train(out / "sp1", device, *base, "--layout.actor.gpus=1", "--layout.generator.gpus=1",
                "--slurm.gpus_per_node=1")
    two = train(out / "sp2", device, *base, "--layout.actor.gpus=2", "--layout.generator.gpus=2",
                "--slurm.gpus_per_node=2", "--ds.ring_attn_size=2", "--rollout.batch_size=4")
    # the two jobs draw different samples (one engine against two), so this compares time, not values: exactness
    # (2 ranks == 1 rank on the same micro-batches) is what tests/training/test_training_sequence_parallel.py shows
    a, b = trained(one, "train/policy_loss"), trained(two, "train/policy_loss")
    return {"passed": len(a) == len(b) == 4 and all(math.isfinite(x) for x in a + b),
            "iteration_s": [trained(one, "time/iteration_s"), trained(two, "time/iteration_s")]}


def check_autotp(out: Path, device: str) -> dict:
    base = ["--train.max_iterations=20", "--eval.steps=10", "--ds.zero_stage=2"]
    one = train(out / "tp1", device, *base, "--layout.actor.gpus=1", "--layout.generator.gpus=1",
                "--slurm.gpus_per_node=1", config="configs/sft_tiny.yaml")
    two = train(out / "tp2", device, *base, "--layout.actor.gpus=2", "--layout.generator.gpus=2",
                "--slurm.gpus_per_node=2", "--ds.tensor_parallel_size=2", config="configs/sft_tiny.yaml")
    loss = [[row["train/loss"] for row in rows if "train/loss" in row] for rows in (one, two)]
    return {"passed": close(loss[0], loss[1], 5e-2), "one_rank": loss[0], "two_ranks": loss[1]}


def check_lora_broadcast(out: Path, device: str) -> dict:
    rows = train(out / "lora_nccl", device, "--lora.rank=8", "--lora.alpha=16", "--layout.colocate=false",
                 "--layout.actor.gpus=1", "--layout.generator.gpus=1", "--slurm.gpus_per_node=2",
                 "--algo.off_policy_correction=tis", f"--vllm.backend={backend()}")
    gap = trained(rows, "train/rollout_kl")
    return {"passed": len(gap) == 4 and all(abs(g) < 2e-2 for g in gap), "rollout_kl": gap}


SUITES = {
    "one-gpu": [check_moe, check_lora, check_vision, check_dynamic_sampling, check_universal_resume],
    "two-gpu": [check_sequence_parallel, check_autotp, check_lora_broadcast],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    with (args.out / "checks.jsonl").open("a") as log:
        for check in SUITES[args.suite]:
            started = time.monotonic()
            try:
                result = check(args.out, args.device)
            except (RuntimeError, subprocess.CalledProcessError) as err:
                result = {"passed": False, "error": str(err)[-2000:]}
            line = {"check": check.__name__.removeprefix("check_"), "device": args.device, "backend": backend(),
                    "seconds": round(time.monotonic() - started, 1), **result}
            failed += not line["passed"]
            print(json.dumps(line), flush=True)
            log.write(json.dumps(line) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
