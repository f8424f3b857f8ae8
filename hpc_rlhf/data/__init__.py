"""Datasets: reading local JSONL/Parquet/Arrow rows, building prompts, and sharding prompts over ranks."""

from hpc_rlhf.data.prompts import PromptExample, check_prompt_rows, load_prompts
from hpc_rlhf.data.records import DatasetError, RowRef, check_records, data_files, iter_records, load_records
from hpc_rlhf.data.sharding import (
    block_indices,
    epoch_and_iteration,
    epoch_permutation,
    iterations_per_epoch,
    prompt_indices_for,
    rank_slice,
)

__all__ = [
    "DatasetError",
    "PromptExample",
    "RowRef",
    "block_indices",
    "check_prompt_rows",
    "check_records",
    "data_files",
    "epoch_and_iteration",
    "epoch_permutation",
    "iter_records",
    "iterations_per_epoch",
    "load_prompts",
    "load_records",
    "prompt_indices_for",
    "rank_slice",
]
