"""actor.optim / critic.optim = muon: DeepSpeed's Muon on 2-D hidden weights, AdamW on the rest."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.training.deepspeed_setup import EngineConfig, muon_optimizer_config, uses_muon
from tests.multiproc import run_ranks
from tests.training import ema_muon_worker


def test_uses_muon_takes_hidden_matrices_only():
    assert uses_muon("model.layers.0.self_attn.q_proj.weight", (64, 64))
    assert uses_muon("model.layers.1.mlp.down_proj.weight", (64, 128))
    assert not uses_muon("model.embed_tokens.weight", (128, 64))
    assert not uses_muon("lm_head.weight", (128, 64))
    assert not uses_muon("score.weight", (1, 64))  # a critic's / reward model's value head
    assert not uses_muon("model.v_head.weight", (1, 64))
    assert not uses_muon("model.layers.0.input_layernorm.weight", (64,))
    assert not uses_muon("model.layers.0.self_attn.q_proj.bias", (64,))


def test_muon_config_splits_learning_rates():
    cfg = EngineConfig(optim="muon", learning_rate=1e-6, muon_lr=0.02, muon_momentum=0.9, adam_betas=(0.9, 0.99))
    section = muon_optimizer_config(cfg)
    assert section["type"] == "Muon"
    assert section["params"]["muon_lr"] == 0.02 and section["params"]["adam_lr"] == 1e-6
    assert section["params"]["momentum"] == 0.9 and section["params"]["betas"] == [0.9, 0.99]
    with pytest.raises(ValueError, match="optim"):
        EngineConfig(optim="sgd")


def test_one_muon_step_is_the_orthogonalized_momentum():
    """ZeRO-0 (the gradient stays in param.grad): a hidden matrix moves by -muon_lr * muon_update(grad) with a zero
    momentum buffer (DeepSpeed's own formula), a norm weight and the embeddings by AdamW's first step
    -lr * g / (|g| + eps); and the loss of a batch trained on goes down."""
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    result = run_ranks(ema_muon_worker.run_muon, 1, 0, 4, timeout_s=420)[0]
    groups = {g["use_muon"]: g for g in result["groups"]}
    hidden = "model.layers.0.self_attn.q_proj.weight"
    assert hidden in groups[True]["names"] and groups[True]["lr"] == 0.02
    adam_names = [n for g in result["groups"] if not g["use_muon"] for n in g["names"]]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(adam_names)
    assert all(result["use_muon"][n] == uses_muon(n, tuple(result["before"][n].shape)) for n in result["before"])

    for name in (hidden, "model.layers.1.mlp.down_proj.weight"):
        grad = result["grads"][name].clone()
        expected = -0.02 * muon_update(grad, torch.zeros_like(grad), beta=0.95, ns_method=result["ns_method"])
        torch.testing.assert_close(result["after"][name] - result["before"][name], expected, rtol=1e-4, atol=1e-6)
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        grad = result["grads"][name]
        expected = -1e-3 * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(result["after"][name] - result["before"][name], expected, rtol=1e-4, atol=1e-7)
    losses = result["losses"]
    assert losses[-1] < losses[0], losses


def test_muon_runs_under_zero2():
    result = run_ranks(ema_muon_worker.run_muon, 1, 2, 3, timeout_s=420)[0]
    assert result["use_muon"]["model.layers.0.mlp.up_proj.weight"] is True
    assert result["use_muon"]["lm_head.weight"] is False
    moved = result["after"]["model.layers.0.mlp.up_proj.weight"] - result["before"]["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 0
    assert result["losses"][-1] < result["losses"][0], result["losses"]
