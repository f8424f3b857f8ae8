"""Rejection sampling / best-of-N (train.trainer: rejection_sampling): generate N, score, keep the best, write a
dataset for SFT; optionally fine-tune on it round after round (RAFT / ReST).

    python -m hpc_rlhf.train --config configs/rejection_sampling_tiny.yaml

Each of `rejection_sampling.rounds` rounds samples `rollout.n_samples_per_prompt` responses to `rollout.batch_size`
prompts of `data.prompt_data` (see `sampling`), scores them with the `reward:` source and keeps each prompt's best
response when its reward reaches `rejection_sampling.min_reward` (any, when empty). A round's kept rows are written to
RUN_DIR/rejection_sampling/round_NNN.jsonl before anything else happens, so a resumed run reuses them; at the end all
rounds are joined into `rejection_sampling.output_path` (default RUN_DIR/rejection_sampling.jsonl) as SFT rows
{data.input_key: the dataset's input, data.output_key: the kept response, "reward": its reward} (+ the label).
With `rejection_sampling.train_sft` the actor is fine-tuned after each round on every row kept so far
(`train.max_epochs` passes), with the SFT loss, and saved to RUN_DIR/hf/actor; held-out prompts (`eval.data`) are
answered and scored before the first and after every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers.common import (
    RoundProgress,
    StepLoop,
    build_context,
    finish,
    load_trainable,
    save_model,
    token_loss_step,
)
from hpc_rlhf.trainers.rounds import Rounds, RoundTraining, round_schedule, run_rounds
from hpc_rlhf.trainers.sampling import RoundSampler, ScoredGroup, load_eval_prompt_rows, load_prompt_rows
from hpc_rlhf.trainers.sft import nll_loss_fn
from hpc_rlhf.trainers.supervised_data import Encoded, read_jsonl, write_jsonl
from hpc_rlhf.training.models import Actor

ROUNDS_DIR = "rejection_sampling"
DEFAULT_OUTPUT = "rejection_sampling.jsonl"


def best_rows(groups: list[ScoredGroup], min_reward: Optional[float]) -> list[dict]:
    """Each prompt's best response (with token ids, for training) when its reward reaches `min_reward`."""
    rows = []
    for group in groups:
        best = group.best()
        if min_reward is not None and group.rewards[best] < min_reward:
            continue
        rows.append({"prompt_index": group.prompt.index, "input": group.prompt.raw_input,
                     "label": group.prompt.label, "response": group.response_texts[best],
                     "reward": group.rewards[best], "prompt_ids": list(group.prompt.prompt_ids),
                     "response_ids": group.response_ids[best]})
    return rows


def sft_rows(rows: list[dict], cfg: Config) -> list[dict]:
    """The kept rows in the dataset layout SFT reads (data.input_key / data.output_key / data.label_key)."""
    data = cfg.data
    out = []
    for row in rows:
        item = {data.input_key: row["input"], data.output_key: row["response"], "reward": row["reward"]}
        if data.label_key and row["label"] is not None:
            item[data.label_key] = row["label"]
        out.append(item)
    return out


def examples_from_rows(rows: list[dict], max_len: int) -> list[Encoded]:
    """Training examples straight from the kept token ids (never re-tokenized), cut to max_len."""
    examples = []
    for row in rows:
        room = max_len - len(row["prompt_ids"])
        if room >= 1 and row["response_ids"]:
            examples.append(Encoded(tuple(row["prompt_ids"]), tuple(row["response_ids"][:room])))
    return examples


def run(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
        stop: Optional[StopRequest] = None,
        should_stop: Optional[Callable[[], bool]] = None) -> dict[str, float]:
    """Best-of-N rounds (and RAFT fine-tuning with rejection_sampling.train_sft); every rank calls this."""
    rs = cfg.rejection_sampling
    ctx = build_context(cfg, world, groups, control, stop=stop, should_stop=should_stop)
    prompt_rows = load_prompt_rows(cfg, ctx.tokenizer)
    eval_rows = load_eval_prompt_rows(cfg, ctx.tokenizer) if rs.train_sft else []
    # Every round adds at most rollout.batch_size rows: an upper bound on the steps, for the learning-rate schedule.
    bound = sum(cfg.train.max_epochs * ((r + 1) * cfg.rollout.batch_size // cfg.train.train_batch_size)
                for r in range(rs.rounds))
    actor = load_trainable(ctx, cfg.actor.pretrain, "causal_lm", Actor, bound) if rs.train_sft else None
    sampler = RoundSampler(ctx)
    loop = StepLoop(ctx, {"actor": actor}, total_steps=None, progress=RoundProgress())

    def sample(round_index: int) -> tuple[list[dict], dict[str, float]]:
        scored, metrics = sampler.sample_round(prompt_rows, round_index, actor)
        kept = best_rows(scored, rs.min_reward)
        metrics["rollout/kept_fraction"] = len(kept) / max(len(scored), 1)
        return kept, metrics

    def training(round_index: int) -> Optional[RoundTraining]:
        """SFT on every row kept so far."""
        examples = examples_from_rows([row for r in range(round_index + 1) for row in read_jsonl(rounds.path(r))],
                                      cfg.data.max_len)
        schedule = round_schedule(ctx, len(examples), round_index, "kept rows")
        if schedule is None:
            return None
        return RoundTraining(schedule, token_loss_step(ctx, actor, examples, schedule, nll_loss_fn))

    rounds = Rounds(count=rs.rounds, directory=ctx.run_dir / ROUNDS_DIR, sample=sample,
                    training=training if actor is not None else None,
                    evaluate=(lambda: sampler.evaluate(eval_rows, actor)) if eval_rows else None)
    stopped, trained_steps = run_rounds(ctx, loop, rounds)
    if not stopped and ctx.is_main:
        output = Path(rs.output_path) if rs.output_path else ctx.run_dir / DEFAULT_OUTPUT
        rows = [row for r in range(rs.rounds) for row in read_jsonl(rounds.path(r))]
        write_jsonl(sft_rows(rows, cfg), output)
        ctx.info(f"wrote {len(rows)} best-of-{cfg.rollout.n_samples_per_prompt} rows to {output}")
    return finish(ctx, loop, total_steps=trained_steps, stopped=stopped, evaluate=rounds.evaluate,
                  save=(lambda: save_model(ctx, actor, "actor")) if actor is not None else None)
