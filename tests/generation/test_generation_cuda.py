"""The hf backend and the process-hosted engine on a GPU (skipped without CUDA): device placement of the decode loop,
seeded sampling with a CUDA generator, sleep/wake memory, and weights handed to a child process as CUDA IPC handles
(the path a disaggregated vllm generator and `vllm.child_process` take), and decoding with CUDA graphs over a static
KV cache."""

from __future__ import annotations

import logging

import pytest
import torch

from hpc_rlhf.generation import EngineSpec, HFEngine, ProcessHostedEngine, SamplingParams, make_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)


def test_cuda_greedy_matches_generate_and_log_probs_match_forward(make_model, prompts, tokenizer):
    model = make_model(0).to(CUDA)
    engine = HFEngine(model, max_batch_size=3)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    for prompt, (sample,) in zip(prompts, out):
        ids = torch.tensor([prompt], device=CUDA)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert sample.response_ids == ref[0, len(prompt):].tolist()[:len(sample.response_ids)]
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.8, n=2, seed=3))
    for prompt, samples in zip(prompts, sampled):
        for sample in samples:
            ids = torch.tensor([prompt + sample.response_ids], device=CUDA)
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1:-1].double() / 0.8
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids, device=CUDA)[:, None])
            assert torch.allclose(torch.tensor(sample.log_probs, dtype=torch.float64), ref.squeeze(-1).cpu(),
                                  atol=1e-4)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.8, n=2, seed=3)) == sampled


def test_cuda_sleep_frees_device_memory(make_model, prompts):
    engine = HFEngine(make_model(0).to(CUDA))
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    expected = engine.generate(prompts, params)
    before = torch.cuda.memory_allocated(CUDA)
    engine.sleep()
    assert next(engine.model.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated(CUDA) < before
    engine.wake_up()
    assert next(engine.model.parameters()).device == CUDA
    assert engine.generate(prompts, params) == expected


@pytest.mark.timeout(300)
def test_hosted_engine_takes_cuda_weights_through_ipc(model_dirs, make_model, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    target = HFEngine(make_model(1).to(CUDA)).generate(prompts, params)
    spec = EngineSpec(factory="hpc_rlhf.generation.factory:make_engine",
                      kwargs={"backend": "hf", "model_path": str(model_dirs[0]), "device": "cuda:0"})
    engine = ProcessHostedEngine(spec, start_timeout_s=240, call_timeout_s=120, weight_chunk_bytes=50_000)
    try:
        assert [s[0].response_ids for s in engine.generate(prompts, params)] != [s[0].response_ids for s in target]
        source = make_model(1).to(CUDA)
        assert engine.load_weights(source.named_parameters()) == len(list(source.named_parameters()))
        assert [s[0].response_ids for s in engine.generate(prompts, params)] == [s[0].response_ids for s in target]
    finally:
        engine.close()


@pytest.mark.timeout(300)
def test_a_child_process_engine_orders_weight_copies_with_the_parents_writes(model_dirs, make_model, prompts):
    """`vllm.child_process` on a GPU: the child reads the weights the parent queued before `load_weights` (behind a
    busy stream), and has finished reading them when `load_weights` returns (the parent overwrites them at once)."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    target = HFEngine(make_model(1).to(CUDA)).generate(prompts, params)
    engine = make_engine("hf", str(model_dirs[0]), device="cuda:0", micro_batch_size=8, child_process=True)
    try:
        assert isinstance(engine, ProcessHostedEngine)
        source, new = make_model(0).to(CUDA), make_model(1).to(CUDA)
        torch.cuda._sleep(200_000_000)  # ~0.1 s: the writes below wait behind it on the parent's stream
        with torch.no_grad():
            for mine, theirs in zip(source.parameters(), new.parameters()):
                mine.copy_(theirs)
        assert engine.load_weights(source.named_parameters()) == len(list(source.named_parameters()))
        with torch.no_grad():
            for mine in source.parameters():
                mine.zero_()
        assert _tokens(engine.generate(prompts, params)) == _tokens(target)
    finally:
        engine.close()


# ----- static-cache decoding with CUDA graphs (hf_engine + static_decode) --------------------------------------
def _tokens(out):
    return [[s.response_ids for s in row] for row in out]


def test_cuda_graph_decode_matches_eager_static_and_plain_loop(make_model, prompts):
    model = make_model(0).to(CUDA)
    params = SamplingParams(max_new_tokens=20, temperature=0.8, n=3, seed=5)
    plain = HFEngine(model, static_decode=False).generate(prompts, params)
    eager = HFEngine(model, cuda_graphs=False)
    eager_out = eager.generate(prompts, params)
    graphed = HFEngine(model)  # the default on CUDA: static cache + CUDA graphs
    assert graphed.static_decode and graphed.cuda_graphs
    graph_out = graphed.generate(prompts, params)
    stats = graphed._static.stats
    assert graphed.static_failure is None and graphed._static.graph_failure is None
    assert stats["captures"] == 1 and stats["replays"] > 0 and stats["eager_steps"] == 0
    assert eager._static.stats["captures"] == 0 and eager._static.stats["eager_steps"] > 0
    # replaying the captured step runs the very kernels of the eager static step
    assert graph_out == eager_out
    assert _tokens(graph_out) == _tokens(plain)
    for g_row, p_row in zip(graph_out, plain):
        for g, p in zip(g_row, p_row):
            assert g.finish_reason == p.finish_reason
            assert g.log_probs == pytest.approx(p.log_probs, abs=1e-5, rel=0)
    # a later call of the same bucket replays the same graph; a larger call replays graphs too, never eagerly
    assert graphed.generate(prompts, params) == graph_out
    assert stats["captures"] == 1
    replays = stats["replays"]
    graphed.generate(prompts * 3, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert stats["replays"] > replays and stats["eager_steps"] == 0


def test_cuda_graphs_follow_in_place_weight_updates_and_sleep(make_model, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    target = HFEngine(make_model(1).to(CUDA), static_decode=False).generate(prompts, params)
    engine = HFEngine(make_model(0).to(CUDA))
    before = engine.generate(prompts, params)
    engine.load_weights(make_model(1).named_parameters())  # copied in place: the captured graph reads them
    assert _tokens(engine.generate(prompts, params)) == _tokens(target) != _tokens(before)
    engine.sleep()
    engine.wake_up()  # the weights come back at new addresses: the graph is captured again
    assert _tokens(engine.generate(prompts, params)) == _tokens(target)
    assert engine._static.stats["captures"] == 2 and engine.static_failure is None


def test_cuda_graph_capture_failure_warns_once_and_decodes_eagerly(make_model, prompts, caplog):
    model = make_model(0).to(CUDA)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=8)
    expected = HFEngine(model, cuda_graphs=False).generate(prompts, params)
    # a host synchronisation inside the step cannot be captured
    def sync_hook(module, args, output):
        output.sum().item()

    model.model.norm.register_forward_hook(sync_hook)
    engine = HFEngine(model)
    with caplog.at_level(logging.WARNING, logger="hpc_rlhf.generation.static_decode"):
        first = engine.generate(prompts, params)
        second = engine.generate(prompts, params)
    warnings = [r for r in caplog.records if "CUDA-graph capture of the decode step failed" in r.getMessage()]
    assert len(warnings) == 1
    assert engine._static.graph_failure and engine.static_failure is None
    assert first == expected and second == expected
