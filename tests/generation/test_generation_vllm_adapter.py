"""The vllm backend's adapter logic (argument mapping, output conversion, sleep/weights sequencing, version checks)
against a recording stand-in for the `vllm` package: vLLM itself needs a GPU and runs in the GPU test suite."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.generation import GenerationEngine, GenerationError, SamplingParams
from hpc_rlhf.generation.factory import vllm_placement
from hpc_rlhf.generation.vllm_engine import (
    VllmEngine,
    VllmVersionError,
    check_vllm_version,
    import_vllm,
    parse_version,
    prepare_external_launcher_env,
    prepare_vllm_env,
    sampled_log_probs,
)
from tests.generation.conftest import FakeCompletion, FakeFlatLogprobs, FakeLogprob


def build(fake_vllm, **kwargs) -> VllmEngine:
    options = {"dtype": "bfloat16", "tp": 1, "max_model_len": 64, "seed": 5}
    options.update(kwargs)
    return VllmEngine("/models/policy", **options)


def test_llm_is_built_with_the_mapped_arguments(fake_vllm):
    engine = build(fake_vllm, gpu_memory_utilization=0.5, enable_sleep=True, enable_prefix_caching=True,
                   enforce_eager=True, max_num_seqs=32)
    assert isinstance(engine, GenerationEngine)
    kwargs = engine.llm.kwargs
    assert kwargs == {"model": "/models/policy", "tensor_parallel_size": 1, "dtype": "bfloat16", "seed": 5,
                      "gpu_memory_utilization": 0.5, "enable_sleep_mode": True, "enable_prefix_caching": True,
                      "enforce_eager": True, "max_num_seqs": 32, "logprobs_mode": "processed_logprobs",
                      "max_model_len": 64}
    # set before vllm.LLM reads them: engine core in this process, no FlashInfer sampler probe
    assert engine.llm.env_at_build == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    launched = build(fake_vllm, tp=2, executor_backend="external_launcher")
    assert launched.llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert launched.llm.kwargs["tensor_parallel_size"] == 2


def test_vllm_env_keeps_a_flashinfer_choice_made_by_the_user():
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_USE_FLASHINFER_SAMPLER": "1"}
    prepare_vllm_env(env)
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "1"}
    env = {}
    prepare_vllm_env(env)
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def test_the_stand_in_refuses_arguments_vllm_does_not_have(fake_vllm):
    with pytest.raises(TypeError, match="no argument"):
        fake_vllm.LLM(model="m", enable_sleep=True)
    with pytest.raises(TypeError, match="no field"):
        fake_vllm.SamplingParams(max_new_tokens=3)


def test_tp_without_the_external_launcher_is_refused(fake_vllm):
    with pytest.raises(GenerationError, match="tp=2 needs one process per TP rank"):
        build(fake_vllm, tp=2)


def test_one_request_per_sample_with_distinct_seeds(fake_vllm):
    engine = build(fake_vllm, max_model_len=12, seed_per_request=True)
    prompts = [[3, 4, 5], [7] * 9]
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, top_k=-1, n=3, seed=11,
                            stop_token_ids=[40])
    with pytest.warns(UserWarning, match="truncated distribution"):
        out = engine.generate(prompts, params)
    requests = engine.llm.last_requests
    assert len(requests) == 6
    assert {r.n for r in requests} == {1} and {r.logprobs for r in requests} == {0}
    assert {r.detokenize for r in requests} == {False} and {r.top_k for r in requests} == {0}
    assert {r.flat_logprobs for r in requests} == {True}
    assert {r.temperature for r in requests} == {0.8} and {r.top_p for r in requests} == {0.9}
    assert {tuple(r.stop_token_ids) for r in requests} == {(40,)}
    assert len({r.seed for r in requests}) == 6
    assert [r.max_tokens for r in requests] == [5, 5, 5, 3, 3, 3]  # 9-token prompt: 12 - 9 = 3 left
    assert [len(row) for row in out] == [3, 3] and out[1][0].prompt_ids == [7] * 9


def test_by_default_the_call_seeds_the_cuda_generators_and_requests_carry_no_seed(fake_vllm, monkeypatch):
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    engine = build(fake_vllm)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=23)
    engine.generate([[3, 4], [5]], params)
    assert [r.seed for r in engine.llm.last_requests] == [None] * 4
    assert seeded == [23]  # once per call, before the batch is drawn
    engine.generate([[3, 4]], SamplingParams(max_new_tokens=4, temperature=1.0, n=1, seed=None))
    assert seeded == [23]  # an unseeded call leaves the generators alone
    per_request = build(fake_vllm, seed_per_request=True)
    per_request.generate([[3, 4]], params)
    assert seeded == [23] and len({r.seed for r in per_request.llm.last_requests}) == 2


def test_suppressed_tokens_become_a_logit_bias_only_where_asked(fake_vllm):
    engine = build(fake_vllm)
    engine.generate([[3, 4]], SamplingParams(max_new_tokens=2, n=2, seed=1, suppressed_token_ids=(9,)))
    assert [r.kwargs["logit_bias"] for r in engine.llm.last_requests] == [{9: -100.0}, {9: -100.0}]
    engine.generate([[3, 4]], SamplingParams(max_new_tokens=2, seed=1))
    assert "logit_bias" not in engine.llm.last_requests[0].kwargs


def test_outputs_become_samples_with_the_sampled_token_log_probs(fake_vllm):
    engine = build(fake_vllm)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=None, stop_token_ids=[6])
    (sample,), (long_sample,) = engine.generate([[3, 4], [20]], params)
    assert sample.response_ids == [5, 6] and sample.finish_reason == "stop"
    assert sample.log_probs == [-0.125, -0.25]
    assert long_sample.response_ids == [21, 22, 23, 24] and long_sample.finish_reason == "length"
    dropped = engine.generate([[3, 4]], params.replace(include_stop_token=False))[0][0]
    assert dropped.response_ids == [5] and dropped.log_probs == [-0.125]


def test_a_call_without_log_probs_asks_vllm_for_none_and_reports_nan(fake_vllm):
    engine = build(fake_vllm)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=3, stop_token_ids=[6], log_probs=False)
    out = engine.generate([[3, 4], [20]], params)
    requests = engine.llm.last_requests
    assert {r.logprobs for r in requests} == {None} and not any("flat_logprobs" in r.kwargs for r in requests)
    assert [s.response_ids for s in out[0]] == [[5, 6], [5, 6]] and out[1][0].response_ids == [21, 22, 23, 24]
    assert all(len(s.log_probs) == len(s.response_ids) and all(math.isnan(x) for x in s.log_probs)
               for row in out for s in row)


def test_sampled_log_probs_read_the_first_entry_of_each_flat_position():
    tokens = [5, 6, 7]
    entries = [{5: FakeLogprob(-0.5), 9: FakeLogprob(-3.0)}, {6: FakeLogprob(-0.25)}, {7: FakeLogprob(-1.0)}]
    flat = FakeFlatLogprobs()
    for position in entries:
        flat.append(position)
    assert flat.start_indices == [0, 2, 3] and flat.end_indices == [2, 3, 4]
    completion = FakeCompletion(token_ids=tokens, logprobs=flat, finish_reason="length")
    assert sampled_log_probs(completion, "row 0") == [-0.5, -0.25, -1.0]
    flat.token_ids[2] = 8  # position 1's entry belongs to another token
    with pytest.raises(GenerationError, match="row 0: vLLM returned no log-prob for sampled token 6 at position 1"):
        sampled_log_probs(FakeCompletion(token_ids=tokens, logprobs=flat, finish_reason="length"), "row 0")
    short = FakeFlatLogprobs(start_indices=[0], end_indices=[1], token_ids=[5], logprobs=[-0.5])
    with pytest.raises(GenerationError, match="returned 1 log-prob positions for 3 tokens"):
        sampled_log_probs(FakeCompletion(token_ids=tokens, logprobs=short, finish_reason="length"), "row 0")


def test_aborted_requests_are_an_error(fake_vllm):
    engine = build(fake_vllm)
    engine.llm.finish_override = "abort"
    with pytest.raises(GenerationError, match="prompt 0 sample 0: vLLM finished the request with reason 'abort'"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_a_prompt_that_fills_max_model_len_is_named(fake_vllm):
    engine = build(fake_vllm, max_model_len=8)
    with pytest.raises(GenerationError, match="prompt row 1 has 8 tokens"):
        engine.generate([[1], [2] * 8], SamplingParams(max_new_tokens=2))


def test_load_weights_goes_through_apply_model_then_drops_the_prefix_cache(fake_vllm):
    engine = build(fake_vllm)
    weights = [(f"model.layers.{i}.mlp.up_proj.weight", torch.zeros(2, 2)) for i in range(3)]
    assert engine.load_weights(iter(weights)) == 3
    assert engine.llm.model.loaded == [name for name, _ in weights]
    assert engine.llm.log[-2:] == [("load_weights", 3), ("reset_prefix_cache",)]


def test_a_refused_prefix_cache_reset_is_an_error(fake_vllm, monkeypatch):
    engine = build(fake_vllm)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *args: False)
    with pytest.raises(GenerationError, match="refused to reset its prefix cache"):
        engine.load_weights([("model.norm.weight", torch.zeros(1))])


def test_load_weights_names_the_rejected_weight_and_drains_the_stream(fake_vllm):
    engine = build(fake_vllm)
    consumed = []

    def stream():
        for name in ["model.norm.weight", "unknown.weight", "lm_head.weight", "model.embed_tokens.weight"]:
            consumed.append(name)
            yield name, torch.zeros(1)

    with pytest.raises(GenerationError, match=r"could not load weight 'unknown.weight' \(2 received\)"):
        engine.load_weights(stream())
    assert len(consumed) == 4


def test_sleep_wake_and_weight_updates_while_asleep(fake_vllm):
    engine = build(fake_vllm, enable_sleep=True)
    engine.sleep(level=2)
    assert engine.asleep
    with pytest.raises(GenerationError, match="asleep"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    engine.load_weights([("model.norm.weight", torch.zeros(1))])
    engine.wake_up()
    assert not engine.asleep
    # the KV cache (and with it the prefix cache) is still asleep: no reset is needed or attempted
    assert engine.llm.log == [("sleep", 2), ("wake_up", ("weights",)), ("load_weights", 1), ("wake_up", ("kv_cache",))]
    engine.sleep()
    engine.wake_up()
    assert engine.llm.log[-2:] == [("sleep", 1), ("wake_up", ("kv_cache", "weights"))]


def test_sleep_needs_sleep_mode_and_close_ends_use(fake_vllm):
    engine = build(fake_vllm, enable_sleep=False)
    with pytest.raises(GenerationError, match="enable_sleep=True"):
        engine.sleep()
    engine.close()
    assert not hasattr(engine, "llm")  # dropped, so that collection can free it
    with pytest.raises(GenerationError, match="closed"):
        engine.generate([[1]], SamplingParams())
    engine.close()  # a second close is a no-op
    sleeping = build(fake_vllm, enable_sleep=True)
    log = sleeping.llm.log
    sleeping.close()
    assert log == [("sleep", 2)]  # discards weights and KV cache: dropping the LLM alone keeps its memory


@pytest.mark.parametrize("text, expected", [("0.24.0", (0, 24, 0)), ("0.25.1+cu130", (0, 25, 1)),
                                            ("0.26.0rc1.dev5+g1a2b3c", (0, 26, 0)), ("1.2", (1, 2, 0))])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_versions_before_the_minimum_are_refused(fake_vllm):
    fake_vllm.__version__ = "0.23.1"
    with pytest.raises(VllmVersionError, match=r"vllm 0.23.1 is installed but the vllm backend needs vllm>=0.24.0"):
        build(fake_vllm)
    fake_vllm.__version__ = "0.33.0"
    assert check_vllm_version(fake_vllm) == (0, 33, 0)
    fake_vllm.__version__ = "dev"
    with pytest.raises(VllmVersionError, match="cannot read a version"):
        check_vllm_version(fake_vllm)


def test_import_vllm_explains_a_missing_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(GenerationError, match="vllm is not importable here"):
        import_vllm()


def test_external_launcher_env_refuses_a_conflicting_local_rank():
    env = {"LOCAL_RANK": "1"}
    with pytest.raises(GenerationError, match="LOCAL_RANK=1 but this engine's device is cuda:0"):
        prepare_external_launcher_env(4, 0, env)
    env = {}
    prepare_external_launcher_env(4, 2, env)
    assert env == {"RANK": "4", "LOCAL_RANK": "2"}


def test_placement_without_a_distributed_world():
    assert vllm_placement(tp=1, shared_world=False) == "standalone"
    assert vllm_placement(tp=1, shared_world=True) == "standalone"
    with pytest.raises(GenerationError, match="tp=2 needs one process per TP rank"):
        vllm_placement(tp=2, shared_world=False)


def test_in_process_engine_refuses_a_gpu_other_than_the_first_visible():
    from hpc_rlhf.generation.factory import make_engine

    # Checked before vllm is imported or any GPU is touched, so it runs here.
    with pytest.raises(GenerationError, match="runs on the first visible GPU, but this rank's device is cuda:1"):
        make_engine("vllm", "/models/none", device="cuda:1", dtype="bfloat16")


def test_prompts_with_images_carry_them_as_multi_modal_data(fake_vllm):
    """A prompt with images goes to vLLM as TokensPrompt(prompt_token_ids with each run of image placeholders
    collapsed to one, multi_modal_data={"image": [PIL images]}); text prompts stay plain; samples keep the expanded
    ids (the trainer's). Checked against vLLM's documented input format only: a GPU run must confirm it."""
    import io

    from PIL import Image

    from hpc_rlhf.generation.vllm_engine import collapse_image_tokens, request_prompts

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert collapse_image_tokens([1, 9, 9, 9, 4, 9, 9, 5], 9) == [1, 9, 4, 9, 5]
    prompts = [[1, 9, 9, 9, 9, 3], [2, 3]]
    inputs = request_prompts(fake_vllm, prompts, [(png,), ()], 2, image_token_id=9)
    assert [item["prompt_token_ids"] for item in inputs] == [[1, 9, 3], [1, 9, 3], [2, 3], [2, 3]]
    image = inputs[0]["multi_modal_data"]["image"][0]
    assert image.size == (4, 4) and image.getpixel((0, 0)) == (255, 0, 0)
    assert "multi_modal_data" not in inputs[2]
    with pytest.raises(GenerationError, match="vision-language"):
        request_prompts(fake_vllm, prompts, [(png,), ()], 1, image_token_id=None)

    engine = build(fake_vllm, image_token_id=9)
    samples = engine.generate(prompts, SamplingParams(max_new_tokens=3, n=1, seed=1), images=[(png,), ()])
    assert [group[0].prompt_ids for group in samples] == prompts
    with pytest.raises(GenerationError, match="images for 1 prompts"):
        engine.generate(prompts, SamplingParams(max_new_tokens=3), images=[(png,)])
