"""Attention over packed rows without a dense mask (`attn_implementation: varlen`).

A packed micro-batch (`train.packing_samples`) concatenates its samples into one row whose position ids restart at 0
for each sample. Under `sdpa`, transformers turns that into a dense block-diagonal [T, T] mask and the kernel works
through every pair of positions: quadratic in the whole row, not in each sample. Here each sample attends only to
itself: on CUDA through PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen.varlen_attn`), elsewhere
sample by sample with causal SDPA (the reference the CUDA path is tested against).

The sample boundaries travel with the forward call as transformers' flash-attention keyword arguments
(`cu_seq_lens_q/k`, `max_length_q/k`, see `packed_attention_kwargs`), computed once per micro-batch on the host, so
no layer waits for the device to find them. A forward without them (padded rows, generation) is plain SDPA with the
mask transformers builds, so a model switched to `varlen` still runs every other input.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

VARLEN = "varlen"  # the `attn_implementation` value, registered with transformers under this name
LOADED_AS = "sdpa"  # what the model is loaded with before its attention is switched to VARLEN


def packed_attention_kwargs(position_ids: torch.Tensor, device: torch.device | str) -> dict[str, Any]:
    """The forward keywords that mark the samples of one packed row ([1, T] position ids restarting at 0 for each
    sample): cumulative sample starts (int32, on `device`) and the longest sample, as transformers names them."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got position ids of shape {tuple(position_ids.shape)}")
    positions = position_ids[0].cpu()
    starts = torch.nonzero(positions == 0).flatten()
    if starts.numel() == 0 or starts[0].item() != 0:
        raise ValueError("a packed row must start with position 0")
    bounds = torch.cat([starts, torch.tensor([positions.numel()])])
    cumulative = bounds.to(device=device, dtype=torch.int32, non_blocking=True)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest,
            "max_length_k": longest}


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Hugging Face attention function: query [1, H, T, D], key/value [1, H_kv, T, D] of one packed row ->
    [1, T, H, D]. Without `cu_seq_lens_q` it is transformers' SDPA (padded rows, generation)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cumulative = kwargs.get("cu_seq_lens_q")
    if cumulative is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"varlen attention has no dropout; this model asks for {dropout}")
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row, got {query.shape[0]}")
    heads, head_dim = query.shape[1], query.shape[3]
    scale = scaling if scaling is not None else head_dim ** -0.5
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = repeat_kv_heads(key[0], heads).transpose(0, 1)
    v = repeat_kv_heads(value[0], heads).transpose(0, 1)
    if q.is_cuda:
        out = flash_varlen(q, k, v, cumulative, kwargs["max_length_q"], scale)
    else:
        out = sample_by_sample(q, k, v, cumulative, scale)
    return out.unsqueeze(0), None


def repeat_kv_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[H_kv, T, D] -> [H, T, D], each key/value head shared by H / H_kv query heads (grouped-query attention)."""
    kv_heads = states.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    return states if kv_heads == heads else states.repeat_interleave(heads // kv_heads, dim=0)


def sample_by_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention within each sample ([T, H, D] each), one SDPA call per sample."""
    bounds = cumulative.tolist()
    out = torch.empty_like(q)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = [x[start:stop].transpose(0, 1) for x in (q, k, v)]  # [H, len, D]
        out[start:stop] = F.scaled_dot_product_attention(*part, is_causal=True, scale=scale).transpose(0, 1)
    return out


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor, longest: int,
                 scale: float) -> torch.Tensor:
    """Causal `varlen_attn` over [T, H, D] tensors, for the PyTorch releases that spell causality `is_causal`
    (and have no `scale`) and those that spell it `window_size=(-1, 0)`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        raise RuntimeError(f"attn_implementation=varlen needs torch.nn.attention.varlen (PyTorch 2.9 or newer); "
                           f"this is torch {torch.__version__}") from error
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attn_implementation=varlen runs FlashAttention, which takes bf16 or fp16, not {q.dtype}")
    params = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {}
    if "window_size" in params:
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if "scale" in params:
        options["scale"] = scale
    else:  # the kernel scales by 1/sqrt(D): fold the model's own scale into the queries
        q = q * (scale * math.sqrt(q.shape[-1]))
    return varlen_attn(q, k, v, cumulative, cumulative, longest, longest, **options)


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask builder for VARLEN: none for a row without a padding mask (a packed row: the sample
    boundaries come with the forward), SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Make `attn_implementation="varlen"` known to transformers (its attention function and mask builder)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch a loaded Hugging Face text model to VARLEN attention."""
    register_varlen_attention()
    model.config._attn_implementation = VARLEN


def attn_implementation_to_load(name: str) -> str:
    """The `attn_implementation` a model is loaded with for the configured `name` (VARLEN is switched to afterwards,
    by `use_varlen_attention`)."""
    return LOADED_AS if name == VARLEN else name
