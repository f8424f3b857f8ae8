"""LoRA through peft: adapters train (SFT, RM, DPO), tools/merge_lora.py folds them into models that give the same
outputs as base + adapter, and QLoRA stops with a clear error where it cannot run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from hpc_rlhf.training.lora import LoraError

REPO = Path(__file__).resolve().parents[2]


def merge_tool():
    spec = importlib.util.spec_from_file_location("supervised_merge_lora", REPO / "tools" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def token_batch() -> torch.Tensor:
    return torch.randint(7, 100, (3, 11), generator=torch.Generator().manual_seed(0))


def test_lora_sft_adapter_merges_into_an_equal_model(make_config, train, series, models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_config("sft", train__max_iterations=12, eval__data="", lora__rank=8, lora__alpha=16,
                      actor__learning_rate=1e-2)
    train(cfg)
    losses = [v for _, v in series(cfg.train.run_dir, "train/loss")]
    assert sum(losses[-3:]) < sum(losses[:3])
    adapter = Path(cfg.train.run_dir) / "hf" / "actor"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(models["tiny"])

    out = tmp_path / "merged"
    assert merge_tool().main(["--adapter", str(adapter), "--out", str(out)]) == 0
    ids = token_batch()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(models["tiny"])).eval()(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(models["tiny"])),
                                                 str(adapter)).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, with_adapter, rtol=1e-5, atol=1e-5)
    assert (merged - base).abs().max() > 1e-2  # the adapter learned something
    assert (out / "tokenizer_config.json").is_file()


def test_lora_reward_model_keeps_its_head_and_statistics(make_config, train, models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = make_config("rm", train__max_iterations=8, eval__max_samples=32, lora__rank=4)
    train(cfg)
    adapter = Path(cfg.train.run_dir) / "hf" / "reward"
    stats = json.loads((adapter / "reward_stats.json").read_text())
    out = tmp_path / "merged_rm"
    assert merge_tool().main(["--adapter", str(adapter), "--out", str(out)]) == 0
    merged_model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert merged_model.config.reward_mean == pytest.approx(stats["reward_mean"])
    assert merged_model.config.reward_std == pytest.approx(stats["reward_std"])
    ids = token_batch()
    with torch.no_grad():
        base = AutoModelForSequenceClassification.from_pretrained(str(models["tiny"]), num_labels=1)
        expected = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_dpo_starts_at_log_two(make_config, train, series):
    cfg = make_config("dpo", train__max_iterations=3, eval__data="", lora__rank=8, ckpt__save_hf_model="false")
    train(cfg)
    losses = [v for _, v in series(cfg.train.run_dir, "train/loss")]
    assert losses[0] == pytest.approx(math.log(2.0), rel=1e-5)  # LoRA B starts at zero: policy = reference
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_qlora_without_a_gpu_names_the_setting(make_config, train):
    cfg = make_config("sft", train__max_iterations=1, eval__data="", lora__rank=8, lora__load_in_4bit="true")
    with pytest.raises(LoraError, match="lora.load_in_4bit .QLoRA. needs a CUDA GPU"):
        train(cfg)
