#!/usr/bin/env python
"""Throughput benchmarks of the distributed runtime (not timed tests; run by hand, numbers go in docs).

    python tools/bench_runtime.py shards [--samples 1000] [--prompt-tokens 256] [--response-tokens 2000]
                                         [--repeats 5] [--dir DIR] [--compression {none,lz4,zstd}]
                                         [--json out.json]

Each benchmark is an entry of BENCHMARKS: a name, a function adding its command-line options, and a
function returning Measurements (a metric measured once per repetition). The driver prints the best and
median of each metric and optionally writes them, with the configuration, as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import hpc_rlhf  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from hpc_rlhf.rollouts import ROLLOUT_SCHEMA, RolloutReader, ShardWriter, commit_iteration  # noqa: E402


@dataclass
class Measurement:
    """One metric, measured once per repetition; larger is better."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return max(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_json_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "best": self.best, "median": self.median, "values": self.values}


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: its options and the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[Measurement]]


# ----------------------------------------------------------------------------------------------
# shards: Arrow rollout shard write + read throughput


def _add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=1000, help="rollouts per shard")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="run folder to write into (default: a temp folder)")
    parser.add_argument("--compression", choices=["none", "lz4", "zstd"], default="none")
    parser.add_argument("--seed", type=int, default=0)


def _list_column(values: np.ndarray, row_length: int, type_: pa.DataType) -> pa.Array:
    """A list column of equal-length rows built from one flat numpy array, without Python loops."""
    rows = len(values) // row_length
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * row_length, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values), type=type_)


def make_rollout_table(samples: int, prompt_tokens: int, response_tokens: int, seed: int) -> pa.Table:
    """Synthetic rollouts of the given shape: random token ids and log-probs, 8 samples per group."""
    rng = np.random.default_rng(seed)
    columns = {
        "prompt_ids": _list_column(
            rng.integers(0, 150_000, samples * prompt_tokens, dtype=np.int32), prompt_tokens, pa.list_(pa.int32())
        ),
        "response_ids": _list_column(
            rng.integers(0, 150_000, samples * response_tokens, dtype=np.int32), response_tokens, pa.list_(pa.int32())
        ),
        "behaviour_log_probs": _list_column(
            -rng.exponential(1.0, samples * response_tokens).astype(np.float32), response_tokens, pa.list_(pa.float32())
        ),
        "action_mask": _list_column(
            np.ones(samples * response_tokens, dtype=np.int8), response_tokens, pa.list_(pa.int8())
        ),
        "reward": pa.array(rng.standard_normal(samples).astype(np.float32)),
        "prompt_id": pa.array(np.arange(samples, dtype=np.int64) // 8),
        "group_id": pa.array(np.arange(samples, dtype=np.int64) // 8),
        "sample_index": pa.array((np.arange(samples) % 8).astype(np.int32)),
        "weight_version": pa.array(np.zeros(samples, dtype=np.int64)),
    }
    return pa.table(columns)


def run_shards(args: argparse.Namespace) -> list[Measurement]:
    """Time ShardWriter.write (validation, IPC write, fsync, sha256, commit) and RolloutReader.read per repetition."""
    table = make_rollout_table(args.samples, args.prompt_tokens, args.response_tokens, args.seed)
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix="bench_shards_"))
    compression = None if args.compression == "none" else args.compression
    writer = ShardWriter(run_dir, compression=compression)
    verified = RolloutReader(run_dir, verify_checksum=True)
    unverified = RolloutReader(run_dir, verify_checksum=False)

    metrics = {
        key: Measurement(name, unit)
        for key, name, unit in [
            ("write_sps", "write+commit", "samples/s"),
            ("write_mbs", "write+commit", "MB/s"),
            ("read_sps", "read (sha256 verified)", "samples/s"),
            ("read_mbs", "read (sha256 verified)", "MB/s"),
            ("read_nv_sps", "read (size check only)", "samples/s"),
            ("read_nv_mbs", "read (size check only)", "MB/s"),
        ]
    }
    try:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            path = writer.write(repeat, "generator_0000", table)
            elapsed = time.perf_counter() - start
            megabytes = path.stat().st_size / 1e6
            metrics["write_sps"].values.append(args.samples / elapsed)
            metrics["write_mbs"].values.append(megabytes / elapsed)
            commit_iteration(run_dir, repeat, ["generator_0000"])

            for reader, prefix in [(verified, "read"), (unverified, "read_nv")]:
                start = time.perf_counter()
                result = reader.read(repeat)
                elapsed = time.perf_counter() - start
                if result.num_rows != args.samples:
                    raise RuntimeError(f"read {result.num_rows} rows, wrote {args.samples}")
                metrics[f"{prefix}_sps"].values.append(args.samples / elapsed)
                metrics[f"{prefix}_mbs"].values.append(megabytes / elapsed)
        args.shard_megabytes = megabytes
    finally:
        if args.dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return list(metrics.values())


# ----------------------------------------------------------------------------------------------
# Registry: add further benchmarks (e.g. weight broadcast) as entries here.

BENCHMARKS: dict[str, Benchmark] = {
    "shards": Benchmark(
        help="Arrow rollout shard write and read throughput",
        add_arguments=_add_shard_arguments,
        run=run_shards,
    ),
}


# ----------------------------------------------------------------------------------------------
# Driver


def format_results(measurements: list[Measurement]) -> str:
    """A fixed-width table: metric, unit, best, median."""
    rows = [["metric", "unit", "best", "median"]]
    rows += [[m.name, m.unit, f"{m.best:,.1f}", f"{m.median:,.1f}"] for m in measurements]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["broadcast"]:  # the weight-plane benchmark spawns its own processes; it lives beside this file
        import subprocess

        return subprocess.call([sys.executable, str(Path(__file__).with_name("bench_weight_sync.py")), *argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Also: `broadcast [options]`, the actor -> generator weight broadcast "
                                            "benchmark (tools/bench_weight_sync.py --help).")
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    for name, benchmark in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=benchmark.help)
        benchmark.add_arguments(sub)
        sub.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    measurements = BENCHMARKS[args.benchmark].run(args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    print(f"benchmark {args.benchmark}: {json.dumps(config)}")
    print(format_results(measurements))
    if args.json is not None:
        report = {
            "benchmark": args.benchmark,
            "config": config,
            "command": " ".join(["python", "tools/bench_runtime.py", *(sys.argv[1:] if argv is None else argv)]),
            "host": platform.node(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "schema_columns": ROLLOUT_SCHEMA.names,
            "results": [m.to_json_dict() for m in measurements],
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
