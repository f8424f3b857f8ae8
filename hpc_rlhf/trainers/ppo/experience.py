"""From committed rollout rows to training inputs: token samples, shaped rewards, advantages and returns.

Everything here is a pure function of the rows (plus the running reward statistics), so the actor and the critic can
compute the same returns independently from the same shards, and a resumed job recomputes exactly what it lost.
The KL penalty in the reward uses the generator's behaviour log-probs against the reference, for the same reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from hpc_rlhf.algos import AdvantagesAndReturns, RunningMoments, compute_advantages, compute_kl, masked_mean
from hpc_rlhf.algos.reward_shaping import (
    clip_reward,
    dynamic_filter_mask,
    normalize_reward,
    overlong_penalty,
    stop_properly_penalty,
    truncated_responses,
)
from hpc_rlhf.config.schema import Config
from hpc_rlhf.training.batching import TokenSample


@dataclass
class RolloutTensors:
    """One rank's rows as tensors: ragged token ids plus right-padded per-token columns [B, T]."""

    prompt_ids: list[torch.Tensor]
    response_ids: list[torch.Tensor]
    action_mask: torch.Tensor  # bool [B, T]
    behaviour_log_probs: Optional[torch.Tensor]  # [B, T] or None where the generator did not report them
    reference_log_probs: Optional[torch.Tensor]  # [B, T] or None when there is no reference
    values: Optional[torch.Tensor]  # [B, T] or None without a critic
    rewards: torch.Tensor  # [B] as produced by the reward stage
    scores: torch.Tensor  # [B]
    group_ids: torch.Tensor  # [B]
    weight_versions: torch.Tensor  # [B]
    finish_reasons: list[Optional[str]]  # the generator's "stop" / "length" / "max_turns"; None where not recorded
    images: Optional[list[tuple[bytes, ...]]] = None  # each row's prompt images (PNG); None for a text-only rollout

    @property
    def num_samples(self) -> int:
        return len(self.response_ids)

    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids])

    def select(self, keep: torch.Tensor) -> "RolloutTensors":
        """The rows where `keep` is True (dynamic filtering)."""
        index = keep.nonzero().flatten().tolist()

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[keep]

        return RolloutTensors(
            prompt_ids=[self.prompt_ids[i] for i in index], response_ids=[self.response_ids[i] for i in index],
            action_mask=pick(self.action_mask),
            behaviour_log_probs=None if self.behaviour_log_probs is None else pick(self.behaviour_log_probs),
            reference_log_probs=None if self.reference_log_probs is None else pick(self.reference_log_probs),
            values=None if self.values is None else pick(self.values), rewards=pick(self.rewards),
            scores=pick(self.scores), group_ids=pick(self.group_ids), weight_versions=pick(self.weight_versions),
            finish_reasons=[self.finish_reasons[i] for i in index],
            images=None if self.images is None else [self.images[i] for i in index])


def pad_ragged(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Right-pad ragged rows with zeros into a [len(rows), width] tensor."""
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(np.asarray(row), dtype=dtype)
    return out


def table_to_tensors(table: pa.Table) -> RolloutTensors:
    """Convert a rollout table (sorted by group, groups whole) into tensors."""
    columns = table.to_pydict()
    responses = columns["response_ids"]
    width = max((len(r) for r in responses), default=0)

    def optional(name: str) -> Optional[torch.Tensor]:
        values = columns.get(name)
        if values is None or any(v is None for v in values):
            return None
        return pad_ragged(values, width, torch.float32)

    return RolloutTensors(
        prompt_ids=[torch.tensor(p, dtype=torch.long) for p in columns["prompt_ids"]],
        response_ids=[torch.tensor(r, dtype=torch.long) for r in responses],
        action_mask=pad_ragged(columns["action_mask"], width, torch.float32).bool(),
        behaviour_log_probs=optional("behaviour_log_probs"),
        reference_log_probs=optional("reference_log_probs"),
        values=optional("values"),
        rewards=torch.tensor([r if r is not None else float("nan") for r in columns["reward"]], dtype=torch.float32),
        scores=torch.tensor([s if s is not None else float("nan") for s in columns["score"]], dtype=torch.float32),
        group_ids=torch.tensor(columns["group_id"], dtype=torch.long),
        weight_versions=torch.tensor(columns["weight_version"], dtype=torch.long),
        finish_reasons=[finish_reason(extra) for extra in columns.get("extra", [None] * len(responses))],
        images=[tuple(row or ()) for row in columns["images"]] if "images" in columns else None,
    )


def finish_reason(extra: Optional[str]) -> Optional[str]:
    """The finish reason the generator wrote into a row's `extra` JSON, or None when the row has none."""
    try:
        reason = json.loads(extra).get("finish_reason") if extra else None
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def to_token_samples(rollout: RolloutTensors, per_token: dict[str, torch.Tensor]) -> list[TokenSample]:
    """TokenSamples for the training micro-batches; `per_token` tensors are [B, T] and cut to each response."""
    samples = []
    for i, (prompt, response) in enumerate(zip(rollout.prompt_ids, rollout.response_ids)):
        length = len(response)
        samples.append(TokenSample(
            prompt_ids=prompt, response_ids=response, action_mask=rollout.action_mask[i, :length],
            response_tensors={name: tensor[i, :length] for name, tensor in per_token.items()},
            images=rollout.images[i] if rollout.images is not None else ()))
    return samples


def group_filter(cfg: Config, rollout: RolloutTensors) -> torch.Tensor:
    """DAPO dynamic filtering: keep groups whose scores are not all equal and whose mean lies in the range."""
    n = cfg.rollout.n_samples_per_prompt
    if not cfg.rollout.dynamic_filtering or n < 2:
        return torch.ones(rollout.num_samples, dtype=torch.bool)
    low, high = cfg.rollout.dynamic_filtering_reward_range
    return dynamic_filter_mask(rollout.scores, n, score_range=(low, high))


@dataclass
class ShapedRewards:
    """Sequence rewards after the length penalties, clipping and (optional) normalisation; which responses the token
    limit cut."""

    rewards: torch.Tensor
    overlong_penalty: torch.Tensor
    truncated: torch.Tensor


def shape_rewards(cfg: Config, rollout: RolloutTensors, moments: Optional[RunningMoments]) -> ShapedRewards:
    """Overlong penalty (DAPO), then the stop-properly penalty on truncated responses (ProRL; OpenRLHF's order),
    clipping into reward_clip_range (unless algo.reward_clip_stage clips after the group baseline), and running
    mean/std normalisation."""
    algo = cfg.algo
    rewards = rollout.rewards.clone()
    penalty = torch.zeros_like(rewards)
    if algo.overlong_buffer_len:
        penalty = overlong_penalty(rollout.response_lengths(), cfg.rollout.generate_max_len,
                                   algo.overlong_buffer_len, algo.overlong_penalty_factor)
        rewards = rewards + penalty
    truncated = truncated_responses(rollout.finish_reasons, rollout.response_lengths(), cfg.rollout.generate_max_len)
    if algo.stop_properly_penalty_coef is not None:
        rewards = stop_properly_penalty(rewards, truncated, algo.stop_properly_penalty_coef)
    if algo.reward_clip_stage == "before_baseline":  # else compute_advantages clips after the group baseline
        rewards = clip_reward(rewards, algo.reward_clip_range)
    if algo.normalize_reward and moments is not None:
        rewards = normalize_reward(rewards, moments.mean, moments.std)
    return ShapedRewards(rewards=rewards, overlong_penalty=penalty, truncated=truncated)


def kl_coefficient(cfg: Config, kl_coef: float) -> float:
    """The KL weight in the reward: the controller's value unless KL is a loss term or off."""
    return 0.0 if cfg.algo.use_kl_loss else kl_coef


def advantages_and_returns(cfg: Config, rollout: RolloutTensors, rewards: torch.Tensor, kl_coef: float,
                           all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]]
                           ) -> tuple[AdvantagesAndReturns, float]:
    """Run the configured advantage estimator; KL in the reward is estimated from behaviour vs reference log-probs."""
    kl = None
    if rollout.reference_log_probs is not None:
        if rollout.behaviour_log_probs is None:
            raise ValueError("the rollout has reference log-probs but no behaviour log-probs to estimate the KL from")
        kl = compute_kl(rollout.behaviour_log_probs, rollout.reference_log_probs, cfg.algo.kl_estimator,
                        kl_clamp=cfg.algo.kl_clamp)
        kl = torch.where(rollout.action_mask, kl, torch.zeros_like(kl))
    result = compute_advantages(
        cfg.algo.advantage_estimator, rewards, rollout.action_mask, values=rollout.values, kl=kl,
        kl_coef=kl_coefficient(cfg, kl_coef), gamma=cfg.algo.gamma, lambd=cfg.algo.lambd,
        n_samples_per_prompt=cfg.rollout.n_samples_per_prompt, group_std_eps=cfg.algo.group_std_eps,
        advantage_std_norm=cfg.algo.advantage_std_norm, all_reduce=all_reduce,
        clip_after_baseline=(tuple(cfg.algo.reward_clip_range) if cfg.algo.reward_clip_stage == "after_baseline"
                             else None))
    mean_kl = masked_mean(kl, rollout.action_mask).item() if kl is not None else 0.0
    return result, mean_kl
