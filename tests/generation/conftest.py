"""Fixtures for the generation tests: tiny random Llama models (in memory and saved), the tiny tokenizer, and a fake
`vllm` module that records what the adapter asks of it (vLLM cannot run on this CPU machine)."""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer


def tiny_llama(seed: int, tokenizer: Any) -> LlamaForCausalLM:
    """A random-init fp32 Llama (hidden 64, 2 layers) over the tiny tokenizer's vocabulary."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def _models(tokenizer) -> dict[int, LlamaForCausalLM]:
    return {seed: tiny_llama(seed, tokenizer) for seed in (0, 1)}


@pytest.fixture
def make_model(_models) -> Callable[[int], LlamaForCausalLM]:
    """`make_model(seed)`: a private copy of the seed-0 or seed-1 model (tests may change its weights)."""
    return lambda seed=0: copy.deepcopy(_models[seed])


@pytest.fixture(scope="session")
def model_dirs(_models, tokenizer, tmp_path_factory) -> dict[int, Path]:
    """The seed-0 and seed-1 models saved as HF folders (config, safetensors, tokenizer)."""
    dirs = {}
    for seed, model in _models.items():
        out = tmp_path_factory.mktemp(f"llama_seed{seed}")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        dirs[seed] = out
    return dirs


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    """Four prompts of different lengths (so batches need left padding)."""
    texts = ["12+7=", "a", "what is 3*4? ", "xyz"]
    return [tokenizer.encode(text) for text in texts]


# ----------------------------------------------------------------------------------------------------- fake vllm
@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeFlatLogprobs:
    """vLLM's `FlatLogprobs` (vllm/logprobs.py, 0.24 and 0.26): position p's entries are `token_ids` / `logprobs`
    from `start_indices[p]` to `end_indices[p]`, the sampled token first."""
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def append(self, entries: dict[int, FakeLogprob]) -> None:
        self.start_indices.append(len(self.logprobs))
        self.token_ids.extend(entries)
        self.logprobs.extend(entry.logprob for entry in entries.values())
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


@dataclass
class FakeCompletion:
    token_ids: list[int]
    logprobs: Any
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


# Keyword names that exist in vLLM 0.24 and 0.26 (vllm/sampling_params.py, vllm/engine/arg_utils.py): the stand-ins
# refuse any other, so that a misspelt or removed argument fails here rather than on the GPU.
VLLM_SAMPLING_FIELDS = frozenset({"n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                                  "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                                  "detokenize", "skip_special_tokens", "include_stop_str_in_output", "logit_bias",
                                  "flat_logprobs"})
VLLM_LLM_KWARGS = frozenset({"model", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization",
                             "enable_sleep_mode", "enable_prefix_caching", "enforce_eager", "max_num_seqs",
                             "max_model_len", "logprobs_mode", "distributed_executor_backend", "max_logprobs"})
VLLM_LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")


class FakeSamplingParams:
    """Keeps the keyword arguments it was built with; refuses names vLLM's SamplingParams does not have."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - VLLM_SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"vllm.SamplingParams has no field(s) {sorted(unknown)}")
        self.kwargs = kwargs

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["kwargs"][name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class FakeModel:
    """Stands in for the vLLM model inside the worker: `load_weights` consumes and records the stream."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.loaded: list[str] = []

    def load_weights(self, weights):
        for name, tensor in weights:
            if name.startswith("unknown."):
                raise ValueError(f"There is no module or parameter named '{name}'")
            self.loaded.append(name)
        self.log.append(("load_weights", len(self.loaded)))
        return set(self.loaded)


def fake_completion(prompt: list[int], params: FakeSamplingParams, vocab: int, finish: str | None) -> FakeCompletion:
    """A deterministic response: tokens count up from the prompt's last token, shifted by the request's seed."""
    shift = 0 if params.seed is None else params.seed % 7
    tokens, reason = [], "length"
    for k in range(params.max_tokens):
        token = (prompt[-1] + 1 + k + shift) % vocab
        tokens.append(token)
        if token in params.stop_token_ids:
            reason = "stop"
            break
    logprobs = [{t: FakeLogprob(-0.125 * (i + 1)), (t + 1) % vocab: FakeLogprob(-9.0)} for i, t in enumerate(tokens)]
    if params.logprobs is None:
        logprobs = None
    elif getattr(params, "flat_logprobs", False):
        flat = FakeFlatLogprobs()
        for entries in logprobs:
            flat.append(entries)
        logprobs = flat
    return FakeCompletion(token_ids=tokens, logprobs=logprobs, finish_reason=finish or reason)


class FakeLLM:
    """Records the constructor's keyword arguments and every call, answers like `vllm.LLM` does."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - VLLM_LLM_KWARGS
        if unknown:
            raise TypeError(f"vllm.LLM / EngineArgs has no argument(s) {sorted(unknown)}")
        if kwargs.get("logprobs_mode", "raw_logprobs") not in VLLM_LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {kwargs['logprobs_mode']!r} is not one of {VLLM_LOGPROBS_MODES}")
        self.kwargs = kwargs
        self.env_at_build = {name: os.environ.get(name) for name in
                             ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_FLASHINFER_SAMPLER")}
        self.log: list = []
        self.model = FakeModel(self.log)
        self.model_config = types.SimpleNamespace(max_model_len=kwargs.get("max_model_len", 64))
        self.finish_override: str | None = None
        FakeLLM.instances.append(self)

    def generate(self, inputs, sampling_params=None, *, use_tqdm=True):
        self.log.append(("generate", len(inputs)))
        self.last_requests = list(sampling_params)
        return [FakeRequestOutput(prompt_token_ids=list(item["prompt_token_ids"]),
                                  outputs=[fake_completion(list(item["prompt_token_ids"]), params, 50,
                                                           self.finish_override)])
                for item, params in zip(inputs, sampling_params)]

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self, *args: Any) -> bool:
        self.log.append(("reset_prefix_cache",))
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.log.append(("sleep", level))

    def wake_up(self, tags=None) -> None:
        self.log.append(("wake_up", tuple(tags) if tags is not None else None))


@pytest.fixture
def fake_vllm(monkeypatch) -> types.ModuleType:
    """A `vllm` stand-in with version 0.24.0, installed in sys.modules for the duration of one test."""
    module = types.ModuleType("vllm")
    module.__version__ = "0.24.0"
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    module.TokensPrompt = lambda **kwargs: dict(kwargs)
    FakeLLM.instances = []
    monkeypatch.setitem(__import__("sys").modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)  # restored after the test
    return module
