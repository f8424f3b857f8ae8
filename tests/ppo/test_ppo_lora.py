"""LoRA on the RL actor: a GRPO update moves only the adapters, the generators receive the merged weights
(W + alpha/r * B @ A) under the base model's names (colocated and by broadcast, ZeRO-2 and ZeRO-3) and score tokens as
the actor does, its reference is the actor with the adapters off, the Hugging Face save writes the adapter and the
merged model, and a resumed LoRA run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.distributed.weights import exported_parameters, full_named_parameters, plain_parameter_name
from hpc_rlhf.training.lora import LoraSettings, apply_lora
from tests.multiproc import run_ranks
from tests.ppo import lora_worker
from tests.ppo.conftest import FAST

REPO = Path(__file__).resolve().parents[2]
PEFT_PREFIX = "base_model.model."
SCALE = lora_worker.LORA_ALPHA / lora_worker.LORA_RANK


def hand_merged(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model a peft state stands for, merged by hand: W + alpha/r * B @ A for every adapted layer."""
    merged = {}
    for name, value in raw.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if name.endswith(".base_layer.weight"):
            layer = name.removesuffix(".base_layer.weight")
            value = value + SCALE * raw[f"{layer}.lora_B.default.weight"] @ raw[f"{layer}.lora_A.default.weight"]
        merged[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return merged


def peft_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    base = LlamaForCausalLM(config)
    plain = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = apply_lora(base, LoraSettings(rank=lora_worker.LORA_RANK, alpha=lora_worker.LORA_ALPHA), "causal_lm")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: give the adapters something to merge
                param.normal_()
    return model, plain


def test_config_takes_lora_for_ppo_but_not_a_4bit_base():
    config = REPO / "configs" / "tiny_cpu.yaml"
    assert load_config(config, ["--lora.rank=8", "--lora.alpha=16"]).config.lora.rank == 8
    with pytest.raises(ConfigError, match="lora.load_in_4bit.*ppo merges the adapters into the base weights"):
        load_config(config, ["--lora.rank=8", "--lora.load_in_4bit=true"])


def test_names_of_the_plain_model():
    assert plain_parameter_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert plain_parameter_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert plain_parameter_name("base_model.model.model.norm.weight") == "model.norm.weight"
    assert plain_parameter_name("base_model.model.score.modules_to_save.default.weight") == "score.weight"
    assert plain_parameter_name("base_model.model.score.original_module.weight") is None


def test_export_merges_adapters_under_base_names():
    model, plain = peft_llama()
    raw = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected = hand_merged(raw)
    exported = dict(full_named_parameters(model))
    assert list(exported) == list(plain)  # the plain model's names, in its order
    for name, value in exported.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"],
                           plain["model.layers.0.self_attn.q_proj.weight"])
    assert sum(len(e.lora) for e in exported_parameters(model)) == 7  # q k v o gate up down: all-linear but lm_head
    assert dict(full_named_parameters(model, merge_lora=False)).keys() == raw.keys()  # the adapter save's view
    with model.disable_adapter():  # adapters off: the base model itself (the reference policy)
        for name, value in full_named_parameters(model):
            assert torch.equal(value, plain[name]), name


@pytest.mark.parametrize("zero_stage,split", [(2, True), (3, True), (3, False)],
                         ids=["zero2-1actor-1generator", "zero3-1actor-1generator", "zero3-2colocated"])
def test_grpo_update_moves_adapters_and_generators_get_merged_weights(tmp_path, zero_stage, split):
    results = run_ranks(lora_worker.run_sync, 2, str(tmp_path / "tiny"), zero_stage, split, timeout_s=240)
    actor = results[0]
    initial, trained = actor["initial"], actor["trained"]
    lora_names = [n for n in trained if ".lora_" in n]
    assert len(lora_names) == 2 * 2 * 7  # A and B on 7 linear layers of each of the 2 blocks
    for name in trained:  # (a) the base is bit for bit the same; every adapter factor moved
        if ".lora_" in name:
            assert not torch.equal(trained[name], initial[name]), f"{name} did not train"
        else:
            assert torch.equal(trained[name], initial[name]), f"base weight {name} changed"
    expected = hand_merged(trained)
    engines = [r["engine"] for r in results]  # colocated engines, and the generator rank's with `split`
    for held in engines:  # (b) every generator holds the merged weights under the plain names
        assert held.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(held[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(engines[-1]["model.layers.0.mlp.down_proj.weight"],
                           hand_merged(initial)["model.layers.0.mlp.down_proj.weight"])
    # (c) log-probs of what a generator drew equal the actor's of the same tokens
    pairs = [(actor["drawn"], actor["actor_log_probs"])]
    if split:
        assert results[1]["drawn"] == actor["generator_drawn"]
        pairs.append((results[1]["drawn"], actor["actor_log_probs_of_generator"]))
    # the reference: the actor with its adapters off is the base model loaded on its own
    for result in results[:1] if split else results:
        assert result["base_log_probs"] == result["reference_log_probs"]
        assert result["actor_log_probs_after"] == result["actor_log_probs"]
        assert result["base_log_probs"] != result["actor_log_probs"]
    for drawn, from_actor in pairs:
        for (_, response, from_generator), mine in zip(drawn, from_actor):
            assert len(response) == len(from_generator) == 6
            torch.testing.assert_close(torch.tensor(mine[:len(response)]), torch.tensor(from_generator),
                                       rtol=0, atol=2e-5)


# ----- a real LoRA GRPO run: saved adapter + merged model, resume == uninterrupted --------------------------------
ITERATIONS = 4
LORA_RUN = ["--lora.rank=4", "--lora.alpha=8", "--actor.learning_rate=2e-2", "--rollout.n_samples_per_prompt=4",
            "--train.train_batch_size=8", "--train.micro_train_batch_size=4", f"--train.max_iterations={ITERATIONS}",
            "--ckpt.save_steps=2", "--ckpt.save_hf_model=true",
            # KL against the reference, which on the colocated ranks is the actor with its adapters off
            "--algo.use_kl_loss=true", "--algo.kl_loss_coef=0.01", "--layout.reference.gpus=1"]


def train(run_dir: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "hpc_rlhf.train", "--config", "configs/tiny_cpu.yaml", *FAST,
                             *LORA_RUN, f"--train.run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


@pytest.mark.timeout(600)
def test_lora_grpo_run_saves_adapter_and_merged_model_and_resumes_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    finished = tmp_path / "finished"
    train(finished)
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    kl = [row["train/kl_loss"] for row in rows if "train/kl_loss" in row]
    assert len(kl) == ITERATIONS and kl[0] == 0.0 and all(value > 0 for value in kl[1:])  # B = 0: policy = base
    adapter, merged = tensors(finished / "hf" / "actor"), tensors(finished / "hf" / "actor_merged")
    assert (finished / "hf" / "actor" / "adapter_config.json").is_file()
    assert all(".lora_" in name for name in adapter) and adapter
    assert any(value.abs().max() > 0 for name, value in adapter.items() if ".lora_B." in name)  # it trained
    # The merged model is the base plus the saved adapter, by hand, and loads as a plain model.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama-arith"))
    raw = {f"{PEFT_PREFIX}{name}": p.detach() for name, p in base.named_parameters()}
    for name, value in adapter.items():  # peft saves "...q_proj.lora_A.weight"; the base weight is "...q_proj.weight"
        layer, factor = name.removesuffix(".weight").rsplit(".", 1)
        raw[f"{layer}.{factor}.default.weight"] = value
        base_name = f"{layer}.weight"
        if base_name in raw:
            raw[f"{layer}.base_layer.weight"] = raw.pop(base_name)
    expected = hand_merged(raw)
    for name, value in merged.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    AutoModelForCausalLM.from_pretrained(str(finished / "hf" / "actor_merged"))

    # (d) resume from the checkpoint after iteration 2: the same adapter and merged weights, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(finished, resumed)
    (resumed / "checkpoints" / "latest").write_text("iter_000002\n")
    shutil.rmtree(resumed / "hf")
    assert f"resumed from {resumed / 'checkpoints' / 'iter_000002'}" in train(resumed)
    for folder in ("actor", "actor_merged"):
        got, want = tensors(resumed / "hf" / folder), tensors(finished / "hf" / folder)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), folder
