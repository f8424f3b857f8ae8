"""actor.aux_loss_coef (OpenRLHF --aux_loss_coef): how it loads, what the checks refuse, how the flag translates."""

from __future__ import annotations

import shlex

import pytest

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.openrlhf import migrate
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.trainers.engines import engine_config


def test_default_is_off_and_the_value_reaches_the_actor_engine_only():
    cfg = load_config(None, []).config
    assert cfg.actor.aux_loss_coef == 0.0 and engine_config(cfg, cfg.actor).aux_loss_coef == 0.0
    cfg = load_config(None, ["--actor.aux_loss_coef=0.01"]).config
    assert engine_config(cfg, cfg.actor).aux_loss_coef == 0.01
    assert engine_config(cfg, cfg.critic).aux_loss_coef == 0.0  # the critic is a value model, no router loss


@pytest.mark.parametrize("overrides, message", [
    (["--actor.aux_loss_coef=-0.1"], r"actor.aux_loss_coef \(command line\): must be >= 0 \(0 = off\), got -0.1"),
    (["--train.trainer=rm", "--actor.aux_loss_coef=0.01"], "not by train.trainer rm"),
    (["--train.trainer=kd", "--kd.teacher_pretrain=t", "--actor.aux_loss_coef=0.01"], "not by train.trainer kd"),
])
def test_impossible_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("trainer", ["sft", "dpo", "kto", "iterative_dpo", "rejection_sampling"])
def test_the_actor_trainers_accept_it(trainer):
    assert load_config(None, [f"--train.trainer={trainer}", "--actor.aux_loss_coef=0.01",
                              "--layout.colocate=true"]).config.actor.aux_loss_coef == 0.01


def translate(command: str, entry: str = "train_ppo_ray"):
    return migrate(shlex.split(command), entry)


def test_openrlhf_flag_translates():
    config, notes = translate("--pretrain m --dataset d.jsonl --aux_loss_coef 0.01", "train_sft")
    assert config["actor"]["aux_loss_coef"] == 0.01 and not any("aux_loss" in note.flag for note in notes)
    config, _ = translate("--pretrain m --prompt_data p.jsonl --remote_rm_url u --actor.aux_loss_coef 0.001")
    assert config["actor"]["aux_loss_coef"] == 0.001
    config, notes = translate("--pretrain m --dataset d.jsonl --aux_loss_coef 0.01", "train_rm")
    assert "aux_loss_coef" not in config.get("actor", {})
    assert any(note.flag == "--aux_loss_coef" and "no equivalent" in note.reason for note in notes)
    _, notes = translate("--pretrain m --dataset d.jsonl --aux_loss_coef 0", "train_rm")  # 0 is off there too
    assert not any(note.flag == "--aux_loss_coef" for note in notes)
