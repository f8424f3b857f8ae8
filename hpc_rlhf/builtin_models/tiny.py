"""Tiny offline models: a character-level tokenizer and random-init Llama (or Qwen3-MoE) policy / reward models.

They let every test, the CPU config and a fresh machine run the whole stack with no model hub:

    build_tiny_model("/tmp/tiny")             # /tmp/tiny (policy + tokenizer), /tmp/tiny/reward (value/reward model)
    build_tiny_moe_model("/tmp/moe")          # the same layout with a mixture-of-experts (Qwen3-MoE) model

(`resolve.resolve_model_path("builtin:tiny-llama")` / `"builtin:tiny-moe"` build the same once into the model cache.)

The tokenizer maps every printable ASCII character, newline and tab to one token and falls back to UTF-8 byte tokens for
anything else, so decoding reproduces any text exactly. Its chat template renders
`<s><|system|>...</s><|user|>...</s><|assistant|>...</s>`; `add_generation_prompt=True` ends with `<|assistant|>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

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

REWARD_SUBDIR = "reward"

IMAGE_TOKEN = "<image>"
# The chat template of the tiny vision-language model: a message's content is text, or a list of parts
# ({"type": "image"} -> the image token, {"type": "text", "text": ...} -> the text), as processors expect.
VLM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


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
    return _write_policy_and_reward(out, tokenizer, LlamaForCausalLM, LlamaForSequenceClassification,
                                    LlamaConfig(**llama_fields), LlamaConfig(**llama_fields, num_labels=1), seed)


def build_tiny_moe_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-init `Qwen3MoeForCausalLM` (every layer a sparse MoE block of `num_experts` experts, top
    `num_experts_per_tok` routing) + the tiny tokenizer to `out_dir`, and its `Qwen3MoeForSequenceClassification`
    (num_labels=1) to `out_dir/reward`, like `build_tiny_model`. Its config has `output_router_logits`, which marks
    a mixture-of-experts model for `actor.aux_loss_coef`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeForSequenceClassification

    _check_sizes(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=moe_intermediate_size, max_position_embeddings=max_position_embeddings)
    if not 0 < num_experts_per_tok <= num_experts:
        raise ValueError(f"build_tiny_moe_model: num_experts_per_tok={num_experts_per_tok} must be in "
                         f"1..num_experts={num_experts}")
    out = Path(out_dir)
    reward_dir = out / REWARD_SUBDIR
    reward_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(model_max_length=max_position_embeddings)
    moe_fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=moe_intermediate_size,
        moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _write_policy_and_reward(out, tokenizer, Qwen3MoeForCausalLM, Qwen3MoeForSequenceClassification,
                                    Qwen3MoeConfig(**moe_fields), Qwen3MoeConfig(**moe_fields, num_labels=1), seed)


def _write_policy_and_reward(out: Path, tokenizer: PreTrainedTokenizerFast, policy_class: type, reward_class: type,
                             config: object, reward_config: object, seed: int) -> Path:
    """Build the policy then the reward model from `seed` and save each with the tokenizer (`out`, `out/reward`)."""
    import torch

    # Weight init draws from torch's global generator: seed a forked copy so the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = policy_class(config)
        reward = reward_class(reward_config)
    policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reward.save_pretrained(out / REWARD_SUBDIR, safe_serialization=True)
    tokenizer.save_pretrained(out / REWARD_SUBDIR)
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


def build_tiny_vlm(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random-init tiny LLaVA (a one-layer CLIP vision tower on 28x28 images in 14x14 patches -> 4 image
    tokens, a projector, the tiny Llama) with its processor (CLIP image processor + the character tokenizer with an
    `<image>` token and a chat template that takes image parts) to `out_dir`; about 0.8 MB. Same seed, same weights."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    # "default" drops the vision tower's CLS token: (28 / 14) ** 2 = 4 placeholder tokens per image.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VLM_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
