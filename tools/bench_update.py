#!/usr/bin/env python
"""The actor's update alone: one GRPO optimizer step of N samples on the recipe's DeepSpeed engine, timed by phase.

Once a trained model's answers are a dozen tokens, the update is most of an RL iteration on a small model and runs
far below the matrix peak. This tool times exactly that step (`Actor.train_step` with the recipe's loss, as
`run_epochs` calls it) for each variant asked, splits it into forward + loss + backward and the optimizer step,
and with `--profile` records where the host and the device spend it (kernel count, device-busy share, the ops with
the most host time):

    python tools/bench_update.py --out update.json                       # SmolLM2-135M shape, GPU, 256 samples
    python tools/bench_update.py --micro 64,256 --compile off,on --zero 0,1 --profile --out update.json
    python tools/bench_update.py --micro t32768,p32768 --zero 1 --response-len 64 --out update.json  # packed
    python tools/bench_update.py --device cpu --shape tiny --samples 16 --micro 8,16 --steps 2   # a smoke run

Weights are random unless `--model` names a model (a path or `builtin:...`); prompt and response token counts vary
around `--prompt-len` / `--response-len` like a trained model's rollouts do.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hpc_rlhf.benchmarks.flops import policy_update_flops  # noqa: E402
from hpc_rlhf.benchmarks.task import build_random_model, model_shape  # noqa: E402
from hpc_rlhf.builtin_models.resolve import resolve_model_path  # noqa: E402
from hpc_rlhf.config.loading import load_config  # noqa: E402
from hpc_rlhf.distributed.world import free_port  # noqa: E402
from hpc_rlhf.trainers.common import actor_engine_config, micro_batches  # noqa: E402
from hpc_rlhf.trainers.ppo.update import actor_loss_fn, loss_weighting  # noqa: E402
from hpc_rlhf.training.batching import TokenSample  # noqa: E402
from hpc_rlhf.training.models import Actor  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_grpo_1gpu.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model path or builtin:... (default: random weights of --shape)")
    p.add_argument("--shape", default="smollm2-135m", help="model shape of the random model")
    p.add_argument("--config", default=str(CONFIG), help="the recipe config whose actor, algo and train.* apply")
    p.add_argument("--samples", type=int, default=256, help="samples of the one optimizer step")
    p.add_argument("--prompt-len", type=int, default=48, help="mean prompt tokens (uniform within +-25%%)")
    p.add_argument("--response-len", type=int, default=16, help="mean response tokens (uniform within +-50%%)")
    p.add_argument("--micro", default="64,256,t32768",
                   help="micro-batching variants, comma separated: N = micro_train_batch_size N, tN = a token "
                        "budget of N padded tokens per micro-batch (train.max_tokens_per_microbatch), pN = the "
                        "same budget over packed rows with varlen attention (train.packing_samples)")
    p.add_argument("--compile", default="off", help="actor.compile values, comma separated (off, on)")
    p.add_argument("--zero", default="0", help="ds.zero_stage values, comma separated (0, 1, 2)")
    p.add_argument("--fixed-lengths", action="store_true",
                   help="every prompt and response exactly --prompt-len / --response-len tokens (no padding)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--profile", action="store_true", help="profile one more step of each variant")
    p.add_argument("--peak-tflops", type=float, help="bf16 matmul rate for the MFU column (e.g. the measured one)")
    p.add_argument("--ceilings", help="JSON from hpc_rlhf.benchmarks.ceilings: its measured bf16 matmul rate is the "
                                      "peak of the MFU column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/hpc_rlhf_bench")
    p.add_argument("--out", help="write settings and results as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.samples < 8 or args.samples % 8:
        p.error(f"--samples must be a multiple of 8 (groups of 8 samples per prompt), got {args.samples}")
    # each comma list parsed once, into the values the variants use
    args.micro = [v.strip() for v in args.micro.split(",")]
    for variant in args.micro:
        number = variant[1:] if variant[:1] in ("t", "p") else variant
        if not number.isdigit() or int(number) < 1:
            p.error(f"--micro: {variant!r} is neither N (samples per micro-batch), tN (a token budget) nor pN "
                    f"(a token budget over packed rows)")
    for name, allowed in (("compile", {"off", "on"}), ("zero", {"0", "1", "2"})):
        values = [v.strip() for v in getattr(args, name).split(",")]
        for value in values:
            if value not in allowed:
                p.error(f"--{name}: {value!r} is not one of {sorted(allowed)}")
        setattr(args, name, values)
    args.compile = [value == "on" for value in args.compile]
    args.zero = [int(value) for value in args.zero]
    if args.ceilings:
        if args.peak_tflops:
            p.error("give the peak by --peak-tflops or by --ceilings, not both")
        try:
            args.peak_tflops = json.loads(Path(args.ceilings).read_text())["bf16_matmul_flops_per_s"] / 1e12
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--ceilings {args.ceilings}: no bf16_matmul_flops_per_s to read ({exc})")
    return args


def make_samples(count: int, prompt_len: int, response_len: int, vocab_size: int, seed: int, *,
                 fixed: bool = False) -> list[TokenSample]:
    """`count` samples of random tokens with varying (or `fixed`) lengths, group-normalised-looking advantages."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        p_len = prompt_len if fixed else max(1, rng.randint(prompt_len * 3 // 4, prompt_len * 5 // 4))
        r_len = response_len if fixed else max(1, rng.randint(response_len // 2, response_len * 3 // 2))
        advantage = torch.full((r_len,), rng.gauss(0.0, 1.0))
        samples.append(TokenSample(
            prompt_ids=torch.randint(3, vocab_size, (p_len,), generator=generator),
            response_ids=torch.randint(3, vocab_size, (r_len,), generator=generator),
            response_tensors={"advantages": advantage, "behaviour_log_probs": torch.zeros(r_len)}))
    return samples


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(actor: Actor, batches: list, loss_fn: Any, weighting: str) -> dict[str, float]:
    """One optimizer step, its two halves timed with the device drained between them."""
    synchronize(actor.device)
    start = time.perf_counter()
    actor.backward(batches, loss_fn, weighting)
    synchronize(actor.device)
    middle = time.perf_counter()
    actor.optimizer_step()
    synchronize(actor.device)
    end = time.perf_counter()
    return {"forward_backward_s": middle - start, "optimizer_s": end - middle, "step_s": end - start}


def profile_step(actor: Actor, batches: list, loss_fn: Any, weighting: str) -> dict[str, Any]:
    """Kernel count, device-busy seconds against wall seconds, and the ops with the most host time, of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if actor.device.type == "cuda" else [])
    synchronize(actor.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        actor.train_step(batches, loss_fn, weighting)
        synchronize(actor.device)
    wall = time.perf_counter() - start
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
    averages = prof.key_averages()
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "wall_s": wall,
        "kernels": len(kernels),
        "device_busy_s": busy_us / 1e6,
        "device_busy_share": busy_us / 1e6 / wall if wall else 0.0,
        "top_host_ops": [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                         for e in top],
    }


def micro_batching_overrides(variant: str, samples: int) -> list[str]:
    """Config overrides of one `--micro` variant: N samples per micro-batch, tN tokens per micro-batch (padded rows),
    pN tokens per packed row with varlen attention."""
    if variant.startswith("p"):
        return [f"--train.max_tokens_per_microbatch={int(variant[1:])}", f"--train.micro_train_batch_size={samples}",
                "--train.packing_samples=true", "--actor.attn_implementation=varlen"]
    if variant.startswith("t"):
        return [f"--train.max_tokens_per_microbatch={int(variant[1:])}", f"--train.micro_train_batch_size={samples}",
                "--train.packing_samples=false", "--actor.attn_implementation=sdpa"]
    return ["--train.max_tokens_per_microbatch=null", f"--train.micro_train_batch_size={int(variant)}",
            "--train.packing_samples=false", "--actor.attn_implementation=sdpa"]


def run_variant(args: argparse.Namespace, model_path: str, micro: str, compiled: bool, zero_stage: int,
                samples: list[TokenSample], flops: float) -> dict[str, Any]:
    overrides = [f"--actor.pretrain={model_path}", f"--train.train_batch_size={args.samples}",
                 f"--rollout.batch_size={args.samples // 8}", "--rollout.n_samples_per_prompt=8",
                 *micro_batching_overrides(micro, args.samples), f"--actor.compile={'true' if compiled else 'false'}",
                 f"--ds.bf16={'true' if args.device == 'cuda' else 'false'}", f"--ds.zero_stage={zero_stage}"]
    cfg = load_config(args.config, overrides).config
    actor = Actor.from_pretrained(model_path, actor_engine_config(cfg), None, 10_000,
                                  temperature=max(cfg.rollout.temperature, 1e-6))
    loss_fn, weighting = actor_loss_fn(cfg), loss_weighting(cfg.algo.loss_agg_mode)
    batches = micro_batches(cfg, samples, pad_token_id=0)
    first_start = time.perf_counter()
    for _ in range(args.warmup):
        timed_step(actor, batches, loss_fn, weighting)
    warmup_s = time.perf_counter() - first_start
    steps = [timed_step(actor, batches, loss_fn, weighting) for _ in range(args.steps)]
    median = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    result = {"micro_batching": micro, "compile": compiled, "zero_stage": zero_stage,
              "micro_batches": len(batches),
              "padded_tokens": sum(int(b.input_ids.numel()) for b in batches), "warmup_s": warmup_s,
              "steps": steps, **{f"median_{k}": v for k, v in median.items()},
              "achieved_tflops": flops / median["step_s"] / 1e12}
    if args.peak_tflops:
        result["mfu"] = result["achieved_tflops"] / args.peak_tflops
    if args.profile:
        result["profile"] = profile_step(actor, batches, loss_fn, weighting)
    actor.engine.destroy()  # DeepSpeed's engine keeps hooks and buffers alive past `del`
    del actor
    gc.collect()  # the engine's reference cycles hold its parameters and optimizer states on the device
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu", file=sys.stderr)
        return 2
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    if args.model:
        model_path = str(resolve_model_path(args.model))
        from transformers import AutoConfig
        vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
    else:
        model_path = str(build_random_model(args.shape, Path(args.work_dir) / f"update_{args.shape}"))
        vocab_size = model_shape(args.shape).vocab_size
    samples = make_samples(args.samples, args.prompt_len, args.response_len, vocab_size, args.seed,
                           fixed=args.fixed_lengths)
    lengths = [int(s.prompt_ids.numel() + s.response_ids.numel()) for s in samples]
    # the model FLOPs of the step: the LM head runs only at the positions that predict response tokens
    flops = float("nan") if args.model else policy_update_flops(
        model_shape(args.shape), [int(s.prompt_ids.numel()) for s in samples],
        [int(s.response_ids.numel()) for s in samples])
    results: list[dict[str, Any]] = []
    report = {"settings": vars(args), "tokens": sum(lengths), "update_flops": flops,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "results": results}
    variants = [(micro, compiled, zero) for micro in args.micro for compiled in args.compile for zero in args.zero]
    for micro, compiled, zero in variants:
        result = run_variant(args, model_path, micro, compiled, zero, samples, flops)
        results.append(result)
        if args.out:  # after every variant: a later one that fails (out of memory, say) loses none of these
            Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"micro {micro:>6} compile {'on ' if compiled else 'off'} zero {zero}: "
              f"step {result['median_step_s']:.4f} s "
              f"(forward+backward {result['median_forward_backward_s']:.4f}, optimizer "
              f"{result['median_optimizer_s']:.4f}), {result['achieved_tflops']:.1f} TFLOP/s, "
              f"warm-up {result['warmup_s']:.1f} s", flush=True)
        if "profile" in result:
            prof = result["profile"]
            print(f"    profile: {prof['kernels']} kernels, device busy {prof['device_busy_s']:.4f} s of "
                  f"{prof['wall_s']:.4f} s ({prof['device_busy_share']:.0%})", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
