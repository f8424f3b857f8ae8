"""Dynamic batching by token budget: the weighted micro-batch gradient equals the full-batch token-mean gradient."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.training.batching import loss_units, loss_weights, make_micro_batches
from hpc_rlhf.training.forwards import causal_lm_log_probs


def full_batch_reference_grads(worker, samples) -> dict[str, torch.Tensor]:
    """float64 gradient of the token mean of -A * log p over the trained tokens of all samples, sample by sample."""
    model = worker.tiny_llama(0).double()
    total, count = 0.0, 0
    for sample in samples:
        sequence = torch.cat([sample.prompt_ids, sample.response_ids]).unsqueeze(0)
        log_p = torch.log_softmax(model(input_ids=sequence).logits[0], dim=-1)
        start = sample.prompt_ids.numel()
        positions = torch.arange(start, sequence.shape[1])
        chosen = log_p[positions - 1, sequence[0, positions]]
        mask = sample.action_mask.double()
        total = total + (-sample.response_tensors["advantages"].double() * chosen * mask).sum()
        count += int(mask.sum())
    (total / count).backward()
    return {name: param.grad for name, param in model.named_parameters()}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        torch.testing.assert_close(got[name].double(), expected, atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("budget, packing", [(20, True), (26, False), (200, True)])
def test_weighted_micro_batches_give_the_full_batch_gradient(worker, budget, packing):
    samples = worker.make_samples(21, 7, max_len=9)
    batches = make_micro_batches(samples, max_tokens_per_microbatch=budget, packing=packing)
    assert (len(batches) > 1) == (budget < 200)
    model = worker.tiny_llama(0)
    global_tokens = sum(loss_units(b, "token") for b in batches)
    for batch, weight in zip(batches, loss_weights(batches, "token", global_units=global_tokens, dp_size=1)):
        loss, _ = worker.policy_loss(batch, causal_lm_log_probs(model, batch, torch.device("cpu")))
        (loss * weight).backward()
    got = {name: param.grad for name, param in model.named_parameters()}
    assert_grads_close(got, full_batch_reference_grads(worker, samples))


@pytest.mark.timeout(600)
def test_deepspeed_dynamic_batching_across_ranks_gives_the_full_batch_gradient(worker, subgroup_run):
    """ZeRO-0/1/2 over 2 ranks holding 3 and 6 samples, packed by token budget into 2 and 3 micro-batches."""
    _, results = subgroup_run
    assert [r["dyn_num_micro_batches"] for r in results] == [2, 3]
    all_samples = worker.make_samples(77, 3, max_len=10) + worker.make_samples(78, 6, max_len=10)
    want = full_batch_reference_grads(worker, all_samples)
    for result in results:
        for stage in (0, 1, 2):
            assert_grads_close(result["dyn_grads"][stage], want)
    # The reported loss is the group's token mean: the same on both ranks and for every stage.
    losses = [r["dyn_metrics"][stage]["loss"] for r in results for stage in (0, 1, 2)]
    assert losses == pytest.approx([losses[0]] * len(losses))
