"""Synthetic tasks, FLOP/byte arithmetic and report tables for the throughput benchmarks (tools/bench_*.py)."""
