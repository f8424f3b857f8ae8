"""A synthetic task for throughput benchmarks: real architectures' shapes with random weights, an offline word
tokenizer, fixed-length prompts and a cheap reward with spread.

Throughput does not depend on the weights' values, so a model is built from a shape (Qwen2.5-0.5B, 1.5B, 7B or a
tiny one for CPU tests) with seeded random initialisation and saved as an ordinary HF folder that every backend
(hf, vLLM, TRL) loads. The folder is a Llama model with the Qwen2.5 dimensions (GQA, SwiGLU, RMSNorm, tied
embeddings where Qwen ties them): the same matrices minus Qwen's q/k/v biases (under 0.1% of the FLOPs). The model
type is llama because transformers rebuilds a `qwen2` folder's tokenizer as Qwen's byte-level BPE, which a word
tokenizer cannot survive. The tokenizer maps word `w<i>` to id i, so any sampled id decodes and the text of a response
carries its token ids; the reward is the fraction of even ids in the response, which varies between samples of one
prompt and so gives group estimators non-zero advantages.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
SPECIAL_TOKENS = (PAD, EOS, BOS)


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers that set a decoder's cost (GQA attention, SwiGLU MLP, RMSNorm)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Parameters of the model built here (embeddings counted once when tied; no attention biases)."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv  # q and o, k and v
        mlp = 3 * d * f
        per_layer = attention + mlp + 2 * d  # two RMSNorm weights
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + d  # final norm


# Dimensions from the published configs of the Qwen2.5 and Llama 3.1 models; "tiny" keeps CPU tests fast.
MODEL_SHAPES: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape(49152, 576, 1536, 30, 9, 3, True, max_position_embeddings=8192),
    "qwen2.5-0.5b": ModelShape(151936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": ModelShape(151936, 1536, 8960, 28, 12, 2, True),
    "qwen2.5-7b": ModelShape(152064, 3584, 18944, 28, 28, 4, False),
    "llama3.1-8b": ModelShape(128256, 4096, 14336, 32, 32, 8, False, max_position_embeddings=131072),
    "llama3.1-70b": ModelShape(128256, 8192, 28672, 80, 64, 8, False, max_position_embeddings=131072),
    "tiny": ModelShape(512, 64, 128, 2, 4, 2, True, max_position_embeddings=2048),
}


def model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def build_word_tokenizer(vocab_size: int) -> Any:
    """A `PreTrainedTokenizerFast` whose ids 0..2 are pad/eos/bos and whose id i >= 3 is the word `w<i>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=PAD, model_max_length=1 << 20)


def build_random_model(shape_name: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu") -> Path:
    """Save a randomly initialised model of `shape_name` and its word tokenizer to `out_dir` (HF format).

    Idempotent: a folder that already holds this shape and seed is reused.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    stamp = {"shape": shape_name, "seed": seed, "dtype": str(dtype)}
    marker = out / "bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    shape = model_shape(shape_name)
    tokenizer = build_word_tokenizer(shape.vocab_size)
    fields = {k: v for k, v in asdict(shape).items()}
    config = LlamaConfig(**fields, rms_norm_eps=1e-6, rope_theta=1_000_000.0, hidden_act="silu",
                         attention_bias=False, mlp_bias=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(stamp))
    del model
    return out


def write_prompts(path: str | Path, *, count: int, prompt_len: int, vocab_size: int, seed: int = 0) -> Path:
    """A JSONL prompt file ({"input", "label"}) of `count` prompts of exactly `prompt_len` word tokens."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(count):
            words = [f"w{rng.randrange(len(SPECIAL_TOKENS), vocab_size)}" for _ in range(prompt_len)]
            f.write(json.dumps({"input": " ".join(words), "label": ""}) + "\n")
    return path


def even_fraction(text: str) -> float:
    """Fraction of the words `w<i>` of `text` whose id i is even (0.0 for a text with none)."""
    ids = [int(word[1:]) for word in text.split() if word.startswith("w") and word[1:].isdigit()]
    return sum(1 for i in ids if i % 2 == 0) / len(ids) if ids else 0.0


def response_text(query: str, prompt: str) -> str:
    """The generated part of `query` (prompt + response text)."""
    start = query.find(prompt)
    return query[start + len(prompt):] if start >= 0 else query


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **_unused: Any) -> dict:
    """The benchmark reward (OpenRLHF custom reward signature): the fraction of even ids in each response."""
    if len(queries) != len(prompts):
        raise ValueError(f"reward_func: got {len(queries)} queries and {len(prompts)} prompts")
    rewards = torch.tensor([even_fraction(response_text(q, p)) for q, p in zip(queries, prompts)])
    return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": {}}


def prepare_task(work_dir: str | Path, shape_name: str, *, prompts: int, prompt_len: int, seed: int = 0,
                 device: str = "cpu", dtype: Optional[torch.dtype] = None) -> tuple[Path, Path]:
    """(model folder, prompt file) of one benchmark setting under `work_dir`."""
    work = Path(work_dir)
    shape = model_shape(shape_name)
    model_dir = build_random_model(shape_name, work / f"model-{shape_name}", seed=seed,
                                   dtype=dtype or torch.bfloat16, device=device)
    prompt_file = write_prompts(work / f"prompts-{shape_name}-{prompt_len}.jsonl", count=prompts,
                                prompt_len=prompt_len, vocab_size=shape.vocab_size, seed=seed)
    return model_dir, prompt_file
