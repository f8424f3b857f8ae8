"""Merge a LoRA adapter (what training with lora.rank > 0 saves) into its base model, for `from_pretrained` and vLLM.

    python tools/merge_lora.py --adapter runs/sft_lora/hf/actor --out runs/sft_lora/hf/actor_merged
    python tools/merge_lora.py --adapter runs/rm_lora/hf/reward --base /models/llama --out merged_rm --dtype bfloat16

The base defaults to the one recorded in the adapter (adapter_config.json); causal LMs and reward models
(sequence classifiers, whose score head is saved with the adapter) are both handled. The merged folder gets the
adapter's tokenizer, and a reward model's normalisation statistics (reward_mean / reward_std) in its config.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--base", default=None, help="base model folder (default: the adapter's recorded base; "
                                                     "builtin:tiny-llama names work too)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the merged weights")
    args = parser.parse_args(argv)

    import torch

    from hpc_rlhf.training.lora import LoraError, merge_adapter
    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    base = resolve_model_path(args.base) if args.base else None
    try:
        out = merge_adapter(base, args.adapter, args.out, dtype=getattr(torch, args.dtype))
    except LoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
