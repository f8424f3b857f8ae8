"""DAPO dynamic sampling in real jobs (3 gloo ranks: 2 generator engines + 1 actor, hf generation): the generators
refill the batch with the next prompts of the stream until rollout.batch_size groups are kept, the round limit stops
the refill (and the batch shrinks, as the metrics say), and a resumed run draws exactly what the uninterrupted run drew.

The reward (tests/ppo/filter_reward.py) makes a group's fate a function of its prompt's label, so the kept prompts of
every iteration and engine are derived here from the prompt stream and the labels alone (`expected_kept`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hpc_rlhf.data import stream_indices
from hpc_rlhf.rollouts import RolloutReader, generator_shard_name
from hpc_rlhf.run.checkpoint import read_trainer_state
from tests.ppo.conftest import REPO, run_train
from tests.ppo.filter_reward import dropped

ITERATIONS = 4
BATCH, N, ENGINES, SEED = 4, 2, 2, 7
DISAGGREGATED = ["--layout.colocate=false", f"--layout.generator.gpus={ENGINES}", "--layout.actor.gpus=1",
                 "--slurm.gpus_per_node=3"]
COLOCATED = [f"--layout.generator.gpus={ENGINES}", f"--layout.actor.gpus={ENGINES}",
             f"--slurm.gpus_per_node={ENGINES}"]  # 2 actor ranks: one holds no row when 1 group is kept
SETTINGS = [
    f"--rollout.batch_size={BATCH}", f"--rollout.n_samples_per_prompt={N}",
    "--train.train_batch_size=8", f"--train.max_iterations={ITERATIONS}", f"--train.seed={SEED}",
    "--rollout.dynamic_filtering=true", f"--reward.reward_func_path={REPO / 'tests/ppo/filter_reward.py'}",
]
LAYOUT = [*DISAGGREGATED, *SETTINGS]
pytestmark = pytest.mark.slow


def labels() -> list[str]:
    """The labels of data/arithmetic/train.jsonl (the default prompts), by prompt index."""
    lines = (REPO / "data/arithmetic/train.jsonl").read_text().splitlines()
    return [json.loads(line)["label"] for line in lines if line.strip()]


def expected_kept(max_rounds: int) -> list[list[list[int]]]:
    """[iteration][engine] -> the prompt indices of the kept groups, in shard order (`simulate`)."""
    return simulate(max_rounds)[0]


def simulate(max_rounds: int) -> tuple[list[list[list[int]]], list[int]]:
    """The kept prompts by the documented rule, and the data position after each iteration: round 1 takes the
    engine's slice of the iteration's BATCH stream positions; each further round hands the next positions out in
    engine order, as many as each engine misses; the next iteration starts where this one stopped."""
    label_of = labels()
    share = BATCH // ENGINES
    position, result, positions = 0, [], []
    for _ in range(ITERATIONS):
        kept: list[list[int]] = [[] for _ in range(ENGINES)]
        draws = [(position + e * share, share) for e in range(ENGINES)]
        cursor, rounds = position + BATCH, 0
        while True:
            for engine, (start, count) in enumerate(draws):
                drawn = stream_indices(len(label_of), seed=SEED, rollout_batch_size=BATCH, start=start, count=count)
                kept[engine] += [i for i in drawn if not dropped(label_of[i])]
            rounds += 1
            missing = [share - len(k) for k in kept]
            if sum(missing) == 0 or rounds >= max_rounds:
                break
            draws, offset = [], cursor
            for count in missing:
                draws.append((offset, count))
                offset += count
            cursor = offset
        result.append(kept)
        position = cursor
        positions.append(position)
    return result, positions


def shard_groups(run_dir: Path, iteration: int, engine: int) -> list[tuple[int, list[float]]]:
    """(prompt_id, scores of its samples) of each group in one generator shard, by group id."""
    table = RolloutReader(run_dir).read_shard(iteration, generator_shard_name(engine)).to_pydict()
    groups: dict[int, tuple[int, list[float]]] = {}
    for group, prompt, score in zip(table["group_id"], table["prompt_id"], table["score"]):
        groups.setdefault(group, (prompt, []))[1].append(score)
    return [groups[g] for g in sorted(groups)]


def sha256s(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): json.loads(p.read_text())["sha256"]
            for p in sorted((run_dir / "rollouts").glob("iter_*/generator_*.commit.json"))}


def actor_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for path in sorted((run_dir / "hf" / "actor").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def refilled_run(tmp_path_factory) -> Path:
    """The uninterrupted asynchronous run, checkpointed after iteration 2."""
    run_dir = tmp_path_factory.mktemp("refill") / "run"
    run_train(run_dir, *LAYOUT, "--rollout.async_queue=1", "--ckpt.save_steps=2", "--ckpt.save_hf_model=true")
    return run_dir


@pytest.mark.timeout(300)
def test_every_iteration_trains_a_full_batch_of_the_expected_prompts(refilled_run):
    expected = expected_kept(max_rounds=10)
    assert any(len(k) < BATCH // ENGINES for k in expected_kept(max_rounds=1)[0]), "filtering drops groups here"
    for iteration in range(ITERATIONS):
        rows = RolloutReader(refilled_run).read(iteration)
        assert rows.num_rows == BATCH * N, f"iteration {iteration} trains rollout.batch_size groups"
        assert sorted(set(rows.column("group_id").to_pylist())) == list(range(BATCH))
        for engine in range(ENGINES):
            groups = shard_groups(refilled_run, iteration, engine)
            assert [prompt for prompt, _ in groups] == expected[iteration][engine]
            assert all(len(set(scores)) > 1 for _, scores in groups), "only groups with differing scores are kept"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [DISAGGREGATED, COLOCATED], ids=["disaggregated", "colocated"])
def test_the_round_limit_stops_the_refill_and_the_metrics_say_so(tmp_path, jobs, layout):
    run_dir = tmp_path / "run"
    jobs.run(run_dir, *layout, *SETTINGS, "--rollout.dynamic_filtering_max_rounds=1")
    expected = expected_kept(max_rounds=1)
    rows = {r["step"]: r for r in jobs.metrics(run_dir) if "generate/filter_rounds" in r}
    assert sorted(rows) == list(range(ITERATIONS))
    for iteration in range(ITERATIONS):
        kept = sum(len(k) for k in expected[iteration])
        assert RolloutReader(run_dir).read(iteration).num_rows == kept * N
        for engine in range(ENGINES):
            assert [p for p, _ in shard_groups(run_dir, iteration, engine)] == expected[iteration][engine]
        metrics = rows[iteration]
        assert metrics["generate/filter_groups_kept"] == kept
        assert metrics["generate/filter_rounds"] == 1
        assert metrics["generate/filter_prompts_drawn"] == BATCH  # one round: the iteration's own block only
        assert metrics["generate/filter_capped"] == float(kept < BATCH)
        assert metrics["generate/data_position"] == BATCH * (iteration + 1)
        assert metrics["train/optimizer_steps"] == (1 if kept else 0)  # nothing kept: nothing to train on
    assert any(sum(len(k) for k in e) < BATCH for e in expected), "the cap left some batch short"
    assert any(sum(len(k) for k in e) == 0 for e in expected), "and one iteration without any group"


@pytest.mark.timeout(400)
def test_a_resumed_run_draws_and_trains_exactly_what_the_uninterrupted_run_did(refilled_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(refilled_run, run_dir)
    (run_dir / "checkpoints" / "latest").write_text("iter_000002\n")
    position = read_trainer_state(run_dir / "checkpoints" / "iter_000002")["data_position"]
    assert position == simulate(max_rounds=10)[1][2] > 3 * BATCH, "after generating 0..2, refills included"
    result = run_train(run_dir, *LAYOUT, "--rollout.async_queue=1", "--ckpt.save_steps=2",
                       "--ckpt.save_hf_model=true")
    output = result.stdout + result.stderr
    assert "rollouts: iterations 3..3 were generated after the checkpoint; with rollout.dynamic_filtering they " \
           "are generated again from the checkpoint's data position" in output
    assert sha256s(run_dir) == sha256s(refilled_run)
    got, want = actor_weights(run_dir), actor_weights(refilled_run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
