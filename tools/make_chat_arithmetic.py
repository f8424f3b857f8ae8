"""Write the chat arithmetic sets: data/chat_arithmetic/<kind>/{train,test}.jsonl, rows {"input", "label"}.

    python tools/make_chat_arithmetic.py                      # sum3 and multistep, 20000 train / 500 test each
    python tools/make_chat_arithmetic.py --kinds sum2 word --train 5000 --test 200 --out /tmp/chat

Same seed, same files. Train and test of a kind hold no common question (hpc_rlhf.tasks.chat_arithmetic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_rlhf.tasks.chat_arithmetic import KINDS, make_splits

OUT = Path(__file__).resolve().parent.parent / "data" / "chat_arithmetic"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["sum3", "multistep"], choices=KINDS)
    parser.add_argument("--train", type=int, default=20000, help="training problems per kind")
    parser.add_argument("--test", type=int, default=500, help="held-out problems per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for kind in args.kinds:
        try:
            splits = make_splits(kind, args.train, args.test, args.seed)
        except ValueError as error:
            print(f"make_chat_arithmetic: {error}", file=sys.stderr)
            return 2
        for split, rows in splits.items():
            path = args.out / kind / f"{split}.jsonl"
            write_jsonl(path, rows)
            print(f"{path}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
