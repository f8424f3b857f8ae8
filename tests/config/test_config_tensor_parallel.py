"""ds.tensor_parallel_size (OpenRLHF --ds_tensor_parallel_size): the data-parallel arithmetic (actor ranks / tp), what
the checks refuse, the engine settings it reaches, and how the flag translates."""

from __future__ import annotations

import shlex

import pytest

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.openrlhf import migrate
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.trainers.engines import engine_config

SFT_4 = ["--train.trainer=sft", "--layout.colocate=true", "--layout.actor.gpus=4", "--layout.generator.gpus=4",
         "--slurm.gpus_per_node=4", "--ds.zero_stage=2"]


def test_default_is_off_and_the_value_reaches_the_actor_engine_only():
    cfg = load_config(None, []).config
    assert cfg.ds.tensor_parallel_size == 1 and engine_config(cfg, cfg.actor).tensor_parallel_size == 1
    cfg = load_config(None, SFT_4 + ["--ds.tensor_parallel_size=2", "--train.train_batch_size=8",
                                     "--train.micro_train_batch_size=2"]).config
    assert engine_config(cfg, cfg.actor).tensor_parallel_size == 2
    assert engine_config(cfg, cfg.critic).tensor_parallel_size == 1


def test_batch_arithmetic_uses_the_data_parallel_size():
    # 4 actor ranks with tp 2 are 2 replicas: 12 = 3 x 2 x 2 fits, though 12 is no multiple of 3 x 4 actor ranks.
    load_config(None, SFT_4 + ["--ds.tensor_parallel_size=2", "--train.train_batch_size=12",
                               "--train.micro_train_batch_size=3"])
    with pytest.raises(ConfigError, match=r"train_batch_size=12 is not a multiple of micro_train_batch_size x "
                                          r"data-parallel ranks \(actor.gpus / ds.tensor_parallel_size = 4 / 2\) = "
                                          r"4 x 2 = 8"):
        load_config(None, SFT_4 + ["--ds.tensor_parallel_size=2", "--train.train_batch_size=12",
                                   "--train.micro_train_batch_size=4"])
    with pytest.raises(ConfigError, match=r"train_batch_size=6 is not a multiple of micro_train_batch_size x "
                                          r"data-parallel ranks \(actor.gpus\) = 3 x 4 = 12"):  # without tp, as before
        load_config(None, SFT_4 + ["--train.train_batch_size=6", "--train.micro_train_batch_size=3"])


@pytest.mark.parametrize("overrides, message", [
    (["--ds.tensor_parallel_size=0"], r"ds.tensor_parallel_size \(command line\): must be >= 1, got 0"),
    (["--ds.tensor_parallel_size=3"], r"actor.gpus=4 is not a multiple of ds.tensor_parallel_size=3 \(4 % 3 = 1\)"),
    (["--ds.tensor_parallel_size=2", "--ds.zero_stage=3"], r"AutoTP training needs ds.zero_stage <= 2, got 3"),
    (["--ds.tensor_parallel_size=2", "--train.trainer=dpo"], "wired for train.trainer sft, not dpo"),
    (["--ds.tensor_parallel_size=2", "--lora.rank=8"], "use one or the other"),
    (["--ds.tensor_parallel_size=4", "--slurm.nodes=2", "--slurm.gpus_per_node=2", "--layout.actor.gpus=4",
      "--layout.generator.gpus=4"], r"4 must divide slurm.gpus_per_node=2"),
])
def test_impossible_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, SFT_4 + ["--train.train_batch_size=16", "--train.micro_train_batch_size=2"] + overrides)


def test_openrlhf_flag_translates():
    config, notes = migrate(shlex.split("--pretrain m --dataset d.jsonl --ds_tensor_parallel_size 2"), "train_sft")
    assert config["ds"]["tensor_parallel_size"] == 2 and not any("tensor_parallel" in n.flag for n in notes)
    config, notes = migrate(shlex.split("--pretrain m --prompt_data p.jsonl --remote_rm_url u "
                                        "--ds.tensor_parallel_size 2"))
    assert "tensor_parallel_size" not in config.get("ds", {})
    assert any(n.flag == "--ds.tensor_parallel_size" and "wired for sft" in n.reason for n in notes)
