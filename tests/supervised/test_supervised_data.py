"""Rows -> token ids (templates, multi-turn masking, pretrain and conditional modes, truncation, errors) and the step
schedule, checked against token ids spelled out by hand with the character-level tiny tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import DatasetError
from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer
from hpc_rlhf.trainers.common import StepSchedule
from hpc_rlhf.trainers.supervised_data import (
    TextEncoder,
    load_pairs,
    load_sft_examples,
    load_unpaired,
)

BOS, EOS, USER, ASSISTANT, SYSTEM = 1, 2, 5, 6, 4
NEWLINE = 7 + 95  # after the 95 printable ASCII characters


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def chars(text: str) -> list[int]:
    """The tiny tokenizer's ids: printable ASCII character c is token 7 + ord(c) - 32."""
    return [7 + ord(c) - 32 for c in text]


def config(**sections) -> Config:
    cfg = Config()
    for name, values in sections.items():
        setattr(cfg, name, replace(getattr(cfg, name), **values))
    return cfg


def write(tmp_path: Path, rows: list[dict], name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_plain_row_with_input_template(tokenizer, tmp_path):
    cfg = config(data={"input_template": "Q: {}\nA: "})
    (example,), _ = load_sft_examples(write(tmp_path, [{"input": "3+4", "response": "7"}]), cfg, tokenizer)
    assert list(example.prompt_ids) == [BOS] + chars("Q: 3+4") + [NEWLINE] + chars("A: ")
    assert list(example.response_ids) == chars("7") + [EOS]
    assert example.trained is None


def test_chat_template_splits_prompt_and_assistant_turn(tokenizer, tmp_path):
    cfg = config(data={"apply_chat_template": True})
    (example,), _ = load_sft_examples(write(tmp_path, [{"input": "3+4=", "response": "7"}]), cfg, tokenizer)
    assert list(example.prompt_ids) == [BOS, USER] + chars("3+4=") + [EOS, ASSISTANT]
    assert list(example.response_ids) == chars("7") + [EOS]


def test_multiturn_trains_only_assistant_turns(tokenizer, tmp_path):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    cfg = config(data={"apply_chat_template": True}, sft={"multiturn": True})
    (example,), _ = load_sft_examples(write(tmp_path, [{"input": chat}]), cfg, tokenizer)
    assert list(example.prompt_ids) == [BOS, SYSTEM] + chars("S") + [EOS, USER] + chars("u1") + [EOS, ASSISTANT]
    turn1, between, turn2 = chars("a1") + [EOS], [USER] + chars("u2") + [EOS, ASSISTANT], chars("a2") + [EOS]
    assert list(example.response_ids) == turn1 + between + turn2
    assert list(example.trained) == [True] * 3 + [False] * 5 + [True] * 3
    # The pieces add up to the whole rendered chat.
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.decode(list(example.prompt_ids) + list(example.response_ids)) == full


def test_pretrain_mode_trains_every_token(tokenizer, tmp_path):
    cfg = config(sft={"pretrain_mode": True})
    (example,), _ = load_sft_examples(write(tmp_path, [{"input": "hello"}]), cfg, tokenizer)
    assert list(example.prompt_ids) == [BOS]
    assert list(example.response_ids) == chars("hello") + [EOS]
    assert example.trained is None


def test_conditional_sft_puts_the_condition_into_the_prompt(tokenizer, tmp_path):
    cfg = config(sft={"condition_key": "score"})
    (example,), _ = load_sft_examples(write(tmp_path, [{"input": "3+4=", "response": "7", "score": 5}]), cfg,
                                      tokenizer)
    assert list(example.prompt_ids) == [BOS] + chars("3+4= <rm_score>: 5 ")


def test_long_rows_are_cut_or_skipped_and_counted(tokenizer, tmp_path):
    cfg = config(data={"max_len": 7})
    path = write(tmp_path, [{"input": "1+2=", "response": "3"}, {"input": "10+2=", "response": "12"},
                            {"input": "100+20=", "response": "120"}])
    examples, report = load_sft_examples(path, cfg, tokenizer)
    # bos + 4 prompt tokens leave room for "3</s>"; bos + 5 for "1" of "12</s>"; bos + 7 for nothing.
    assert [list(e.response_ids) for e in examples] == [chars("3") + [EOS], chars("1")]
    assert report.rows == 3 and len(report.skipped) == 1
    assert "row 2" in report.skipped[0] and str(path) in report.skipped[0]


def test_pairs_and_unpaired_rows(tokenizer, tmp_path):
    cfg = config(pref={"margin_key": "margin", "ref_chosen_logps_key": "rc", "ref_rejected_logps_key": "rr"})
    path = write(tmp_path, [{"input": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5, "rc": -1.0, "rr": -2.0}])
    (pair,), _ = load_pairs(path, cfg, tokenizer)
    assert list(pair.chosen.response_ids) == chars("2") + [EOS]
    assert list(pair.rejected.response_ids) == chars("3") + [EOS]
    assert (pair.margin, pair.ref_chosen, pair.ref_rejected) == (0.5, -1.0, -2.0)
    kto_path = write(tmp_path, [{"input": "1+1=", "response": "2", "label": True}], "kto.jsonl")
    (example,), _ = load_unpaired(kto_path, Config(), tokenizer)
    assert example.desirable is True


@pytest.mark.parametrize("rows, loader, message", [
    ([{"input": "1+1="}], load_sft_examples, "key 'response' is missing in row 0 (line 1)"),
    ([{"input": "1+1=", "response": "2", "label": "yes"}], load_unpaired, "must be true or false"),
    ([{"input": [{"role": "user", "content": "hi"}], "response": "2"}], load_sft_examples,
     "chat messages need data.apply_chat_template"),
    ([{"input": "1+1=", "chosen": "2"}], load_pairs, "key 'rejected' is missing"),
])
def test_bad_rows_name_the_key_row_and_file(tokenizer, tmp_path, rows, loader, message):
    path = write(tmp_path, rows)
    with pytest.raises(DatasetError) as err:
        loader(path, Config(), tokenizer)
    assert message in str(err.value) and str(path) in str(err.value)


def test_prm_rows_mark_each_placeholder(tokenizer, tmp_path):
    from hpc_rlhf.trainers.prm import load_step_examples

    cfg = config(prm={"placeholder_token": "#"})
    path = write(tmp_path, [{"input": "1+1=2#2+1=4#", "label": ["+", "-"]}])
    (example,), _ = load_step_examples(path, cfg, tokenizer)
    ids = [BOS] + chars("1+1=2#2+1=4#")
    assert list(example.input_ids) == ids
    expected = [-100] * len(ids)
    expected[6], expected[12] = 0, 1
    assert list(example.step_labels) == expected
    sample = example.to_sample()
    assert sample.action_mask.nonzero().flatten().tolist() == [5, 11]  # response = ids[1:]

    bad = write(tmp_path, [{"input": "1+1=2#", "label": ["+", "-"]}], "bad.jsonl")
    with pytest.raises(DatasetError, match="1 step placeholders but 2 labels"):
        load_step_examples(bad, cfg, tokenizer)
    with pytest.raises(ValueError, match="prm.placeholder_token 'ки' is 4 tokens"):
        load_step_examples(path, config(prm={"placeholder_token": "ки"}), tokenizer)


def test_encoder_rejects_a_template_without_a_slot(tokenizer):
    with pytest.raises(ValueError, match="data.input_template must contain"):
        TextEncoder(tokenizer, input_template="no slot")


@settings(max_examples=60, deadline=None)
@given(num_examples=st.integers(1, 200), batch_size=st.integers(1, 40), ranks=st.integers(1, 5),
       epochs=st.integers(1, 3), seed=st.integers(0, 10**6), data=st.data())
def test_schedule_splits_each_step_over_ranks_and_covers_epochs(num_examples, batch_size, ranks, epochs, seed, data):
    if num_examples < batch_size:
        with pytest.raises(ValueError, match="fewer than train.train_batch_size"):
            StepSchedule(num_examples, batch_size, epochs, seed)
        return
    schedule = StepSchedule(num_examples, batch_size, epochs, seed)
    assert schedule.total_steps == (num_examples // batch_size) * epochs
    step = data.draw(st.integers(0, schedule.total_steps - 1))
    parts = [schedule.indices(step, rank=r, num_ranks=ranks) for r in range(ranks)]
    flat = [i for part in parts for i in part]
    assert len(flat) == batch_size == len(set(flat))
    assert all(0 <= i < num_examples for i in flat)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [schedule.indices(step, rank=r, num_ranks=ranks) for r in range(ranks)]  # a pure function
    epoch = step // schedule.steps_per_epoch
    seen = [i for s in range(epoch * schedule.steps_per_epoch, (epoch + 1) * schedule.steps_per_epoch)
            for i in schedule.indices(s, rank=0, num_ranks=1)]
    assert len(seen) == len(set(seen)) == schedule.steps_per_epoch * batch_size  # no row twice in an epoch
