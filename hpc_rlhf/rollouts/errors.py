"""Exceptions raised by the rollout data plane.

Every message names the file (or the input) and, where it applies, the column and row, so that a
failed job says what to look at without a debugger.
"""

from __future__ import annotations


class RolloutError(Exception):
    """Base class for every error about rollout shards, commit records and manifests."""


class RolloutValidationError(RolloutError, ValueError):
    """Rows or columns handed to a writer break the schema's rules (names the column and row)."""


class SchemaMismatchError(RolloutError):
    """A file on disk does not carry the rollout schema this code reads (names the file and column)."""


class CorruptShardError(RolloutError):
    """A shard's bytes do not match its commit record, or Arrow cannot read it (names the file)."""


class ManifestError(RolloutError):
    """A commit record or manifest is unreadable, truncated or inconsistent (names the file)."""


class IncompleteIterationError(RolloutError):
    """An iteration was read or completed before all expected shards were committed."""


class ShardExistsError(RolloutError):
    """A writer was asked to replace a shard that is already committed, without `overwrite=True`."""
