"""LoRA / QLoRA adapters through peft: wrap a model before training, save the adapter, merge it into the base.

    model = load_model_for_training(path, "causal_lm", settings, dtype=..., attn_implementation=...)
    save_adapter(model, full_state_dict, out_dir)          # adapter_config.json + adapter_model.safetensors
    merge_adapter(base_path, adapter_dir, out_dir)         # a plain HF model that `from_pretrained` loads

Only the adapter weights (and, for reward models, the score head) train; the base stays frozen. QLoRA loads the frozen
base in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU: on a machine without one the config path stops with a
clear error instead of silently training in full precision.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from torch import nn

from hpc_rlhf.training.varlen_attention import VARLEN, attn_implementation_to_load, use_varlen_attention

ModelKind = Literal["causal_lm", "sequence_classification"]
MODEL_KINDS: tuple[str, ...] = ("causal_lm", "sequence_classification")
# Reward models keep their score head fully trainable and saved with the adapter.
SCORE_HEAD_NAMES: tuple[str, ...] = ("score",)
REWARD_STATS_FILE = "reward_stats.json"


class LoraError(RuntimeError):
    """LoRA cannot be used as configured (missing package, no GPU for QLoRA, not an adapter folder)."""


@dataclass(frozen=True)
class LoraSettings:
    """The `lora:` config section as the functions here need it."""

    rank: int
    alpha: int
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1 to build adapters, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module (or all-linear)")


def require_peft() -> None:
    """Raise a LoraError with the install command when peft is missing."""
    if importlib.util.find_spec("peft") is None:
        raise LoraError("LoRA needs the peft package: pip install 'hpc_rlhf[lora]' (or pip install peft)")


def quantization_config(settings: LoraSettings) -> Any:
    """The bitsandbytes 4-bit config of QLoRA; a LoraError where it cannot run (no GPU, no bitsandbytes)."""
    if not torch.cuda.is_available():
        raise LoraError("lora.load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes 4-bit layers do not run on the "
                        "CPU. Set lora.load_in_4bit: false to train LoRA adapters on a full-precision base.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraError("lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _auto_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    return AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification


def apply_lora(model: nn.Module, settings: LoraSettings, kind: ModelKind) -> nn.Module:
    """Wrap `model` in a peft LoRA model: adapters on `target_modules`, everything else frozen but a score head."""
    require_peft()
    import peft

    task_type = peft.TaskType.CAUSAL_LM if kind == "causal_lm" else peft.TaskType.SEQ_CLS
    targets: str | list[str] = ("all-linear" if list(settings.target_modules) == ["all-linear"]
                                else list(settings.target_modules))
    config = peft.LoraConfig(task_type=task_type, r=settings.rank, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, target_modules=targets,
                             modules_to_save=list(SCORE_HEAD_NAMES) if kind == "sequence_classification" else None)
    if settings.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, config)


def load_model_for_training(path: str | os.PathLike, kind: ModelKind, settings: Optional[LoraSettings], *,
                            dtype: torch.dtype, attn_implementation: str, **kwargs: Any) -> nn.Module:
    """Load a causal LM or a sequence classifier (num_labels=1) to train, wrapped in LoRA when `settings` is given."""
    auto = _auto_class(kind)
    load_kwargs: dict[str, Any] = {"dtype": dtype,
                                   "attn_implementation": attn_implementation_to_load(attn_implementation), **kwargs}
    if kind == "sequence_classification":
        load_kwargs["num_labels"] = 1
    if settings is not None and settings.load_in_4bit:
        load_kwargs["quantization_config"] = quantization_config(settings)
    model = auto.from_pretrained(str(path), **load_kwargs)
    if attn_implementation == VARLEN:
        use_varlen_attention(model)
    return model if settings is None else apply_lora(model, settings, kind)


def is_lora_model(model: nn.Module) -> bool:
    """Whether `model` is a peft model (its saved form is an adapter, not a full model)."""
    if importlib.util.find_spec("peft") is None:
        return False
    import peft

    return isinstance(model, peft.PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (with the adapter layers injected), or `model` itself."""
    return model.get_base_model() if is_lora_model(model) else model


def save_adapter(model: nn.Module, state_dict: Mapping[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
    """Write the adapter of a peft `model` from its full (gathered) `state_dict`: adapter_config.json + weights."""
    if not is_lora_model(model):
        raise LoraError(f"save_adapter needs a peft model, got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict=dict(state_dict), safe_serialization=True)
    return out


def adapter_base_path(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise LoraError(f"{adapter_dir} is not a LoRA adapter folder: {config_file.name} is missing")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise LoraError(f"{config_file} does not name its base model; pass the base explicitly")
    return str(base)


def adapter_kind(adapter_dir: str | os.PathLike) -> ModelKind:
    """causal_lm or sequence_classification, from the adapter's task type."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise LoraError(f"{adapter_dir} is not a LoRA adapter folder: {config_file.name} is missing")
    task = json.loads(config_file.read_text()).get("task_type")
    return "sequence_classification" if task == "SEQ_CLS" else "causal_lm"


def merge_adapter(base_path: Optional[str | os.PathLike], adapter_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Fold the LoRA weights of `adapter_dir` into its base model and save a plain model (+ tokenizer) to `out_dir`.

    `base_path` None uses the base recorded in the adapter. Reward-model statistics saved beside the adapter
    (reward_stats.json) are copied into the merged config, where `hpc_rlhf.rewards.RewardModel` reads them.
    """
    require_peft()
    import peft
    from transformers import AutoTokenizer

    adapter = Path(adapter_dir)
    kind = adapter_kind(adapter)
    base = str(base_path) if base_path is not None else adapter_base_path(adapter)
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if kind == "sequence_classification":
        load_kwargs["num_labels"] = 1
    model = _auto_class(kind).from_pretrained(base, **load_kwargs)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    stats_file = adapter / REWARD_STATS_FILE
    if stats_file.is_file():
        for key, value in json.loads(stats_file.read_text()).items():
            setattr(merged.config, key, value)
    out = Path(out_dir)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    if (tokenizer_source / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out))
    return out
