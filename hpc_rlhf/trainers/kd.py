"""Knowledge distillation (train.trainer: kd): the student (actor.pretrain) learns the teacher's next-token
distributions on the responses of an SFT dataset.

    python -m hpc_rlhf.train --config configs/kd_tiny.yaml

Per response token: the teacher's distribution p_T (from `kd.teacher_pretrain`, frozen, ZeRO-3 partitioned when
ds.zero_stage is 3) and the student's log-probs; loss = (1 - kd.kd_coef) x NLL of the data + kd.kd_coef x KD loss
(`kd_loss`: -sum_v p_T(v) log p_S(v), the forward KL up to the teacher's entropy), both token means over the step.
Student and teacher must share a tokenizer. Held-out rows (`eval.data`) give eval/kd_loss and eval/loss (NLL). The
student is saved to RUN_DIR/hf/actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hpc_rlhf.algos import kd_loss, sft_loss
from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    TrainerContext,
    build_context,
    evaluation_sums,
    load_frozen,
    load_train_and_eval,
    load_trainable,
    response_logits,
    save_model,
    schedule_for,
    token_loss_step,
    train_schedule,
)
from hpc_rlhf.trainers.supervised_data import Encoded, load_sft_examples
from hpc_rlhf.training.batching import MicroBatch, response_token_index
from hpc_rlhf.training.models import Actor, LossResult, Reference
from hpc_rlhf.training.forwards import ForwardOutput


@dataclass
class LogitsOutput(ForwardOutput):
    """ForwardOutput plus the [S, A, V] logits that predict each response token."""

    logits: Optional[torch.Tensor] = None


class Student(Actor):
    """A causal LM on a training engine whose forward also returns the full logits of the response positions."""

    def forward(self, batch: MicroBatch) -> LogitsOutput:
        logits = response_logits(self.engine, batch, self.device)
        rows, columns, sample, offset = response_token_index(batch)
        labels = torch.zeros_like(batch.action_mask, dtype=torch.long)
        labels[sample, offset] = batch.input_ids[rows, columns]
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.to(self.device).unsqueeze(-1))
        return LogitsOutput(log_probs=log_probs.squeeze(-1) * batch.response_mask.to(self.device), logits=logits)


def teacher_logits(teacher: Reference, batch: MicroBatch) -> torch.Tensor:
    """[S, A, V] teacher logits predicting each response token (no gradients)."""
    with torch.no_grad(), teacher.scope():
        return response_logits(teacher.model, batch, teacher.device)


def kd_loss_fn(cfg: Config, teacher: Reference) -> Callable[[MicroBatch, LogitsOutput], LossResult]:
    """(1 - kd_coef) x NLL + kd_coef x KD loss of one micro-batch, token means over its trained tokens."""
    coef = cfg.kd.kd_coef

    def loss_fn(batch: MicroBatch, output: LogitsOutput) -> LossResult:
        mask = batch.action_mask.to(output.logits.device)
        nll = sft_loss(output.log_probs, mask)
        distill = kd_loss(output.logits, teacher_logits(teacher, batch).to(output.logits.device), mask)
        return (1.0 - coef) * nll + coef * distill, {"nll": nll.detach(), "kd_loss": distill.detach()}
    return loss_fn


def teacher_vocab_size(teacher: Reference) -> int:
    """The teacher's vocabulary size (from its ZeRO-3 engine's module or the plain module)."""
    module = teacher.engine.module if teacher.engine is not None else teacher.model
    return int(module.config.vocab_size)


def evaluate(ctx: TrainerContext, student: Student, teacher: Reference,
             examples: Sequence[Encoded]) -> dict[str, float]:
    """eval/kd_loss and eval/loss (NLL), token means over the held-out responses of all ranks."""
    def sums(batch: MicroBatch, output: LogitsOutput) -> dict[str, float]:
        mask = batch.action_mask.to(output.logits.device)
        tokens = float(mask.sum())
        distill = float(kd_loss(output.logits, teacher_logits(teacher, batch).to(output.logits.device), mask))
        return {"kd": distill * tokens, "nll": float(sft_loss(output.log_probs, mask)) * tokens, "tokens": tokens}

    totals = evaluation_sums(ctx, student, examples, sums)
    return {"eval/kd_loss": totals["kd"] / totals["tokens"], "eval/loss": totals["nll"] / totals["tokens"]}


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Distil kd.teacher_pretrain into actor.pretrain on data.dataset; every rank calls this."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    examples, eval_examples = load_train_and_eval(ctx, cfg, load_sft_examples)
    schedule = schedule_for(cfg, len(examples))
    teacher = load_frozen(ctx, cfg.kd.teacher_pretrain)
    student = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", Student, schedule.total_steps)
    if student.hf_model().config.vocab_size != teacher_vocab_size(teacher):
        raise ValueError(f"kd.teacher_pretrain has vocab_size {teacher_vocab_size(teacher)}, the student "
                         f"{student.hf_model().config.vocab_size}: distillation needs a shared tokenizer")
    run_eval = (lambda: evaluate(ctx, student, teacher, eval_examples)) if eval_examples else None
    train_step = token_loss_step(ctx, student, examples, schedule, kd_loss_fn(cfg, teacher))
    return train_schedule(ctx, {"actor": student}, schedule, train_step, evaluate=run_eval,
                          save=lambda: save_model(ctx, student, "actor"))
