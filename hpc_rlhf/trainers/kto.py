"""Kahneman-Tversky optimisation (train.trainer: kto): unpaired desirable / undesirable responses.

    python -m hpc_rlhf.train --config configs/kto_tiny.yaml

Rows {input, response, label} (`data.label_key`: true = desirable). Per step and rank: log-ratios
l = log pi(y|x) - log pi_ref(y|x) of the samples, and the reference point z0 = mean log-ratio of mismatched pairs
(prompt i with the response of sample i - 1 of the same rank's share, KTO paper), computed without gradients and
averaged over all ranks. The loss is `kto_loss` (weights `pref.desirable_weight` / `pref.undesirable_weight`,
strength `pref.beta`), averaged over all samples of the step. The reference model (`ref.pretrain`, default
actor.pretrain) stays loaded: mismatched pairs change with every step. Held-out rows (`eval.data`) give eval/loss and
eval/reward_margin (mean implicit reward of desirable minus undesirable samples). The policy is saved to
RUN_DIR/hf/actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch

from hpc_rlhf.algos import kto_loss, kto_reference_kl, mismatched_completion_indices
from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    TrainerContext,
    all_reduce_sums,
    build_context,
    eval_share,
    finite_metrics,
    load_frozen,
    load_train_and_eval,
    load_trainable,
    micro_batches,
    per_sample,
    rows_of_step,
    sample_log_probs,
    save_model,
    schedule_for,
    sequence_log_probs,
    train_schedule,
)
from hpc_rlhf.trainers.supervised_data import Encoded, LabelledExample, load_unpaired
from hpc_rlhf.training.batching import MicroBatch, TokenSample
from hpc_rlhf.training.models import Actor, LossFn, LossResult, Reference
from hpc_rlhf.training.forwards import ForwardOutput


def mismatched_samples(examples: Sequence[LabelledExample], max_len: int) -> list[TokenSample]:
    """Prompt i with the response of example i - 1 (cyclically), cut to max_len tokens."""
    order = mismatched_completion_indices(len(examples)).tolist()
    samples = []
    for example, other in zip(examples, order):
        prompt = example.encoded.prompt_ids
        response = examples[other].encoded.response_ids[: max(max_len - len(prompt), 1)]
        samples.append(Encoded(prompt, response).to_sample())
    return samples


def reference_point(ctx: TrainerContext, actor: Actor, examples: Sequence[LabelledExample],
                    ref_mismatched: torch.Tensor) -> float:
    """KTO's z0 over all ranks: the mean policy/reference log-ratio of every rank's mismatched pairs."""
    mismatched = mismatched_samples(examples, ctx.cfg.data.max_len)
    local = kto_reference_kl(sample_log_probs(ctx, actor, mismatched), ref_mismatched)
    totals = all_reduce_sums(actor, {"kl": float(local) * len(examples), "count": float(len(examples))})
    return totals["kl"] / totals["count"]


def reference_log_probs(ctx: TrainerContext, reference: Reference,
                        examples: Sequence[LabelledExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the samples and of their mismatched pairs, in one pass."""
    samples = [e.encoded.to_sample() for e in examples]
    values = sample_log_probs(ctx, reference, samples + mismatched_samples(examples, ctx.cfg.data.max_len))
    return values[: len(samples)], values[len(samples):]


def kto_loss_fn(cfg: Config, desirable: torch.Tensor, ref_log_probs: torch.Tensor,
                z0: float) -> LossFn:
    """KTO loss of one micro-batch; `desirable` and `ref_log_probs` hold one value per sample of the step."""
    pref = cfg.pref

    def loss_fn(batch: MicroBatch, output: ForwardOutput) -> LossResult:
        log_probs = sequence_log_probs(output.log_probs, batch.action_mask)
        good = per_sample(desirable, batch).to(log_probs.device)
        ref = per_sample(ref_log_probs, batch).to(log_probs.device)
        out = kto_loss(log_probs[good], log_probs[~good], ref[good], ref[~good], torch.tensor(z0), beta=pref.beta,
                       desirable_weight=pref.desirable_weight, undesirable_weight=pref.undesirable_weight)
        # Every micro-batch must report the same metric names (they are summed over ranks in one list).
        return out.loss, {"kl": out.reference_kl}
    return loss_fn


def evaluate(ctx: TrainerContext, actor: Actor, reference: Reference,
             examples: Sequence[LabelledExample]) -> dict[str, float]:
    """eval/loss and eval/reward_margin (desirable minus undesirable mean implicit reward) over all ranks."""
    mine, weight = eval_share(ctx, examples)
    if len(mine) < 2:
        mine = list(mine) * 2  # mismatched pairs need two samples; the copy only shapes z0
    ref, ref_mismatched = reference_log_probs(ctx, reference, mine)
    z0 = reference_point(ctx, actor, mine, ref_mismatched)
    log_probs = sample_log_probs(ctx, actor, [e.encoded.to_sample() for e in mine])
    good = torch.tensor([e.desirable for e in mine])
    out = kto_loss(log_probs[good], log_probs[~good], ref[good], ref[~good], torch.tensor(z0), beta=ctx.cfg.pref.beta,
                   desirable_weight=ctx.cfg.pref.desirable_weight, undesirable_weight=ctx.cfg.pref.undesirable_weight)
    totals = all_reduce_sums(actor, {
        "loss": float(out.loss) * len(mine) * weight, "count": len(mine) * weight,
        "good_sum": float(out.chosen_rewards.sum()) * weight, "good": float(good.sum()) * weight,
        "bad_sum": float(out.rejected_rewards.sum()) * weight, "bad": float((~good).sum()) * weight})
    margin = totals["good_sum"] / max(totals["good"], 1.0) - totals["bad_sum"] / max(totals["bad"], 1.0)
    return {"eval/loss": totals["loss"] / totals["count"], "eval/reward_margin": margin, "eval/kl": z0}


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Train the policy with KTO on data.dataset; every rank calls this."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    examples, eval_examples = load_train_and_eval(ctx, cfg, load_unpaired)
    schedule = schedule_for(cfg, len(examples))
    reference = load_frozen(ctx, cfg.ref.pretrain or cfg.actor.pretrain)
    actor = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", Actor, schedule.total_steps)
    run_eval = (lambda: evaluate(ctx, actor, reference, eval_examples)) if eval_examples else None

    def train_step(step: int) -> dict[str, float]:
        mine = rows_of_step(ctx, schedule, examples, step)
        ref, ref_mismatched = reference_log_probs(ctx, reference, mine)
        z0 = reference_point(ctx, actor, mine, ref_mismatched)
        desirable = torch.tensor([e.desirable for e in mine])
        batches = micro_batches(ctx.cfg, [e.encoded.to_sample() for e in mine], ctx.pad_token_id)
        return finite_metrics(actor.train_step(batches, kto_loss_fn(cfg, desirable, ref, z0), "sample"))

    return train_schedule(ctx, {"actor": actor}, schedule, train_step, evaluate=run_eval,
                          save=lambda: save_model(ctx, actor, "actor"))
