"""ds.ring_attn_size end to end: PPO-family jobs whose models split every packed micro-batch over 2 ranks train the
same weights and log the same losses as the jobs on 1 rank each: GRPO with the actor and the reference, and PPO with
the actor, critic, reward model and reference (all on the same ranks)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

COMMON = ["--ckpt.save_hf_model=true", "--train.max_iterations=2", "--layout.colocate=false",
          "--layout.generator.gpus=1", "--train.packing_samples=true", "--actor.attn_implementation=sdpa",
          "--critic.attn_implementation=sdpa"]
REWARD_MODEL = "builtin:tiny-llama-arith/reward"
LEARNING_RATES = {"actor": 1e-4, "critic": 1e-3}  # tests/ppo/conftest.py FAST, and critic.learning_rate below
SETUPS = {
    "grpo": (["--algo.use_kl_loss=true", "--layout.reference.share_with=actor"], ("reference",), ("actor",),
             ("train/loss", "train/kl_loss", "train/grad_norm", "rollout/kl", "rollout/reward_mean")),
    "ppo": (["--algo.advantage_estimator=gae", "--algo.init_kl_coef=0.01", f"--critic.pretrain={REWARD_MODEL}",
             f"--reward.pretrain={REWARD_MODEL}", "--reward.reward_func_path=", "--critic.learning_rate=1e-3",
             "--layout.critic.share_with=actor", "--layout.reward.share_with=actor",
             "--layout.reference.share_with=actor"], ("critic", "reward", "reference"), ("actor", "critic"),
            ("train/loss", "train/grad_norm", "critic/value_loss", "critic/grad_norm", "rollout/kl",
             "rollout/reward_mean")),
}


def layout(ranks: int, sharing: tuple[str, ...]) -> list[str]:
    return [f"--slurm.gpus_per_node={1 + ranks}", f"--layout.actor.gpus={ranks}", f"--ds.ring_attn_size={ranks}",
            *(f"--layout.{role}.gpus={ranks}" for role in sharing)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_split_models_train_like_one_rank(tmp_path, jobs, setup):
    overrides, sharing, models, keys = SETUPS[setup]
    whole, split = tmp_path / "whole", tmp_path / "split"
    jobs.run(whole, *COMMON, *overrides, *layout(1, sharing))
    jobs.run(split, *COMMON, *overrides, *layout(2, sharing))
    for model in models:
        a = load_file(str(whole / "hf" / model / "model.safetensors"))
        b = load_file(str(split / "hf" / model / "model.safetensors"))
        assert a.keys() == b.keys()
        diffs = torch.cat([(b[name] - a[name]).abs().flatten() for name in a])
        # Adam's first steps move a weight by about lr whatever the size of its gradient, so a weight whose gradient
        # is ~1e-9 (rounding-sized) may move differently: allow that for 0.1% of the weights, up to 2 steps x lr.
        assert float((diffs > 2e-5).float().mean()) <= 1e-3, model
        assert float(diffs.max()) <= 2 * LEARNING_RATES[model] * 1.01, model
    rows = {name: [r for r in jobs.metrics(run) if "time/iteration_s" in r] for name, run in
            (("whole", whole), ("split", split))}
    assert len(rows["whole"]) == len(rows["split"]) == 2
    for one, two in zip(rows["whole"], rows["split"]):
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
        assert two["train/optimizer_steps"] == one["train/optimizer_steps"]
