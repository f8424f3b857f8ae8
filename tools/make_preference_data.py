"""Write the small datasets of the supervised and preference trainers, built from the synthetic arithmetic task.

    python tools/make_preference_data.py data/arithmetic_supervised          # what configs/*_tiny.yaml read

Files (train rows use the training problems, test rows the 200 held-out problems of data/arithmetic/test.jsonl):
  pairs_train.jsonl / pairs_test.jsonl   rm, dpo:  {"input": "12+7=", "chosen": "19", "rejected": "33"}
  kto_train.jsonl / kto_test.jsonl       kto:      {"input", "response", "label": true | false}, half of each
  prm_train.jsonl / prm_test.jsonl       prm:      {"input": "3+4+5: 3+4=7#7+5=13#", "label": ["+", "-"]}
  sft_test.jsonl                         sft, kd:  {"input", "response"} (held-out rows for eval/loss)
A wrong answer is any other integer in 0..40 (the range of the right ones); a process step is wrong when its result is.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Sequence

from hpc_rlhf.tasks.arithmetic import make_splits

MAX_ANSWER = 40
PLACEHOLDER = "#"
GOOD, BAD = "+", "-"


def wrong_answer(right: int, rng: random.Random) -> int:
    """An integer in 0..MAX_ANSWER other than `right`."""
    while True:
        value = rng.randint(0, MAX_ANSWER)
        if value != right:
            return value


def preference_pairs(problems: Sequence[dict], seed: int) -> list[dict]:
    """One pair per problem: the right answer is chosen, a wrong one rejected."""
    rng = random.Random(seed)
    return [{"input": p["input"], "chosen": p["response"], "rejected": str(wrong_answer(int(p["response"]), rng))}
            for p in problems]


def kto_rows(problems: Sequence[dict], seed: int) -> list[dict]:
    """Unpaired rows: every other problem with its right answer (desirable), the others with a wrong one."""
    rng = random.Random(seed)
    rows = []
    for index, p in enumerate(problems):
        desirable = index % 2 == 0
        response = p["response"] if desirable else str(wrong_answer(int(p["response"]), rng))
        rows.append({"input": p["input"], "response": response, "label": desirable})
    return rows


def prm_rows(count: int, seed: int, *, placeholder: str = PLACEHOLDER, max_operand: int = 20) -> list[dict]:
    """Two-step additions "a+b+c: a+b=s1#s1+c=s2#"; each step's result is wrong with probability 1/2 (label "-").

    The second step starts from the first step's written result, so each label is about that step's own sum.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand // 2), rng.randint(0, max_operand // 2)
        c = rng.randint(0, max_operand // 2)
        text, labels, carried = f"{a}+{b}+{c}: ", [], a
        for operand in (b, c):
            right = carried + operand
            good = rng.random() < 0.5
            written = right if good else wrong_answer(right, rng)
            text += f"{carried}+{operand}={written}{placeholder}"
            labels.append(GOOD if good else BAD)
            carried = written
        rows.append({"input": text, "label": labels})
    return rows


def build(seed: int = 0, *, n_train: int = 2000, n_test: int = 200) -> dict[str, list[dict]]:
    """Every file's rows; the test problems are data/arithmetic's held-out ones (the same seed gives the same set)."""
    splits = make_splits(n_train=0, n_test=n_test, n_sft=n_train, seed=seed)
    train = splits["sft"]
    test = [{"input": row["input"], "response": row["label"]} for row in splits["test"]]
    return {
        "pairs_train": preference_pairs(train, seed + 10),
        "pairs_test": preference_pairs(test, seed + 11),
        "kto_train": kto_rows(train, seed + 12),
        "kto_test": kto_rows(test, seed + 13),
        "prm_train": prm_rows(n_train, seed + 14),
        "prm_test": prm_rows(n_test, seed + 15),
        "sft_test": test,
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0, help="0 matches data/arithmetic's held-out problems")
    parser.add_argument("--train", type=int, default=2000, help="training rows per file")
    parser.add_argument("--test", type=int, default=200, help="held-out rows per file")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed, n_train=args.train, n_test=args.test).items():
        write_jsonl(out / f"{name}.jsonl", rows)
        print(f"{out / name}.jsonl: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
