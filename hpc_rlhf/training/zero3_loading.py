"""Loading a Hugging Face checkpoint straight into ZeRO-3 partitions, so that no rank ever holds the whole model.

`from_pretrained` builds every weight in full on every rank before DeepSpeed partitions it: fine for a few billion
parameters, impossible for 70B. Here the model is constructed under `deepspeed.zero.Init` over the role's group (each
parameter is partitioned as soon as its module exists), then filled parameter by parameter: the group gathers one
parameter, the group's first rank copies the checkpoint tensor into it (read lazily from the safetensors files) and
DeepSpeed re-partitions it. Peak memory per rank is one full parameter beyond its partition.

Only members of the group call `load_partitioned`, all in the same order (ZeRO-3 collectives run over the group).
"""

from __future__ import annotations

import contextlib
import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpc_rlhf.training.deepspeed_setup import (
    DataParallelUnit,
    EngineConfig,
    _ensure_deepspeed_comm,
    engine_scope,
    make_ds_config,
)
from hpc_rlhf.training.varlen_attention import attn_implementation_to_load

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_index(path: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, from a single-file or sharded (index.json) HF folder."""
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} (ZeRO-3 loading reads safetensors)")


class _TensorSource:
    """Reads checkpoint tensors on demand, keeping each safetensors file open once."""

    def __init__(self, index: dict[str, Path]) -> None:
        self.index = index
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.index[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._open[file].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def matching_name(param_name: str, available: dict[str, Path]) -> str | None:
    """The checkpoint tensor for a model parameter: the same name, or the name without / with the "model." prefix
    (a sequence-classification model built from a causal LM checkpoint names its trunk the same way)."""
    for candidate in (param_name, param_name.removeprefix("model."), f"model.{param_name}"):
        if candidate in available:
            return candidate
    return None


def copy_checkpoint_into_partitions(model: nn.Module, path: str | Path, group: dist.ProcessGroup | None, *,
                                    allowed_missing: tuple[str, ...] = ()) -> list[str]:
    """Fill every parameter of a ZeRO-3-partitioned `model` from the checkpoint at `path`; returns the names of
    parameters the checkpoint lacks (left as initialised). Parameters other than `allowed_missing` heads must be
    present: a checkpoint of another architecture is an error, not a silently random model."""
    import deepspeed

    available = checkpoint_index(path)
    is_source = dist.get_rank(group) == 0
    source = _TensorSource(available)
    missing: list[str] = []
    try:
        for name, param in model.named_parameters():  # fixed order; tied weights once, under their first name
            key = matching_name(name, available)
            if key is None:
                missing.append(name)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if is_source and key is not None:
                    tensor = source.get(key)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model's "
                                         f"parameter {name!r} has {tuple(param.shape)}")
                    param.data.copy_(tensor.to(param.dtype))
    finally:
        source.close()
    unexpected = [name for name in missing if name.split(".")[0] not in allowed_missing]
    if unexpected:
        raise ValueError(f"{path}: the checkpoint has no tensor for {len(unexpected)} parameter(s) of the model, e.g. "
                         f"{unexpected[:5]}; is it a checkpoint of this architecture?")
    if missing:
        logger.warning("%s: %s not in the checkpoint, newly initialised", path, ", ".join(missing))
    return missing


def load_partitioned(auto_class: Any, path: str | Path, cfg: EngineConfig, group: dist.ProcessGroup | None, *,
                     allowed_missing: tuple[str, ...] = (), **config_overrides: Any) -> nn.Module:
    """Build `auto_class` (e.g. AutoModelForCausalLM) from the config at `path` under ZeRO-3 partitioning over
    `group` and load the checkpoint's weights into the partitions. `config_overrides` go to AutoConfig (num_labels)."""
    import deepspeed
    from transformers import AutoConfig

    if cfg.zero_stage != 3:
        raise ValueError(f"load_partitioned is for ZeRO stage 3, got zero_stage={cfg.zero_stage}")
    config = AutoConfig.from_pretrained(str(path), **config_overrides)
    _ensure_deepspeed_comm()
    mpu = DataParallelUnit(group)
    ds_config = make_ds_config(cfg, mpu.get_data_parallel_world_size())
    # Initialisation is skipped: the checkpoint overwrites the weights, and transformers' initialisers cannot run
    # on partitioned (empty) parameters. Parameters the checkpoint lacks get `initialize_missing` below.
    # zero.Init takes the dtype from the DeepSpeed config (bf16 or fp32, as cfg.torch_dtype): an explicit dtype
    # argument is ignored on accelerators without fp16. RoPE's arange buffers keep their own dtype, as in
    # transformers' own ZeRO-3 loading.
    # The model class is imported before zero.Init: see `concrete_model_class`.
    model_class = concrete_model_class(auto_class, config)
    with engine_scope(mpu), no_init_weights(), keep_arange_dtype(), deepspeed.zero.Init(
            data_parallel_group=mpu.get_data_parallel_group(), config_dict_or_path=ds_config, mpu=mpu):
        model = model_class._from_config(config, dtype=cfg.torch_dtype,
                                         attn_implementation=attn_implementation_to_load(cfg.attn_implementation))
    with engine_scope(mpu):
        missing = copy_checkpoint_into_partitions(model, path, mpu.get_data_parallel_group(),
                                                  allowed_missing=allowed_missing)
        initialize_missing(model, missing, std=getattr(config, "initializer_range", 0.02))
    return model


def concrete_model_class(auto_class: Any, config: Any) -> type[nn.Module]:
    """The model class `auto_class` builds for `config` (LlamaForCausalLM for a Llama config), its module imported.

    It must be imported before `deepspeed.zero.Init` is entered. zero.Init wraps the `__init__` of every module class
    that exists, and of every class defined while it is active, and puts the old `__init__` back when it exits. A
    modeling module imported inside the context defines its classes there; class decorators that replace `__init__`
    afterwards (the `kernels` package's `use_kernelized_func` on attention layers, which transformers >= 5.24 applies)
    are then undone at exit, and every later instance lacks the attributes they set (`_kernel_funcs`).
    """
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is None:  # already a concrete class (LlamaForCausalLM passed directly)
        return auto_class
    try:
        return mapping[type(config)]  # the lazy mapping imports the modeling module here
    except KeyError:
        raise ValueError(f"{auto_class.__name__} has no model class for a {type(config).__name__} "
                         f"(model_type {getattr(config, 'model_type', '?')!r})") from None


def initialize_missing(model: nn.Module, names: list[str], *, std: float) -> None:
    """Initialise parameters absent from the checkpoint (a new value head) as transformers would: matrices from
    N(0, std), vectors zero. The group's first rank draws them, so every rank ends with the same values."""
    import deepspeed

    params = dict(model.named_parameters())
    for name in names:
        param = params[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if param.dim() >= 2:
                param.data.normal_(0.0, std)
            else:
                param.data.zero_()


def keep_arange_dtype() -> Any:
    """transformers' guard that stops zero.Init from casting `torch.arange` results (RoPE frequencies)."""
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # transformers without it: buffers follow zero.Init's dtype
        return contextlib.nullcontext()
    return prevent_arange_dtype_change()


def no_init_weights() -> Any:
    """transformers' context that skips weight initialisation at construction (its home moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights as context
    return context()
