"""The one configuration tree: typed dataclass sections mirroring OpenRLHF's flag groups.

A config is built from the dataclass defaults, then a YAML file (`--config configs/x.yaml`), then command-line overrides
(`--actor.learning_rate=1e-6` or `--actor.learning_rate 1e-6`). Every step is checked: unknown keys, wrong types and
impossible combinations raise one `ConfigError` whose lines each name the key and where the value came from. Cross-field
rules live in `hpc_rlhf.config.checks`; loading, overrides and help text live in `hpc_rlhf.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ADVANTAGE_ESTIMATORS = ("gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo")
GROUP_ESTIMATORS = ("reinforce_baseline", "rloo", "group_norm", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")
OFF_POLICY_CORRECTIONS = ("none", "tis", "icepop", "seq_mask_tis")
ROLE_NAMES = ("generator", "actor", "critic", "reward", "reference")
SEQUENCE_PARALLEL_ROLES = ("actor", "critic", "reward", "reference")  # the roles `ds.ring_attn_size` splits
# Trainers besides PPO: every rank is an actor (layout.colocate: true); see docs/supervised.md.
SUPERVISED_TRAINERS = ("sft", "rm", "dpo", "iterative_dpo", "kto", "prm", "kd", "rejection_sampling")
PAIRWISE_TRAINERS = ("rm", "dpo", "iterative_dpo")
PREFERENCE_LOSSES = ("dpo", "ipo")
RM_LOSSES = ("sigmoid", "logexp")


class ConfigError(ValueError):
    """A config problem; each line of the message names one key and where its value came from."""


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with a one-line description (shown by --help) and optional allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class OptimConfig:
    """Optimizer and model-loading settings shared by the trainable models (actor, critic)."""

    learning_rate: float = opt(1e-6, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "cosine schedule floor, as a fraction of learning_rate")
    lr_warmup_ratio: float = opt(0.03, "fraction of optimizer steps spent in linear warm-up")
    lr_scheduler: str = opt("cosine_with_min_lr", "learning-rate schedule",
                            ("cosine_with_min_lr", "constant_with_warmup"))
    adam_betas: list[float] = opt([0.9, 0.95], "AdamW betas [beta1, beta2]")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    attn_implementation: str = opt("sdpa", "attention kernel (varlen: packed rows attend sample by sample, needs "
                                   "train.packing_samples)", ("sdpa", "eager", "flash_attention_2", "varlen"))
    compile: bool = opt(False, "torch.compile each decoder layer for training (norms, activations and rotary "
                        "embeddings fused: far fewer kernels, which is what a small model's update waits on); "
                        "the first steps of a new input shape compile")
    optim: str = opt("adam", "optimizer: adam = AdamW; muon = DeepSpeed's Muon on 2-D hidden weights, AdamW "
                     "(learning_rate, adam_betas) on embeddings, heads, norms and biases", ("adam", "muon"))
    muon_lr: float = opt(0.02, "learning rate of Muon's 2-D weights (optim: muon)")
    muon_momentum: float = opt(0.95, "Muon's momentum (optim: muon)")


@dataclass
class ActorConfig(OptimConfig):
    """The policy being trained (`--actor.*`)."""

    pretrain: str = opt("builtin:tiny-llama", "HF model folder or hub-style name of the policy; "
                        "builtin:tiny-llama builds a tiny offline model on first use")
    enable_ema: bool = opt(False, "keep an exponential moving average of the weights, updated after each optimizer "
                           "step, and write it to RUN_DIR/hf/actor_ema at the end")
    ema_beta: float = opt(0.992, "EMA decay: ema = ema_beta * ema + (1 - ema_beta) * weights")
    aux_loss_coef: float = opt(0.0, "mixture-of-experts policies: add aux_loss_coef x the router's load-balancing "
                               "loss to the training loss (0 = off; needs a model whose config has "
                               "output_router_logits, e.g. Mixtral, Qwen3-MoE, builtin:tiny-moe)")


@dataclass
class CriticConfig(OptimConfig):
    """The value model of PPO with GAE (`--critic.*`)."""

    pretrain: Optional[str] = opt(None, "value model weights; empty = initialise from actor.pretrain")
    learning_rate: float = opt(9e-6, "peak learning rate")
    freezing_actor_steps: int = opt(0, "iterations that train only the critic before the actor starts")


@dataclass
class RefConfig:
    """The frozen reference policy for KL (`--ref.*`)."""

    pretrain: Optional[str] = opt(None, "reference weights; empty = actor.pretrain")
    micro_batch_size: int = opt(8, "samples per reference forward pass")


@dataclass
class RewardConfig:
    """Where rewards come from: a reward model, a Python function, or an HTTP service (`--reward.*`)."""

    pretrain: Optional[str] = opt(None, "reward model (sequence classification head); needs layout.reward.gpus")
    reward_func_path: Optional[str] = opt("hpc_rlhf.tasks.arithmetic",
                                          "Python file (or module:function) defining reward_func(queries, prompts, labels)")
    remote_url: Optional[str | list[str]] = opt(None, "HTTP endpoint(s) answering POST {query, prompts, labels} "
                                                "with {rewards}: one URL, a list, or comma-separated URLs; each batch "
                                                "is split over them in parallel")
    remote_timeout_s: float = opt(30.0, "timeout of one remote reward request")
    remote_max_retries: int = opt(3, "retries of a failed remote reward request, with exponential backoff")
    remote_backoff_s: float = opt(1.0, "first retry delay of a remote reward request; doubles on each retry")
    remote_batch_size: int = opt(64, "samples per remote reward request")
    micro_batch_size: int = opt(8, "samples per reward-model forward pass")


@dataclass
class VllmConfig:
    """The generation engines (`--vllm.*`); the hf backend serves CPUs and machines without vLLM."""

    backend: str = opt("auto", "generation backend; auto = vllm when importable on GPU, else hf", ("auto", "vllm", "hf"))
    gpu_memory_utilization: float = opt(0.85, "fraction of GPU memory vLLM may take (lower it when colocated)")
    enable_sleep: bool = opt(True, "free vLLM memory between generation phases in colocated mode")
    enable_prefix_caching: bool = opt(True, "share the prompt's KV cache across n_samples_per_prompt")
    enforce_eager: bool = opt(False, "disable CUDA graphs (vLLM, and the hf backend's decode step)")
    max_num_seqs: int = opt(256, "sequences a vLLM engine decodes at once")
    seed_per_request: bool = opt(False, "give every (prompt, sample) request its own seed, so that a sample's draw "
                                 "does not depend on the rest of the batch; vLLM then samples the seeded requests "
                                 "one by one at each decoded token (a few ms per step for 256 requests). Default: "
                                 "one seed per generate call (the batch is drawn at once; a resumed run redraws "
                                 "the same samples all the same)")
    dtype: str = opt("bfloat16", "generator weights dtype", ("bfloat16", "float16", "float32"))
    child_process: bool = opt(False, "run each generator rank's engine in a child process of its own (its own "
                              "interpreter and CUDA context, weights handed over through shared memory or CUDA IPC); "
                              "with colocated async (rollout.async_queue 1) generation then overlaps the update "
                              "without sharing the trainer's interpreter lock. A disaggregated vLLM engine always "
                              "runs in one")
    weight_sync_bucket_mb: int = opt(512, "bucket size of the actor -> generator weight broadcast")


@dataclass
class RolloutConfig:
    """Sampling experience (`--rollout.*`)."""

    batch_size: int = opt(8, "prompts per iteration, over all generator engines (OpenRLHF rollout_batch_size)")
    n_samples_per_prompt: int = opt(4, "responses sampled per prompt (the group of group estimators)")
    micro_batch_size: int = opt(16, "sequences per generate call on one engine")
    prompt_max_len: int = opt(1024, "prompts longer than this many tokens are truncated from the left")
    generate_max_len: int = opt(1024, "maximum new tokens per response")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    top_k: int = opt(-1, "top-k sampling (-1 = off)")
    async_queue: int = opt(0, "iterations generators may run ahead of the actor (0 = synchronous); colocated, 1 "
                              "generates the next iteration in a thread while the last one trains")
    agent_func_path: Optional[str] = opt(None, "Python file defining AgentInstance for multi-turn rollouts")
    max_turns: int = opt(1, "environment turns per multi-turn trajectory")
    dynamic_filtering: bool = opt(False, "drop groups whose scores are all equal or outside the range, and draw the "
                                  "next prompts until batch_size groups are kept (DAPO dynamic sampling)")
    dynamic_filtering_reward_range: list[float] = opt([0.0, 1.0], "keep groups whose mean score lies strictly inside")
    dynamic_filtering_max_rounds: int = opt(10, "dynamic_filtering: generate-and-filter rounds per iteration at most, "
                                                "the first included; an iteration that still misses groups then "
                                                "trains on fewer (1 = never draw more prompts)")
    partial_rollout: bool = opt(False, "async: generation pauses for the weight update and unfinished responses "
                                "continue with the new weights in the next tick (OpenRLHF partial_rollout)")
    partial_rollout_max_new_tokens: int = opt(256, "partial_rollout: tokens each unfinished response generates per "
                                              "tick before it pauses (the iteration trained in that tick finishes)")
    record_behaviour_log_probs: bool = opt(False, "have the generator report each sampled token's log-prob even "
                                           "where training does not read them (it does with KL against a reference "
                                           "or an off-policy correction); otherwise the rollout shards hold null "
                                           "there and vLLM skips their bookkeeping (about a fifth of a small model's "
                                           "generation time)")


@dataclass
class DataConfig:
    """The prompt dataset (`--data.*`)."""

    prompt_data: str | list[str] = opt("data/arithmetic/train.jsonl", "JSONL, Parquet or Arrow file or folder of "
                                       "prompts; several: a list or comma-separated paths, read one after another "
                                       "unless prompt_data_probs mixes them")
    prompt_data_probs: Optional[list[float]] = opt(None, "mix the datasets of prompt_data with these probabilities "
                                                   "(one each, summing to 1), interleaved with train.seed until every "
                                                   "dataset is used up (OpenRLHF prompt_data_probs); empty = no mix")
    input_key: str = opt("input", "column holding the prompt text or chat messages")
    label_key: Optional[str] = opt("label", "column holding the reference answer passed to the reward")
    apply_chat_template: bool = opt(False, "render prompts with the tokenizer's chat template")
    input_template: Optional[str] = opt(None, "format string with one {} for the prompt, when no chat template")
    max_samples: Optional[int] = opt(None, "use at most this many prompts")
    image_key: str = opt("images", "column holding a prompt's images: one or a list of file paths (relative to the "
                         "dataset file) or base64 strings; null or [] = text only (docs/vision.md)")
    max_images_per_prompt: int = opt(0, "vision-language RL: at most this many images per prompt (0 = text only, the "
                                     "image column is not read)")
    dataset: str | list[str] = opt("data/arithmetic/sft.jsonl", "rows of the supervised and preference trainers "
                                   "(sft, rm, dpo, kto, prm, kd): JSONL, Parquet or Arrow file or folder, or several "
                                   "(a list or comma-separated paths); eval.data holds held-out rows")
    dataset_probs: Optional[list[float]] = opt(None, "mix the datasets of dataset with these probabilities, as "
                                               "prompt_data_probs does (OpenRLHF dataset_probs; not prm); empty = "
                                               "no mix")
    output_key: str = opt("response", "column holding the response (sft, kto, kd)")
    chosen_key: str = opt("chosen", "column holding the preferred response (rm, dpo)")
    rejected_key: str = opt("rejected", "column holding the dispreferred response (rm, dpo)")
    max_len: int = opt(512, "supervised and preference samples: at most this many prompt + response tokens "
                       "(responses are cut; rows whose prompt leaves no room are skipped)")


@dataclass
class TrainConfig:
    """The run as a whole (`--train.*`)."""

    trainer: str = opt("ppo", "training loop; ppo covers every advantage estimator; the others are in "
                       "docs/supervised.md", ("ppo",) + SUPERVISED_TRAINERS)
    seed: int = opt(42, "seed of prompts order, sampling and initialisation")
    num_episodes: int = opt(1, "passes over the prompt dataset")
    max_epochs: int = opt(1, "optimisation epochs over each iteration's rollouts")
    max_iterations: Optional[int] = opt(None, "stop after this many iterations (empty = until episodes end)")
    train_batch_size: int = opt(8, "samples per optimizer step, over all actor ranks")
    micro_train_batch_size: int = opt(2, "samples per forward/backward on one rank")
    packing_samples: bool = opt(False, "pack samples into rows with restarting position ids")
    max_tokens_per_microbatch: Optional[int] = opt(None, "dynamic batching: token budget per micro-batch")
    skip_old_logprobs: bool = opt(False, "when an iteration is a single optimizer step (one epoch, all samples in one "
                                  "train_batch_size), take the PPO ratio's old log-probs from the update's own forward "
                                  "(detached: ratio 1, as TRL with num_iterations=1) instead of a separate pass")
    run_dir: str = opt("runs/default", "where rollouts, checkpoints, logs and models go (shared filesystem)")
    device: str = opt("auto", "auto = cuda when available", ("auto", "cpu", "cuda"))


@dataclass
class AlgoConfig:
    """Advantage estimator, KL and losses (`--algo.*`), named as in OpenRLHF."""

    advantage_estimator: str = opt("group_norm", "gae = PPO with critic; group_norm = GRPO", ADVANTAGE_ESTIMATORS)
    gamma: float = opt(1.0, "discount over response tokens")
    lambd: float = opt(1.0, "GAE lambda")
    eps_clip_low: float = opt(0.2, "PPO clip: ratio lower bound is 1 - eps_clip_low")
    eps_clip_high: float = opt(0.2, "PPO clip: ratio upper bound is 1 + eps_clip_high (DAPO clip-higher: 0.28)")
    dual_clip: Optional[float] = opt(None, "dual-clip constant c > 1 for negative advantages (empty = off)")
    value_clip: Optional[float] = opt(0.2, "critic value clipping around old values (empty = off)")
    policy_loss_type: str = opt("ppo", "ppo = token ratios; gspo = sequence-level ratio", ("ppo", "gspo"))
    loss_agg_mode: str = opt("token_mean", "how token losses become one number", LOSS_AGG_MODES)
    init_kl_coef: float = opt(0.0, "KL penalty coefficient in the reward (0 = off)")
    kl_target: Optional[float] = opt(None, "adaptive KL controller target (empty = fixed coefficient)")
    kl_horizon: int = opt(10000, "adaptive KL controller horizon")
    use_kl_loss: bool = opt(False, "put KL in the loss instead of the reward (GRPO style)")
    kl_loss_coef: float = opt(0.001, "weight of the KL loss term")
    kl_estimator: str = opt("k1", "KL estimator", KL_ESTIMATORS)
    entropy_loss_coef: float = opt(0.0, "entropy bonus weight (0 = off); the entropy is aggregated by loss_agg_mode")
    off_policy_correction: str = opt("none", "importance correction between generator and trainer log-probs",
                                     OFF_POLICY_CORRECTIONS)
    is_low: float = opt(0.0, "importance-ratio interval lower bound for the correction")
    is_high: float = opt(2.0, "importance-ratio interval upper bound for the correction")
    group_std_eps: float = opt(1e-6, "epsilon added to the group std in group_norm")
    advantage_std_norm: bool = opt(True, "whiten the advantages of gae, reinforce and reinforce_baseline by the batch "
                                   "std; false only subtracts the mean (OpenRLHF --no_advantage_std_norm)")
    normalize_reward: bool = opt(False, "normalise rewards with running mean/std")
    reward_clip_range: list[float] = opt([-10.0, 10.0], "clip rewards into [low, high]")
    reward_clip_stage: str = opt("before_baseline", "where reward_clip_range applies: to raw rewards, or to the "
                                 "rewards after the group baseline (OpenRLHF's order)",
                                 ("before_baseline", "after_baseline"))
    log_ratio_clamp: Optional[float] = opt(20.0, "bound the policy loss's log-ratio to [-c, c] before exp "
                                           "(OpenRLHF: 20; empty = off)")
    kl_clamp: Optional[float] = opt(10.0, "bound each token's KL estimate to [-c, c] (OpenRLHF: 10; empty = off)")
    overlong_buffer_len: Optional[int] = opt(None, "DAPO soft overlong penalty buffer in tokens (empty = off)")
    overlong_penalty_factor: float = opt(1.0, "maximum overlong penalty")
    stop_properly_penalty_coef: Optional[float] = opt(None, "responses cut by the token limit (no eos): reward x coef "
                                                      "for coef in [0, 1], reward = coef for coef < 0 (OpenRLHF, "
                                                      "ProRL; empty = off)")


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`--sft.*`, train.trainer: sft); data.* names the columns."""

    pretrain_mode: bool = opt(False, "train on every token of data.input_key (continued pre-training); no response")
    multiturn: bool = opt(False, "data.input_key holds whole chats (lists of messages): train on every assistant "
                          "turn, mask the rest; needs data.apply_chat_template")
    condition_key: Optional[str] = opt(None, "conditional SFT: column with a score or attribute put into the prompt")
    condition_template: str = opt("{input} <rm_score>: {condition} ", "how the condition joins the input "
                                  "(fields {input} and {condition}) before data.input_template")


@dataclass
class PrefConfig:
    """Reward-model and preference training: rm, dpo (DPO/IPO/cDPO), iterative_dpo, kto (`--pref.*`)."""

    loss_type: str = opt("dpo", "dpo (cDPO with label_smoothing > 0) or ipo", PREFERENCE_LOSSES)
    beta: float = opt(0.1, "KL strength of DPO / IPO / KTO")
    label_smoothing: float = opt(0.0, "cDPO: assumed fraction of flipped preference labels, in [0, 0.5)")
    nll_loss_coef: float = opt(0.0, "weight of an extra NLL loss on the chosen responses (dpo)")
    ref_chosen_logps_key: Optional[str] = opt(None, "column with precomputed reference log-probs of the chosen "
                                              "responses; with ref_rejected_logps_key no reference model is loaded")
    ref_rejected_logps_key: Optional[str] = opt(None, "column with precomputed reference log-probs of the rejected "
                                                "responses")
    rm_loss: str = opt("sigmoid", "reward-model pairwise loss", RM_LOSSES)
    margin_key: Optional[str] = opt(None, "rm: column with a margin the chosen score must exceed the rejected by")
    normalize_reward: bool = opt(True, "rm: store the mean and std of the trained scores in the saved config, so "
                                 "that users of the model get normalised rewards")
    desirable_weight: float = opt(1.0, "kto: weight of desirable samples (lambda_D)")
    undesirable_weight: float = opt(1.0, "kto: weight of undesirable samples (lambda_U)")
    rounds: int = opt(2, "iterative_dpo: generate -> label -> train rounds; each samples rollout.batch_size prompts "
                      "of data.prompt_data, rollout.n_samples_per_prompt responses each")


@dataclass
class PRMConfig:
    """Process reward model (`--prm.*`, train.trainer: prm): a step label after each placeholder token."""

    placeholder_token: str = opt("ки", "token that ends each reasoning step in data.input_key (one token)")
    reward_tokens: list[str] = opt(["+", "-"], "[good, bad] label tokens; data.label_key lists one per step")


@dataclass
class KDConfig:
    """Knowledge distillation (`--kd.*`, train.trainer: kd): the student is actor.pretrain."""

    teacher_pretrain: Optional[str] = opt(None, "teacher model (same tokenizer as the student)")
    kd_coef: float = opt(0.4, "loss = (1 - kd_coef) x NLL of the data + kd_coef x KD loss against the teacher")


@dataclass
class RejectionSamplingConfig:
    """Best-of-N / rejection sampling (`--rejection_sampling.*`): generate N, score, keep the best, write a dataset."""

    rounds: int = opt(1, "sampling rounds, each over rollout.batch_size prompts of data.prompt_data "
                      "(rollout.n_samples_per_prompt responses each)")
    min_reward: Optional[float] = opt(None, "keep a prompt's best response only when its reward reaches this")
    output_path: Optional[str] = opt(None, "where the kept rows go (JSONL); empty = RUN_DIR/rejection_sampling.jsonl")
    train_sft: bool = opt(False, "after each round, fine-tune the actor on the rows kept so far (RAFT / ReST)")


@dataclass
class LoraConfig:
    """LoRA / QLoRA adapters through peft for sft, rm, dpo, kto, kd, and LoRA for the actor of ppo,
    rejection_sampling and iterative_dpo (its generators get the merged weights) (`--lora.*`); tools/merge_lora.py
    merges a saved adapter."""

    rank: int = opt(0, "LoRA rank (0 = train the full model)")
    alpha: int = opt(16, "LoRA alpha (scale = alpha / rank)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = opt(["all-linear"], "module names to adapt; all-linear = every linear layer but "
                                    "the output head")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base in 4-bit NF4 (needs bitsandbytes and a GPU; not "
                                    "for the trainers that generate)")


@dataclass
class EvalConfig:
    """Held-out evaluation (`--eval.*`)."""

    data: Optional[str] = opt("data/arithmetic/test.jsonl", "held-out prompts (empty = no evaluation)")
    steps: int = opt(5, "evaluate every this many iterations (0 = only at the end)")
    max_samples: Optional[int] = opt(64, "evaluate on at most this many prompts")
    temperature: float = opt(0.0, "eval sampling temperature (0 = greedy)")
    n_samples_per_prompt: int = opt(1, "eval responses per prompt")


@dataclass
class CkptConfig:
    """Checkpoints and saved models (`--ckpt.*`)."""

    save_steps: int = opt(0, "save a full checkpoint every this many iterations (0 = only on stop/end)")
    max_ckpt_num: int = opt(3, "keep this many most recent checkpoints")
    load_checkpoint: bool = opt(True, "resume from RUN_DIR/checkpoints/latest when present")
    save_hf_model: bool = opt(True, "write HF-format models to RUN_DIR/hf at the end")
    best_metric_key: str = opt("", "eval metric (e.g. eval/accuracy) whose best value so far keeps the trained "
                               "model in RUN_DIR/hf/best and {step, value} in RUN_DIR/best.json; empty = off")
    best_mode: str = opt("max", "whether a larger (max) or smaller (min) best_metric_key is better", ("max", "min"))


@dataclass
class LoggerConfig:
    """Metrics (`--logger.*`)."""

    use_tensorboard: bool = opt(True, "write TensorBoard scalars to RUN_DIR/tensorboard")
    logging_steps: int = opt(1, "print metrics every this many iterations")
    progress_bar: bool = opt(True, "show a progress bar on rank 0")
    plot: bool = opt(True, "write RUN_DIR/curves.png (reward and KL) at the end")
    use_wandb: bool = opt(False, "also log to Weights & Biases (pip install wandb; key from WANDB_API_KEY or "
                                 "`wandb login`)")
    wandb_project: str = opt("hpc_rlhf", "W&B project")
    wandb_group: Optional[str] = opt(None, "W&B run group")
    wandb_run_name: Optional[str] = opt(None, "W&B run name; empty = the run directory's name")
    wandb_org: Optional[str] = opt(None, "W&B entity (team or user); empty = the key's default entity")
    wandb_mode: str = opt("online", "online, or offline: write RUN_DIR/wandb for `wandb sync` later (no network; "
                                    "WANDB_MODE=offline does the same)", ("online", "offline"))


@dataclass
class DsConfig:
    """DeepSpeed (`--ds.*`)."""

    zero_stage: int = opt(2, "ZeRO stage 0-3", (0, 1, 2, 3))
    bf16: Optional[bool] = opt(None, "bf16 training; empty = bf16 on GPU, fp32 on CPU")
    adam_offload: bool = opt(False, "keep optimizer states on the CPU")
    param_offload: bool = opt(False, "keep ZeRO-3 parameters on the CPU")
    overlap_comm: bool = opt(False, "ZeRO 1-3: overlap gradient reduction with backward (more memory for buckets)")
    enable_sleep: bool = opt(False, "colocated: move optimizer states and ZeRO buffers to host memory while "
                                    "the generator runs (OpenRLHF --deepspeed_enable_sleep)")
    tensor_parallel_size: int = opt(1, "DeepSpeed AutoTP training of the actor: shard its linear layers over blocks "
                                       "of this many consecutive actor ranks; data-parallel size = actor.gpus / this "
                                       "(sft; ZeRO 0-2)")
    ring_attn_size: int = opt(1, "sequence parallelism (ppo): ranks per group that split each packed micro-batch "
                                 "of the actor, critic, reward model and reference along the sequence; 1 = off. "
                                 "Needs train.packing_samples and divides each of those roles' ranks (OpenRLHF "
                                 "--ring_attn_size)")
    universal_ckpt: bool = opt(False, "resume through DeepSpeed's universal checkpoint: each engine's ZeRO states are "
                                      "converted once (ds_to_universal) and loaded into the current partitioning, "
                                      "so a job may resume on a different number of ranks")


@dataclass
class RoleConfig:
    """Ranks given to one role; `tp` only for the generator; `share_with` puts the role on another role's ranks."""

    gpus: int = opt(0, "ranks (GPUs; processes on CPU) for this role")
    tp: int = opt(1, "tensor-parallel size of each engine (generator only)")
    share_with: Optional[str] = opt(None, "place this role on the ranks of that role (disaggregated layouts; "
                                          "same gpus count), e.g. reference on the reward ranks")


def layout_share_problems(gpus: dict[str, int], share_with: dict[str, Optional[str]], colocate: bool) -> list[str]:
    """Why the `share_with` settings of a layout cannot be placed, one line each naming the fields.

    Rule: `layout.A.share_with: B` puts A on exactly B's ranks, so A.gpus must equal B.gpus (gpus 0 still means
    "absent"); B owns its ranks (no chains, no cycles) and is neither absent nor the generator.
    """
    shares = {name: target for name, target in share_with.items() if target}
    if not shares:
        return []
    if colocate:
        keys = ", ".join(f"layout.{name}.share_with={target}" for name, target in shares.items())
        return [f"{keys}: sharing ranks only means something in a disaggregated layout; with layout.colocate: true "
                f"every rank already holds every role (remove share_with, or set layout.colocate: false)"]
    errors = []
    for name, target in shares.items():
        key = f"layout.{name}.share_with={target}"
        if target not in ROLE_NAMES:
            errors.append(f"{key}: not a role; roles are {', '.join(ROLE_NAMES)}")
        elif target == name:
            errors.append(f"{key}: a role cannot share ranks with itself")
        elif name == "generator":
            errors.append(f"{key}: the generator keeps ranks of its own (its tensor-parallel engines start at "
                          f"rank 0); let the {target} share ranks with another role instead")
        elif target == "generator":
            errors.append(f"{key}: generator ranks run generation engines, not DeepSpeed models, so no role can "
                          f"share them; share the actor, critic, reward or reference ranks")
        elif shares.get(target):
            cycle = _share_cycle(name, shares)
            if cycle is None or name not in cycle:
                owner = _share_owner(name, shares) if cycle is None else "the role that owns the ranks"
                errors.append(f"{key} and layout.{target}.share_with={shares[target]}: chains are not supported; "
                              f"point layout.{name}.share_with at {owner}")
            elif name == min(cycle, key=ROLE_NAMES.index):  # report each cycle once, at its first role
                links = ", ".join(f"layout.{member}.share_with={shares[member]}" for member in cycle)
                errors.append(f"{links}: a cycle; one of these roles must own its ranks (remove its share_with)")
        elif gpus.get(target, 0) <= 0:
            errors.append(f"{key} but layout.{target}.gpus={gpus.get(target, 0)}: the role to share with is absent "
                          f"(give it ranks, or give layout.{name} ranks of its own)")
        elif gpus.get(name, 0) <= 0:
            errors.append(f"{key}: layout.{name}.gpus={gpus.get(name, 0)} means the {name} is absent; a sharing role "
                          f"takes as many ranks as the role it shares: set layout.{name}.gpus={gpus[target]} "
                          f"(= layout.{target}.gpus)")
        elif gpus[name] != gpus[target]:
            errors.append(f"{key}: layout.{name}.gpus={gpus.get(name, 0)} must equal layout.{target}.gpus="
                          f"{gpus[target]}, because a sharing role runs on exactly the ranks of the role it shares "
                          f"({gpus[name]} != {gpus[target]})")
    return errors


def _role(gpus: int) -> Any:
    return field(default_factory=lambda: RoleConfig(gpus=gpus), metadata={"help": "", "choices": None})


def _share_cycle(start: str, shares: dict[str, str]) -> Optional[tuple[str, ...]]:
    """The roles of the cycle that following `share_with` from `start` runs into, or None when the walk ends."""
    path = [start]
    while path[-1] in shares:
        following = shares[path[-1]]
        if following in path:
            return tuple(path[path.index(following):])
        path.append(following)
    return None


def _share_owner(start: str, shares: dict[str, str]) -> str:
    """The role at the end of the `share_with` walk from `start` (which must not run into a cycle)."""
    role = start
    while role in shares:
        role = shares[role]
    return role


@dataclass
class LayoutConfig:
    """How the job's ranks are split into roles (`--layout.*`); ranks are handed out in field order."""

    generator: RoleConfig = _role(1)
    actor: RoleConfig = _role(1)
    critic: RoleConfig = _role(0)
    reward: RoleConfig = _role(0)
    reference: RoleConfig = _role(0)
    colocate: bool = opt(True, "every rank holds every role and switches between them (hybrid engine)")
    scale: str = opt("fixed", "fixed: the job must have exactly the ranks the layout gives out; proportional: the "
                              "layout is re-planned at every start for the ranks the job got (SLURM_NTASKS): "
                              "colocated roles span them all, disaggregated role counts scale with the job",
                     ("fixed", "proportional"))

    def roles(self) -> dict[str, RoleConfig]:
        return {name: getattr(self, name) for name in ROLE_NAMES}

    def world_size(self) -> int:
        """Ranks this layout needs: the sum over roles that own their ranks (a `share_with` role adds none), or one
        role's count when colocated."""
        if self.colocate:
            return max((r.gpus for r in self.roles().values() if r.gpus > 0), default=0)
        return sum(r.gpus for r in self.roles().values() if r.gpus > 0 and not r.share_with)

    def share_problems(self) -> list[str]:
        """What is wrong with the `share_with` settings (empty when nothing is)."""
        roles = self.roles()
        return layout_share_problems({n: r.gpus for n, r in roles.items()},
                                     {n: r.share_with for n, r in roles.items()}, self.colocate)


@dataclass
class SlurmConfig:
    """The SLURM allocation (`--slurm.*`), used by `python -m hpc_rlhf.submit` and the sbatch scripts."""

    nodes: int = opt(1, "nodes of the job")
    gpus_per_node: int = opt(1, "GPUs (ranks) per node; on CPU, processes per node")
    cpus_per_task: int = opt(8, "CPU cores per rank")
    mem: Optional[str] = opt(None, "memory per node, e.g. 480G (empty = cluster default)")
    partition: Optional[str] = opt(None, "partition")
    account: Optional[str] = opt(None, "account to charge")
    qos: Optional[str] = opt(None, "quality of service")
    constraint: Optional[str] = opt(None, "node feature constraint")
    time: str = opt("24:00:00", "time limit per job run; the job requeues itself before it")
    job_name: str = opt("hpc_rlhf", "job name")
    min_nodes: int = opt(0, "with layout.scale: proportional, the job may start on min_nodes to nodes nodes "
                            "(sbatch --nodes=MIN-MAX; submit --nodes 2-6); 0 = exactly slurm.nodes")
    signal_delay_s: int = opt(300, "seconds before the limit that the stop signal arrives")
    max_requeue: int = opt(20, "refuse to requeue after this many restarts")
    exclusive: bool = opt(True, "ask for whole nodes")
    setup: list[str] = opt([], "shell lines run before srun (module load, source venv, exports)")


@dataclass
class Config:
    """The whole tree; each section is one group of `--section.key` flags."""

    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ds: DsConfig = field(default_factory=DsConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
