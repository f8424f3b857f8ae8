"""Actor, critic and reference model wrappers on DeepSpeed, over a data-parallel role group.

- `Actor`: causal LM trained with a caller-supplied loss; gives per-token log-probs (and entropy) of responses.
- `Critic`: causal LM backbone + scalar value head per token, stored as a `*ForSequenceClassification`
  model with `num_labels=1` (so reward-model checkpoints load as critics and saved critics reload with
  `AutoModelForSequenceClassification.from_pretrained` or `Critic.from_pretrained`).
- `Reference`: frozen causal LM, no optimizer; a ZeRO-3 inference engine (weights partitioned over the
  group) when `zero_stage == 3`, else a plain module.

Vision-language models (`AutoModelForImageTextToText` folders) load with their image processor; a micro-batch with
images gets their vision tensors (`pixel_values`, ...) rebuilt from the PNG bytes in its forward pass.

The log-prob / value of response token j is read from the model output one position before it (the logits there
predict it; `forwards.py` holds the forward passes themselves). The loss functions live elsewhere: `backward` runs
the caller's `loss_fn(micro_batch, output)` per micro-batch and weights the results so that the gradient is that of
the mean over all tokens (or samples) of the whole data-parallel batch, whatever the micro-batching.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpc_rlhf.data.images import (
    causal_lm_auto_class,
    check_plain_positions,
    is_vision_language,
    load_image_processor,
)
from hpc_rlhf.distributed.weights import full_named_parameters, plain_parameter_name
from hpc_rlhf.training.batching import (
    LOSS_WEIGHTINGS,
    MicroBatch,
    loss_units,
    loss_weights,
    pad_micro_batch_count,
    response_token_index,
    to_device,
)
from hpc_rlhf.training.deepspeed_setup import (
    DataParallelUnit,
    EngineConfig,
    all_reduce_in_group,
    engine_scope,
    init_engine,
    init_inference_engine,
)
from hpc_rlhf.training.ema import EmaWeights
from hpc_rlhf.training.forwards import (
    ForwardOutput,
    accepts_logits_to_keep,
    causal_lm_log_probs,
    is_mixture_of_experts,
    model_inputs,
    predicting_on_shard,
    sequence_parallel_log_probs,
    to_response_layout,
)
from hpc_rlhf.training.lora import LoraSettings, apply_lora, is_lora_model, save_adapter, unwrap
from hpc_rlhf.training.sequence_parallel import (
    SequenceParallel,
    sequence_parallel,
    shard_packed_row,
    sum_over_group,
    use_sequence_parallel_attention,
)
from hpc_rlhf.training.varlen_attention import VARLEN, attn_implementation_to_load, use_varlen_attention

VALUE_HEAD_NAMES: tuple[str, ...] = ("score", "classifier", "v_head", "value_head")
EMA_FILE = "ema.pt"  # beside the engine's DeepSpeed files in its checkpoint folder

LossResult = torch.Tensor | tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]
LossFn = Callable[[MicroBatch, ForwardOutput], LossResult]


def _local_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _load(auto_class: Any, path: str | os.PathLike, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
          **config_overrides: Any) -> nn.Module:
    """A Hugging Face model from `path`: built straight into ZeRO-3 partitions over `dp_group` for stage 3 (no rank
    holds the whole model), else loaded whole with `from_pretrained`. New heads (a critic's value head) may be missing
    from the checkpoint. With `attn_implementation: varlen` it is loaded with SDPA, then switched."""
    if cfg.zero_stage == 3 and dist.is_initialized():
        from hpc_rlhf.training.zero3_loading import load_partitioned

        model = load_partitioned(auto_class, path, cfg, dp_group, allowed_missing=VALUE_HEAD_NAMES,
                                 **config_overrides)
    else:
        model = auto_class.from_pretrained(str(path), dtype=cfg.torch_dtype,
                                           attn_implementation=attn_implementation_to_load(cfg.attn_implementation),
                                           **config_overrides)
    if cfg.attn_implementation == VARLEN:
        use_varlen_attention(model)
    return model


def _check_weighting(loss_weighting: str) -> None:
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")


def _split_loss(result: LossResult) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    if isinstance(result, tuple):
        loss, metrics = result
    else:
        loss, metrics = result, {}
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(f"loss_fn must return a scalar tensor (or (scalar, metrics)), got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    # Tensor metrics stay on the device (detached): reading each one would wait for the device, micro-batch by
    # micro-batch; `backward` reads them all at once at the end.
    return loss, {key: value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                  for key, value in metrics.items()}


def _read_all(values: Sequence[torch.Tensor | float], device: torch.device) -> list[float]:
    """Python floats of device tensors and floats, with one wait for the device instead of one per value."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]).tolist()


def with_aux_loss(loss: torch.Tensor, aux_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """The trained loss of a mixture-of-experts policy: the task loss plus `coef` times the router's load-balancing
    loss (OpenRLHF's `--aux_loss_coef`)."""
    return loss + coef * aux_loss.to(loss.device, loss.dtype)


def gather_full_state_dict(model: nn.Module, mpu: DataParallelUnit, *,
                           merge_lora: bool = True) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict on data-parallel rank 0 (None elsewhere), tied parameters under each of their names.

    ZeRO-3 and AutoTP shards are gathered one by one by `full_named_parameters` (every rank of the group takes part);
    only the writer copies each one to host memory, the other ranks keep nothing. A LoRA (peft) model gives the state
    dict of the plain model with its adapters merged, or with `merge_lora=False` its own (peft names, adapters apart).
    """
    tp_rank = getattr(mpu, "get_tensor_model_parallel_rank", lambda: 0)()  # a unit without tensor parallelism: 0
    is_writer = mpu.get_data_parallel_rank() == 0 and tp_rank == 0
    rename = plain_parameter_name if merge_lora and is_lora_model(model) else (lambda name: name)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if rename(name) is not None:
            names_of.setdefault(id(param), []).append(rename(name))
    tied_names = {names[0]: names for names in names_of.values()}  # first name (the one named_parameters gives) -> all
    state: dict[str, torch.Tensor] = {}
    for first_name, full in full_named_parameters(model, copy_gathered=False, merge_lora=merge_lora):
        if is_writer:
            copy = full.detach().cpu().clone()
            for name in tied_names[first_name]:
                state[name] = copy
    if not is_writer:
        return None
    parameter_names = {name for names in names_of.values() for name in names}
    for name, buffer in model.state_dict().items():
        name = rename(name)
        if name is not None and name not in parameter_names:
            state[name] = buffer.detach().cpu().clone()
    return state


def write_hf_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> None:
    """Write config (+ generation config) and sharded safetensors that `from_pretrained` loads.

    Written directly rather than with `save_pretrained`, which in transformers 5 writes only on global
    rank 0 of the world, and the group's writer need not be that rank. Tied copies (e.g. an lm_head tied to
    the embeddings) are left out, as `save_pretrained` does; loading ties them again.
    """
    from huggingface_hub import save_torch_state_dict

    os.makedirs(out_dir, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    save_torch_state_dict({k: v for k, v in state.items() if k not in tied}, out_dir, metadata={"format": "pt"})


class TrainedModel(abc.ABC):
    """A training DeepSpeed engine over one data-parallel group; subclasses define `forward`."""

    def __init__(self, module: nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                 num_training_steps: int, *, sp_group: dist.ProcessGroup | None = None) -> None:
        self.cfg = cfg
        self.sp: SequenceParallel | None = sequence_parallel(sp_group, cfg.ring_attn_size)
        self.engine, self.mpu = init_engine(module, cfg, dp_group, num_training_steps)
        self.ema: EmaWeights | None = None
        if cfg.ema_beta is not None:
            self.ema = EmaWeights(cfg.ema_beta, is_writer=self.is_writer)
            with engine_scope(self.mpu):
                self.ema.init(self.hf_model())

    # ----- group ---------------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.mpu.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        """Ranks of the DeepSpeed engine's group (ZeRO partitions and gradient averaging span all of them)."""
        return self.mpu.get_data_parallel_world_size()

    @property
    def is_writer(self) -> bool:
        """The rank that writes the group's files: data-parallel rank 0 (and tensor-parallel rank 0 under AutoTP)."""
        return self.dp_rank == 0 and self.mpu.get_tensor_model_parallel_rank() == 0

    @property
    def sp_size(self) -> int:
        """Ranks of this rank's sequence-parallel group (`ring_attn_size`; 1 without sequence parallelism)."""
        return 1 if self.sp is None else self.sp.size

    @property
    def batch_ranks(self) -> int:
        """Ranks that take different samples: the group's ranks / `sp_size` (a sequence-parallel group shares them)."""
        return self.dp_size // self.sp_size

    @property
    def batch_rank(self) -> int:
        """Which share of the samples this rank takes, 0 .. batch_ranks - 1."""
        return self.dp_rank // self.sp_size

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def module(self) -> nn.Module:
        """The wrapped module (parameters partitioned under ZeRO-3)."""
        return self.engine.module

    def hf_model(self) -> nn.Module:
        """The Hugging Face model that `save_hf` writes."""
        return self.engine.module

    def scope(self) -> contextlib.AbstractContextManager[None]:
        """Context for any direct use of `engine` / `module` (e.g. `generate` under ZeRO-3): see `engine_scope`."""
        return engine_scope(self.mpu)

    # ----- colocated memory ----------------------------------------------------------------------------
    def can_offload_states(self) -> bool:
        """Whether `offload_states` frees anything: optimizer states and ZeRO buffers live in accelerator memory
        (DeepSpeed moves ZeRO-3 states only with its FusedAdam, which runs on GPUs; CPU-offloaded optimizers and
        parameters already live in host memory)."""
        if self.cfg.adam_offload or self.cfg.param_offload:
            return False
        return self.cfg.zero_stage in (1, 2) or (self.cfg.zero_stage == 3 and self.device.type == "cuda")

    def offload_states(self) -> None:
        """Move optimizer states, fp32 master weights and gradient buffers to host memory while the colocated
        generator runs (`ds.enable_sleep`); `reload_states` brings them back before the next update."""
        if self.can_offload_states():
            with self.scope():
                self.engine.offload_states()

    def reload_states(self) -> None:
        if self.can_offload_states():
            with self.scope():
                self.engine.reload_states()

    @abc.abstractmethod
    def forward(self, batch: MicroBatch) -> ForwardOutput:
        """Per-token outputs of one micro-batch, with gradients when grad mode is on."""

    # ----- micro-batch loops ---------------------------------------------------------------------------
    def equalize(self, micro_batches: Sequence[MicroBatch]) -> list[MicroBatch]:
        """Pad with fillers so that every rank of the group runs the same number of micro-batches."""
        (most,) = all_reduce_in_group([len(micro_batches)], dist.ReduceOp.MAX, self.mpu)
        return pad_micro_batch_count(micro_batches, int(most))

    @torch.no_grad()
    def infer(self, micro_batches: Sequence[MicroBatch]) -> list[ForwardOutput]:
        """Forward-only pass (eval mode) over the micro-batches; one output per given micro-batch."""
        self.engine.eval()
        with engine_scope(self.mpu):
            batches = self.equalize(micro_batches)
            outputs = [self.forward(batch) for batch in batches]
        self.engine.train()
        return outputs[: len(micro_batches)]

    def backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn,
                 loss_weighting: str = "token") -> dict[str, float]:
        """Accumulate gradients of `loss_fn` over the micro-batches (no optimizer step).

        `loss_fn` returns the mean loss of its micro-batch over `loss_weighting` units: action tokens
        ("token"), samples ("sample") or the whole micro-batch ("micro_batch"). The accumulated gradient
        is that of the mean over all units of all data-parallel ranks. Returns metrics ("loss" and those of
        `loss_fn`) averaged the same way over the group. When the forward gives a mixture-of-experts load-balancing
        loss (`cfg.aux_loss_coef > 0`), each micro-batch trains on `loss + aux_loss_coef * aux_loss`; "loss" stays
        `loss_fn`'s and "aux_loss" is logged beside it.

        With sequence parallelism the `sp_size` ranks of a group hold the same micro-batches (their units are counted
        once) and each computes the same loss; their parameter gradients add up to that loss's gradient, and DeepSpeed
        divides the sum over all `dp_size` ranks by `dp_size`, so the weights stay `units x dp_size / global units`.
        """
        _check_weighting(loss_weighting)
        self.engine.train()
        with engine_scope(self.mpu):
            batches = self.equalize(micro_batches)
            (global_units,) = all_reduce_in_group([sum(loss_units(b, loss_weighting) for b in batches)],
                                                  dist.ReduceOp.SUM, self.mpu)
            global_units /= self.sp_size  # a sequence-parallel group holds its units once
            weights = loss_weights(batches, loss_weighting, global_units=global_units, dp_size=self.dp_size)
            sums: dict[str, torch.Tensor | float] = {}
            for index, (batch, weight) in enumerate(zip(batches, weights)):
                self.engine.set_gradient_accumulation_boundary(index == len(batches) - 1)
                output = self.forward(batch)
                loss, metrics = _split_loss(loss_fn(batch.response_layout_to(self.device), output))
                metrics = {"loss": loss.detach().double(), **metrics}
                if output.aux_loss is not None:
                    metrics["aux_loss"] = output.aux_loss.detach().double()
                    loss = with_aux_loss(loss, output.aux_loss, self.cfg.aux_loss_coef)
                self.engine.backward(loss * weight, scale_wrt_gas=False)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + weight * value
            keys = sorted(sums)
            totals = all_reduce_in_group(_read_all([sums[k] for k in keys], self.device), dist.ReduceOp.SUM,
                                         self.mpu)
        return {key: total / (self.dp_size * self.sp_size) for key, total in zip(keys, totals)}

    def optimizer_step(self) -> dict[str, float]:
        """Apply the accumulated gradients (clipped to `max_norm`); returns the grad norm and the lr used."""
        lr = float(self.engine.get_lr()[0])
        with engine_scope(self.mpu):
            self.engine.step()
            if self.ema is not None:
                self.ema.update(self.hf_model())
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return {"grad_norm": grad_norm, "lr": lr}

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn,
                   loss_weighting: str = "token") -> dict[str, float]:
        """`backward` then `optimizer_step`: one optimizer update from these micro-batches."""
        metrics = self.backward(micro_batches, loss_fn, loss_weighting)
        return {**metrics, **self.optimizer_step()}

    # ----- checkpoints ---------------------------------------------------------------------------------
    def full_state_dict(self, *, merge_lora: bool = True) -> dict[str, torch.Tensor] | None:
        """The Hugging Face model's full CPU state dict on data-parallel rank 0, None elsewhere; all ranks call. A LoRA
        model gives the plain model's, adapters merged (its own peft state dict with `merge_lora=False`)."""
        with engine_scope(self.mpu):
            return gather_full_state_dict(self.hf_model(), self.mpu, merge_lora=merge_lora)

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        """Write a Hugging Face checkpoint (config + safetensors) from data-parallel rank 0; all ranks call. A LoRA
        model is written merged, as the plain model `from_pretrained` loads."""
        state = self.full_state_dict()
        if state is not None:
            write_hf_checkpoint(unwrap(self.hf_model()), state, out_dir)
        dist.barrier(group=self.mpu.get_data_parallel_group())

    def save_ema_hf(self, out_dir: str | os.PathLike) -> None:
        """Write the EMA of the weights (`cfg.ema_beta`) as a Hugging Face checkpoint from data-parallel rank 0; all
        ranks call."""
        if self.ema is None:
            raise RuntimeError("this model keeps no EMA of its weights (ema_beta is not set)")
        state = self.full_state_dict()
        if state is not None:
            write_hf_checkpoint(self.hf_model(), self.ema.full_state_dict(state), out_dir)
        dist.barrier(group=self.mpu.get_data_parallel_group())

    def save_lora_adapter(self, out_dir: str | os.PathLike, *, ema: bool = False) -> None:
        """Write the LoRA adapter in peft's format (adapter_config.json + adapter weights; its EMA with `ema`) from
        data-parallel rank 0; all ranks call."""
        if ema and self.ema is None:
            raise RuntimeError("this model keeps no EMA of its weights (ema_beta is not set)")
        state = self.full_state_dict(merge_lora=False)
        if state is not None:
            save_adapter(self.hf_model(), self.ema.full_state_dict(state) if ema else state, out_dir)
        dist.barrier(group=self.mpu.get_data_parallel_group())

    def save_state(self, checkpoint_dir: str | os.PathLike, tag: str,
                   client_state: Mapping[str, Any] | None = None) -> None:
        """Full training state (weights, optimizer, scheduler, EMA) for resume; all ranks of the group call."""
        with engine_scope(self.mpu):
            self.engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=dict(client_state or {}))
        if self.ema is not None and self.is_writer:
            torch.save(self.ema.state_dict(), os.path.join(checkpoint_dir, tag, EMA_FILE))

    def load_state(self, checkpoint_dir: str | os.PathLike, tag: str) -> dict[str, Any]:
        """Restore what `save_state` wrote (into a freshly built engine); returns the client state."""
        with engine_scope(self.mpu):
            path, client_state = self.engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no checkpoint with tag {tag!r} under {checkpoint_dir}")
        if self.ema is not None and self.is_writer:
            ema_path = os.path.join(checkpoint_dir, tag, EMA_FILE)
            if not os.path.isfile(ema_path):
                raise FileNotFoundError(f"{ema_path} is missing: the checkpoint was saved without an EMA "
                                        "(actor.enable_ema was off)")
            self.ema.load_state_dict(torch.load(ema_path, map_location="cpu", weights_only=True))
        return client_state


class Actor(TrainedModel):
    """Policy: a causal LM on a training engine. `forward` gives log-probs (and entropy if `with_entropy`)."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                 num_training_steps: int, *, temperature: float = 1.0, with_entropy: bool = False,
                 image_processor: Any = None, sp_group: dist.ProcessGroup | None = None) -> None:
        self.temperature = temperature
        self.with_entropy = with_entropy
        self.image_processor = image_processor
        self._supports_logits_to_keep = accepts_logits_to_keep(model)
        self.output_router_logits = cfg.aux_loss_coef > 0
        if self.output_router_logits and not is_mixture_of_experts(model):
            raise ValueError(f"aux_loss_coef={cfg.aux_loss_coef} needs a mixture-of-experts model (one whose config "
                             f"has output_router_logits, e.g. Mixtral or Qwen3-MoE); this is a {type(model).__name__}")
        if cfg.ring_attn_size > 1:
            use_sequence_parallel_attention(model)
        super().__init__(model, cfg, dp_group, num_training_steps, sp_group=sp_group)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                        num_training_steps: int, *, lora: LoraSettings | None = None, **kwargs: Any) -> Actor:
        """Load a causal LM (or a vision-language model with its image processor) with the config's dtype and
        attention implementation and wrap it; with `lora`, the base is frozen and LoRA adapters train (ZeRO-3 loads
        the base into partitions first, then adds the adapters)."""
        model = _load(causal_lm_auto_class(path), path, cfg, dp_group)
        if is_vision_language(model.config):
            check_plain_positions(model)
            kwargs.setdefault("image_processor", load_image_processor(path))
        if lora is not None:
            model = apply_lora(model, lora, "causal_lm")
        return cls(model, cfg, dp_group, num_training_steps, **kwargs)

    def forward(self, batch: MicroBatch) -> ForwardOutput:
        """Log-probs of the response tokens at `temperature` (and their entropy if `with_entropy`); the router's
        load-balancing loss too when training with `aux_loss_coef > 0` (not in evaluation passes)."""
        if self.sp is not None:
            return sequence_parallel_log_probs(self.engine, batch, self.device, self.sp, temperature=self.temperature,
                                               with_entropy=self.with_entropy,
                                               supports_logits_to_keep=self._supports_logits_to_keep)
        return causal_lm_log_probs(self.engine, batch, self.device, temperature=self.temperature,
                                   with_entropy=self.with_entropy,
                                   supports_logits_to_keep=self._supports_logits_to_keep,
                                   image_processor=self.image_processor,
                                   output_router_logits=self.output_router_logits and torch.is_grad_enabled())


class BaseOfLoraActor:
    """The reference policy of a LoRA actor trained from the reference's own weights: the actor's engine with its
    adapters switched off, which is the frozen base, so no second copy of the model is loaded. `infer` is the actor's
    (all ranks of the actor group call it together)."""

    def __init__(self, actor: Actor) -> None:
        if not is_lora_model(actor.hf_model()):
            raise ValueError("BaseOfLoraActor needs an actor with LoRA adapters")
        self.actor = actor

    def infer(self, micro_batches: Sequence[MicroBatch]) -> list[ForwardOutput]:
        """Log-probs (no entropy) of the base model for each micro-batch."""
        with self.actor.hf_model().disable_adapter():
            outputs = self.actor.infer(micro_batches)
        return [ForwardOutput(log_probs=output.log_probs) for output in outputs]


class TokenValueModel(nn.Module):
    """A `*ForSequenceClassification` model (num_labels=1) read per token: value = head(hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"the critic needs a sequence classification model with num_labels=1, "
                             f"got num_labels={getattr(model.config, 'num_labels', None)}")
        self.model = model
        self.head_name = next((n for n in VALUE_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
        if self.head_name is None:
            raise ValueError(f"{type(model).__name__} has no value head named one of {VALUE_HEAD_NAMES}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor, use_cache: bool = False, **kwargs: Any) -> torch.Tensor:
        """[rows, seq] values, one per input position (`kwargs`, e.g. a sequence shard, go to the attention layers)."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=use_cache, **kwargs).last_hidden_state
        return getattr(self.model, self.head_name)(hidden).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Passed through to the Hugging Face model (used by `init_engine`)."""
        self.model.gradient_checkpointing_enable(**kwargs)


class Critic(TrainedModel):
    """Value model on a training engine. `forward` gives per-token values of the response tokens."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                 num_training_steps: int, *, sp_group: dist.ProcessGroup | None = None) -> None:
        if cfg.ring_attn_size > 1:
            use_sequence_parallel_attention(model)
        super().__init__(TokenValueModel(model), cfg, dp_group, num_training_steps, sp_group=sp_group)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                        num_training_steps: int, *, sp_group: dist.ProcessGroup | None = None) -> Critic:
        """Load a causal LM (new value head) or a reward/critic checkpoint (its head) as a critic."""
        from transformers import AutoModelForSequenceClassification

        model = _load(AutoModelForSequenceClassification, path, cfg, dp_group, num_labels=1)
        return cls(model, cfg, dp_group, num_training_steps, sp_group=sp_group)

    def hf_model(self) -> nn.Module:
        """The `*ForSequenceClassification` model inside the per-token wrapper."""
        return self.engine.module.model

    def forward(self, batch: MicroBatch) -> ForwardOutput:
        """Values of the states before each response token (read one position earlier, like log-probs)."""
        if self.sp is not None:
            return self._sequence_parallel_forward(batch, self.sp)
        rows, columns, sample, offset = response_token_index(batch)
        values = self.engine(**model_inputs(batch, self.device))
        flat = values[to_device(rows, self.device), to_device(columns - 1, self.device)].float()
        return ForwardOutput(values=to_response_layout(flat, batch, sample, offset))

    def _sequence_parallel_forward(self, batch: MicroBatch, sp: SequenceParallel) -> ForwardOutput:
        """Values on this rank's slice, summed over the group (a zero-weighted anchor keeps every layer in the
        graph, as in `sequence_parallel_log_probs`)."""
        shard = shard_packed_row(batch.input_ids, batch.position_ids, sp, device=self.device)
        _, sample, offset, local = predicting_on_shard(batch, shard)
        values = self.engine(**shard.model_inputs())[0]  # [slice]
        flat = values[to_device(local, self.device)].float()
        local_layout = to_response_layout(flat, batch, sample, offset) + values[:1].sum().float() * 0.0
        return ForwardOutput(values=sum_over_group(local_layout, sp.group))


class Reference:
    """Frozen policy for KL: a ZeRO-3 inference engine over `dp_group` when `zero_stage == 3`, else a module."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, dp_group: dist.ProcessGroup | None, *,
                 temperature: float = 1.0, image_processor: Any = None,
                 sp_group: dist.ProcessGroup | None = None) -> None:
        self.cfg = cfg
        self.temperature = temperature
        self.image_processor = image_processor
        self._supports_logits_to_keep = accepts_logits_to_keep(model)
        self.sp: SequenceParallel | None = sequence_parallel(sp_group, cfg.ring_attn_size)
        if self.sp is not None:
            use_sequence_parallel_attention(model)
        model.requires_grad_(False)
        if cfg.zero_stage == 3:
            self.engine, self.mpu = init_inference_engine(model, cfg, dp_group)
            self.model: Callable[..., Any] = self.engine
            self.device = self.engine.device
        else:
            self.engine, self.mpu = None, None
            self.device = _local_device()
            self.model = model.to(self.device).eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, cfg: EngineConfig, dp_group: dist.ProcessGroup | None,
                        **kwargs: Any) -> Reference:
        """Load a frozen causal LM (or vision-language model, with its image processor) with the config's dtype and
        attention implementation."""
        model = _load(causal_lm_auto_class(path), path, cfg, dp_group)
        if is_vision_language(model.config):
            check_plain_positions(model)
            kwargs.setdefault("image_processor", load_image_processor(path))
        return cls(model, cfg, dp_group, **kwargs)

    def scope(self) -> contextlib.AbstractContextManager[None]:
        """Context for any direct use of a ZeRO-3 `engine` (no-op for a plain module): see `engine_scope`."""
        return contextlib.nullcontext() if self.mpu is None else engine_scope(self.mpu)

    @torch.no_grad()
    def forward(self, batch: MicroBatch) -> ForwardOutput:
        """Log-probs of one micro-batch; with ZeRO-3 (or sequence parallelism) call it on every rank of the group."""
        if self.sp is not None:
            return sequence_parallel_log_probs(self.model, batch, self.device, self.sp, temperature=self.temperature,
                                               supports_logits_to_keep=self._supports_logits_to_keep)
        return causal_lm_log_probs(self.model, batch, self.device, temperature=self.temperature,
                                   supports_logits_to_keep=self._supports_logits_to_keep,
                                   image_processor=self.image_processor)

    @torch.no_grad()
    def infer(self, micro_batches: Sequence[MicroBatch]) -> list[ForwardOutput]:
        """Log-probs for each micro-batch; with ZeRO-3 all ranks of the group must call it together."""
        if self.engine is None or self.mpu is None:
            return [self.forward(batch) for batch in micro_batches]
        with engine_scope(self.mpu):
            (most,) = all_reduce_in_group([len(micro_batches)], dist.ReduceOp.MAX, self.mpu)
            batches = pad_micro_batch_count(micro_batches, int(most))
            outputs = [self.forward(batch) for batch in batches]
        return outputs[: len(micro_batches)]
