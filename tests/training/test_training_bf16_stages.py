"""bf16 training engines at every ZeRO stage (one rank, gloo): DeepSpeed accepts the config we give it and steps.

DeepSpeed checks the model dtype against the gradient-accumulation dtype at initialisation, on CPU as on GPU; fp32
accumulation is refused at stage 0, which a GPU run of `--ds.zero_stage=0` found.
"""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.training.batching import TokenSample, make_micro_batches
from hpc_rlhf.training.deepspeed_setup import EngineConfig
from hpc_rlhf.training.models import Actor
from tests.multiproc import run_ranks


def train_one_bf16_step(stage: int) -> dict:
    """One train step of a bf16 tiny Llama through a DeepSpeed engine at `stage`, in a fresh one-rank gloo world."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    cfg = EngineConfig(zero_stage=stage, bf16=True, micro_train_batch_size=2, train_batch_size=4, learning_rate=1e-2)
    actor = Actor(model, cfg, None, num_training_steps=4)
    samples = [TokenSample(prompt_ids=torch.tensor([1, 2, 3]), response_ids=torch.tensor([4 + i, 5, 6]))
               for i in range(4)]
    batches = make_micro_batches(samples, micro_batch_size=2)
    before = [p.detach().float().clone() for p in actor.engine.module.parameters()]

    def loss_fn(batch, out):
        return -(out.log_probs * batch.action_mask).sum() / batch.action_mask.sum()

    metrics = actor.train_step(batches, loss_fn)
    after = [p.detach().float() for p in actor.engine.module.parameters()]
    return {"loss": float(metrics["loss"]), "moved": sum(int(not torch.equal(a, b)) for a, b in zip(before, after)),
            "total": len(before), "dtypes": {str(p.dtype) for p in actor.engine.module.parameters()},
            "optimizer": type(actor.engine.optimizer).__name__}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_actor_trains_at_zero_stage(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where DeepSpeed may leave files
    [result] = run_ranks(train_one_bf16_step, 1, stage, timeout_s=240)
    assert result["dtypes"] == {"torch.bfloat16"}, result
    assert result["moved"] == result["total"], result  # every parameter took the step
    assert result["loss"] > 0  # -mean log p of random tokens under a random model
