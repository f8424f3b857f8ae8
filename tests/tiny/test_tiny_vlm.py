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
