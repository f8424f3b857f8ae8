"""Loading a checkpoint straight into ZeRO-3 partitions (no rank builds the whole model): on a 2-rank role group
inside a 3-rank world, each rank holds half of every parameter, the gathered weights are the checkpoint's bit for bit,
and a training step gives the same loss as the model loaded whole."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hpc_rlhf.training.zero3_loading import checkpoint_index, matching_name


@pytest.mark.timeout(300)
def test_partitioned_load_matches_checkpoint(tmp_path, tiny_model_dir, run_scenario):
    results = run_scenario(3, [1, 2], tmp_path, tiny_model_dir, "zero3_load")
    checkpoint = load_file(tiny_model_dir / "model.safetensors")
    for result in results:
        for name, (local, full) in result["partition_numels"].items():
            assert local == math.ceil(full / 2), f"{name}: rank holds {local} of {full} elements"
        for name, tensor in result["gathered"].items():
            assert torch.equal(tensor, checkpoint[matching_name(name, checkpoint)].to(tensor.dtype)), name
        assert result["partitioned_step"]["loss"] == result["whole_step"]["loss"]
        assert result["partitioned_step"]["grad_norm"] == pytest.approx(result["whole_step"]["grad_norm"], rel=1e-6)
        assert math.isfinite(result["critic_step"]["loss"])
        assert "no tensor for 1 parameter(s)" in result["missing_head_error"] and "score.weight" in result[
            "missing_head_error"]


def test_checkpoint_index_reads_single_and_sharded_folders(tmp_path, tiny_model_dir):
    single = checkpoint_index(tiny_model_dir)
    assert "model.embed_tokens.weight" in single and set(single.values()) == {tiny_model_dir / "model.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a.weight": "part-1.safetensors", "b.bias": "part-2.safetensors"}}')
    assert checkpoint_index(tmp_path) == {"a.weight": tmp_path / "part-1.safetensors",
                                          "b.bias": tmp_path / "part-2.safetensors"}
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        checkpoint_index(tmp_path / "empty")
    trunk = {"layers.0.mlp.up_proj.weight": tmp_path}
    assert matching_name("model.layers.0.mlp.up_proj.weight", trunk) == "layers.0.mlp.up_proj.weight"
    assert matching_name("score.weight", single) is None


@pytest.mark.timeout(300)
def test_partitioned_reward_model_scores_like_the_whole_one(tmp_path, tiny_model_dir, run_scenario):
    results = run_scenario(3, [0, 1, 2], tmp_path, tiny_model_dir, "zero3_reward")
    assert [len(r["zero3_scores"]) for r in results] == [5, 0, 2]
    for result in results:
        assert torch.allclose(result["zero3_scores"], result["whole_scores"], rtol=1e-5, atol=1e-6)
