"""End to end on CPU: the tiny model, its tokenizer and the arithmetic files fit together and the task is learnable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpc_rlhf.tasks.arithmetic import reward_func
from hpc_rlhf.tasks.warm_start import sft_batch

DATA = Path(__file__).resolve().parents[2] / "data" / "arithmetic"


def greedy_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Share of test prompts whose greedy answer reward_func scores correct."""
    tokenizer.padding_side = "left"
    prompts = [row["input"] for row in rows]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    queries = tokenizer.batch_decode(out, skip_special_tokens=False)
    return reward_func(queries, prompts, [row["label"] for row in rows])["scores"].mean().item()


@pytest.mark.timeout(300)
def test_a_short_sft_warm_up_learns_some_arithmetic(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sft = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()][:100]
    before = greedy_accuracy(model.eval(), tokenizer, test)
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(500):
        start = (step * 64) % len(sft)
        input_ids, labels, mask = sft_batch(tokenizer, sft[start:start + 64])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    after = greedy_accuracy(model.eval(), tokenizer, test)
    # Held-out problems: the random model is right by luck at most a few times in 100.
    assert before <= 0.05 and after >= 0.25
