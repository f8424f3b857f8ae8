"""Prompt sharding: rank slices partition the block, blocks partition the epoch, same inputs give the same prompts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.data.sharding import (
    block_indices,
    epoch_and_iteration,
    epoch_permutation,
    iterations_per_epoch,
    prompt_indices_for,
    rank_slice,
    refill_slice,
    stream_indices,
)


@st.composite
def schedules(draw):
    """A dataset size, batch size, rank count, seed, epoch and an iteration inside the epoch."""
    num_prompts = draw(st.integers(1, 400))
    rollout_batch_size = draw(st.integers(1, num_prompts))
    num_ranks = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    epoch = draw(st.integers(0, 50))
    iteration = draw(st.integers(0, num_prompts // rollout_batch_size - 1))
    return dict(num_prompts=num_prompts, rollout_batch_size=rollout_batch_size, num_ranks=num_ranks, seed=seed,
                epoch=epoch, iteration=iteration)


def per_rank(s: dict) -> list[list[int]]:
    return [prompt_indices_for(s["num_prompts"], seed=s["seed"], epoch=s["epoch"], iteration=s["iteration"],
                               rollout_batch_size=s["rollout_batch_size"], rank=r, num_ranks=s["num_ranks"])
            for r in range(s["num_ranks"])]


@settings(max_examples=150, deadline=None)
@given(s=schedules())
def test_rank_slices_are_disjoint_contiguous_and_cover_the_block(s):
    block = block_indices(s["num_prompts"], seed=s["seed"], epoch=s["epoch"], iteration=s["iteration"],
                          rollout_batch_size=s["rollout_batch_size"])
    slices = per_rank(s)
    assert len(block) == s["rollout_batch_size"] == len(set(block))
    assert all(0 <= i < s["num_prompts"] for i in block)
    assert [i for part in slices for i in part] == block  # in rank order, each a contiguous piece
    sizes = [len(part) for part in slices]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@settings(max_examples=100, deadline=None)
@given(num_prompts=st.integers(1, 300), data=st.data())
def test_blocks_of_an_epoch_never_repeat_an_index(num_prompts, data):
    batch = data.draw(st.integers(1, num_prompts))
    seed, epoch = data.draw(st.integers(0, 10**6)), data.draw(st.integers(0, 20))
    blocks = [block_indices(num_prompts, seed=seed, epoch=epoch, iteration=i, rollout_batch_size=batch)
              for i in range(iterations_per_epoch(num_prompts, batch))]
    visited = [i for block in blocks for i in block]
    assert len(visited) == len(set(visited)) == (num_prompts // batch) * batch
    order = epoch_permutation(num_prompts, seed=seed, epoch=epoch)
    assert sorted(order.tolist()) == list(range(num_prompts))
    assert visited == order[: len(visited)].tolist()  # the dropped tail is the permutation's last entries


@settings(max_examples=50, deadline=None)
@given(s=schedules())
def test_same_inputs_same_output(s):
    assert per_rank(s) == per_rank(dict(s))


def test_epochs_and_seeds_change_the_order():
    base = epoch_permutation(1000, seed=1, epoch=0)
    assert not np.array_equal(base, epoch_permutation(1000, seed=1, epoch=1))
    assert not np.array_equal(base, epoch_permutation(1000, seed=2, epoch=0))
    assert np.array_equal(base, epoch_permutation(1000, seed=1, epoch=0))


def test_permutation_is_pinned_across_installs():
    # A requeued job may resume on another node or after an upgrade; it must draw the prompts it would have drawn.
    # If this fails, numpy changed its PCG64 stream or permutation algorithm and resumes would see new prompts.
    assert epoch_permutation(10, seed=42, epoch=3).tolist() == [4, 3, 7, 2, 5, 1, 9, 8, 0, 6]


@pytest.mark.parametrize(
    "block_size, num_ranks, expected",
    [
        (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
        (3, 5, [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]),
        (0, 2, [(0, 0), (0, 0)]),
    ],
)
def test_rank_slice_hand_values(block_size, num_ranks, expected):
    assert [rank_slice(block_size, rank=r, num_ranks=num_ranks) for r in range(num_ranks)] == expected


@pytest.mark.parametrize(
    "num_prompts, batch, per_epoch",
    [(100, 10, 10), (105, 10, 10), (10, 10, 1), (3000, 16, 187)],
)
def test_iterations_per_epoch_drops_the_tail(num_prompts, batch, per_epoch):
    assert iterations_per_epoch(num_prompts, batch) == per_epoch


def test_global_iteration_maps_to_epoch_and_iteration():
    # 105 prompts in blocks of 10: 10 iterations per epoch.
    expected = {0: (0, 0), 9: (0, 9), 10: (1, 0), 25: (2, 5), 1000: (100, 0)}
    for global_iteration, pair in expected.items():
        assert epoch_and_iteration(global_iteration, num_prompts=105, rollout_batch_size=10) == pair


def test_a_resumed_run_draws_the_same_prompts_as_an_uninterrupted_one():
    def draw(global_iteration: int, rank: int) -> list[int]:
        epoch, iteration = epoch_and_iteration(global_iteration, num_prompts=50, rollout_batch_size=8)
        return prompt_indices_for(50, seed=7, epoch=epoch, iteration=iteration, rollout_batch_size=8, rank=rank,
                                  num_ranks=2)

    uninterrupted = [draw(g, r) for g in range(20) for r in range(2)]
    resumed = [draw(g, r) for g in range(13) for r in range(2)] + [draw(g, r) for g in range(13, 20) for r in range(2)]
    assert uninterrupted == resumed
    assert len(uninterrupted[0]) == 4


def test_the_stream_is_the_epochs_blocks_one_after_another():
    # 10 prompts in blocks of 4: 2 blocks per epoch (positions 0..7 are epoch 0's first 8 indices), then epoch 1.
    epoch0, epoch1 = epoch_permutation(10, seed=42, epoch=0).tolist(), epoch_permutation(10, seed=42, epoch=1).tolist()
    assert stream_indices(10, seed=42, rollout_batch_size=4, start=0, count=8) == epoch0[:8]
    assert stream_indices(10, seed=42, rollout_batch_size=4, start=6, count=5) == epoch0[6:8] + epoch1[:3]
    assert stream_indices(10, seed=42, rollout_batch_size=4, start=17, count=0) == []
    # Iteration i without extra draws takes positions [i B, (i + 1) B): exactly its block.
    for iteration in range(7):
        epoch, in_epoch = epoch_and_iteration(iteration, num_prompts=10, rollout_batch_size=4)
        assert stream_indices(10, seed=42, rollout_batch_size=4, start=4 * iteration, count=4) == \
            block_indices(10, seed=42, epoch=epoch, iteration=in_epoch, rollout_batch_size=4)


def test_refill_rounds_hand_prompts_out_in_rank_order():
    missing = [2, 0, 3]
    assert [refill_slice(missing, rank=r) for r in range(3)] == [(0, 2), (2, 2), (2, 5)]
    with pytest.raises(ValueError, match="rank=3 must be smaller than the 3 ranks"):
        refill_slice(missing, rank=3)
    with pytest.raises(ValueError, match=r"missing\[1\] must be a non-negative integer"):
        refill_slice([1, -1], rank=0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: iterations_per_epoch(5, 8), "rollout_batch_size=8 is larger than the dataset"),
        (lambda: iterations_per_epoch(0, 1), "num_prompts must be a positive integer"),
        (lambda: block_indices(20, seed=0, epoch=0, iteration=2, rollout_batch_size=8), "iteration=2 is past"),
        (lambda: rank_slice(8, rank=4, num_ranks=4), "rank=4 must be smaller than num_ranks=4"),
        (lambda: rank_slice(8, rank=0, num_ranks=0), "num_ranks must be a positive integer"),
        (lambda: epoch_permutation(8, seed=-1, epoch=0), "seed must be a non-negative integer"),
        (lambda: epoch_and_iteration(-1, num_prompts=8, rollout_batch_size=2), "global_iteration must be"),
        (lambda: iterations_per_epoch(8, True), "rollout_batch_size must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
