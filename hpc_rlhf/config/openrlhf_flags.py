"""The table of OpenRLHF's flags: for each, its spellings (the older flat `--actor_learning_rate` and the current
nested `--actor.adam.lr`), the hpc_rlhf config keys it sets, or why it has no equivalent; and OpenRLHF's defaults that
differ from hpc_rlhf's. `hpc_rlhf.config.openrlhf` translates command lines with it; `tools/gen_config_docs.py`
renders it into docs/migrating_from_openrlhf.md.

The flags are those of `openrlhf.cli.*` in OpenRLHF 0.8 to 0.11 (flat names up to 0.9, nested groups from 0.10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

SUPERVISED = ("sft", "rm", "dpo", "kto", "prm", "kd")
ALL = ("ppo", *SUPERVISED, "rejection_sampling")
PPO = ("ppo",)
SAMPLING = ("ppo", "rejection_sampling")  # the trainers that generate from prompts
QLORA_TRAINERS = ("sft", "rm", "dpo", "kto", "kd")  # a 4-bit base: the trainers that never merge into a generator
LORA_TRAINERS = (*QLORA_TRAINERS, *SAMPLING)  # the generating ones send the merged weights to their generator
MIXING_SUPERVISED = ("sft", "rm", "dpo", "kto", "kd")  # the supervised trainers that mix data.dataset by probability
NO_LORA = tuple(t for t in ALL if t not in LORA_TRAINERS)
AUX_LOSS_TRAINERS = ("ppo", "sft", "dpo", "kto")  # the trainers whose actor adds a MoE load-balancing loss
TP_TRAINERS = ("sft",)  # the trainers wired for DeepSpeed AutoTP training (ds.tensor_parallel_size)

# OpenRLHF entry module (openrlhf.cli.NAME) -> train.trainer
ENTRY_TRAINERS = {"train_ppo_ray": "ppo", "train_ppo": "ppo", "train_sft": "sft", "train_rm": "rm",
                  "train_dpo": "dpo", "train_kto": "kto", "train_prm": "prm", "train_kd": "kd",
                  "batch_inference": "rejection_sampling"}
OTHER_ENTRIES = {"serve_rm": "serve a reward model over HTTP with tools/serve_reward.py",
                 "lora_combiner": "merge a LoRA adapter with tools/merge_lora.py",
                 "interactive_chat": "chat with a trained model through transformers (RUN_DIR/hf/actor)"}

# Value kinds, by how many command-line words they take: FLAG none (argparse store_true), STR/INT/FLOAT one,
# FLOATS/STRS all words up to the next --flag (argparse nargs).
FLAG, STR, INT, FLOAT, FLOATS, STRS = "flag", "str", "int", "float", "floats", "strs"
OPENRLHF_GPUS_PER_NODE = 8  # OpenRLHF's default for every --*_num_gpus_per_node


@dataclass(frozen=True)
class Flag:
    """One OpenRLHF flag in all its spellings (without --; flat first) and where its value goes.

    `keys` receive the value (after `convert`); `critic.*` keys only for ppo. `derived` flags are read by the
    `_derive_*` functions instead (`keys` then documents where they end up). A flag with `note` has no equivalent:
    giving it adds the note, unless its value is one of `inert` (a value that changes nothing in OpenRLHF either).
    """

    names: tuple[str, ...]
    kind: str
    keys: tuple[str, ...] = ()
    trainers: tuple[str, ...] = ALL
    convert: Optional[Callable[[Any], Any]] = None
    how: str = ""
    note: str = ""
    inert: tuple[str, ...] = ()
    derived: bool = False

    @property
    def name(self) -> str:
        return self.names[0]


def _steps(value: int) -> int:
    """OpenRLHF's -1 (never) for eval/save steps and frozen-actor steps is hpc_rlhf's 0."""
    return max(value, 0)


def _whole(value: float) -> int:
    if not float(value).is_integer():
        raise ValueError(f"expected a whole number of tokens, got {value}")
    return int(value)


def _probabilities(value: str) -> list[float]:
    """OpenRLHF's comma-separated sampling probabilities ("0.7,0.3") as a list of numbers."""
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {value!r}") from None


def _best_metric(value: str) -> str:
    """OpenRLHF's best-checkpoint metric: its pass@1 keys (and the empty value, which picks the first of them) are
    hpc_rlhf's eval/accuracy; `none` turns tracking off."""
    if value == "none":
        return ""
    if value == "" or value.endswith("_pass1"):
        return "eval/accuracy"
    raise ValueError(f"no hpc_rlhf evaluation metric corresponds to {value!r}: set ckpt.best_metric_key to one of "
                     "eval/accuracy, eval/reward_mean (PPO) or eval/loss (supervised, with ckpt.best_mode: min)")


def _optim(flat: str, field: str, kind: str, nested: str = "") -> list[Flag]:
    """An optimizer setting: the flat flag sets actor and critic alike; `--actor.X` / `--critic.X` set one."""
    nested = nested or field
    return [Flag((flat, nested) if nested != flat else (flat,), kind, (f"actor.{field}", f"critic.{field}")),
            Flag((f"actor.{nested}",), kind, (f"actor.{field}",), PPO),
            Flag((f"critic.{nested}",), kind, (f"critic.{field}",), PPO)]


def _no(names: tuple[str, ...], kind: str, why: str, trainers: tuple[str, ...] = ALL, inert: tuple[str, ...] = ()
        ) -> Flag:
    return Flag(names, kind, trainers=trainers, note=why, inert=inert)


FLAGS: tuple[Flag, ...] = (
    # ----- models, optimizer, precision (every entry) --------------------------------------------------------------
    Flag(("pretrain", "actor.model_name_or_path", "model.model_name_or_path"), STR, ("actor.pretrain",)),
    Flag(("actor_learning_rate", "learning_rate", "actor.adam.lr", "adam.lr"), FLOAT, ("actor.learning_rate",)),
    Flag(("critic_learning_rate", "critic.adam.lr"), FLOAT, ("critic.learning_rate",), PPO),
    *_optim("lr_warmup_ratio", "lr_warmup_ratio", FLOAT),
    *_optim("lr_scheduler", "lr_scheduler", STR),
    *_optim("min_lr_ratio", "min_lr_ratio", FLOAT),
    *_optim("max_norm", "max_norm", FLOAT),
    *_optim("adam_betas", "adam_betas", FLOATS, nested="adam.betas"),
    *_optim("l2", "weight_decay", FLOAT, nested="adam.weight_decay"),
    Flag(("gradient_checkpointing", "actor.gradient_checkpointing_enable", "model.gradient_checkpointing_enable"),
         FLAG, ("actor.gradient_checkpointing", "critic.gradient_checkpointing")),
    Flag(("flash_attn",), FLAG, ("actor.attn_implementation", "critic.attn_implementation"),
         convert=lambda _: "flash_attention_2", how="flash_attention_2"),
    Flag(("attn_implementation", "ds.attn_implementation"), STR,
         ("actor.attn_implementation", "critic.attn_implementation")),
    Flag(("seed", "train.seed"), INT, ("train.seed",)),
    Flag(("zero_stage", "ds.zero_stage"), INT, ("ds.zero_stage",)),
    Flag(("bf16",), FLAG, ("ds.bf16",)),
    Flag(("param_dtype", "ds.param_dtype"), STR, ("ds.bf16",), derived=True, how="bf16 -> true"),
    Flag(("adam_offload", "ds.adam_offload"), FLAG, ("ds.adam_offload",)),
    Flag(("overlap_comm", "ds.overlap_comm"), FLAG, ("ds.overlap_comm",)),
    Flag(("packing_samples", "ds.packing_samples"), FLAG, ("train.packing_samples",)),
    Flag(("lora_rank", "ds.lora.rank"), INT, ("lora.rank",), LORA_TRAINERS),
    Flag(("lora_alpha", "ds.lora.alpha"), INT, ("lora.alpha",), LORA_TRAINERS),
    Flag(("lora_dropout", "ds.lora.dropout"), FLOAT, ("lora.dropout",), LORA_TRAINERS),
    Flag(("target_modules", "ds.lora.target_modules"), STRS, ("lora.target_modules",), LORA_TRAINERS),
    Flag(("load_in_4bit", "ds.load_in_4bit"), FLAG, ("lora.load_in_4bit",), QLORA_TRAINERS),
    # ----- batches, data, evaluation, checkpoints, logs -------------------------------------------------------------
    Flag(("train_batch_size", "train.batch_size"), INT, ("train.train_batch_size",)),
    Flag(("micro_train_batch_size", "train.micro_batch_size"), INT, ("train.micro_train_batch_size",)),
    Flag(("max_epochs", "train.max_epochs"), INT, ("train.max_epochs",)),
    Flag(("input_key", "data.input_key"), STR, ("data.input_key",)),
    Flag(("prompt_key", "data.prompt_key"), STR, ("data.input_key",), ("rm", "dpo")),
    Flag(("output_key", "data.output_key"), STR, ("data.output_key",)),
    Flag(("label_key", "data.label_key"), STR, ("data.label_key",)),
    Flag(("chosen_key", "data.chosen_key"), STR, ("data.chosen_key",), ("rm", "dpo")),
    Flag(("rejected_key", "data.rejected_key"), STR, ("data.rejected_key",), ("rm", "dpo")),
    Flag(("input_template", "data.input_template"), STR, ("data.input_template",)),
    Flag(("apply_chat_template", "data.apply_chat_template"), FLAG, ("data.apply_chat_template",)),
    Flag(("max_samples", "data.max_samples"), INT, ("data.max_samples",)),
    Flag(("data.image_key",), STR, ("data.image_key",), PPO),  # OpenRLHF's VLM options exist in nested form only
    Flag(("data.max_images_per_prompt",), INT, ("data.max_images_per_prompt",), PPO),
    Flag(("dataset", "data.dataset"), STR, ("data.dataset",), SUPERVISED),
    Flag(("dataset_probs", "data.dataset_probs"), STR, ("data.dataset_probs",), MIXING_SUPERVISED,
         convert=_probabilities, how="0.7,0.3 -> [0.7, 0.3]"),
    Flag(("dataset", "data.dataset"), STR, ("data.prompt_data",), ("rejection_sampling",)),
    Flag(("max_len", "data.max_len"), INT, ("data.max_len",), SUPERVISED),
    Flag(("eval_dataset", "eval.dataset"), STR, ("eval.data",)),
    Flag(("eval_steps", "eval.steps"), INT, ("eval.steps",), convert=_steps, how="-1 -> 0 (at the end)"),
    Flag(("save_path", "ckpt.output_dir"), STR, ("train.run_dir",),
         how="everything goes there: checkpoints, rollouts, logs, the final model in hf/"),
    Flag(("save_steps", "ckpt.save_steps"), INT, ("ckpt.save_steps",), convert=_steps, how="-1 -> 0 (at the end)"),
    Flag(("max_ckpt_num", "ckpt.max_num"), INT, ("ckpt.max_ckpt_num",)),
    Flag(("load_checkpoint", "ckpt.load_enable"), FLAG, ("ckpt.load_checkpoint",)),
    Flag(("logging_steps", "logger.logging_steps"), INT, ("logger.logging_steps",)),
    Flag(("use_tensorboard", "logger.tensorboard_dir"), STR, ("logger.use_tensorboard",), convert=lambda _: True,
         how="true; the logs go to RUN_DIR/tensorboard"),
    # ----- supervised and preference trainers ---------------------------------------------------------------------
    Flag(("multiturn", "data.multiturn"), FLAG, ("sft.multiturn",), ("sft",)),
    Flag(("pretrain_mode", "model.pretrain_mode_enable", "actor.pretrain_mode_enable"), FLAG,
         ("sft.pretrain_mode",), ("sft",)),
    Flag(("beta", "model.beta"), FLOAT, ("pref.beta",), ("dpo", "kto")),
    Flag(("ipo", "model.ipo_enable"), FLAG, ("pref.loss_type",), ("dpo",), convert=lambda _: "ipo", how="ipo"),
    Flag(("label_smoothing", "model.label_smoothing"), FLOAT, ("pref.label_smoothing",), ("dpo",)),
    Flag(("nll_loss_coef", "model.nll_loss_coef"), FLOAT, ("pref.nll_loss_coef",), ("dpo",)),
    Flag(("ref_pretrain", "ref.model_name_or_path"), STR, ("ref.pretrain",), ("dpo", "kto")),
    Flag(("loss", "model.loss_type"), STR, ("pref.rm_loss",), ("rm",)),
    Flag(("margin_loss", "model.margin_loss_enable"), FLAG, ("pref.margin_key",), ("rm",),
         convert=lambda _: "margin", how="margin (the column OpenRLHF reads)"),
    Flag(("desirable_loss_weight",), FLOAT, ("pref.desirable_weight",), ("kto",)),
    Flag(("undesirable_loss_weight",), FLOAT, ("pref.undesirable_weight",), ("kto",)),
    Flag(("placeholder_token",), STR, ("prm.placeholder_token",), ("prm",)),
    Flag(("reward_tokens",), STRS, ("prm.reward_tokens",), ("prm",)),
    Flag(("teacher_model",), STR, ("kd.teacher_pretrain",), ("kd",)),
    Flag(("kd_coef",), FLOAT, ("kd.kd_coef",), ("kd",)),
    # ----- PPO family: prompts, sampling, algorithm ---------------------------------------------------------------
    Flag(("prompt_data", "data.prompt_dataset"), STR, ("data.prompt_data",), PPO),
    Flag(("prompt_data_probs", "data.prompt_probs"), STR, ("data.prompt_data_probs",), PPO, convert=_probabilities,
         how="0.7,0.3 -> [0.7, 0.3]"),
    Flag(("rollout_batch_size", "rollout.batch_size"), INT, ("rollout.batch_size",), SAMPLING),
    Flag(("n_samples_per_prompt", "rollout.n_samples_per_prompt"), INT, ("rollout.n_samples_per_prompt",), PPO),
    Flag(("micro_rollout_batch_size", "rollout.micro_batch_size"), INT, ("ref.micro_batch_size",
                                                                       "reward.micro_batch_size"), PPO),
    Flag(("num_episodes", "train.num_episodes"), INT, ("train.num_episodes",), PPO),
    Flag(("prompt_max_len",), INT, ("rollout.prompt_max_len",), PPO, derived=True),
    Flag(("generate_max_len", "max_new_tokens", "rollout.max_new_tokens"), INT, ("rollout.generate_max_len",), PPO,
         derived=True),
    Flag(("max_len", "data.max_len"), INT, ("rollout.prompt_max_len",), PPO, derived=True,
         how="prompt budget = max_len - generate_max_len"),
    Flag(("temperature", "rollout.temperature"), FLOAT, ("rollout.temperature",), SAMPLING),
    Flag(("top_p", "rollout.top_p"), FLOAT, ("rollout.top_p",), SAMPLING),
    Flag(("advantage_estimator", "algo.advantage.estimator"), STR, ("algo.advantage_estimator",), PPO),
    Flag(("gamma", "algo.advantage.gamma"), FLOAT, ("algo.gamma",), PPO),
    Flag(("lambd", "algo.advantage.lambd"), FLOAT, ("algo.lambd",), PPO),
    Flag(("no_advantage_std_norm", "algo.advantage.no_std_norm"), FLAG, ("algo.advantage_std_norm",), PPO,
         convert=lambda _: False, how="false"),
    Flag(("eps_clip", "actor.eps_clip"), FLOAT, ("algo.eps_clip_low", "algo.eps_clip_high"), PPO, derived=True),
    Flag(("eps_clip_low_high", "actor.eps_clip_low_high"), FLOATS, ("algo.eps_clip_low", "algo.eps_clip_high"), PPO,
         derived=True),
    Flag(("dual_clip", "actor.dual_clip"), FLOAT, ("algo.dual_clip",), PPO),
    Flag(("value_clip", "critic.value_clip"), FLOAT, ("algo.value_clip",), PPO),
    Flag(("init_kl_coef", "algo.kl.init_coef"), FLOAT, ("algo.init_kl_coef", "algo.kl_loss_coef"), PPO,
         derived=True, how="kl_loss_coef with --use_kl_loss (then init_kl_coef 0)"),
    Flag(("use_kl_loss", "algo.kl.use_loss"), FLAG, ("algo.use_kl_loss",), PPO, derived=True),
    Flag(("kl_target", "algo.kl.target"), FLOAT, ("algo.kl_target",), PPO),
    Flag(("kl_horizon", "algo.kl.horizon"), INT, ("algo.kl_horizon",), PPO),
    Flag(("kl_estimator", "algo.kl.estimator"), STR, ("algo.kl_estimator",), PPO),
    Flag(("entropy_loss_coef", "actor.entropy_coef"), FLOAT, ("algo.entropy_loss_coef",), PPO),
    Flag(("policy_loss_type", "actor.policy_loss_type"), STR, ("algo.policy_loss_type",), PPO),
    Flag(("loss_agg_mode", "actor.loss_agg_mode"), STR, ("algo.loss_agg_mode",), PPO,
         convert=lambda v: v.replace("-", "_"), how="token-mean -> token_mean"),
    Flag(("normalize_reward", "reward.normalize_enable"), FLAG, ("algo.normalize_reward",), PPO),
    Flag(("reward_clip_range", "reward.clip_range"), FLOATS, ("algo.reward_clip_range",), PPO),
    Flag(("overlong_buffer_len", "reward.overlong_buffer_len"), FLOAT, ("algo.overlong_buffer_len",), PPO,
         convert=_whole),
    Flag(("overlong_penalty_factor", "reward.overlong_penalty_factor"), FLOAT, ("algo.overlong_penalty_factor",),
         PPO),
    Flag(("stop_properly_penalty_coef", "reward.stop_properly_penalty_coef"), FLOAT,
         ("algo.stop_properly_penalty_coef",), PPO),
    Flag(("dynamic_filtering", "algo.dynamic_filtering_enable"), FLAG, ("rollout.dynamic_filtering",), PPO),
    Flag(("partial_rollout", "train.partial_rollout_enable"), FLAG, ("rollout.partial_rollout",), PPO),
    Flag(("dynamic_filtering_reward_range", "algo.dynamic_filtering_range"), FLOATS,
         ("rollout.dynamic_filtering_reward_range",), PPO),
    Flag(("freezing_actor_steps", "critic.freezing_steps"), INT, ("critic.freezing_actor_steps",), PPO,
         convert=_steps, how="-1 -> 0"),
    Flag(("enable_vllm_is_correction", "algo.advantage.is_correction_enable"), FLAG,
         ("algo.off_policy_correction",), PPO, derived=True),
    Flag(("vllm_is_correction_type", "algo.advantage.is_correction_type"), STR, ("algo.off_policy_correction",),
         PPO, derived=True, how="seq-mask-tis -> seq_mask_tis"),
    Flag(("algo.advantage.is_correction_level",), STR, ("algo.off_policy_correction",), PPO, derived=True,
         how="off -> none; token + clip -> tis; token + mask -> icepop; seq + mask -> seq_mask_tis"),
    Flag(("algo.advantage.is_correction_mode",), STR, ("algo.off_policy_correction",), PPO, derived=True),
    Flag(("algo.advantage.is_correction_gating",), STR, ("algo.off_policy_correction",), PPO, derived=True,
         how="ratio only"),
    Flag(("vllm_is_truncated_threshold", "algo.advantage.is_correction_threshold"), FLOATS,
         ("algo.is_low", "algo.is_high"), PPO, derived=True),
    Flag(("use_dynamic_batch", "train.dynamic_batch_enable"), FLAG, ("train.max_tokens_per_microbatch",), PPO,
         derived=True, how="train_max_tokens_per_gpu (16192 when not given)"),
    Flag(("train_max_tokens_per_gpu", "train.max_tokens_per_gpu"), INT, ("train.max_tokens_per_microbatch",), PPO,
         derived=True),
    Flag(("eval_temperature", "eval.temperature"), FLOAT, ("eval.temperature",), PPO),
    Flag(("eval_n_samples_per_prompt", "eval.n_samples_per_prompt"), INT, ("eval.n_samples_per_prompt",), PPO),
    # ----- PPO family: models, rewards, GPUs ----------------------------------------------------------------------
    Flag(("reward_pretrain", "reward.model_name_or_path"), STR, ("reward.pretrain",), PPO, derived=True),
    Flag(("remote_rm_url", "reward.remote_url"), STR, ("reward.remote_url", "reward.reward_func_path"), PPO,
         derived=True, how="a .py file -> reward.reward_func_path"),
    Flag(("agent_func_path", "train.agent_func_path"), STR, ("rollout.agent_func_path",), PPO, derived=True),
    Flag(("critic_pretrain", "critic.model_name_or_path"), STR, ("critic.pretrain",), PPO, derived=True,
         how="gae only; not given: the reward model, as OpenRLHF"),
    Flag(("save_value_network", "critic.save_value_network"), FLAG, (), PPO,
         how="always: the critic goes to RUN_DIR/hf/critic"),
    Flag(("enable_prefix_caching", "vllm.enable_prefix_caching"), FLAG, ("vllm.enable_prefix_caching",), SAMPLING),
    Flag(("enforce_eager", "vllm.enforce_eager"), FLAG, ("vllm.enforce_eager",), PPO),
    Flag(("vllm_enable_sleep", "vllm.enable_sleep"), FLAG, ("vllm.enable_sleep",), PPO),
    Flag(("deepspeed_enable_sleep", "ds.enable_sleep"), FLAG, ("ds.enable_sleep",), PPO),
    Flag(("vllm_gpu_memory_utilization", "vllm.gpu_memory_utilization"), FLOAT, ("vllm.gpu_memory_utilization",),
         PPO),
    Flag(("async_train", "train.async_enable"), FLAG, ("rollout.async_queue",), PPO, derived=True),
    Flag(("async_queue_size", "train.async_queue_size"), INT, ("rollout.async_queue",), PPO, derived=True),
    *(Flag((f"{role}_num_nodes", f"{role}.num_nodes"), INT, ("slurm.nodes",), PPO, derived=True)
      for role in ("actor", "critic", "ref", "reward")),
    *(Flag((f"{role}_num_gpus_per_node", f"{role}.num_gpus_per_node"), INT, (f"layout.{key}.gpus",), PPO,
           derived=True, how="x num_nodes = the role's ranks")
      for role, key in (("actor", "actor"), ("critic", "critic"), ("ref", "reference"), ("reward", "reward"))),
    Flag(("vllm_num_engines", "vllm.num_engines"), INT, ("layout.generator.gpus",), PPO, derived=True,
         how="x vllm_tensor_parallel_size = generator ranks"),
    Flag(("vllm_tensor_parallel_size", "vllm.tensor_parallel_size"), INT, ("layout.generator.tp",), PPO,
         derived=True),
    Flag(("colocate_all_models", "train.colocate_all"), FLAG, ("layout.colocate",), PPO, derived=True),
    Flag(("colocate_actor_ref", "train.colocate_actor_ref"), FLAG, ("layout.reference.share_with",), PPO,
         derived=True, how="actor"),
    Flag(("colocate_critic_reward", "train.colocate_critic_reward"), FLAG, ("layout.reward.share_with",), PPO,
         derived=True, how="critic"),
    # ----- batch_inference (one step of OpenRLHF's rejection-sampling pipeline) ------------------------------------
    Flag(("best_of_n",), INT, ("rollout.n_samples_per_prompt",), ("rejection_sampling",)),
    Flag(("max_new_tokens",), INT, ("rollout.generate_max_len",), ("rejection_sampling",)),
    Flag(("prompt_max_len",), INT, ("rollout.prompt_max_len",), ("rejection_sampling",)),
    Flag(("greedy_sampling",), FLAG, ("rollout.temperature",), ("rejection_sampling",), convert=lambda _: 0.0,
         how="0.0"),
    Flag(("micro_batch_size",), INT, ("rollout.micro_batch_size",), ("rejection_sampling",)),
    Flag(("max_num_seqs",), INT, ("vllm.max_num_seqs",), ("rejection_sampling",)),
    Flag(("output_path",), STR, ("rejection_sampling.output_path",), ("rejection_sampling",)),
    Flag(("tp_size",), INT, ("layout.generator.tp",), ("rejection_sampling",), derived=True),
    Flag(("eval_task",), STR, ("reward.pretrain",), ("rejection_sampling",), derived=True,
         how="rm: --pretrain is the reward model"),
    # ----- logging -------------------------------------------------------------------------------------------------
    Flag(("use_wandb", "logger.wandb.key"), STR, ("logger.use_wandb",), convert=lambda _: True,
         how="true; the API key is not written into the config: export WANDB_API_KEY=... in the batch script"),
    *(Flag((f"wandb_{part}", f"logger.wandb.{part}"), STR, (f"logger.wandb_{part}",))
      for part in ("org", "group", "project", "run_name")),
    # ----- no equivalent ------------------------------------------------------------------------------------------
    _no(("local_rank",), INT, "set by the deepspeed launcher; srun starts one process per rank here"),
    _no(("ckpt_path", "ckpt.path"), STR, "checkpoints go to RUN_DIR/checkpoints (train.run_dir, from --save_path)"),
    _no(("save_hf_ckpt", "ckpt.save_hf"), FLAG, "checkpoints hold DeepSpeed states; the HF model is written at the "
        "end (ckpt.save_hf_model)"),
    _no(("disable_ds_ckpt", "ckpt.disable_ds"), FLAG, "a requeued job resumes from the DeepSpeed states, so they "
        "are always saved"),
    _no(("max_ckpt_mem", "ckpt.max_mem"), FLOAT, "checkpoints are limited by count (ckpt.max_ckpt_num), not size"),
    Flag(("use_ds_universal_ckpt", "ds.use_universal_ckpt"), FLAG, ("ds.universal_ckpt",)),
    Flag(("ckpt.best_metric_key",), STR, ("ckpt.best_metric_key",), convert=_best_metric,
         how="eval_*_pass1 (and the auto-detecting empty value) -> eval/accuracy; none -> empty (off)"),
    _no(("deepcompile", "ds.deepcompile"), FLAG, "no DeepCompile; actor.compile / critic.compile torch.compile "
        "each decoder layer instead"),
    _no(("zpg", "ds.zpg"), INT, "no ZeRO++ hierarchical partitioning", inert=("1",)),
    _no(("grad_accum_dtype", "ds.grad_accum_dtype"), STR, "gradients accumulate in DeepSpeed's default dtype"),
    _no(("use_liger_kernel", "ds.use_liger_kernel"), FLAG, "no Liger kernels"),
    _no(("gradient_checkpointing_use_reentrant", "actor.gradient_checkpointing_reentrant",
         "model.gradient_checkpointing_reentrant"), FLAG, "checkpointing is always non-reentrant"),
    _no(("disable_fast_tokenizer", "data.disable_fast_tokenizer"), FLAG, "the tokenizer AutoTokenizer picks is used"),
    _no(("dataloader_num_workers", "data.dataloader_num_workers"), INT, "data is read in the training process",
        inert=("0",)),
    Flag(("ds_tensor_parallel_size", "ds.tensor_parallel_size"), INT, ("ds.tensor_parallel_size",), TP_TRAINERS),
    _no(("ds_tensor_parallel_size", "ds.tensor_parallel_size"), INT, "DeepSpeed AutoTP training is wired for sft "
        "only", tuple(t for t in ALL if t not in TP_TRAINERS), inert=("1",)),
    Flag(("ring_attn_size", "ds.ring_attn_size"), INT, ("ds.ring_attn_size",), PPO,
         how="sequence parallelism by all-gathered keys/values instead of a ring (same split, same results)"),
    _no(("ring_head_stride", "ds.ring_attn_head_stride"), INT,
        "no ring of heads: ds.ring_attn_size gathers whole keys and values", inert=("1",)),
    _no(("experts_implementation", "ds.experts_implementation"), STR, "MoE layers run as transformers implements "
        "them"),
    Flag(("enable_ema", "train.enable_ema"), FLAG, ("actor.enable_ema",),
         how="the EMA goes to RUN_DIR/hf/actor_ema, beside the trained actor"),
    Flag(("ema_beta", "train.ema_beta"), FLOAT, ("actor.ema_beta",)),
    _no(("full_determinism", "train.full_determinism_enable"), FLAG, "runs are seeded (train.seed); no "
        "deterministic-algorithms switch"),
    Flag(("aux_loss_coef", "actor.aux_loss_coef", "model.aux_loss_coef"), FLOAT, ("actor.aux_loss_coef",),
         AUX_LOSS_TRAINERS),
    _no(("aux_loss_coef", "actor.aux_loss_coef", "model.aux_loss_coef"), FLOAT, "the MoE load-balancing loss is "
        "added to the causal-LM actor's loss (ppo, sft, dpo, kto), not to reward, process-reward or distilled "
        "models", tuple(t for t in ALL if t not in AUX_LOSS_TRAINERS), inert=("0", "0.0")),
    _no(("value_head_prefix", "ds.value_head_prefix"), STR, "reward models and critics use the "
        "AutoModelForSequenceClassification head (score)", inert=("score",)),
    _no(("use_ms",), FLAG, "models load from local folders or the Hugging Face Hub, not ModelScope"),
    _no(("tokenizer_chat_template", "data.tokenizer_chat_template"), STR, "the tokenizer's own chat template is "
        "used"),
    _no(("dataset_probs", "data.dataset_probs"), STR, "prm and batch_inference read their datasets one after "
        "another; mixing with probabilities is wired for ppo, sft, rm, dpo, kto and kd",
        tuple(t for t in ALL if t not in MIXING_SUPERVISED and t != "ppo")),
    _no(("dataset_split", "data.dataset_split", "prompt_split", "data.prompt_split", "train_split"), STR,
        "whole files are read: point the data keys at the split's files", inert=("train",)),
    _no(("eval_split", "eval.split"), STR, "whole files are read: point eval.data at the split's files"),
    *_optim("optim", "optim", STR),
    *_optim("muon.lr", "muon_lr", FLOAT, nested="muon.lr"),
    *_optim("muon.momentum", "muon_momentum", FLOAT, nested="muon.momentum"),
    _no(("adam.eps", "actor.adam.eps", "critic.adam.eps"), FLOAT, "AdamW's eps is fixed at 1e-8",
        inert=("1e-8", "1e-08")),
    *(_no((f"{prefix}muon.{part}",), kind, "DeepSpeed's Muon always runs 5 Newton-Schulz steps on Nesterov "
          "momentum", inert=inert) for prefix in ("", "actor.", "critic.")
      for part, kind, inert in (("ns_steps", INT, ("5",)), ("nesterov", FLAG, ()), ("no_nesterov", FLAG, ()))),
    _no(("lora_rank", "ds.lora.rank"), INT, "LoRA is wired for sft, rm, dpo, kto, kd, ppo and rejection sampling",
        NO_LORA, inert=("0",)),
    *(_no(names, kind, "LoRA is wired for sft, rm, dpo, kto, kd, ppo and rejection sampling", NO_LORA)
      for names, kind in ((("lora_alpha", "ds.lora.alpha"), INT), (("lora_dropout", "ds.lora.dropout"), FLOAT),
                          (("target_modules", "ds.lora.target_modules"), STRS),
                          (("load_in_4bit", "ds.load_in_4bit"), FLAG))),
    _no(("load_in_4bit", "ds.load_in_4bit"), FLAG, "the generator runs the adapters merged into the base, which a "
        "4-bit base cannot take: LoRA on a full-precision base", SAMPLING),
    _no(("ref_reward_offload", "ref.offload", "reward.offload", "ref_offload"), FLAG, "frozen models stay on their "
        "GPUs (ds.param_offload moves ZeRO-3 parameters to the CPU)"),
    _no(("teacher_offload",), FLAG, "the teacher stays on the GPU", ("kd",)),
    _no(("pretrain_mode",), FLAG, "distillation trains on responses; pretrain mode is for sft", ("kd",)),
    _no(("compute_fp32_loss", "model.compute_fp32_loss_enable"), FLAG, "the loss is computed in the model's dtype",
        ("rm",)),
    _no(("actor_init_on_gpu",), FLAG, "models load as DeepSpeed places them", PPO),
    _no(("ptx_coef",), FLOAT, "no pretraining (PTX) loss mixed into PPO", PPO),
    _no(("pretrain_data",), STR, "no pretraining (PTX) loss mixed into PPO", PPO),
    _no(("algo.kl.unbiased_gradient",), FLAG, "the KL loss uses the plain estimator gradient", PPO),
    _no(("vllm_sync_backend", "vllm.sync_backend"), STR, "weights always go to the generators over "
        "torch.distributed (NCCL on GPUs)", PPO, inert=("nccl",)),
    _no(("vllm_sync_with_ray", "vllm.sync_with_ray"), FLAG, "no Ray: one torch.distributed world", PPO),
    _no(("vllm_generate_batch_size", "rollout.vllm_generate_batch_size"), INT, "each iteration generates "
        "rollout.batch_size prompts (rollout.micro_batch_size sequences per generate call), and with "
        "rollout.dynamic_filtering replacements for the dropped groups", PPO),
    _no(("rollout_max_tokens_per_gpu", "rollout.max_tokens_per_gpu"), INT, "experience passes batch by "
        "ref.micro_batch_size / reward.micro_batch_size", PPO),
    _no(("perf",), FLAG, "timings are in every metrics line", PPO),
    _no(("actor.freeze_visual_encoder",), FLAG, "the vision tower trains with the rest of the model", PPO),
    _no(("iter",), INT, "each round samples rollout.batch_size prompts in turn; there is no slice index",
        ("rejection_sampling",)),
    _no(("post_processor",), STR, "generated rows are written as they are", ("rejection_sampling",)),
    _no(("reward_template",), STR, "the reward model reads prompt and response through data.input_template",
        ("rejection_sampling",)),
    _no(("enable_csft",), FLAG, "conditional SFT reads a score column at training time (sft.condition_key)",
        ("rejection_sampling",)),
    _no(("csft_prompt",), STR, "see sft.condition_template", ("rejection_sampling",)),
    _no(("repetition_penalty",), FLOAT, "no repetition penalty in sampling", ("rejection_sampling",),
        inert=("1", "1.0")),
    _no(("normalize_reward",), FLAG, "the kept response is the best by raw reward", ("rejection_sampling",)),
    _no(("max_len",), INT, "prompts and responses have separate budgets (--prompt_max_len, --max_new_tokens)",
        ("rejection_sampling",)),
)

# Keys the command leaves out: OpenRLHF's default where it differs from hpc_rlhf's and changes the run (the same
# in OpenRLHF 0.8 to 0.11). Data and evaluation files have no default there: no evaluation unless --eval_dataset.
_TEMPLATE = "User: {}\nAssistant: "
OPENRLHF_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"algo.advantage_estimator": "gae", "algo.init_kl_coef": 0.01, "algo.value_clip": 0.5,
            "algo.group_std_eps": 1e-9, "algo.reward_clip_stage": "after_baseline", "rollout.n_samples_per_prompt": 1, "rollout.batch_size": 1024,
            "train.train_batch_size": 128, "data.label_key": None, "reward.reward_func_path": None,
            "eval.data": None, "eval.steps": 0, "eval.temperature": 0.6, "eval.n_samples_per_prompt": 4},
    "sft": {"actor.learning_rate": 5e-6, "train.max_epochs": 2, "train.train_batch_size": 128,
            "train.micro_train_batch_size": 8, "data.max_len": 2048, "data.input_template": _TEMPLATE,
            "eval.data": None, "eval.steps": 0},
    "rm": {"actor.learning_rate": 9e-6, "train.train_batch_size": 128, "train.micro_train_batch_size": 1,
           "eval.data": None, "eval.steps": 0},
    "dpo": {"actor.learning_rate": 1e-5, "train.train_batch_size": 128, "train.micro_train_batch_size": 8,
            "eval.data": None, "eval.steps": 0},
    "kto": {"actor.learning_rate": 1e-5, "pref.beta": 0.01, "train.train_batch_size": 128,
            "train.micro_train_batch_size": 8, "data.max_len": 2048, "data.input_template": _TEMPLATE,
            "eval.data": None, "eval.steps": 0},
    "prm": {"actor.learning_rate": 1e-6, "train.train_batch_size": 128, "train.micro_train_batch_size": 1,
            "data.max_len": 2048, "eval.data": None, "eval.steps": 0},
    "kd": {"actor.learning_rate": 5e-6, "train.train_batch_size": 128, "train.micro_train_batch_size": 8,
           "data.max_len": 2048, "data.input_template": _TEMPLATE, "data.output_key": "output",
           "eval.data": None, "eval.steps": 0},
    "rejection_sampling": {"rollout.n_samples_per_prompt": 1, "data.output_key": "output", "data.label_key": None,
                           "reward.reward_func_path": None, "eval.data": None},
}


# Flags OpenRLHF needs to run; without them the config keeps hpc_rlhf's default for the key (noted).
REQUIRED: dict[str, tuple[str, ...]] = {
    "ppo": ("pretrain", "prompt_data"), "rejection_sampling": ("pretrain", "dataset"),
    "sft": ("pretrain", "dataset"), "rm": ("pretrain", "dataset"), "dpo": ("pretrain", "dataset"),
    "kto": ("pretrain", "dataset"), "prm": ("pretrain", "dataset", "placeholder_token"), "kd": ("pretrain", "dataset"),
}


def flags_for(trainer: str) -> dict[str, Flag]:
    """Every spelling -> its flag, for one trainer (a spelling can mean different things in different entries)."""
    return {name: flag for flag in FLAGS if trainer in flag.trainers for name in flag.names}
