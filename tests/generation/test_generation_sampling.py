"""Sampling math and the SamplingParams contract, against float64 references written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hpc_rlhf.generation.engine import GeneratedSample, GenerationError, SamplingParams, check_prompts, sample_seed
from hpc_rlhf.generation.sampling import behaviour_log_probs, filter_top_k_top_p, sample_next_tokens


def reference_keep_set(logits: list[float], top_k: int, top_p: float) -> set[int]:
    """Indices kept by top-k then top-p, computed in float64 by sorting (ties broken by index)."""
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if 0 < top_k < len(logits):
        order = order[:top_k]
    if top_p < 1.0:
        weights = [math.exp(logits[i] - logits[order[0]]) for i in order]
        total = sum(weights)
        kept, mass = [], 0.0
        for i, w in zip(order, weights):
            if mass >= top_p:
                break
            kept.append(i)
            mass += w / total
        order = kept
    return set(order)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-5, 5), min_size=2, max_size=12, unique=True),
       top_k=st.integers(-1, 12), top_p=st.floats(0.05, 1.0))
def test_filter_keeps_exactly_the_reference_set(values, top_k, top_p):
    # Keep distinct logits well apart so float32 cumulative sums decide like the float64 reference.
    logits = [round(v, 1) * 3 for v in values]
    assume(len(set(logits)) == len(logits))
    filtered = filter_top_k_top_p(torch.tensor([logits], dtype=torch.float32), top_k, top_p)[0]
    kept = {i for i in range(len(logits)) if math.isfinite(filtered[i].item())}
    ref = reference_keep_set(logits, top_k, top_p)
    boundary = _near_boundary(logits, top_k, top_p)
    if not boundary:
        assert kept == ref
    assert max(range(len(logits)), key=lambda i: logits[i]) in kept  # the best token always survives
    for i in kept:
        assert filtered[i].item() == pytest.approx(logits[i])


def _near_boundary(logits: list[float], top_k: int, top_p: float) -> bool:
    """True when a cumulative mass lies within float32 noise of top_p (the reference may then differ)."""
    order = sorted(logits, reverse=True)
    if 0 < top_k < len(order):
        order = order[:top_k]
    weights = [math.exp(v - order[0]) for v in order]
    total, mass = sum(weights), 0.0
    for w in weights:
        mass += w / total
        if abs(mass - top_p) < 1e-5:
            return True
    return False


def test_log_probs_follow_the_convention():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ref = torch.log_softmax(logits.double() / 0.5, dim=-1)
    assert torch.allclose(behaviour_log_probs(logits, 0.5).double(), ref, atol=1e-6)
    assert torch.allclose(behaviour_log_probs(logits, 0.0).double(), torch.log_softmax(logits.double(), -1),
                          atol=1e-6)


def test_sampled_log_prob_is_taken_before_truncation():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(64, 1)
    tokens, lps = sample_next_tokens(logits, temperature=0.7, top_k=2, top_p=1.0,
                                     generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) <= {0, 1}
    full = torch.log_softmax(logits[0].double() / 0.7, dim=-1)
    for token, lp in zip(tokens.tolist(), lps.tolist()):
        assert lp == pytest.approx(full[token].item(), abs=1e-6)


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 5.0, 0.2], [3.0, -1.0, 2.9]])
    tokens, lps = sample_next_tokens(logits, temperature=0.0, top_k=-1, top_p=1.0, generator=None)
    assert tokens.tolist() == [1, 0]
    assert lps.tolist() == pytest.approx(torch.log_softmax(logits.double(), -1)[[0, 1], [1, 0]].tolist(), abs=1e-6)


def test_suppressed_tokens_are_never_chosen_and_log_probs_keep_the_whole_distribution():
    logits = torch.tensor([[0.0, 4.0, 3.0, -1.0]]).repeat(2000, 1)  # token 1 holds ~70% of the mass
    full = torch.log_softmax(logits[0].double(), dim=-1)
    greedy, greedy_lps = sample_next_tokens(logits[:1], temperature=0.0, top_k=-1, top_p=1.0, generator=None,
                                            suppressed=(1,))
    assert greedy.tolist() == [2] and greedy_lps.item() == pytest.approx(full[2].item(), abs=1e-6)
    tokens, lps = sample_next_tokens(logits, temperature=1.0, top_k=-1, top_p=1.0,
                                     generator=torch.Generator().manual_seed(0), suppressed=(1,))
    assert 1 not in tokens.tolist() and set(tokens.tolist()) >= {0, 2}
    assert lps.double().tolist() == pytest.approx([full[t].item() for t in tokens.tolist()], abs=1e-6)


def test_sample_frequencies_match_the_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    rows = 20000
    tokens, _ = sample_next_tokens(logits.repeat(rows, 1), temperature=1.3, top_k=-1, top_p=1.0,
                                   generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=4).double() / rows
    probs = torch.softmax(logits.double() / 1.3, dim=-1)
    # 5 standard errors of a binomial proportion
    assert torch.all((freq - probs).abs() < 5 * torch.sqrt(probs * (1 - probs) / rows))


def test_same_generator_seed_same_tokens():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(3))

    def draw(seed):
        return sample_next_tokens(logits, temperature=1.0, top_k=10, top_p=0.9,
                                  generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens"), ("temperature", -0.1, "temperature"), ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"), ("n", 0, "n must"), ("stop_token_ids", [-1], "stop_token_ids"),
    ("top_k", 2.5, "top_k"), ("seed", "x", "seed"),
])
def test_sampling_params_reject_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_sampling_params_replace_names_unknown_fields_and_is_hashable():
    params = SamplingParams(stop_token_ids=[2, 5])
    assert params.stop_token_ids == (2, 5)
    assert params.replace(temperature=0.0).greedy and not params.greedy
    assert hash(params) == hash(SamplingParams(stop_token_ids=(2, 5)))
    assert SamplingParams(top_k=5).truncates and not SamplingParams(top_k=5, temperature=0.0).truncates
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['temprature'\]"):
        params.replace(temprature=0.5)


def test_generated_sample_checks_lengths_and_reason():
    with pytest.raises(GenerationError, match="2 response tokens but 1 log-probs"):
        GeneratedSample(prompt_ids=[1], response_ids=[3, 4], log_probs=[0.0], finish_reason="stop")
    with pytest.raises(GenerationError, match="finish_reason"):
        GeneratedSample(prompt_ids=[1], response_ids=[], log_probs=[], finish_reason="abort")


def test_check_prompts_names_the_bad_row():
    assert check_prompts([(1, 2), [3]]) == [[1, 2], [3]]
    with pytest.raises(GenerationError, match="prompt 1 has no tokens"):
        check_prompts([[1], []])
    with pytest.raises(GenerationError, match="prompt 0 is text"):
        check_prompts(["hello"])
    with pytest.raises(GenerationError, match="prompt 1 holds token id 99"):
        check_prompts([[1], [2, 99]], vocab_size=50)
    with pytest.raises(GenerationError, match="token ids, not text"):
        check_prompts("hello")


def test_sample_seeds_are_distinct_per_prompt_and_sample():
    seeds = {sample_seed(11, p, s, 4) for p in range(8) for s in range(4)}
    assert len(seeds) == 32
    assert sample_seed(None, 0, 0, 4) is None
