"""Images of vision-language prompts: dataset values -> PNG bytes, PNG bytes -> the model's vision tensors.

A prompt row's `data.image_key` column holds one image or a list of them, each a file path (absolute, or relative to
the dataset file's folder), a base64 string or a `data:image/...;base64,` URI. Every image is decoded, converted to
RGB and re-encoded as PNG once, when the prompts load; from then on an image is its PNG bytes: in the prompt, in the
rollout shard (`images` column) and on the trainer, which rebuilds the vision tensors from them with the model's
image processor (`vision_tensors`), exactly as the generator did.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hpc_rlhf.data.records import DatasetError, RowRef


def image_png_bytes(value: Any, where: RowRef, position: int = 0) -> bytes:
    """One dataset image (path, base64 string or data URI) as RGB PNG bytes; an unreadable one raises DatasetError
    naming the row, the file and the image."""
    from PIL import Image, UnidentifiedImageError

    what = f"image {position} of {where}"
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{what} must be a file path or a base64 string, got {type(value).__name__}")
    raw = _file_bytes(value, where) if not value.startswith("data:") else None
    if raw is None:
        raw = _base64_bytes(value)
    if raw is None:
        raise DatasetError(f"{what}: {value[:80]!r} is neither a file (relative paths start at {where.file.parent}) "
                           "nor base64 image data")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{what}: cannot decode the image ({exc})") from exc
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def _file_bytes(value: str, where: RowRef) -> bytes | None:
    """The bytes of the file `value` names (relative to the dataset file's folder), None when there is none."""
    if len(value) > 4096:
        return None  # base64 data, not a path
    path = Path(value)
    if not path.is_absolute():
        path = Path(where.file).parent / path
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


def _base64_bytes(value: str) -> bytes | None:
    """The decoded bytes of a data URI or a bare base64 string, None when it is not base64."""
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def row_images(value: Any, where: RowRef, max_images: int) -> tuple[bytes, ...]:
    """A row's image column (one image or a list; null or [] = no image) as PNG bytes, at most `max_images`."""
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) > max_images:
        raise DatasetError(f"{where} has {len(values)} images, more than data.max_images_per_prompt={max_images}")
    return tuple(image_png_bytes(item, where, position) for position, item in enumerate(values))


def decode_png(images: Sequence[bytes]) -> list[Any]:
    """PIL images from PNG bytes."""
    from PIL import Image

    decoded = []
    for raw in images:
        with Image.open(io.BytesIO(raw)) as image:
            decoded.append(image.convert("RGB"))
    return decoded


def vision_tensors(image_processor: Any, images: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """The tensors a vision-language model's forward takes for `images` (all images of a batch, in the order their
    placeholder tokens appear): `pixel_values` and, for some models, e.g. `image_grid_thw`."""
    out = image_processor(images=decode_png(images), return_tensors="pt")
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def is_vision_language(config: Any) -> bool:
    """Whether a Hugging Face model config is that of a vision-language model (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def causal_lm_auto_class(path: str) -> Any:
    """`AutoModelForImageTextToText` for a vision-language model folder, else `AutoModelForCausalLM`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path))
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def check_plain_positions(model: Any) -> None:
    """Refuse a vision-language model whose rotary positions depend on the images (Qwen2-VL's M-RoPE: it computes
    them with `get_rope_index`): the engines and trainers here pass 1-D position ids."""
    inner = getattr(model, "model", None)
    if hasattr(model, "get_rope_index") or hasattr(inner, "get_rope_index"):
        raise ValueError(f"{type(model).__name__} computes multimodal rotary positions from its images (M-RoPE), "
                         "which is not supported yet; LLaVA-style models are (docs/vision.md)")


def load_image_processor(path: str) -> Any:
    """The image processor saved with a vision-language model (its processor's)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path)).image_processor


def collapse_image_tokens(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Token ids with each run of consecutive image placeholder tokens reduced to one: the prompt as written before
    the processor expanded each image token into the image's patch tokens."""
    out: list[int] = []
    for token in ids:
        if not (token == image_token_id and out and out[-1] == image_token_id):
            out.append(int(token))
    return out


def image_token_id(config: Any) -> int | None:
    """The placeholder token id of one image patch in a vision-language model's prompts, None for a text model."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
