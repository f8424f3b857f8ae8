"""Rollout schema: conversions from rows / columns / Arrow, validation messages, file schema checks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc_rlhf.rollouts import ROLLOUT_SCHEMA, SCHEMA_VERSION, RolloutValidationError, SchemaMismatchError
from hpc_rlhf.rollouts.schema import (
    SCHEMA_VERSION_KEY,
    check_file_schema,
    columns_schema,
    to_column_table,
    to_rollout_table,
)


def _row(**overrides):
    row = {
        "prompt_ids": [5, 6],
        "response_ids": [7, 8, 9],
        "behaviour_log_probs": [-0.5, -1.0, -0.25],
        "action_mask": [1, 0, 1],
        "prompt_id": 3,
        "group_id": 3,
        "sample_index": 0,
        "weight_version": 2,
    }
    row.update(overrides)
    return row


def test_schema_types_and_version():
    types = {field.name: field.type for field in ROLLOUT_SCHEMA}
    assert types["prompt_ids"] == pa.list_(pa.int32())
    assert types["response_ids"] == pa.list_(pa.int32())
    assert types["behaviour_log_probs"] == pa.list_(pa.float32())
    assert types["action_mask"] == pa.list_(pa.int8())
    assert types["reward"] == pa.float32() and types["score"] == pa.float32()
    assert types["prompt_id"] == pa.int64() and types["group_id"] == pa.int64()
    assert types["sample_index"] == pa.int32() and types["weight_version"] == pa.int64()
    assert types["turn_boundaries"] == pa.list_(pa.int32())
    assert types["label"] == pa.string() and types["extra"] == pa.string()
    assert ROLLOUT_SCHEMA.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert not ROLLOUT_SCHEMA.field("response_ids").nullable
    assert ROLLOUT_SCHEMA.field("reward").nullable


def test_rows_columns_and_arrow_inputs_give_the_same_table():
    rows = [_row(), _row(sample_index=1, reward=0.5, label="x", turn_boundaries=[0, 2])]
    from_rows = to_rollout_table(rows)
    columns = {name: [row.get(name) for row in rows] for name in rows[1]}
    columns["turn_boundaries"] = [[], [0, 2]]
    from_columns = to_rollout_table(columns)
    from_arrow = to_rollout_table(pa.Table.from_pydict(columns))
    from_batch = to_rollout_table(pa.Table.from_pydict(columns).to_batches()[0])
    assert from_rows.equals(from_columns)
    assert from_rows.equals(from_arrow)
    assert from_rows.equals(from_batch)
    assert from_rows.schema.equals(ROLLOUT_SCHEMA, check_metadata=True)
    got = from_rows.to_pylist()
    assert got[0]["reward"] is None and got[0]["turn_boundaries"] == [] and got[0]["label"] is None
    assert got[1]["reward"] == 0.5 and got[1]["turn_boundaries"] == [0, 2]


def test_numpy_values_are_cast_and_overflow_names_the_column():
    row = _row(response_ids=np.array([1, 2, 3], dtype=np.int64), behaviour_log_probs=np.array([-1.0, -2.0, -3.0]))
    table = to_rollout_table([row])
    assert table.column("response_ids").to_pylist() == [[1, 2, 3]]
    with pytest.raises(RolloutValidationError, match="column 'response_ids'"):
        to_rollout_table([_row(response_ids=np.array([1, 2, 2**40], dtype=np.int64))])


@pytest.mark.parametrize(
    "rows, message",
    [
        ([_row(), _row(behaviour_log_probs=[-1.0])], r"column 'behaviour_log_probs', row 1: length differs"),
        ([_row(action_mask=[1, 2, 0])], r"column 'action_mask', row 0: holds a value other than 0 or 1"),
        ([_row(), _row(turn_boundaries=[0, 4])], r"column 'turn_boundaries', row 1: has an offset outside"),
        ([_row(turn_boundaries=[2, 1])], r"column 'turn_boundaries', row 0: offsets are not in increasing order"),
        ([_row(), _row(), _row(prompt_ids=[1, -3])], r"column 'prompt_ids', row 2: has a negative token id"),
        ([_row(behaviour_log_probs=[-1.0, math.nan, -1.0])], r"column 'behaviour_log_probs', row 0: holds a NaN"),
        ([_row(), _row(reward=math.inf)], r"column 'reward', row 1: is NaN or infinite"),
        ([_row(reference_log_probs=[-1.0, -1.0])], r"column 'reference_log_probs', row 0: length differs"),
        ([_row(), _row(prompt_id=None)], r"column 'prompt_id', row 1: is null"),
        ([_row(response_ids=[1, None, 3])], r"column 'response_ids', row 0: holds a null item"),
        ([_row(sample_index=-1)], r"column 'sample_index', row 0: is negative"),
        ([_row(), {k: v for k, v in _row().items() if k != "group_id"}], r"row 1 has no 'group_id'"),
        ([_row(rewards=1.0)], r"unknown column\(s\) \['rewards'\]"),
        ([_row(response_ids="abc")], r"column 'response_ids' cannot be converted"),
    ],
)
def test_bad_rows_raise_naming_column_and_row(rows, message):
    with pytest.raises(RolloutValidationError, match=message):
        to_rollout_table(rows, source="unit test")


def test_missing_required_column_and_unequal_columns():
    columns = {name: [value] for name, value in _row().items() if name != "weight_version"}
    with pytest.raises(RolloutValidationError, match="missing required column 'weight_version'"):
        to_rollout_table(columns)
    columns = {name: [value, value] for name, value in _row().items()}
    columns["group_id"] = [1]
    with pytest.raises(RolloutValidationError, match="column 'group_id' has 1 rows, other columns have 2"):
        to_rollout_table(columns)


def test_column_tables_accept_only_fillable_columns():
    table = to_column_table({"score": [1, 0], "reward": [0.5, -1.0]})
    assert table.schema.names == ["reward", "score"]  # schema order, not input order
    assert table.column("score").type == pa.float32()
    with pytest.raises(RolloutValidationError, match="may only fill"):
        to_column_table({"reward": [1.0], "response_ids": [[1]]})
    with pytest.raises(RolloutValidationError, match="no columns given"):
        to_column_table({})


_float32s = st.floats(width=32, allow_nan=False, allow_infinity=False, max_value=0.0)


@st.composite
def _rollout_rows(draw):
    rows = []
    for index in range(draw(st.integers(0, 6))):
        length = draw(st.integers(0, 8))
        rows.append(
            {
                "prompt_ids": draw(st.lists(st.integers(0, 2**31 - 1), max_size=5)),
                "response_ids": draw(st.lists(st.integers(0, 2**31 - 1), min_size=length, max_size=length)),
                "behaviour_log_probs": draw(st.lists(_float32s, min_size=length, max_size=length)),
                "action_mask": draw(st.lists(st.integers(0, 1), min_size=length, max_size=length)),
                "reference_log_probs": draw(st.none() | st.lists(_float32s, min_size=length, max_size=length)),
                "values": None,
                "reward": draw(st.none() | st.floats(width=32, allow_nan=False, allow_infinity=False)),
                "score": draw(st.none() | st.sampled_from([0.0, 1.0])),
                "label": draw(st.none() | st.text(max_size=5)),
                "prompt_id": draw(st.integers(-(2**63), 2**63 - 1)),
                "group_id": draw(st.integers(-(2**63), 2**63 - 1)),
                "sample_index": index,
                "weight_version": draw(st.integers(0, 2**63 - 1)),
                "turn_boundaries": sorted(draw(st.lists(st.integers(0, length), max_size=3))),
                "extra": draw(st.none() | st.just('{"turns": 2}')),
            }
        )
    return rows


# Hypothesis itself discards some draws of the bounded float32 lists (the test filters nothing); on an unlucky seed
# that tripped its filter_too_much health check before 60 examples: the examples still run, the check is off.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_rollout_rows())
def test_valid_rows_round_trip_exactly(rows):
    table = to_rollout_table(rows)
    assert table.num_rows == len(rows)
    assert table.to_pylist() == rows


def test_file_schema_check_names_file_and_column():
    path = "iter_000001/generator_0000.arrow"
    check_file_schema(ROLLOUT_SCHEMA, path)
    wrong_type = ROLLOUT_SCHEMA.set(1, pa.field("response_ids", pa.list_(pa.int64())))
    with pytest.raises(
        SchemaMismatchError, match=r"generator_0000.arrow: column 'response_ids' has type list<item: int64>"
    ):
        check_file_schema(wrong_type, path)
    with pytest.raises(SchemaMismatchError, match=r"column 'reward' is missing"):
        check_file_schema(ROLLOUT_SCHEMA.remove(ROLLOUT_SCHEMA.get_field_index("reward")), path)
    with pytest.raises(SchemaMismatchError, match=r"unexpected column 'foo'"):
        check_file_schema(ROLLOUT_SCHEMA.append(pa.field("foo", pa.int8())), path)
    with pytest.raises(SchemaMismatchError, match=r"written with rollout schema version 99"):
        check_file_schema(ROLLOUT_SCHEMA.with_metadata({SCHEMA_VERSION_KEY: b"99"}), path)
    with pytest.raises(SchemaMismatchError, match=r"no rollout schema version"):
        check_file_schema(ROLLOUT_SCHEMA.remove_metadata(), path)
    check_file_schema(columns_schema(["reward"]), path, columns_schema(["reward"]))
