"""ds.enable_sleep in the colocated layout: the actor's and critic's optimizer states go to host memory while the
generator runs and come back before the update, without changing a single number of the training."""

from __future__ import annotations

import pytest

KEYS = ["train/policy_loss", "train/grad_norm", "critic/value_loss", "rollout/reward_mean"]


@pytest.mark.timeout(300)
def test_offloading_trainer_states_changes_nothing(tmp_path, jobs):
    common = ["--algo.advantage_estimator=gae", "--layout.critic.gpus=1", "--ds.zero_stage=2"]
    jobs.run(tmp_path / "awake", *common)
    jobs.run(tmp_path / "asleep", *common, "--ds.enable_sleep=true")
    awake = [r for r in jobs.metrics(tmp_path / "awake") if "train/policy_loss" in r]
    asleep = [r for r in jobs.metrics(tmp_path / "asleep") if "train/policy_loss" in r]
    assert len(awake) == len(asleep) == 3
    for a, b in zip(awake, asleep):
        assert [a[k] for k in KEYS] == [b[k] for k in KEYS], f"step {a['step']} differs"
        assert "time/trainer_offload_s" in b and "time/trainer_reload_s" in b
        assert "time/trainer_offload_s" not in a
