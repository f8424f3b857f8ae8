"""Per-phase times that the benchmarks read from metrics.jsonl: present for every phase a rank ran, non-negative,
disjoint parts of the iteration (their sum stays within the tick's wall time), and rates consistent with counts."""

from __future__ import annotations

import pytest

PHASE_KEYS = ["time/generate_engine_s", "time/reward_fn_s", "time/shard_write_s", "time/shard_read_s",
              "time/reference_s", "time/critic_forward_s", "time/critic_train_s", "time/actor_logprob_s",
              "time/actor_update_s", "time/weight_sync_s"]


@pytest.mark.timeout(300)
def test_colocated_ppo_logs_every_phase_time(tmp_path, jobs):
    run_dir = tmp_path / "run"
    jobs.run(run_dir, "--algo.advantage_estimator=gae", "--algo.init_kl_coef=0.01", "--layout.critic.gpus=1",
             "--layout.reference.gpus=1")
    rows = [r for r in jobs.metrics(run_dir) if "time/iteration_s" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        # The last iteration has no weight sync: the generator is not used again.
        expected = PHASE_KEYS if row["step"] < 2 else [k for k in PHASE_KEYS if k != "time/weight_sync_s"]
        missing = [k for k in expected if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert all(row[k] >= 0 for k in expected)
        # Phases of one colocated rank run one after another inside the tick.
        assert sum(row[k] for k in expected) <= row["time/iteration_s"] * 1.001
        assert sum(row[k] for k in expected) >= 0.5 * row["time/iteration_s"], "most of the tick is accounted for"
        tokens = row["throughput/generate_tokens_per_s"] * row["time/generate_engine_s"]
        assert tokens == pytest.approx(row["rollout/response_length"] * 4, rel=1e-6)  # 2 prompts x 2 samples
        assert row["throughput/train_tokens_per_s"] > 0 and row["time/end_unix_s"] > 1.7e9
        assert row["train/optimizer_steps"] == 1  # 4 samples, train_batch_size 4, one epoch
    assert rows[0]["time/end_unix_s"] < rows[1]["time/end_unix_s"] < rows[2]["time/end_unix_s"]
