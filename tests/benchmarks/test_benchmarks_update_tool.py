"""tools/bench_update.py on the CPU with the tiny shape: each micro-batching variant makes the micro-batches worked out
by hand, every step is timed by phase, the FLOP count is the update's, and bad variants are named in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.benchmarks.flops import policy_update_flops
from hpc_rlhf.benchmarks.task import model_shape

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_update.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_variants_batch_time_and_count_the_update(tmp_path):
    out, ceilings = tmp_path / "update.json", tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"bf16_matmul_flops_per_s": 2e12, "copy_bytes_per_s": 1e10}))
    result = run_tool("--device", "cpu", "--shape", "tiny", "--samples", "16", "--micro", "8,t40", "--zero", "0,1",
                      "--fixed-lengths", "--prompt-len", "6", "--response-len", "3", "--steps", "2", "--warmup", "1",
                      "--profile", "--ceilings", str(ceilings), "--work-dir", str(tmp_path / "work"), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tokens"] == 16 * 9
    assert report["update_flops"] == policy_update_flops(model_shape("tiny"), [6] * 16, [3] * 16)
    variants = [(r["micro_batching"], r["zero_stage"]) for r in report["results"]]
    assert variants == [("8", 0), ("8", 1), ("t40", 0), ("t40", 1)]
    for r in report["results"]:
        # 8 samples per micro-batch: 2 of them; a budget of 40 padded tokens holds 4 rows of 9: 4 of them
        assert r["micro_batches"] == (2 if r["micro_batching"] == "8" else 4)
        assert r["padded_tokens"] == 16 * 9  # equal lengths: no padding
        assert len(r["steps"]) == 2
        for step in r["steps"]:
            assert step["step_s"] == pytest.approx(step["forward_backward_s"] + step["optimizer_s"])
        assert r["achieved_tflops"] == pytest.approx(report["update_flops"] / r["median_step_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2.0)  # the peak read from --ceilings: 2 TFLOP/s
        profile = r["profile"]
        assert profile["kernels"] == 0 and profile["top_host_ops"]  # no device on the CPU; host ops recorded
    assert "zero 1" in result.stdout and "micro    t40" in result.stdout


def test_bad_variants_are_named(tmp_path):
    result = run_tool("--device", "cpu", "--micro", "8,x4")
    assert result.returncode == 2 and "--micro: 'x4' is neither N" in result.stderr
    result = run_tool("--device", "cpu", "--samples", "12")
    assert result.returncode == 2 and "--samples must be a multiple of 8" in result.stderr
    result = run_tool("--device", "cpu", "--steps", "0")
    assert result.returncode == 2 and "need --steps >= 1" in result.stderr
    result = run_tool("--device", "cpu", "--zero", "3")
    assert result.returncode == 2 and "--zero: '3' is not one of" in result.stderr
    (tmp_path / "ceilings.json").write_text("{}")
    result = run_tool("--device", "cpu", "--ceilings", str(tmp_path / "ceilings.json"))
    assert result.returncode == 2 and "no bf16_matmul_flops_per_s to read" in result.stderr
    result = run_tool("--device", "cpu", "--ceilings", str(tmp_path / "ceilings.json"), "--peak-tflops", "1")
    assert result.returncode == 2 and "not both" in result.stderr
