"""The hf backend and the process-hosted engine on a GPU (skipped without CUDA): device placement of the decode loop,
seeded sampling with a CUDA generator, sleep/wake memory, and weights handed to a child process as CUDA IPC handles
(the path a disaggregated vllm generator takes)."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.generation import EngineSpec, HFEngine, ProcessHostedEngine, SamplingParams

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
