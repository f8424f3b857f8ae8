"""The SmolLM2 configs load, and their numbers fit together (no model is built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.rewards.reward_func import load_reward_func

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, estimator", [("smollm2_grpo_1gpu", "group_norm"), ("smollm2_ppo_1gpu", "gae")])
def test_config_loads_and_fits(name, estimator):
    cfg = load_config(REPO / "configs" / f"{name}.yaml").config
    assert cfg.actor.pretrain == "builtin:smollm2-135m-instruct"
    assert cfg.algo.advantage_estimator == estimator and cfg.algo.init_kl_coef == 0
    assert cfg.data.apply_chat_template is True
    # One optimizer step per iteration: every rollout sample goes into one step of train_batch_size.
    assert cfg.rollout.batch_size * cfg.rollout.n_samples_per_prompt == cfg.train.train_batch_size == 256
    assert (REPO / cfg.data.prompt_data).is_file() and (REPO / cfg.eval.data).is_file()
    assert cfg.rollout.prompt_max_len >= 64  # the chat template's system turn alone is ~30 tokens
    assert load_reward_func(cfg.reward.reward_func_path) is not None
    if estimator == "gae":
        assert cfg.layout.critic.gpus == 1 and not cfg.critic.pretrain  # the critic starts from actor.pretrain
