"""train.skip_old_logprobs: a single-step iteration takes the old log-probs from its own forward, so the separate
log-prob pass disappears and the update is the same (ratio 1 either way, up to float rounding)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

SAVE = ["--ckpt.save_hf_model=true", "--train.max_iterations=2"]


@pytest.mark.timeout(600)
def test_skipping_the_old_logprob_pass_trains_the_same_weights(tmp_path, jobs):
    with_pass, without = tmp_path / "with_pass", tmp_path / "without"
    jobs.run(with_pass, *SAVE)
    jobs.run(without, *SAVE, "--train.skip_old_logprobs=true")
    a = load_file(str(with_pass / "hf" / "actor" / "model.safetensors"))
    b = load_file(str(without / "hf" / "actor" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5, msg=name)
    rows = [r for r in jobs.metrics(without) if "time/iteration_s" in r]
    # 4 samples, train_batch_size 4, one epoch: one step, no log-prob pass (its tokens are not counted)
    assert all(r["train/optimizer_steps"] == 1 for r in rows)
    assert all("throughput/actor_logprob_tokens_per_s" not in r for r in rows)
    assert all(r["throughput/actor_logprob_tokens_per_s"] > 0 for r in jobs.metrics(with_pass) if "time/iteration_s" in r)


@pytest.mark.timeout(600)
def test_two_steps_per_iteration_keep_the_pass(tmp_path, jobs):
    run_dir = tmp_path / "two_steps"
    jobs.run(run_dir, "--train.skip_old_logprobs=true", "--train.train_batch_size=2", "--train.max_iterations=1")
    (row,) = [r for r in jobs.metrics(run_dir) if "time/iteration_s" in r]
    assert row["train/optimizer_steps"] == 2
    assert row["throughput/actor_logprob_tokens_per_s"] > 0
