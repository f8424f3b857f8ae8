"""Supervised fine-tuning (train.trainer: sft): next-token NLL on the response tokens.

    python -m hpc_rlhf.train --config configs/sft_tiny.yaml

Rows come from `data.dataset` (see `supervised_data` for plain, pretrain, multi-turn and conditional rows); the loss is
the mean over every trained token of the whole step (all micro-batches of all ranks), so packing
(`train.packing_samples`, position ids restarting per sample) and token-budget batching do not change it. Held-out
rows (`eval.data`) give `eval/loss`, the same token-mean NLL without gradients. The model is saved to RUN_DIR/hf/actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch

from hpc_rlhf.algos import sft_loss
from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    TrainerContext,
    build_context,
    evaluation_sums,
    load_train_and_eval,
    load_trainable,
    save_model,
    schedule_for,
    sequence_log_probs,
    token_loss_step,
    train_schedule,
)
from hpc_rlhf.trainers.supervised_data import Encoded, load_sft_examples
from hpc_rlhf.training.batching import MicroBatch
from hpc_rlhf.training.models import Actor
from hpc_rlhf.training.forwards import ForwardOutput


def nll_loss_fn(batch: MicroBatch, output: ForwardOutput) -> torch.Tensor:
    """Token-mean negative log-likelihood of the micro-batch's trained response tokens."""
    return sft_loss(output.log_probs, batch.action_mask.to(output.log_probs.device))


def evaluate_nll(ctx: TrainerContext, actor: Actor, examples: Sequence[Encoded]) -> dict[str, float]:
    """eval/loss: the token-mean NLL of the held-out examples over all ranks."""
    def sums(batch: MicroBatch, output: ForwardOutput) -> dict[str, float]:
        nll = -float(sequence_log_probs(output.log_probs, batch.action_mask).sum())
        return {"nll": nll, "tokens": batch.num_action_tokens}

    totals = evaluation_sums(ctx, actor, examples, sums)
    return {"eval/loss": totals["nll"] / max(totals["tokens"], 1.0), "eval/tokens": totals["tokens"]}


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Fine-tune actor.pretrain on data.dataset; every rank calls this."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    examples, eval_examples = load_train_and_eval(ctx, cfg, load_sft_examples)
    schedule = schedule_for(cfg, len(examples))
    actor = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", Actor, schedule.total_steps)
    evaluate = (lambda: evaluate_nll(ctx, actor, eval_examples)) if eval_examples else None
    train_step = token_loss_step(ctx, actor, examples, schedule, nll_loss_fn)
    return train_schedule(ctx, {"actor": actor}, schedule, train_step, evaluate=evaluate,
                          save=lambda: save_model(ctx, actor, "actor"))
