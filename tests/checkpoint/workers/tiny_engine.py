"""The DeepSpeed engine the checkpoint workers train: a tiny LlamaForCausalLM with torch AdamW and DeepSpeed's
WarmupLR schedule, the same initial weights on every rank."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def build_tiny_engine(stage: int, *, micro_batch_size: int, accumulation: int = 1,
                      checkpoint: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(engine, lr scheduler) under ZeRO `stage`; `checkpoint` is DeepSpeed's checkpoint section when given."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * dist.get_world_size(),
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}},
        "steps_per_print": 1_000_000,
        **({"checkpoint": checkpoint} if checkpoint is not None else {}),
    }
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, scheduler
