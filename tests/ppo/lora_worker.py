"""Ranks of the LoRA actor tests (run by tests.multiproc.run_ranks in one gloo world).

`run_sync`: a LoRA actor (peft adapters on a tiny Llama, real DeepSpeed) takes two GRPO steps on samples its own
generator drew, then sends its weights to Hugging Face engines that hold the plain base model: colocated (the actor's
rank loads its own engine) and, with `split`, disaggregated (world rank 0 is the actor, rank 1 a generator receiving the
broadcast). Every rank returns what the test compares: the actor's peft weights before and after, what its engines
hold, log-probs of the same tokens from the engine and from the actor, and the reference's from the actor with its
adapters off and from the base model loaded on its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LORA_RANK, LORA_ALPHA = 4, 8  # scale alpha / r = 2
VOCAB = 128


def tiny_llama_dir(path: str) -> str:
    """A tiny random Llama saved to `path` (every rank writes the same one; rank 0 first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                             eos_token_id=1, bos_token_id=2, attn_implementation="eager")
        LlamaForCausalLM(config).save_pretrained(path)
    dist.barrier()
    return path


def hf_engine(path: str):
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.generation import HFEngine

    return HFEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager"),
                    pad_token_id=0, static_decode=False)


def draw(engine, seed: int) -> list[list[list[int]]]:
    """[prompt, response ids, response log-probs] of 4 samples (2 prompts x 2) from `engine` at temperature 1."""
    from hpc_rlhf.generation import SamplingParams

    prompts = [[5, 17, 33, 9], [40, 41, 7]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=seed, ignore_eos=True)
    return [[prompt, list(s.response_ids), list(s.log_probs)]
            for prompt, samples in zip(prompts, engine.generate(prompts, params)) for s in samples]


def token_samples(drawn, rewards: list[float]):
    """GRPO samples: group-normalised rewards (2 per prompt) spread over the tokens, generator log-probs kept."""
    from hpc_rlhf.algos.advantages import group_normalized_rewards
    from hpc_rlhf.training.batching import TokenSample

    advantages = group_normalized_rewards(torch.tensor(rewards), 2)
    return [TokenSample(prompt_ids=torch.tensor(prompt), response_ids=torch.tensor(response),
                        response_tensors={"advantages": torch.full((len(response),), float(advantage)),
                                          "behaviour_log_probs": torch.tensor(log_probs)})
            for (prompt, response, log_probs), advantage in zip(drawn, advantages)]


def actor_log_probs(actor, drawn) -> list[list[float]]:
    """Log-probs of the drawn responses under `actor` (anything with `infer`: an Actor, a reference)."""
    from hpc_rlhf.training.batching import make_micro_batches, scatter_to_samples

    batches = make_micro_batches(token_samples(drawn, [0.0] * len(drawn)), micro_batch_size=2)
    outputs = actor.infer(batches)
    per_sample = scatter_to_samples(batches, [o.log_probs for o in outputs], len(drawn))
    return [values.tolist() for values in per_sample]


def raw_weights(model) -> dict[str, torch.Tensor]:
    """The peft model's own parameters (gathered under ZeRO-3), as fp32 copies."""
    import deepspeed

    named = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named if hasattr(p, "ds_id")], modifier_rank=None):
        return {name: p.data.detach().float().clone() for name, p in named}


def engine_weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters(remove_duplicate=False)}


def run_sync(model_dir: str, zero_stage: int, split: bool) -> dict:
    """See the module docstring. `split`: world = 1 actor + 1 generator; else every rank is a colocated actor."""
    from hpc_rlhf.config.schema import Config
    from hpc_rlhf.distributed.weights import sync_weights
    from hpc_rlhf.trainers.ppo.update import actor_loss_fn
    from hpc_rlhf.training.batching import make_micro_batches
    from hpc_rlhf.training.deepspeed_setup import EngineConfig
    from hpc_rlhf.training.lora import LoraSettings
    from hpc_rlhf.training.models import Actor, BaseOfLoraActor, Reference

    rank, world = dist.get_rank(), dist.get_world_size()
    path = tiny_llama_dir(model_dir)
    actor_ranks = [0] if split else list(range(world))
    actor_group = dist.new_group(actor_ranks)
    sync_group = dist.new_group(list(range(world))) if split else None
    out: dict = {}
    if rank not in actor_ranks:  # the generator of the split layout
        engine = hf_engine(path)
        sync_weights(None, engine, dtype=torch.float32, group=sync_group, src=0)
        out["engine"] = engine_weights(engine)
        out["drawn"] = draw(engine, seed=11)
        dist.broadcast_object_list([out["drawn"]], src=rank)  # the actor scores the same tokens
        return out

    cfg = EngineConfig(zero_stage=zero_stage, learning_rate=1e-2, micro_train_batch_size=2,
                       train_batch_size=2 * len(actor_ranks), attn_implementation="eager")
    actor = Actor.from_pretrained(path, cfg, actor_group, 4, lora=LoraSettings(rank=LORA_RANK, alpha=LORA_ALPHA))
    model = actor.hf_model()
    engine = hf_engine(path)  # the colocated generator: the base model before any sync
    out["initial"] = raw_weights(model)
    loss_fn = actor_loss_fn(Config())
    for step in range(2):  # the first step moves only B (A's gradient is zero while B is), the second both
        drawn = draw(engine, seed=100 * rank + step)
        batches = make_micro_batches(token_samples(drawn, [1.0, 0.0, 0.0, 1.0]), micro_batch_size=2)
        actor.train_step(batches, loss_fn)
        sync_weights(model, engine, dtype=torch.float32)  # colocated
    out["trained"] = raw_weights(model)
    out["engine"] = engine_weights(engine)
    drawn = draw(engine, seed=7)
    out["drawn"], out["actor_log_probs"] = drawn, actor_log_probs(actor, drawn)
    # The reference two ways: the actor with its adapters off, and the base model loaded on its own.
    out["base_log_probs"] = actor_log_probs(BaseOfLoraActor(actor), drawn)
    out["reference_log_probs"] = actor_log_probs(Reference.from_pretrained(path, cfg, actor_group), drawn)
    out["actor_log_probs_after"] = actor_log_probs(actor, drawn)  # the adapters are on again
    if split:
        sync_weights(model, None, dtype=torch.float32, group=sync_group, src=0, version=2, bucket_mb=0.01)
        box: list = [None]
        dist.broadcast_object_list(box, src=1)
        out["generator_drawn"], out["actor_log_probs_of_generator"] = box[0], actor_log_probs(actor, box[0])
    return out
