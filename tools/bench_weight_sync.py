"""Weight-broadcast throughput: a ~100M-parameter state dict from one sender to 1 and 3 receivers, per bucket size.

    python tools/bench_weight_sync.py                          # gloo on CPU, 16/64/256 MB buckets, bf16 on the wire
    python tools/bench_weight_sync.py --receivers 1 --buckets-mb 64 --json out.json
    python tools/bench_weight_sync.py --device cuda            # NCCL, one GPU per process (needs receivers+1 GPUs)

Rank 0 plays actor rank 0 (fp32 master weights, converted to the wire dtype while flattening each bucket); ranks 1..N
play generators that copy every received tensor into their own preallocated weights. A round is timed from a barrier
to the moment the last rank has applied the last bucket; the table shows the median of --repeats rounds after one
warm-up round. GB/s = bytes on the wire (parameters x wire element size) / seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_rlhf.distributed import (
    TorchControlPlane,
    WorldInfo,
    apply_named_tensor,
    broadcast_weights,
    init_distributed,
    receive_weight_stream,
    spawn_local,
)


def llama_like_shapes(hidden: int = 1024, intermediate: int = 4096, layers: int = 4,
                      vocab: int = 32_000) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a small Llama-like model: 4 layers of hidden 1024 plus a 32k embedding = ~100M."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def bench_rank(info: WorldInfo, device_kind: str, buckets_mb: Sequence[float], wire: str, repeats: int) -> list[dict]:
    """One process of the benchmark; returns one row per bucket size (meaningful on rank 0)."""
    backend = "nccl" if device_kind == "cuda" else "gloo"
    world = init_distributed(info, backend=backend, timeout_s=600)
    control = TorchControlPlane.from_world(world)
    wire_dtype = getattr(torch, wire)
    shapes = llama_like_shapes()
    generator = torch.Generator().manual_seed(0)
    if info.rank == 0:
        weights = {name: torch.randn(shape, generator=generator).to(world.device) for name, shape in shapes.items()}
    else:
        weights = {name: torch.empty(shape, dtype=wire_dtype, device=world.device) for name, shape in shapes.items()}
    numel = sum(t.numel() for t in weights.values())
    group = dist.group.WORLD
    rows = []
    for bucket_mb in buckets_mb:
        seconds = []
        for round_index in range(repeats + 1):
            control.barrier()
            if world.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if info.rank == 0:
                broadcast_weights(weights.items(), group, 0, bucket_mb, wire_dtype, version=round_index)
            else:
                _, stream = receive_weight_stream(group, 0)
                for name, tensor in stream:
                    apply_named_tensor(weights, name, tensor)
            if world.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=world.control_group)
            if round_index > 0:  # round 0 warms up allocators and connections
                seconds.append(elapsed.item())
        wire_bytes = numel * torch.empty((), dtype=wire_dtype).element_size()
        median = statistics.median(seconds)
        rows.append({"backend": backend, "receivers": info.world_size - 1, "bucket_mb": bucket_mb,
                     "params_m": round(numel / 1e6, 1), "wire_dtype": wire, "wire_gb": round(wire_bytes / 1e9, 3),
                     "ms_median": round(median * 1e3, 2), "gb_per_s": round(wire_bytes / 1e9 / median, 2),
                     "repeats": repeats})
    control.close()
    world.close()
    return rows


def format_table(rows: list[dict]) -> str:
    header = "| backend | receivers | bucket MB | params | wire | GB on wire | median ms | GB/s |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['receivers']} | {r['bucket_mb']:g} | {r['params_m']}M | {r['wire_dtype']} "
                     f"| {r['wire_gb']} | {r['ms_median']} | {r['gb_per_s']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 3], help="generator processes per run")
    parser.add_argument("--buckets-mb", type=float, nargs="+", default=[16, 64, 256])
    parser.add_argument("--wire-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.receivers) + 1:
        parser.error(f"--device cuda needs {max(args.receivers) + 1} GPUs, found {torch.cuda.device_count()}")
    rows = []
    for receivers in args.receivers:
        per_rank = spawn_local(bench_rank, receivers + 1,
                               args=(args.device, args.buckets_mb, args.wire_dtype, args.repeats))
        rows += per_rank[0]
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
