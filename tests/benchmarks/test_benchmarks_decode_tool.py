"""tools/bench_decode.py on the CPU: the plain and static-cache decode paths are timed on a tiny model folder and
agree on every row's tokens; the graph mode is skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hpc_rlhf.builtin_models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_bench_decode_times_both_cpu_paths(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "decode.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_decode.py"), "--model", str(model),
                             "--device", "cpu", "--batch", "5", "--prompt-len", "12", "--new-tokens", "6",
                             "--repeats", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "static_graph skipped" in result.stdout and "| static_eager |" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"dynamic", "static_eager"}
    for run in report["runs"].values():
        assert run["new_tokens"] == 5 * 6 and run["tokens_per_s"] > 0 and run["rows_equal_to_first_mode"] == 5
        assert run["static_failure"] is None
    assert report["runs"]["static_eager"]["stats"]["eager_steps"] == 2 * 5  # warm-up + 1 timed call, 5 steps each


def test_bench_decode_rejects_bad_arguments_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_decode.py"), "--model", "unused",
                             "--device", "cpu", "--modes", "dynamic,warp"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--modes must name" in result.stderr.strip().splitlines()[-1]
