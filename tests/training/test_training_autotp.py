"""DeepSpeed AutoTP training (ds.tensor_parallel_size) on the CPU with gloo: two tensor-parallel ranks hold half of
each linear layer and train to the same losses and (gathered) weights as one rank; the layout arithmetic and the
engine config are pure and checked by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hpc_rlhf.builtin_models.tiny import build_tiny_model
from hpc_rlhf.training.deepspeed_setup import EngineConfig, make_ds_config, tensor_parallel_blocks
from tests.multiproc import run_ranks

STEPS = 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama") / "model", seed=0)


def train_tiny(model_dir: str, tp: int, zero_stage: int) -> dict:
    """STEPS optimizer steps of a token-mean NLL over 4 samples (2 micro-batches); every rank of a tensor-parallel
    block sees the same micro-batches. Returns the losses, the local shard shapes and the gathered weights."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.algos import sft_loss
    from hpc_rlhf.training.batching import TokenSample, make_micro_batches
    from hpc_rlhf.training.models import Actor

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    cfg = EngineConfig(zero_stage=zero_stage, micro_train_batch_size=2, train_batch_size=4, learning_rate=3e-3,
                       attn_implementation="eager", tensor_parallel_size=tp)
    actor = Actor(model, cfg, None, num_training_steps=STEPS)
    samples = [TokenSample(prompt_ids=torch.tensor([1, 20 + i, 30 + i, 40]), response_ids=torch.tensor([50 + i] * (2 + i) + [2]))
               for i in range(4)]
    batches = make_micro_batches(samples, micro_batch_size=2)
    losses = [actor.train_step(batches, lambda b, out: sft_loss(out.log_probs, b.action_mask))["loss"]
              for _ in range(STEPS)]
    shapes = {name: tuple(p.shape) for name, p in actor.module.named_parameters()}
    return {"losses": losses, "shapes": shapes, "dp_size": actor.dp_size, "state": actor.full_state_dict()}


@pytest.fixture(scope="module")
def one_rank(llama_dir) -> dict:
    return run_ranks(train_tiny, 1, str(llama_dir), 1, 1, timeout_s=180)[0]


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_two_tensor_parallel_ranks_train_like_one(llama_dir, one_rank, zero_stage):
    one = one_rank
    two = run_ranks(train_tiny, 2, str(llama_dir), 2, zero_stage, timeout_s=180)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert one["shapes"][q_proj] == (64, 64)
    for rank in two:  # AutoTP really shards: each rank holds half of the projections and of the LM head
        shapes = rank["shapes"]
        assert shapes[q_proj] == (32, 64) and shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
        assert shapes["model.layers.0.mlp.gate_proj.weight"] == (128, 64) and shapes["lm_head.weight"] == (180, 64)
        assert shapes["model.norm.weight"] == (64,)
        assert rank["dp_size"] == 1  # 2 ranks / tp 2: one data-parallel replica
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert one["losses"][-1] < one["losses"][0]  # the steps train
    writer, other = two
    assert other["state"] is None  # only tensor-parallel rank 0 of data-parallel rank 0 writes
    assert set(writer["state"]) == set(one["state"])
    # Adam moves every weight by up to lr x STEPS = 9e-3; the two runs agree to 1/100 of that (float32 sums in a
    # different order, which Adam's normalisation magnifies on near-zero gradients: 3.05e-5 seen on an AVX-512 CPU),
    # while each weight matrix really moved.
    initial = load_file(str(llama_dir / "model.safetensors"))
    for name, expected in one["state"].items():
        got = writer["state"][name]
        assert got.shape == expected.shape, name
        assert float((got - expected).abs().max()) <= 9e-5, (name, float((got - expected).abs().max()))
        if got.dim() == 2:
            assert float((expected - initial[name]).abs().max()) > 1e-3, name


@pytest.mark.parametrize("ranks, tp, blocks, dp_groups", [
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
    ([2, 3, 4, 5, 6, 7], 3, [[2, 3, 4], [5, 6, 7]], [[2, 5], [3, 6], [4, 7]]),
    ([4, 5], 1, [[4], [5]], [[4, 5]]),
])
def test_tensor_parallel_blocks(ranks, tp, blocks, dp_groups):
    assert tensor_parallel_blocks(ranks, tp) == (blocks, dp_groups)


def test_tensor_parallel_blocks_must_divide_the_group():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the group's 4 ranks"):
        tensor_parallel_blocks([0, 1, 2, 3], 3)


def test_engine_config_asks_deepspeed_for_autotp():
    cfg = EngineConfig(zero_stage=2, micro_train_batch_size=2, train_batch_size=8, tensor_parallel_size=2)
    # 4 ranks with tp 2 are 2 data-parallel replicas: 8 = 2 per micro-batch x 2 replicas x 2 accumulation steps.
    config = make_ds_config(cfg, dp_size=2)
    assert config["tensor_parallel"] == {"autotp_size": 2} and config["gradient_accumulation_steps"] == 2
    assert "tensor_parallel" not in make_ds_config(cfg, dp_size=2, training=False)
    assert "tensor_parallel" not in make_ds_config(EngineConfig(), dp_size=1)  # the default is unchanged
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs zero_stage <= 2, got zero_stage=3"):
        EngineConfig(zero_stage=3, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
