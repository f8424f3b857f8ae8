"""builtin:tiny-vlm: a tiny LLaVA built offline from a seed, loadable with AutoProcessor and
AutoModelForImageTextToText, small, reproducible, and its processor expands one image into 4 placeholder tokens."""

from __future__ import annotations

import hashlib
import io

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.builtin_models.tiny import IMAGE_TOKEN, build_tiny_vlm
from hpc_rlhf.data.images import causal_lm_auto_class, decode_png, image_token_id, vision_tensors


def test_tiny_vlm_is_small_reproducible_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_RLHF_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path("builtin:tiny-vlm")
    again = build_tiny_vlm(tmp_path / "again", seed=0)
    weights = [hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() for folder in
               (tmp_path / "cache" / "tiny-vlm-v3", again)]
    assert str(tmp_path / "cache" / "tiny-vlm-v3") == path and weights[0] == weights[1]
    assert sum(f.stat().st_size for f in again.iterdir()) < 1_000_000

    assert causal_lm_auto_class(path) is AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert processor.image_token == IMAGE_TOKEN
    token = image_token_id(model.config)
    assert token == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buffer, format="PNG")
    ids = processor(text=["<image>hi"], images=[decode_png([buffer.getvalue()])])["input_ids"][0]
    assert ids.count(token) == 4
    assert tuple(vision_tensors(processor.image_processor, [buffer.getvalue()])["pixel_values"].shape) == (1, 3, 28, 28)


def test_models_with_multimodal_rotary_positions_are_refused():
    import pytest
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from hpc_rlhf.data.images import check_plain_positions

    config = Qwen2VLConfig(text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, intermediate_size=32,
                                            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                           vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, in_channels=3,
                                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    with pytest.raises(ValueError, match="M-RoPE"):
        check_plain_positions(Qwen2VLForConditionalGeneration(config))
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_path("builtin:tiny-vlm"))
    check_plain_positions(model)  # LLaVA: plain positions
