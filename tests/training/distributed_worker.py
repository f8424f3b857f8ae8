"""One rank of the multi-process DeepSpeed tests: `run_rank`, run on every rank by conftest.run_world.

World layout: every rank joins one gloo world; `trainer_ranks` form the role group that trains. Other
ranks take no part: they note the time and wait at the final world barrier. Each rank of the role group
returns what the tests compare (losses, gradients, weights, log-probs).

Also imported by conftest for the tiny model and the data, so both sides build exactly the same ones.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB = 128


def tiny_llama(seed: int = 0, attn_implementation: str = "sdpa"):
    """The tiny random LlamaForCausalLM every training test uses (`varlen`: built with SDPA, then switched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpc_rlhf.training.varlen_attention import VARLEN, attn_implementation_to_load, use_varlen_attention

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         attn_implementation=attn_implementation_to_load(attn_implementation), pad_token_id=0)
    model = LlamaForCausalLM(config)
    if attn_implementation == VARLEN:
        use_varlen_attention(model)
    return model


def make_samples(seed: int, count: int, *, min_len: int = 2, max_len: int = 12):
    """Random prompts/responses with advantages, returns and a partial action mask, deterministic in `seed`."""
    from hpc_rlhf.training.batching import TokenSample

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        prompt_len, response_len = torch.randint(min_len, max_len + 1, (2,), generator=generator).tolist()
        response = torch.randint(1, VOCAB, (response_len,), generator=generator)
        action_mask = torch.rand(response_len, generator=generator) > 0.2
        action_mask[0] = True
        samples.append(TokenSample(
            prompt_ids=torch.randint(1, VOCAB, (prompt_len,), generator=generator),
            response_ids=response,
            action_mask=action_mask,
            response_tensors={"advantages": torch.randn(response_len, generator=generator),
                              "returns": torch.randn(response_len, generator=generator)},
        ))
    return samples


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def policy_loss(batch, output):
    """A REINFORCE-style token-mean loss: -A * log p over trained tokens; entropy as a metric."""
    mask = batch.action_mask.to(output.log_probs.device).float()
    advantages = batch.response_tensors["advantages"].to(output.log_probs.device)
    loss = masked_mean(-advantages * output.log_probs, mask)
    metrics = {}
    if output.entropy is not None:
        metrics["entropy"] = masked_mean(output.entropy, mask).detach()
    return loss, metrics


def value_loss(batch, output):
    mask = batch.action_mask.to(output.values.device).float()
    returns = batch.response_tensors["returns"].to(output.values.device)
    return masked_mean((output.values - returns) ** 2, mask)


def _full_grads(actor):
    from deepspeed.utils import safe_get_full_grad

    from hpc_rlhf.training.deepspeed_setup import engine_scope

    with engine_scope(actor.mpu):
        return {name: safe_get_full_grad(param).detach().clone()
                for name, param in actor.module.named_parameters()}


def run_roles(work_dir: Path, model_dir: str, group, dp_rank: int, dp_size: int, result: dict) -> None:
    """Actor ZeRO-3 + critic ZeRO-2 on the role group, resume, dynamic batching (ZeRO 0-2), reference ZeRO-3.

    Each data-parallel rank draws its own samples (seeded by step and dp rank), so a run depends on the
    group's size and order only, never on which global ranks form it.
    """
    from hpc_rlhf.training import Actor, Critic, EngineConfig, Reference, make_micro_batches

    steps = 3
    data = [make_samples(1000 * step + dp_rank, 4) for step in range(steps)]

    # 1. Actor (ZeRO-3) and critic (ZeRO-2) over the same ranks, stepped in turn.
    actor_cfg = EngineConfig(zero_stage=3, learning_rate=1e-2, micro_train_batch_size=2,
                             train_batch_size=4 * dp_size, max_norm=1.0, lr_warmup_steps=1,
                             lr_scheduler="cosine_with_min_lr", weight_decay=0.01, gradient_checkpointing=True)
    critic_cfg = EngineConfig(zero_stage=2, learning_rate=1e-2, micro_train_batch_size=2,
                              train_batch_size=4 * dp_size)
    actor = Actor(tiny_llama(0), actor_cfg, group, num_training_steps=steps, with_entropy=True)
    torch.manual_seed(1)  # the new value head's initialisation
    critic = Critic.from_pretrained(model_dir, critic_cfg, group, num_training_steps=steps)
    actor_metrics, critic_metrics = [], []
    for step in range(steps):
        if step == steps - 1:
            actor.save_state(work_dir / "actor_state", tag="before_last")
        batches = make_micro_batches(data[step], micro_batch_size=2, packing=step % 2 == 1)
        actor_metrics.append(actor.train_step(batches, policy_loss))
        critic_metrics.append(critic.train_step(batches, value_loss))
    result["actor_metrics"] = actor_metrics
    result["critic_metrics"] = critic_metrics
    result["actor_state"] = actor.full_state_dict()
    result["critic_state"] = critic.full_state_dict()
    actor.save_hf(work_dir / "actor_hf")
    critic.save_hf(work_dir / "critic_hf")

    # 2. Resume: a fresh ZeRO-3 engine loads the saved state and repeats the last step exactly.
    resumed = Actor(tiny_llama(123), actor_cfg, group, num_training_steps=steps, with_entropy=True)
    resumed.load_state(work_dir / "actor_state", tag="before_last")
    batches = make_micro_batches(data[steps - 1], micro_batch_size=2, packing=(steps - 1) % 2 == 1)
    result["resumed_metrics"] = resumed.train_step(batches, policy_loss)
    result["resumed_state"] = resumed.full_state_dict()
    del resumed

    # 3. Dynamic batching by token budget: ranks hold different numbers of micro-batches; every ZeRO stage.
    samples = make_samples(77 + dp_rank, 3 + 3 * dp_rank, max_len=10)
    batches = make_micro_batches(samples, max_tokens_per_microbatch=24, packing=True)
    result["dyn_num_micro_batches"] = len(batches)
    result["dyn_metrics"], result["dyn_grads"] = {}, {}
    for stage in (0, 1, 2):
        dyn_cfg = EngineConfig(zero_stage=stage, learning_rate=1e-2, micro_train_batch_size=1,
                               train_batch_size=dp_size)
        dyn = Actor(tiny_llama(0), dyn_cfg, group, num_training_steps=1)
        result["dyn_metrics"][stage] = dyn.backward(batches, policy_loss, loss_weighting="token")
        result["dyn_grads"][stage] = _full_grads(dyn)
        dyn.optimizer_step()
        del dyn

    # 4. Reference (ZeRO-3 inference) log-probs of this rank's samples, padded micro-batches of 3.
    reference = Reference.from_pretrained(model_dir, EngineConfig(zero_stage=3, train_batch_size=dp_size),
                                          group)
    ref_batches = make_micro_batches(samples, micro_batch_size=3, packing=False)
    result["ref_log_probs"] = [out.log_probs for out in reference.infer(ref_batches)]
    result["ref_sample_indices"] = [b.sample_indices for b in ref_batches]


def run_offload(work_dir: Path, model_dir: str, group, dp_rank: int, dp_size: int, result: dict) -> None:
    """Two steps with CPU Adam offload (ZeRO-2), CPU Adam + parameter offload (ZeRO-3) and bf16, against plain."""
    from hpc_rlhf.training import Actor, EngineConfig, make_micro_batches

    variants = {
        "plain": EngineConfig(zero_stage=2),
        "adam_offload": EngineConfig(zero_stage=2, adam_offload=True),
        "param_offload": EngineConfig(zero_stage=3, adam_offload=True, param_offload=True),
        "bf16": EngineConfig(zero_stage=2, bf16=True),
    }
    batches = make_micro_batches(make_samples(5 + dp_rank, 4), micro_batch_size=2, packing=True)
    for name, cfg in variants.items():
        cfg = EngineConfig(**{**vars(cfg), "learning_rate": 1e-2, "train_batch_size": dp_size})
        actor = Actor(tiny_llama(0), cfg, group, num_training_steps=2)
        result[name] = {"metrics": [actor.train_step(batches, policy_loss) for _ in range(2)],
                        "optimizer": type(actor.engine.optimizer.optimizer).__name__}
        del actor


def run_zero3_load(work_dir: Path, model_dir: str, group, dp_rank: int, dp_size: int, result: dict) -> None:
    """Checkpoint -> ZeRO-3 partitions without a full copy: partition sizes, gathered weights, a training step."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hpc_rlhf.training import Actor, Critic, EngineConfig, make_micro_batches
    from hpc_rlhf.training.zero3_loading import load_partitioned

    cfg = EngineConfig(zero_stage=3, learning_rate=1e-2, micro_train_batch_size=2, train_batch_size=4 * dp_size)
    model = load_partitioned(AutoModelForCausalLM, model_dir, cfg, group)
    result["partition_numels"] = {n: (p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()}
    gathered = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            gathered[name] = param.data.clone()
    result["gathered"] = gathered
    batches = make_micro_batches(make_samples(9 + dp_rank, 4), micro_batch_size=2)
    result["partitioned_step"] = Actor(model, cfg, group, num_training_steps=1).train_step(batches, policy_loss)
    result["whole_step"] = Actor(tiny_llama(0), cfg, group, num_training_steps=1).train_step(batches, policy_loss)
    critic = Critic.from_pretrained(model_dir, cfg, group, num_training_steps=1)
    result["critic_step"] = critic.train_step(batches, value_loss)
    try:
        load_partitioned(AutoModelForSequenceClassification, model_dir, cfg, group, num_labels=1)
    except ValueError as error:  # the new head is not allowed to be missing unless named
        result["missing_head_error"] = str(error)


def run_zero3_reward(work_dir: Path, model_dir: str, group, dp_rank: int, dp_size: int, result: dict) -> None:
    """A reward model partitioned over the group scores each rank's own sequences (a different count per rank,
    one rank none) as the same model held whole does."""
    from transformers import AutoModelForSequenceClassification

    from hpc_rlhf.rewards import RewardModel
    from hpc_rlhf.training import EngineConfig

    reward_dir = work_dir / "reward_model"
    if dp_rank == 0:
        torch.manual_seed(5)
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(reward_dir)
    dist.barrier(group=group)
    generator = torch.Generator().manual_seed(dp_rank)
    count = [5, 0, 2][dp_rank]
    sequences = [torch.randint(3, 60, (int(torch.randint(2, 9, (1,), generator=generator)),), generator=generator)
                 for _ in range(count)]
    zero3 = RewardModel(reward_dir, micro_batch_size=2,
                        zero3=EngineConfig(zero_stage=3, train_batch_size=dp_size), group=group)
    result["zero3_scores"] = zero3.score_sequences(sequences)
    result["whole_scores"] = RewardModel(reward_dir, micro_batch_size=2).score_sequences(sequences)


SCENARIOS = {"roles": run_roles, "offload": run_offload, "zero3_load": run_zero3_load,
             "zero3_reward": run_zero3_reward}


def run_rank(scenario: str, trainer_ranks: list[int], work_dir: str, model_dir: str) -> dict | None:
    """This rank's part of `scenario` in the gloo world: the result of a trainer rank, None for an idle one."""
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack if a rank hangs
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # A role group spanning the whole world is passed as None (the world), as colocated layouts do.
    group = None if trainer_ranks == list(range(world_size)) else dist.new_group(trainer_ranks)
    marker = Path(work_dir) / f"idle_rank_{rank}.json"
    result: dict | None = None
    if rank not in trainer_ranks:
        marker.write_text(json.dumps({"finished_at": time.time()}))
    else:
        dp_rank, dp_size = trainer_ranks.index(rank), len(trainer_ranks)
        result = {"dp_rank": dp_rank}
        SCENARIOS[scenario](Path(work_dir), model_dir, group, dp_rank, dp_size, result)
        idle = [r for r in range(world_size) if r not in trainer_ranks]
        result["idle_ranks_done_before_trainers"] = all(
            (Path(work_dir) / f"idle_rank_{r}.json").exists() for r in idle)
    dist.barrier()
    return result
