"""Shared loop pieces of the supervised and preference trainers: sft, rm, dpo, iterative_dpo, kto, prm, kd and
rejection_sampling.

These trainers run every rank as a data-parallel actor (layout.colocate: true); `launch` hands them the same world,
role groups and control plane as the PPO loop. What they share lives here:
- `TrainerContext`: config, world, the actor (data-parallel) group, control plane, stop request, tokenizer;
- `StepSchedule`: which dataset rows each rank trains on at each optimizer step, a pure function of (seed, step), so a
  resumed run sees exactly the rows the interrupted one would have seen;
- `StepLoop`: the optimizer steps with evaluation every `eval.steps`, checkpoints every `ckpt.save_steps` and on a stop
  request (SLURM time limit, preemption), stop agreement over the control plane, and metrics (TensorBoard, JSONL);
- `train_schedule`: a one-schedule run from resume to `finish` (final evaluation, Hugging Face models), or after a
  stop checkpoint the requeue;
- model loading (with LoRA), micro-batching, the step of a per-token loss, held-out sums, per-sample values (summed
  log-probs, scores) and saving Hugging Face models at the end.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import prompt_indices_for, rank_slice
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.training.lora import REWARD_STATS_FILE, is_lora_model, load_model_for_training, unwrap
from hpc_rlhf.run.metrics import MetricsLogger, plot_curves, wandb_settings
from hpc_rlhf.run.rank_metrics import timed
from hpc_rlhf.slurm.requeue import StopRequest, combine_stop_reasons, leave_for_requeue
from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.trainers.checkpointing import CheckpointService
from hpc_rlhf.trainers.engines import engine_config, lora_settings
from hpc_rlhf.trainers.supervised_data import LoadReport, PairExample
from hpc_rlhf.training.batching import MicroBatch, TokenSample, make_micro_batches, response_token_index
from hpc_rlhf.training.deepspeed_setup import EngineConfig, all_reduce_in_group
from hpc_rlhf.training.models import LossFn, Reference
from hpc_rlhf.training.forwards import ForwardOutput, model_inputs
from hpc_rlhf.training.models import TrainedModel

T = TypeVar("T")
Trained = TypeVar("Trained", bound=TrainedModel)
Metrics = dict[str, float]
# One tensor per micro-batch, indexed like its samples ([S]): e.g. summed log-probs or scores.
SampleValue = Callable[[MicroBatch, ForwardOutput], torch.Tensor]


class Example(Protocol):
    """A dataset row that trains as one TokenSample (supervised_data.Encoded, prm.StepExample)."""

    def to_sample(self) -> TokenSample: ...

# Curves drawn into RUN_DIR/curves.png by these trainers.
PLOT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train/loss", "eval/loss")),
    ("accuracy", ("train/accuracy", "eval/accuracy")),
    ("reward", ("rollout/reward_mean", "rollout/best_reward_mean", "eval/reward_mean")),
)


# ----- context ----------------------------------------------------------------------------------------------------
@dataclass
class TrainerContext:
    """What every supervised trainer works with on one rank."""

    cfg: Config
    world: DistributedWorld
    groups: RoleGroups
    control: ControlPlane
    stop: Optional[StopRequest]  # the job's stop request: after a stop checkpoint the job is requeued when it asks
    should_stop: Callable[[], bool]
    tokenizer: PreTrainedTokenizerBase

    @property
    def rank(self) -> int:
        return self.world.info.rank

    @property
    def is_main(self) -> bool:
        return self.world.info.rank == 0

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The actor group: every rank of the job, the data-parallel group of the trained model."""
        return self.groups.group("actor")

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica: its place in the actor group, or with ds.tensor_parallel_size > 1 its
        tensor-parallel block (consecutive ranks, which train on the same rows)."""
        return dist.get_rank(self.dp_group) // self.cfg.ds.tensor_parallel_size

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp_group) // self.cfg.ds.tensor_parallel_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def info(self, message: str) -> None:
        """Print a line on rank 0 (stderr, like the metrics lines)."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def build_context(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
                  stop: Optional[StopRequest] = None,
                  should_stop: Optional[Callable[[], bool]] = None) -> TrainerContext:
    """The context with the actor's tokenizer (pad = eos when the tokenizer has no pad token). Stop requests come
    from `stop` (the job's StopRequest) or, without one, from a bare `should_stop` (a stop that is not requeued)."""
    if should_stop is None and stop is not None:
        should_stop = stop.should_stop
    # DeepSpeed insists on LOCAL_RANK in the environment; a single local process has no launcher that sets it.
    os.environ.setdefault("LOCAL_RANK", str(world.info.local_rank))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.actor.pretrain))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TrainerContext(cfg=cfg, world=world, groups=groups, control=control, stop=stop,
                          should_stop=should_stop or (lambda: False), tokenizer=tokenizer)


def actor_engine_config(cfg: Config) -> EngineConfig:
    """DeepSpeed settings of the trained model: `ds.*`, `actor.*` and the train batch sizes."""
    return engine_config(cfg, cfg.actor)


def load_trainable(ctx: TrainerContext, path: str, kind: str, wrapper: Callable[..., Trained], total_steps: int,
                   **kwargs: Any) -> Trained:
    """Load `path` as a causal LM or a sequence classifier (LoRA-wrapped when lora.rank > 0) and put it on a training
    engine over the actor group with `wrapper(model, engine_config, group, total_steps, **kwargs)`."""
    engine_cfg = actor_engine_config(ctx.cfg)
    model = load_model_for_training(resolve_model_path(path), kind, lora_settings(ctx.cfg),
                                    dtype=engine_cfg.torch_dtype, attn_implementation=engine_cfg.attn_implementation)
    return wrapper(model, engine_cfg, ctx.dp_group, max(total_steps, 1), **kwargs)


def load_frozen(ctx: TrainerContext, path: str) -> Reference:
    """A frozen causal LM (reference, teacher) over the actor group: ZeRO-3 partitioned when ds.zero_stage is 3."""
    return Reference.from_pretrained(resolve_model_path(path), actor_engine_config(ctx.cfg), ctx.dp_group)


# ----- schedule ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSchedule:
    """Optimizer steps over a dataset: each epoch a fresh permutation (seed, epoch), each step the next block of
    `batch_size` rows (the tail of an epoch is dropped), each rank a contiguous slice of the block."""

    num_examples: int
    batch_size: int
    epochs: int
    seed: int
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and epochs ({self.epochs}) must be >= 1")
        if self.num_examples < self.batch_size:
            raise ValueError(f"the dataset has {self.num_examples} usable rows, fewer than train.train_batch_size="
                             f"{self.batch_size}: not one optimizer step can be formed")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def indices(self, step: int, *, rank: int, num_ranks: int) -> list[int]:
        """The rows rank `rank` of `num_ranks` trains on at optimizer step `step`."""
        epoch, iteration = divmod(step, self.steps_per_epoch)
        return prompt_indices_for(self.num_examples, seed=self.seed, epoch=epoch, iteration=iteration,
                                  rollout_batch_size=self.batch_size, rank=rank, num_ranks=num_ranks)


def load_train_and_eval(ctx: TrainerContext, cfg: Config,
                        loader: Callable[..., tuple[list[T], LoadReport]]) -> tuple[list[T], list[T]]:
    """Training rows from data.dataset and held-out rows from eval.data (empty without it), each reported once.

    `loader(path, cfg, tokenizer, max_samples=...)` returns (examples, report), like `load_sft_examples`.
    """
    examples, report = loader(cfg.data.dataset, cfg, ctx.tokenizer, max_samples=cfg.data.max_samples)
    ctx.info(report.summary())
    eval_examples: list[T] = []
    if cfg.eval.data:
        eval_examples, eval_report = loader(cfg.eval.data, cfg, ctx.tokenizer, max_samples=cfg.eval.max_samples)
        ctx.info(eval_report.summary())
    return examples, eval_examples


def schedule_for(cfg: Config, num_examples: int) -> StepSchedule:
    """The run's schedule: train.train_batch_size rows per step, train.max_epochs passes, train.max_iterations cap."""
    return StepSchedule(num_examples=num_examples, batch_size=cfg.train.train_batch_size,
                        epochs=cfg.train.max_epochs, seed=cfg.train.seed, max_steps=cfg.train.max_iterations)


def rows_of_step(ctx: TrainerContext, schedule: StepSchedule, items: Sequence[T], step: int) -> list[T]:
    """This rank's rows of `items` at optimizer step `step`."""
    return [items[i] for i in schedule.indices(step, rank=ctx.dp_rank, num_ranks=ctx.dp_size)]


def shard(items: Sequence[T], rank: int, num_ranks: int) -> list[T]:
    """This rank's contiguous share of `items` (the first ranks take one more when they do not divide evenly)."""
    start, stop = rank_slice(len(items), rank=rank, num_ranks=num_ranks)
    return list(items[start:stop])


# ----- micro-batches and per-sequence values ----------------------------------------------------------------------
def micro_batches(cfg: Config, samples: Sequence[TokenSample], pad_token_id: int, *,
                  group: int = 1) -> list[MicroBatch]:
    """Training micro-batches as train.* asks, for every trainer: `micro_train_batch_size` samples (x `group` samples
    kept together, e.g. 2 for a chosen/rejected pair) or the `max_tokens_per_microbatch` budget; packed when
    `packing_samples`."""
    train = cfg.train
    if train.max_tokens_per_microbatch is not None and group == 1:
        return make_micro_batches(samples, max_tokens_per_microbatch=train.max_tokens_per_microbatch,
                                  packing=train.packing_samples, pad_token_id=pad_token_id)
    return make_micro_batches(samples, micro_batch_size=train.micro_train_batch_size * group,
                              packing=train.packing_samples, pad_token_id=pad_token_id)


def sequence_log_probs(log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[S] sums of the trained tokens' log-probs, from response-layout [S, A] log-probs and mask."""
    return (log_probs * action_mask.to(log_probs.device, log_probs.dtype)).sum(dim=-1)


def pair_samples(pairs: Sequence[PairExample]) -> list[TokenSample]:
    """[chosen 0, rejected 0, chosen 1, rejected 1, ...]: a pair stays together in a micro-batch (rm, dpo)."""
    return [s for pair in pairs for s in (pair.chosen.to_sample(), pair.rejected.to_sample())]


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample values of interleaved pairs -> (chosen [P], rejected [P])."""
    if values.shape[0] % 2:
        raise ValueError(f"interleaved pairs need an even number of samples, got {values.shape[0]}")
    return values[0::2], values[1::2]


def per_sample(values: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """The entries of a per-sample tensor (indexed like the list the micro-batch was made from) for `batch`."""
    return values[batch.sample_indices.to(values.device)]


def per_sample_values(ctx: TrainerContext, model: Reference | TrainedModel, samples: Sequence[TokenSample],
                      value: SampleValue, *, group: int = 1) -> torch.Tensor:
    """[N] float32: `value(batch, output)` of every sample of this rank's `samples` (at least one), run through
    `model` without gradients in micro-batches of `group`-sample units; all ranks call together."""
    if not samples:
        raise ValueError("per-sample values need at least one sample on every rank")
    batches = micro_batches(ctx.cfg, samples, ctx.pad_token_id, group=group)
    result = torch.zeros(len(samples), dtype=torch.float32)
    for batch, output in zip(batches, model.infer(batches)):
        result[batch.sample_indices] = value(batch, output).float().cpu()
    return result


def sample_log_probs(ctx: TrainerContext, model: Reference | TrainedModel, samples: Sequence[TokenSample], *,
                     group: int = 1) -> torch.Tensor:
    """[N] summed log-probs of this rank's `samples` (at least one) without gradients; all ranks call together."""
    return per_sample_values(ctx, model, samples,
                             lambda batch, output: sequence_log_probs(output.log_probs, batch.action_mask), group=group)


def all_ranks_sequence_log_probs(ctx: TrainerContext, model: Reference, samples: Sequence[TokenSample]) -> torch.Tensor:
    """[N] summed log-probs of every sample under a frozen model: each rank computes a slice, then all share them.
    (With fewer samples than ranks every rank computes them all.)"""
    if len(samples) < ctx.dp_size:
        return sample_log_probs(ctx, model, samples)
    mine = sample_log_probs(ctx, model, shard(samples, ctx.dp_rank, ctx.dp_size)).tolist()
    gathered = ctx.control.allgather_object(mine)
    return torch.tensor([value for part in gathered for value in part], dtype=torch.float32)


def all_reduce_sums(model: TrainedModel, sums: Mapping[str, float]) -> dict[str, float]:
    """Sum a few named floats over the model's data-parallel group (all ranks call with the same keys)."""
    keys = sorted(sums)
    totals = all_reduce_in_group([float(sums[k]) for k in keys], dist.ReduceOp.SUM, model.mpu)
    return dict(zip(keys, totals))


def token_loss_step(ctx: TrainerContext, model: TrainedModel, examples: Sequence[Example], schedule: StepSchedule,
                    loss_fn: LossFn) -> Callable[[int], Metrics]:
    """The optimizer step of a per-token loss (sft, kd, prm): step s trains this rank's rows of schedule step s, the
    loss a mean over every trained token of the step (all micro-batches of all ranks)."""
    def train_step(step: int) -> Metrics:
        samples = [row.to_sample() for row in rows_of_step(ctx, schedule, examples, step)]
        return finite_metrics(model.train_step(micro_batches(ctx.cfg, samples, ctx.pad_token_id), loss_fn, "token"))

    return train_step


# ----- the step loop ----------------------------------------------------------------------------------------------
@dataclass
class StepProgress:
    """Where a run stands, as its checkpoints record it: the next optimizer step to train."""

    next_step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.next_step = int(state.get("next_step", 0))


@dataclass
class RoundProgress(StepProgress):
    """Where a run that samples in rounds stands: also the round and the step that round's training started at."""

    round: int = 0
    round_start: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "round_start": self.round_start, "next_step": self.next_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.round = int(state.get("round", 0))
        self.round_start = int(state.get("round_start", 0))


class StepLoop:
    """Optimizer steps with evaluation, checkpoints, stop agreement and metrics; every rank drives one.

    Checkpoints (`CheckpointService`) go to RUN_DIR/checkpoints/iter_<next step> with the engines in `engines` (their
    weights, optimizer and scheduler states), every rank's RNG state and `progress`; `restore` loads the newest one.
    """

    def __init__(self, ctx: TrainerContext, engines: Mapping[str, Optional[TrainedModel]], *,
                 total_steps: Optional[int], progress: Optional[StepProgress] = None) -> None:
        self.ctx = ctx
        self.progress = progress if progress is not None else StepProgress()
        self.checkpoint = CheckpointService(ctx.cfg, rank=ctx.rank, world_size=ctx.world.info.world_size,
                                            control=ctx.control, engines=engines, trainer=self.progress)
        logger_cfg = ctx.cfg.logger
        start_hint = int(self.checkpoint.resume_state().get("next_step", 0))
        self.logger = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, use_tensorboard=logger_cfg.use_tensorboard,
                                    progress_bar=logger_cfg.progress_bar, total_steps=total_steps,
                                    logging_steps=logger_cfg.logging_steps, start_step=start_hint,
                                    wandb=wandb_settings(ctx.cfg))
        self.last_metrics: dict[str, float] = {}
        self.evaluated_at: Optional[int] = None  # the step count after which the last evaluation ran
        self.trained = engines.get("actor")  # the model RUN_DIR/hf/best keeps (ckpt.best_metric_key)

    def restore(self) -> StepProgress:
        """Load the newest complete checkpoint into the engines, RNG and progress; returns the progress (a fresh
        one without a checkpoint)."""
        path = self.checkpoint.restore()
        if path is not None:
            self.ctx.info(f"resumed from {path} at step {self.progress.next_step}")
        return self.progress

    def save(self, next_step: int) -> Path:
        """A complete checkpoint named after `next_step`, the first step a resumed run will train."""
        self.progress.next_step = next_step
        return self.checkpoint.save(next_step)

    def agree_to_stop(self) -> bool:
        """Whether any rank was asked to stop (all ranks call it at the same points)."""
        return any(self.ctx.control.allgather_object(bool(self.ctx.should_stop())))

    def run(self, steps: Sequence[int], train_step: Callable[[int], dict[str, float]], *,
            evaluate: Optional[Callable[[], dict[str, float]]] = None) -> bool:
        """Train `steps` (global step numbers); returns True when the run was asked to stop (a checkpoint is saved).
        Checkpoints record `progress` (a round trainer sets its round first)."""
        cfg = self.ctx.cfg
        for step in steps:
            metrics: dict[str, float] = {}
            with timed(metrics, "step", prefix="time/"):  # one rank's time: the trainers log rank 0's metrics
                metrics.update(train_step(step))
            if evaluate is not None and cfg.eval.steps > 0 and (step + 1) % cfg.eval.steps == 0:
                metrics.update(evaluate())
                self.evaluated_at = step + 1
                self.keep_if_best(step + 1, metrics)
            stop = self.agree_to_stop()
            self.logger.log(step, metrics)
            self.last_metrics = metrics
            if self.checkpoint.due(step + 1, stop=stop):
                self.save(step + 1)
            if stop:
                self.ctx.info(f"stop requested: checkpoint saved after step {step}")
                return True
        return False

    def keep_if_best(self, steps_trained: int, metrics: Mapping[str, float]) -> None:
        """After an evaluation (its metrics are the same on every rank): keep the model as RUN_DIR/hf/best when
        ckpt.best_metric_key improved; all ranks call."""
        if self.trained is not None:
            self.checkpoint.keep_if_best(
                steps_trained, metrics,
                lambda out: save_model(self.ctx, self.trained, out.name, with_ema=False))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.logger.log(step, metrics)
        self.last_metrics = {**self.last_metrics, **metrics}

    def close(self) -> None:
        """Close the logger and draw RUN_DIR/curves.png from the logged loss/accuracy/reward."""
        self.logger.close(plot=False)
        if self.ctx.is_main and self.ctx.cfg.logger.plot:
            plot_curves(self.ctx.run_dir, panels=PLOT_PANELS)


# ----- saving -----------------------------------------------------------------------------------------------------
def save_model(ctx: TrainerContext, model: TrainedModel, name: str, *,
               config_updates: Optional[Mapping[str, Any]] = None, with_ema: bool = True) -> Path:
    """Write the trained model to RUN_DIR/hf/<name> with the tokenizer; all ranks call.

    A full model is a Hugging Face checkpoint (`from_pretrained` loads it); a LoRA model is its adapter
    (tools/merge_lora.py folds it into the base). `config_updates` are set on the model config before saving (for a
    LoRA model they go to reward_stats.json beside the adapter). A model with an EMA of its weights (actor.enable_ema)
    also writes the EMA to RUN_DIR/hf/<name>_ema (unless `with_ema` is False).
    """
    out = ctx.run_dir / "hf" / name
    hf_model = model.hf_model()
    updates = dict(config_updates or {})
    if is_lora_model(hf_model):
        model.save_lora_adapter(out)
        if model.dp_rank == 0:
            if updates:
                (out / REWARD_STATS_FILE).write_text(json.dumps(updates, indent=2) + "\n")
            ctx.tokenizer.save_pretrained(str(out))
    else:
        for key, value in updates.items():
            setattr(unwrap(hf_model).config, key, value)
        model.save_hf(out)
        if model.is_writer:
            ctx.tokenizer.save_pretrained(str(out))
    if with_ema and model.ema is not None:
        ema_out = ctx.run_dir / "hf" / f"{name}_ema"
        if is_lora_model(hf_model):
            model.save_lora_adapter(ema_out, ema=True)
        else:
            model.save_ema_hf(ema_out)
        if model.is_writer:
            ctx.tokenizer.save_pretrained(str(ema_out))
    ctx.control.barrier()
    ctx.info(f"saved {name} to {out}")
    return out


def eval_share(ctx: TrainerContext, items: Sequence[T]) -> tuple[list[T], float]:
    """This rank's evaluation items and the weight of its results (0 or 1). Every rank needs at least one item to run
    the model in step with the others; with fewer items than ranks rank 0 takes them all and the rest run a copy."""
    if not items:
        raise ValueError("the evaluation set is empty")
    if len(items) >= ctx.dp_size:
        return shard(items, ctx.dp_rank, ctx.dp_size), 1.0
    return (list(items), 1.0) if ctx.dp_rank == 0 else (list(items[:1]), 0.0)


def evaluation_sums(ctx: TrainerContext, model: TrainedModel, examples: Sequence[Example],
                    sums: Callable[[MicroBatch, ForwardOutput], Metrics]) -> Metrics:
    """Named sums over the held-out `examples` of all ranks: this rank's share runs through `model` without gradients
    and each micro-batch adds `sums(batch, output)` (e.g. its loss x its tokens, and its tokens); all ranks call."""
    mine, weight = eval_share(ctx, examples)
    batches = micro_batches(ctx.cfg, [example.to_sample() for example in mine], ctx.pad_token_id)
    totals: Metrics = {}
    for batch, output in zip(batches, model.infer(batches)):
        for key, value in sums(batch, output).items():
            totals[key] = totals.get(key, 0.0) + value * weight
    return all_reduce_sums(model, totals)


def finish(ctx: TrainerContext, loop: StepLoop, *, total_steps: int, stopped: bool,
           evaluate: Optional[Callable[[], dict[str, float]]],
           save: Optional[Callable[[], None]]) -> dict[str, float]:
    """End of a run: on a stop only close the logger; else a final evaluation (unless the last step had one), the
    Hugging Face models (ckpt.save_hf_model; `save` None: nothing was trained) and the curves. Returns the last
    metrics."""
    cfg = ctx.cfg
    if stopped:
        loop.close()
        if ctx.stop is not None:
            leave_after_stop(ctx)
        return {"stopped": 1.0, **loop.last_metrics}
    if evaluate is not None and loop.evaluated_at != total_steps:
        metrics = evaluate()
        loop.log(total_steps, metrics)
        loop.evaluated_at = total_steps
        loop.keep_if_best(total_steps, metrics)
    if cfg.ckpt.save_hf_model and save is not None:
        save()
    loop.close()
    return dict(loop.last_metrics)


def train_schedule(ctx: TrainerContext, engines: Mapping[str, Optional[TrainedModel]], schedule: StepSchedule,
                   train_step: Callable[[int], Metrics], *, evaluate: Optional[Callable[[], Metrics]],
                   save: Optional[Callable[[], None]]) -> Metrics:
    """A run of one schedule, start to end: resume from the newest checkpoint of `engines`, train the remaining steps
    (`StepLoop.run`), then `finish` (final evaluation and `save`, or after a stop the requeue)."""
    loop = StepLoop(ctx, engines, total_steps=schedule.total_steps)
    start = loop.restore().next_step
    stopped = loop.run(range(start, schedule.total_steps), train_step, evaluate=evaluate)
    return finish(ctx, loop, total_steps=schedule.total_steps, stopped=stopped, evaluate=evaluate, save=save)


def leave_after_stop(ctx: TrainerContext) -> NoReturn:
    """After a stop checkpoint: every rank leaves, and rank 0 requeues the job when a rank's stop asked for it (as the
    PPO recipe does); all ranks call."""
    ctx.control.barrier()
    reason = combine_stop_reasons(ctx.control.allgather_object(ctx.stop.request()))
    leave_for_requeue(ctx.rank, reason, ctx.cfg.slurm.max_requeue)


# ----- model inputs and per-token logits --------------------------------------------------------------------------
def response_logits(model: nn.Module, batch: MicroBatch, device: torch.device, *,
                    shift: int = 1) -> torch.Tensor:
    """[S, A, V] logits in the response layout: for response token j, the logits at its column minus `shift`
    (1: the position that predicts it; 0: the token's own position). Zero on padding."""
    rows, columns, sample, offset = response_token_index(batch)
    logits = model(**model_inputs(batch, device)).logits
    flat = logits[rows.to(device), (columns - shift).to(device)]
    out = flat.new_zeros((*batch.action_mask.shape, flat.shape[-1]))
    return out.index_put((sample.to(device), offset.to(device)), flat)


def finite_metrics(metrics: Mapping[str, float], prefix: str = "train/") -> dict[str, float]:
    """`metrics` under `prefix`, without NaN entries (e.g. the grad norm DeepSpeed does not compute under ZeRO-0)."""
    return {f"{prefix}{key}": float(value) for key, value in metrics.items() if value == value}
