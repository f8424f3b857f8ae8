"""Chunked fp32 log-probs and entropy against a float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.training.logprobs import token_log_probs


def reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    chosen = log_p.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return chosen, entropy


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), vocab=st.integers(2, 50), chunk=st.integers(1, 64),
       temperature=st.sampled_from([0.5, 1.0, 1.7]), seed=st.integers(0, 10_000))
def test_values_match_float64_reference(rows, vocab, chunk, temperature, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 4
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    log_probs, entropy = token_log_probs(logits, labels, temperature=temperature, with_entropy=True,
                                         chunk_size=chunk)
    want_log_probs, want_entropy = reference(logits, labels, temperature)
    assert log_probs.dtype == torch.float32 and log_probs.shape == (rows,)
    torch.testing.assert_close(log_probs.double(), want_log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-5, rtol=1e-5)


def test_hand_derived_uniform_case():
    logits = torch.zeros(3, 4)
    log_probs, entropy = token_log_probs(logits, torch.tensor([0, 1, 3]), with_entropy=True)
    torch.testing.assert_close(log_probs, torch.full((3,), -torch.log(torch.tensor(4.0)).item()))
    torch.testing.assert_close(entropy, torch.full((3,), torch.log(torch.tensor(4.0)).item()))


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_gradients_through_recomputed_chunks_match_float64(chunk):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (7,), generator=generator)
    weights = torch.randn(7, generator=generator)
    log_probs, entropy = token_log_probs(logits, labels, temperature=0.8, with_entropy=True, chunk_size=chunk)
    ((log_probs * weights).sum() + 0.1 * entropy.sum()).backward()

    logits64 = logits.detach().double().requires_grad_(True)
    want_log_probs, want_entropy = reference(logits64, labels, 0.8)
    ((want_log_probs * weights.double()).sum() + 0.1 * want_entropy.sum()).backward()
    torch.testing.assert_close(logits.grad.double(), logits64.grad, atol=1e-6, rtol=1e-5)


def test_bad_shapes_and_temperature_are_rejected():
    with pytest.raises(ValueError, match="need logits"):
        token_log_probs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_log_probs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
