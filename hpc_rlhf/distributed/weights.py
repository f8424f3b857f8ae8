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
"""

from __future__ import annotations

import contextlib
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
                          copy_gathered: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter in `named_parameters` order (tied ones once), as `dtype` (None keeps
    each parameter's dtype); ZeRO-3 partitions are gathered one parameter at a time.

    Every rank of a ZeRO-3 group (or AutoTP block) iterates to the end (each gather is a collective). A gathered
    tensor is freed when the iterator moves on, so it comes as a copy; with `copy_gathered=False` it is the gathered
    tensor itself, valid until the next item (for a consumer that copies it at once). A whole parameter in its own
    dtype is not copied.
    """
    for name, param in model.named_parameters():
        if hasattr(param, "gather_params"):  # a DeepSpeed AutoTP shard: gathered whole into a copy
            full = tensor_parallel_full(param)
            yield name, full if dtype is None else full.to(dtype)
            continue
        with gathered([param]):
            full = param.data if dtype is None else param.data.to(dtype)
            yield name, full.clone() if copy_gathered and hasattr(param, "ds_id") else full


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


def broadcast_weights(named_params: Iterable[tuple[str, torch.Tensor]], group: dist.ProcessGroup | None, src: int,
                      bucket_mb: float, dtype: torch.dtype, version: int) -> WeightManifest:
    """Broadcast the actor's weights from global rank `src` to the weight-sync `group`; returns the manifest.

    Every actor rank calls this with the same parameters (ZeRO-3 gathers need them all); ranks outside the weight-sync
    group pass `group=None`. Use the unwrapped model's names (`engine.module.named_parameters()`).
    """
    params = list(named_params)
    specs = [TensorSpec(name=name, shape=full_shape(p)) for name, p in params]
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
    if not is_src and not any(hasattr(p, "ds_id") for _, p in params):
        return manifest  # nothing to gather and nothing to send
    for bucket in bucket_indices:
        bucket_params = [params[i][1] for i in bucket]
        with gathered(bucket_params):
            if not is_src:
                continue
            flat = torch.empty(sum(specs[i].numel for i in bucket), dtype=dtype, device=device)
            offset = 0
            for i, param in zip(bucket, bucket_params):
                spec = specs[i]
                if param.data.numel() != spec.numel:
                    raise WeightSyncError(f"parameter {spec.name} has {param.data.numel()} elements locally but "
                                          f"{spec.numel} in full; is it partitioned by something other than ZeRO-3?")
                flat[offset:offset + spec.numel].copy_(param.data.reshape(-1))
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

    Every rank of the weight path calls it; what it holds decides its part:
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
        broadcast_weights(model.named_parameters(), group, src, bucket_mb, dtype, version)
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
