"""Reward model training (train.trainer: rm): a pairwise loss on the scores of chosen and rejected responses.

    python -m hpc_rlhf.train --config configs/rm_tiny.yaml

The model is `actor.pretrain` loaded as a sequence classifier with one output (a new `score` head on a causal LM, or
an existing reward model). A sequence's score is the head's output at its last token, exactly where
`hpc_rlhf.rewards.RewardModel` reads it when the trained model later serves PPO. Loss: `pref.rm_loss` (sigmoid =
Bradley-Terry, logexp), with an optional per-pair margin column; metric: preference accuracy (chosen scores higher).
The saved model (RUN_DIR/hf/reward) loads with `AutoModelForSequenceClassification.from_pretrained`; with
`pref.normalize_reward` its config carries `reward_mean` / `reward_std` of the training scores, which RewardModel uses
to normalise rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from hpc_rlhf.algos import pairwise_rm_loss
from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.training.lora import unwrap
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    TrainerContext,
    all_reduce_sums,
    build_context,
    eval_share,
    finite_metrics,
    load_train_and_eval,
    load_trainable,
    micro_batches,
    pair_samples,
    per_sample,
    per_sample_values,
    rows_of_step,
    save_model,
    schedule_for,
    split_pairs,
    train_schedule,
)
from hpc_rlhf.trainers.supervised_data import PairExample, load_pairs
from hpc_rlhf.training.batching import MicroBatch
from hpc_rlhf.training.deepspeed_setup import EngineConfig
from hpc_rlhf.training.models import LossFn, LossResult, TrainedModel
from hpc_rlhf.training.forwards import ForwardOutput, model_inputs

STATS_PAIRS = 1024


class ScoreModel(nn.Module):
    """A `*ForSequenceClassification` model (num_labels=1, LoRA-wrapped or not) read at every position:
    score = head(hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        base = unwrap(model)
        if getattr(base.config, "num_labels", None) != 1 or not isinstance(getattr(base, "score", None), nn.Module):
            raise ValueError(f"a reward model needs a sequence classifier with num_labels=1 and a `score` head, got "
                             f"{type(base).__name__} with num_labels={getattr(base.config, 'num_labels', None)}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids: torch.Tensor,
                use_cache: bool = False, **kwargs: Any) -> torch.Tensor:
        """[rows, seq] scores, one per input position (`kwargs`, e.g. a packed row's sample bounds, go to the
        attention layers)."""
        base = unwrap(self.model)  # with LoRA: the HF model with adapter layers injected, the head a trainable copy
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **kwargs).last_hidden_state
        return base.score(hidden).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Passed through to the Hugging Face model (used by the engine setup)."""
        self.model.gradient_checkpointing_enable(**kwargs)


class RewardModelEngine(TrainedModel):
    """A reward model on a training engine; `forward` gives each sample's score at its last token as values [S, 1]."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                 num_training_steps: int) -> None:
        super().__init__(ScoreModel(model), cfg, dp_group, num_training_steps)

    def hf_model(self) -> nn.Module:
        """The sequence classifier (or its LoRA wrapper) that is saved."""
        return self.engine.module.model

    def forward(self, batch: MicroBatch) -> ForwardOutput:
        scores = self.engine(**model_inputs(batch, self.device))
        last = (batch.response_starts + batch.response_lengths - 1).to(self.device)
        return ForwardOutput(values=scores[batch.response_rows.to(self.device), last].float().unsqueeze(-1))


def rm_loss_fn(margins: torch.Tensor, loss_type: str) -> LossFn:
    """Pairwise loss of one micro-batch; `margins` holds one value per sample of the step (chosen and rejected)."""
    def loss_fn(batch: MicroBatch, output: ForwardOutput) -> LossResult:
        chosen, rejected = split_pairs(output.values[:, 0])
        margin, _ = split_pairs(per_sample(margins, batch).to(chosen.device))
        loss = pairwise_rm_loss(chosen, rejected, margin=margin, loss_type=loss_type)
        return loss, {"accuracy": (chosen > rejected).float().mean(), "chosen_reward": chosen.mean().detach(),
                      "rejected_reward": rejected.mean().detach()}
    return loss_fn


def score_pairs(ctx: TrainerContext, model: RewardModelEngine,
                pairs: Sequence[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of `pairs` (at least one) on this rank."""
    return split_pairs(per_sample_values(ctx, model, pair_samples(pairs), lambda batch, output: output.values[:, 0],
                                         group=2))


def evaluate_pairs(ctx: TrainerContext, model: RewardModelEngine, pairs: Sequence[PairExample]) -> dict[str, float]:
    """eval/accuracy (chosen scored higher) and eval/loss over the held-out pairs of all ranks."""
    mine, weight = eval_share(ctx, pairs)
    chosen, rejected = score_pairs(ctx, model, mine)
    margin = torch.tensor([p.margin for p in mine])
    loss_sum = float(pairwise_rm_loss(chosen, rejected, margin=margin, loss_type=ctx.cfg.pref.rm_loss)) * len(mine)
    totals = all_reduce_sums(model, {"loss": loss_sum * weight, "correct": float((chosen > rejected).sum()) * weight,
                                     "count": len(mine) * weight})
    return {"eval/loss": totals["loss"] / totals["count"], "eval/accuracy": totals["correct"] / totals["count"]}


def reward_statistics(ctx: TrainerContext, model: RewardModelEngine,
                      pairs: Sequence[PairExample]) -> dict[str, float]:
    """Mean and std of the scores of every chosen and rejected response of `pairs` (all ranks share the work)."""
    mine, weight = eval_share(ctx, pairs)
    scores = torch.cat(score_pairs(ctx, model, mine)).double()
    totals = all_reduce_sums(model, {"n": scores.numel() * weight, "sum": float(scores.sum()) * weight,
                                     "sq": float((scores ** 2).sum()) * weight})
    mean = totals["sum"] / totals["n"]
    std = max(totals["sq"] / totals["n"] - mean ** 2, 0.0) ** 0.5
    return {"reward_mean": mean, "reward_std": std if std > 0 else 1.0}


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Train a reward model on the preference pairs of data.dataset; every rank calls this."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    pairs, eval_pairs = load_train_and_eval(ctx, cfg, load_pairs)
    schedule = schedule_for(cfg, len(pairs))
    model = load_trainable(ctx, cfg.actor.pretrain, "sequence_classification", RewardModelEngine,
                           schedule.total_steps)
    evaluate = (lambda: evaluate_pairs(ctx, model, eval_pairs)) if eval_pairs else None

    def train_step(step: int) -> dict[str, float]:
        mine = rows_of_step(ctx, schedule, pairs, step)
        margins = torch.tensor([p.margin for p in mine for _ in range(2)], dtype=torch.float32)
        batches = micro_batches(ctx.cfg, pair_samples(mine), ctx.pad_token_id, group=2)
        return finite_metrics(model.train_step(batches, rm_loss_fn(margins, cfg.pref.rm_loss), "sample"))

    def save() -> None:
        # Statistics over the held-out pairs (else up to STATS_PAIRS training pairs), as OpenRLHF does.
        stats = reward_statistics(ctx, model, eval_pairs or pairs[:STATS_PAIRS]) if cfg.pref.normalize_reward else {}
        save_model(ctx, model, "reward", config_updates=stats)

    return train_schedule(ctx, {"actor": model}, schedule, train_step, evaluate=evaluate, save=save)
