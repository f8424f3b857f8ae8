"""Process reward model training (train.trainer: prm): a label for every reasoning step (OpenRLHF's PRM).

    python -m hpc_rlhf.train --config configs/prm_tiny.yaml

Rows {input, label}: the input text ends each step with `prm.placeholder_token` (one token), and the label column
lists one label per step, a token of `prm.reward_tokens` = [good, bad] (e.g. "+" / "-"). The model is a causal LM;
at each placeholder position its logits, restricted to the two reward tokens, classify the step (`prm_loss`), so a
step's reward is p(good token) at its placeholder. Loss and step accuracy are averaged over every labelled step of
the step's batch; held-out rows (`eval.data`) give eval/loss and eval/accuracy. Saved to RUN_DIR/hf/prm (a causal LM
that `AutoModelForCausalLM.from_pretrained` loads).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from hpc_rlhf.algos import IGNORE_INDEX, prm_loss
from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import DatasetError, RowRef, iter_records
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    TrainerContext,
    build_context,
    evaluation_sums,
    load_train_and_eval,
    load_trainable,
    response_logits,
    save_model,
    schedule_for,
    token_loss_step,
    train_schedule,
)
from hpc_rlhf.trainers.supervised_data import LoadReport, TextEncoder, encode_rows, field_of
from hpc_rlhf.training.batching import MicroBatch, TokenSample
from hpc_rlhf.training.deepspeed_setup import EngineConfig
from hpc_rlhf.training.models import Actor, LossResult
from hpc_rlhf.training.forwards import ForwardOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STEP_LABEL = "step_label"  # response tensor: 0 = good, 1 = bad, IGNORE_INDEX elsewhere


@dataclass(frozen=True)
class StepExample:
    """Token ids of one row and the class (0 good, 1 bad) of each placeholder, IGNORE_INDEX elsewhere."""

    input_ids: tuple[int, ...]
    step_labels: tuple[int, ...]

    def to_sample(self) -> TokenSample:
        """The first token is the prompt; every later token is a response token, trained where it is a step."""
        labels = torch.tensor(self.step_labels[1:], dtype=torch.long)
        return TokenSample(prompt_ids=torch.tensor(self.input_ids[:1]), response_ids=torch.tensor(self.input_ids[1:]),
                           action_mask=labels != IGNORE_INDEX, response_tensors={STEP_LABEL: labels})


@dataclass
class StepOutput(ForwardOutput):
    """ForwardOutput plus the [S, A, 2] (good, bad) logits at every response position."""

    step_logits: Optional[torch.Tensor] = None


class StepRewardModel(Actor):
    """A causal LM whose logits at the placeholder positions, over the two reward tokens, classify each step."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                 num_training_steps: int, *,
                 reward_token_ids: Sequence[int]) -> None:
        self.reward_token_ids = list(reward_token_ids)
        super().__init__(model, cfg, dp_group, num_training_steps)

    def forward(self, batch: MicroBatch) -> StepOutput:
        logits = response_logits(self.engine, batch, self.device, shift=0)  # a step's own position, not the next
        return StepOutput(step_logits=logits[..., self.reward_token_ids].float())


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str, key: str) -> int:
    """The id of `text` when it is exactly one token; else a clear error naming the config key."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{key} {text!r} is {len(ids)} tokens for this tokenizer ({ids}); it must be exactly one")
    return ids[0]


def load_step_examples(path: str, cfg: Config, tokenizer: PreTrainedTokenizerBase, *,
                       max_samples: Optional[int] = None) -> tuple[list[StepExample], LoadReport]:
    """Rows {input, label} -> StepExamples; a row whose placeholder count differs from its labels is an error.
    Several datasets are read one after another (data.dataset_probs does not mix them for prm)."""
    data, prm = cfg.data, cfg.prm
    placeholder = single_token_id(tokenizer, prm.placeholder_token, "prm.placeholder_token")
    classes = {token: index for index, token in enumerate(prm.reward_tokens)}
    encoder = TextEncoder.from_config(cfg, tokenizer)
    return encode_rows(path, itertools.islice(iter_records(path), max_samples),
                       lambda row, where: encode_steps(row, where, encoder, placeholder, classes, data.input_key,
                                                       data.label_key))


def encode_steps(row: dict, where: RowRef, encoder: TextEncoder, placeholder: int, classes: dict[str, int],
                 input_key: str, label_key: Optional[str]) -> Optional[StepExample]:
    """One row's ids (cut to data.max_len) and per-token step classes; None when no labelled step survives the cut."""
    if not label_key:
        raise ValueError("prm needs data.label_key: the column listing one label per step")
    labels = field_of(row, label_key, where)
    if not isinstance(labels, list):
        raise DatasetError(f"key {label_key!r} of {where} must be a list of step labels, got {type(labels).__name__}")
    ids = encoder.prompt_ids(encoder.prompt_text(field_of(row, input_key, where), where))
    positions = [i for i, token in enumerate(ids) if token == placeholder]
    if len(positions) != len(labels):
        raise DatasetError(f"{where} has {len(positions)} step placeholders but {len(labels)} labels in "
                           f"{label_key!r}; each step must end with the placeholder token")
    step_labels = [IGNORE_INDEX] * len(ids)
    for position, label in zip(positions, labels):
        if label not in classes:
            raise DatasetError(f"label {label!r} of {where} is not one of prm.reward_tokens {list(classes)}")
        step_labels[position] = classes[label]
    ids, step_labels = ids[: encoder.max_len], step_labels[: encoder.max_len]
    if all(label == IGNORE_INDEX for label in step_labels[1:]):
        return None
    return StepExample(tuple(ids), tuple(step_labels))


def step_loss(batch: MicroBatch, output: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) over the labelled steps of a micro-batch, via `prm_loss`."""
    device = output.step_logits.device
    labels = batch.response_tensors[STEP_LABEL].to(device)
    labels = torch.where(batch.action_mask.to(device), labels, torch.full_like(labels, IGNORE_INDEX))
    steps = batch.action_mask.to(device).long()  # 1 marks a labelled step: the "placeholder" of prm_loss here
    return prm_loss(output.step_logits, steps, labels, placeholder_token_id=1)


def prm_loss_fn(batch: MicroBatch, output: StepOutput) -> LossResult:
    loss, accuracy = step_loss(batch, output)
    return loss, {"accuracy": accuracy}


def evaluate(ctx: TrainerContext, model: StepRewardModel, examples: Sequence[StepExample]) -> dict[str, float]:
    """eval/loss and eval/accuracy over every labelled held-out step of all ranks."""
    def sums(batch: MicroBatch, output: StepOutput) -> dict[str, float]:
        loss, accuracy = step_loss(batch, output)
        count = batch.num_action_tokens
        return {"loss": float(loss) * count, "correct": float(accuracy) * count, "steps": count}

    totals = evaluation_sums(ctx, model, examples, sums)
    return {"eval/loss": totals["loss"] / totals["steps"], "eval/accuracy": totals["correct"] / totals["steps"]}


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Train a process reward model on data.dataset; every rank calls this."""
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    examples, eval_examples = load_train_and_eval(ctx, cfg, load_step_examples)
    reward_ids = [single_token_id(ctx.tokenizer, token, "prm.reward_tokens") for token in cfg.prm.reward_tokens]
    schedule = schedule_for(cfg, len(examples))
    model = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", StepRewardModel, schedule.total_steps,
                           reward_token_ids=reward_ids)
    run_eval = (lambda: evaluate(ctx, model, eval_examples)) if eval_examples else None
    train_step = token_loss_step(ctx, model, examples, schedule, prm_loss_fn)
    return train_schedule(ctx, {"actor": model}, schedule, train_step, evaluate=run_eval,
                          save=lambda: save_model(ctx, model, "prm"))
