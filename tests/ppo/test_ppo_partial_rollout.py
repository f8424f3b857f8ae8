"""Partial rollouts in a real asynchronous job (3 gloo ranks: two generator engines, one actor; hf generation):
responses pause after rollout.partial_rollout_max_new_tokens tokens and finish in the next tick with the weights of the
update in between; the shard holds whole responses, the tokens drawn before the update unchanged, each row's versions
in its `extra` JSON and the oldest as weight_version; and a run resumed from a mid-run checkpoint (with responses in
progress) writes the same shards and trains the same weights as the uninterrupted run.

With rollout.async_queue = 1 the generator holds version max(0, t - 1) in tick t, so iteration i starts with version
max(0, i - 1) and, when its responses are longer than the budget, finishes in tick i + 1 with version i.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hpc_rlhf.rollouts import RolloutReader, generator_shard_name, iterations_completed
from hpc_rlhf.trainers.ppo.partial_rollout import load_carried
from tests.ppo.conftest import run_train
from tests.ppo.test_ppo_dynamic_sampling import actor_weights, sha256s

ITERATIONS, MAX_LEN, BUDGET = 4, 8, 1
ENGINES = 2
SETTINGS = ["--layout.colocate=false", f"--layout.generator.gpus={ENGINES}", "--layout.actor.gpus=1",
            f"--slurm.gpus_per_node={ENGINES + 1}", "--rollout.async_queue=1",
            "--rollout.partial_rollout=true", f"--rollout.partial_rollout_max_new_tokens={BUDGET}",
            f"--rollout.generate_max_len={MAX_LEN}", f"--train.max_iterations={ITERATIONS}",
            "--ckpt.save_steps=2", "--ckpt.save_hf_model=true"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("partial") / "run"
    run_train(run_dir, *SETTINGS)
    return run_dir


@pytest.mark.timeout(300)
def test_responses_span_a_weight_update_and_keep_their_first_tokens(partial_run):
    assert iterations_completed(partial_run) == list(range(ITERATIONS))
    spanned = 0
    for iteration in range(ITERATIONS):
        assert RolloutReader(partial_run).read(iteration).num_rows == 2 * 2
        for engine in range(ENGINES):
            rows = RolloutReader(partial_run).read_shard(iteration, generator_shard_name(engine)).to_pylist()
            spanned += check_engine_rows(partial_run, iteration, engine, rows)
    assert spanned >= ITERATIONS, "most responses of iterations 1.. span versions i - 1 and i"


def check_engine_rows(run_dir: Path, iteration: int, engine: int, rows: list[dict]) -> int:
    """One engine's rows of `iteration` against what it carried after the tick that started it (at most BUDGET
    tokens each); returns how many rows span two versions."""
    started, finished = max(0, iteration - 1), iteration
    carried = {c.iteration: c for c in load_carried(run_dir, iteration, engine)}
    assert iteration in carried, "the tiny model's answers are longer than one token"
    assert len(rows) == len(carried[iteration].responses) == 2
    spanned = 0
    for row, before in zip(rows, carried[iteration].responses):
        extra = json.loads(row["extra"])
        assert extra["finish_reason"] == "stop" or len(row["response_ids"]) == MAX_LEN, "whole responses"
        assert len(row["behaviour_log_probs"]) == len(row["response_ids"])
        assert before.prompt_ids == row["prompt_ids"] and before.versions == [started] * len(before.response_ids)
        if before.finished:  # done within the first tick's budget: one version
            assert (row["response_ids"], extra["weight_versions"]) == (before.response_ids, [started])
        else:  # the tokens drawn before the update are kept unchanged, then the new weights finish it
            assert len(before.response_ids) == BUDGET < len(row["response_ids"])
            assert row["response_ids"][:BUDGET] == before.response_ids
            assert row["behaviour_log_probs"][:BUDGET] == before.log_probs
            assert extra["weight_versions"] == sorted({started, finished})
            spanned += len(extra["weight_versions"]) == 2
        assert row["weight_version"] == started, "the oldest version that drew a token"
    later = load_carried(run_dir, iteration + 1, engine)
    assert [c.iteration for c in later] in ([], [iteration + 1]), "finished in the tick that trains it"
    return spanned


@pytest.mark.timeout(300)
def test_training_runs_on_the_partial_rollouts(partial_run):
    rows = [json.loads(line) for line in (partial_run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in rows if "train/policy_loss" in r]
    assert [r["step"] for r in trained] == list(range(ITERATIONS))
    assert all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in trained)
    assert sum(r.get("count/generate_samples", r.get("sum/generate_samples", 0)) for r in rows) == ITERATIONS * 4


@pytest.mark.timeout(400)
def test_a_resume_with_responses_in_progress_repeats_the_uninterrupted_run(partial_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(partial_run, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("iter_000002\n")
    # The checkpoint after training iteration 1 follows tick 2, which left iteration 2 in progress (not committed).
    for engine in range(ENGINES):
        assert [c.iteration for c in load_carried(run_dir, 2, engine)] == [2]
    for iteration in (2, 3):  # later rows are generated again, from the saved responses in progress
        shutil.rmtree(run_dir / "rollouts" / f"iter_{iteration:06d}")
    shutil.rmtree(run_dir / "hf")
    result = run_train(run_dir, *SETTINGS)
    assert "resumed from" in result.stdout + result.stderr
    assert sha256s(run_dir) == sha256s(partial_run)
    got, want = actor_weights(run_dir), actor_weights(partial_run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_snapshot_names_the_generator_shard(tmp_path):
    from hpc_rlhf.trainers.ppo.partial_rollout import (
        CarriedIteration,
        Response,
        carried_shards,
        save_carried,
    )

    response = Response(prompt_ids=[1, 5], response_ids=[7], log_probs=[-0.25], versions=[3])
    save_carried(tmp_path, 4, 1, [CarriedIteration(iteration=4, prompt_indices=[9], responses=[response])])
    assert load_carried(tmp_path, 4, 1)[0].responses[0] == response
    assert carried_shards(tmp_path, 4, 2) == {4: {generator_shard_name(1)}}
    assert load_carried(tmp_path, 3, 1) is None
