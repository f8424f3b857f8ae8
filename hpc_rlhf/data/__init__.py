"""Datasets: reading local JSONL/Parquet/Arrow rows, mixing datasets, building prompts, and sharding prompts over
ranks."""

from hpc_rlhf.data.mixing import interleave_order, mix, mixed_records, probability_problems
from hpc_rlhf.data.prompts import PromptExample, check_prompt_rows, load_prompts
from hpc_rlhf.data.records import (
    DataPaths,
    DatasetError,
    RowRef,
    check_records,
    data_files,
    dataset_paths,
    iter_records,
    load_records,
)
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

__all__ = [
    "DataPaths",
    "DatasetError",
    "PromptExample",
    "RowRef",
    "block_indices",
    "check_prompt_rows",
    "check_records",
    "data_files",
    "dataset_paths",
    "epoch_and_iteration",
    "epoch_permutation",
    "interleave_order",
    "iter_records",
    "iterations_per_epoch",
    "load_prompts",
    "load_records",
    "mix",
    "mixed_records",
    "probability_problems",
    "prompt_indices_for",
    "rank_slice",
    "refill_slice",
    "stream_indices",
]
