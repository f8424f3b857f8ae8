"""The chat arithmetic task: problem generators, disjoint splits, answer parsing and the reward function."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.rewards.reward_func import load_reward_func
from hpc_rlhf.tasks import chat_arithmetic as task

REPO = Path(__file__).resolve().parents[2]
PROMPT = "<|im_start|>user\nWhat is 345+278? Put the final number after 'Answer:'.<|im_end|>\n<|im_start|>assistant\n"


def _value(question: str) -> int:
    """Evaluate the arithmetic of a generated question independently of the generator."""
    expression = re.fullmatch(r"What is (.+)\?" + re.escape(task.INSTRUCTION), question).group(1)
    assert re.fullmatch(r"[0-9+\-*() ]+", expression)
    return eval(expression)  # noqa: S307 - digits and operators only, checked above


@pytest.mark.parametrize("kind", ["sum2", "sum3", "mul1x2", "multistep"])
def test_labels_are_the_value_of_the_expression(kind):
    for example in task.generate_examples(kind, 300, seed=3):
        assert int(example["label"]) == _value(example["input"])
        assert int(example["label"]) >= 0


def test_operand_ranges():
    for example in task.generate_examples("sum3", 200, seed=0):
        a, b = map(int, re.match(r"What is (\d+)\+(\d+)\?", example["input"]).groups())
        assert 100 <= a <= 999 and 100 <= b <= 999
    for example in task.generate_examples("mul1x2", 200, seed=0):
        a, b = map(int, re.match(r"What is (\d+)\*(\d+)\?", example["input"]).groups())
        assert 2 <= a <= 9 and 10 <= b <= 99


def test_word_problems_have_consistent_labels():
    seen_shapes = set()
    for example in task.generate_examples("word", 400, seed=1):
        numbers = [int(n) for n in re.findall(r"\d+", example["input"])]
        label = int(example["label"])
        text = example["input"]
        assert text.endswith(task.INSTRUCTION)
        if "buys" in text:
            assert label == numbers[0] + numbers[1]
            seen_shapes.add("buys")
        elif "gives" in text:
            assert label == numbers[0] - numbers[1] > 0
            seen_shapes.add("gives")
        elif "shares" in text:
            assert label * numbers[1] == numbers[0]
            seen_shapes.add("shares")
        else:
            assert label == numbers[0] * numbers[1]
            seen_shapes.add("rows")
    assert seen_shapes == {"buys", "gives", "shares", "rows"}


def test_multistep_has_every_shape():
    texts = [e["input"] for e in task.generate_examples("multistep", 200, seed=0)]
    assert any(re.match(r"What is \d+\+\d+-\d+\?", t) for t in texts)
    assert any(re.match(r"What is \d+-\d+\+\d+\?", t) for t in texts)
    assert any(re.match(r"What is \(\d+\+\d+\)\*\d\?", t) for t in texts)
    assert any(re.match(r"What is \(\d+-\d+\)\*\d\?", t) for t in texts)


def test_splits_are_disjoint_distinct_and_repeatable():
    splits = task.make_splits("sum2", 2000, 300, seed=5)
    train, test = [e["input"] for e in splits["train"]], [e["input"] for e in splits["test"]]
    assert len(set(train)) == 2000 and len(set(test)) == 300
    assert not set(train) & set(test)
    assert task.make_splits("sum2", 2000, 300, seed=5) == splits
    assert task.make_splits("sum2", 2000, 300, seed=6)["test"] != splits["test"]


def test_too_many_problems_and_unknown_kind_are_clear_errors():
    with pytest.raises(ValueError, match="too few distinct problems"):
        task.generate_examples("mul1x2", 8 * 90 + 1, seed=0)  # 8 x 90 distinct products exist
    with pytest.raises(ValueError, match="unknown chat arithmetic kind 'sum4'"):
        task.generate_examples("sum4", 1, seed=0)


@pytest.mark.parametrize("response, expected", [
    ("345 + 278 = 623.\nAnswer: 623<|im_end|>", (623, True)),
    ("Answer: 600. Let me check: 345 + 278 = 623. Answer: 623<|im_end|>", (623, True)),  # the last tag counts
    ("answer:623", (623, True)),
    ("Answer: **623**", (623, True)),
    ("Answer: 1,023 apples", (1023, True)),
    ("345 + 278 = 52.<|im_end|>", (52, False)),  # no tag: the last number
    ("The answer is 623, I think.", (623, False)),
    ("The sum is 1,023.", (1023, False)),
    ("Answer: unknown, maybe 12", (12, False)),  # a tag without a number: fall back to the last number
    ("I cannot say.<|im_end|>", (None, False)),
    ("", (None, False)),
    ("Answer: -5", (-5, True)),
])
def test_parse_answer(response, expected):
    assert task.parse_answer(response) == expected


def test_reward_values_by_hand():
    queries = [
        PROMPT + "345 + 278 = 623.\nAnswer: 623<|im_end|>",   # right, tagged
        PROMPT + "345 + 278 = 623<|im_end|>",                 # right, untagged (fallback)
        PROMPT + "Answer: 622<|im_end|>",                     # wrong, tagged
        PROMPT + "I do not know<|im_end|>",                   # no number
        PROMPT + "Answer: 623 is wrong, Answer: 5",           # the last tag counts: wrong
    ]
    result = task.reward_func(queries, [PROMPT] * 5, ["623"] * 5)
    assert result["scores"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result["rewards"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # FORMAT_REWARD defaults to 0
    assert result["extra_logs"]["tagged"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert result["extra_logs"]["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_reward_goes_to_wrong_tagged_answers_only(monkeypatch):
    monkeypatch.setattr(task, "FORMAT_REWARD", 0.1)
    queries = [PROMPT + "Answer: 623", PROMPT + "Answer: 622", PROMPT + "it is 622"]
    rewards = task.reward_func(queries, [PROMPT] * 3, ["623"] * 3)["rewards"].tolist()
    assert rewards == pytest.approx([1.0, 0.1, 0.0])


def test_numbers_of_the_prompt_are_not_the_answer():
    """The question's own numbers (345, 278) never count: only the text after the prompt is parsed."""
    result = task.reward_func([PROMPT + "<|im_end|>"], [PROMPT], ["278"])
    assert result["scores"].tolist() == [0.0]


def test_response_found_after_the_assistant_marker_when_the_prompt_text_differs():
    query = PROMPT + "Answer: 623"
    assert task.extract_response(query, "something else") == "Answer: 623"
    assert task.extract_response("no markers 7", "absent") == "no markers 7"


def test_bad_label_and_length_mismatch_are_one_line_errors():
    with pytest.raises(ValueError, match="label 'abc' of row 0 is not an integer"):
        task.reward_func([PROMPT], [PROMPT], ["abc"])
    with pytest.raises(ValueError, match="2 queries, 1 prompts and 1 labels"):
        task.reward_func([PROMPT, PROMPT], [PROMPT], ["1"])


def test_loads_as_a_reward_function_file():
    func = load_reward_func("hpc_rlhf.tasks.chat_arithmetic")
    assert func([PROMPT + "Answer: 623"], [PROMPT], ["623"])["scores"].tolist() == [1.0]


def test_make_tool_writes_the_committed_files_byte_for_byte(tmp_path):
    result = subprocess.run([sys.executable, "tools/make_chat_arithmetic.py", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for kind in ("sum3", "multistep"):
        for split, rows in (("train", 20000), ("test", 500)):
            written = (tmp_path / kind / f"{split}.jsonl").read_bytes()
            assert written == (REPO / "data" / "chat_arithmetic" / kind / f"{split}.jsonl").read_bytes()
            assert len(written.splitlines()) == rows and len(written) < 2_000_000
    first = json.loads((tmp_path / "sum3" / "test.jsonl").read_text().splitlines()[0])
    assert set(first) == {"input", "label"}
