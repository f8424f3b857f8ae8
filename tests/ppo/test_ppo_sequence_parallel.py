"""ds.ring_attn_size end to end: a PPO-family job whose actor and reference split every packed micro-batch over
2 ranks trains the same weights, logs the same losses and counts the same tokens as the job on 1 rank each."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

COMMON = ["--ckpt.save_hf_model=true", "--train.max_iterations=2", "--layout.colocate=false",
          "--layout.generator.gpus=1", "--train.packing_samples=true", "--algo.use_kl_loss=true",
          "--layout.reference.share_with=actor", "--actor.attn_implementation=sdpa"]


def layout(actor_ranks: int) -> list[str]:
    return [f"--slurm.gpus_per_node={1 + actor_ranks}", f"--layout.actor.gpus={actor_ranks}",
            f"--layout.reference.gpus={actor_ranks}", f"--ds.ring_attn_size={actor_ranks}"]


@pytest.mark.timeout(600)
def test_split_actor_and_reference_train_like_one_rank(tmp_path, jobs):
    whole, split = tmp_path / "whole", tmp_path / "split"
    jobs.run(whole, *COMMON, *layout(1))
    jobs.run(split, *COMMON, *layout(2))
    a = load_file(str(whole / "hf" / "actor" / "model.safetensors"))
    b = load_file(str(split / "hf" / "actor" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5, msg=name)
    rows = {name: [r for r in jobs.metrics(run) if "time/iteration_s" in r] for name, run in
            (("whole", whole), ("split", split))}
    assert len(rows["whole"]) == len(rows["split"]) == 2
    for one, two in zip(rows["whole"], rows["split"]):
        for key in ("train/loss", "train/kl_loss", "train/grad_norm", "rollout/kl", "rollout/reward_mean"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
        assert two["train/optimizer_steps"] == one["train/optimizer_steps"]
