"""Rollout data plane: Arrow IPC shards on the shared filesystem, commit records, per-iteration manifests.

Layout of RUN_DIR/rollouts/ (see docs/rollout_format.md):

    iter_000042/generator_0003.arrow               shard of generator rank 3 (Arrow IPC file format)
    iter_000042/generator_0003.commit.json         commit record: rows, bytes, sha256, schema version
    iter_000042/generator_0003.rewards.arrow       column shard: rewards/scores for generator_0003's rows
    iter_000042/generator_0003.rewards.commit.json
    iter_000042/MANIFEST.json                      written once all expected shards are committed

Typical use:

    writer = ShardWriter(run_dir)
    writer.write(42, generator_shard_name(rank), rows)            # each generator rank
    commit_iteration(run_dir, 42, [generator_shard_name(r) for r in range(num_generators)])  # one rank
    writer.write_columns(42, "generator_0003", "rewards", {"reward": rewards})               # reward stage
    wait_for_iteration(run_dir, 42, stages=["rewards"])                                     # trainers
    table = RolloutReader(run_dir).read(42, rank=r, world_size=w, require_filled=["reward"])
"""

from hpc_rlhf.rollouts.errors import (
    CorruptShardError,
    IncompleteIterationError,
    ManifestError,
    RolloutError,
    RolloutValidationError,
    SchemaMismatchError,
    ShardExistsError,
)
from hpc_rlhf.rollouts.manifest import (
    Manifest,
    ShardRecord,
    cleanup_uncommitted,
    commit_iteration,
    committed_shards,
    iterations_completed,
    iterations_started,
    latest_complete_iteration,
    load_manifest,
)
from hpc_rlhf.rollouts.partition import partition_bounds, sort_order
from hpc_rlhf.rollouts.paths import generator_shard_name, iteration_dir, shard_file_name
from hpc_rlhf.rollouts.reader import RolloutReader, read_shard_file
from hpc_rlhf.rollouts.schema import (
    COLUMN_NAMES,
    FILLABLE_COLUMNS,
    PER_TOKEN_COLUMNS,
    REQUIRED_COLUMNS,
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    empty_rollout_table,
    to_rollout_table,
    validate_rollout_table,
)
from hpc_rlhf.rollouts.summary import IterationSummary, summarize_run, summarize_table
from hpc_rlhf.rollouts.waiting import WAIT_TIMEOUT_S, iteration_ready, wait_for_iteration, wait_for_shards, wait_until
from hpc_rlhf.rollouts.writer import ShardWriter

__all__ = [
    "COLUMN_NAMES",
    "FILLABLE_COLUMNS",
    "PER_TOKEN_COLUMNS",
    "REQUIRED_COLUMNS",
    "ROLLOUT_SCHEMA",
    "SCHEMA_VERSION",
    "WAIT_TIMEOUT_S",
    "CorruptShardError",
    "IncompleteIterationError",
    "IterationSummary",
    "Manifest",
    "ManifestError",
    "RolloutError",
    "RolloutReader",
    "RolloutValidationError",
    "SchemaMismatchError",
    "ShardExistsError",
    "ShardRecord",
    "ShardWriter",
    "cleanup_uncommitted",
    "commit_iteration",
    "committed_shards",
    "empty_rollout_table",
    "generator_shard_name",
    "iteration_dir",
    "iteration_ready",
    "iterations_completed",
    "iterations_started",
    "latest_complete_iteration",
    "load_manifest",
    "partition_bounds",
    "read_shard_file",
    "shard_file_name",
    "sort_order",
    "summarize_run",
    "summarize_table",
    "to_rollout_table",
    "validate_rollout_table",
    "wait_for_iteration",
    "wait_for_shards",
    "wait_until",
]
