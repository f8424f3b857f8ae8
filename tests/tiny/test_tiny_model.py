"""The tiny policy and reward models: Auto-class loading, sizes, padding behaviour, determinism."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from hpc_rlhf.builtin_models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def llama_parameter_count(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                          lm_head_rows: int) -> int:
    """Parameters of an untied, bias-free Llama, counted by hand."""
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    mlp = 3 * hidden * intermediate  # gate, up, down
    norms = 2 * hidden
    return vocab * hidden + layers * (attention + mlp + norms) + hidden + lm_head_rows * hidden


def test_policy_loads_with_auto_class_and_has_the_requested_shape(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (64, 2, 4, 2, 256, 512)
    assert config.vocab_size == len(tiny_tokenizer)
    assert config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    expected = llama_parameter_count(vocab=360, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256,
                                     lm_head_rows=360)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_policy_generates_and_scores_tokens(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([tiny_tokenizer("12+7=")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()
    assert out.shape[1] <= ids.shape[1] + 4 and torch.equal(out[:, : ids.shape[1]], ids)


def test_reward_model_loads_and_reads_the_last_real_token(tiny_model_dir, tiny_tokenizer):
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir / "reward").eval()
    assert type(reward).__name__ == "LlamaForSequenceClassification"
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tiny_tokenizer.pad_token_id
    short = tiny_tokenizer("1+1=2")["input_ids"]
    long = tiny_tokenizer("12+17=29")["input_ids"]
    pad = tiny_tokenizer.pad_token_id
    batch = torch.tensor([short + [pad] * (len(long) - len(short)), long])
    with torch.no_grad():
        batched = reward(batch, attention_mask=(batch != pad).long()).logits
        alone = reward(torch.tensor([short])).logits
    assert batched.shape == (2, 1)
    # With pad_token_id set, the score of a right-padded row is read at its last real token.
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)


def test_files_are_small_safetensors(tiny_model_dir):
    for folder in (tiny_model_dir, tiny_model_dir / "reward"):
        weights = folder / "model.safetensors"
        assert weights.is_file() and weights.stat().st_size < 5_000_000
        assert (folder / "tokenizer.json").stat().st_size < 5_000_000
        assert not list(folder.glob("*.bin"))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for sub in ("model.safetensors", "reward/model.safetensors"):
        reference = load_file(tiny_model_dir / sub)
        same = load_file(again / sub)
        different = load_file(other / sub)
        assert reference.keys() == same.keys() == different.keys()
        for name in reference:
            assert torch.equal(reference[name], same[name]), name
        assert any(not torch.equal(reference[n], different[n]) for n in reference if "norm" not in n)


def test_building_leaves_the_callers_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    assert torch.equal(torch.rand(3), expected)


def test_custom_sizes_are_honoured(tmp_path):
    out = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1,
                           intermediate_size=48, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = llama_parameter_count(vocab=360, hidden=32, layers=1, heads=4, kv_heads=1, intermediate=48,
                                     lm_head_rows=360)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.config.max_position_embeddings == 128


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30 is not divisible by num_heads=4"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_heads=4 is not divisible by num_kv_heads=3"),
    ],
)
def test_bad_sizes_are_rejected_by_name(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tmp_path / "bad", **kwargs)


def test_cli_builds_a_loadable_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "tools" / "make_tiny_model.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "cli"), "--hidden-size", "32", "--num-layers", "1", "--seed", "5"]) == 0
    assert str(tmp_path / "cli" / "reward") in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "cli" / "reward").config.num_labels == 1
