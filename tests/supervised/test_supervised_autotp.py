"""SFT with DeepSpeed AutoTP (ds.tensor_parallel_size: 2) on two gloo ranks through `python -m hpc_rlhf.train`: one
data-parallel replica split in two, so it trains exactly as one rank does (same losses, same held-out NLL, the same
saved weights within float32 summation order), and its checkpoints are written."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from hpc_rlhf.builtin_models.tiny import build_tiny_model
from hpc_rlhf.config.loading import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_sft_on_two_tensor_parallel_ranks_matches_one_rank(train, series, cli, tmp_path):
    model = build_tiny_model(tmp_path / "tiny", seed=0)
    overrides = [f"--actor.pretrain={model}", f"--data.dataset={REPO}/data/arithmetic/sft.jsonl",
                 f"--eval.data={REPO}/data/arithmetic_supervised/sft_test.jsonl", "--eval.steps=2",
                 "--train.max_iterations=4", "--train.micro_train_batch_size=4", "--train.train_batch_size=16",
                 "--ds.zero_stage=1", "--ckpt.save_steps=2", "--logger.use_tensorboard=false"]
    one = load_config(REPO / "configs" / "sft_tiny.yaml", [f"--train.run_dir={tmp_path / 'one'}",
                                                           "--logger.progress_bar=false", "--logger.plot=false",
                                                           *overrides]).config
    train(one)
    cli(REPO / "configs" / "sft_tiny.yaml", tmp_path / "tp2", 2, "--ds.tensor_parallel_size=2", *overrides)
    for key in ("train/loss", "eval/loss"):
        a, b = ([v for _, v in series(run, key)] for run in (tmp_path / "one", tmp_path / "tp2"))
        assert len(a) == len(b) == (4 if key == "train/loss" else 2)
        assert b == pytest.approx(a, rel=1e-5), key
    weights_one = load_file(tmp_path / "one" / "hf" / "actor" / "model.safetensors")
    weights_tp = load_file(tmp_path / "tp2" / "hf" / "actor" / "model.safetensors")  # gathered: whole shapes
    assert weights_one.keys() == weights_tp.keys()
    for name, expected in weights_one.items():
        assert weights_tp[name].shape == expected.shape, name
        assert float((weights_tp[name] - expected).abs().max()) <= 3e-5, name
    # DeepSpeed writes one model-state file per tensor-parallel rank.
    saved = sorted(p.name for p in (tmp_path / "tp2" / "checkpoints" / "iter_000004").rglob("mp_rank_*"))
    assert any("mp_rank_00" in name for name in saved) and any("mp_rank_01" in name for name in saved), saved
