"""Learning curves that go up: each estimator family improves the reward on the arithmetic task from a fixed seed.

The embedded default as it is (configs/tiny_cpu.yaml: the warmed-up tiny model, 32 prompts x 8 samples per iteration,
four optimizer steps of 64, lr 2e-4) for 80 iterations. The mean training reward of the last 10 iterations must beat
the first 10 by a clear margin (the reward is 1 for a right answer, 0.1 for a wrong number, so +0.03 is about a tenth
more right answers). On the CPUs measured every family gains about +0.12; the warm-up, and so the start, differs a
little between CPU kernel sets (see the README), which a smaller batch and fewer iterations did not absorb.
"""

from __future__ import annotations

import pytest

ITERATIONS = 80
MARGIN = 0.03
FAMILIES = {
    "ppo_gae": ["--algo.advantage_estimator=gae", "--layout.critic.gpus=1", "--critic.learning_rate=1e-3"],
    "reinforce_baseline": ["--algo.advantage_estimator=reinforce_baseline"],
    "grpo": ["--algo.advantage_estimator=group_norm"],
    "rloo": ["--algo.advantage_estimator=rloo"],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_rises(tmp_path, jobs, family):
    run_dir = tmp_path / "run"
    # the default config's own batch and learning settings again (the jobs fixture shrinks them for speed)
    jobs.run(run_dir, "--train.train_batch_size=64", "--train.micro_train_batch_size=64", "--actor.learning_rate=2e-4",
             "--rollout.batch_size=32", "--rollout.n_samples_per_prompt=8", "--rollout.generate_max_len=8",
             "--ds.zero_stage=0", "--rollout.micro_batch_size=64", f"--train.max_iterations={ITERATIONS}",
             "--train.seed=1", *FAMILIES[family],
             config="configs/tiny_cpu.yaml", timeout=600)
    rewards = [r["rollout/reward_mean"] for r in jobs.metrics(run_dir) if "rollout/reward_mean" in r]
    assert len(rewards) == ITERATIONS
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + MARGIN, f"{family}: reward {first:.3f} -> {last:.3f}"
