"""From the config to the training engines' settings: the device, the precision, DeepSpeed's EngineConfig and LoRA.

Every trainer (PPO family, supervised, preference) and the launcher read these, so they live here, beside no recipe.
"""

from __future__ import annotations

import torch

from hpc_rlhf.config.schema import ActorConfig, Config, OptimConfig
from hpc_rlhf.training.deepspeed_setup import EngineConfig
from hpc_rlhf.training.lora import LoraSettings


def use_cuda(cfg: Config) -> bool:
    """True when the run trains on GPUs: `train.device: cuda`, or `auto` on a machine that has one."""
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def bf16_enabled(cfg: Config) -> bool:
    """`ds.bf16`, whose empty default means bf16 on GPUs and fp32 on the CPU."""
    return cfg.ds.bf16 if cfg.ds.bf16 is not None else use_cuda(cfg)


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype weights travel in to generators and reward models: bf16 where training runs in bf16, else fp32."""
    return torch.bfloat16 if bf16_enabled(cfg) else torch.float32


def engine_config(cfg: Config, section: OptimConfig) -> EngineConfig:
    """DeepSpeed settings of the actor or the critic from the `ds` section and the model's own section."""
    return EngineConfig(
        zero_stage=cfg.ds.zero_stage, bf16=bf16_enabled(cfg), adam_offload=cfg.ds.adam_offload,
        param_offload=cfg.ds.param_offload, gradient_checkpointing=section.gradient_checkpointing,
        learning_rate=section.learning_rate, adam_betas=tuple(section.adam_betas), weight_decay=section.weight_decay,
        lr_warmup_ratio=section.lr_warmup_ratio, lr_scheduler=section.lr_scheduler, min_lr_ratio=section.min_lr_ratio,
        max_norm=section.max_norm, overlap_comm=cfg.ds.overlap_comm,
        micro_train_batch_size=cfg.train.micro_train_batch_size, train_batch_size=cfg.train.train_batch_size,
        attn_implementation=section.attn_implementation, compile=section.compile, optim=section.optim,
        muon_lr=section.muon_lr, muon_momentum=section.muon_momentum, load_universal=cfg.ds.universal_ckpt,
        ema_beta=section.ema_beta if isinstance(section, ActorConfig) and section.enable_ema else None,
        aux_loss_coef=section.aux_loss_coef if isinstance(section, ActorConfig) else 0.0,
        tensor_parallel_size=cfg.ds.tensor_parallel_size if isinstance(section, ActorConfig) else 1,
        ring_attn_size=cfg.ds.ring_attn_size)


def lora_settings(cfg: Config) -> LoraSettings | None:
    """LoraSettings from the `lora` section, or None when LoRA is off (lora.rank == 0)."""
    section = cfg.lora
    if section.rank == 0:
        return None
    return LoraSettings(rank=section.rank, alpha=section.alpha, dropout=section.dropout,
                        target_modules=tuple(section.target_modules), load_in_4bit=section.load_in_4bit)
