"""The tiny tokenizer: exact round trips, character-level ids, special tokens, chat template, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hpc_rlhf.builtin_models.tiny import CHARACTERS

REPO = Path(__file__).resolve().parents[2]


def _task_texts() -> list[str]:
    """Prompt + answer texts of the committed arithmetic files."""
    texts = []
    for name, answer_key in (("train", "label"), ("test", "label"), ("sft", "response")):
        for line in (REPO / "data" / "arithmetic" / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            texts.append(row["input"] + row[answer_key])
    return texts


def test_task_text_round_trips_one_token_per_character(tiny_tokenizer):
    texts = _task_texts()
    assert len(texts) > 1000
    for text in texts:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # character-level: no merges, no byte tokens for ASCII
        assert tiny_tokenizer.decode(ids) == text
        with_bos = tiny_tokenizer(text)["input_ids"]
        assert with_bos == [tiny_tokenizer.bos_token_id] + ids
        assert tiny_tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_spaces_and_punctuation_survive_decoding(tiny_tokenizer):
    text = "  Q: what is 3 * (4 - 1)?\n\tA:  9 , done!  "
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert [tiny_tokenizer.decode([i]) for i in ids] == list(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_unicode_text_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_vocabulary_and_special_tokens(tiny_tokenizer):
    # 7 special tokens + 95 printable ASCII + newline + tab + 256 byte-fallback tokens.
    assert len(tiny_tokenizer) == 7 + 95 + 2 + 256
    assert len(CHARACTERS) == 97
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.bos_token, tiny_tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id) == (0, 1, 2)
    eos_ids = tiny_tokenizer("19</s>", add_special_tokens=False)["input_ids"]
    assert eos_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(eos_ids, skip_special_tokens=True) == "19"


def test_chat_template_renders_roles_and_generation_prompt(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "12+7="},
    ]
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<s><|system|>Answer with a number.</s><|user|>12+7=</s><|assistant|>"
    )
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s><|system|>Answer with a number.</s><|user|>12+7=</s>"
    )
    full = messages + [{"role": "assistant", "content": "19"}]
    assert tiny_tokenizer.apply_chat_template(full, tokenize=False).endswith("<|assistant|>19</s>")


def test_chat_template_token_ids_have_a_single_bos(tiny_tokenizer):
    ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
    role = tiny_tokenizer.convert_tokens_to_ids
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert ids[1] == role("<|user|>") and ids[-1] == role("<|assistant|>")
    assert tiny_tokenizer.decode(ids[2:6]) == "1+1="


def test_chat_template_rejects_unknown_role(tiny_tokenizer):
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_tokenizer_loads_with_auto_tokenizer(tiny_model_dir, tiny_tokenizer):
    for folder in (tiny_model_dir, tiny_model_dir / "reward"):
        loaded = AutoTokenizer.from_pretrained(folder)
        text = "12+7=19 and 3-5=-2"
        assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
        assert loaded.model_max_length == 512
        chat = [{"role": "user", "content": "2+2="}]
        assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
            "<s><|user|>2+2=</s><|assistant|>"
        )
