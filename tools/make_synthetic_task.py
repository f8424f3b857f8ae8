"""Write the synthetic arithmetic task as JSONL (and optionally Parquet): train, test and SFT warm-up files.

    python tools/make_synthetic_task.py data/arithmetic --train 3000 --test 200 --sft 2000 --seed 0
    python tools/make_synthetic_task.py /tmp/hard --max-operand 50 --operators "+-*" --allow-negative --parquet

train.jsonl / test.jsonl rows are {"input": "12+7=", "label": "19"}; sft.jsonl rows are {"input", "response"}.
Test problems never appear in train or sft.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from hpc_rlhf.tasks.arithmetic import make_splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One compact JSON object per line."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(", ", ": ")) + "\n")


def write_parquet(path: Path, rows: list[dict]) -> None:
    """The same rows as a Parquet table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=3000, help="training prompts (with labels)")
    parser.add_argument("--test", type=int, default=200, help="held-out prompts, all distinct")
    parser.add_argument("--sft", type=int, default=2000, help="SFT warm-up pairs (prompt, response)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=20, help="operands are drawn from 0..max_operand")
    parser.add_argument("--operators", default="+-", help="any of + - *")
    parser.add_argument("--allow-negative", action="store_true", help="keep problems whose result is negative")
    parser.add_argument("--parquet", action="store_true", help="also write .parquet beside each .jsonl")
    args = parser.parse_args(argv)

    splits = make_splits(args.train, args.test, args.sft, args.seed, max_operand=args.max_operand,
                         operators=args.operators, allow_negative=args.allow_negative)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
        if args.parquet:
            write_parquet(out / f"{name}.parquet", rows)
        print(f"{out / name}.jsonl: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
