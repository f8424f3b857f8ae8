"""Sequence parallelism (`ring_attn_size`) on real gloo ranks and DeepSpeed engines: log-probs, entropy, values,
losses, gradients and the updated weights of split packed micro-batches equal those of the same micro-batches on
one rank, for the actor, the critic, the reward model and the reference; and with several sequence-parallel groups side by side (data
parallel x sequence parallel), the update equals plain data parallelism over the same shares."""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks
from tests.training import sequence_parallel_worker

TIMEOUT_S = 240
ATOL = 2e-6  # float32 rounding: the split attention sums its softmax over the same keys in other blocks


def assert_close_lists(split: list[torch.Tensor], whole: list[torch.Tensor], atol: float = ATOL) -> None:
    assert len(split) == len(whole)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def assert_close_dicts(split: dict[str, torch.Tensor], whole: dict[str, torch.Tensor], atol: float) -> None:
    assert split.keys() == whole.keys()
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=atol, rtol=0, msg=name)


def assert_adam_step_close(split: dict, whole: dict, *, lr: float = sequence_parallel_worker.LEARNING_RATE,
                           eps: float = 1e-8, max_norm: float = 1.0) -> None:
    """The weights after one Adam step from equal weights. That step moves each weight by lr * g / (|g| + eps), g the
    clipped gradient: where |g| is near eps, gradients that agree to rounding (1e-8 against 1.1e-8, say) move a weight
    by visibly different amounts. That difference, computed from the two runs' own gradients, is the tolerance, plus
    float32 rounding."""
    assert split["actor_state"].keys() == whole["actor_state"].keys()
    moves = []
    for run in (split, whole):
        clip = min(1.0, max_norm / (run["actor_step"]["grad_norm"] + 1e-6))
        grads = {name: g.double() * clip for name, g in run["actor_grads"].items()}
        moves.append({name: g / (g.abs() + eps) for name, g in grads.items()})
    for name, weights in whole["actor_state"].items():
        allowed = lr * (moves[0][name] - moves[1][name]).abs() + 1e-6
        beyond = (split["actor_state"][name].double() - weights.double()).abs() - allowed
        assert beyond.max().item() <= 0, f"{name}: {beyond.max().item():.3g} beyond what the gradients explain"


def assert_same_metrics(split: dict[str, float], whole: dict[str, float], rel: float = 1e-6) -> None:
    assert split.keys() == whole.keys()
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, rel=rel, abs=1e-7), key


@pytest.fixture(scope="module")
def one_and_two_ranks():
    """A 3-rank world: rank 0 alone (ring 1), ranks 1-2 one sequence-parallel group (ring 2); ZeRO-2 with
    activation checkpointing (the split attention is recomputed in the backward)."""
    results = run_ranks(sequence_parallel_worker.run_groups, 3, [([0], 1), ([1, 2], 2)], 2, True, False,
                        timeout_s=TIMEOUT_S)
    return results[0][0], [results[1][1], results[2][1]]


def test_split_rows_are_packed_samples_of_different_lengths(one_and_two_ranks):
    whole, split = one_and_two_ranks
    assert len(whole["row_lengths"]) >= 2 and len(set(whole["row_lengths"])) >= 2
    assert any(length % 2 for length in whole["row_lengths"])  # an odd row: the split pads it
    assert whole["sizes"] == (1, 1, 0)
    assert [rank["sizes"] for rank in split] == [(2, 1, 0), (2, 1, 0)]


def test_per_token_outputs_equal_one_rank(one_and_two_ranks):
    whole, split = one_and_two_ranks
    for rank in split:
        for key in ("log_probs", "entropy", "values", "reference_log_probs"):
            assert_close_lists(rank[key], whole[key], atol=4 * ATOL if key == "entropy" else ATOL)
        assert rank["rewards"].shape == (5,) and rank["rewards"].abs().min() > 0
        torch.testing.assert_close(rank["rewards"], whole["rewards"], atol=ATOL, rtol=0)


def test_losses_gradients_and_update_equal_one_rank(one_and_two_ranks):
    whole, split = one_and_two_ranks
    for rank in split:
        assert_same_metrics(rank["actor_metrics"], whole["actor_metrics"])
        assert_same_metrics(rank["critic_metrics"], whole["critic_metrics"])
        assert_close_dicts(rank["actor_grads"], whole["actor_grads"], atol=1e-7)
        assert_close_dicts(rank["critic_grads"], whole["critic_grads"], atol=5e-7)
        assert rank["actor_step"]["grad_norm"] == pytest.approx(whole["actor_step"]["grad_norm"], rel=1e-6)
    assert split[1]["actor_state"] is None  # only the group's first rank gathers the weights
    assert_adam_step_close(split[0], whole)


def test_data_parallel_times_sequence_parallel_equals_data_parallel():
    """Ranks 0-3 as two sequence-parallel groups of 2 (two shares of the samples) against ranks 4-5 as two plain
    data-parallel ranks on the same shares; ZeRO-3, actor only."""
    results = run_ranks(sequence_parallel_worker.run_groups, 6, [([0, 1, 2, 3], 2), ([4, 5], 1)], 3, False, True,
                        timeout_s=TIMEOUT_S)
    plain = {results[rank][1]["share"]: results[rank][1] for rank in (4, 5)}
    for rank in range(4):
        split = results[rank][0]
        whole = plain[split["share"]]
        assert split["sizes"] == (2, 2, rank // 2)
        assert_close_lists(split["log_probs"], whole["log_probs"])
        assert_same_metrics(split["actor_metrics"], whole["actor_metrics"])
        assert_close_dicts(split["actor_grads"], whole["actor_grads"], atol=1e-7)
        assert split["actor_step"]["grad_norm"] == pytest.approx(whole["actor_step"]["grad_norm"], rel=1e-6)
    assert_adam_step_close(results[0][0], results[4][1])
