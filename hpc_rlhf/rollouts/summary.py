"""Per-iteration statistics of rollout shards (samples, rewards, lengths, weight versions) for humans and logs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpc_rlhf.rollouts.reader import RolloutReader


@dataclass(frozen=True)
class IterationSummary:
    """What `tools/inspect_rollouts.py` prints for one iteration."""

    iteration: int
    complete: bool
    shards: int
    samples: int
    groups: int
    rewards_filled: int
    mean_reward: float | None
    mean_score: float | None
    mean_prompt_length: float | None
    max_prompt_length: int | None
    mean_response_length: float | None
    max_response_length: int | None
    policy_tokens: int
    weight_versions: list[int]

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_table(table: pa.Table, *, iteration: int, complete: bool, shards: int) -> IterationSummary:
    """Statistics of one iteration's table; means skip null rewards/scores and are None when nothing is there."""
    prompt_lengths = pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False)
    response_lengths = pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False)
    policy_tokens = pc.sum(pc.list_flatten(table.column("action_mask")).cast(pa.int64())).as_py() or 0
    return IterationSummary(
        iteration=iteration,
        complete=complete,
        shards=shards,
        samples=table.num_rows,
        groups=len(np.unique(table.column("group_id").to_numpy())),
        rewards_filled=table.num_rows - table.column("reward").null_count,
        mean_reward=_mean_of_present(table.column("reward")),
        mean_score=_mean_of_present(table.column("score")),
        mean_prompt_length=float(prompt_lengths.mean()) if len(prompt_lengths) else None,
        max_prompt_length=int(prompt_lengths.max()) if len(prompt_lengths) else None,
        mean_response_length=float(response_lengths.mean()) if len(response_lengths) else None,
        max_response_length=int(response_lengths.max()) if len(response_lengths) else None,
        policy_tokens=int(policy_tokens),
        weight_versions=sorted(int(v) for v in np.unique(table.column("weight_version").to_numpy())),
    )


def summarize_run(
    run_dir: str | os.PathLike, *, iteration: int | None = None, verify_checksum: bool = True
) -> list[IterationSummary]:
    """Summaries of every started iteration (complete or not), or of one."""
    reader = RolloutReader(run_dir, verify_checksum=verify_checksum)
    iterations = reader.iterations(complete_only=False) if iteration is None else [iteration]
    summaries = []
    for it in iterations:
        manifest = reader.manifest(it)
        table = reader.read(it, require_complete=False)
        summaries.append(summarize_table(table, iteration=it, complete=manifest.complete, shards=len(manifest.shards)))
    return summaries


def _mean_of_present(column: pa.ChunkedArray) -> float | None:
    values = column.drop_null().to_numpy().astype(np.float64)
    return float(values.mean()) if len(values) else None
