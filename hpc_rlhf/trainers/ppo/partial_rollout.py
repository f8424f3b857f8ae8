"""Partial rollouts (rollout.partial_rollout): generation pauses after a token budget per tick, the weights are
updated, and the unfinished responses continue with the new weights in the next tick.

At every tick a generator engine first continues the unfinished responses of the iterations it carries, oldest first,
each by at most rollout.partial_rollout_max_new_tokens further tokens (an iteration that is trained in this tick,
iteration + rollout.async_queue == tick, is finished whatever its length), then starts the tick's own iteration with
that budget. A response is finished at an eos / stop token or at rollout.generate_max_len tokens; an engine writes
an iteration's shard when all its responses are finished, and the first generator rank completes the iteration in
the tick that trains it. A row's weight_version is the oldest version that produced one of its tokens; its `extra`
JSON lists every version (`weight_versions`); each behaviour log-prob is the one of the weights that drew the token.

The carried responses of each tick are written to RUN_DIR/rollouts/partial/ after the tick's generation, so a run
resumed from the checkpoint of that tick continues them exactly as the uninterrupted run did. Only the files of ticks
whose checkpoint is kept stay: the others are deleted at the end of their tick.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import PromptExample
from hpc_rlhf.generation import SingleTurnExecutor, Trajectory
from hpc_rlhf.rewards import RewardSource
from hpc_rlhf.rollouts import ShardWriter, committed_shards, generator_shard_name
from hpc_rlhf.rollouts.atomic import atomic_write_bytes
from hpc_rlhf.rollouts.paths import rollouts_dir
from hpc_rlhf.run.checkpoint import complete_checkpoints
from hpc_rlhf.trainers.generation_setup import behaviour_log_probs_used, sampling_params, sampling_seed
from hpc_rlhf.trainers.ppo.rollout_stage import (
    encode_prompts,
    engine_prompt_indices,
    score_trajectories,
    trajectory_rows,
)

PARTIAL_DIR = "partial"


@dataclass
class Response:
    """One response in progress (or finished, waiting for the rest of its iteration)."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the weight versions that produced its tokens, in order
    finish_reason: str = "length"
    finished: bool = False


@dataclass
class CarriedIteration:
    """An iteration an engine has started and not yet written: its prompts (indices into the prompt list) and
    responses, n per prompt, prompt-major."""

    iteration: int
    prompt_indices: list[int]
    responses: list[Response]

    def unfinished(self) -> list[int]:
        return [k for k, r in enumerate(self.responses) if not r.finished]


@dataclass
class TickOutcome:
    """What one engine's partial-rollout step did in one tick, for metrics."""

    response_tokens: int = 0
    samples_written: int = 0
    carried_responses: int = 0  # unfinished responses left for the next tick
    seconds: float = 0.0


def snapshot_path(run_dir: str | Path, tick: int, engine: int) -> Path:
    """Where an engine's carried responses after `tick`'s generation are kept."""
    return rollouts_dir(run_dir) / PARTIAL_DIR / f"tick_{tick:06d}" / f"{generator_shard_name(engine)}.json"


def save_carried(run_dir: str | Path, tick: int, engine: int, carried: Sequence[CarriedIteration]) -> None:
    """Write the carried iterations durably (JSON keeps every float exactly)."""
    body = json.dumps([asdict(c) for c in carried], sort_keys=True).encode()
    path = snapshot_path(run_dir, tick, engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, body)


def load_carried(run_dir: str | Path, tick: int, engine: int) -> Optional[list[CarriedIteration]]:
    """The carried iterations saved after `tick` (None when that tick saved none)."""
    path = snapshot_path(run_dir, tick, engine)
    if not path.exists():
        return None
    return [CarriedIteration(iteration=c["iteration"], prompt_indices=c["prompt_indices"],
                             responses=[Response(**r) for r in c["responses"]]) for c in json.loads(path.read_text())]


def snapshot_ticks(run_dir: str | Path, engine: int) -> list[int]:
    """The ticks whose carried responses of `engine` are on disk, in order."""
    name = f"{generator_shard_name(engine)}.json"
    folder = rollouts_dir(run_dir) / PARTIAL_DIR
    return sorted(int(d.name.removeprefix("tick_")) for d in folder.glob("tick_*") if (d / name).exists())


def resume_tick(next_iteration: int, async_queue: int) -> int:
    """The tick after which a checkpoint that resumes at `next_iteration` was taken."""
    return next_iteration + async_queue - 1


def carried_shards(run_dir: str | Path, tick: int, engines: int) -> dict[int, set[str]]:
    """Iteration -> the generator shards still carried after `tick` (what a resume may find uncommitted)."""
    out: dict[int, set[str]] = {}
    for engine in range(engines):
        for carried in load_carried(run_dir, tick, engine) or []:
            out.setdefault(carried.iteration, set()).add(generator_shard_name(engine))
    return out


class PartialRollouts:
    """One generator engine's partial-rollout state and its step per tick."""

    def __init__(self, cfg: Config, *, engine_index: int, num_engines: int, executor: SingleTurnExecutor,
                 tokenizer: PreTrainedTokenizerBase, prompts: Sequence[PromptExample],
                 reward_source: Optional[RewardSource], writes: bool) -> None:
        self.cfg, self.engine_index, self.num_engines = cfg, engine_index, num_engines
        self.executor, self.tokenizer, self.prompts = executor, tokenizer, prompts
        self.reward_source, self.writes = reward_source, writes
        self.carried: list[CarriedIteration] = []
        self.done_through = -1  # ticks up to this one were generated before a resume

    def restore(self, start: int) -> None:
        """On a resume at iteration `start`: the ticks up to start + async_queue - 1 ran before the checkpoint;
        carry what the last of them left."""
        if start == 0:
            return
        self.done_through = resume_tick(start, self.cfg.rollout.async_queue)
        self.carried = load_carried(self.cfg.train.run_dir, self.done_through, self.engine_index) or []

    def settle(self, tick: int, checkpoint_root: str | Path, *, saved: bool) -> None:
        """At the end of `tick`, after its checkpoint (`saved`: one was taken): keep the carried responses of the
        ticks that the complete checkpoints resume after, delete this engine's others up to `tick`."""
        if not self.writes:
            return
        run_dir, queue = self.cfg.train.run_dir, self.cfg.rollout.async_queue
        keep = {resume_tick(step, queue) for step, _ in complete_checkpoints(checkpoint_root)}
        if saved:  # complete by now; listed here in case its marker is not visible on this node yet
            keep.add(tick)
        for old in snapshot_ticks(run_dir, self.engine_index):
            if old <= tick and old not in keep:
                path = snapshot_path(run_dir, old, self.engine_index)
                path.unlink(missing_ok=True)
                try:  # the last engine to leave the tick's folder removes it
                    os.rmdir(path.parent)
                except OSError:
                    pass

    @property
    def pending(self) -> bool:
        return bool(self.carried)

    def step(self, tick: int, weight_version: int, total: int) -> TickOutcome:
        """Continue the carried iterations, then start iteration `tick` (when < total); write finished ones."""
        outcome = TickOutcome()
        if tick <= self.done_through:
            return outcome
        start = time.perf_counter()
        rollout = self.cfg.rollout
        for carried in list(self.carried):
            due = carried.iteration + rollout.async_queue <= tick
            budget = rollout.generate_max_len if due else rollout.partial_rollout_max_new_tokens
            outcome.response_tokens += self._extend(carried, carried.unfinished(), budget, weight_version,
                                                    tick - carried.iteration)
            if due:  # trained in this tick: whatever stopped a response (e.g. the engine's max length) ends it
                for response in carried.responses:
                    response.finished = True
            outcome.samples_written += self._write_if_finished(carried)
        if tick < total:
            carried = self._start(tick)
            outcome.response_tokens += self._extend(carried, list(range(len(carried.responses))),
                                                    rollout.partial_rollout_max_new_tokens, weight_version, 0)
            self.carried.append(carried)
            outcome.samples_written += self._write_if_finished(carried)
        outcome.carried_responses = sum(len(c.unfinished()) for c in self.carried)
        if self.writes:
            save_carried(self.cfg.train.run_dir, tick, self.engine_index, self.carried)
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _start(self, iteration: int) -> CarriedIteration:
        """This engine's prompts of `iteration` (as run_generation picks them), each with n empty responses."""
        cfg = self.cfg
        indices = engine_prompt_indices(cfg, iteration, len(self.prompts), self.engine_index, self.num_engines)
        ids = encode_prompts(cfg, self.tokenizer, [self.prompts[i].prompt for i in indices])
        n = cfg.rollout.n_samples_per_prompt
        return CarriedIteration(iteration=iteration, prompt_indices=list(indices),
                                responses=[Response(prompt_ids=list(p)) for p in ids for _ in range(n)])

    def _extend(self, carried: CarriedIteration, rows: list[int], budget: int, version: int, round_: int) -> int:
        """Generate up to `budget` further tokens for the responses `rows` (context: prompt + response so far)."""
        if not rows:
            return 0
        max_len = self.cfg.rollout.generate_max_len
        seed = sampling_seed(self.cfg.train.seed, carried.iteration, self.engine_index + round_ * self.num_engines)
        params = sampling_params(self.cfg, seed, n=1, eos_token_id=self.tokenizer.eos_token_id)
        budgets = sorted({min(budget, max_len - len(carried.responses[k].response_ids)) for k in rows})
        added = 0
        for size in budgets:  # one generate call per remaining budget (rows sharing a budget go together)
            group = [k for k in rows if min(budget, max_len - len(carried.responses[k].response_ids)) == size]
            contexts = [carried.responses[k].prompt_ids + carried.responses[k].response_ids for k in group]
            outputs = self.executor.engine.generate(contexts, params.replace(max_new_tokens=size))
            for k, samples in zip(group, outputs):
                sample, response = samples[0], carried.responses[k]
                response.response_ids += list(sample.response_ids)
                response.log_probs += [float(x) for x in sample.log_probs]
                response.versions += [version] * len(sample.response_ids)
                response.finish_reason = sample.finish_reason
                response.finished = sample.finish_reason == "stop" or len(response.response_ids) >= max_len
                added += len(sample.response_ids)
        return added

    def _write_if_finished(self, carried: CarriedIteration) -> int:
        """Score and write the iteration's shard when all its responses are finished; returns the rows written."""
        if carried.unfinished():
            return 0
        self.carried.remove(carried)
        cfg, n = self.cfg, self.cfg.rollout.n_samples_per_prompt
        prompts = [self.prompts[i] for i in carried.prompt_indices]
        trajectories = [Trajectory(prompt_ids=r.prompt_ids, response_ids=r.response_ids,
                                   action_mask=[1] * len(r.response_ids), log_probs=r.log_probs,
                                   finish_reason=r.finish_reason,
                                   extra_logs={"weight_versions": sorted(set(r.versions))})
                        for r in carried.responses]
        rewards = scores = None
        if self.reward_source is not None and trajectories:
            rewards, scores, _ = score_trajectories(self.reward_source, self.tokenizer,
                                                    [p for p in prompts for _ in range(n)],
                                                    [p.prompt for p in prompts for _ in range(n)], trajectories)
        per_engine = cfg.rollout.batch_size // self.num_engines
        rows = trajectory_rows(trajectories, prompts, self.engine_index * per_engine, n, 0, rewards, scores,
                               log_probs=behaviour_log_probs_used(cfg))
        for row, response in zip(rows, carried.responses):
            row["weight_version"] = min(response.versions)  # the oldest: staleness stays conservative
        shard = generator_shard_name(self.engine_index)
        if self.writes and shard not in committed_shards(cfg.train.run_dir, carried.iteration):
            ShardWriter(cfg.train.run_dir).write(carried.iteration, shard, rows)
        return len(rows)


def outcome_metrics(outcome: TickOutcome) -> dict[str, Any]:
    """One engine's tick in the metric families of run/rank_metrics.py (logged as count/generate_samples,
    count/generate_carried_samples and throughput/generate_tokens_per_s)."""
    return {"sum/generate_tokens": float(outcome.response_tokens),
            "sum/generate_samples": float(outcome.samples_written),
            "sum/generate_carried_samples": float(outcome.carried_responses),
            "max/generate_s": outcome.seconds, "max/generate_engine_s": outcome.seconds}
