"""The Arrow schema of a rollout shard, conversion of user data to it, and its validation.

One row is one sampled trajectory (a response to a prompt, possibly spanning several environment turns).
Token ids are list<int32>, per-token values list<float32>, masks list<int8>. Per-token columns have one
entry per response token. The schema carries its version in the Arrow metadata
(`hpc_rlhf.rollout_schema_version`); readers refuse files of another version.

Columns the later stages fill (reward, score, reference_log_probs, values) are nullable: the generator
writes nulls and a column shard (see `writer.ShardWriter.write_columns`) supplies them later. behaviour_log_probs is
null where the run did not ask the generator for them (`rollout.record_behaviour_log_probs`); shards written before
that was possible never hold nulls and still read.

Optional columns (`OPTIONAL_FIELDS`) are written only by shards that have them: `images` (list<binary>, each
prompt's images as PNG bytes, null for a text prompt) exists in a shard when some row of its input has an "images"
value, so text-only shards are exactly what they were before the column existed and old shards still read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpc_rlhf.rollouts.errors import RolloutValidationError, SchemaMismatchError

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"hpc_rlhf.rollout_schema_version"

TOKEN_IDS = pa.list_(pa.int32())
PER_TOKEN_FLOAT = pa.list_(pa.float32())
PER_TOKEN_MASK = pa.list_(pa.int8())

_FIELDS = [
    # name, type, nullable
    ("prompt_ids", TOKEN_IDS, False),  # prompt token ids as fed to the generator
    ("response_ids", TOKEN_IDS, False),  # every token after the prompt, environment turns included
    ("behaviour_log_probs", PER_TOKEN_FLOAT, True),  # generator log-prob of each response token (or null)
    ("action_mask", PER_TOKEN_MASK, False),  # 1 = policy token (trained on), 0 = environment / padding
    ("reference_log_probs", PER_TOKEN_FLOAT, True),  # filled by the reference stage
    ("values", PER_TOKEN_FLOAT, True),  # filled by the critic stage (PPO)
    ("reward", pa.float32(), True),  # filled by the reward stage
    ("score", pa.float32(), True),  # e.g. 0/1 correctness; filled by the reward stage
    ("label", pa.string(), True),  # dataset label / reference answer
    ("prompt_id", pa.int64(), False),  # dataset index of the prompt
    ("group_id", pa.int64(), False),  # the samples drawn for one prompt share a group (GRPO/RLOO)
    ("sample_index", pa.int32(), False),  # index of the sample within its group
    ("weight_version", pa.int64(), False),  # policy version that generated the sample
    ("turn_boundaries", TOKEN_IDS, False),  # offsets into response_ids where each environment turn starts
    ("extra", pa.string(), True),  # free-form JSON for logs
]

ROLLOUT_SCHEMA = pa.schema(
    [pa.field(name, type_, nullable=nullable) for name, type_, nullable in _FIELDS],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
IMAGES_FIELD = pa.field("images", pa.list_(pa.binary()), nullable=True)  # PNG bytes of each prompt's images
OPTIONAL_FIELDS: tuple[pa.Field, ...] = (IMAGES_FIELD,)
ROLLOUT_SCHEMA_WITH_IMAGES = pa.schema(list(ROLLOUT_SCHEMA) + [IMAGES_FIELD], metadata=ROLLOUT_SCHEMA.metadata)
COLUMN_NAMES: tuple[str, ...] = tuple(ROLLOUT_SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(name for name, _, nullable in _FIELDS if not nullable)
FILLABLE_COLUMNS: tuple[str, ...] = ("reference_log_probs", "values", "reward", "score")
PER_TOKEN_COLUMNS: tuple[str, ...] = ("behaviour_log_probs", "action_mask", "reference_log_probs", "values")
SORT_KEY: tuple[str, ...] = ("group_id", "sample_index")

# A column absent from the input gets this value in every row (nullable columns get null).
_DEFAULTS: dict[str, Any] = {"turn_boundaries": []}


def columns_schema(columns: Sequence[str]) -> pa.Schema:
    """Schema of a column shard holding `columns` (a subset of FILLABLE_COLUMNS), in schema order."""
    unknown = [name for name in columns if name not in FILLABLE_COLUMNS]
    if unknown:
        raise RolloutValidationError(f"column shards may only fill {list(FILLABLE_COLUMNS)}; got {unknown}")
    ordered = [name for name in COLUMN_NAMES if name in columns]
    return pa.schema([ROLLOUT_SCHEMA.field(name) for name in ordered], metadata=ROLLOUT_SCHEMA.metadata)


def empty_rollout_table() -> pa.Table:
    """A table with the rollout schema and no rows."""
    return ROLLOUT_SCHEMA.empty_table()


# ----------------------------------------------------------------------------------------------
# Conversion of user data (rows, dict of columns, Arrow) to a validated table


def to_rollout_table(data: Any, source: str = "input", *, with_images: bool | None = None) -> pa.Table:
    """Convert rows (list of dicts), a dict of columns or an Arrow table/batch to a validated rollout table; with the
    `images` column when the input has one (or when `with_images` says so: absent input images are then null)."""
    if with_images is None:
        with_images = _has_column(data, IMAGES_FIELD.name, source)
    schema = ROLLOUT_SCHEMA_WITH_IMAGES if with_images else ROLLOUT_SCHEMA
    table = _conform(data, schema, source, fill_missing=True)
    validate_rollout_table(table, source)
    return table


def to_column_table(data: Any, source: str = "input") -> pa.Table:
    """Convert fillable columns (dict of columns, rows or Arrow) to a table of those columns only."""
    names = _input_column_names(data, source)
    if not names:
        raise RolloutValidationError(f"{source}: no columns given; expected some of {list(FILLABLE_COLUMNS)}")
    schema = columns_schema(names)
    return _conform(data, schema, source, fill_missing=False)


def _has_column(data: Any, name: str, source: str) -> bool:
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and len(data) == 0:
        return False
    return name in _input_column_names(data, source)


def with_images_column(table: pa.Table) -> pa.Table:
    """`table` with a null `images` column added when it has none (to concatenate text and image shards)."""
    if IMAGES_FIELD.name in table.schema.names:
        return table
    return table.append_column(IMAGES_FIELD, pa.nulls(table.num_rows, type=IMAGES_FIELD.type))


def _input_column_names(data: Any, source: str) -> list[str]:
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return list(data.schema.names)
    if isinstance(data, Mapping):
        return list(data.keys())
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        names: dict[str, None] = {}
        for row in data:
            if not isinstance(row, Mapping):
                raise RolloutValidationError(f"{source}: rows must be dicts, got {type(row).__name__}")
            names.update(dict.fromkeys(row))
        return list(names)
    raise RolloutValidationError(
        f"{source}: expected a pyarrow Table/RecordBatch, a dict of columns or a list of row dicts, "
        f"got {type(data).__name__}"
    )


def _conform(data: Any, schema: pa.Schema, source: str, *, fill_missing: bool) -> pa.Table:
    """Build a table with exactly `schema` from `data`, casting safely and naming the offending column."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        columns: dict[str, Any] = {name: data.column(name) for name in data.schema.names}
        num_rows: int | None = data.num_rows
    elif isinstance(data, Mapping):
        columns = dict(data)
        num_rows = None
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and len(data) == 0:
        return schema.empty_table()  # no rows at all, e.g. a generator that drew no prompts
    else:
        columns, num_rows = _rows_to_columns(data, schema, source)

    unknown = [name for name in columns if name not in schema.names]
    if unknown:
        raise RolloutValidationError(f"{source}: unknown column(s) {unknown}; the schema has {schema.names}")

    lengths = {name: len(values) for name, values in columns.items()}
    if num_rows is None:
        num_rows = next(iter(lengths.values()), 0)
    for name, length in lengths.items():
        if length != num_rows:
            raise RolloutValidationError(f"{source}: column '{name}' has {length} rows, other columns have {num_rows}")

    arrays = []
    for field in schema:
        if field.name in columns:
            arrays.append(_to_arrow(columns[field.name], field, source))
        elif not fill_missing:
            continue
        elif field.name in _DEFAULTS:
            arrays.append(pa.array([_DEFAULTS[field.name]] * num_rows, type=field.type))
        elif field.nullable:
            arrays.append(pa.nulls(num_rows, type=field.type))
        else:
            raise RolloutValidationError(f"{source}: missing required column '{field.name}'")
    if not fill_missing:
        schema = pa.schema([field for field in schema if field.name in columns], metadata=schema.metadata)
    return pa.Table.from_arrays(arrays, schema=schema)


def _rows_to_columns(rows: Any, schema: pa.Schema, source: str) -> tuple[dict[str, list[Any]], int]:
    """Transpose a list of row dicts; a required key missing from some rows is an error naming the row."""
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise RolloutValidationError(
            f"{source}: expected a pyarrow Table/RecordBatch, a dict of columns or a list of row dicts, "
            f"got {type(rows).__name__}"
        )
    names = _input_column_names(rows, source)
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for index, row in enumerate(rows):
        for name in names:
            if name in row:
                columns[name].append(row[name])
            elif name in _DEFAULTS:
                columns[name].append(_DEFAULTS[name])
            elif name in schema.names and not schema.field(name).nullable:
                raise RolloutValidationError(f"{source}: row {index} has no '{name}'")
            else:
                columns[name].append(None)
    return columns, len(rows)


def _to_arrow(values: Any, field: pa.Field, source: str) -> pa.ChunkedArray | pa.Array:
    try:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            return values if values.type == field.type else values.cast(field.type, safe=True)
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as exc:
        raise RolloutValidationError(
            f"{source}: column '{field.name}' cannot be converted to {field.type}: {exc}"
        ) from exc


# ----------------------------------------------------------------------------------------------
# Validation of values


def validate_rollout_table(table: pa.Table, source: str = "input") -> None:
    """Check the schema's rules on a full rollout table; raise naming the column and the first bad row."""
    for name in REQUIRED_COLUMNS:
        _check_no_nulls(table.column(name), name, source)
    response_lengths = _list_lengths(table.column("response_ids"))
    _check_values(table, response_lengths, source)


def validate_column_table(table: pa.Table, response_lengths: np.ndarray, source: str = "input") -> None:
    """Check a column shard against the response lengths of the shard it fills."""
    if table.num_rows != len(response_lengths):
        raise RolloutValidationError(
            f"{source}: has {table.num_rows} rows, the shard it fills has {len(response_lengths)}"
        )
    _check_values(table, response_lengths, source)


def _check_values(table: pa.Table, response_lengths: np.ndarray, source: str) -> None:
    names = set(table.schema.names)
    for name in names & {"prompt_ids", "response_ids"}:
        items, parents = _flatten(table.column(name), name, source)
        _fail_where(items < 0, parents, name, source, "has a negative token id")
    for name in names & set(PER_TOKEN_COLUMNS):
        lengths = _list_lengths(table.column(name))
        present = lengths >= 0
        _fail_where(
            present & (lengths != response_lengths),
            np.arange(len(lengths)),
            name,
            source,
            "length differs from the number of response tokens",
        )
        items, parents = _flatten(table.column(name), name, source)
        if name == "action_mask":
            _fail_where((items != 0) & (items != 1), parents, name, source, "holds a value other than 0 or 1")
        else:
            _fail_where(~np.isfinite(items), parents, name, source, "holds a NaN or infinite value")
    for name in names & {"reward", "score"}:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        present = ~_null_mask(table.column(name))
        _fail_where(present & ~np.isfinite(values), np.arange(len(values)), name, source, "is NaN or infinite")
    if "turn_boundaries" in names:
        items, parents = _flatten(table.column("turn_boundaries"), "turn_boundaries", source)
        limits = response_lengths[parents]
        _fail_where(
            (items < 0) | (items > limits),
            parents,
            "turn_boundaries",
            source,
            "has an offset outside [0, number of response tokens]",
        )
        decreasing = np.zeros(len(items), dtype=bool)
        decreasing[1:] = (items[1:] < items[:-1]) & (parents[1:] == parents[:-1])
        _fail_where(decreasing, parents, "turn_boundaries", source, "offsets are not in increasing order")
    for name in names & {"sample_index", "weight_version"}:
        values = table.column(name).to_numpy(zero_copy_only=False)
        _fail_where(values < 0, np.arange(len(values)), name, source, "is negative")


def _check_no_nulls(column: pa.ChunkedArray, name: str, source: str) -> None:
    if column.null_count:
        row = int(np.flatnonzero(_null_mask(column))[0])
        raise RolloutValidationError(f"{source}: column '{name}', row {row}: is null but the column is required")


def _null_mask(column: pa.ChunkedArray) -> np.ndarray:
    return pc.is_null(column).to_numpy(zero_copy_only=False)


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Length of each list, -1 for a null list."""
    return pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _flatten(column: pa.ChunkedArray, name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Items of a list column and the row each belongs to; null items are an error."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    items = pc.list_flatten(array)
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    if items.null_count:
        position = int(np.flatnonzero(pc.is_null(items).to_numpy(zero_copy_only=False))[0])
        raise RolloutValidationError(f"{source}: column '{name}', row {int(parents[position])}: holds a null item")
    return items.to_numpy(zero_copy_only=False), parents


def _fail_where(bad: np.ndarray, rows: np.ndarray, name: str, source: str, what: str) -> None:
    if bad.any():
        row = int(rows[np.flatnonzero(bad)[0]])
        raise RolloutValidationError(f"{source}: column '{name}', row {row}: {what}")


# ----------------------------------------------------------------------------------------------
# Schema checks of files on disk


def check_file_schema(schema: pa.Schema, path: Any, expected: pa.Schema = ROLLOUT_SCHEMA) -> None:
    """Raise SchemaMismatchError naming `path` and the column when `schema` is not `expected`."""
    metadata = schema.metadata or {}
    version = metadata.get(SCHEMA_VERSION_KEY)
    if version is None:
        raise SchemaMismatchError(f"{path}: no rollout schema version in the Arrow metadata; not a rollout shard")
    if version.decode(errors="replace") != str(SCHEMA_VERSION):
        raise SchemaMismatchError(
            f"{path}: written with rollout schema version {version.decode(errors='replace')}; "
            f"this code reads version {SCHEMA_VERSION}"
        )
    for field in expected:
        if field.name not in schema.names:
            raise SchemaMismatchError(f"{path}: column '{field.name}' is missing")
        found = schema.field(field.name).type
        if found != field.type:
            raise SchemaMismatchError(f"{path}: column '{field.name}' has type {found}, expected {field.type}")
    optional = {field.name: field.type for field in OPTIONAL_FIELDS} if expected is ROLLOUT_SCHEMA else {}
    for name in schema.names:
        if name in optional and name not in expected.names:
            if schema.field(name).type != optional[name]:
                raise SchemaMismatchError(f"{path}: column '{name}' has type {schema.field(name).type}, expected "
                                          f"{optional[name]}")
        elif name not in expected.names:
            raise SchemaMismatchError(f"{path}: unexpected column '{name}'")
