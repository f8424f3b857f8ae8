"""Build a tiny random-init Llama policy, its reward/value model and a character-level tokenizer, offline.

    python tools/make_tiny_model.py /tmp/tiny                      # /tmp/tiny and /tmp/tiny/reward
    python tools/make_tiny_model.py /tmp/tiny --hidden-size 128 --num-layers 4 --seed 3
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hpc_rlhf.builtin_models.tiny import REWARD_SUBDIR, build_tiny_model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--max-position-embeddings", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_model(
        args.out_dir,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        seed=args.seed,
    )
    print(f"policy + tokenizer: {out}")
    print(f"reward/value model: {out / REWARD_SUBDIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
