"""bf16 training engines at every ZeRO stage (one rank, gloo): DeepSpeed accepts the config we give it and steps.

DeepSpeed checks the model dtype against the gradient-accumulation dtype at initialisation, on CPU as on GPU; fp32
accumulation is refused at stage 0, which a GPU run of `--ds.zero_stage=0` found.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
from hpc_rlhf.training.batching import TokenSample, make_micro_batches
from hpc_rlhf.training.deepspeed_setup import EngineConfig
from hpc_rlhf.training.models import Actor

stage = int(sys.argv[1])
dist.init_process_group("gloo")
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
moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, after))
assert all(p.dtype == torch.bfloat16 for p in actor.engine.module.parameters())
print(f"RESULT stage={stage} loss={metrics['loss']:.4f} moved={moved}/{len(before)} "
      f"optimizer={type(actor.engine.optimizer).__name__}")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_actor_trains_at_zero_stage(stage, tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(stage)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    fields = dict(item.split("=") for item in result.split()[1:])
    moved, total = map(int, fields["moved"].split("/"))
    assert moved == total, result  # every parameter took the step
    assert float(fields["loss"]) > 0  # -mean log p of random tokens under a random model
