"""tools/bench_e2e.py end to end on the CPU: a real GRPO and PPO run of the tiny shape through `hpc_rlhf.train`,
then the per-phase table and JSON that the GPU reports are made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SEQUENCES = 4 * 2  # rollout batch x samples
GEN_LEN = 6


def run_bench(tmp_path: Path, algo: str, *extra: str) -> dict:
    out = tmp_path / f"{algo}.json"
    command = [sys.executable, str(REPO / "tools" / "bench_e2e.py"), "--algo", algo, "--shape", "tiny",
               "--device", "cpu", "--iterations", "3", "--warmup", "1", "--rollout-batch-size", "4", "--n-samples", "2",
               "--prompt-len", "8", "--gen-len", str(GEN_LEN), "--train-batch-size", "8", "--micro-batch-size", "4",
               "--work-dir", str(tmp_path / "work"), "--out", str(out), "--set", "logger.use_tensorboard=false",
               "--set", "logger.plot=false", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| phase |" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_bench_e2e_reports_every_phase(tmp_path, algo):
    report = run_bench(tmp_path, algo)
    summary, rows = report["summary"], report["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2] and summary["iterations_measured"] == 2
    phases = summary["phases"]
    expected = {"generate", "reference", "actor_logprob", "actor_update", "shard_write", "shard_read", "weight_sync"}
    if algo == "ppo":
        expected |= {"reward_model", "critic_forward", "critic_update"}
    else:
        expected |= {"reward_fn"}
    assert expected <= set(phases)
    # The random model never stops early, so every response has gen_len tokens.
    assert summary["mean_response_len"] == GEN_LEN and summary["sequences_per_iteration"] == SEQUENCES
    measured = rows[1:]
    engine_s = sorted(r["time/generate_engine_s"] for r in measured)
    assert phases["generate"]["seconds"] == pytest.approx(sum(engine_s) / 2)  # median of two
    assert phases["generate"]["tokens_per_s"] == pytest.approx(SEQUENCES * GEN_LEN / (sum(engine_s) / 2), rel=1e-6)
    for name in ("actor_update", "reference", "actor_logprob"):
        entry = phases[name]
        assert entry["tokens_per_s"] > 0 and entry["limit_tokens_per_s"] > 0 and entry["mfu"] > 0
        # MFU and the fraction of the FLOP limit are the same ratio, computed two ways.
        assert entry["mfu"] == pytest.approx(entry["tokens_per_s"] / entry["limit_tokens_per_s"], rel=0.02)
    shares = [e["share"] for e in phases.values()]
    assert all(s >= 0 for s in shares) and sum(shares) + summary["other_share"] == pytest.approx(1.0, abs=0.01)
    assert report["ceilings"]["copy_bytes_per_s"] > 0 and report["settings"]["algo"] == algo


@pytest.mark.timeout(300)
def test_bench_e2e_disaggregated_async_overlaps_generation_and_training(tmp_path):
    report = run_bench(tmp_path, "grpo", "--no-kl", "--layout", "disaggregated", "--gpus", "2", "--async-queue", "1")
    phases, rows = report["summary"]["phases"], report["rows"]
    assert "reference" not in phases and {"generate", "actor_update"} <= set(phases)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # Versions 1 is broadcast after iteration 0; the generator has already made the last iteration by then.
    assert "time/weight_sync_s" in rows[0] and "time/weight_sync_s" not in rows[2]
    # Generator and actor ranks work at the same time: the next batch is generated while the actor trains, so in at
    # least one measured iteration the actor waits for its data far less than generating it took (run one after the
    # other, it would wait the whole generation). A ratio of the job's own phases, so a busy machine slows both sides
    # alike; the wall-clock gain itself is a GPU benchmark's figure (docs/benchmarks.md), not a CPU test's.
    both = [r for r in rows if "time/generate_engine_s" in r and "time/actor_update_s" in r]
    assert [r["step"] for r in both] == [0, 1], "the last iteration is trained after the generator has finished"
    assert any(r["time/wait_data_s"] < 0.5 * r["time/generate_engine_s"] for r in both[1:])
    assert all(r["rollout/staleness"] == pytest.approx(1.0) for r in rows[1:]), "async: one version behind"
