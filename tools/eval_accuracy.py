"""Held-out greedy and sampled accuracy of a checkpoint on a chat arithmetic file (or any prompt file + reward).

    python tools/eval_accuracy.py builtin:smollm2-135m-instruct --limit 100
    python tools/eval_accuracy.py runs/smollm2_grpo/hf/actor --device cuda --samples 4 --json eval.json

Prompts are rendered with the model's chat template exactly as the trainer does (data.apply_chat_template).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "chat_arithmetic" / "sum3" / "test.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint folder or builtin: name")
    parser.add_argument("--data", default=str(DATA), help="prompt file (default: 3-digit sums, held out)")
    parser.add_argument("--input-key", default="input")
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--no-chat-template", action="store_true", help="use the input text as is")
    parser.add_argument("--reward", default="hpc_rlhf.tasks.chat_arithmetic", help="module with reward_func")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--samples", type=int, default=0, help="sampled responses per prompt (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled responses")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of the file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpc_rlhf.data.prompts import load_prompts
    from hpc_rlhf.builtin_models.pretrained import PretrainedUnavailable
    from hpc_rlhf.tasks.evaluation import evaluate, stderr_log
    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    try:
        reward_func = importlib.import_module(args.reward).reward_func
        path = resolve_model_path(args.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        chat = not args.no_chat_template
        examples = load_prompts(args.data, input_key=args.input_key, label_key=args.label_key,
                                apply_chat_template=chat, max_samples=args.limit, tokenizer=tokenizer)
    except (ValueError, OSError, ImportError, AttributeError, PretrainedUnavailable) as error:
        print(f"eval_accuracy: {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    stderr_log(f"eval_accuracy: {args.model} on {len(examples)} prompts of {args.data} ({args.device}, {dtype})")
    result = evaluate(model, tokenizer, examples, reward_func=reward_func, max_new_tokens=args.max_new_tokens,
                      samples=args.samples, temperature=args.temperature, batch_size=args.batch_size,
                      seed=args.seed, add_special_tokens=not chat, log=stderr_log)
    result.update(model=args.model, data=str(args.data))
    line = f"{args.model}: greedy accuracy {result['greedy']['accuracy']:.3f}"
    if "sampled" in result:
        line += (f", sampled {result['sampled']['accuracy']:.3f} ({args.samples} per prompt, "
                 f"temperature {args.temperature})")
    print(line + f" on {len(examples)} prompts")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
