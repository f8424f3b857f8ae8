"""load_prompts: OpenRLHF's dataset options, identical prompts from every format, errors that name key/row/file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpc_rlhf.data.prompts import PromptExample, load_prompts
from hpc_rlhf.data.records import DatasetError

REPO = Path(__file__).resolve().parents[2]

ROWS = [
    {"question": "12+7=", "answer": "19"},
    {"question": "What is 3 - 5?", "answer": "-2"},
    {"question": "  spaced  out  ", "answer": "ok"},
]


def write_formats(folder: Path, rows: list[dict]) -> list[Path]:
    """The rows as JSONL, Parquet, Arrow IPC file and Arrow IPC stream."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    jsonl, parquet, arrow_file, arrow_stream = (folder / n for n in ("p.jsonl", "p.parquet", "p.arrow", "s.arrow"))
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(table, parquet)
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(arrow_stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return [jsonl, parquet, arrow_file, arrow_stream]


def test_formats_give_identical_prompts(tmp_path, tiny_tokenizer):
    paths = write_formats(tmp_path, ROWS)
    for options in (
        {},
        {"input_template": "Q: {}\nA: "},
        {"apply_chat_template": True, "tokenizer": tiny_tokenizer},
        {"max_samples": 2},
    ):
        results = [load_prompts(p, input_key="question", label_key="answer", **options) for p in paths]
        assert all(r == results[0] for r in results), options
    assert results[0] == [PromptExample("12+7=", "19", 0), PromptExample("What is 3 - 5?", "-2", 1)]


def test_input_template_and_labels(tmp_path):
    path = write_formats(tmp_path, ROWS)[0]
    examples = load_prompts(path, input_key="question", label_key="answer", input_template="Q: {}\nA: ")
    assert [e.prompt for e in examples] == ["Q: 12+7=\nA: ", "Q: What is 3 - 5?\nA: ", "Q:   spaced  out  \nA: "]
    assert [e.label for e in examples] == ["19", "-2", "ok"]
    assert [e.index for e in examples] == [0, 1, 2]
    no_labels = load_prompts(path, input_key="question")
    assert [e.label for e in no_labels] == [None, None, None]
    with pytest.raises(ValueError, match="input_template must contain"):
        load_prompts(path, input_key="question", input_template="Q: %s")


def test_chat_template_wraps_text_and_renders_message_lists(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"input": "12+7="},
        {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_prompts(path, apply_chat_template=True, tokenizer=tiny_tokenizer, input_template="ignored {}")
    assert [e.prompt for e in examples] == [
        "<s><|user|>12+7=</s><|assistant|>",
        "<s><|system|>Be brief.</s><|user|>1+1=</s><|assistant|>",
    ]
    with pytest.raises(DatasetError, match=rf"input of row 1 \(line 2\) of {re.escape(str(path))} is a list"):
        load_prompts(path)  # messages without the chat template
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        load_prompts(path, apply_chat_template=True)


def test_chat_messages_from_parquet_structs(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.parquet"
    messages = [{"role": "user", "content": "2+2="}]
    pq.write_table(pa.Table.from_pylist([{"input": messages, "label": 4}]), path)
    [example] = load_prompts(path, label_key="label", apply_chat_template=True, tokenizer=tiny_tokenizer)
    assert example == PromptExample("<s><|user|>2+2=</s><|assistant|>", "4", 0)


def test_malformed_chat_messages_are_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"input": [{"role": "user"}]}) + "\n")
    with pytest.raises(DatasetError, match=rf"message 0 of row 0 \(line 1\) of {re.escape(str(path))}"):
        load_prompts(path, apply_chat_template=True, tokenizer=tiny_tokenizer)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow"])
def test_missing_input_key_names_key_row_and_file(tmp_path, kind):
    rows = [{"input": "1+1=", "label": "2"}, {"input": "2+2=", "label": "4"}, {"prompt": "3+3=", "label": "6"}]
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        where = rf"row 2 \(line 3\) of {re.escape(str(path))}"
    else:
        # Columnar files hold every column; the missing value is a null there.
        table = pa.Table.from_pylist(rows)
        if kind == "parquet":
            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        where = rf"row 2 of {re.escape(str(path))}"
    with pytest.raises(DatasetError, match=rf"key 'input' is (missing|null) in {where}"):
        load_prompts(path, label_key="label")


def test_missing_label_key_names_key_row_and_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"input": "1+1=", "label": "2"}\n{"input": "2+2="}\n')
    with pytest.raises(DatasetError, match=rf"key 'label' is missing in row 1 \(line 2\) of {re.escape(str(path))}"):
        load_prompts(path, label_key="label")
    with pytest.raises(DatasetError, match="key 'answer' is missing in row 0"):
        load_prompts(path, label_key="answer")
    assert len(load_prompts(path)) == 2  # no label_key: labels are not read


def test_non_text_labels_become_text(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"input": "a", "label": 19}, {"input": "b", "label": 2.5}, {"input": "c", "label": ["x", 1]},
            {"input": "d", "label": {"answer": "é"}}, {"input": "e", "label": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = [e.label for e in load_prompts(path, label_key="label")]
    assert labels == ["19", "2.5", '["x", 1]', '{"answer": "é"}', "True"]


def test_max_samples_keeps_the_first_rows_across_a_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps({"input": f"p{i}"}) + "\n" for i in range(3)))
    pq.write_table(pa.Table.from_pylist([{"input": f"p{i}"} for i in range(3, 6)]), folder / "part-1.parquet")
    every = load_prompts(folder)
    assert [(e.prompt, e.index) for e in every] == [(f"p{i}", i) for i in range(6)]
    assert load_prompts(folder, max_samples=4) == every[:4]
    assert load_prompts(folder, max_samples=100) == every
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_samples must be a positive integer"):
            load_prompts(folder, max_samples=bad)


def test_committed_arithmetic_files_load_with_the_default_keys():
    train = load_prompts(REPO / "data" / "arithmetic" / "train.jsonl", input_key="input", label_key="label")
    test = load_prompts(REPO / "data" / "arithmetic" / "test.jsonl", input_key="input", label_key="label",
                        max_samples=200)
    assert len(train) >= 1000 and len(test) == 200
    assert all(e.prompt.endswith("=") and e.label.lstrip("-").isdigit() for e in train + test)
