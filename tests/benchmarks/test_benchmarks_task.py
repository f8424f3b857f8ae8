"""The synthetic benchmark task: word tokenizer round trips through AutoTokenizer, models match their shapes'
parameter counts, prompts have the asked length, and the reward is the fraction of even ids."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_rlhf.benchmarks.task import (
    MODEL_SHAPES,
    build_random_model,
    even_fraction,
    model_shape,
    prepare_task,
    reward_func,
)


def test_tiny_task_loads_back_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, prompts = prepare_task(tmp_path, "tiny", prompts=5, prompt_len=7, seed=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in model.parameters()) == MODEL_SHAPES["tiny"].parameter_count()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.decode([3, 10, 511]) == "w3 w10 w511"
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        ids = tokenizer(row["input"], add_special_tokens=False)["input_ids"]
        assert len(ids) == 7 and min(ids) >= 3 and max(ids) < 512
        assert tokenizer.decode(ids) == row["input"]


def test_build_is_seeded_and_reused(tmp_path):
    first = build_random_model("tiny", tmp_path / "a", seed=1, dtype=torch.float32)
    stamp = (first / "bench_model.json").stat().st_mtime_ns
    assert build_random_model("tiny", first, seed=1, dtype=torch.float32) == first
    assert (first / "bench_model.json").stat().st_mtime_ns == stamp, "an existing model is not rebuilt"
    second = build_random_model("tiny", tmp_path / "b", seed=1, dtype=torch.float32)
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_published_parameter_counts():
    # Qwen2.5 model cards: 0.49B, 1.54B, 7.61B parameters (ours lack the q/k/v biases, under 0.01% of them).
    assert model_shape("qwen2.5-0.5b").parameter_count() == pytest.approx(0.494e9, rel=0.002)
    assert model_shape("qwen2.5-1.5b").parameter_count() == pytest.approx(1.544e9, rel=0.002)
    assert model_shape("qwen2.5-7b").parameter_count() == pytest.approx(7.616e9, rel=0.002)
    with pytest.raises(ValueError, match="unknown model shape 'gpt5'"):
        model_shape("gpt5")


def test_reward_is_fraction_of_even_ids_in_the_response():
    assert even_fraction("w4 w7 w10 w13") == 0.5
    assert even_fraction("no words here") == 0.0
    out = reward_func(["w1 w3 w4 w6 w8", "w2 w5"], ["w1 w3", "w2"], ["", ""])
    assert out["rewards"].tolist() == pytest.approx([1.0, 0.0])  # the prompt's words are not scored
    assert torch.equal(out["rewards"], out["scores"])
    with pytest.raises(ValueError, match="2 queries and 1 prompts"):
        reward_func(["a", "b"], ["a"], ["", ""])
