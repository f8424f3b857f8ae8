"""Mixing several datasets into one, as OpenRLHF's `--prompt_data a,b --prompt_data_probs 0.7,0.3` does.

Without probabilities the datasets are read one after another (OpenRLHF: `concatenate_datasets`). With
probabilities they are interleaved the way OpenRLHF's `blending_datasets` calls `datasets.interleave_datasets(...,
probabilities, seed=train.seed, stopping_strategy="all_exhausted")`:
  * a generator `numpy.random.default_rng(seed)` draws the source dataset of every row, `rng.choice(n, size=1000, p)`
    a block of 1000 draws at a time;
  * the k-th draw of dataset d takes its row k mod len(d) (each dataset is read in order, and again from its start
    once used up: oversampling);
  * the mix ends with the draw that uses up the last dataset still having unread rows, so every row of every dataset
    is in it at least once, and dataset d makes up about p_d of it.
The mix is a pure function of (dataset lengths, probabilities, seed): every rank and every resumed run builds the same.
`max_samples` keeps the first rows of each dataset, then the first rows of the mix (OpenRLHF's `max_count` and its
`select` after blending).
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional, Sequence, TypeVar

import numpy as np

from hpc_rlhf.data.records import DataPaths, RowRef, dataset_paths, iter_records

T = TypeVar("T")
DRAW_BLOCK = 1000  # source draws per rng.choice call, as datasets.interleave_datasets draws them
SUM_TOLERANCE = 1e-6


def probability_problems(num_datasets: int, probabilities: Optional[Sequence[float]]) -> list[str]:
    """Why `probabilities` cannot mix `num_datasets` datasets (empty when they can): one per dataset, each > 0 (a
    dataset never drawn could never be used up), summing to 1."""
    if probabilities is None:
        return []
    problems = []
    if len(probabilities) != num_datasets:
        problems.append(f"{len(probabilities)} probabilities for {num_datasets} dataset(s); give one per dataset")
    if any(not p > 0 for p in probabilities):
        problems.append(f"every probability must be > 0, got {list(probabilities)}")
    elif abs(math.fsum(probabilities) - 1.0) > SUM_TOLERANCE:
        problems.append(f"probabilities must sum to 1, got {list(probabilities)} (sum {math.fsum(probabilities):g})")
    return problems


def interleave_order(lengths: Sequence[int], probabilities: Sequence[float], seed: int) -> list[tuple[int, int]]:
    """(dataset, row) of each row of the mix of datasets with `lengths` rows drawn with `probabilities` (module
    docstring): the rows `datasets.interleave_datasets(..., stopping_strategy="all_exhausted")` selects."""
    problems = probability_problems(len(lengths), probabilities)
    if problems:
        raise ValueError("; ".join(problems))
    if any(length < 1 for length in lengths):
        raise ValueError(f"every dataset of a mix needs rows, got lengths {list(lengths)}")
    rng = np.random.default_rng(seed)
    lengths_array = np.asarray(lengths, dtype=np.int64)
    blocks: list[np.ndarray] = []
    drawn = np.zeros(len(lengths), dtype=np.int64)
    while (drawn < lengths_array).any():
        block = rng.choice(len(lengths), size=DRAW_BLOCK, p=probabilities)
        blocks.append(block)
        drawn += np.bincount(block, minlength=len(lengths))
    sources = np.concatenate(blocks)
    # The mix ends at the draw that uses up the last dataset: the latest of the datasets' len(d)-th draws.
    end = max(int(np.flatnonzero(sources == d)[length - 1]) for d, length in enumerate(lengths))
    sources = sources[:end + 1]
    rows = np.empty(len(sources), dtype=np.int64)
    for d, length in enumerate(lengths):
        positions = np.flatnonzero(sources == d)
        rows[positions] = np.arange(len(positions)) % length
    return list(zip(sources.tolist(), rows.tolist()))


def mix(datasets: Sequence[Sequence[T]], probabilities: Optional[Sequence[float]], seed: int) -> list[T]:
    """The items of `datasets` one dataset after another (no probabilities), or interleaved with `probabilities`."""
    if probabilities is None:
        return [item for dataset in datasets for item in dataset]
    return [datasets[d][row] for d, row in interleave_order([len(d) for d in datasets], probabilities, seed)]


def mixed_records(paths: DataPaths, *, probabilities: Optional[Sequence[float]] = None, seed: int = 0,
                  max_samples: Optional[int] = None, columns: Optional[Sequence[str]] = None
                  ) -> Iterator[tuple[RowRef, dict]]:
    """(where, row) of the mix of the datasets `paths` names: each dataset's first `max_samples` rows, mixed, then the
    mix's first `max_samples` rows. Without probabilities the rows of the datasets one after another, streamed (a
    prefix of them is what capping each dataset and then their concatenation keeps). `columns` narrows columnar
    reads as in `iter_records`."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if probabilities is None:
        return itertools.islice(iter_records(paths, columns=columns), max_samples)
    datasets = [list(itertools.islice(iter_records(path, columns=columns), max_samples))
                for path in dataset_paths(paths)]
    return iter(mix(datasets, probabilities, seed)[:max_samples])
