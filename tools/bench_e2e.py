"""End-to-end RL iteration benchmark: builds a random model of a real architecture's shape, runs N iterations of
hpc_rlhf's GRPO or PPO through the ordinary entry point, and prints per-phase throughput beside each phase's limit.

    python tools/bench_e2e.py --algo grpo --shape qwen2.5-0.5b --iterations 4 --out grpo.json
    python tools/bench_e2e.py --algo ppo --shape tiny --device cpu --iterations 2       # the CPU smoke setting

Each run is `python -m hpc_rlhf.train` with a generated config; the table comes from the run's metrics.jsonl (phase
times of every iteration after `--warmup`, median over iterations). GRPO: generation, reference forward (KL loss),
actor old-log-prob forward and update. PPO adds a reward model (a sequence classification head on the same random
model), a critic forward and a critic update. Limits: decode from bytes per step over the measured copy bandwidth,
forward/training from FLOPs over the measured bf16 matmul rate (`--ceilings FILE` from `hpc_rlhf.benchmarks.ceilings`,
measured in the same job when omitted). MFU = model FLOPs / measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpc_rlhf.benchmarks import flops  # noqa: E402
from hpc_rlhf.benchmarks.report import markdown_table, phase_shares  # noqa: E402
from hpc_rlhf.benchmarks.task import model_shape, prepare_task  # noqa: E402

# Phase -> (seconds key, tokens key or None) in the merged metrics (`time/...`, `count/...` as logged).
PHASES = {
    "trainer_offload": ("time/trainer_offload_s", None),
    "wake": ("time/generator_wake_s", None),
    "generate": ("time/generate_engine_s", "generate_tokens"),
    "reward_fn": ("time/reward_fn_s", None),
    "reward_model": ("time/reward_model_s", "reward_model_tokens"),
    "reference": ("time/reference_s", "reference_tokens"),
    "critic_forward": ("time/critic_forward_s", "critic_forward_tokens"),
    "critic_update": ("time/critic_train_s", "critic_train_tokens"),
    "actor_logprob": ("time/actor_logprob_s", "actor_logprob_tokens"),
    "actor_update": ("time/actor_update_s", "train_tokens"),
    "sleep": ("time/generator_sleep_s", None),
    "trainer_reload": ("time/trainer_reload_s", None),
    "weight_sync": ("time/weight_sync_s", None),
    "wait_generation": ("time/wait_generation_s", None),  # colocated async: the update done, generation not yet
    "shard_write": ("time/shard_write_s", None),
    "shard_read": ("time/shard_read_s", None),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algo", choices=("grpo", "ppo"), default="grpo")
    p.add_argument("--shape", default="qwen2.5-0.5b", help="model shape (hpc_rlhf.benchmarks.task.MODEL_SHAPES)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation backend")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="leading iterations left out of the medians")
    p.add_argument("--rollout-batch-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=512)
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16, help="training / forward micro-batch (samples)")
    p.add_argument("--gen-micro-batch-size", type=int, default=512, help="sequences per hf generate call")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--layout", choices=("colocated", "disaggregated"), default="colocated")
    p.add_argument("--gpus", type=int, default=1, help="colocated: ranks; disaggregated: generator + actor GPUs")
    p.add_argument("--async-queue", type=int, default=0,
                   help="rollout.async_queue; colocated, 1 generates in a thread beside the update (engine kept awake)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--max-num-seqs", type=int, default=256, help="vllm: sequences decoded at once")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-kl", action="store_true",
                   help="grpo without the KL loss, so without a reference model (TRL's default beta=0)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/hpc_rlhf_bench")
    p.add_argument("--ceilings", help="JSON from hpc_rlhf.benchmarks.ceilings (measured now when omitted)")
    p.add_argument("--limits-only", action="store_true",
                   help="print the phases' physical limits for these settings and exit (no run); takes the ceilings "
                        "from --ceilings or from --peak-tflops and --bandwidth-tbs")
    p.add_argument("--peak-tflops", type=float, help="bf16 matmul rate for --limits-only")
    p.add_argument("--bandwidth-tbs", type=float, help="device copy bandwidth (read + write) for --limits-only")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="another config override of the run (repeatable), e.g. --set train.max_epochs=2")
    p.add_argument("--out", help="write the full results (settings, per-iteration metrics, table) as JSON")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is stopped")
    return p.parse_args(argv)


def layout_overrides(args: argparse.Namespace) -> list[str]:
    """Role placement: every role on every rank (colocated) or generator GPUs apart from trainer GPUs."""
    ppo = args.algo == "ppo"
    roles = ["generator", "actor"] + ([] if args.no_kl else ["reference"]) + (["critic", "reward"] if ppo else [])
    node = [f"--slurm.gpus_per_node={args.gpus}"]
    if args.layout == "colocated":
        awake = ["--vllm.enable_sleep=false"] if args.async_queue else []  # colocated async keeps both halves resident
        return ["--layout.colocate=true", *node, *awake] + [f"--layout.{r}.gpus={args.gpus}" for r in roles]
    if args.gpus < 2 or ppo or not args.no_kl:
        raise SystemExit("--layout disaggregated is measured with --algo grpo --no-kl on --gpus >= 2: half the GPUs "
                         "generate, the other half train (PPO's extra roles would need GPUs of their own)")
    gen = args.gpus // 2
    return ["--layout.colocate=false", *node, f"--layout.generator.gpus={gen}",
            f"--layout.actor.gpus={args.gpus - gen}", "--layout.reference.gpus=0"]


def run_config(args: argparse.Namespace, model_dir: Path, prompts: Path, run_dir: Path) -> list[str]:
    """The `python -m hpc_rlhf.train` overrides of one benchmark run."""
    ppo = args.algo == "ppo"
    if ppo and args.no_kl:
        raise SystemExit("--no-kl is for grpo (the ppo setting has a reward model, a critic and a KL penalty)")
    total_prompts = args.rollout_batch_size * args.iterations
    overrides = [
        f"--actor.pretrain={model_dir}", f"--actor.learning_rate={args.lr}", "--actor.lr_warmup_ratio=0.0",
        "--actor.lr_scheduler=constant_with_warmup",
        f"--actor.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "--actor.attn_implementation=sdpa",
        f"--vllm.backend={args.backend}", f"--vllm.gpu_memory_utilization={args.gpu_memory_utilization}",
        f"--vllm.max_num_seqs={args.max_num_seqs}",
        f"--rollout.batch_size={args.rollout_batch_size}", f"--rollout.n_samples_per_prompt={args.n_samples}",
        f"--rollout.micro_batch_size={args.gen_micro_batch_size}", f"--rollout.prompt_max_len={args.prompt_len}",
        f"--rollout.generate_max_len={args.gen_len}", f"--rollout.async_queue={args.async_queue}",
        f"--data.prompt_data={prompts}", "--data.input_key=input", "--data.label_key=label",
        f"--data.max_samples={total_prompts}", "--eval.data=null",
        "--reward.reward_func_path=" + ("null" if ppo else "hpc_rlhf.benchmarks.task"),
        f"--train.max_iterations={args.iterations}", f"--train.train_batch_size={args.train_batch_size}",
        f"--train.micro_train_batch_size={args.micro_batch_size}", f"--ref.micro_batch_size={args.micro_batch_size}",
        f"--train.run_dir={run_dir}", f"--train.device={args.device}", f"--train.seed={args.seed}",
        f"--ds.zero_stage={args.zero_stage}", "--ckpt.save_steps=0",
        "--algo.advantage_estimator=" + ("gae" if ppo else "group_norm"),
    ]
    if ppo:
        overrides += [f"--critic.pretrain={model_dir}", f"--reward.pretrain={model_dir}", "--algo.init_kl_coef=0.01",
                      f"--reward.micro_batch_size={args.micro_batch_size}"]
    elif not args.no_kl:
        overrides += ["--algo.use_kl_loss=true", "--algo.kl_estimator=k3"]
    return overrides + layout_overrides(args) + [f"--{item}" for item in args.set]


class GpuSampler:
    """Samples nvidia-smi utilisation and memory every 200 ms in the background (no-op without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, float, float]] = []  # (unix time, gpu, util %, memory MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            now = time.time()
            for line in out.strip().splitlines():
                index, util, mem = (part.strip() for part in line.split(","))
                self.samples.append((now, int(index), float(util), float(mem)))
            self._stop.wait(0.2)

    def summary(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Mean utilisation and peak memory per GPU between two unix times."""
        per_gpu: dict[int, list[tuple[float, float]]] = {}
        for t, gpu, util, mem in self.samples:
            if start <= t <= end:
                per_gpu.setdefault(gpu, []).append((util, mem))
        return {str(gpu): {"util_mean_pct": statistics.fmean(u for u, _ in rows),
                           "mem_peak_mib": max(m for _, m in rows)} for gpu, rows in sorted(per_gpu.items())}


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = {}
    with (run_dir / "metrics.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if "time/iteration_s" in row:
                rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def median(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else 0.0


def phase_limits(args: argparse.Namespace, response_len: int, ceilings: dict[str, float]) -> dict[str, dict]:
    """Each phase's physical limit for one iteration: FLOPs over the bf16 matmul peak, decode bytes over the copy
    bandwidth, weight bytes over the copy bandwidth. Keys: flops (where compute-bound), limit_s, limit_tokens_per_s."""
    shape = model_shape(args.shape)
    sequences = args.rollout_batch_size * args.n_samples
    lengths = [args.prompt_len + response_len] * sequences
    tokens = sum(lengths)
    epochs = args_epochs(args)
    peak, bandwidth = ceilings["bf16_matmul_flops_per_s"], ceilings["copy_bytes_per_s"]
    # Critic and reward model end in a scalar head instead of the vocabulary projection.
    phase_flops = {
        "reward_model": flops.forward_flops(shape, lengths, vocab_head=False),
        "reference": flops.forward_flops(shape, lengths),
        "critic_forward": flops.forward_flops(shape, lengths, vocab_head=False),
        "actor_logprob": flops.forward_flops(shape, lengths),
        "actor_update": flops.train_flops(shape, lengths) * epochs,
        "critic_update": flops.train_flops(shape, lengths, vocab_head=False) * epochs,
    }
    limits: dict[str, dict] = {}
    for phase, phase_flop in phase_flops.items():
        phase_tokens = tokens * (epochs if phase.endswith("update") else 1)
        limits[phase] = {"flops": phase_flop, "limit_s": phase_flop / peak,
                         "limit_tokens_per_s": phase_tokens * peak / phase_flop}
    concurrent = min(sequences, args.gen_micro_batch_size if args.backend == "hf" else args.max_num_seqs)
    decode = flops.decode_limit_tokens_per_s(shape, concurrent, args.prompt_len, response_len, bandwidth, peak)
    limits["generate"] = {"limit_tokens_per_s": decode, "limit_s": sequences * response_len / decode,
                          "concurrent_sequences": concurrent}
    limits["weight_sync"] = {"limit_s": flops.weight_sync_limit_s(flops.model_bytes(shape), bandwidth)}
    return limits


def summarize(args: argparse.Namespace, rows: list[dict[str, Any]], ceilings: dict[str, float]) -> dict[str, Any]:
    """Per-phase medians, throughputs, limits, MFU and shares of the iteration."""
    measured = rows[args.warmup:] or rows
    iteration_s = median(measured, "time/iteration_s")
    mean_response = median(measured, "rollout/response_length") or float(args.gen_len)
    sequences = args.rollout_batch_size * args.n_samples
    limits = phase_limits(args, round(mean_response), ceilings)
    peak = ceilings["bf16_matmul_flops_per_s"]
    phases = {}
    for phase, (seconds_key, tokens_key) in PHASES.items():
        seconds = median(measured, seconds_key)
        if not seconds:
            continue
        entry = {"seconds": seconds}
        limit = limits.get(phase, {})
        if "limit_s" in limit:
            entry["limit_s"] = limit["limit_s"]
        if tokens_key:
            # Tokens of the phase per iteration (rate x time of each row), over the median time.
            rate_key = f"throughput/{tokens_key}_per_s"
            tokens = statistics.median(r[rate_key] * r[seconds_key] for r in measured if r.get(rate_key))
            entry["tokens_per_s"] = tokens / seconds
            entry["limit_tokens_per_s"] = limit.get("limit_tokens_per_s", 0.0)
        if "flops" in limit:
            entry["mfu"] = flops.mfu(limit["flops"], seconds, peak)
        phases[phase] = entry
    shares = phase_shares({p: e["seconds"] for p, e in phases.items()}, iteration_s)
    for phase, share in shares.items():
        if phase in phases:
            phases[phase]["share"] = share
    return {"iteration_s": iteration_s, "iterations_measured": len(measured), "mean_response_len": mean_response,
            "sequences_per_iteration": sequences, "phases": phases, "other_share": shares.get("other", 0.0),
            "generated_tokens_per_s_per_iteration": sequences * mean_response / iteration_s if iteration_s else 0.0}


def print_limits(args: argparse.Namespace, ceilings: dict[str, float]) -> str:
    """The limit table of a setting without running it (--limits-only)."""
    limits = phase_limits(args, args.gen_len, ceilings)
    if args.algo == "grpo":  # no reward model, no critic
        limits = {k: v for k, v in limits.items() if k not in ("reward_model", "critic_forward", "critic_update")}
    rows = [{"phase": phase, "limit_s": e["limit_s"], "tok_s": e.get("limit_tokens_per_s"),
             "tflop": e["flops"] / 1e12 if "flops" in e else None} for phase, e in limits.items()]
    rows.append({"phase": "iteration, phases in sequence", "limit_s": sum(e["limit_s"] for e in limits.values())})
    table = markdown_table(rows, [("phase", "phase", ""), ("tflop", "TFLOP", ".1f"), ("limit_s", "limit s", ".4f"),
                                  ("tok_s", "limit tokens/s", ",.0f")])
    text = (f"limits of {args.algo} {args.shape} ({args.rollout_batch_size} x {args.n_samples} sequences of "
            f"{args.prompt_len} + {args.gen_len} tokens) at {ceilings['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, "
            f"{ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s:\n" + table)
    print(text, flush=True)
    return text


def args_epochs(args: argparse.Namespace) -> int:
    for extra in args.set:
        if extra.startswith("train.max_epochs="):
            return int(extra.split("=", 1)[1])
    return 1


def print_table(args: argparse.Namespace, summary: dict[str, Any]) -> str:
    rows = []
    for phase, e in summary["phases"].items():
        limit = e.get("limit_tokens_per_s")
        rows.append({"phase": phase, "seconds": e["seconds"], "limit_s": e.get("limit_s"),
                     "share": 100 * e.get("share", 0.0),
                     "tok_s": e.get("tokens_per_s"), "limit": limit,
                     "of_limit": 100 * e["tokens_per_s"] / limit if limit and e.get("tokens_per_s") else None,
                     "mfu": 100 * e["mfu"] if "mfu" in e else None})
    table = markdown_table(rows, [("phase", "phase", ""), ("seconds", "s/iter", ".3f"), ("limit_s", "limit s", ".3f"),
                                  ("share", "% of iter", ".1f"),
                                  ("tok_s", "tokens/s", ",.0f"), ("limit", "limit tokens/s", ",.0f"),
                                  ("of_limit", "% of limit", ".1f"), ("mfu", "MFU %", ".1f")])
    head = (f"{args.algo} {args.shape} backend={args.backend} layout={args.layout} gpus={args.gpus} "
            f"async={args.async_queue}: iteration {summary['iteration_s']:.2f} s (median of "
            f"{summary['iterations_measured']}), {summary['sequences_per_iteration']} sequences x "
            f"{summary['mean_response_len']:.0f} new tokens")
    text = head + "\n" + table
    print(text, flush=True)
    return text


def load_ceilings(args: argparse.Namespace) -> dict[str, float]:
    if args.ceilings and Path(args.ceilings).exists():
        return json.loads(Path(args.ceilings).read_text())
    from hpc_rlhf.benchmarks.ceilings import measure_ceilings

    result = asdict(measure_ceilings(args.device))
    if args.ceilings:
        Path(args.ceilings).write_text(json.dumps(result, indent=1))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.limits_only:
        if args.peak_tflops and args.bandwidth_tbs:
            ceilings = {"bf16_matmul_flops_per_s": args.peak_tflops * 1e12, "copy_bytes_per_s": args.bandwidth_tbs * 1e12}
        elif args.ceilings and Path(args.ceilings).exists():
            ceilings = json.loads(Path(args.ceilings).read_text())
        else:
            raise SystemExit("--limits-only needs --ceilings FILE or both --peak-tflops and --bandwidth-tbs")
        print_limits(args, ceilings)
        return 0
    import torch

    ceilings = load_ceilings(args)
    work = Path(args.work_dir)
    model_dir, prompts = prepare_task(work, args.shape, prompts=args.rollout_batch_size * args.iterations,
                                      prompt_len=args.prompt_len, seed=args.seed,
                                      device="cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    name = f"{args.algo}{'-nokl' if args.no_kl else ''}-{args.shape}-{args.backend}-{args.layout}{args.gpus}-q{args.async_queue}"
    run_dir = work / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "hpc_rlhf.train", *run_config(args, model_dir, prompts, run_dir)]
    print("running:", " ".join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    with GpuSampler() as sampler:
        proc = subprocess.run(command, cwd=REPO, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        print(f"the run failed with exit code {proc.returncode}; see {run_dir}", file=sys.stderr)
        return proc.returncode
    rows = read_rows(run_dir)
    if not rows:
        print(f"no iteration metrics in {run_dir / 'metrics.jsonl'}", file=sys.stderr)
        return 1
    summary = summarize(args, rows, ceilings)
    window_start = rows[args.warmup - 1]["time/end_unix_s"] if 0 < args.warmup < len(rows) else started
    summary["gpu"] = sampler.summary(window_start, rows[-1]["time/end_unix_s"])
    table = print_table(args, summary)
    if summary["gpu"]:
        print("GPU utilisation (mean over measured iterations): " + ", ".join(
            f"gpu{g} {v['util_mean_pct']:.0f}% (peak {v['mem_peak_mib'] / 1024:.1f} GiB)"
            for g, v in summary["gpu"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "ceilings": ceilings, "summary": summary,
                                              "table": table, "rows": rows, "command": command,
                                              "wall_s": time.time() - started}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
