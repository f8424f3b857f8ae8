"""tools/bench_trl.py on the CPU: TRL's GRPOTrainer runs the tiny shape with the counts hpc_rlhf's run would have.

The GPU comparison in docs/benchmarks.md rests on the two runs doing the same work per iteration (sequences, optimizer
steps, micro-batches, one generation); the tool checks that itself and reports problems in `count_problems`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
SIZES = ["--shape", "tiny", "--device", "cpu", "--rollout-batch-size", "4", "--n-samples", "2", "--prompt-len", "8",
         "--gen-len", "6", "--train-batch-size", "4", "--micro-batch-size", "2"]


def run_tool(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_trl.py"), *SIZES,
                           "--work-dir", str(tmp_path / "work"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=280)


def test_dry_run_maps_the_setting_onto_grpo_config(tmp_path):
    result = run_tool(tmp_path, "--iterations", "3", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    printed, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("{"):])  # a note may follow
    # 4 prompts x 2 samples = 8 sequences per generation, optimizer steps of 4 samples in micro-batches of 2.
    assert printed["plan"] == {"sequences": 8, "optimizer_steps": 2, "micro_batches": 4,
                               "gradient_accumulation_steps": 2}
    resolved = printed["resolved"]
    assert resolved["num_generations"] == 2 and resolved["max_completion_length"] == 6
    assert resolved["generation_batch_size"] == 8 and resolved["max_steps"] == 6  # 3 iterations x 2 steps
    assert resolved["beta"] == 0.0 and resolved["use_vllm"] is False


@pytest.mark.timeout(300)
def test_a_real_run_times_every_iteration_with_matching_counts(tmp_path):
    out = tmp_path / "trl.json"
    result = run_tool(tmp_path, "--iterations", "3", "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["count_problems"] == []
    assert len(report["iterations"]) == 3
    summary = report["summary"]
    assert summary["iterations_measured"] == 2
    assert 0 < summary["generate_s"] < summary["iteration_s"]
    assert summary["update_s"] > 0 and summary["generated_tokens"] > 0
    assert "| generate |" in report["table"] and "| update |" in report["table"]
