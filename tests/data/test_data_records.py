"""load_records / iter_records: every supported format gives the same rows; bad files are named in errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from hpc_rlhf.data.records import DatasetError, dataset_paths, iter_records, load_records

ROWS = [
    {"input": "12+7=", "label": "19", "weight": 1.5},
    {"input": "héllo\n\"quoted\"", "label": "x", "weight": -2.0},
    {"input": "3-5=", "label": "-2", "weight": 0.0},
]


def write_all_formats(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as JSONL, JSON array, Parquet, Arrow IPC file, Arrow IPC stream and Feather."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    paths = {
        "jsonl": folder / "rows.jsonl",
        "json": folder / "rows.json",
        "parquet": folder / "rows.parquet",
        "arrow_file": folder / "rows.arrow",
        "arrow_stream": folder / "stream.arrow",
        "feather": folder / "rows.feather",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows, indent=2))
    pq.write_table(table, paths["parquet"])
    with pa.OSFile(str(paths["arrow_file"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(paths["arrow_stream"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1):  # several record batches
            writer.write_batch(batch)
    feather.write_feather(table, paths["feather"])
    return paths


def test_every_format_gives_identical_rows(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    for kind, path in paths.items():
        assert load_records(path) == ROWS, kind


def test_row_references_count_rows_and_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    refs = [(ref.row, ref.line, row) for ref, row in iter_records(path)]
    assert refs == [(0, 1, {"a": 1}), (1, 4, {"a": 2})]
    stream = write_all_formats(tmp_path / "f", ROWS)["arrow_stream"]
    assert [str(ref) for ref, _ in iter_records(stream)] == [f"row {i} of {stream}" for i in range(3)]


def test_folder_reads_data_files_in_name_order_and_ignores_metadata(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[1:]), folder / "b.parquet")
    (folder / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "dataset_info.json").write_text('{"description": "metadata, not rows"}')
    (folder / "README.md").write_text("# notes")
    (folder / ".hidden.jsonl").write_text("not json")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.jsonl").write_text(json.dumps({"input": "nested"}) + "\n")
    assert load_records(folder) == ROWS


def test_limit_stops_early(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "this line is never parsed\n")
    assert load_records(path, limit=2) == ROWS[:2]
    assert load_records(path, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_records(path, limit=-1)


def test_columns_narrow_columnar_reads(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    for kind in ("parquet", "arrow_file", "arrow_stream"):
        rows = [row for _, row in iter_records(paths[kind], columns=["input", "absent"])]
        assert rows == [{"input": r["input"]} for r in ROWS], kind


def test_bad_json_line_names_file_row_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "ok"}\n{"input": oops}\n')
    with pytest.raises(DatasetError, match=rf"row 1 \(line 2\) of {re.escape(str(path))} is not valid JSON"):
        load_records(path)


def test_non_object_rows_are_rejected(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"input": "ok"}\n["not", "an", "object"]\n')
    where = rf"row 1 \(line 2\) of {re.escape(str(path))}"
    with pytest.raises(DatasetError, match=rf"{where} is a JSON list, expected an object"):
        load_records(path)
    array = tmp_path / "array.json"
    array.write_text('[{"input": "ok"}, 3]')
    with pytest.raises(DatasetError, match=rf"row 1 of {re.escape(str(array))} is a JSON int"):
        load_records(array)


def test_unknown_missing_and_empty_inputs_are_named(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("input\n1+1=\n")
    with pytest.raises(DatasetError, match=rf"unknown dataset file type '.csv' of {re.escape(str(csv))}"):
        load_records(csv)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(tmp_path / 'nope.jsonl'))} does not exist"):
        load_records(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=rf"folder {re.escape(str(empty))} holds no data files"):
        load_records(empty)
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"definitely not arrow")
    with pytest.raises(DatasetError, match=rf"cannot read Arrow IPC file {re.escape(str(broken))}"):
        load_records(broken)
    broken_parquet = tmp_path / "broken.parquet"
    broken_parquet.write_bytes(b"definitely not parquet")
    with pytest.raises(DatasetError, match=rf"cannot read Parquet file {re.escape(str(broken_parquet))}"):
        load_records(broken_parquet)


def test_several_datasets_are_read_one_after_another(tmp_path):
    """A list, or one string of comma-separated paths (OpenRLHF's --prompt_data a,b), names several datasets; a Path
    object is one dataset whatever its name."""
    paths = write_all_formats(tmp_path, ROWS)
    jsonl, parquet = paths["jsonl"], paths["parquet"]
    assert dataset_paths(f"{jsonl}, {parquet}") == [jsonl, parquet]
    assert dataset_paths([str(jsonl), parquet]) == [jsonl, parquet] == dataset_paths((jsonl, parquet))
    assert dataset_paths(tmp_path / "a,b.jsonl") == [tmp_path / "a,b.jsonl"]
    both = list(iter_records(f"{jsonl},{parquet}"))
    assert [row for _, row in both] == ROWS + ROWS
    assert [(where.file, where.row) for where, _ in both] == [(jsonl, i) for i in range(3)] + [(parquet, i)
                                                                                               for i in range(3)]
    assert load_records([jsonl, parquet], limit=4) == ROWS + ROWS[:1]
    for bad in ("", "a.jsonl,,b.jsonl", []):
        with pytest.raises(DatasetError, match="expected one dataset path or several"):
            dataset_paths(bad)
