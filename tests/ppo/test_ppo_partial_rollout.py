"""Partial rollouts in real asynchronous jobs (gloo ranks: generator engines and one actor; hf generation): responses
pause after rollout.partial_rollout_max_new_tokens tokens per tick and go on after the weight update at the end of the
tick; the shard holds whole responses, the tokens drawn before an update unchanged, each row's versions in its `extra`
JSON and the oldest as weight_version; and a run resumed from a mid-run checkpoint (with responses in progress) writes
the same shards and trains the same weights as the uninterrupted run.

Derivation of the versions: with rollout.async_queue = q the generator holds version max(0, t - q) in tick t. With a
budget of B tokens per tick, token k of a response of iteration i is drawn in tick i + min(k // B, q): ticks i .. i+q-1
give B tokens each and tick i + q, which trains iteration i, finishes it. A checkpoint after every iteration keeps
the responses in progress of every tick from q on (the tick that trains iteration 0) on disk.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from hpc_rlhf.rollouts import RolloutReader, generator_shard_name, iterations_completed
from hpc_rlhf.trainers.ppo.partial_rollout import (
    CarriedIteration,
    Response,
    carried_shards,
    load_carried,
    save_carried,
    snapshot_ticks,
)
from tests.ppo.conftest import read_metrics, run_train
from tests.ppo.test_ppo_dynamic_sampling import actor_weights, sha256s

ITERATIONS, MAX_LEN, BUDGET = 4, 8, 1
RUNS = {"queue1_engines2": (1, 2), "queue2_engines1": (2, 1)}  # (rollout.async_queue, generator engines)
pytestmark = pytest.mark.slow


def records_log_probs(engines: int) -> bool:
    """The two-engine run asks the generator for log-probs (compared below with the saved responses in progress);
    the one-engine run does not (GRPO without KL reads none): its shards hold none and its saved ones are NaN."""
    return engines == 2


def settings(queue: int, engines: int) -> list[str]:
    return [f"--rollout.record_behaviour_log_probs={str(records_log_probs(engines)).lower()}",
            "--layout.colocate=false", f"--layout.generator.gpus={engines}", "--layout.actor.gpus=1",
            f"--slurm.gpus_per_node={engines + 1}", f"--rollout.async_queue={queue}",
            "--rollout.partial_rollout=true", f"--rollout.partial_rollout_max_new_tokens={BUDGET}",
            f"--rollout.generate_max_len={MAX_LEN}", f"--train.max_iterations={ITERATIONS}",
            "--ckpt.save_steps=1", "--ckpt.max_ckpt_num=10", "--ckpt.save_hf_model=true"]


@pytest.fixture(scope="module", params=list(RUNS))
def partial_run(request, tmp_path_factory) -> tuple[Path, int, int]:
    queue, engines = RUNS[request.param]
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    run_train(run_dir, *settings(queue, engines))
    return run_dir, queue, engines


def token_versions(iteration: int, length: int, queue: int) -> list[int]:
    """The version that draws each token of a response of `iteration` (module docstring)."""
    return [max(0, iteration + min(k // BUDGET, queue) - queue) for k in range(length)]


@pytest.mark.timeout(300)
def test_responses_span_weight_updates_and_keep_their_first_tokens(partial_run):
    run_dir, queue, engines = partial_run
    assert iterations_completed(run_dir) == list(range(ITERATIONS))
    spanned = compared = 0
    for engine in range(engines):  # kept: the ticks that checkpoints resume after; the others are deleted
        assert snapshot_ticks(run_dir, engine) == list(range(queue, ITERATIONS + queue))
    for iteration in range(ITERATIONS):
        assert RolloutReader(run_dir).read(iteration).num_rows == 2 * 2
        for engine in range(engines):
            rows = RolloutReader(run_dir).read_shard(iteration, generator_shard_name(engine)).to_pylist()
            assert len(rows) == 2 * 2 // engines
            spanned += sum(check_row(row, iteration, queue, records_log_probs(engines)) for row in rows)
            compared += compare_with_carried(run_dir, iteration, engine, rows, queue)
    assert spanned >= ITERATIONS, "most responses span updates"
    assert compared >= (ITERATIONS - queue) * 4, "every iteration from queue on was compared with its saved state"


def check_row(row: dict, iteration: int, queue: int, log_probs: bool) -> bool:
    """A whole response with the hand-derived versions; returns whether it spans more than one."""
    extra, length = json.loads(row["extra"]), len(row["response_ids"])
    versions = token_versions(iteration, length, queue)
    assert extra["finish_reason"] == "stop" or length == MAX_LEN, "whole responses"
    if log_probs:
        assert len(row["behaviour_log_probs"]) == length
    else:
        assert row["behaviour_log_probs"] is None
    assert extra["weight_versions"] == sorted(set(versions))
    assert row["weight_version"] == versions[0] == max(0, iteration - queue), "the oldest version"
    return len(extra["weight_versions"]) > 1


def compare_with_carried(run_dir: Path, iteration: int, engine: int, rows: list[dict], queue: int) -> int:
    """The rows against the responses in progress saved after each tick that carried them (B tokens a tick): the
    tokens and log-probs drawn before an update are kept unchanged. Returns how many rows were compared."""
    compared = 0
    for tick in range(iteration, iteration + queue + 1):
        if tick not in snapshot_ticks(run_dir, engine):
            continue
        carried = {c.iteration: c for c in load_carried(run_dir, tick, engine)}
        if tick == iteration + queue:
            assert iteration not in carried, "finished in the tick that trains it"
            continue
        assert iteration in carried, "the tiny model's answers are longer than one token"
        for row, before in zip(rows, carried[iteration].responses, strict=True):
            drawn = min(len(row["response_ids"]), (tick - iteration + 1) * BUDGET)
            assert before.prompt_ids == row["prompt_ids"] and len(before.response_ids) == drawn
            assert row["response_ids"][:drawn] == before.response_ids
            if row["behaviour_log_probs"] is None:
                assert len(before.log_probs) == drawn and all(math.isnan(x) for x in before.log_probs)
            else:
                assert row["behaviour_log_probs"][:drawn] == before.log_probs
            assert before.versions == token_versions(iteration, len(row["response_ids"]), queue)[:drawn]
            compared += 1
    return compared


@pytest.mark.timeout(300)
def test_training_runs_on_the_partial_rollouts(partial_run):
    rows = read_metrics(partial_run[0])
    trained = [r for r in rows if "train/policy_loss" in r]
    assert [r["step"] for r in trained] == list(range(ITERATIONS))
    assert all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in trained)
    assert sum(r.get("count/generate_samples", 0) for r in rows) == ITERATIONS * 4, "every sample written once"
    carried = [r["count/generate_carried_samples"] for r in rows if "count/generate_carried_samples" in r]
    assert carried and max(carried) > 0 and carried[-1] == 0, "responses were carried; none is left at the end"


@pytest.mark.timeout(400)
def test_a_resume_with_responses_in_progress_repeats_the_uninterrupted_run(partial_run, tmp_path):
    original, queue, engines = partial_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("iter_000002\n")
    # The checkpoint after training iteration 1 follows tick 1 + queue, which left iterations 2 .. 1 + queue in
    # progress (not committed).
    for engine in range(engines):
        assert [c.iteration for c in load_carried(run_dir, 1 + queue, engine)] == list(range(2, 2 + queue))
    for iteration in range(2, ITERATIONS):  # generated again, from the saved responses in progress
        shutil.rmtree(run_dir / "rollouts" / f"iter_{iteration:06d}")
    shutil.rmtree(run_dir / "hf")
    result = run_train(run_dir, *settings(queue, engines))
    assert "resumed from" in result.stdout + result.stderr
    assert sha256s(run_dir) == sha256s(original)
    got, want = actor_weights(run_dir), actor_weights(original)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_snapshot_round_trips_and_names_the_generator_shard(tmp_path):
    response = Response(prompt_ids=[1, 5], response_ids=[7], log_probs=[-0.1234567890123], versions=[3])
    save_carried(tmp_path, 4, 1, [CarriedIteration(iteration=4, prompt_indices=[9], responses=[response])])
    assert load_carried(tmp_path, 4, 1)[0].responses[0] == response
    assert carried_shards(tmp_path, 4, 2) == {4: {generator_shard_name(1)}}
    assert load_carried(tmp_path, 3, 1) is None
