"""Every advantage estimator in the schedules: colocated sync, colocated async (generation in a thread beside the
update), disaggregated sync, disaggregated async.

The estimators whose roles differ (gae: a critic; reinforce: a reference for the KL penalty; group_norm: neither) run
in every schedule; the other group estimators (reinforce_baseline, rloo, dr_grpo) differ from group_norm only in the
advantage arithmetic, which tests/algos checks by hand, so they run in the schedule with the most moving parts
(disaggregated async). Short real jobs (gloo processes, DeepSpeed, hf generation) that must finish with finite
losses, one training row per iteration, every iteration's shards committed once with the full sample count, and
weight versions that advance with the expected staleness (version = iteration - async_queue, floored at 0).
"""

from __future__ import annotations

import json

import pytest

from hpc_rlhf.rollouts import RolloutReader, iterations_completed

ESTIMATORS = ["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"]
MODES = {
    "colocated_sync": [],
    "colocated_async": ["--rollout.async_queue=1", "--vllm.enable_sleep=false"],
    "disaggregated_sync": ["--layout.colocate=false"],
    "disaggregated_async": ["--layout.colocate=false", "--rollout.async_queue=1"],
}
ITERATIONS = 3
SAMPLES = 2 * 2  # rollout.batch_size x n_samples_per_prompt


def layout_args(estimator: str, mode: str) -> list[str]:
    args = [f"--algo.advantage_estimator={estimator}", *MODES[mode]]
    colocated = mode.startswith("colocated")
    ranks = 1 if colocated else 2
    if estimator == "gae":
        args.append("--layout.critic.gpus=1")
        ranks += 0 if colocated else 1
    if estimator == "reinforce":  # REINFORCE++ with the KL penalty in the reward, from a reference model
        args += ["--algo.init_kl_coef=0.01", "--layout.reference.gpus=1"]
        ranks += 0 if colocated else 1
    return [*args, f"--slurm.gpus_per_node={ranks}"]


EVERY_MODE = ("gae", "reinforce", "group_norm")
CASES = [(estimator, mode) for estimator in ESTIMATORS for mode in MODES
         if estimator in EVERY_MODE or mode == "disaggregated_async"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("estimator, mode", CASES)
def test_estimator_runs_in_mode(tmp_path, jobs, estimator, mode):
    run_dir = tmp_path / "run"
    jobs.run(run_dir, *layout_args(estimator, mode))
    rows = jobs.metrics(run_dir)
    trained = [r for r in rows if "train/policy_loss" in r]
    assert [r["step"] for r in trained] == list(range(ITERATIONS)), "one actor update per iteration, in order"
    assert all(jobs.finite(r["train/policy_loss"]) and jobs.finite(r["train/grad_norm"]) for r in trained)
    if estimator == "gae":
        assert all(jobs.finite(r["critic/value_loss"]) for r in rows if r["step"] >= 0)
    if estimator == "reinforce":
        assert all(jobs.finite(r["rollout/kl"]) for r in trained)
    assert iterations_completed(run_dir) == list(range(ITERATIONS))
    generated = sum(r.get("count/generate_samples", 0) for r in rows)
    assert generated == ITERATIONS * SAMPLES, "every sample generated exactly once"
    lag = 1 if mode.endswith("_async") else 0
    reader = RolloutReader(run_dir)
    truncated_rate = {r["step"]: r["rollout/truncated_rate"] for r in trained}
    for iteration in range(ITERATIONS):
        table = reader.read(iteration, require_filled=["reward"])
        assert table.num_rows == SAMPLES
        assert set(table.column("weight_version").to_pylist()) == {max(0, iteration - lag)}
        cut = [json.loads(extra)["finish_reason"] == "length" for extra in table.column("extra").to_pylist()]
        assert truncated_rate[iteration] == pytest.approx(sum(cut) / len(cut)), "share of responses cut by the limit"


@pytest.mark.timeout(300)
def test_training_options_together(tmp_path, jobs):
    """Packing, token-budget micro-batches, KL loss from a reference, entropy bonus, DAPO filtering and clip-higher,
    reward normalisation, TIS correction, GSPO-free token loss, two epochs: all in one short colocated job."""
    run_dir = tmp_path / "run"
    jobs.run(run_dir, "--train.packing_samples=true", "--train.max_tokens_per_microbatch=64",
             "--algo.use_kl_loss=true", "--algo.kl_estimator=k3", "--layout.reference.gpus=1",
             "--algo.entropy_loss_coef=0.01", "--rollout.dynamic_filtering=true", "--algo.eps_clip_high=0.28",
             "--algo.normalize_reward=true", "--algo.off_policy_correction=tis", "--train.max_epochs=2",
             "--rollout.batch_size=4", "--rollout.n_samples_per_prompt=4", "--train.train_batch_size=8",
             "--algo.loss_agg_mode=seq_mean_token_mean")
    trained = [r for r in jobs.metrics(run_dir) if "train/policy_loss" in r]
    assert len(trained) == ITERATIONS
    for row in trained:
        assert jobs.finite(row["train/kl_loss"]) and jobs.finite(row["train/entropy"]) and row["train/entropy"] > 0
        assert 0.0 <= row["rollout/kept_fraction"] <= 1.0
