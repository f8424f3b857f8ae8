"""One iteration's optimisation: the actor's policy loss (+ KL loss, entropy bonus) and the critic's value loss.

Each rank trains on its own samples; `train_batch_size` samples over all ranks of a role make one optimizer step.
The loss functions return the mean over the micro-batch's units (tokens for token_mean, sequences otherwise) and
`TrainedModel.backward` weights micro-batches so the gradient is that of the mean over the global batch.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from hpc_rlhf.algos import entropy_bonus, kl_loss, policy_loss, value_loss
from hpc_rlhf.config.schema import Config
from hpc_rlhf.trainers.common import micro_batches
from hpc_rlhf.training.batching import MicroBatch, TokenSample
from hpc_rlhf.training.deepspeed_setup import all_reduce_in_group
from hpc_rlhf.training.models import LossFn, LossResult
from hpc_rlhf.training.forwards import ForwardOutput
from hpc_rlhf.training.models import TrainedModel


def loss_weighting(loss_agg_mode: str) -> str:
    """How micro-batch losses combine: per token for token_mean, per sequence for the seq_* modes."""
    return "token" if loss_agg_mode == "token_mean" else "sample"


def actor_loss_fn(cfg: Config) -> LossFn:
    """Policy loss on one micro-batch, plus the KL loss term and the entropy bonus when configured."""
    algo = cfg.algo
    norm_length = cfg.rollout.generate_max_len if algo.loss_agg_mode == "seq_mean_token_sum_norm" else None

    def loss_fn(batch: MicroBatch, out: ForwardOutput) -> LossResult:
        tensors, mask = batch.response_tensors, batch.action_mask
        # Without an old log-prob pass (train.skip_old_logprobs) the policy before this single step is the one
        # computing `out`, so its detached log-probs are the old ones.
        old_log_probs = tensors["old_log_probs"] if "old_log_probs" in tensors else out.log_probs.detach()
        loss, metrics = policy_loss(
            out.log_probs, old_log_probs, tensors["advantages"], mask,
            eps_clip_low=algo.eps_clip_low, eps_clip_high=algo.eps_clip_high, dual_clip=algo.dual_clip,
            loss_agg_mode=algo.loss_agg_mode, policy_loss_type=algo.policy_loss_type,
            rollout_log_probs=tensors.get("behaviour_log_probs"), off_policy_correction=algo.off_policy_correction,
            is_low=algo.is_low, is_high=algo.is_high, norm_length=norm_length, log_ratio_clamp=algo.log_ratio_clamp)
        metrics = {f"train/{k}": v for k, v in metrics.items()}  # device tensors: read once per step, not here
        metrics["train/policy_loss"] = loss.detach()
        if algo.use_kl_loss:
            kl = kl_loss(out.log_probs, tensors["reference_log_probs"], mask, kl_estimator=algo.kl_estimator,
                         loss_agg_mode=algo.loss_agg_mode, norm_length=norm_length, kl_clamp=algo.kl_clamp)
            loss = loss + algo.kl_loss_coef * kl
            metrics["train/kl_loss"] = kl.detach()
        if out.entropy is not None:  # logged as a token mean; the bonus is aggregated like the loss
            metrics["train/entropy"] = ((out.entropy * mask).sum() / mask.sum().clamp(min=1)).detach()
            if algo.entropy_loss_coef:
                loss = loss + entropy_bonus(out.entropy, mask, entropy_loss_coef=algo.entropy_loss_coef,
                                            loss_agg_mode=algo.loss_agg_mode, norm_length=norm_length)
        return loss, metrics

    return loss_fn


def critic_loss_fn(cfg: Config) -> LossFn:
    """Clipped value loss against the returns of the advantage estimator."""
    algo = cfg.algo
    norm_length = cfg.rollout.generate_max_len if algo.loss_agg_mode == "seq_mean_token_sum_norm" else None

    def loss_fn(batch: MicroBatch, out: ForwardOutput) -> LossResult:
        tensors = batch.response_tensors
        loss, metrics = value_loss(out.values, tensors["old_values"], tensors["returns"], batch.action_mask,
                                   value_clip=algo.value_clip, loss_agg_mode=algo.loss_agg_mode,
                                   norm_length=norm_length)
        metrics = {f"critic/{k}": v for k, v in metrics.items()}
        metrics["critic/value_loss"] = loss.detach()
        return loss, metrics

    return loss_fn


def optimizer_batches(num_samples: int, per_rank_batch: int, *, seed: int, iteration: int,
                      epoch: int) -> list[list[int]]:
    """Shuffled sample indices cut into optimizer-step chunks; a pure function of (seed, iteration, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1_009 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    return [order[i:i + per_rank_batch] for i in range(0, num_samples, per_rank_batch)]


def single_step_iteration(cfg: Config, num_samples: int, model: TrainedModel) -> bool:
    """Whether this iteration's update is one optimizer step on every rank (one epoch, every rank's samples within
    its share of train_batch_size): then the policy before the step is the one the step's forward computes."""
    per_rank = max(cfg.train.train_batch_size // model.batch_ranks, 1)
    (largest,) = all_reduce_in_group([num_samples], dist.ReduceOp.MAX, model.mpu)
    return cfg.train.max_epochs == 1 and int(largest) <= per_rank


def run_epochs(model: TrainedModel, cfg: Config, samples: list[TokenSample], loss_fn: LossFn, *,
               filler: TokenSample, dp_size: int, pad_token_id: int, iteration: int,
               salt: int) -> list[dict[str, float]]:
    """`max_epochs` passes over the samples, one optimizer step per train_batch_size samples over all ranks.

    Ranks may hold different numbers of samples (groups are kept whole, filters drop groups); each rank runs the
    step count of the largest so that collectives match, and a rank out of samples runs `filler` with weight 0.
    `dp_size` is the number of ranks that take different samples (`TrainedModel.batch_ranks`).
    """
    per_rank = max(cfg.train.train_batch_size // dp_size, 1)
    metrics = []
    for epoch in range(cfg.train.max_epochs):
        chunks = optimizer_batches(len(samples), per_rank, seed=cfg.train.seed + salt, iteration=iteration,
                                   epoch=epoch)
        (steps,) = all_reduce_in_group([len(chunks)], dist.ReduceOp.MAX, model.mpu)
        for step in range(int(steps)):
            if step < len(chunks):
                batches = micro_batches(cfg, [samples[i] for i in chunks[step]], pad_token_id)
            else:
                batches = [dataclasses.replace(mb, is_padding=True)
                           for mb in micro_batches(cfg, [filler], pad_token_id)]
            metrics.append(model.train_step(batches, loss_fn, loss_weighting(cfg.algo.loss_agg_mode)))
    return metrics
