"""FLOP and byte arithmetic against values worked out by hand for a tiny shape and for Qwen2.5-0.5B."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.benchmarks.flops import (
    decode_limit_tokens_per_s,
    decode_step_bytes,
    forward_flops,
    forward_flops_per_token,
    mfu,
    model_bytes,
    policy_update_flops,
    prefill_flops,
    train_flops,
    weight_sync_limit_s,
)
from hpc_rlhf.benchmarks.task import ModelShape, model_shape

# vocab 10, hidden 4, intermediate 8, 1 layer, 2 heads of dim 2, 1 kv head (width 2).
# Matmul weights: q 4*4=16, o 16, k 4*2=8, v 8, gate/up/down 3*4*8=96 -> 144 per layer; lm_head 10*4=40.
# Forward per token: 2*(144+40)=368, plus attention 4*1 layer*2 heads*2 dims*T = 16*T.
# Parameters: layer 144 + two norms 8 = 152, final norm 4 -> 156 non-embedding; tied 156+40=196, untied 236.
TIED = ModelShape(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=True)
UNTIED = ModelShape(10, 4, 8, 1, 2, 1, False)


def test_forward_flops_per_token_by_hand():
    assert forward_flops_per_token(TIED, 0) == 368
    assert forward_flops_per_token(TIED, 5) == 368 + 80
    assert forward_flops_per_token(UNTIED, 5) == 448  # tying does not remove the lm_head matmul


def test_forward_and_train_flops_by_hand():
    # Length 3: contexts 1, 2, 3 -> 3*368 + 16*(1+2+3) = 1104 + 96 = 1200; length 1: 368 + 16 = 384.
    assert forward_flops(TIED, [3]) == 1200
    assert forward_flops(TIED, [3, 1]) == 1584
    assert forward_flops(TIED, []) == 0
    assert train_flops(TIED, [3]) == 3600
    assert train_flops(TIED, [3, 1]) == 4752
    # A critic has no vocabulary head: 3 * (368 - 80) + 96 = 960.
    assert forward_flops(TIED, [3], vocab_head=False) == 960
    assert train_flops(TIED, [3], vocab_head=False) == 2880


def test_policy_update_flops_count_the_head_at_response_positions_only():
    # Prompt 2 + response 1 = length 3: 2880 without the head (above), plus the head once: 3 * 80 = 240.
    assert policy_update_flops(TIED, [2], [1]) == 2880 + 240
    # A whole-sequence response (prompt 1 is never predicted from): 3 tokens, head at 2 of them -> 2880 + 480.
    assert policy_update_flops(TIED, [1], [2]) == 2880 + 480
    assert policy_update_flops(TIED, [2, 0], [1, 1]) == 2880 + 240 + 3 * (368 - 80 + 16) + 240
    with pytest.raises(ValueError, match="one response length per prompt"):
        policy_update_flops(TIED, [2], [1, 1])


def test_prefill_flops_by_hand():
    # Per prompt of 3: layers 3*2*144 = 864, attention 96, lm_head once 2*40 = 80 -> 1040; two prompts 2080.
    assert prefill_flops(TIED, batch=2, prompt_len=3) == 2080


def test_decode_step_bytes_by_hand():
    # Weights: 156 non-embedding + 40 lm_head + 2 looked-up rows * 4 = 204 params * 2 bytes = 408.
    # KV cache per sequence: 2 (k, v) * 1 layer * 1 kv head * 2 dims * 5 positions * 2 bytes = 40; two sequences 80.
    assert decode_step_bytes(TIED, batch=2, context_len=5) == 488
    assert decode_step_bytes(UNTIED, batch=2, context_len=5) == 488  # the input embedding is only gathered
    # fp32 weights, fp8 KV: 204 * 4 + 2 * (2*1*1*2*5*1) = 816 + 40.
    assert decode_step_bytes(TIED, 2, 5, weight_bytes=4, kv_bytes=1) == 856
    # Batch 50 looks up at most all 10 rows: (156 + 40 + 40) * 2 = 472, KV 50 * 40 = 2000.
    assert decode_step_bytes(TIED, 50, 5) == 2472


def test_decode_limit_memory_bound_by_hand():
    # Batch 2, prompt 3, 3 new tokens; 100 B/s and 1000 FLOP/s.
    # Prefill: 2080 FLOPs -> 2.08 s (yields token 1).
    # Step at context 4: bytes 408 + 2*32 = 472 -> 4.72 s; FLOPs 2*(368+64) = 864 -> 0.864 s.
    # Step at context 5: bytes 488 -> 4.88 s; FLOPs 2*448 = 896 -> 0.896 s.
    # 6 tokens / (2.08 + 4.72 + 4.88) s.
    rate = decode_limit_tokens_per_s(TIED, batch=2, prompt_len=3, gen_len=3, bandwidth=100.0, peak_flops=1000.0)
    assert rate == pytest.approx(6 / 11.68)


def test_decode_limit_compute_bound_by_hand():
    # Same, 1000 B/s and 100 FLOP/s: prefill 20.8 s, steps max(0.472, 8.64) and max(0.488, 8.96) -> 38.4 s.
    rate = decode_limit_tokens_per_s(TIED, batch=2, prompt_len=3, gen_len=3, bandwidth=1000.0, peak_flops=100.0)
    assert rate == pytest.approx(6 / 38.4)
    # One new token is the prefill alone: 2 tokens / 20.8 s.
    assert decode_limit_tokens_per_s(TIED, 2, 3, 1, 1000.0, 100.0) == pytest.approx(2 / 20.8)


def test_qwen_05b_parameters_and_bytes():
    shape = model_shape("qwen2.5-0.5b")
    # Published 494,032,768 parameters include 24 * (896 + 128 + 128) = 27,648 q/k/v biases the benchmark model lacks.
    assert model_bytes(shape) == 2 * (494_032_768 - 27_648)
    # One decode step at batch 1, empty cache: every weight in bf16 plus one embedding row.
    assert decode_step_bytes(shape, 1, 0) == 2 * (494_032_768 - 27_648 + 896)


def test_qwen_05b_six_n_close_to_train_flops_at_short_context():
    shape = model_shape("qwen2.5-0.5b")
    lengths = [128] * 8
    six_n = 6 * shape.parameter_count() * sum(lengths)
    assert train_flops(shape, lengths) == pytest.approx(six_n, rel=0.02)
    assert train_flops(shape, lengths) > six_n * 0.999  # attention adds, it never subtracts
    # At 32k tokens attention is no longer small: the 6N rule undercounts by more than 10%.
    assert train_flops(shape, [32768]) > 1.1 * 6 * shape.parameter_count() * 32768


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=6), st.lists(st.integers(0, 300), max_size=6))
def test_flops_add_over_sequences_and_match_per_position_sum(first, second):
    assert train_flops(TIED, first + second) == train_flops(TIED, first) + train_flops(TIED, second)
    per_position = sum(forward_flops_per_token(TIED, t) for n in first for t in range(1, n + 1))
    assert forward_flops(TIED, first) == per_position


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64), st.floats(1e3, 1e12), st.floats(1e3, 1e12))
def test_decode_limit_never_beats_either_roof(batch, prompt_len, gen_len, bandwidth, peak):
    rate = decode_limit_tokens_per_s(TIED, batch, prompt_len, gen_len, bandwidth, peak)
    tokens = batch * gen_len
    all_flops = prefill_flops(TIED, batch, prompt_len) + sum(
        batch * forward_flops_per_token(TIED, prompt_len + i) for i in range(1, gen_len))
    assert rate <= tokens / (all_flops / peak) * (1 + 1e-9)
    assert rate <= decode_limit_tokens_per_s(TIED, batch, prompt_len, gen_len, bandwidth * 2, peak) * (1 + 1e-9)


def test_mfu_and_weight_sync():
    assert mfu(400e12, 2.0, 800e12) == pytest.approx(0.25)
    assert weight_sync_limit_s(3e9, 1.5e9) == pytest.approx(2.0)
    assert weight_sync_limit_s(0, 1.0) == 0.0


@pytest.mark.parametrize("call, field", [
    (lambda: mfu(1.0, 0.0, 1.0), "seconds"),
    (lambda: mfu(1.0, 1.0, float("nan")), "peak_flops"),
    (lambda: weight_sync_limit_s(1.0, -1.0), "bandwidth"),
    (lambda: forward_flops(TIED, [3, -1]), "sequence_lengths\\[1\\]"),
    (lambda: decode_step_bytes(TIED, 0, 5), "batch"),
    (lambda: decode_limit_tokens_per_s(TIED, 1, 1, 0, 1.0, 1.0), "gen_len"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()
