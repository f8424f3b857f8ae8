"""Read dataset rows as plain dicts from local JSONL, JSON, Parquet or Arrow files, or a folder of them.

Supported files, chosen by extension:
  .jsonl / .ndjson        one JSON object per line (blank lines skipped)
  .json                   a JSON array of objects, or JSON lines
  .parquet                Parquet
  .arrow / .feather / .ipc  Arrow IPC, file or stream format (`datasets.save_to_disk` shards are the stream format)
A folder yields the rows of its .jsonl, .ndjson, .parquet, .arrow, .feather and .ipc files in name order, without
descending into sub-folders; other files (README, metadata .json) are ignored.
Several datasets (a list, or one string of comma-separated paths as in OpenRLHF's `--prompt_data a,b`) yield their rows
one dataset after another; `mixing` interleaves them with probabilities instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
FOLDER_SUFFIXES = JSON_LINES_SUFFIXES + (".parquet",) + ARROW_SUFFIXES
FILE_SUFFIXES = FOLDER_SUFFIXES + (".json",)


# What a data key names: one file or folder, a list of them, or one string of comma-separated paths.
DataPaths = Union[str, Path, Sequence[Union[str, Path]]]


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: its file, its 0-based position among that file's rows and, for JSON lines, its line."""

    file: Path
    row: int
    line: Optional[int] = None

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where} of {self.file}"


def dataset_paths(paths: DataPaths) -> list[Path]:
    """The datasets `paths` names, in order: a list as it is; a string split at its commas (OpenRLHF's rule, so a path
    in a string cannot hold a comma; a Path object is never split)."""
    if isinstance(paths, Path):
        return [paths]
    parts = paths.split(",") if isinstance(paths, str) else list(paths)
    names = [part.strip() if isinstance(part, str) else part for part in parts]
    if not names or any(name in ("", None) for name in names):
        raise DatasetError(f"expected one dataset path or several, got {paths!r}")
    return [Path(name) for name in names]


def data_files(path: str | Path) -> list[Path]:
    """The data files behind `path`: the file itself, or a folder's data files in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FOLDER_SUFFIXES)
        if not files:
            raise DatasetError(f"folder {path} holds no data files (looked for {', '.join(FOLDER_SUFFIXES)})")
        return files
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DatasetError(f"unknown dataset file type {path.suffix or '(none)'!r} of {path}; "
                           f"expected one of {', '.join(FILE_SUFFIXES)}")
    return [path]


def iter_records(path: DataPaths, columns: Optional[Sequence[str]] = None) -> Iterator[tuple[RowRef, dict]]:
    """Yield (where, row) for every row of the file or folder at `path` (of each dataset in turn when it names several).

    `columns` only narrows what columnar files (Parquet, Arrow) read; columns they lack are simply absent from rows.
    """
    for file in (file for dataset in dataset_paths(path) for file in data_files(dataset)):
        suffix = file.suffix.lower()
        if suffix in JSON_LINES_SUFFIXES:
            yield from _iter_json_lines(file)
        elif suffix == ".json":
            yield from _iter_json(file)
        elif suffix == ".parquet":
            yield from _iter_table_rows(file, _read_parquet(file, columns))
        else:
            yield from _iter_table_rows(file, _read_arrow(file, columns))


def load_records(path: DataPaths, *, limit: Optional[int] = None) -> list[dict]:
    """All rows of the file or folder at `path` as dicts (the first `limit` rows when given)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    records: list[dict] = []
    if limit == 0:
        return records
    for _, record in iter_records(path):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def check_records(path: DataPaths, *, limit: Optional[int] = None) -> int:
    """Read the first `limit` rows (all when None) of the file or folder at `path`, so that a missing file or an
    unreadable row is reported before any model loads; raises DatasetError naming the file and row. Returns the
    number of rows read."""
    count = 0
    for _ in iter_records(path):
        count += 1
        if limit is not None and count >= limit:
            break
    return count


def _check_object(value: object, where: RowRef) -> dict:
    if not isinstance(value, dict):
        raise DatasetError(f"{where} is a JSON {type(value).__name__}, expected an object")
    return value


def _iter_json_lines(file: Path) -> Iterator[tuple[RowRef, dict]]:
    row = 0
    with file.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = RowRef(file, row, line_number)
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where} is not valid JSON: {err.msg}") from None
            yield where, _check_object(value, where)
            row += 1


def _iter_json(file: Path) -> Iterator[tuple[RowRef, dict]]:
    text = file.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _iter_json_lines(file)
        return
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{file} is not valid JSON: {err.msg} at line {err.lineno}") from None
    for row, value in enumerate(values):
        where = RowRef(file, row)
        yield where, _check_object(value, where)


def _select(table, columns: Optional[Sequence[str]]):
    """Keep only the requested columns the table has (all of them when `columns` is None)."""
    if columns is None:
        return table
    wanted = set(columns)
    return table.select([name for name in table.column_names if name in wanted])


def _read_parquet(file: Path, columns: Optional[Sequence[str]]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if columns is None:
            return pq.read_table(file)
        wanted = set(columns)
        present = pq.ParquetFile(file).schema_arrow.names
        return pq.read_table(file, columns=[name for name in present if name in wanted])
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"cannot read Parquet file {file}: {err}") from None


def _read_arrow(file: Path, columns: Optional[Sequence[str]]):
    """Read an Arrow IPC file, trying the random-access file format first and the stream format second."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"cannot read Arrow IPC file {file} (file or stream format): {err}") from None
    return _select(table, columns)


def _iter_table_rows(file: Path, table) -> Iterator[tuple[RowRef, dict]]:
    row = 0
    for batch in table.to_batches():
        for record in batch.to_pylist():
            yield RowRef(file, row), record
            row += 1
