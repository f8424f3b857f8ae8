"""Prompts with images (data.image_key, data.max_images_per_prompt): file paths and base64 become the same PNG bytes,
placeholders go where the processor expects them, text rows stay text, and bad images are named with their row."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from hpc_rlhf.builtin_models.tiny import IMAGE_TOKEN, VLM_CHAT_TEMPLATE, build_tiny_tokenizer
from hpc_rlhf.data.images import decode_png
from hpc_rlhf.data.prompts import check_prompt_rows, load_prompts
from hpc_rlhf.data.records import DatasetError


@pytest.fixture
def vlm_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    return tokenizer


def png_file(path: Path, rgb: tuple[int, int, int]) -> Path:
    Image.new("RGB", (6, 5), rgb).save(path)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path: Path, tokenizer, **kwargs):
    options = dict(label_key="label", image_key="images", max_images=2, image_token=IMAGE_TOKEN, tokenizer=tokenizer)
    options.update(kwargs)
    return load_prompts(path, **options)


def test_paths_and_base64_give_the_same_png_and_placeholders(tmp_path, vlm_tokenizer):
    folder = tmp_path / "pics"
    folder.mkdir()
    red = png_file(folder / "red.png", (255, 0, 0))
    # A JPEG-free but non-PNG source (BMP) is re-encoded: every image is stored as RGB PNG.
    Image.new("RGB", (6, 5), (0, 0, 255)).save(folder / "blue.bmp")
    blue_b64 = base64.b64encode((folder / "blue.bmp").read_bytes()).decode()
    rows = [
        {"input": "Colour?", "label": "red", "images": ["red.png"]},  # relative to the dataset file
        {"input": "Colour?", "label": "blue", "images": f"data:image/bmp;base64,{blue_b64}"},  # one image, no list
        {"input": "Both?", "label": "red,blue", "images": [str(red), blue_b64]},
        {"input": "No picture", "label": "x"},  # text only: no key, or null
        {"input": "No picture", "label": "x", "images": None},
    ]
    path = write_rows(folder / "rows.jsonl", rows)
    chat = load(path, vlm_tokenizer, apply_chat_template=True)
    plain = load(path, vlm_tokenizer, input_template="Q: {}\nA: ")

    assert chat[0].prompt == "<s><|user|><image>Colour?</s><|assistant|>"
    assert chat[2].prompt == "<s><|user|><image><image>Both?</s><|assistant|>"
    assert chat[3].prompt == "<s><|user|>No picture</s><|assistant|>" and chat[3].images == ()
    assert plain[0].prompt == "<image>Q: Colour?\nA: " and plain[4].images == ()
    pixels = [[image.getpixel((1, 1)) for image in decode_png(p.images)] for p in chat]
    assert pixels == [[(255, 0, 0)], [(0, 0, 255)], [(255, 0, 0), (0, 0, 255)], [], []]
    assert chat[2].images == (chat[0].images[0], chat[1].images[0])  # same picture, same bytes, whatever the source
    assert [p.images for p in plain] == [p.images for p in chat]
    # Without max_images the image column is not read: text prompts exactly as before.
    text_only = load_prompts(path, label_key="label", apply_chat_template=True, tokenizer=vlm_tokenizer)
    assert all(p.images == () for p in text_only) and text_only[0].prompt == "<s><|user|>Colour?</s><|assistant|>"


def test_bad_images_are_named_with_row_and_file(tmp_path, vlm_tokenizer):
    png_file(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cases = [
        ({"input": "a", "label": "b", "images": ["missing.png"]}, r"image 0 of row 0 \(line 1\) of .*rows.jsonl: "
                                                                  r"'missing.png' is neither a file"),
        ({"input": "a", "label": "b", "images": ["ok.png", "broken.png"]}, r"image 1 of row 0 .*cannot decode"),
        ({"input": "a", "label": "b", "images": ["ok.png"] * 3}, r"row 0 .* has 3 images, more than "
                                                                 r"data.max_images_per_prompt=2"),
        ({"input": "a", "label": "b", "images": [7]}, r"image 0 of row 0 .* must be a file path or a base64 string"),
        ({"input": "<image><image>a", "label": "b", "images": ["ok.png"]}, r"holds 2 image tokens '<image>' for 1 "
                                                                           r"images"),
    ]
    for row, message in cases:
        path = write_rows(tmp_path / "rows.jsonl", [row])
        with pytest.raises(DatasetError, match=message):
            load(path, vlm_tokenizer)
    # The pre-flight check reads the images too, without a tokenizer.
    path = write_rows(tmp_path / "rows.jsonl", [{"input": "a", "images": ["ok.png"]}, {"input": "a",
                                                                                       "images": ["missing.png"]}])
    with pytest.raises(DatasetError, match=r"image 0 of row 1 .*'missing.png' is neither a file"):
        check_prompt_rows(path, image_key="images", max_images=1)
    assert check_prompt_rows(path, image_key="images", max_images=1, limit=1) == (1, False)
    assert check_prompt_rows(path) == (2, True)  # text only: the column is not looked at


def test_png_bytes_round_trip(tmp_path):
    path = png_file(tmp_path / "g.png", (0, 200, 0))
    buffer = io.BytesIO()
    (image,) = decode_png([path.read_bytes()])
    image.save(buffer, format="PNG")
    assert decode_png([buffer.getvalue()])[0].getpixel((0, 0)) == (0, 200, 0)


def test_base64_jpeg_starting_with_a_slash_is_data_not_a_path(tmp_path, vlm_tokenizer):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 250, 250)).save(buffer, format="JPEG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    assert encoded.startswith("/9j/")
    path = write_rows(tmp_path / "rows.jsonl", [{"input": "a", "label": "b", "images": [encoded]}])
    (prompt,) = load(path, vlm_tokenizer)
    assert all(abs(c - 250) <= 3 for c in decode_png(prompt.images)[0].getpixel((4, 4)))
