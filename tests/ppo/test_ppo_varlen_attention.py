"""A GRPO job on packed rows learns the same with varlen attention (each sample attending to itself) as with SDPA
over transformers' block-diagonal mask: same samples, same losses and gradient norms up to float rounding."""

from __future__ import annotations

import pytest

from hpc_rlhf.rollouts.reader import RolloutReader

GRPO_PACKED = ["--algo.advantage_estimator=group_norm", "--algo.init_kl_coef=0", "--train.packing_samples=true",
               "--train.max_tokens_per_microbatch=64", "--rollout.n_samples_per_prompt=4", "--rollout.batch_size=2",
               "--train.train_batch_size=8", "--rollout.generate_max_len=6"]


@pytest.mark.timeout(300)
def test_varlen_job_learns_as_sdpa_over_packed_rows(tmp_path, jobs):
    runs = {}
    for attention in ("sdpa", "varlen"):
        run_dir = tmp_path / attention
        jobs.run(run_dir, *GRPO_PACKED, f"--actor.attn_implementation={attention}")
        runs[attention] = run_dir
    sdpa, varlen = ([r for r in jobs.metrics(runs[a]) if "train/policy_loss" in r] for a in ("sdpa", "varlen"))
    assert len(sdpa) == len(varlen) == 3
    for want, got in zip(sdpa, varlen):
        for key in ("train/policy_loss", "train/grad_norm", "train/approx_kl", "rollout/reward_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert any(row["train/grad_norm"] > 0 for row in sdpa), "the job must train for the comparison to mean anything"
    for iteration in range(3):
        tables = [RolloutReader(runs[a]).read(iteration).column("response_ids").to_pylist() for a in runs]
        assert tables[0] == tables[1], f"iteration {iteration} sampled differently"
