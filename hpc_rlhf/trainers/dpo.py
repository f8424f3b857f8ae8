"""Direct preference optimisation: DPO, IPO, cDPO (train.trainer: dpo) and iterative DPO (train.trainer:
iterative_dpo).

    python -m hpc_rlhf.train --config configs/dpo_tiny.yaml

dpo: preference pairs from `data.dataset`. Reference log-probs log pi_ref(y|x) come from dataset columns
(`pref.ref_chosen_logps_key` / `pref.ref_rejected_logps_key`) or are computed once, before training, with the reference
model (`ref.pretrain`, default actor.pretrain), which is then freed: the policy trains alone. The loss is
`pref.loss_type` (dpo, cDPO with `pref.label_smoothing` > 0, ipo) plus `pref.nll_loss_coef` x the chosen responses'
token-mean NLL. Metrics: preference accuracy (the chosen implicit reward beta (log pi - log pi_ref) is higher),
rewards and their margin, on training steps and on held-out pairs (`eval.data`).

iterative_dpo: `pref.rounds` rounds of: sample `rollout.n_samples_per_prompt` responses to `rollout.batch_size` prompts
with the current policy, score them with the `reward:` source, pair each prompt's best and worst response (equal
rewards give no pair), train DPO on the new pairs. A round's pairs are written to RUN_DIR/iterative_dpo/round_NNN.jsonl
before training, so a resumed run trains on exactly the pairs it sampled. Held-out prompts (`eval.data`) are answered
with `eval.temperature` and scored by the same reward source.
The policy is saved to RUN_DIR/hf/actor.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from hpc_rlhf.algos import PreferenceLossOutput, dpo_loss, ipo_loss
from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    RoundProgress,
    StepLoop,
    StepSchedule,
    TrainerContext,
    all_ranks_sequence_log_probs,
    all_reduce_sums,
    build_context,
    eval_share,
    finish,
    finite_metrics,
    load_frozen,
    load_train_and_eval,
    load_trainable,
    micro_batches,
    pair_samples,
    per_sample,
    sample_log_probs,
    save_model,
    schedule_for,
    sequence_log_probs,
    split_pairs,
    train_schedule,
)
from hpc_rlhf.trainers.rounds import Rounds, RoundTraining, round_schedule, run_rounds
from hpc_rlhf.trainers.sampling import RoundSampler, ScoredGroup, load_eval_prompt_rows, load_prompt_rows
from hpc_rlhf.trainers.supervised_data import Encoded, PairExample, load_pairs, read_jsonl
from hpc_rlhf.training.batching import MicroBatch
from hpc_rlhf.training.models import Actor, LossFn, LossResult, Reference
from hpc_rlhf.training.forwards import ForwardOutput

ROUNDS_DIR = "iterative_dpo"


def preference_loss(cfg: Config, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor) -> PreferenceLossOutput:
    """The configured pairwise loss (dpo / cDPO / ipo) on [P] summed log-probs."""
    pref = cfg.pref
    if pref.loss_type == "ipo":
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=pref.beta)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=pref.beta, label_smoothing=pref.label_smoothing)


def dpo_loss_fn(cfg: Config, ref_log_probs: torch.Tensor) -> LossFn:
    """Loss of one micro-batch of interleaved pairs; `ref_log_probs` has one value per sample of the step."""
    def loss_fn(batch: MicroBatch, output: ForwardOutput) -> LossResult:
        log_probs = sequence_log_probs(output.log_probs, batch.action_mask)
        chosen, rejected = split_pairs(log_probs)
        ref_chosen, ref_rejected = split_pairs(per_sample(ref_log_probs, batch).to(log_probs.device))
        out = preference_loss(cfg, chosen, rejected, ref_chosen, ref_rejected)
        loss = out.loss
        if cfg.pref.nll_loss_coef > 0:
            chosen_tokens, _ = split_pairs(batch.action_mask.sum(dim=-1).to(log_probs.device))
            loss = loss + cfg.pref.nll_loss_coef * -(chosen / chosen_tokens.clamp(min=1)).mean()
        return loss, {"accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
                      "chosen_reward": out.chosen_rewards.mean(), "rejected_reward": out.rejected_rewards.mean(),
                      "reward_margin": (out.chosen_rewards - out.rejected_rewards).mean()}
    return loss_fn


def reference_log_probs(ctx: TrainerContext, reference: Optional[Reference],
                        pairs: Sequence[PairExample]) -> torch.Tensor:
    """[2P] interleaved reference log-probs (chosen, rejected, ...): precomputed columns, else the reference model."""
    if not pairs:
        return torch.zeros(0)
    if all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
        return torch.tensor([v for p in pairs for v in (p.ref_chosen, p.ref_rejected)], dtype=torch.float32)
    if reference is None:
        raise ValueError("some pairs have no precomputed reference log-probs and no reference model is loaded")
    return all_ranks_sequence_log_probs(ctx, reference, pair_samples(pairs))


def step_reference(ref_all: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """The interleaved reference log-probs of the pairs `indices`, in that order."""
    return torch.stack([ref_all[2 * i + k] for i in indices for k in (0, 1)]) if indices else torch.zeros(0)


def dpo_step(ctx: TrainerContext, actor: Actor, pairs: Sequence[PairExample], ref_all: torch.Tensor,
             schedule: StepSchedule) -> Callable[[int], dict[str, float]]:
    """The DPO optimizer step: step s trains this rank's pairs of schedule step s (`ref_all`: the interleaved
    reference log-probs of every pair)."""
    def train_step(step: int) -> dict[str, float]:
        indices = schedule.indices(step, rank=ctx.dp_rank, num_ranks=ctx.dp_size)
        batches = micro_batches(ctx.cfg, pair_samples([pairs[i] for i in indices]), ctx.pad_token_id, group=2)
        metrics = actor.train_step(batches, dpo_loss_fn(ctx.cfg, step_reference(ref_all, indices)), "sample")
        return finite_metrics(metrics)

    return train_step


def evaluate_pairs(ctx: TrainerContext, actor: Actor, pairs: Sequence[PairExample],
                   ref_all: torch.Tensor) -> dict[str, float]:
    """eval/loss, eval/accuracy and eval/reward_margin over the held-out pairs of all ranks."""
    indices, weight = eval_share(ctx, list(range(len(pairs))))
    chosen, rejected = split_pairs(sample_log_probs(ctx, actor, pair_samples([pairs[i] for i in indices]), group=2))
    ref_chosen, ref_rejected = split_pairs(step_reference(ref_all, indices))
    out = preference_loss(ctx.cfg, chosen, rejected, ref_chosen, ref_rejected)
    count = len(indices)
    totals = all_reduce_sums(actor, {
        "loss": float(out.loss) * count * weight, "count": count * weight,
        "correct": float((out.chosen_rewards > out.rejected_rewards).sum()) * weight,
        "margin": float((out.chosen_rewards - out.rejected_rewards).sum()) * weight})
    return {"eval/loss": totals["loss"] / totals["count"], "eval/accuracy": totals["correct"] / totals["count"],
            "eval/reward_margin": totals["margin"] / totals["count"]}


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """DPO (IPO, cDPO) on the preference pairs of data.dataset; every rank calls this."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    pairs, eval_pairs = load_train_and_eval(ctx, cfg, load_pairs)
    schedule = schedule_for(cfg, len(pairs))

    needs_model = any(p.ref_chosen is None or p.ref_rejected is None for p in [*pairs, *eval_pairs])
    reference = load_frozen(ctx, cfg.ref.pretrain or cfg.actor.pretrain) if needs_model else None
    ref_train = reference_log_probs(ctx, reference, pairs)
    ref_eval = reference_log_probs(ctx, reference, eval_pairs)
    del reference  # the policy trains alone
    gc.collect()

    actor = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", Actor, schedule.total_steps)
    evaluate = (lambda: evaluate_pairs(ctx, actor, eval_pairs, ref_eval)) if eval_pairs else None
    return train_schedule(ctx, {"actor": actor}, schedule, dpo_step(ctx, actor, pairs, ref_train, schedule),
                          evaluate=evaluate, save=lambda: save_model(ctx, actor, "actor"))


# ----- iterative DPO ----------------------------------------------------------------------------------------------
def round_pairs_rows(groups: Sequence[ScoredGroup]) -> list[dict]:
    """Best vs worst response of each scored prompt group, as JSON rows (token ids and texts); ties give none."""
    rows = []
    for group in groups:
        best, worst = group.best(), group.worst()
        if group.rewards[best] <= group.rewards[worst]:
            continue
        rows.append({"prompt": group.prompt.text, "prompt_ids": list(group.prompt.prompt_ids),
                     "chosen": group.response_texts[best], "chosen_ids": group.response_ids[best],
                     "chosen_reward": group.rewards[best],
                     "rejected": group.response_texts[worst], "rejected_ids": group.response_ids[worst],
                     "rejected_reward": group.rewards[worst]})
    return rows


def pairs_from_rows(rows: Sequence[dict], max_len: int) -> list[PairExample]:
    """PairExamples from round rows, responses cut to fit max_len (rows whose prompt fills it are dropped)."""
    pairs = []
    for row in rows:
        prompt = tuple(row["prompt_ids"])
        room = max_len - len(prompt)
        if room < 1:
            continue
        pairs.append(PairExample(chosen=Encoded(prompt, tuple(row["chosen_ids"][:room])),
                                 rejected=Encoded(prompt, tuple(row["rejected_ids"][:room])), prompt=row["prompt"]))
    return pairs


def run_iterative(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
                  stop: Optional[StopRequest] = None,
                  should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Rounds of sample -> score -> pair -> DPO; see the module docstring."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    prompt_rows = load_prompt_rows(cfg, ctx.tokenizer)
    eval_rows = load_eval_prompt_rows(cfg, ctx.tokenizer)
    reference = load_frozen(ctx, cfg.ref.pretrain or cfg.actor.pretrain)
    # Each round yields at most one pair per prompt: an upper bound on the steps, for the learning-rate schedule.
    steps_per_round = cfg.train.max_epochs * (cfg.rollout.batch_size // cfg.train.train_batch_size)
    actor = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", Actor, cfg.pref.rounds * max(steps_per_round, 1))
    sampler = RoundSampler(ctx)
    loop = StepLoop(ctx, {"actor": actor}, total_steps=None, progress=RoundProgress())

    def sample(round_index: int) -> tuple[list[dict], dict[str, float]]:
        scored, metrics = sampler.sample_round(prompt_rows, round_index, actor)
        return round_pairs_rows(scored), metrics

    def training(round_index: int) -> Optional[RoundTraining]:
        pairs = pairs_from_rows(read_jsonl(rounds.path(round_index)), cfg.data.max_len)
        schedule = round_schedule(ctx, len(pairs), round_index, "pairs")
        if schedule is None:
            return None
        ref_all = reference_log_probs(ctx, reference, pairs)
        return RoundTraining(schedule, dpo_step(ctx, actor, pairs, ref_all, schedule))

    rounds = Rounds(count=cfg.pref.rounds, directory=ctx.run_dir / ROUNDS_DIR, sample=sample, training=training,
                    evaluate=(lambda: sampler.evaluate(eval_rows, actor)) if eval_rows else None)
    stopped, trained_steps = run_rounds(ctx, loop, rounds)
    return finish(ctx, loop, total_steps=trained_steps, stopped=stopped, evaluate=rounds.evaluate,
                  save=lambda: save_model(ctx, actor, "actor"))
