"""Config of the supervised trainers: the shipped configs load, every trainer name has a module, and impossible
settings are refused before any process starts, with messages that name the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_rlhf.config.schema import SUPERVISED_TRAINERS, ConfigError
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.trainers.registry import TRAINERS, trainer_entry

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIGS = {name: REPO / "configs" / f"{name}_tiny.yaml"
                for name in ("sft", "rm", "dpo", "kto", "prm", "kd", "rejection_sampling", "iterative_dpo")}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_load_and_name_their_trainer(name):
    cfg = load_config(TINY_CONFIGS[name]).config
    assert cfg.train.trainer == name
    assert cfg.layout.colocate and cfg.train.device == "cpu"


def test_every_trainer_name_has_an_entry_function():
    assert set(TRAINERS) == {"ppo", *SUPERVISED_TRAINERS}
    for name, entry in TRAINERS.items():
        assert callable(entry), name
    assert trainer_entry("iterative_dpo") is TRAINERS["iterative_dpo"]
    with pytest.raises(ValueError, match="train.trainer 'sdf' names no trainer; known: ppo, sft"):
        trainer_entry("sdf")


def test_supervised_batches_need_not_match_the_rollout_batch():
    # 8 prompts x 4 samples = 32 rollout samples do not divide into 48; only PPO cares.
    cfg = load_config(TINY_CONFIGS["sft"], ["--train.train_batch_size=48"]).config
    assert cfg.train.train_batch_size == 48
    with pytest.raises(ConfigError, match="train.train_batch_size"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["--train.train_batch_size=48"])


@pytest.mark.parametrize("config, overrides, message", [
    ("sft", ["--layout.colocate=false", "--layout.generator.gpus=1", "--layout.actor.gpus=1",
             "--slurm.gpus_per_node=2"], "train.trainer sft runs every role on every rank"),
    ("kd", ["--kd.teacher_pretrain="], "kd.teacher_pretrain"),
    ("dpo", ["--pref.loss_type=ipo", "--pref.label_smoothing=0.1"], "applies to pref.loss_type dpo, not ipo"),
    ("dpo", ["--pref.ref_chosen_logps_key=ref"], "need both columns, or neither"),
    ("dpo", ["--pref.label_smoothing=0.5"], "pref.label_smoothing"),
    ("dpo", ["--train.max_tokens_per_microbatch=256"], "keeps compared samples in one micro-batch"),
    ("sft", ["--lora.load_in_4bit=true"], "set lora.rank > 0"),
    ("prm", ["--lora.rank=8"], "LoRA is wired for sft, rm, dpo, kto, kd, ppo, rejection_sampling and iterative_dpo, "
                               "not prm"),
    ("iterative_dpo", ["--lora.rank=8", "--lora.load_in_4bit=true"], "which a 4-bit base cannot take"),
    ("sft", ["--sft.multiturn=true"], "set data.apply_chat_template: true"),
    ("sft", ["--sft.multiturn=true", "--sft.pretrain_mode=true", "--data.apply_chat_template=true"],
     "not both"),
    ("kto", ["--train.train_batch_size=2", "--train.micro_train_batch_size=1", "--layout.actor.gpus=2",
             "--layout.generator.gpus=2", "--slurm.gpus_per_node=2"], "each actor rank needs >= 2 samples"),
    ("iterative_dpo", ["--rollout.n_samples_per_prompt=1", "--algo.advantage_estimator=reinforce"],
     "needs n_samples_per_prompt >= 2"),
    ("prm", ["--prm.reward_tokens=[\"+\"]"], "needs exactly [good, bad]"),
])
def test_impossible_settings_are_refused_naming_the_keys(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIGS[config], overrides)
    assert message in str(err.value)
