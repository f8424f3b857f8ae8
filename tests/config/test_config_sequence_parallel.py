"""ds.ring_attn_size: the config rules (one line naming the field), the batch arithmetic and the layout's shares."""

from __future__ import annotations

import re

import pytest
import torch

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.distributed.layout import LayoutError, plan_layout
from hpc_rlhf.training.deepspeed_setup import EngineConfig, make_ds_config
from hpc_rlhf.training.sequence_parallel import segment_ids, shard_mask

# Disaggregated: generator 2, actor 4, reference 2 ranks on one node of 8; GRPO with the KL loss (a reference).
LAYOUT = ["--slurm.gpus_per_node=8", "--layout.colocate=false", "--layout.generator.gpus=2",
          "--layout.actor.gpus=4", "--layout.reference.gpus=2", "--algo.use_kl_loss=true",
          "--train.packing_samples=true", "--train.train_batch_size=8", "--train.micro_train_batch_size=2"]


def test_a_valid_sequence_parallel_config_loads():
    cfg = load_config(None, LAYOUT + ["--ds.ring_attn_size=2"]).config
    assert cfg.ds.ring_attn_size == 2
    assert load_config(None, []).config.ds.ring_attn_size == 1


@pytest.mark.parametrize("overrides, message", [
    (["--layout.actor.gpus=3", "--layout.generator.gpus=3", "--rollout.batch_size=6"],
     r"^ds.ring_attn_size \(command line\): ds.ring_attn_size=2 does not divide layout.actor.gpus=3 \(3 % 2 = 1\)$"),
    (["--train.packing_samples=false"], r"set train.packing_samples: true"),
    (["--actor.attn_implementation=flash_attention_2"], r"actor.attn_implementation \(command line\): .*use sdpa"),
    (["--train.trainer=sft", "--layout.generator.gpus=0", "--layout.reference.gpus=0", "--algo.use_kl_loss=false",
      "--layout.actor.gpus=8"], r"wired for train.trainer ppo, not sft"),
    (["--ds.ring_attn_size=0"], r"ds.ring_attn_size \(command line\): must be >= 1"),
    (["--train.train_batch_size=6"], (r"micro_train_batch_size x data-parallel ranks \(actor.gpus / "
                                      r"ds.ring_attn_size = 4 / 2\) = 2 x 2 = 4")),
])
def test_impossible_sequence_parallel_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, LAYOUT + ["--ds.ring_attn_size=2"] + overrides)
    lines = [line.strip().removeprefix("- ") for line in str(error.value).splitlines()]
    assert any(re.search(message, line) for line in lines), str(error.value)


def test_non_divisible_reference_is_named():
    with pytest.raises(ConfigError, match=r"ds.ring_attn_size=2 does not divide layout.reference.gpus=1 "
                                          r"\(1 % 2 = 1\)"):
        load_config(None, LAYOUT + ["--ds.ring_attn_size=2", "--layout.reference.gpus=1",
                                    "--layout.generator.gpus=3"])


def test_layout_shares_count_each_sequence_parallel_group_once():
    cfg = load_config(None, LAYOUT + ["--ds.ring_attn_size=2"]).config
    plan = plan_layout(cfg.layout, world_size=8, ranks_per_node=8)
    assert plan.ranks_of("actor") == (2, 3, 4, 5) and plan.ranks_of("reference") == (6, 7)
    assert [plan.data_share("actor", rank, 2) for rank in (2, 3, 4, 5)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [plan.data_share("reference", rank, 2) for rank in (6, 7)] == [(0, 1), (0, 1)]
    assert [plan.data_share("generator", rank, 2) for rank in (0, 1)] == [(0, 2), (1, 2)]  # generators split nothing
    assert [plan.data_share("actor", rank) for rank in (2, 3, 4, 5)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    with pytest.raises(LayoutError, match="ds.ring_attn_size=4 does not divide layout.reference.gpus=2"):
        plan.data_share("reference", 6, 4)


def test_deepspeed_counts_each_sample_once_per_group_member():
    cfg = EngineConfig(micro_train_batch_size=2, train_batch_size=8, ring_attn_size=2)
    config = make_ds_config(cfg, dp_size=4)  # 4 ranks, 2 data-parallel shares of 2 x 2 samples per step
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == (config["train_micro_batch_size_per_gpu"]
                                          * config["gradient_accumulation_steps"] * 4)
    with pytest.raises(ValueError, match="ring_attn_size=2 does not divide the 3 ranks"):
        make_ds_config(cfg, dp_size=3)
    with pytest.raises(ValueError, match=r"data-parallel size=2 \(= 4\)"):
        make_ds_config(EngineConfig(micro_train_batch_size=2, train_batch_size=6, ring_attn_size=2), dp_size=4)


def test_sequence_parallel_groups_are_consecutive_ranks_of_the_role():
    cfg = load_config(None, LAYOUT + ["--ds.ring_attn_size=2"]).config
    plan = plan_layout(cfg.layout, world_size=8, ranks_per_node=8)
    assert plan.sequence_parallel_groups("actor", 2) == ((2, 3), (4, 5))
    assert plan.sequence_parallel_groups("actor", 4) == ((2, 3, 4, 5),)
    assert plan.sequence_parallel_groups("reference", 2) == ((6, 7),)
    assert plan.sequence_parallel_groups("generator", 2) == () and plan.sequence_parallel_groups("actor", 1) == ()
    assert plan.sequence_parallel_groups("critic", 2) == ()  # absent
    with pytest.raises(LayoutError, match="ds.ring_attn_size=3 does not divide layout.actor.gpus=4"):
        plan.sequence_parallel_groups("actor", 3)


def test_shard_mask_is_the_packed_causal_mask_cut_by_rows():
    # Two packed samples of 3 and 2 tokens, then one pad token (its own sample), split over 2 ranks of 3 rows.
    positions = [0, 1, 2, 0, 1, 0]
    segments = segment_ids(torch.tensor(positions))
    assert segments.tolist() == [0, 0, 0, 1, 1, 2]
    full = [[int(segments[i] == segments[j] and j <= i) for j in range(6)] for i in range(6)]
    assert shard_mask(segments, 0, 3)[0, 0].int().tolist() == full[:3]
    assert shard_mask(segments, 3, 6)[0, 0].int().tolist() == full[3:]
    assert full[4] == [0, 0, 0, 1, 1, 0] and full[5] == [0, 0, 0, 0, 0, 1]
