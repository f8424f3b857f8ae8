"""Held-out accuracy of models on the arithmetic task, greedy and sampled, for before/after comparisons.

    python tools/eval_arithmetic.py builtin:tiny-llama-arith runs/tiny_cpu/hf/actor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpc_rlhf.tasks.arithmetic import reward_func
from hpc_rlhf.builtin_models.resolve import resolve_model_path

TEST = Path(__file__).resolve().parent.parent / "data" / "arithmetic" / "test.jsonl"


def accuracy(model, tokenizer, rows: list[dict], *, temperature: float, samples: int, seed: int) -> float:
    """Mean 0/1 score over `samples` responses per prompt (one when greedy)."""
    tokenizer.padding_side = "left"
    prompts = [row["input"] for row in rows]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    torch.manual_seed(seed)
    scores = []
    for _ in range(samples if temperature > 0 else 1):
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=8, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=1.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        queries = tokenizer.batch_decode(out, skip_special_tokens=False)
        scores.append(reward_func(queries, prompts, [row["label"] for row in rows])["scores"].mean().item())
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders or builtin: names")
    parser.add_argument("--data", type=Path, default=TEST)
    parser.add_argument("--samples", type=int, default=4, help="sampled responses per prompt (temperature 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    print(f"{'model':<50} {'greedy':>8} {'sampled':>8}   ({len(rows)} held-out prompts)")
    for spec in args.models:
        path = resolve_model_path(spec)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        greedy = accuracy(model, tokenizer, rows, temperature=0.0, samples=1, seed=args.seed)
        sampled = accuracy(model, tokenizer, rows, temperature=1.0, samples=args.samples, seed=args.seed)
        print(f"{spec:<50} {greedy:>8.3f} {sampled:>8.3f}")


if __name__ == "__main__":
    main()
