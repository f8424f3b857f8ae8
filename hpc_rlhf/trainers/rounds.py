"""The round loop of the trainers that sample their own data: iterative DPO and rejection sampling.

Round r samples with the current policy (`Rounds.sample`: this rank's rows and metrics), gathers every rank's rows
into RUN_DIR/<trainer>/round_NNN.jsonl before anything else happens (a resumed run reuses a written round instead of
sampling it again), then trains on what the round gives (`Rounds.training`; optimizer steps are numbered on from
the previous rounds), evaluates, and agrees on a stop between rounds. Checkpoints record the round and the step its
training started at (`RoundProgress`), so a run stopped inside a round resumes inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hpc_rlhf.trainers.common import RoundProgress, StepLoop, StepSchedule, TrainerContext
from hpc_rlhf.trainers.sampling import mean_over_ranks
from hpc_rlhf.trainers.supervised_data import write_jsonl

Metrics = dict[str, float]


def round_schedule(ctx: TrainerContext, num_rows: int, round_index: int, rows_name: str) -> Optional[StepSchedule]:
    """The schedule of round `round_index`'s training on `num_rows` rows (train.* batch size and epochs, seed train.seed
    + round), or None, said in the log, when they do not fill one optimizer step."""
    train = ctx.cfg.train
    if num_rows < train.train_batch_size:
        ctx.info(f"round {round_index}: {num_rows} {rows_name}, fewer than train.train_batch_size="
                 f"{train.train_batch_size}; no training this round")
        return None
    return StepSchedule(num_examples=num_rows, batch_size=train.train_batch_size, epochs=train.max_epochs,
                        seed=train.seed + round_index)


@dataclass
class RoundTraining:
    """What one round trains: its schedule and the step function, called with the step number within the round."""

    schedule: StepSchedule
    train_step: Callable[[int], Metrics]


@dataclass
class Rounds:
    """A round trainer's parts: `sample(r)` -> (this rank's rows, its metrics); `training(r)` -> the round's
    training (None: too little data this round), or no `training` at all for a sampling-only run."""

    count: int
    directory: Path
    sample: Callable[[int], tuple[list[dict], Metrics]]
    training: Optional[Callable[[int], Optional[RoundTraining]]]
    evaluate: Optional[Callable[[], Metrics]]

    def path(self, round_index: int) -> Path:
        return self.directory / f"round_{round_index:03d}.jsonl"


def run_rounds(ctx: TrainerContext, loop: StepLoop, rounds: Rounds) -> tuple[bool, int]:
    """Resume, then run the remaining rounds; returns (stopped, optimizer steps trained so far)."""
    progress = loop.restore()
    if not isinstance(progress, RoundProgress):
        raise TypeError("a round trainer's StepLoop records RoundProgress")
    next_step, first_round, round_start = progress.next_step, progress.round, progress.round_start
    if rounds.evaluate is not None and next_step == 0 and first_round == 0:
        loop.log(0, rounds.evaluate())  # the starting point, to compare the rounds with
    for round_index in range(first_round, rounds.count):
        path = rounds.path(round_index)
        if not path.is_file():  # sample this round (a resumed run reuses a written round)
            rows, metrics = rounds.sample(round_index)
            gathered = ctx.control.allgather_object(rows)
            if ctx.is_main:
                write_jsonl([row for part in gathered for row in part], path)
            ctx.control.barrier()
            # Without training there are no optimizer steps: rounds are the steps of the curves.
            loop.log(round_start if rounds.training is not None else round_index,
                     {**mean_over_ranks(ctx, metrics), "rollout/round": float(round_index)})
        if rounds.training is not None:
            plan = rounds.training(round_index)
            if plan is not None:
                end = round_start + plan.schedule.total_steps
                progress.round, progress.round_start = round_index, round_start
                stopped = loop.run(range(max(next_step, round_start), end),
                                   lambda step, start=round_start, plan=plan: plan.train_step(step - start))
                if stopped:
                    return True, next_step
                next_step = round_start = end
            if rounds.evaluate is not None:
                loop.log(next_step, rounds.evaluate())
                loop.evaluated_at = next_step
        if round_index + 1 < rounds.count and loop.agree_to_stop():  # a stop between rounds: resume at the next
            progress.round, progress.round_start = round_index + 1, next_step
            loop.save(next_step)
            return True, next_step
    return False, next_step
