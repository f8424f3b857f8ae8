"""The synthetic arithmetic task: problem sets, splits, committed files, and the rule-based reward."""

from __future__ import annotations

import collections
import importlib.util
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hpc_rlhf.tasks.arithmetic import (
    FORMAT_REWARD,
    all_problems,
    generate_examples,
    make_splits,
    reward_func,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "arithmetic"


def evaluate(prompt: str) -> int:
    """Independent answer for "A op B=" prompts."""
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "kwargs, count",
    [
        ({}, 21 * 21 + 21 * 22 // 2),  # all sums, and differences with a >= b
        ({"allow_negative": True}, 2 * 21 * 21),
        ({"operators": "*", "max_operand": 9}, 100),
        ({"operators": "+-*", "max_operand": 3}, 16 + 10 + 16),
    ],
)
def test_problem_counts_and_answers(kwargs, count):
    problems = all_problems(**kwargs)
    assert len(problems) == count
    assert len({p["input"] for p in problems}) == count
    for p in problems:
        assert int(p["label"]) == evaluate(p["input"]) and p["response"] == p["label"]
        if not kwargs.get("allow_negative"):
            assert int(p["label"]) >= 0


@pytest.mark.parametrize("kwargs", [{"operators": "/"}, {"operators": ""}, {"max_operand": -1}])
def test_bad_difficulty_is_rejected(kwargs):
    with pytest.raises(ValueError, match="operators|max_operand"):
        all_problems(**kwargs)


def test_generate_examples_is_deterministic_and_covers_evenly():
    first = generate_examples(1500, seed=3)
    assert first == generate_examples(1500, seed=3)
    assert first != generate_examples(1500, seed=4)
    counts = collections.Counter(e["input"] for e in first)
    assert len(counts) == 672  # 1500 = 2 full passes + 156: every problem 2 or 3 times
    assert set(counts.values()) == {2, 3} and sum(1 for c in counts.values() if c == 3) == 1500 - 2 * 672
    assert all(e["response"] == e["label"] == str(evaluate(e["input"])) for e in first)


def test_generate_examples_respects_exclusions():
    excluded = {p["input"] for p in all_problems(max_operand=3)[:10]}
    examples = generate_examples(100, seed=0, max_operand=3, exclude=excluded)
    assert not excluded & {e["input"] for e in examples}
    with pytest.raises(ValueError, match="empty pool"):
        generate_examples(1, seed=0, max_operand=0, operators="+", exclude={"0+0="})


def test_splits_keep_test_problems_out_of_training():
    splits = make_splits(500, 100, 300, seed=7, max_operand=10)
    test_prompts = [e["input"] for e in splits["test"]]
    assert len(set(test_prompts)) == 100
    assert not set(test_prompts) & {e["input"] for e in splits["train"] + splits["sft"]}
    assert set(splits["train"][0]) == {"input", "label"} and set(splits["sft"][0]) == {"input", "response"}
    with pytest.raises(ValueError, match="n_test=1000"):
        make_splits(1, 1000, 1, seed=0, max_operand=10)


def test_committed_files_are_correct_small_and_reproducible(tmp_path):
    train, test, sft = (read_jsonl(DATA / f"{name}.jsonl") for name in ("train", "test", "sft"))
    assert sum((DATA / f"{name}.jsonl").stat().st_size for name in ("train", "test", "sft")) < 300_000
    assert len(test) >= 200
    for row in train + test:
        assert set(row) == {"input", "label"} and row["label"] == str(evaluate(row["input"]))
    for row in sft:
        assert set(row) == {"input", "response"} and row["response"] == str(evaluate(row["input"]))
    assert not {r["input"] for r in test} & {r["input"] for r in train + sft}

    spec = importlib.util.spec_from_file_location("make_synthetic_task", REPO / "tools" / "make_synthetic_task.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path), "--parquet"]) == 0  # the defaults regenerate the committed files
    for name in ("train", "test", "sft"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes()
        assert pq.read_table(tmp_path / f"{name}.parquet").to_pylist() == read_jsonl(DATA / f"{name}.jsonl")


# (query, prompt, label, score, well_formed): hand-checked cases, including malformed responses.
CASES = [
    ("12+7=19", "12+7=", "19", 1, 1),
    ("<s>12+7=19</s>", "12+7=", "19", 1, 1),  # decoded with special tokens
    ("12+7=19</s><pad><pad>", "12+7=", "19", 1, 1),
    ("12+7=  19 \n", "12+7=", "19", 1, 1),  # whitespace around the answer
    ("12+7=19 20", "12+7=", "19", 1, 0),  # first number counts; extra text is not well formed
    ("12+7=it is 19", "12+7=", "19", 1, 0),
    ("12+7=1919", "12+7=", "19", 0, 1),  # one wrong number, in the right form
    ("12+7=18</s>", "12+7=", "19", 0, 1),
    ("12+7=", "12+7=", "19", 0, 0),  # empty response
    ("12+7=abc", "12+7=", "19", 0, 0),
    ("12+7=+-", "12+7=", "19", 0, 0),
    ("3-5=-2", "3-5=", "-2", 1, 1),  # negative answers
    ("3-5=2", "3-5=", "-2", 0, 1),
    ("7-7=0", "7-7=", " 0 ", 1, 1),  # label whitespace is ignored
    ("<s><|user|>2+2=</s><|assistant|>4</s>", "<s><|user|>2+2=</s><|assistant|>", "4", 1, 1),  # chat prompt
    ("<s> 2 + 2 =4", "2+2=", "4", 1, 1),  # prompt not found verbatim: the text after the first "="
    ("no equals sign 4", "2+2=", "4", 0, 0),  # no prompt and no "=": no response at all
]


def test_reward_func_scores_hand_written_cases():
    queries, prompts, labels, scores, formats = (list(column) for column in zip(*CASES))
    result = reward_func(queries, prompts, labels)
    expected_scores = torch.tensor(scores, dtype=torch.float32)
    expected_formats = torch.tensor(formats, dtype=torch.float32)
    expected_rewards = torch.tensor([1.0 if s else FORMAT_REWARD * f for s, f in zip(scores, formats)])
    assert result["scores"].dtype == torch.float32 and result["rewards"].dtype == torch.float32
    torch.testing.assert_close(result["scores"], expected_scores, rtol=0, atol=0)
    torch.testing.assert_close(result["rewards"], expected_rewards, rtol=0, atol=0)
    torch.testing.assert_close(result["extra_logs"]["accuracy"], expected_scores, rtol=0, atol=0)
    torch.testing.assert_close(result["extra_logs"]["well_formed"], expected_formats, rtol=0, atol=0)


def test_reward_func_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        reward_func(["1+1=2"], ["1+1=", "2+2="], ["2"])
    with pytest.raises(ValueError, match="label 'two' of row 1 is not an integer"):
        reward_func(["1+1=2", "1+1=2"], ["1+1=", "1+1="], ["2", "two"])
    empty = reward_func([], [], [])
    assert empty["rewards"].shape == (0,) and empty["scores"].shape == (0,)


def test_reward_func_loads_from_its_file_and_scores_decoded_generations():
    """As `reward.reward_func_path` would use it, on text decoded by the tiny tokenizer with special tokens kept."""
    from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer

    spec = importlib.util.spec_from_file_location("user_reward", REPO / "hpc_rlhf" / "tasks" / "arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = build_tiny_tokenizer()
    prompts = ["12+7=", "3+4=", "9-2="]
    responses = ["19</s>", "8</s>", "x"]
    ids = [tokenizer(p)["input_ids"] + tokenizer(r, add_special_tokens=False)["input_ids"]
           for p, r in zip(prompts, responses)]
    width = max(map(len, ids))
    padded = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids]
    queries = tokenizer.batch_decode(padded, skip_special_tokens=False)
    assert queries[0].startswith("<s>12+7=19</s>")
    result = module.reward_func(queries, prompts, ["19", "7", "7"])
    torch.testing.assert_close(result["scores"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(result["rewards"], torch.tensor([1.0, FORMAT_REWARD, 0.0]))
