"""tools/bench_logprobs.py on the CPU: both log-prob paths agree (checked inside the tool) and are timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_logprobs_times_both_paths(tmp_path):
    out = tmp_path / "logprobs.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_logprobs.py"), "--device", "cpu",
                             "--rows", "40", "--vocab", "300", "--chunk-size", "16", "--repeats", "2",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| forward + backward |" in result.stdout
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"forward", "forward + backward"}
    assert all(run["hpc_rlhf_s"] > 0 and run["autograd_s"] > 0 for run in runs.values())
