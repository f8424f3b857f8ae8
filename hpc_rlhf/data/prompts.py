"""Load the prompts an RL run samples from, with OpenRLHF's dataset options.

Each row's `input_key` column holds the prompt: a string, or a list of chat messages ({"role", "content"} dicts).
With `apply_chat_template` the input (a string becomes one user message) is rendered with the tokenizer's chat template
and `add_generation_prompt=True`; otherwise a string input is used as is, or formatted into `input_template`
(e.g. "Q: {}\\nA: "), which is ignored when the chat template is applied, as in OpenRLHF.
`label_key` names the column passed to the reward as the reference answer; non-string labels are turned into text
(numbers with str(), lists and dicts as JSON). `max_samples` keeps the first rows of the dataset.
Several datasets are read one after another, or mixed with `probabilities` (see `mixing`); `index` then numbers the
prompts of the mix.

Vision-language prompts (`max_images > 0`): the `image_key` column holds a row's images (see `images`); a row without
it, or with null / [], is text only. The prompt gets one `image_token` per image: with the chat template, image parts
({"type": "image"}) before the text of the first user message; without it, the tokens before the text, unless the
text already holds them (then their count must match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hpc_rlhf.data.images import row_images
from hpc_rlhf.data.mixing import mixed_records
from hpc_rlhf.data.records import DataPaths, DatasetError, RowRef, iter_records


@dataclass(frozen=True)
class PromptExample:
    """One prompt as the generator sees it, the label the reward checks, and its position in the dataset."""

    prompt: str
    label: Optional[str]
    index: int
    images: tuple[bytes, ...] = ()  # PNG bytes, in the order of the prompt's image tokens


def load_prompts(
    path: DataPaths,
    *,
    input_key: str = "input",
    label_key: Optional[str] = None,
    apply_chat_template: bool = False,
    input_template: Optional[str] = None,
    max_samples: Optional[int] = None,
    tokenizer: Any = None,
    probabilities: Optional[Sequence[float]] = None,
    seed: int = 0,
    image_key: Optional[str] = None,
    max_images: int = 0,
    image_token: Optional[str] = None,
) -> list[PromptExample]:
    """Read the JSONL/JSON/Parquet/Arrow file or folder at `path` (or several) into PromptExamples, numbered from 0 in
    file order, or in the order of their mix with `probabilities` (drawn with `seed`, see `mixing.mixed_records`).

    `tokenizer` is needed only with `apply_chat_template`; `image_token` (the processor's) only with `max_images`.
    """
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    if input_template is not None and not apply_chat_template and "{}" not in input_template:
        raise ValueError(f"input_template must contain '{{}}' where the input goes, got {input_template!r}")
    if apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("apply_chat_template needs a tokenizer that has a chat template")

    with_images = bool(max_images) and image_key is not None
    if with_images and not image_token:
        raise ValueError("prompts with images need the processor's image_token")
    columns = [input_key] + ([label_key] if label_key else [])
    examples: list[PromptExample] = []
    for where, row in mixed_records(path, probabilities=probabilities, seed=seed, max_samples=max_samples,
                                    columns=None if with_images else columns):
        images = row_images(row.get(image_key), where, max_images) if with_images else ()
        value = field_of(row, input_key, where)
        if images:
            prompt = _render_image_prompt(value, where, len(images), image_token,
                                          apply_chat_template=apply_chat_template, input_template=input_template,
                                          tokenizer=tokenizer)
        else:
            prompt = _render_prompt(value, where, apply_chat_template=apply_chat_template,
                                    input_template=input_template, tokenizer=tokenizer)
        label = _label_text(field_of(row, label_key, where)) if label_key else None
        examples.append(PromptExample(prompt=prompt, label=label, index=len(examples), images=images))
    return examples


def check_prompt_rows(path: DataPaths, *, input_key: str = "input", label_key: Optional[str] = None,
                      apply_chat_template: bool = False, limit: Optional[int] = None, image_key: Optional[str] = None,
                      max_images: int = 0) -> tuple[int, bool]:
    """Check the first `limit` rows (all when None) the way `load_prompts` reads them, without a tokenizer, so that a
    missing file, a bad row, a missing key or an unreadable image is reported before any model loads. Raises
    DatasetError naming the file and row; returns (rows checked, whether that was every row of the dataset)."""
    with_images = bool(max_images) and image_key is not None
    columns = [input_key] + ([label_key] if label_key else [])
    count = 0
    for where, row in iter_records(path, columns=None if with_images else columns):
        if with_images and (limit is None or count < limit):
            row_images(row.get(image_key), where, max_images)
        if limit is not None and count >= limit:
            return count, False
        value = field_of(row, input_key, where)
        if apply_chat_template:
            if not isinstance(value, str):
                check_messages(value, where)
        elif not isinstance(value, str):
            raise DatasetError(f"input of {where} is a {type(value).__name__}, not text; chat messages need "
                               "apply_chat_template")
        if label_key:
            field_of(row, label_key, where)
        count += 1
    return count, True


def field_of(row: dict, key: str, where: RowRef) -> Any:
    """row[key], or an error naming the key, the row and the file when it is missing or null."""
    if key not in row:
        raise DatasetError(f"key {key!r} is missing in {where}; the row has keys {sorted(row)}")
    value = row[key]
    if value is None:
        raise DatasetError(f"key {key!r} is null in {where}")
    return value


def _render_prompt(value: Any, where: RowRef, *, apply_chat_template: bool, input_template: Optional[str],
                   tokenizer: Any) -> str:
    if apply_chat_template:
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else check_messages(value, where)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(value, str):
        raise DatasetError(f"input of {where} is a {type(value).__name__}, not text; chat messages need "
                           "apply_chat_template")
    return input_template.format(value) if input_template else value


def _render_image_prompt(value: Any, where: RowRef, count: int, image_token: str, *, apply_chat_template: bool,
                         input_template: Optional[str], tokenizer: Any) -> str:
    """A prompt with `count` image placeholders (see the module docstring)."""
    if apply_chat_template:
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else check_messages(value, where)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise DatasetError(f"input of {where} has images but no user message to put them in")
        messages = [dict(m) for m in messages]
        text = messages[first_user]["content"]
        messages[first_user]["content"] = [{"type": "image"}] * count + [{"type": "text", "text": text}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = _render_prompt(value, where, apply_chat_template=False, input_template=input_template,
                                tokenizer=tokenizer)
        if image_token not in prompt:
            prompt = image_token * count + prompt
    if prompt.count(image_token) != count:
        raise DatasetError(f"the prompt of {where} holds {prompt.count(image_token)} image tokens {image_token!r} "
                           f"for {count} images")
    return prompt


def check_messages(value: Any, where: RowRef) -> list[dict]:
    """Check that `value` is a list of {"role": str, "content": str} chat messages."""
    if not isinstance(value, list) or not value:
        raise DatasetError(f"input of {where} must be text or a non-empty list of chat messages, "
                           f"got {type(value).__name__}")
    for position, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DatasetError(f"message {position} of {where} must be a dict with string 'role' and 'content', "
                               f"got {message!r}")
    return value


def _label_text(value: Any) -> str:
    """Labels reach reward functions as text: strings as they are, lists/dicts as JSON, other values with str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
