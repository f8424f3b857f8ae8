"""Arithmetic asked in words, for chat models: "What is 345+278? Put the final number after 'Answer:'." -> "623".

Kinds (each generated from a seed, train and test disjoint): `sum2` (2-digit sums), `sum3` (3-digit sums, the
headline), `mul1x2` (1-digit x 2-digit products), `multistep` ("37+48-19", "(12+7)*3") and `word` (one-step word
problems from templates). Rows are {"input": question text, "label": "623"}; the trainer renders them with the
model's chat template (`data.apply_chat_template: true`). This file is also a reward function file: point
`reward.reward_func_path` at it.

Answer rule of `reward_func`: the response is the text after the prompt in the query (else after the last
"assistant" turn marker, else the whole query). Its answer is the number after the last "Answer:" (case-insensitive);
when the response has no "Answer:" followed by a number, the last number in the response counts instead, so a model
that answers right in its own words ("345 + 278 = 623.") is still rewarded and GRPO need not first discover the
format. Numbers may carry thousands separators ("1,023"). Score 1 when the answer equals the label, else 0.
Reward: 1.0 when right; FORMAT_REWARD (default 0) when wrong but tagged ("Answer: <number>"); 0.0 otherwise.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Iterable

import torch

INSTRUCTION = " Put the final number after 'Answer:'."
FORMAT_REWARD = 0.0
KINDS = ("sum2", "sum3", "mul1x2", "multistep", "word")

_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+"
_NUMBER_RE = re.compile(_NUMBER)
_TAGGED_RE = re.compile(r"answer\s*:\s*\**\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE)
_ASSISTANT_MARKERS = ("<|im_start|>assistant\n", "<|assistant|>")


# ---- problems -------------------------------------------------------------------------------------------------

def _sum2(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a}+{b}?", a + b


def _sum3(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a}+{b}?", a + b


def _mul1x2(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    return f"What is {a}*{b}?", a * b


def _multistep(rng: random.Random) -> tuple[str, int]:
    """Three 2-digit operands: a+b-c, a-b+c (never negative), or (a+b)*k, (a-b)*k with a 1-digit k."""
    shape = rng.randrange(4)
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
    if shape == 0:
        c = rng.randint(10, min(99, a + b))
        return f"What is {a}+{b}-{c}?", a + b - c
    if shape == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a}-{b}+{c}?", a - b + c
    k = rng.randint(2, 9)
    if shape == 2:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"What is ({a}+{b})*{k}?", (a + b) * k
    a, b = max(a, b), min(a, b)
    return f"What is ({a}-{b})*{k}?", (a - b) * k


_NAMES = ("Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena")
_ITEMS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells")


def _word(rng: random.Random) -> tuple[str, int]:
    """One-step problems: buy more, give away, share equally, rows of items."""
    name, item, shape = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randrange(4)
    if shape == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    if shape == 1:
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives {b} away. How many {item} does {name} have left?", a - b
    if shape == 2:
        k, each = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {k * each} {item} equally among {k} friends. How many {item} does each friend get?",
                each)
    rows, per_row = rng.randint(2, 9), rng.randint(10, 30)
    return f"{name} puts {item} in {rows} rows of {per_row}. How many {item} are there in total?", rows * per_row


GENERATORS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "sum2": _sum2, "sum3": _sum3, "mul1x2": _mul1x2, "multistep": _multistep, "word": _word}


def make_question(question: str) -> str:
    """The prompt text of a question: the question and the fixed answer-format instruction."""
    return question + INSTRUCTION


def generate_examples(kind: str, n: int, seed: int, *, exclude: Iterable[str] = ()) -> list[dict]:
    """`n` distinct examples {"input", "label"} of `kind` drawn with `seed`, leaving out inputs in `exclude`."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown chat arithmetic kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    excluded, seen = set(exclude), set()
    rng = random.Random(f"{kind}:{seed}")
    examples: list[dict] = []
    misses = 0
    while len(examples) < n:
        question, answer = GENERATORS[kind](rng)
        text = make_question(question)
        if text in excluded or text in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise ValueError(f"kind {kind!r} has too few distinct problems for n={n} (after excluding "
                                 f"{len(excluded)})")
            continue
        seen.add(text)
        examples.append({"input": text, "label": str(answer)})
    return examples


def make_splits(kind: str, n_train: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """Disjoint sets: `n_test` held-out problems (seed), then `n_train` others (seed + 1)."""
    test = generate_examples(kind, n_test, seed)
    train = generate_examples(kind, n_train, seed + 1, exclude=[e["input"] for e in test])
    return {"train": train, "test": test}


# ---- reward ---------------------------------------------------------------------------------------------------

def extract_response(query: str, prompt: str) -> str:
    """The generated part of `query`: after `prompt`, else after the last assistant marker, else all of it."""
    start = query.find(prompt) if prompt else -1
    if start >= 0:
        return query[start + len(prompt):]
    for marker in _ASSISTANT_MARKERS:
        at = query.rfind(marker)
        if at >= 0:
            return query[at + len(marker):]
    return query


def _to_int(text: str) -> int:
    return int(text.replace(",", ""))


def parse_answer(response: str) -> tuple[int | None, bool]:
    """(answer, tagged): the number after the last "Answer:" (tagged=True), else the last number in the response
    (tagged=False), else (None, False)."""
    tagged = _TAGGED_RE.findall(response)
    if tagged:
        return _to_int(tagged[-1]), True
    numbers = _NUMBER_RE.findall(response)
    return (_to_int(numbers[-1]), False) if numbers else (None, False)


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **_unused) -> dict:
    """Rule-based reward (OpenRLHF custom reward signature): 1.0 for the right answer, FORMAT_REWARD for a wrong
    answer given after "Answer:", 0.0 otherwise. Returns rewards, 0/1 scores and per-sample extra_logs."""
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"reward_func: got {len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; "
                         "they must be the same length")
    scores, tags = [], []
    for row, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        try:
            expected = _to_int(str(label).strip())
        except ValueError:
            raise ValueError(f"reward_func: label {label!r} of row {row} is not an integer") from None
        answer, tagged = parse_answer(extract_response(query, prompt))
        scores.append(1.0 if answer == expected else 0.0)
        tags.append(1.0 if tagged else 0.0)
    score_t = torch.tensor(scores, dtype=torch.float32)
    tag_t = torch.tensor(tags, dtype=torch.float32)
    rewards = torch.where(score_t > 0, score_t, FORMAT_REWARD * tag_t)
    return {"rewards": rewards, "scores": score_t, "extra_logs": {"accuracy": score_t.clone(), "tagged": tag_t}}
