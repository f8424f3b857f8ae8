"""`attn_implementation: varlen`: packed rows attend sample by sample, with no dense mask, and give the log-probs and
gradients of padded SDPA forwards."""

from __future__ import annotations

import math

import pytest
import torch

import hpc_rlhf.training.varlen_attention as varlen
from hpc_rlhf.config.checks import check_attention
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.training.batching import make_micro_batches
from hpc_rlhf.training.forwards import causal_lm_log_probs, model_inputs

CPU = torch.device("cpu")


def test_sample_bounds_of_a_packed_row():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    kwargs = varlen.packed_attention_kwargs(positions, CPU)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4


@pytest.mark.parametrize("positions, message", [
    (torch.tensor([[0, 1], [0, 1]]), "one packed row"),
    (torch.tensor([[1, 2, 0, 1]]), "start with position 0"),
])
def test_sample_bounds_refuse_what_is_not_one_packed_row(positions, message):
    with pytest.raises(ValueError, match=message):
        varlen.packed_attention_kwargs(positions, CPU)


def test_only_packed_micro_batches_carry_sample_bounds(worker):
    samples = worker.make_samples(3, 4)
    (packed,) = make_micro_batches(samples, micro_batch_size=4, packing=True)
    (padded,) = make_micro_batches(samples, micro_batch_size=4, packing=False)
    lengths = [s.prompt_ids.numel() + s.response_ids.numel() for s in samples]
    bounds = model_inputs(packed, CPU)["cu_seq_lens_q"].tolist()
    assert [b - a for a, b in zip(bounds[:-1], bounds[1:])] == [lengths[i] for i in packed.sample_indices.tolist()]
    assert "cu_seq_lens_q" not in model_inputs(padded, CPU)


def test_packed_forward_runs_per_sample_attention_without_a_mask(worker, monkeypatch):
    calls = []

    def spy(q, k, v, cumulative, scale):
        calls.append(cumulative.tolist())
        return original(q, k, v, cumulative, scale)

    original = varlen.sample_by_sample
    monkeypatch.setattr(varlen, "sample_by_sample", spy)
    model = worker.tiny_llama(0, attn_implementation="varlen").eval()
    (batch,) = make_micro_batches(worker.make_samples(4, 3), micro_batch_size=3, packing=True)
    with torch.no_grad():
        causal_lm_log_probs(model, batch, CPU)
    assert len(calls) == model.config.num_hidden_layers
    assert varlen.varlen_mask(attention_mask=None) is None  # transformers builds no [T, T] mask for the row


def test_log_probs_and_gradients_equal_padded_sdpa(worker):
    samples = worker.make_samples(11, 6, max_len=20)

    def log_probs_and_grads(attn_implementation, packing):
        model = worker.tiny_llama(0, attn_implementation=attn_implementation)
        (batch,) = make_micro_batches(samples, micro_batch_size=6, packing=packing)
        output = causal_lm_log_probs(model, batch, CPU, with_entropy=True)
        order = torch.argsort(batch.sample_indices)
        log_probs = output.log_probs[order]
        (log_probs * torch.linspace(-1, 1, log_probs.shape[1])).sum().backward()
        return log_probs.detach(), {n: p.grad for n, p in model.named_parameters()}

    want, want_grads = log_probs_and_grads("sdpa", packing=False)
    got, got_grads = log_probs_and_grads("varlen", packing=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_rows_on_a_varlen_model_are_plain_sdpa(worker):
    samples = worker.make_samples(5, 4)
    (batch,) = make_micro_batches(samples, micro_batch_size=4, packing=False)
    with torch.no_grad():
        want = causal_lm_log_probs(worker.tiny_llama(0, attn_implementation="sdpa").eval(), batch, CPU).log_probs
        got = causal_lm_log_probs(worker.tiny_llama(0, attn_implementation="varlen").eval(), batch, CPU).log_probs
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_refuses_dropout_and_several_rows():
    query = torch.zeros(1, 2, 3, 4)
    bounds = {"cu_seq_lens_q": torch.tensor([0, 3], dtype=torch.int32), "max_length_q": 3}
    with pytest.raises(ValueError, match="no dropout"):
        varlen.varlen_attention(torch.nn.Module(), query, query, query, None, dropout=0.1, **bounds)
    with pytest.raises(ValueError, match="one packed row"):
        wide = torch.zeros(2, 2, 3, 4)
        varlen.varlen_attention(torch.nn.Module(), wide, wide, wide, None, **bounds)


def _older_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The PyTorch 2.9/2.10 signature: causality as `is_causal`, the scale fixed at 1/sqrt(D)."""
    assert is_causal and max_q == max_k
    return varlen.sample_by_sample(query, key, value, cu_seq_q, 1 / math.sqrt(query.shape[-1]))


def _newer_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1), enable_gqa=False):
    """The later signature: causality as `window_size=(-1, 0)`, a `scale` argument."""
    assert window_size == (-1, 0) and scale is not None
    return varlen.sample_by_sample(query, key, value, cu_seq_q, scale)


@pytest.mark.parametrize("kernel", [_older_varlen_attn, _newer_varlen_attn])
def test_flash_call_matches_the_reference_under_both_signatures(monkeypatch, kernel):
    """The kernel's arguments per PyTorch release (the kernels here are the CPU reference under each signature;
    the real one runs in the CUDA test below)."""
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", kernel)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, 8, generator=generator) for _ in range(3))
    bounds = torch.tensor([0, 4, 9], dtype=torch.int32)
    want = varlen.sample_by_sample(q, k, v, bounds, 0.2)
    got = varlen.flash_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), bounds, 5, 0.2)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=0)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        varlen.flash_varlen(q, k, v, bounds, 5, 0.2)


def test_config_needs_packed_rows(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("actor:\n  attn_implementation: varlen\n")
    with pytest.raises(ConfigError, match=r"actor.attn_implementation .*set train.packing_samples: true"):
        load_config(str(config))
    config.write_text("actor:\n  attn_implementation: varlen\ntrain:\n  packing_samples: true\n")
    loaded = load_config(str(config))
    assert check_attention(loaded.config, loaded.sources) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's variable-length kernel needs CUDA")
def test_cuda_kernel_matches_padded_sdpa_in_bf16(worker):
    device = torch.device("cuda")
    samples = worker.make_samples(21, 16, max_len=40)

    def log_probs_and_grads(attn_implementation, packing):
        model = worker.tiny_llama(0, attn_implementation=attn_implementation).to(device, torch.bfloat16)
        (batch,) = make_micro_batches(samples, micro_batch_size=16, packing=packing)
        output = causal_lm_log_probs(model, batch, device)
        log_probs = output.log_probs[torch.argsort(batch.sample_indices).to(device)]
        log_probs.sum().backward()
        return log_probs.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    want, want_grad = log_probs_and_grads("sdpa", packing=False)
    got, got_grad = log_probs_and_grads("varlen", packing=True)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=0)
    cosine = torch.nn.functional.cosine_similarity(got_grad, want_grad, dim=0)
    assert cosine > 0.999, f"gradient direction differs: cosine {cosine:.5f}"
