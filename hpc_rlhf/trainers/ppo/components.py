"""Build what one rank needs for its roles: engine, actor, critic, reference, reward source, tokenizer, prompts.

Every rank calls `build_components` with the same config; a rank builds only the pieces of the roles it holds, but
the DeepSpeed engines of a role are created collectively by all ranks of that role. A rank may hold several roles
(every role when colocated; e.g. reward and reference with `layout.reference.share_with: reward`) and then builds the
pieces of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import PromptExample, iterations_per_epoch, load_prompts
from hpc_rlhf.distributed import RoleGroups
from hpc_rlhf.generation import GenerationEngine, MultiTurnExecutor, SingleTurnExecutor
from hpc_rlhf.rewards import RewardModel, RewardSource, reward_source_from_config
from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.trainers.engines import bf16_enabled, compute_dtype, engine_config, lora_settings
from hpc_rlhf.trainers.generation_setup import build_generation
from hpc_rlhf.training.deepspeed_setup import EngineConfig
from hpc_rlhf.training.models import Actor, BaseOfLoraActor, Critic, Reference


def total_iterations(cfg: Config, num_prompts: int) -> int:
    """Iterations of the run: episodes x iterations per epoch, capped by max_iterations."""
    total = cfg.train.num_episodes * iterations_per_epoch(num_prompts, cfg.rollout.batch_size)
    if total < 1:
        raise ValueError(f"data.prompt_data has {num_prompts} prompts, fewer than rollout.batch_size="
                         f"{cfg.rollout.batch_size}: not one iteration can be formed")
    return min(total, cfg.train.max_iterations) if cfg.train.max_iterations else total


def optimizer_steps(cfg: Config, iterations: int) -> int:
    samples = cfg.rollout.batch_size * cfg.rollout.n_samples_per_prompt
    return max(1, iterations * cfg.train.max_epochs * samples // cfg.train.train_batch_size)


def reference_is_lora_base(cfg: Config, groups: RoleGroups, ref_path: str, actor_path: str) -> bool:
    """Whether the reference is the LoRA actor with its adapters off: a LoRA actor trained from the reference's
    weights, on the very ranks of the reference role (so both run their passes together)."""
    plan = groups.plan
    return (cfg.lora.rank > 0 and ref_path == actor_path
            and list(plan.ranks_of("reference")) == list(plan.ranks_of("actor")))


@dataclass
class Components:
    """The pieces a rank holds; None for roles it does not have."""

    tokenizer: PreTrainedTokenizerBase
    prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    total_iterations: int
    engine: Optional[GenerationEngine] = None  # on generator ranks
    executor: Optional[SingleTurnExecutor | MultiTurnExecutor] = None  # drives the engine, on generator ranks
    reward_source: Optional[RewardSource] = None  # function / remote source, on generator ranks
    reward_model: Optional[RewardModel] = None  # reward-model scorer, on reward ranks
    actor: Optional[Actor] = None
    critic: Optional[Critic] = None
    reference: Optional[Reference | BaseOfLoraActor] = None
    processor: Optional[Any] = None  # the vision-language model's processor, with data.max_images_per_prompt


def load_prompt_sets(cfg: Config, tokenizer: PreTrainedTokenizerBase, processor: Any = None
                     ) -> tuple[list[PromptExample], list[PromptExample]]:
    data = cfg.data
    common = dict(input_key=data.input_key, label_key=data.label_key, apply_chat_template=data.apply_chat_template,
                  input_template=data.input_template, tokenizer=tokenizer)
    if data.max_images_per_prompt:
        common.update(image_key=data.image_key, max_images=data.max_images_per_prompt,
                      image_token=processor.image_token)
    prompts = load_prompts(data.prompt_data, max_samples=data.max_samples, probabilities=data.prompt_data_probs,
                           seed=cfg.train.seed, **common)
    eval_prompts = load_prompts(cfg.eval.data, max_samples=cfg.eval.max_samples, **common) if cfg.eval.data else []
    return prompts, eval_prompts


def build_components(cfg: Config, groups: RoleGroups, device: torch.device) -> Components:
    """Construct this rank's pieces. Role groups with DeepSpeed engines are built in the fixed order
    actor, critic, reference so that collectives inside `deepspeed.initialize` line up across ranks."""
    roles = groups.roles
    actor_path = resolve_model_path(cfg.actor.pretrain)
    tokenizer = AutoTokenizer.from_pretrained(actor_path)
    processor = AutoProcessor.from_pretrained(actor_path) if cfg.data.max_images_per_prompt else None
    prompts, eval_prompts = load_prompt_sets(cfg, tokenizer, processor)
    total = total_iterations(cfg, len(prompts))
    parts = Components(tokenizer=tokenizer, prompts=prompts, eval_prompts=eval_prompts, total_iterations=total,
                       processor=processor)
    steps = optimizer_steps(cfg, total)
    with_entropy = cfg.algo.entropy_loss_coef > 0
    if roles.has("actor"):
        parts.actor = Actor.from_pretrained(actor_path, engine_config(cfg, cfg.actor), groups.group("actor"), steps,
                                            lora=lora_settings(cfg), temperature=max(cfg.rollout.temperature, 1e-6),
                                            with_entropy=with_entropy, sp_group=groups.sequence_group("actor"))
    if roles.has("critic"):
        critic_path = resolve_model_path(cfg.critic.pretrain or cfg.actor.pretrain)
        parts.critic = Critic.from_pretrained(critic_path, engine_config(cfg, cfg.critic), groups.group("critic"),
                                              steps, sp_group=groups.sequence_group("critic"))
    if roles.has("reference"):
        ref_path = resolve_model_path(cfg.ref.pretrain or cfg.actor.pretrain)
        if reference_is_lora_base(cfg, groups, ref_path, actor_path):
            parts.reference = BaseOfLoraActor(parts.actor)
        else:
            parts.reference = Reference.from_pretrained(ref_path, engine_config(cfg, cfg.actor),
                                                        groups.group("reference"),
                                                        temperature=max(cfg.rollout.temperature, 1e-6),
                                                        sp_group=groups.sequence_group("reference"))
    if roles.has("reward") and cfg.reward.pretrain:
        dtype = compute_dtype(cfg)
        zero3 = None
        if cfg.ds.zero_stage == 3:  # partitioned over the reward ranks, like the reference
            size = len(groups.plan.ranks_of("reward"))
            zero3 = EngineConfig(zero_stage=3, bf16=bf16_enabled(cfg), micro_train_batch_size=1, train_batch_size=size)
        parts.reward_model = RewardModel(resolve_model_path(cfg.reward.pretrain), device=device, dtype=dtype,
                                         micro_batch_size=cfg.reward.micro_batch_size, zero3=zero3,
                                         group=groups.group("reward"), sp_group=groups.sequence_group("reward"))
    if roles.has("generator"):
        parts.engine, parts.executor = build_generation(cfg, actor_path, tokenizer, device, groups.tp_group)
        if cfg.reward.reward_func_path or cfg.reward.remote_url:  # else a reward model or the agent's environment
            parts.reward_source = reward_source_from_config(cfg.reward)
    return parts
