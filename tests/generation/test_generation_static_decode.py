"""Static-cache decoding (`static_decode`) against the hf backend's plain decode loop, on the CPU (eager steps).

The static path attends over the whole preallocated key length (masked beyond the written positions), so its logits
equal the plain loop's up to float rounding: tokens and finish reasons must be identical, log-probs within 2e-6.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from hpc_rlhf.generation import HFEngine, SamplingParams, make_engine
from hpc_rlhf.generation.static_decode import StaticDecoder, StaticDecodeUnsupported, left_pad, round_up

ATOL = 2e-6


def generate_both(model, prompts, params, **engine_kwargs):
    plain = HFEngine(model, static_decode=False, **engine_kwargs).generate(prompts, params)
    engine = HFEngine(model, static_decode=True, **engine_kwargs)
    static = engine.generate(prompts, params)
    assert engine.static_failure is None and engine._static.stats["eager_steps"] > 0
    return plain, static, engine


def assert_same(plain, static):
    assert len(plain) == len(static)
    for a_row, b_row in zip(plain, static):
        assert len(a_row) == len(b_row)
        for a, b in zip(a_row, b_row):
            assert (a.prompt_ids, a.response_ids, a.finish_reason) == (b.prompt_ids, b.response_ids, b.finish_reason)
            assert len(b.log_probs) == len(b.response_ids)
            assert b.log_probs == pytest.approx(a.log_probs, abs=ATOL, rel=0)


def test_round_up_and_left_pad():
    assert [round_up(v, 8) for v in (1, 8, 9, 256)] == [8, 8, 16, 256]
    ids, mask = left_pad([[5, 6, 7], [9]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=24, temperature=0.0),
    SamplingParams(max_new_tokens=24, temperature=1.0, n=3, seed=11),
    SamplingParams(max_new_tokens=24, temperature=0.7, top_k=20, top_p=0.9, n=2, seed=5),
], ids=["greedy", "sampled", "top-k-top-p"])
def test_static_path_equals_plain_loop(make_model, prompts, params):
    # max_model_len gives the rows different budgets (27 - prompt length); batches of 5 rows pad to 8
    plain, static, _ = generate_both(make_model(0), prompts, params, max_batch_size=5, max_model_len=27)
    assert_same(plain, static)
    lengths = {len(s.response_ids) for row in static for s in row if s.finish_reason == "length"}
    assert len(lengths) > 1  # budgets really differ per row


def test_eager_attention_takes_an_additive_mask(make_model, prompts):
    model = make_model(0)
    model.config._attn_implementation = "eager"
    params = SamplingParams(max_new_tokens=16, temperature=1.0, n=2, seed=2)
    plain, static, engine = generate_both(model, prompts, params)
    assert engine._static._mask_kind == "additive"
    assert_same(plain, static)


def test_stop_tokens_both_ways(make_model, prompts):
    model = make_model(0)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    free = HFEngine(model, static_decode=True).generate(prompts, greedy)
    stop = free[0][0].response_ids[4]
    for include in (True, False):
        params = greedy.replace(stop_token_ids=[stop], include_stop_token=include, temperature=1.0, n=2, seed=3)
        plain, static, _ = generate_both(model, prompts, params)
        assert_same(plain, static)
        assert any(s.finish_reason == "stop" for row in static for s in row)
        for row in static:
            for s in row:
                assert (stop in s.response_ids) == (include and s.finish_reason == "stop")


def test_padding_rows_and_reused_buffers_never_leak(make_model, prompts):
    model = make_model(0)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    engine = HFEngine(model, static_decode=True)
    big = engine.generate(prompts * 2, params)  # 8 rows: a full bucket with long garbage-free caches
    alone = [engine.generate([p], params)[0][0] for p in prompts]  # 1 real row + 7 padding rows, same bucket
    assert len(engine._static._slots) == 1  # every call reused the one (8 rows, 128 positions) slot
    assert [s.response_ids for s in alone] == [row[0].response_ids for row in big[:4]]
    assert [row[0].response_ids for row in big[:4]] == [row[0].response_ids for row in big[4:]]
    for sample, prompt in zip(alone, prompts):
        assert sample.prompt_ids == prompt and len(sample.log_probs) == len(sample.response_ids)
    assert_same(HFEngine(model, static_decode=False).generate(prompts, params), [[s] for s in alone])


def test_same_seed_repeats_bit_for_bit(make_model, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=9)
    first = HFEngine(make_model(0), static_decode=True).generate(prompts, params)
    engine = HFEngine(make_model(0), static_decode=True)
    engine.generate([[3, 4, 5, 6, 7, 8, 9, 10]], params)  # the buffers now hold another batch's state
    assert engine.generate(prompts, params) == first


def test_unsupported_model_warns_once_and_uses_the_plain_loop(tokenizer, prompts, caplog):
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer), sliding_window=8,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    with pytest.raises(StaticDecodeUnsupported, match="sliding"):
        StaticDecoder(model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=4)
    engine = HFEngine(model, static_decode=True)
    with caplog.at_level(logging.WARNING, logger="hpc_rlhf.generation.hf_engine"):
        got = engine.generate(prompts, params)
        again = engine.generate(prompts, params)
    warnings = [r for r in caplog.records if "static-cache decoding is off" in r.getMessage()]
    assert len(warnings) == 1 and "sliding" in warnings[0].getMessage()
    assert "sliding" in engine.static_failure
    expected = HFEngine(model, static_decode=False).generate(prompts, params)
    assert got == expected and again == expected


class FailsAtStepThree(StaticDecoder):
    """A decoder that breaks in the middle of a batch, after it has drawn random numbers."""

    def _run_step(self, slot):
        if self.stats["eager_steps"] == 3:
            raise RuntimeError("injected failure at decode step 3")
        return super()._run_step(slot)


def test_failure_mid_batch_restarts_the_batch_on_the_plain_loop(make_model, prompts, caplog):
    model = make_model(0)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=21)
    engine = HFEngine(model, static_decode=True)
    engine._static = FailsAtStepThree(model, pad_token_id=engine.pad_token_id)
    with caplog.at_level(logging.WARNING, logger="hpc_rlhf.generation.hf_engine"):
        got = engine.generate(prompts, params)
    assert engine.static_failure == "RuntimeError: injected failure at decode step 3"
    assert sum("injected failure" in r.getMessage() for r in caplog.records) == 1
    # the random stream was rewound: exactly what the plain loop draws from the start
    assert got == HFEngine(model, static_decode=False).generate(prompts, params)


def test_defaults_and_the_factory_flag(model_dirs, make_model, prompts):
    engine = HFEngine(make_model(0))
    assert engine.static_decode is False and engine.cuda_graphs is True  # CPU: the plain loop by default
    assert make_engine("hf", str(model_dirs[0]), enforce_eager=True).cuda_graphs is False
    assert make_engine("hf", str(model_dirs[0])).cuda_graphs is True
    decoder = StaticDecoder(make_model(0), pad_token_id=0, use_cuda_graphs=True)
    assert decoder.use_cuda_graphs is False  # never on a CPU model


def test_sleep_drops_static_buffers(make_model, prompts):
    engine = HFEngine(make_model(0), static_decode=True)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    expected = engine.generate(prompts, params)
    assert engine._static._slots
    engine.sleep()
    assert not engine._static._slots
    engine.wake_up()
    assert engine.generate(prompts, params) == expected
