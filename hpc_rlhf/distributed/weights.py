"""The weight plane: actor -> generator weight broadcast in fixed-size buckets, with a version number.

Sender side (`broadcast_weights`), called by every actor rank: the parameters are split into buckets of at most
`bucket_mb` (in the generator's dtype; a larger tensor gets a bucket of its own). For each bucket, ZeRO-3 partitions are
gathered with `deepspeed.zero.GatheredParameters` (a collective over the actor group, so every actor rank takes part),
and the source rank flattens the bucket into one contiguous buffer of the generator dtype and broadcasts it over the
weight-sync group ({actor rank 0} + all generator ranks). A manifest (version, dtype, names and shapes per bucket) goes
first as one small object broadcast, so receivers can allocate each bucket's buffer.

Receiver side: `receive_weight_stream` yields (name, tensor) pairs bucket by bucket, which is what vLLM's
`model.load_weights` consumes; `receive_weights` applies them in place to a Hugging Face model with `load_named_tensors`,
which maps names explicitly, handles tied weights and checks that every parameter was written.

`sync_weights` is the one entry the trainers call: a rank holding both the actor and an engine (colocated layout)
loads `full_named_parameters` into its engine, an actor rank broadcasts, a generator rank receives into its engine.
`full_named_parameters` is also what the Hugging Face checkpoint writer gathers with (training/models.py).
Ranks (`src`) are global ranks, as everywhere in torch.distributed.

A LoRA actor (a peft model) is exported as the plain model it stands for: `exported_parameters` names each weight as
the base model does and folds the active adapters into it (W + alpha/r * B @ A, `merge_lora_weight`), so generators
and the Hugging Face save never see peft names; `merge_lora=False` keeps the peft parameters as they are (the adapter
save and the EMA use that).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist


class WeightSyncError(RuntimeError):
    """Weights could not be applied; the message names the parameters."""


class WeightLoader(Protocol):
    """What the weight plane needs of a generation engine (every `hpc_rlhf.generation` engine has it)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF parameter name, full tensor) pairs into the model in place; returns how many were applied."""
        ...


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a bucket: its name on the actor and its full (gathered) shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class WeightManifest:
    """What a broadcast carries: the weight version, the wire dtype and the tensors of each bucket, in order."""

    version: int
    dtype: str
    buckets: tuple[tuple[TensorSpec, ...], ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def num_tensors(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    @property
    def total_bytes(self) -> int:
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return sum(spec.numel for bucket in self.buckets for spec in bucket) * element


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The whole parameter's shape, also for a ZeRO-3 partition (whose local `.shape` is empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


# ----- LoRA: the plain model a peft model stands for ------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the Hugging Face model
# Parameters that exist only in the peft model: the adapter factors (folded into their base weight) and the frozen
# original of a module peft trains a copy of.
_PEFT_ONLY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|original_module)\.")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")


@dataclass(frozen=True)
class LoraFactor:
    """One active adapter of a LoRA layer: delta W = scale * B @ A (transposed for a fan-in-fan-out base layer)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class ExportedParameter:
    """A weight as a plain model names it: the parameter itself, or a base weight with the LoRA factors to fold in."""

    name: str
    param: torch.Tensor
    lora: tuple[LoraFactor, ...] = ()

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every parameter the weight is made of (what a ZeRO-3 gather must make whole)."""
        return (self.param, *(t for factor in self.lora for t in (factor.a, factor.b)))

    def value(self) -> torch.Tensor:
        """The full weight; inside `gathered(self.tensors)` under ZeRO-3. The parameter's own data without LoRA."""
        return merge_lora_weight(self.param.data, self.lora) if self.lora else self.param.data


def merge_lora_weight(weight: torch.Tensor, factors: Sequence[LoraFactor]) -> torch.Tensor:
    """W + sum of scale * B @ A over the factors, computed in fp32 and returned in W's dtype (a new tensor)."""
    merged = weight.float()
    for factor in factors:
        delta = (factor.b.data.float() @ factor.a.data.float()) * factor.scale
        merged = merged + (delta.T if factor.fan_in_fan_out else delta)
    return merged.to(weight.dtype)


def is_peft_model(model: torch.nn.Module) -> bool:
    """A peft model (duck-typed: the weight plane does not import peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def plain_parameter_name(name: str) -> str | None:
    """The base model's name of a peft parameter (or buffer), or None for one the plain model does not have."""
    if _PEFT_ONLY.search(name):
        return None
    return _SAVED_COPY.sub(".", name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."))


def _lora_factors(name: str, layer: torch.nn.Module) -> tuple[LoraFactor, ...]:
    """The factors of the adapters `layer` applies in its forward pass (none when disabled or already merged)."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return ()
    if len(getattr(layer, "lora_embedding_A", {})) or any(getattr(layer, "use_dora", {}).values()):
        raise WeightSyncError(f"{name}: only LoRA on linear layers is merged for the generator (no embedding LoRA, "
                              "no DoRA); target linear modules")
    adapters = [adapter for adapter in layer.active_adapters if adapter in layer.lora_A]
    return tuple(LoraFactor(a=layer.lora_A[adapter].weight, b=layer.lora_B[adapter].weight,
                            scale=float(layer.scaling[adapter]),
                            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False))) for adapter in adapters)


def exported_parameters(model: torch.nn.Module, *, merge_lora: bool = True) -> list[ExportedParameter]:
    """Every parameter in `named_parameters` order (tied ones once). A peft model with `merge_lora` comes as the plain
    model: base names, adapters folded into their base weights, adapter-only parameters left out."""
    named = list(model.named_parameters())
    if not merge_lora or not is_peft_model(model):
        return [ExportedParameter(name, param) for name, param in named]
    factors = {f"{name}.base_layer.weight": _lora_factors(name, module) for name, module in model.named_modules()
               if hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "scaling")}
    exported = []
    for name, param in named:
        plain = plain_parameter_name(name)
        if plain is not None:
            exported.append(ExportedParameter(plain, param, factors.get(name, ())))
    return exported


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int, element_size: int) -> list[list[int]]:
    """Split tensors, in order, into buckets of at most `bucket_bytes`; a tensor larger than that is alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, spec in enumerate(specs):
        size = spec.numel * element_size
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        buckets.append(current)
    return buckets


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if not dtype.is_floating_point or getattr(torch, name, None) is not dtype:
        raise ValueError(f"weights travel as a floating-point dtype, got {dtype}")
    return name


def gathered(params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Make ZeRO-3 partitions whole for the duration of the block: a collective over their group, so every rank of it
    enters with the same parameters. Whole tensors, ZeRO-3 ones already available (persistent) too, stay as they are.
    """
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = [p for p in params if hasattr(p, "ds_id") and p.ds_status != ZeroParamStatus.AVAILABLE]
    if not partitioned:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def full_named_parameters(model: torch.nn.Module, dtype: torch.dtype | None = None, *,
                          copy_gathered: bool = True, merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter in `named_parameters` order (tied ones once), as `dtype` (None keeps
    each parameter's dtype); ZeRO-3 partitions are gathered one parameter at a time. A peft model comes as the plain
    model it stands for (`exported_parameters`), unless `merge_lora` is False.

    Every rank of a ZeRO-3 group (or AutoTP block) iterates to the end (each gather is a collective). A gathered
    tensor is freed when the iterator moves on, so it comes as a copy; with `copy_gathered=False` it is the gathered
    tensor itself, valid until the next item (for a consumer that copies it at once). A whole parameter in its own
    dtype is not copied; a merged LoRA weight and an AutoTP weight are always new tensors.
    """
    for exported in exported_parameters(model, merge_lora=merge_lora):
        if hasattr(exported.param, "gather_params"):  # a DeepSpeed AutoTP shard (never LoRA): gathered into a copy
            full = tensor_parallel_full(exported.param)
            yield exported.name, full if dtype is None else full.to(dtype)
            continue
        with gathered(exported.tensors):
            value = exported.value()
            full = value if dtype is None else value.to(dtype)
            copy = copy_gathered and hasattr(exported.param, "ds_id") and not exported.lora
            yield exported.name, full.clone() if copy else full


def tensor_parallel_full(param: torch.Tensor) -> torch.Tensor:
    """The whole weight of a DeepSpeed AutoTP shard (a collective over its tensor-parallel block), as a new tensor:
    the layer's own `gather_params` runs on a copy, so the shard the optimizer holds stays as it is."""
    copy = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
    param.gather_params([copy])
    return copy.data


def _wire_device(group: dist.ProcessGroup | None) -> torch.device:
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_weights(named_params: Iterable[tuple[str, torch.Tensor] | ExportedParameter],
                      group: dist.ProcessGroup | None, src: int, bucket_mb: float, dtype: torch.dtype,
                      version: int) -> WeightManifest:
    """Broadcast the actor's weights from global rank `src` to the weight-sync `group`; returns the manifest.

    Every actor rank calls this with the same parameters (ZeRO-3 gathers need them all); ranks outside the weight-sync
    group pass `group=None`. Use the unwrapped model's names (`engine.module.named_parameters()`), or its
    `exported_parameters` (a LoRA actor: plain names, adapters merged).
    """
    params = [item if isinstance(item, ExportedParameter) else ExportedParameter(*item) for item in named_params]
    specs = [TensorSpec(name=item.name, shape=full_shape(item.param)) for item in params]
    element_size = torch.empty((), dtype=dtype).element_size()
    bucket_indices = plan_buckets(specs, int(bucket_mb * 2**20), element_size)
    manifest = WeightManifest(version=int(version), dtype=_dtype_name(dtype),
                              buckets=tuple(tuple(specs[i] for i in bucket) for bucket in bucket_indices))
    is_src = dist.get_rank() == src
    if is_src and group is None:
        raise ValueError(f"rank {src} sends the weights but was given no weight-sync group")
    device = _wire_device(group) if is_src else torch.device("cpu")
    if is_src:
        dist.broadcast_object_list([manifest], src=src, group=group, device=device)
    if not is_src and not any(hasattr(t, "ds_id") for item in params for t in item.tensors):
        return manifest  # nothing to gather and nothing to send
    for bucket in bucket_indices:
        with gathered([t for i in bucket for t in params[i].tensors]):
            if not is_src:
                continue
            flat = torch.empty(sum(specs[i].numel for i in bucket), dtype=dtype, device=device)
            offset = 0
            for i in bucket:
                spec, value = specs[i], params[i].value()
                if value.numel() != spec.numel:
                    raise WeightSyncError(f"parameter {spec.name} has {value.numel()} elements locally but "
                                          f"{spec.numel} in full; is it partitioned by something other than ZeRO-3?")
                flat[offset:offset + spec.numel].copy_(value.reshape(-1))
                offset += spec.numel
            dist.broadcast(flat, src=src, group=group)
    return manifest


def receive_weight_stream(group: dist.ProcessGroup, src: int) -> tuple[WeightManifest, Iterator[tuple[str, torch.Tensor]]]:
    """Receive the manifest now, and an iterator that receives the buckets as it is consumed.

    Every member of the group must consume the iterator to the end (each bucket is a collective). Tensors are views of
    a fresh buffer per bucket, so they stay valid after the iterator moves on.
    """
    device = _wire_device(group)
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    manifest = box[0]
    if not isinstance(manifest, WeightManifest):
        raise WeightSyncError(f"expected a WeightManifest from rank {src}, got {type(manifest).__name__}")

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in manifest.buckets:
            flat = torch.empty(sum(spec.numel for spec in bucket), dtype=manifest.torch_dtype, device=device)
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for spec in bucket:
                yield spec.name, flat[offset:offset + spec.numel].view(spec.shape)
                offset += spec.numel

    return manifest, stream()


@torch.no_grad()
def apply_named_tensor(targets: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Copy `tensor` in place into `targets[name]` (converting dtype and device); returns the target."""
    if name not in targets:
        raise WeightSyncError(f"received weight {name!r} has no parameter of that name in the generator model")
    target = targets[name]
    if tuple(target.shape) != tuple(tensor.shape):
        raise WeightSyncError(f"received weight {name!r} has shape {tuple(tensor.shape)} but the generator's "
                              f"parameter has shape {tuple(target.shape)}")
    target.data.copy_(tensor)
    return target


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       name_map: Callable[[str], str] | None = None) -> int:
    """Apply every (name, tensor) to `model`'s parameters in place; returns how many were applied.

    `name_map` turns an actor name into the generator's name (identity by default). Tied parameters (one storage under
    two names) count as written when either name arrives; two different values for one storage are an error. The
    whole stream is consumed before any error is raised, so collective peers never hang on a bad name.
    """
    targets = dict(model.named_parameters(remove_duplicate=False))
    written: dict[int, str] = {}
    problems: list[str] = []
    applied = 0
    for name, tensor in named_tensors:
        target_name = name_map(name) if name_map else name
        try:
            target = targets.get(target_name)
            key = target.data_ptr() if target is not None else None
            if key in written and not torch.equal(target.data, tensor.to(target.dtype)):
                raise WeightSyncError(f"received {written[key]!r} and {target_name!r} with different values, but the "
                                      f"generator model ties them to one tensor")
            apply_named_tensor(targets, target_name, tensor)
            written.setdefault(target.data_ptr(), target_name)
            applied += 1
        except WeightSyncError as exc:
            problems.append(str(exc))
    missing = [name for name, param in targets.items() if param.data_ptr() not in written]
    if missing:
        problems.append(f"no weights received for generator parameters {missing}")
    if problems:
        raise WeightSyncError("; ".join(problems))
    return applied


def receive_weights(model: torch.nn.Module, group: dist.ProcessGroup, src: int, *,
                    name_map: Callable[[str], str] | None = None) -> int:
    """Receive one broadcast from global rank `src` into the Hugging Face `model` in place; returns its version."""
    manifest, stream = receive_weight_stream(group, src)
    load_named_tensors(model, stream, name_map=name_map)
    return manifest.version


def _wait_for(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that the sync's wall time includes its kernels (no-op on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_weights(model: torch.nn.Module | None, engine: WeightLoader | None, *, dtype: torch.dtype,
                 group: dist.ProcessGroup | None = None, src: int = 0, version: int = 0,
                 bucket_mb: float | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Actor -> generator weights of `version`, as `dtype`; returns {"max/weight_sync_s": seconds}.

    Every rank of the weight path calls it; what it holds decides its part (a LoRA actor, a peft `model`, sends its
    merged weights under the base model's names: `exported_parameters`):
    - `model` (the actor's unwrapped Hugging Face model) and `engine`: the colocated layout, where every rank holds
      both. The full parameters go into the local engine (a sleeping engine takes them too); no broadcast.
    - `model` only, an actor rank: `broadcast_weights` from global rank `src` over `group` in `bucket_mb` buckets
      (actor ranks other than `src` pass the group they are in, or None, and take part in the ZeRO-3 gathers).
    - `engine` only, a generator rank: the broadcast from `src` over `group` is received into the engine.
    The time includes the queued device work of the engine's device, else of `device` (the actor's).
    """
    start = time.perf_counter()
    if model is not None and engine is not None:
        engine.load_weights(full_named_parameters(model, dtype))
    elif model is not None:
        if bucket_mb is None:
            raise ValueError("an actor rank broadcasts the weights and needs bucket_mb")
        broadcast_weights(exported_parameters(model), group, src, bucket_mb, dtype, version)
    elif engine is not None:
        if group is None:
            raise ValueError(f"a generator rank receives the weights from rank {src} but was given no weight-sync "
                             "group")
        _, stream = receive_weight_stream(group, src)
        engine.load_weights(stream)
    else:
        raise ValueError("sync_weights needs the actor model, a generation engine or both; this rank has neither")
    _wait_for(getattr(engine, "device", None) if engine is not None else device)
    return {"max/weight_sync_s": time.perf_counter() - start}
