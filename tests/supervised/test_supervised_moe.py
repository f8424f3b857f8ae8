"""SFT of the tiny mixture-of-experts model (builtin:tiny-moe): with actor.aux_loss_coef the router's expert loads,
measured independently on held-out rows with plain transformers, end far more even than without it; the aux loss is
logged; a dense model with aux_loss_coef > 0 is refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpc_rlhf.builtin_models.tiny import build_tiny_moe_model
from hpc_rlhf.config.loading import load_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 30


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return build_tiny_moe_model(tmp_path_factory.mktemp("tiny_moe") / "model", seed=0)


def sft_config(model: Path, coef: float, run_dir: Path):
    return load_config(REPO / "configs" / "sft_tiny.yaml", [
        f"--train.run_dir={run_dir}", "--logger.progress_bar=false", "--logger.plot=false",
        "--logger.use_tensorboard=false", f"--actor.pretrain={model}", f"--actor.aux_loss_coef={coef}",
        f"--train.max_iterations={STEPS}", "--eval.steps=0", f"--data.dataset={REPO}/data/arithmetic/sft.jsonl",
        f"--eval.data={REPO}/data/arithmetic_supervised/sft_test.jsonl"]).config


@torch.no_grad()
def expert_loads(path: Path, texts: list[str]) -> torch.Tensor:
    """[layers, experts]: the share of each layer's top-k routing picks that go to each expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_experts)
    for text in texts:
        out = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]), output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            picks = logits.topk(config.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(picks, minlength=config.num_experts).float()
    return counts / counts.sum(-1, keepdim=True)


def imbalance(loads: torch.Tensor) -> float:
    """Mean over layers of the squared distance of the expert loads from the uniform 1 / experts."""
    return float(((loads - 1.0 / loads.shape[-1]) ** 2).sum(-1).mean())


def test_aux_loss_evens_out_the_router(moe_dir, train, series, tmp_path):
    rows = [json.loads(line) for line in (REPO / "data/arithmetic_supervised/sft_test.jsonl").read_text().splitlines()]
    texts = [row["input"] + row["response"] for row in rows[:50]]
    runs = {}
    for coef in (0.0, 1.0):
        cfg = sft_config(moe_dir, coef, tmp_path / f"coef_{coef}")
        train(cfg)
        runs[coef] = Path(cfg.train.run_dir)
    loads = {coef: expert_loads(run / "hf" / "actor", texts) for coef, run in runs.items()}
    plain, balanced = imbalance(loads[0.0]), imbalance(loads[1.0])
    assert balanced < 0.5 * plain, (loads[0.0], loads[1.0])
    # Both runs learn the task; the aux loss is logged only when it is on, and it stays near its even value (top_k).
    for run in runs.values():
        losses = [value for _, value in series(run, "train/loss")]
        assert len(losses) == STEPS and sum(losses[-5:]) < sum(losses[:5])
    assert series(runs[0.0], "train/aux_loss") == []
    aux = [value for _, value in series(runs[1.0], "train/aux_loss")]
    assert len(aux) == STEPS and all(2.0 <= value < 2.2 for value in aux[-5:]), aux


def test_a_dense_actor_with_aux_loss_is_refused_in_one_line(tmp_path, moe_dir):
    from hpc_rlhf.builtin_models.tiny import build_tiny_model
    from hpc_rlhf.config.preflight import check_moe_model
    from hpc_rlhf.training.deepspeed_setup import EngineConfig
    from hpc_rlhf.training.models import Actor

    dense = build_tiny_model(tmp_path / "dense", seed=0)
    for spec in (str(dense), "builtin:tiny-llama"):
        loaded = load_config(None, [f"--actor.pretrain={spec}", "--actor.aux_loss_coef=0.01"])
        errors = check_moe_model(loaded.config, loaded.sources)
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert errors[0].startswith("actor.aux_loss_coef (command line): 0.01 needs a mixture-of-experts "
                                    "actor.pretrain"), errors
    for spec in (str(moe_dir), "builtin:tiny-moe", "org/some-hub-model"):  # MoE, or not known on this machine
        loaded = load_config(None, [f"--actor.pretrain={spec}", "--actor.aux_loss_coef=0.01"])
        assert check_moe_model(loaded.config, loaded.sources) == []
    off = load_config(None, [f"--actor.pretrain={dense}"])
    assert check_moe_model(off.config, off.sources) == []
    # A model this machine could not check (a hub name) is refused when the actor is built, before any engine.
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="aux_loss_coef=0.01 needs a mixture-of-experts model .*LlamaForCausalLM"):
        Actor(AutoModelForCausalLM.from_pretrained(str(dense)), EngineConfig(aux_loss_coef=0.01), None, 1)
