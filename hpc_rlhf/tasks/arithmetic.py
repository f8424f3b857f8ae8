"""Synthetic arithmetic with verifiable answers: prompt "12+7=", answer "19".

Small enough that a ~100k-parameter model learns it on a CPU in minutes, so the whole RL loop can be checked end to end.
Difficulty is set by the operand range (0..max_operand), the operators ("+", "-", "*") and whether results may be
negative. This file is also a reward function file: point `reward.reward_func_path` at it.

Answer rule of `reward_func`: the response is the text after the prompt in the query (after the first "=" when the
prompt cannot be found); the answer is the first integer (`-?[0-9]+`) in it. Score 1 when it equals the label, else 0.
Reward: 1.0 when right; FORMAT_REWARD when wrong but well formed (the response, with special-token markers such as
`</s>` or `<pad>` removed and whitespace stripped, is one integer and nothing else); 0.0 otherwise.
"""

from __future__ import annotations

import random
import re
from typing import Iterable

import torch

OPERATORS = "+-*"
FORMAT_REWARD = 0.1
_INTEGER = re.compile(r"-?[0-9]+")
_SPECIAL_MARKER = re.compile(r"<\|?/?[A-Za-z_]+\|?>")


def _apply(a: int, operator: str, b: int) -> int:
    """The result of `a operator b`."""
    if operator == "+":
        return a + b
    if operator == "-":
        return a - b
    return a * b


def all_problems(*, max_operand: int = 20, operators: str = "+-", allow_negative: bool = False) -> list[dict]:
    """Every problem of the given difficulty, in a fixed order, as {"input", "label", "response"} dicts."""
    if not isinstance(max_operand, int) or max_operand < 0:
        raise ValueError(f"max_operand must be a non-negative integer, got {max_operand!r}")
    if not operators or any(op not in OPERATORS for op in operators):
        raise ValueError(f"operators must be a non-empty string of {OPERATORS!r}, got {operators!r}")
    problems = []
    for operator in dict.fromkeys(operators):
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                result = _apply(a, operator, b)
                if result < 0 and not allow_negative:
                    continue
                problems.append({"input": f"{a}{operator}{b}=", "label": str(result), "response": str(result)})
    return problems


def generate_examples(
    n: int,
    seed: int,
    *,
    max_operand: int = 20,
    operators: str = "+-",
    allow_negative: bool = False,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """`n` examples {"input": "12+7=", "label": "19", "response": "19"}, leaving out prompts in `exclude`.

    Drawn in shuffled passes over all problems, so no problem repeats before every other has appeared once.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    excluded = set(exclude)
    pool = [p for p in all_problems(max_operand=max_operand, operators=operators, allow_negative=allow_negative)
            if p["input"] not in excluded]
    if n and not pool:
        raise ValueError("no problems left: the difficulty settings and `exclude` leave an empty pool")
    rng = random.Random(seed)
    examples: list[dict] = []
    while len(examples) < n:
        order = list(range(len(pool)))
        rng.shuffle(order)
        examples.extend(dict(pool[i]) for i in order[: n - len(examples)])
    return examples


def make_splits(n_train: int, n_test: int, n_sft: int, seed: int, **difficulty) -> dict[str, list[dict]]:
    """Disjoint train/test prompts: test holds `n_test` distinct problems; train (prompt, label) and sft
    (prompt, response) are drawn from the remaining problems."""
    problems = all_problems(**difficulty)
    if n_test >= len(problems):
        raise ValueError(f"n_test={n_test} leaves no training problems: this difficulty has only {len(problems)}")
    test = generate_examples(n_test, seed, **difficulty)
    held_out = [t["input"] for t in test]
    train = generate_examples(n_train, seed + 1, exclude=held_out, **difficulty)
    sft = generate_examples(n_sft, seed + 2, exclude=held_out, **difficulty)
    return {
        "train": [{"input": e["input"], "label": e["label"]} for e in train],
        "test": [{"input": e["input"], "label": e["label"]} for e in test],
        "sft": [{"input": e["input"], "response": e["response"]} for e in sft],
    }


def extract_response(query: str, prompt: str) -> str:
    """The generated part of `query`: the text after `prompt`, or after the first "=" when the prompt is absent."""
    start = query.find(prompt)
    if start >= 0:
        return query[start + len(prompt):]
    _, sep, rest = query.partition("=")
    return rest if sep else ""


def parse_answer(response: str) -> int | None:
    """The first integer in `response`, or None when there is none."""
    match = _INTEGER.search(response)
    return int(match.group()) if match else None


def is_well_formed(response: str) -> bool:
    """True when the response is one integer and nothing else, ignoring special-token markers and whitespace."""
    return _INTEGER.fullmatch(_SPECIAL_MARKER.sub("", response).strip()) is not None


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **_unused) -> dict:
    """Rule-based reward (OpenRLHF custom reward signature): 1.0 for the right answer, FORMAT_REWARD for a
    well-formed wrong one, 0.0 otherwise. Returns rewards, 0/1 scores and per-sample extra_logs."""
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"reward_func: got {len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; "
                         "they must be the same length")
    scores, well_formed = [], []
    for row, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        try:
            expected = int(str(label).strip())
        except ValueError:
            raise ValueError(f"reward_func: label {label!r} of row {row} is not an integer") from None
        response = extract_response(query, prompt)
        scores.append(1.0 if parse_answer(response) == expected else 0.0)
        well_formed.append(1.0 if is_well_formed(response) else 0.0)
    score_t = torch.tensor(scores, dtype=torch.float32)
    format_t = torch.tensor(well_formed, dtype=torch.float32)
    rewards = torch.where(score_t > 0, score_t, FORMAT_REWARD * format_t)
    return {
        "rewards": rewards,
        "scores": score_t,
        "extra_logs": {"accuracy": score_t.clone(), "well_formed": format_t},
    }
