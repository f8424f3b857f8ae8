"""DeepSpeed config dict, learning-rate schedule, optimizer groups and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.training.deepspeed_setup import (
    EngineConfig,
    lr_multiplier,
    make_ds_config,
    make_optimizer,
    param_groups_for,
    warmup_steps_for,
)


def test_ds_config_derives_accumulation_and_sections():
    cfg = EngineConfig(zero_stage=3, micro_train_batch_size=4, train_batch_size=64, max_norm=0.5,
                       adam_offload=True, param_offload=True)
    config = make_ds_config(cfg, dp_size=4)
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 4  # 64 / (4 x 4)
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"] == {"enabled": False}


def test_ds_config_for_frozen_engine_has_no_optimizer_sections():
    cfg = EngineConfig(zero_stage=3, adam_offload=True, bf16=True, train_batch_size=2)
    config = make_ds_config(cfg, dp_size=2, training=False)
    assert "offload_optimizer" not in config["zero_optimization"]
    assert "gradient_clipping" not in config
    assert config["bf16"] == {"enabled": True}


def test_ds_config_names_the_numbers_that_do_not_divide():
    cfg = EngineConfig(micro_train_batch_size=3, train_batch_size=16)
    with pytest.raises(ValueError, match=r"train_batch_size=16 is not divisible by micro_train_batch_size=3 "
                                         r"x data-parallel size=2 \(= 6\)"):
        make_ds_config(cfg, dp_size=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
    ({"zero_stage": 2, "param_offload": True}, "param_offload needs zero_stage=3"),
    ({"lr_scheduler": "linear"}, "lr_scheduler must be one of"),
    ({"attn_implementation": "flex"}, "attn_implementation must be one of"),
    ({"micro_train_batch_size": 0}, "micro_train_batch_size"),
    ({"lr_warmup_ratio": 1.5}, "lr_warmup_ratio"),
])
def test_engine_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_lr_schedule_hand_values():
    constant = {"warmup_steps": 4, "total_steps": 10, "scheduler": "constant_with_warmup", "min_lr_ratio": 0.1}
    assert [lr_multiplier(s, **constant) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = {"warmup_steps": 2, "total_steps": 6, "scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.2}
    # After warmup: progress (s - 2) / 4; factor 0.2 + 0.8 * (1 + cos(pi * progress)) / 2.
    want = [0.5, 1.0, 1.0, 0.2 + 0.4 * (1 + math.cos(math.pi / 4)), 0.6, 0.2 + 0.4 * (1 + math.cos(3 * math.pi / 4))]
    assert [lr_multiplier(s, **cosine) for s in range(6)] == pytest.approx(want)
    assert lr_multiplier(10, **cosine) == pytest.approx(0.2)  # stays at the floor past the end


def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps_for(EngineConfig(lr_warmup_ratio=0.03), 100) == 3
    assert warmup_steps_for(EngineConfig(lr_warmup_ratio=0.03, lr_warmup_steps=7), 100) == 7


def test_weight_decay_only_on_matrices(worker):
    model = worker.tiny_llama(0)
    decay, no_decay = param_groups_for(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cpu_optimizer_is_torch_adamw_with_config_values(worker):
    cfg = EngineConfig(learning_rate=3e-4, adam_betas=(0.8, 0.9), weight_decay=0.05)
    optimizer = make_optimizer(worker.tiny_llama(0), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


@pytest.mark.parametrize("stage, overlap, accumulation", [(0, True, None), (1, False, "fp32"), (2, True, "fp32"),
                                                          (3, True, "fp32")])
def test_ds_config_bf16_accumulation_and_overlap_follow_the_stage(stage, overlap, accumulation):
    config = make_ds_config(EngineConfig(zero_stage=stage, bf16=True, overlap_comm=overlap), dp_size=1)
    assert config.get("data_types", {}).get("grad_accum_dtype") == accumulation
    assert config["zero_optimization"].get("overlap_comm") == (overlap if stage > 0 else None)
