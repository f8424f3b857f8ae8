"""Chunked fp32 log-probs and entropy (hand-written backward) against a float64 reference, values and gradients."""

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
        token_log_probs(torch.zeros(2, 3, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per row"):
        token_log_probs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_log_probs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)


@settings(max_examples=30, deadline=None)
@given(total_rows=st.integers(1, 30), vocab=st.integers(2, 40), chunk=st.integers(1, 16),
       temperature=st.sampled_from([0.6, 1.0]), with_entropy=st.booleans(), seed=st.integers(0, 10_000))
def test_picked_rows_match_the_gathered_reference_in_values_and_gradients(total_rows, vocab, chunk, temperature,
                                                                          with_entropy, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(total_rows, vocab, generator=generator) * 3).requires_grad_(True)
    picked = torch.randperm(total_rows, generator=generator)[:torch.randint(1, total_rows + 1, (1,),
                                                                             generator=generator).item()]
    labels = torch.randint(0, vocab, (picked.numel(),), generator=generator)
    weights = torch.randn(picked.numel(), generator=generator)
    log_probs, entropy = token_log_probs(logits, labels, rows=picked, temperature=temperature,
                                         with_entropy=with_entropy, chunk_size=chunk)
    loss = (log_probs * weights).sum() + (0.3 * entropy.sum() if with_entropy else 0.0)
    loss.backward()

    logits64 = logits.detach().double().requires_grad_(True)
    want_log_probs, want_entropy = reference(logits64[picked], labels, temperature)
    want_loss = (want_log_probs * weights.double()).sum() + (0.3 * want_entropy.sum() if with_entropy else 0.0)
    want_loss.backward()
    torch.testing.assert_close(log_probs.double(), want_log_probs.detach(), atol=1e-5, rtol=1e-5)
    if with_entropy:
        torch.testing.assert_close(entropy.double(), want_entropy.detach(), atol=1e-5, rtol=1e-5)
    else:
        assert entropy is None
    # Rows that were not picked get exactly zero gradient; picked rows match float64 to float32 rounding, which for
    # logits up to ~25 after the temperature (3 sigma x 3 / 0.6) is a few 1e-6 (1.4e-6 seen at seed 7601).
    unpicked = torch.ones(total_rows, dtype=torch.bool)
    unpicked[picked] = False
    assert torch.count_nonzero(logits.grad[unpicked]) == 0
    torch.testing.assert_close(logits.grad.double(), logits64.grad, atol=1e-5, rtol=1e-5)


def test_hand_derived_gradient_of_a_uniform_row():
    # Uniform logits over V=4, label 2: d log p_2 / d x_j = [j = 2] - 1/4; entropy is at its maximum (gradient 0).
    logits = torch.zeros(1, 4, requires_grad=True)
    log_probs, entropy = token_log_probs(logits, torch.tensor([2]), with_entropy=True)
    (log_probs.sum() + entropy.sum()).backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, -0.25, 0.75, -0.25]]))


def test_bf16_logits_get_a_bf16_gradient_close_to_float64():
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 64, generator=generator) * 2).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 64, (6,), generator=generator)
    log_probs, _ = token_log_probs(logits, labels, chunk_size=4)
    log_probs.sum().backward()
    assert log_probs.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    logits64 = logits.detach().double().requires_grad_(True)
    want, _ = reference(logits64, labels, 1.0)
    want.sum().backward()
    torch.testing.assert_close(log_probs.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, atol=1e-2, rtol=1e-2)


def test_fp32_logits_are_left_unchanged():
    logits = torch.randn(5, 9)
    before = logits.clone()
    token_log_probs(logits, torch.zeros(5, dtype=torch.long), temperature=0.5, with_entropy=True, chunk_size=2)
    assert torch.equal(logits, before)


def test_rows_must_pair_with_labels():
    with pytest.raises(ValueError, match="must pair with labels"):
        token_log_probs(torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), rows=torch.tensor([0, 1, 2]))
