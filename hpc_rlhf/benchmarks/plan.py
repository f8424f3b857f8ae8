"""Best-case iteration time and memory of a job's layout, from FLOPs, bytes and the hardware's ceilings.

For a config (roles, GPUs, rollout sizes) and the model shapes of its policy and value models, each phase's limit is
its work over the GPUs that do it: generation over the generator engines (decode bytes over their combined memory
bandwidth), reference / reward / critic forwards and the two updates over their roles' GPUs (FLOPs over the bf16
peak; an update with activation checkpointing does 4/3 of its model FLOPs), the weight broadcast over the network. Disaggregated roles run concurrently where the schedule allows:

    sync:  generate + max(reference, reward, critic forward) + max(actor log-probs + update, critic update) + sync
    async: max(generate, the rest)   (generation of the next iteration overlaps the training of this one)

where roles sharing ranks (`layout.<role>.share_with`) add up instead of overlapping.

Colocated layouts run every phase on every GPU, one after another. Measured efficiencies (the fraction of its limit
a phase reached in a smaller run, e.g. a 7B job on one node) scale the limits into an estimate (`efficiency`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hpc_rlhf.benchmarks import flops
from hpc_rlhf.benchmarks.task import ModelShape

# Bytes per parameter held on GPUs: bf16 weights; bf16 gradients; fp32 master weights + Adam's two moments.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12
GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """Per-GPU ceilings: bf16 matmul FLOP/s, memory bandwidth (bytes/s), network bandwidth between nodes (bytes/s)."""

    peak_flops: float
    memory_bandwidth: float
    network_bandwidth: float


@dataclass
class PhasePlan:
    phase: str
    role: str
    gpus: int
    limit_s: float
    work: str  # what the limit is made of, for the table
    estimate_s: float | None = None


@dataclass
class JobPlan:
    phases: list[PhasePlan]
    memory_gib: dict[str, float]  # per GPU of each role
    iteration_limit_s: dict[str, float] = field(default_factory=dict)
    iteration_estimate_s: dict[str, float] = field(default_factory=dict)


def role_gpus(cfg: Any, role: str) -> int:
    """GPUs doing a role's work: its own count, or every GPU when colocated. (A role that shares another's ranks has
    the same count, which the config checks enforce.)"""
    layout = cfg.layout
    return layout.world_size() if layout.colocate else getattr(layout, role).gpus


def training_memory_gib(shape: ModelShape, gpus: int, *, zero_stage: int, adam_offload: bool) -> float:
    """Parameter, gradient and optimizer bytes per GPU of a trained model (activations not included)."""
    params = shape.parameter_count()
    optimizer = 0 if adam_offload else OPTIMIZER_BYTES
    sharded = {0: 0, 1: optimizer, 2: optimizer + GRAD_BYTES, 3: optimizer + GRAD_BYTES + WEIGHT_BYTES}[zero_stage]
    replicated = WEIGHT_BYTES + GRAD_BYTES + optimizer - sharded
    return params * (replicated + sharded / gpus) / GIB


def inference_memory_gib(shape: ModelShape, gpus: int, *, zero_stage: int) -> float:
    """Weight bytes per GPU of a frozen model (ZeRO-3 partitions it over its GPUs, otherwise a whole copy each)."""
    return shape.parameter_count() * WEIGHT_BYTES / (gpus if zero_stage == 3 else 1) / GIB


def plan_job(cfg: Any, policy: ModelShape, value: ModelShape | None, hw: Hardware,
             efficiency: dict[str, float] | None = None) -> JobPlan:
    """Per-phase limits, memory per GPU and iteration limits (sync and async) of `cfg`'s layout; critic and reward
    model have the `value` shape (default: the policy's)."""
    value = value or policy
    rollout, layout = cfg.rollout, cfg.layout
    sequences = rollout.batch_size * rollout.n_samples_per_prompt
    lengths = [rollout.prompt_max_len + rollout.generate_max_len] * sequences
    epochs = cfg.train.max_epochs
    phases: list[PhasePlan] = []
    memory: dict[str, float] = {}

    gen_gpus, tp = role_gpus(cfg, "generator"), layout.generator.tp
    engines = max(gen_gpus // tp, 1)
    per_engine = -(-sequences // engines)
    concurrent = min(per_engine, cfg.vllm.max_num_seqs)
    rate = flops.decode_limit_tokens_per_s(policy, concurrent, rollout.prompt_max_len, rollout.generate_max_len,
                                           tp * hw.memory_bandwidth, tp * hw.peak_flops)
    phases.append(PhasePlan("generate", "generator", gen_gpus, per_engine * rollout.generate_max_len / rate,
                            f"{engines} engines x TP{tp}, {per_engine} sequences each, {concurrent} at a time"))
    memory["generator"] = policy.parameter_count() * WEIGHT_BYTES / tp / GIB

    def compute(phase: str, role: str, total_flops: float) -> None:
        gpus = role_gpus(cfg, role)
        phases.append(PhasePlan(phase, role, gpus, total_flops / (gpus * hw.peak_flops),
                                f"{total_flops / 1e15:.1f} PFLOP over {gpus} GPUs"))

    zero, offload = cfg.ds.zero_stage, cfg.ds.adam_offload
    if role_gpus(cfg, "reference") and (cfg.algo.init_kl_coef > 0 or cfg.algo.use_kl_loss):
        compute("reference", "reference", flops.forward_flops(policy, lengths))
        memory["reference"] = inference_memory_gib(policy, role_gpus(cfg, "reference"), zero_stage=zero)
    if role_gpus(cfg, "reward") and cfg.reward.pretrain:
        compute("reward_model", "reward", flops.forward_flops(value, lengths, vocab_head=False))
        memory["reward"] = inference_memory_gib(value, role_gpus(cfg, "reward"), zero_stage=zero)
    if role_gpus(cfg, "critic"):
        compute("critic_forward", "critic", flops.forward_flops(value, lengths, vocab_head=False))
        compute("critic_update", "critic", flops.train_flops(value, lengths, vocab_head=False) * epochs
                * recompute_factor(cfg.critic.gradient_checkpointing))
        memory["critic"] = training_memory_gib(value, role_gpus(cfg, "critic"), zero_stage=zero,
                                               adam_offload=offload)
    compute("actor_logprob", "actor", flops.forward_flops(policy, lengths))
    compute("actor_update", "actor", flops.train_flops(policy, lengths) * epochs
            * recompute_factor(cfg.actor.gradient_checkpointing))
    memory["actor"] = training_memory_gib(policy, role_gpus(cfg, "actor"), zero_stage=zero, adam_offload=offload)
    sync_bandwidth = hw.memory_bandwidth if layout.colocate else hw.network_bandwidth
    phases.append(PhasePlan("weight_sync", "actor", 1, flops.weight_sync_limit_s(flops.model_bytes(policy),
                                                                                    sync_bandwidth),
                            f"{flops.model_bytes(policy) / 1e9:.0f} GB bf16 broadcast"))

    plan = JobPlan(phases=phases, memory_gib=memory)
    shared = {role: getattr(layout, role).share_with for role in PHASE_ROLE.values()
              if getattr(getattr(layout, role), "share_with", None)}
    plan.iteration_limit_s = iteration_times(layout.colocate, {p.phase: p.limit_s for p in phases}, shared)
    if efficiency:
        for p in phases:
            p.estimate_s = p.limit_s / efficiency.get(p.phase, efficiency.get("default", 1.0))
        plan.iteration_estimate_s = iteration_times(layout.colocate, {p.phase: p.estimate_s for p in phases},
                                                    shared)
    return plan


def recompute_factor(gradient_checkpointing: bool) -> float:
    """Hardware FLOPs over model FLOPs of an update: activation checkpointing runs each forward twice (4/3)."""
    return 4 / 3 if gradient_checkpointing else 1.0


PHASE_ROLE = {"reference": "reference", "reward_model": "reward", "critic_forward": "critic",
              "critic_update": "critic", "actor_logprob": "actor", "actor_update": "actor"}
FILL_PHASES = ("reference", "reward_model", "critic_forward")
TRAIN_PHASES = ("actor_logprob", "actor_update", "critic_update")


def iteration_times(colocated: bool, seconds: dict[str, float],
                    shared_with: dict[str, str] | None = None) -> dict[str, float]:
    """Iteration time of the schedules from phase times (module docstring). Phases of roles on the same ranks
    (`shared_with`: role -> the role whose ranks it uses) run one after another, others side by side."""
    if colocated:
        return {"colocated": sum(seconds.values())}
    owner = {role: (shared_with or {}).get(role, role) for role in PHASE_ROLE.values()}

    def slowest_ranks(phases: tuple[str, ...]) -> float:
        per_ranks: dict[str, float] = {}
        for phase in phases:
            ranks = owner[PHASE_ROLE[phase]]
            per_ranks[ranks] = per_ranks.get(ranks, 0.0) + seconds.get(phase, 0.0)
        return max(per_ranks.values(), default=0.0)

    rest = slowest_ranks(FILL_PHASES) + slowest_ranks(TRAIN_PHASES) + seconds.get("weight_sync", 0.0)
    generate = seconds.get("generate", 0.0)
    return {"sync": generate + rest, "async": max(generate, rest)}
