"""actor.compile: every decoder layer is torch.compiled in place, and a compiled actor takes the same training step as
an eager one (same loss metrics, same gradients to float rounding) on padded micro-batches of different lengths."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.builtin_models.tiny import build_tiny_model
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.training.deepspeed_setup import compile_decoder_layers
from tests.multiproc import run_ranks
from tests.training.one_rank_actor import nll_backward

# three samples of different lengths, two micro-batches: padding and a shape change between them
SAMPLES = (([1, 40, 41, 42, 43], [50, 51, 52, 2]), ([1, 60, 61], [70, 2]), ([1, 9, 8, 7, 6, 5, 4], [30, 31, 2]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_compile") / "model", seed=0)


def eager_and_compiled_steps(model_dir: str) -> list[dict]:
    """One `Actor.backward` of the token-mean NLL, eager then compiled, on a one-rank ZeRO-0 engine."""
    return [nll_backward(model_dir, SAMPLES, micro_batch_size=2, attn_implementation="sdpa", compile=compiled)
            for compiled in (False, True)]


def test_a_compiled_actor_takes_the_eager_step(model_dir):
    eager, compiled = run_ranks(eager_and_compiled_steps, 1, str(model_dir), timeout_s=300)[0]
    assert eager["compiled_layers"] == []
    assert compiled["compiled_layers"] == ["LlamaDecoderLayer", "LlamaDecoderLayer"]  # the tiny model's 2 layers
    assert compiled["metrics"]["loss"] == pytest.approx(eager["metrics"]["loss"], rel=1e-5)
    assert eager["grads"].keys() == compiled["grads"].keys()
    for name, grad in eager["grads"].items():
        torch.testing.assert_close(compiled["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_without_layer_classes_is_named():
    with pytest.raises(ValueError, match="compile: Sequential names no decoder layer class"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compile_with_zero3_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"actor\.compile.*compiled layers are wired for ZeRO stages 0-2"):
        load_config(None, ["--actor.compile=true", "--ds.zero_stage=3"])
