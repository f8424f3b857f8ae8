"""Tiny offline models: a character-level tokenizer and random-init Llama policy / reward models.

They let every test, the CPU config and a fresh machine run the whole stack with no model hub:

    build_tiny_model("/tmp/tiny")             # /tmp/tiny (policy + tokenizer), /tmp/tiny/reward (value/reward model)
    resolve_model_path("builtin:tiny-llama")  # the same, built once into $HPC_RLHF_CACHE (default ~/.cache/hpc_rlhf)

The tokenizer maps every printable ASCII character, newline and tab to one token and falls back to UTF-8 byte tokens for
anything else, so decoding reproduces any text exactly. Its chat template renders
`<s><|system|>...</s><|user|>...</s><|assistant|>...</s>`; `add_generation_prompt=True` ends with `<|assistant|>`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# transformers and torch are imported inside the builders, so resolving a plain path stays cheap.

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN) + ROLE_TOKENS
CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n", "\t")
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))

# Each message is `<|role|>content</s>`, so a generated assistant turn stops at the ordinary eos token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

CACHE_ENV = "HPC_RLHF_CACHE"
BUILTIN_PREFIX = "builtin:"
REWARD_SUBDIR = "reward"
# Bump when the builder's output changes, so that caches built by an older version are not reused.
BUILTIN_FORMAT_VERSION = 3
BUILTIN_MODELS = ("tiny-llama", "tiny-llama-arith")
# Real pretrained models, converted offline by hpc_rlhf/pretrained.py (no reward sub-folder).
PRETRAINED_MODELS = ("smollm2-135m-instruct",)


def build_tiny_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A character-level `PreTrainedTokenizerFast` with bos/eos/pad/unk, role markers and a chat template.

    Plain encoding prepends `<s>` (like Llama tokenizers); `add_special_tokens=False` leaves it out.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + CHARACTERS + BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    # BPE with no merges is a character model; byte_fallback spells unknown characters as UTF-8 byte tokens.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, byte_fallback=True))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    # Fuse joins tokens without separators; without a decoder `tokenizers` would put spaces between them.
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-init `LlamaForCausalLM` + tokenizer to `out_dir` and a `LlamaForSequenceClassification`
    (num_labels=1, the value/reward model) + tokenizer to `out_dir/reward`. Same seed, same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    _check_sizes(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
    out = Path(out_dir)
    reward_dir = out / REWARD_SUBDIR
    reward_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(model_max_length=max_position_embeddings)
    llama_fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**llama_fields)
    reward_config = LlamaConfig(**llama_fields, num_labels=1)

    # Weight init draws from torch's global generator: seed a forked copy so the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = LlamaForCausalLM(config)
        reward = LlamaForSequenceClassification(reward_config)

    policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reward.save_pretrained(reward_dir, safe_serialization=True)
    tokenizer.save_pretrained(reward_dir)
    return out


def _check_sizes(**sizes: int) -> None:
    """Reject sizes a Llama cannot have, naming the argument."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"build_tiny_model: {name} must be a positive integer, got {value!r}")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise ValueError(f"build_tiny_model: hidden_size={sizes['hidden_size']} is not divisible by "
                         f"num_heads={sizes['num_heads']}")
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ValueError(f"build_tiny_model: num_heads={sizes['num_heads']} is not divisible by "
                         f"num_kv_heads={sizes['num_kv_heads']}")


def cache_root() -> Path:
    """Folder holding built-in models: $HPC_RLHF_CACHE, else ~/.cache/hpc_rlhf."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hpc_rlhf"


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
        from hpc_rlhf.pretrained import resolve_pretrained

        return resolve_pretrained(name)
    folder = build_once(cache_root() / f"{name}-v{BUILTIN_FORMAT_VERSION}", lambda tmp: _build_builtin(name, tmp))
    return str(folder / sub) if sub else str(folder)


def unknown_builtin(spec: str) -> str | None:
    """Why a `builtin:` spec names no built-in model, with the known names (None when it names one)."""
    name, _, sub = spec[len(BUILTIN_PREFIX):].partition("/")
    if (name in BUILTIN_MODELS and sub in ("", REWARD_SUBDIR)) or (name in PRETRAINED_MODELS and not sub):
        return None
    known = ", ".join([f"{BUILTIN_PREFIX}{m}, {BUILTIN_PREFIX}{m}/{REWARD_SUBDIR}" for m in BUILTIN_MODELS]
                      + [f"{BUILTIN_PREFIX}{m}" for m in PRETRAINED_MODELS])
    return f"unknown built-in model {spec!r}; known: {known}"


def _build_builtin(name: str, out_dir: Path) -> None:
    """`tiny-llama` is random; `tiny-llama-arith` is it after a short SFT warm-up on the arithmetic task.

    Progress lines go to stderr: the first run would otherwise wait a minute or two in silence."""
    import sys
    import time

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    say(f"building {BUILTIN_PREFIX}{name} (first use only; cached in {cache_root()})")
    build_tiny_model(out_dir)
    if name == "tiny-llama-arith":
        from hpc_rlhf.tasks.warm_start import warm_start

        warm_start(out_dir, out_dir, report=lambda line: say(f"  {BUILTIN_PREFIX}{name}: {line}"))
    say(f"built {BUILTIN_PREFIX}{name} in {time.monotonic() - started:.0f} s")


def build_once(final_dir: Path, build: Callable[[Path], object]) -> Path:
    """Return `final_dir`, first running `build(tmp)` in a fresh sibling folder and renaming it into place.

    Safe when many processes (or nodes sharing a filesystem) ask at once: the folder only ever appears complete,
    through one atomic rename; a process whose rename loses the race discards its copy and uses the winner's.
    """
    final_dir = Path(final_dir)
    if final_dir.is_dir():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.building-", dir=final_dir.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should read like any other
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir
