#!/usr/bin/env python
"""Decode throughput of the hf generation backend: plain loop, static-cache eager steps, static-cache CUDA graphs.

Generates `--batch` random prompts of about `--prompt-len` tokens (lengths vary by up to a quarter, so the batch is
left-padded) x `--new-tokens` new tokens each (eos ignored, so every row runs its full budget), once to warm up (and
capture the graph), then `--repeats` timed times per mode; prints new tokens/s per mode and whether greedy tokens agree.

    python tools/bench_decode.py --model builtin:smollm2-135m-instruct --device cuda --batch 256 --prompt-len 48 \\
        --new-tokens 64 --out decode.json
    python tools/bench_decode.py --model builtin:tiny-llama --device cpu --batch 8 --prompt-len 16 --new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence

import torch

from hpc_rlhf.generation import HFEngine, SamplingParams
from hpc_rlhf.dtypes import DTYPES
from hpc_rlhf.builtin_models.resolve import resolve_model_path

MODES = {"dynamic": {"static_decode": False}, "static_eager": {"static_decode": True, "cuda_graphs": False},
         "static_graph": {"static_decode": True, "cuda_graphs": True}}


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = max(1, prompt_len - prompt_len // 4)
    return [[rng.randrange(vocab) for _ in range(rng.randint(low, prompt_len))] for _ in range(batch)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_mode(engine: HFEngine, prompts: list[list[int]], params: SamplingParams, repeats: int) -> dict:
    """Warm-up call, then the median of `repeats` timed calls; tokens of the last call for the agreement check."""
    out = engine.generate(prompts, params)
    times = []
    for _ in range(repeats):
        synchronize(engine.device)
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        synchronize(engine.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    new_tokens = sum(len(s.response_ids) for row in out for s in row)
    result = {"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds,
              "static_failure": engine.static_failure,
              "graph_failure": engine._static.graph_failure if engine._static is not None else None,
              "stats": dict(engine._static.stats) if engine._static is not None else None}
    return {**result, "tokens": [row[0].response_ids for row in out]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (or builtin:NAME)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help=f"one of {sorted(DTYPES)} (default: bfloat16 on cuda, "
                                                      f"float32 elsewhere)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        print(f"--dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or min(args.batch, args.prompt_len, args.new_tokens, args.repeats) < 1:
        print(f"--modes must name {list(MODES)} (got {unknown}); --batch, --prompt-len, --new-tokens and "
              f"--repeats must be >= 1", file=sys.stderr)
        return 2
    if device.type != "cuda" and "static_graph" in modes:
        modes.remove("static_graph")
        print("static_graph skipped: CUDA graphs need --device cuda")

    base = HFEngine.from_pretrained(resolve_model_path(args.model), dtype=DTYPES[dtype_name], device=device,
                                    max_batch_size=args.batch)
    prompts = make_prompts(args.batch, args.prompt_len, base.vocab_size, seed=0)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=1, ignore_eos=True)
    results: dict[str, dict] = {}
    for mode in modes:
        engine = HFEngine(base.model, max_batch_size=args.batch, pad_token_id=base.pad_token_id, **MODES[mode])
        results[mode] = bench_mode(engine, prompts, params, args.repeats)
        del engine
    reference = results[modes[0]]["tokens"] if modes else []
    print(f"model {args.model} on {device} ({dtype_name}), {args.batch} prompts of <= {args.prompt_len} tokens x "
          f"{args.new_tokens} new tokens, temperature {args.temperature}")
    print("| mode | seconds | new tokens/s | speed-up | rows equal to first mode | note |")
    print("|---|---|---|---|---|---|")
    first = results[modes[0]]["tokens_per_s"] if modes else 1.0
    for mode in modes:
        r = results[mode]
        equal = sum(a == b for a, b in zip(r.pop("tokens"), reference))
        r["rows_equal_to_first_mode"] = equal
        note = r["static_failure"] or r["graph_failure"] or ""
        print(f"| {mode} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / first:.2f}x | "
              f"{equal}/{args.batch} | {note} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "device": str(device), "dtype": dtype_name, "batch": args.batch,
                       "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                       "temperature": args.temperature, "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__, "runs": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
