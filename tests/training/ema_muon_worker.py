"""Rank functions of the EMA and Muon tests: one-rank DeepSpeed engines on the tiny model, on the CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.training.distributed_worker import make_samples, policy_loss, tiny_llama


def _weights(actor) -> dict[str, torch.Tensor]:
    """The actor's trainable weights as fp32 CPU copies (ZeRO-3 partitions gathered)."""
    from hpc_rlhf.distributed.weights import full_named_parameters
    from hpc_rlhf.training.deepspeed_setup import engine_scope

    with engine_scope(actor.mpu):
        return {name: full.detach().to("cpu", torch.float32, copy=True)
                for name, full in full_named_parameters(actor.hf_model(), copy_gathered=False)}


def _step(actor, step: int) -> dict[str, float]:
    from hpc_rlhf.training import make_micro_batches

    return actor.train_step(make_micro_batches(make_samples(100 + step, 4), micro_batch_size=2), policy_loss)


def run_ema(work_dir: str, zero_stage: int, beta: float, steps: int) -> dict:
    """Train `steps` steps with an EMA, recording the weights after each; checkpoint; resume into a fresh engine and
    take one more step on both; write the EMA as a Hugging Face model."""
    from hpc_rlhf.training import Actor, EngineConfig

    cfg = EngineConfig(zero_stage=zero_stage, learning_rate=1e-2, micro_train_batch_size=2, train_batch_size=4,
                       lr_scheduler="constant_with_warmup", ema_beta=beta)
    actor = Actor(tiny_llama(0), cfg, None, num_training_steps=steps + 1)
    history = [_weights(actor)]
    for step in range(steps):
        _step(actor, step)
        history.append(_weights(actor))
    ema_after = {name: tensor.clone() for name, tensor in actor.ema.state_dict().items()}
    actor.save_state(Path(work_dir) / "state", tag="k")
    resumed = Actor(tiny_llama(7), cfg, None, num_training_steps=steps + 1)
    resumed.load_state(Path(work_dir) / "state", tag="k")
    ema_resumed = {name: tensor.clone() for name, tensor in resumed.ema.state_dict().items()}
    _step(actor, steps)
    _step(resumed, steps)
    actor.save_ema_hf(Path(work_dir) / "actor_ema")
    return {"history": history, "ema_after": ema_after, "ema_resumed": ema_resumed,
            "ema_next": actor.ema.state_dict(), "ema_next_resumed": resumed.ema.state_dict()}


def hand_ema(history: list[dict[str, torch.Tensor]], beta: float) -> dict[str, np.ndarray]:
    """The recursion ema_0 = w_0, ema_t = beta * ema_(t-1) + (1 - beta) * w_t, elementwise in numpy float32."""
    b, one_minus_b = np.float32(beta), np.float32(1.0 - beta)
    ema = {name: tensor.numpy().copy() for name, tensor in history[0].items()}
    for weights in history[1:]:
        ema = {name: (b * ema[name]) + (one_minus_b * weights[name].numpy()) for name in ema}
    return ema


def run_muon(zero_stage: int, steps: int) -> dict:
    """One Muon step with the gradient recorded just before it (ZeRO-0 keeps it in param.grad), then more steps; the
    parameters' Muon tags and the losses."""
    from hpc_rlhf.training import Actor, EngineConfig, make_micro_batches

    cfg = EngineConfig(zero_stage=zero_stage, learning_rate=1e-3, muon_lr=0.02, muon_momentum=0.95, max_norm=0.0,
                       micro_train_batch_size=2, train_batch_size=4, lr_scheduler="constant_with_warmup",
                       optim="muon")
    actor = Actor(tiny_llama(0), cfg, None, num_training_steps=steps)
    model = actor.hf_model()
    result: dict = {"use_muon": {name: bool(p.use_muon) for name, p in model.named_parameters()}}
    batches = make_micro_batches(make_samples(5, 4), micro_batch_size=2)
    before = _weights(actor)
    metrics = actor.backward(batches, policy_loss)
    if zero_stage == 0:
        result["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        optimizer = actor.engine.optimizer
        result["groups"] = [{"use_muon": g["use_muon"], "lr": g["lr"], "names": [
            name for name, p in model.named_parameters() if any(p is q for q in g["params"])]}
            for g in optimizer.param_groups]
        result["ns_method"] = [g.get("ns_method", "gram") for g in optimizer.param_groups if g["use_muon"]][0]
    actor.optimizer_step()
    result["before"], result["after"] = before, _weights(actor)
    losses = [metrics["loss"]]
    for _ in range(steps - 1):  # the same batch again: its loss goes down
        losses.append(actor.train_step(batches, policy_loss)["loss"])
    result["losses"] = losses
    return result
