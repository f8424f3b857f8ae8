"""DeepSpeed engine setup for one role group (actor, critic, reference) of a larger world.

Our world is partitioned by rank into role groups, so a DeepSpeed engine must train on a process
*subgroup*: e.g. ranks 2-3 of a 5-rank world. DeepSpeed supports this through an `mpu` object (a
Megatron-style "model parallel unit") that names the data-parallel group; `DataParallelUnit` is that
object, with pipeline parallel size 1 and tensor parallel size 1 or, for DeepSpeed's AutoTP training
(`tensor_parallel_size > 1`), blocks of consecutive ranks of the group.

Three places in DeepSpeed (0.19) still assume the whole world; `engine_scope` fixes them for the
duration of each engine call, and every call in this package runs inside it:
- `deepspeed.utils.groups.mpu` is a module global that the last initialised engine overwrites; some
  runtime paths (ZeRO-0/1 gradient all-reduce, checkpoint ranks) read it after initialisation;
- ZeRO-3 initialisation and `save_checkpoint` call `barrier()` without a group, i.e. on the world,
  which would wait for ranks that are not in this role (and pair with their unrelated barriers);
- ZeRO-3's first forward checks that all ranks traced the same modules with broadcasts from global
  rank 0, which is not in the group.
Code that drives an engine's module directly (e.g. `generate` on a ZeRO-3 actor) must enter
`engine_scope` too. Role groups are created on all ranks (`torch.distributed.new_group`) beforehand;
everything here is called by the group's members only.

The learning-rate warmup is linear and reaches the full rate at the last warmup step:
factor (step + 1) / warmup_steps, so the first optimizer step already moves the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

LrSchedulerName = Literal["constant_with_warmup", "cosine_with_min_lr"]
LR_SCHEDULERS: tuple[str, ...] = ("constant_with_warmup", "cosine_with_min_lr")
OptimizerName = Literal["adam", "muon"]
OPTIMIZERS: tuple[str, ...] = ("adam", "muon")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2", "varlen")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one DeepSpeed engine needs; mirrors the trainer's `actor.*` / `critic.*` config fields."""

    zero_stage: int = 2
    bf16: bool = False
    adam_offload: bool = False
    param_offload: bool = False
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-6
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup_ratio: float = 0.0
    lr_warmup_steps: int | None = None
    lr_scheduler: LrSchedulerName = "constant_with_warmup"
    min_lr_ratio: float = 0.1
    max_norm: float = 1.0
    overlap_comm: bool = False
    micro_train_batch_size: int = 1
    train_batch_size: int = 8
    attn_implementation: str = "sdpa"
    compile: bool = False  # torch.compile each decoder layer (`compile_decoder_layers`)
    optim: OptimizerName = "adam"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    ema_beta: float | None = None  # None: no EMA of the weights (`training/ema.py`)
    aux_loss_coef: float = 0.0  # > 0: a mixture-of-experts actor adds coef x its router load-balancing loss
    tensor_parallel_size: int = 1  # > 1: DeepSpeed AutoTP shards the linear layers over blocks of this many ranks
    ring_attn_size: int = 1  # ranks per sequence-parallel group (`training/sequence_parallel.py`); 1 = off
    load_universal: bool = False  # loads read DeepSpeed's universal form (`hpc_rlhf.run.universal`), ZeRO 1-3

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.param_offload and self.zero_stage != 3:
            raise ValueError(f"param_offload needs zero_stage=3, got zero_stage={self.zero_stage}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if self.micro_train_batch_size < 1 or self.train_batch_size < 1:
            raise ValueError(f"micro_train_batch_size ({self.micro_train_batch_size}) and train_batch_size "
                             f"({self.train_batch_size}) must be positive")
        if not 0.0 <= self.lr_warmup_ratio <= 1.0:
            raise ValueError(f"lr_warmup_ratio must be in [0, 1], got {self.lr_warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.ema_beta is not None and not 0.0 <= self.ema_beta <= 1.0:
            raise ValueError(f"ema_beta must be in [0, 1], got {self.ema_beta}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0 (0 = off), got {self.aux_loss_coef}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.zero_stage > 2:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs zero_stage <= 2, got "
                             f"zero_stage={self.zero_stage}")
        if self.ring_attn_size < 1:
            raise ValueError(f"ring_attn_size must be >= 1, got {self.ring_attn_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """Parameter dtype the model is loaded in: bf16 on GPU when enabled, fp32 otherwise."""
        return torch.bfloat16 if self.bf16 else torch.float32


def tensor_parallel_blocks(ranks: Sequence[int], tp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split a role group's ranks into tensor-parallel blocks of `tp_size` consecutive ranks and the data-parallel
    groups across them (the i-th rank of every block): ([tp blocks], [dp groups]). Pure arithmetic."""
    ranks = list(ranks)
    if tp_size < 1 or len(ranks) % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide the group's {len(ranks)} ranks")
    blocks = [ranks[i:i + tp_size] for i in range(0, len(ranks), tp_size)]
    return blocks, [[block[i] for block in blocks] for i in range(tp_size)]


class DataParallelUnit:
    """The `mpu` DeepSpeed accepts: data parallelism over `dp_group`, no pipeline parallelism, and tensor parallelism
    of `tp_size` (1: every rank alone).

    `dp_group=None` means the whole world. Only members of the group may construct it; the subgroups are created with
    local synchronisation so that other ranks need not take part. With `tp_size > 1` the group is split by
    `tensor_parallel_blocks`: the data-parallel group is then the ranks holding the same shards, and `group` stays the
    whole role group (the engine's barriers).
    """

    def __init__(self, dp_group: dist.ProcessGroup | None = None, tp_size: int = 1) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before building a DataParallelUnit")
        self.group = dist.group.WORLD if dp_group is None else dp_group
        if dist.get_rank(self.group) < 0:
            raise ValueError(f"global rank {dist.get_rank()} is not a member of the data-parallel group "
                             f"{dist.get_process_group_ranks(self.group)}")
        self.tp_size = tp_size
        me = dist.get_rank()
        if tp_size == 1:
            self.dp_group = self.group
            self.tp_group = dist.new_group([me], use_local_synchronization=True)
        else:
            blocks, dp_groups = tensor_parallel_blocks(dist.get_process_group_ranks(self.group), tp_size)
            self.tp_group = dist.new_group(next(b for b in blocks if me in b), use_local_synchronization=True)
            self.dp_group = dist.new_group(next(g for g in dp_groups if me in g), use_local_synchronization=True)
        self.self_group = self.tp_group if tp_size == 1 else dist.new_group([me], use_local_synchronization=True)

    # Data parallelism: the role group, or its ranks holding the same tensor-parallel shards.
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_group)

    # Model / tensor parallelism: the tensor-parallel block (every rank alone when tp_size is 1).
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.tp_group, 0)

    # Pipeline parallelism: every rank alone.
    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.self_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def make_ds_config(cfg: EngineConfig, dp_size: int, *, training: bool = True) -> dict[str, Any]:
    """DeepSpeed config dict for one engine; `training=False` gives a frozen (inference) engine's config.

    `gradient_accumulation_steps` is what DeepSpeed checks `train_batch_size` against; the model wrappers
    mark the accumulation boundary themselves, so a step may hold any number of micro-batches. `dp_size` is the
    engine group's rank count; with sequence parallelism `ring_attn_size` of them share each sample, so DeepSpeed
    counts every sample `ring_attn_size` times.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if dp_size % cfg.ring_attn_size:
        raise ValueError(f"ring_attn_size={cfg.ring_attn_size} does not divide the {dp_size} ranks of the group")
    per_step = cfg.micro_train_batch_size * (dp_size // cfg.ring_attn_size)
    if cfg.train_batch_size % per_step != 0:
        raise ValueError(
            f"train_batch_size={cfg.train_batch_size} is not divisible by micro_train_batch_size="
            f"{cfg.micro_train_batch_size} x data-parallel size={dp_size // cfg.ring_attn_size} (= {per_step})")
    on_gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero["overlap_comm"] = cfg.overlap_comm
    if cfg.param_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if training and cfg.adam_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        # Small parameters (norms, biases) stay whole on every rank instead of being gathered each layer.
        zero["stage3_param_persistence_threshold"] = 10_000
    config: dict[str, Any] = {
        "train_batch_size": cfg.train_batch_size * cfg.ring_attn_size,
        "train_micro_batch_size_per_gpu": cfg.micro_train_batch_size,
        "gradient_accumulation_steps": cfg.train_batch_size // per_step,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
        # Checkpoint tag validation all-reduces over the whole world; tags are ours and identical anyway.
        "checkpoint": {"tag_validation": "Ignore"},
    }
    if training and cfg.tensor_parallel_size > 1:
        # DeepSpeed's AutoTP training: it shards the linear layers of the model over the mpu's tensor-parallel blocks.
        config["tensor_parallel"] = {"autotp_size": cfg.tensor_parallel_size}
    if cfg.load_universal and cfg.zero_stage > 0:  # stage 0 states are whole on every rank: nothing to reshard
        config["checkpoint"]["load_universal"] = True
    if training:
        config["gradient_clipping"] = cfg.max_norm
        config["zero_allow_untested_optimizer"] = True
        if cfg.bf16 and cfg.zero_stage > 0:
            # fp32 gradient accumulation; DeepSpeed offers it only with ZeRO (stage 0 keeps bf16 gradients and
            # refuses any other accumulation type).
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, scheduler: str,
                  min_lr_ratio: float) -> float:
    """Learning-rate factor at optimizer step `step`: linear warmup, then constant or cosine to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant_with_warmup":
        return 1.0
    if scheduler == "cosine_with_min_lr":
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {scheduler!r}")


def warmup_steps_for(cfg: EngineConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps: `lr_warmup_steps` when set, else `lr_warmup_ratio` of the run."""
    if cfg.lr_warmup_steps is not None:
        return cfg.lr_warmup_steps
    return math.ceil(cfg.lr_warmup_ratio * total_steps)


def param_groups_for(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, none on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: EngineConfig) -> torch.optim.Optimizer:
    """AdamW: DeepSpeedCPUAdam when the optimizer is offloaded, FusedAdam on GPU, torch AdamW otherwise."""
    groups = [g for g in param_groups_for(model, cfg.weight_decay) if g["params"]]
    kwargs = {"lr": cfg.learning_rate, "betas": cfg.adam_betas, "eps": cfg.adam_eps}
    if cfg.adam_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


# DeepSpeed's Muon takes every parameter of >= 2 dimensions whose name has no "embed" or "lm_head"; value and score
# heads (a [1, hidden] matrix) are output layers too and stay with the auxiliary AdamW.
MUON_EXCLUDED_NAMES: tuple[str, ...] = ("embed", "lm_head")
MUON_EXCLUDED_MODULES: tuple[str, ...] = ("score", "classifier", "v_head", "value_head")


def uses_muon(name: str, shape: Sequence[int]) -> bool:
    """Whether Muon updates the parameter `name` of layer shape `shape`: 2-D hidden weights yes; embeddings, output
    heads, norms and biases no (they take AdamW)."""
    lowered = name.lower()
    if len(shape) < 2 or any(word in lowered for word in MUON_EXCLUDED_NAMES):
        return False
    return not any(part in MUON_EXCLUDED_MODULES for part in lowered.split("."))


def muon_optimizer_config(cfg: EngineConfig) -> dict[str, Any]:
    """DeepSpeed's `optimizer` section for Muon with its auxiliary AdamW: `muon_lr` / `momentum` for the Muon half,
    `learning_rate` / betas / eps for the AdamW half (the per-group weight decay comes from `param_groups_for`)."""
    return {"type": "Muon", "params": {
        "lr": cfg.muon_lr, "muon_lr": cfg.muon_lr, "adam_lr": cfg.learning_rate, "momentum": cfg.muon_momentum,
        "betas": list(cfg.adam_betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}}


def _tag_muon_parameters(tag_with_deepspeed_rule: Any) -> Any:
    """DeepSpeed's `set_optimizer_flags` followed by `uses_muon`, which also keeps value heads on AdamW."""
    def tag(config_class: Any, model: torch.nn.Module) -> None:
        tag_with_deepspeed_rule(config_class, model)
        for name, param in model.named_parameters():
            if getattr(param, "use_muon", False):
                param.use_muon = uses_muon(name, tuple(getattr(param, "ds_shape", None) or param.shape))
    return tag


@contextlib.contextmanager
def _patched_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set `owner.name = value` for the duration of the block, then put back what was there."""
    missing = object()
    previous = vars(owner).get(name, missing)  # an instance may only inherit `name` from its class
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)


def _assert_same_in_group(values: list[int], group: dist.ProcessGroup) -> None:
    """Raise if `values` differ between the ranks of `group` (compared against the group's first rank)."""
    first = [values]
    dist.broadcast_object_list(first, src=dist.get_global_rank(group, 0), group=group)
    if first[0] != values:
        raise RuntimeError(f"ZeRO-3 module trace differs between data-parallel ranks: global rank "
                           f"{dist.get_rank()} has {values}, the group's first rank has {first[0]}")


@contextlib.contextmanager
def engine_scope(mpu: DataParallelUnit) -> Iterator[None]:
    """Point DeepSpeed's process-wide state at this engine's group for the duration of one engine call.

    - `deepspeed.utils.groups.mpu` becomes this engine's unit;
    - barriers DeepSpeed issues without a group go to the data-parallel group instead of the world;
    - ZeRO-3's check that all ranks traced the same module order (a broadcast from global rank 0 in
      DeepSpeed) compares within the data-parallel group;
    - with tensor parallelism, DeepSpeed's module-wide tensor/data-parallel groups (which an AutoTP engine reads
      instead of its mpu, and would otherwise build over the whole world) are this unit's.
    Everything is restored on exit.
    """
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.zero import partitioned_param_coordinator
    from deepspeed.utils import groups as ds_groups

    backend = ds_comm.comm.cdb
    world_barrier = backend.barrier
    dp_group = mpu.get_data_parallel_group()
    role_group = mpu.group

    def group_barrier(group=None, async_op=False, device_ids=None):
        if group is None or group is dist.group.WORLD:
            group = role_group
        return world_barrier(group=group, async_op=async_op, device_ids=device_ids)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched_attribute(ds_groups, "mpu", mpu))
        stack.enter_context(_patched_attribute(backend, "barrier", group_barrier))
        stack.enter_context(_patched_attribute(
            partitioned_param_coordinator, "assert_ints_same_as_other_ranks",
            lambda values: _assert_same_in_group(list(values), dp_group)))
        if mpu.tp_size > 1:
            for name, value in (("_TENSOR_MODEL_PARALLEL_GROUP", mpu.tp_group), ("_MODEL_PARALLEL_GROUP", mpu.tp_group),
                                ("_DATA_PARALLEL_GROUP", dp_group),
                                ("get_tensor_model_parallel_src_rank", mpu.get_tensor_model_parallel_src_rank)):
                stack.enter_context(_patched_attribute(ds_groups, name, value))
        yield


def _ensure_deepspeed_comm() -> None:
    """Let DeepSpeed adopt the already initialised torch.distributed world (it never re-initialises it)."""
    import deepspeed

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised (all ranks, gloo or nccl) before DeepSpeed engines")
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer of a Hugging Face model in place (the classes its `_no_split_modules`
    names); returns how many. Layers share one compiled graph, so compiling costs about one layer's time."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"compile: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def init_engine(model: torch.nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                num_training_steps: int) -> tuple[Any, DataParallelUnit]:
    """Wrap `model` in a training DeepSpeed engine over `dp_group` (None = world) with AdamW (or DeepSpeed's Muon,
    `cfg.optim`) and the warmup schedule.

    Called by the members of `dp_group` only. Returns the engine and its `DataParallelUnit`, which every
    later engine call must run under (`engine_scope`).
    """
    import deepspeed

    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    _ensure_deepspeed_comm()
    mpu = DataParallelUnit(dp_group, tp_size=cfg.tensor_parallel_size)
    ds_config = make_ds_config(cfg, mpu.get_data_parallel_world_size(), training=True)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    warmup = warmup_steps_for(cfg, num_training_steps)

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, warmup_steps=warmup, total_steps=num_training_steps,
                                       scheduler=cfg.lr_scheduler, min_lr_ratio=cfg.min_lr_ratio))

    with engine_scope(mpu):
        if cfg.optim == "muon":
            # DeepSpeed builds Muon itself (it splits each group into a Muon and an AdamW half by `use_muon`).
            ds_config["optimizer"] = muon_optimizer_config(cfg)
            groups = [g for g in param_groups_for(model, cfg.weight_decay) if g["params"]]
            with _patched_attribute(deepspeed, "set_optimizer_flags",
                                    _tag_muon_parameters(deepspeed.set_optimizer_flags)):
                engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=schedule,
                                                  config=ds_config, mpu=mpu, dist_init_required=False)
        else:
            optimizer = make_optimizer(model, cfg)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule(optimizer),
                                              config=ds_config, mpu=mpu, dist_init_required=False)
    if cfg.compile:
        compile_decoder_layers(engine.module)
    return engine, mpu


def init_inference_engine(model: torch.nn.Module, cfg: EngineConfig,
                          dp_group: dist.ProcessGroup | None) -> tuple[Any, DataParallelUnit]:
    """Wrap a frozen `model` in an optimizer-less DeepSpeed engine (ZeRO-3 partitions its weights over the group)."""
    import deepspeed

    _ensure_deepspeed_comm()
    mpu = DataParallelUnit(dp_group)
    ds_config = make_ds_config(cfg, mpu.get_data_parallel_world_size(), training=False)
    with engine_scope(mpu):
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu, dist_init_required=False)
    engine.eval()
    return engine, mpu


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing of a Hugging Face model (non-reentrant, which ZeRO-3 prefers)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"gradient_checkpointing needs a Hugging Face model, got {type(model).__name__}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def all_reduce_in_group(values: Sequence[float], op: dist.ReduceOp.RedOpType,
                        mpu: DataParallelUnit) -> list[float]:
    """All-reduce a few Python floats over the engine's data-parallel group (fp64, exact for counts)."""
    group = mpu.get_data_parallel_group()
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu().tolist()
