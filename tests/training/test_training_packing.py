"""Packed and padded micro-batches give the same per-token log-probs / values as one-sample forwards."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.training.batching import make_micro_batches
from hpc_rlhf.training.models import TokenValueModel
from hpc_rlhf.training.forwards import causal_lm_log_probs

CPU = torch.device("cpu")


def single_sample_log_probs(model, sample, temperature):
    """float64 log-softmax of a one-sample forward, read at the response tokens."""
    device = next(model.parameters()).device
    sequence = torch.cat([sample.prompt_ids, sample.response_ids]).unsqueeze(0).to(device)
    with torch.no_grad():
        logits = model(input_ids=sequence).logits[0].double() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    start = sample.prompt_ids.numel()
    positions = torch.arange(start, sequence.shape[1], device=device)
    return log_p[positions - 1, sequence[0, positions]].cpu()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "varlen"])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("logits_to_keep", [True, False])
def test_log_probs_equal_single_sample_forwards(worker, attn_implementation, packing, logits_to_keep):
    model = worker.tiny_llama(0, attn_implementation=attn_implementation).eval()
    samples = worker.make_samples(5, 6)
    batches = make_micro_batches(samples, max_tokens_per_microbatch=40, packing=packing)
    assert any(b.num_samples > 1 for b in batches), "the test needs micro-batches holding several samples"
    for batch in batches:
        with torch.no_grad():
            output = causal_lm_log_probs(model, batch, CPU, temperature=0.7,
                                         supports_logits_to_keep=logits_to_keep)
        for row, index in enumerate(batch.sample_indices.tolist()):
            want = single_sample_log_probs(model, samples[index], temperature=0.7)
            got = output.log_probs[row, : want.numel()]
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
            assert torch.all(output.log_probs[row, want.numel():] == 0)


def test_entropy_of_packed_batch_matches_single_sample_forward(worker):
    model = worker.tiny_llama(0).eval()
    samples = worker.make_samples(6, 3)
    (batch,) = make_micro_batches(samples, micro_batch_size=3, packing=True)
    with torch.no_grad():
        output = causal_lm_log_probs(model, batch, CPU, with_entropy=True)
    for row, sample in enumerate(samples):
        sequence = torch.cat([sample.prompt_ids, sample.response_ids]).unsqueeze(0)
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=sequence).logits[0].double(), dim=-1)
        start, n = sample.prompt_ids.numel(), sample.response_ids.numel()
        want = -(log_p.exp() * log_p).sum(-1)[start - 1: start - 1 + n]
        torch.testing.assert_close(output.entropy[row, :n].double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packing", [True, False])
def test_critic_values_equal_single_sample_forwards(worker, packing):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = worker.tiny_llama(0).config
    config.num_labels = 1
    value_model = TokenValueModel(LlamaForSequenceClassification(config)).eval()
    samples = worker.make_samples(9, 5)
    (batch,) = make_micro_batches(samples, micro_batch_size=5, packing=packing)
    with torch.no_grad():
        values = value_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids)
        for row, sample in enumerate(samples):
            sequence = torch.cat([sample.prompt_ids, sample.response_ids]).unsqueeze(0)
            alone = value_model(input_ids=sequence, attention_mask=None,
                                position_ids=torch.arange(sequence.shape[1]).unsqueeze(0))[0]
            start, n = sample.prompt_ids.numel(), sample.response_ids.numel()
            in_row = batch.response_rows[row]
            first = batch.response_starts[row] - 1
            torch.testing.assert_close(values[in_row, first: first + n], alone[start - 1: start - 1 + n],
                                       atol=1e-5, rtol=0)


def test_value_model_needs_a_single_label_head(worker):
    from transformers import LlamaForSequenceClassification

    config = worker.tiny_llama(0).config
    config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1, got num_labels=2"):
        TokenValueModel(LlamaForSequenceClassification(config))


def test_plain_reference_gives_the_actor_log_probs_at_its_temperature(worker):
    from hpc_rlhf.training import EngineConfig, Reference

    model = worker.tiny_llama(0)
    reference = Reference(worker.tiny_llama(0), EngineConfig(zero_stage=0), None, temperature=0.6)
    assert all(not p.requires_grad for p in reference.model.parameters())
    samples = worker.make_samples(31, 4)
    batches = make_micro_batches(samples, micro_batch_size=3, packing=True)
    model = model.to(reference.device).eval()  # on a GPU machine the Reference runs on CUDA: compare there
    for batch, output in zip(batches, reference.infer(batches)):
        for row, index in enumerate(batch.sample_indices.tolist()):
            want = single_sample_log_probs(model, samples[index], temperature=0.6)
            got = output.log_probs[row, : want.numel()].double().cpu()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
