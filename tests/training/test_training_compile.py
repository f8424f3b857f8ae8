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

# three samples of different lengths, two micro-batches: padding and a shape change between them
SAMPLES = (([1, 40, 41, 42, 43], [50, 51, 52, 2]), ([1, 60, 61], [70, 2]), ([1, 9, 8, 7, 6, 5, 4], [30, 31, 2]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_compile") / "model", seed=0)


def eager_and_compiled_steps(model_dir: str) -> list[dict]:
    """One `Actor.backward` of the token-mean NLL, eager then compiled, on a one-rank ZeRO-0 engine."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.algos import sft_loss
    from hpc_rlhf.training.batching import TokenSample, make_micro_batches
    from hpc_rlhf.training.deepspeed_setup import EngineConfig
    from hpc_rlhf.training.models import Actor

    samples = [TokenSample(prompt_ids=torch.tensor(p), response_ids=torch.tensor(r)) for p, r in SAMPLES]
    results = []
    for compiled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        cfg = EngineConfig(zero_stage=0, micro_train_batch_size=2, train_batch_size=4, compile=compiled)
        actor = Actor(model, cfg, None, num_training_steps=1)
        batches = make_micro_batches(samples, micro_batch_size=2, pad_token_id=0)
        metrics = actor.backward(batches, lambda batch, out: sft_loss(out.log_probs, batch.action_mask))
        grads = {name: p.grad.detach().clone() for name, p in actor.engine.module.named_parameters()}
        layers = [type(m).__name__ for m in actor.engine.module.modules() if hasattr(m, "_compiled_call_impl")
                  and m._compiled_call_impl is not None]
        results.append({"metrics": metrics, "grads": grads, "compiled_layers": layers})
    return results


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
