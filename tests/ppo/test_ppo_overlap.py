"""Colocated async training (`rollout.async_queue: 1`, `layout.colocate: true`): the next iteration is generated in a
thread while the rank trains on the last (`trainers/ppo/overlap.py`).

The thread runs concurrently with its caller and hands back its result or its error; a whole job computes exactly
what the disaggregated async schedule computes (same samples, rewards, losses and gradient norms per iteration),
since the two halves share no state but the weights, which move only between ticks.
"""

from __future__ import annotations

import threading

import pytest
import torch

from hpc_rlhf.generation import ProcessHostedEngine
from hpc_rlhf.rollouts import RolloutReader
from hpc_rlhf.trainers.ppo.overlap import BackgroundGeneration, overlap_refusal

CPU = torch.device("cpu")


def test_generation_runs_beside_the_caller_and_returns_its_metrics():
    trained = threading.Event()

    def generate() -> dict[str, float]:
        # Waits for the caller's "update" below: this only returns True if both run at the same time.
        return {"saw_update": float(trained.wait(timeout=30))}

    background = BackgroundGeneration(CPU)
    background.start(generate)
    trained.set()  # the caller trains meanwhile
    assert background.join() == {"saw_update": 1.0}
    background.start(lambda: {"tick": 2.0})  # one thread per tick, the helper reused
    assert background.join() == {"tick": 2.0}


def test_errors_of_the_thread_are_raised_by_join_unless_the_caller_is_failing_already():
    def broken() -> dict[str, float]:
        raise ValueError("shard write failed")

    background = BackgroundGeneration(CPU)
    background.start(broken)
    with pytest.raises(ValueError, match="shard write failed"):
        background.join()
    background.start(broken)
    assert background.join(raise_error=False) == {}
    with pytest.raises(RuntimeError, match="no generation was started"):
        background.join()
    background.start(lambda: {})
    with pytest.raises(RuntimeError, match="not joined"):
        background.start(lambda: {})
    background.join()


def test_an_engine_that_captures_graphs_on_first_use_generates_serially():
    class CapturingEngine:
        captures_graphs_on_first_use = True

    assert "captures a CUDA graph" in overlap_refusal(CapturingEngine())
    assert "vllm.child_process: true" in overlap_refusal(CapturingEngine())
    assert overlap_refusal(object()) is None  # e.g. vLLM: its graphs are captured when the engine is built
    # an engine in a child process (vllm.child_process) captures its graphs away from this process's threads
    assert overlap_refusal(object.__new__(ProcessHostedEngine)) is None


GROUP_NORM = ["--algo.advantage_estimator=group_norm", "--rollout.async_queue=1", "--train.max_iterations=4",
              "--rollout.record_behaviour_log_probs=true"]  # compared below, though GRPO without KL reads none
COMPARED = ["rollout/reward_mean", "rollout/response_length", "train/policy_loss", "train/grad_norm",
            "rollout/staleness"]


@pytest.mark.timeout(600)
def test_colocated_async_trains_exactly_like_disaggregated_async(tmp_path, jobs):
    """Also with the engine in a child process of the rank (`vllm.child_process`): weights through shared memory,
    generation answered over a pipe while the thread waits."""
    colocated, child, disaggregated = tmp_path / "colocated", tmp_path / "child", tmp_path / "disaggregated"
    result = jobs.run(colocated, *GROUP_NORM, "--vllm.enable_sleep=false")
    jobs.run(child, *GROUP_NORM, "--vllm.enable_sleep=false", "--vllm.child_process=true")
    jobs.run(disaggregated, *GROUP_NORM, "--layout.colocate=false", "--slurm.gpus_per_node=2")
    assert "generation and update run one after the other" not in result.stdout

    def trained(run_dir):
        return {r["step"]: r for r in jobs.metrics(run_dir) if "train/policy_loss" in r}

    theirs = trained(disaggregated)
    for run_dir in (colocated, child):
        ours = trained(run_dir)
        assert sorted(ours) == sorted(theirs) == [0, 1, 2, 3]
        for step in ours:
            assert {k: ours[step][k] for k in COMPARED} == {k: theirs[step][k] for k in COMPARED}, \
                (run_dir.name, step)
            # Ticks 1-3 trained while the thread generated the next iteration; the last tick generates nothing.
            assert ("time/wait_generation_s" in ours[step]) == (step < 3)
        assert ours[3]["rollout/staleness"] == 1.0
        for iteration in range(4):
            mine = RolloutReader(run_dir).read(iteration, require_filled=["reward"])
            other = RolloutReader(disaggregated).read(iteration, require_filled=["reward"])
            for column in ("response_ids", "behaviour_log_probs", "reward", "weight_version"):
                assert mine.column(column).to_pylist() == other.column(column).to_pylist(), \
                    (run_dir.name, iteration, column)


@pytest.mark.timeout(500)
def test_a_stop_while_both_halves_run_resumes_to_the_uninterrupted_result(tmp_path, jobs, monkeypatch):
    """SIGUSR1 arrives while tick 2 generates iteration 2 in the thread (its reward function sends it) and trains
    iteration 1: the job checkpoints after the tick and leaves; run again, it resumes and ends exactly where the
    uninterrupted job does."""
    from tests.ppo.conftest import REPO
    from tests.ppo.stop_reward import STOP_AT_CALL_ENV

    args = [*GROUP_NORM, "--vllm.enable_sleep=false", "--train.max_iterations=5",
            f"--reward.reward_func_path={REPO / 'tests/ppo/stop_reward.py'}"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    jobs.run(whole, *args)
    monkeypatch.setenv(STOP_AT_CALL_ENV, f"3:{tmp_path / 'stop_sent'}")  # the 3rd reward call: iteration 2
    first = jobs.run(stopped, *args)
    assert "stopped after a checkpoint (SIGUSR1)" in first.stdout
    assert [r["step"] for r in jobs.metrics(stopped) if "train/policy_loss" in r] == [0, 1]
    second = jobs.run(stopped, *args)
    assert "resumed from" in second.stdout and "checkpoints/iter_000002" in second.stdout

    def trained(run_dir):
        return {r["step"]: {k: r[k] for k in COMPARED} for r in jobs.metrics(run_dir) if "train/policy_loss" in r}

    assert trained(stopped) == trained(whole)
    assert sorted(trained(whole)) == [0, 1, 2, 3, 4]
    for iteration in range(5):
        ours = RolloutReader(stopped).read(iteration, require_filled=["reward"])
        theirs = RolloutReader(whole).read(iteration, require_filled=["reward"])
        for column in ("response_ids", "behaviour_log_probs", "reward", "weight_version"):
            assert ours.column(column).to_pylist() == theirs.column(column).to_pylist(), (iteration, column)
