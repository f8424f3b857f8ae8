#!/usr/bin/env python
"""Response-token log-probs from a micro-batch's logits: hpc_rlhf's chunked function against plain autograd.

The logits of one training micro-batch are [rows x kept positions, vocab] (16 x 512 x 152k in bf16 = 2.5 GB for
Qwen2.5 shapes); how the log-probs are taken from them decides a large part of a small model's training step.
Measured, forward + backward (or forward only under no_grad), same inputs:
  hpc_rlhf   `hpc_rlhf.training.logprobs.token_log_probs`: chunks read in place, hand-written backward
  autograd   the straightforward form: a gathered copy of the rows, fp32 log_softmax in chunks under activation
             checkpointing, autograd's backward (what hpc_rlhf did before)

    python tools/bench_logprobs.py                     # GPU, Qwen2.5 vocabulary, 16 x 512 rows
    python tools/bench_logprobs.py --device cpu --rows 512 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from hpc_rlhf.training.logprobs import token_log_probs


def autograd_log_probs(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                       chunk_size: int) -> torch.Tensor:
    """The baseline: gather the rows, then fp32 log_softmax chunk by chunk, recomputed in backward."""
    picked = logits[rows]

    def chunk_fn(chunk: torch.Tensor, chunk_labels: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(chunk.float(), dim=-1).gather(-1, chunk_labels[:, None]).squeeze(-1)

    parts = [checkpoint(chunk_fn, picked[start:start + chunk_size], labels[start:start + chunk_size],
                        use_reentrant=False) if picked.requires_grad else chunk_fn(picked[start:start + chunk_size],
                                                                                    labels[start:start + chunk_size])
             for start in range(0, labels.numel(), chunk_size)]
    return torch.cat(parts)


def measure(fn: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn` and the peak memory it allocated above the start (GiB; 0 on CPU)."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16 * 512, help="logit rows of one micro-batch (tokens)")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, device=device, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, args.vocab, (args.rows,), device=device, generator=generator)
    rows = torch.arange(args.rows, device=device)
    upstream = torch.randn(args.rows, device=device, generator=generator)

    def ours(train: bool) -> Callable[[], None]:
        def run() -> None:
            x = logits.detach().requires_grad_(train)
            with torch.set_grad_enabled(train):
                out, _ = token_log_probs(x, labels, chunk_size=args.chunk_size)
                if train:
                    (out * upstream).sum().backward()
        return run

    def baseline(train: bool) -> Callable[[], None]:
        def run() -> None:
            x = logits.detach().requires_grad_(train)
            with torch.set_grad_enabled(train):
                out = autograd_log_probs(x, labels, rows, args.chunk_size)
                if train:
                    (out * upstream).sum().backward()
        return run

    # The two agree before anything is timed.
    with torch.no_grad():
        got, _ = token_log_probs(logits, labels, chunk_size=args.chunk_size)
        want = autograd_log_probs(logits, labels, rows, args.chunk_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    results = {"settings": vars(args) | {"dtype": str(dtype)}, "runs": {}}
    size_gb = logits.numel() * logits.element_size() / 1e9
    print(f"logits [{args.rows}, {args.vocab}] {dtype} ({size_gb:.2f} GB) on {device}")
    print("| pass | hpc_rlhf ms | autograd ms | speed-up | hpc_rlhf peak GiB | autograd peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, train in (("forward", False), ("forward + backward", True)):
        ours_s, ours_peak = measure(ours(train), device, args.repeats)
        base_s, base_peak = measure(baseline(train), device, args.repeats)
        results["runs"][name] = {"hpc_rlhf_s": ours_s, "autograd_s": base_s, "hpc_rlhf_peak_gib": ours_peak,
                                 "autograd_peak_gib": base_peak}
        print(f"| {name} | {ours_s * 1e3:.1f} | {base_s * 1e3:.1f} | {base_s / ours_s:.2f}x | {ours_peak:.2f} | "
              f"{base_peak:.2f} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
