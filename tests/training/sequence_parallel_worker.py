"""One rank of the sequence-parallel tests: the actor, critic and reference on a role group of the whole world, with
`ring_attn_size` ranks per sequence-parallel group; each returns what the tests compare with the one-rank run."""

from __future__ import annotations

import shutil
import tempfile

import torch
import torch.distributed as dist

from tests.training.distributed_worker import VOCAB, make_samples, policy_loss, tiny_llama, value_loss

LEARNING_RATE = 1e-2  # large enough that one Adam step visibly moves every weight with a gradient


def tiny_critic(seed: int = 1):
    """A tiny random LlamaForSequenceClassification (num_labels=1) with the policy's shape."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         attn_implementation="sdpa", pad_token_id=0, num_labels=1)
    return LlamaForSequenceClassification(config)


def _full_grads(model) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    with model.scope():
        return {name: safe_get_full_grad(param).detach().clone() for name, param in model.module.named_parameters()}


def run_groups(groups: list[tuple[list[int], int]], stage: int, checkpointing: bool, actor_only: bool) -> dict:
    """For each (ranks, ring_attn_size) of `groups` holding this rank: `run_models` over those ranks. Every rank
    creates every group (in the same order), so one world runs a split and an unsplit setup side by side."""
    made = []
    for ranks, ring in groups:
        role_group = dist.new_group(ranks)
        mine = None
        for start in range(0, len(ranks), ring) if ring > 1 else ():  # consecutive ranks, as build_role_groups
            members = ranks[start:start + ring]
            group = dist.new_group(members)
            mine = group if dist.get_rank() in members else mine
        made.append((role_group, mine, ranks, ring))
    return {index: run_models(group, sp_group, ranks.index(dist.get_rank()) // ring, ring, len(ranks) // ring,
                              stage, checkpointing, actor_only)
            for index, (group, sp_group, ranks, ring) in enumerate(made) if dist.get_rank() in ranks}


def run_models(group, sp_group, share: int, ring: int, shares: int, stage: int, checkpointing: bool,
               actor_only: bool) -> dict:
    """Actor, critic and reference over `group` with `ring` ranks per sequence-parallel group, on the samples of
    `share` (of `shares`): several packed micro-batches of samples of different lengths."""
    from hpc_rlhf.rewards import RewardModel
    from hpc_rlhf.training import Actor, Critic, EngineConfig, Reference, make_micro_batches
    from hpc_rlhf.training.models import write_hf_checkpoint

    samples = make_samples(40 + share, 5, min_len=3, max_len=14)
    batches = make_micro_batches(samples, max_tokens_per_microbatch=40, packing=True)
    cfg = EngineConfig(zero_stage=stage, learning_rate=LEARNING_RATE, micro_train_batch_size=1, train_batch_size=shares,
                       ring_attn_size=ring, gradient_checkpointing=checkpointing)
    result: dict = {"share": share, "row_lengths": [b.input_ids.shape[1] for b in batches]}

    actor = Actor(tiny_llama(0), cfg, group, num_training_steps=1, with_entropy=True, sp_group=sp_group)
    result["sizes"] = (actor.sp_size, actor.batch_ranks, actor.batch_rank)
    outputs = actor.infer(batches)
    result["log_probs"] = [o.log_probs for o in outputs]
    result["entropy"] = [o.entropy for o in outputs]
    result["actor_metrics"] = actor.backward(batches, policy_loss, loss_weighting="token")
    result["actor_grads"] = _full_grads(actor)
    result["actor_step"] = actor.optimizer_step()
    result["actor_state"] = actor.full_state_dict()
    del actor
    if actor_only:
        return result

    critic = Critic(tiny_critic(1), cfg, group, num_training_steps=1, sp_group=sp_group)
    result["values"] = [o.values for o in critic.infer(batches)]
    result["critic_metrics"] = critic.backward(batches, value_loss, loss_weighting="sample")
    result["critic_grads"] = _full_grads(critic)
    del critic

    reference = Reference(tiny_llama(0), EngineConfig(zero_stage=3 if stage == 3 else 0, ring_attn_size=ring,
                                                      train_batch_size=shares), group, sp_group=sp_group)
    result["reference_log_probs"] = [o.log_probs for o in reference.infer(batches)]
    del reference

    folder = tempfile.mkdtemp(prefix="tiny_reward_")  # each rank its own copy of the same seeded model
    reward_net = tiny_critic(2)
    write_hf_checkpoint(reward_net, reward_net.state_dict(), folder)  # save_pretrained writes on global rank 0 only
    reward_model = RewardModel(folder, micro_batch_size=3, sp_group=sp_group)
    result["rewards"] = reward_model.score_sequences([torch.cat([s.prompt_ids, s.response_ids]) for s in samples])
    shutil.rmtree(folder)
    return result
