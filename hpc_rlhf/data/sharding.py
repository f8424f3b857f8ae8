"""Which prompts each generator rank samples at each iteration: a pure function of (seed, epoch, iteration, rank).

Because nothing here keeps state, a resumed or requeued job draws exactly the prompts it would have drawn.

Schedule:
  * each epoch is a permutation of all prompt indices, drawn by numpy's PCG64 seeded with (seed, epoch);
  * iteration i of the epoch takes the i-th block of `rollout_batch_size` indices of that permutation;
  * the tail of the permutation that does not fill a whole block is dropped for that epoch (the next epoch's
    permutation is different, so no prompt is left out for good);
  * rank r of num_ranks takes the r-th contiguous slice of the block; when the block does not divide evenly the first
    `rollout_batch_size % num_ranks` ranks take one prompt more (numpy.array_split's rule).

With DAPO dynamic filtering the generators draw further prompts to replace dropped groups, so an iteration no longer
takes exactly one block: the prompts then form one stream (epoch 0's blocks, then epoch 1's, ...), an iteration takes
the stream's positions from a data position the trainer keeps in its checkpoint, and `stream_indices` maps positions
to prompt indices. With no prompt drawn beyond its block, iteration i takes the positions [i * B, (i + 1) * B) of the
stream, which are exactly `block_indices` of its (epoch, iteration).
"""

from __future__ import annotations

import numpy as np


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def iterations_per_epoch(num_prompts: int, rollout_batch_size: int) -> int:
    """Whole blocks of `rollout_batch_size` prompts in one epoch (the incomplete tail block is dropped)."""
    _check_positive(num_prompts=num_prompts, rollout_batch_size=rollout_batch_size)
    if rollout_batch_size > num_prompts:
        raise ValueError(f"rollout_batch_size={rollout_batch_size} is larger than the dataset ({num_prompts} prompts)")
    return num_prompts // rollout_batch_size


def epoch_and_iteration(global_iteration: int, *, num_prompts: int, rollout_batch_size: int) -> tuple[int, int]:
    """Map a run-wide iteration counter (from 0) to (epoch, iteration within the epoch)."""
    _check_non_negative(global_iteration=global_iteration)
    return divmod(global_iteration, iterations_per_epoch(num_prompts, rollout_batch_size))


def epoch_permutation(num_prompts: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the prompts: a permutation of range(num_prompts)."""
    _check_positive(num_prompts=num_prompts)
    _check_non_negative(seed=seed, epoch=epoch)
    return np.random.Generator(np.random.PCG64([int(seed), int(epoch)])).permutation(num_prompts)


def rank_slice(block_size: int, *, rank: int, num_ranks: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of a block of `block_size` items (first ranks take the remainder)."""
    _check_non_negative(block_size=block_size, rank=rank)
    _check_positive(num_ranks=num_ranks)
    if rank >= num_ranks:
        raise ValueError(f"rank={rank} must be smaller than num_ranks={num_ranks}")
    base, extra = divmod(block_size, num_ranks)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def block_indices(num_prompts: int, *, seed: int, epoch: int, iteration: int, rollout_batch_size: int) -> list[int]:
    """All prompt indices of iteration `iteration` of epoch `epoch`, over every rank."""
    per_epoch = iterations_per_epoch(num_prompts, rollout_batch_size)
    _check_non_negative(iteration=iteration)
    if iteration >= per_epoch:
        raise ValueError(f"iteration={iteration} is past the epoch: {num_prompts} prompts in blocks of "
                         f"{rollout_batch_size} give {per_epoch} iterations per epoch")
    order = epoch_permutation(num_prompts, seed=seed, epoch=epoch)
    start = iteration * rollout_batch_size
    return order[start:start + rollout_batch_size].tolist()


def prompt_indices_for(
    num_prompts: int,
    *,
    seed: int,
    epoch: int,
    iteration: int,
    rollout_batch_size: int,
    rank: int,
    num_ranks: int,
) -> list[int]:
    """The prompt indices that rank `rank` of `num_ranks` samples at (epoch, iteration)."""
    block = block_indices(num_prompts, seed=seed, epoch=epoch, iteration=iteration,
                          rollout_batch_size=rollout_batch_size)
    start, stop = rank_slice(len(block), rank=rank, num_ranks=num_ranks)
    return block[start:stop]


def stream_indices(num_prompts: int, *, seed: int, rollout_batch_size: int, start: int, count: int) -> list[int]:
    """The prompt indices at positions [start, start + count) of the prompt stream: epoch e's whole blocks (its
    permutation without the incomplete tail), then epoch e + 1's; the stream never ends."""
    _check_non_negative(start=start, count=count)
    per_epoch = iterations_per_epoch(num_prompts, rollout_batch_size) * rollout_batch_size
    indices: list[int] = []
    position = start
    while len(indices) < count:
        epoch, offset = divmod(position, per_epoch)
        take = min(count - len(indices), per_epoch - offset)
        indices += epoch_permutation(num_prompts, seed=seed, epoch=epoch)[offset:offset + take].tolist()
        position += take
    return indices


def refill_slice(missing: list[int], *, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's draw in a refill round where rank r still misses `missing[r]` groups: the round's
    prompts are handed out in rank order, each rank taking as many as it misses."""
    _check_non_negative(rank=rank)
    if rank >= len(missing):
        raise ValueError(f"rank={rank} must be smaller than the {len(missing)} ranks of `missing`")
    _check_non_negative(**{f"missing[{r}]": m for r, m in enumerate(missing)})
    start = sum(missing[:rank])
    return start, start + missing[rank]
