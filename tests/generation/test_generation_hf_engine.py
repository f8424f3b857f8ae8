"""The hf backend against Hugging Face `generate` and a teacher-forced forward pass of the same model."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.generation import GenerationEngine, GenerationError, HFEngine, SamplingParams, make_engine


def hf_greedy(model, prompts, max_new_tokens, eos, pad):
    """Reference: one left-padded batch through `model.generate(do_sample=False)`; rows cut after their eos."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def teacher_forced_log_probs(model, prompt, response, temperature):
    """log_softmax(logits / T) (plain when T == 0) at each response token, from one unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    scaled = logits if temperature == 0 else logits / temperature
    return torch.log_softmax(scaled, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_greedy_matches_hf_generate(make_model, prompts, tokenizer):
    model = make_model(0)
    engine = HFEngine(model, max_batch_size=3)  # 4 prompts: chunks of 3 and 1
    out = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    ref = hf_greedy(model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert [s[0].response_ids for s in out] == ref
    for samples, prompt in zip(out, prompts):
        assert len(samples) == 1 and samples[0].prompt_ids == prompt
        expected = "stop" if samples[0].response_ids[-1] == tokenizer.eos_token_id else "length"
        assert samples[0].finish_reason == expected


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, -1, 1.0), (1.0, -1, 1.0), (0.7, 20, 0.9)])
def test_log_probs_equal_teacher_forced_forward(make_model, prompts, temperature, top_k, top_p):
    model = make_model(0)
    engine = HFEngine(model, max_batch_size=8)
    n = 1 if temperature == 0 else 2
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, n=n, seed=123)
    for prompt, samples in zip(prompts, engine.generate(prompts, params)):
        assert len(samples) == n
        for sample in samples:
            ref = teacher_forced_log_probs(model, prompt, sample.response_ids, temperature)
            assert torch.allclose(torch.tensor(sample.log_probs, dtype=torch.float64), ref, atol=1e-5)


def test_same_seed_same_samples_different_seed_different(make_model, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=3, seed=7)
    first = HFEngine(make_model(0), max_batch_size=5).generate(prompts, params)
    again = HFEngine(make_model(0), max_batch_size=5).generate(prompts, params)
    other = HFEngine(make_model(0), max_batch_size=5).generate(prompts, params.replace(seed=8))
    assert first == again  # dataclass equality: token ids and float log-probs bit for bit
    assert [[s.response_ids for s in row] for row in first] != [[s.response_ids for s in row] for row in other]
    # the n samples of one prompt are not copies of each other
    assert len({tuple(s.response_ids) for s in first[0]}) > 1


def test_a_call_without_log_probs_draws_the_same_tokens_and_reports_nan(make_model, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=5)
    engine = HFEngine(make_model(0), max_batch_size=8)
    with_log_probs = engine.generate(prompts, params)
    without = engine.generate(prompts, params.replace(log_probs=False))
    tokens = [[s.response_ids for s in row] for row in with_log_probs]
    assert [[s.response_ids for s in row] for row in without] == tokens
    for row in without:
        for sample in row:
            assert len(sample.log_probs) == len(sample.response_ids)
            assert all(math.isnan(x) for x in sample.log_probs)


def test_unseeded_calls_differ_but_engines_repeat(make_model, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    a, b = HFEngine(make_model(0), seed=3), HFEngine(make_model(0), seed=3)
    first, second = a.generate(prompts, params), a.generate(prompts, params)
    assert first != second
    assert b.generate(prompts, params) == first


def test_stop_tokens_end_rows_and_can_be_left_out(make_model, prompts):
    model = make_model(0)
    engine = HFEngine(model)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    free = engine.generate(prompts[:1], greedy)[0][0].response_ids
    stop = free[3]
    cut = free.index(stop) + 1
    kept = engine.generate(prompts[:1], greedy.replace(stop_token_ids=[stop]))[0][0]
    assert kept.response_ids == free[:cut] and kept.finish_reason == "stop" and len(kept.log_probs) == cut
    dropped = engine.generate(prompts[:1], greedy.replace(stop_token_ids=[stop], include_stop_token=False))[0][0]
    assert dropped.response_ids == free[:cut - 1] and dropped.log_probs == kept.log_probs[:-1]
    assert dropped.finish_reason == "stop"


def test_max_model_len_caps_each_row(make_model, prompts):
    engine = HFEngine(make_model(0), max_model_len=20, max_batch_size=2)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=50, temperature=1.0, seed=1, ignore_eos=True))
    for prompt, samples in zip(prompts, out):
        assert len(prompt) + len(samples[0].response_ids) == 20 and samples[0].finish_reason == "length"
    with pytest.raises(GenerationError, match="prompt row 2 has 20 tokens"):
        engine.generate([[5], [6], list(range(3, 23))], SamplingParams(max_new_tokens=4))


def test_load_weights_switches_to_the_other_model(make_model, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    target = HFEngine(make_model(1)).generate(prompts, params)
    engine = HFEngine(make_model(0))
    before = engine.generate(prompts, params)
    assert before != target
    source = make_model(1)
    applied = engine.load_weights(source.named_parameters())
    assert applied == len(list(source.named_parameters()))
    assert engine.generate(prompts, params) == target


def test_load_weights_names_unknown_and_misshapen_weights_after_consuming_everything(make_model):
    engine = HFEngine(make_model(0))
    seen = []

    def stream():
        for item in [("model.norm.weight", torch.ones(64)), ("model.not_a_layer.weight", torch.ones(3)),
                     ("lm_head.weight", torch.ones(2, 2)), ("model.embed_tokens.weight", torch.zeros(360, 64))]:
            seen.append(item[0])
            yield item

    with pytest.raises(GenerationError) as info:
        engine.load_weights(stream())
    assert "'model.not_a_layer.weight'" in str(info.value) and "'lm_head.weight' has shape (2, 2)" in str(info.value)
    assert len(seen) == 4  # a broadcast stream is never left half-read
    assert torch.count_nonzero(engine.model.model.embed_tokens.weight) == 0  # valid entries were applied


def test_sleep_refuses_generation_until_woken(make_model, prompts):
    engine = HFEngine(make_model(0))
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    expected = engine.generate(prompts, params)
    engine.sleep()
    assert engine.asleep
    with pytest.raises(GenerationError, match="asleep"):
        engine.generate(prompts, params)
    engine.load_weights(make_model(0).named_parameters())  # weight updates are allowed while asleep
    engine.wake_up()
    assert engine.generate(prompts, params) == expected
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(level=3)
    engine.close()
    with pytest.raises(GenerationError, match="closed"):
        engine.generate(prompts, params)


def test_bad_prompts_are_named(make_model):
    engine = HFEngine(make_model(0))
    with pytest.raises(GenerationError, match="prompt 1 has no tokens"):
        engine.generate([[5], []], SamplingParams())
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        engine.generate([[5, 100000]], SamplingParams())


def test_make_engine_loads_a_model_folder(model_dirs, make_model, prompts):
    engine = make_engine("hf", str(model_dirs[0]), dtype="float32", device="cpu", micro_batch_size=2,
                         max_model_len=64, seed=0)
    assert isinstance(engine, HFEngine) and isinstance(engine, GenerationEngine) and engine.max_batch_size == 2 and engine.max_model_len == 64
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    got, ref = engine.generate(prompts, params), HFEngine(make_model(0)).generate(prompts, params)
    assert [s[0].response_ids for s in got] == [s[0].response_ids for s in ref]
    for a, b in zip(got, ref):  # other batch shapes, so equal only up to float rounding
        assert a[0].log_probs == pytest.approx(b[0].log_probs, abs=1e-5)
    with pytest.raises(ValueError, match="no tensor parallelism"):
        make_engine("hf", str(model_dirs[0]), tp=2)
    with pytest.raises(ValueError, match="vllm.backend must be one of"):
        make_engine("sglang", str(model_dirs[0]))
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_engine("hf", str(model_dirs[0]), dtype="int8")
