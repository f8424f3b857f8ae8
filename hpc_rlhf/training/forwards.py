"""What one forward pass of a causal LM gives the trainers: per-token log-probs and entropy of the response tokens
of a micro-batch (padded, packed, or one slice of a packed row under sequence parallelism), in the response layout.

The log-prob of response token j is read from the logits one position before it (the logits there predict it); only
those positions go through the LM head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpc_rlhf.data.images import vision_tensors
from hpc_rlhf.training.batching import MicroBatch, response_token_index, to_device
from hpc_rlhf.training.logprobs import token_log_probs
from hpc_rlhf.training.sequence_parallel import SequenceParallel, SequenceShard, shard_packed_row, sum_over_group
from hpc_rlhf.training.varlen_attention import packed_attention_kwargs

@dataclass
class ForwardOutput:
    """Per-token results of one micro-batch in the response layout [num_samples, max_response_len] (fp32)."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # a mixture-of-experts model's load-balancing loss (scalar), when asked


def to_response_layout(flat: torch.Tensor, batch: MicroBatch, sample: torch.Tensor,
                       offset: torch.Tensor) -> torch.Tensor:
    """Per-token values of the response tokens (`sample`, `offset` from `response_token_index`) scattered into the
    response layout [num_samples, max_response_len], zeros elsewhere."""
    out = flat.new_zeros(batch.action_mask.shape)
    return out.index_put((to_device(sample, flat.device), to_device(offset, flat.device)), flat)


def model_inputs(batch: MicroBatch, device: torch.device, image_processor: Any = None) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face forward pass for one micro-batch (padded or packed), with the vision tensors
    of its images (`image_processor` is the vision-language model's). A packed row also carries its sample bounds
    (`packed_attention_kwargs`), which varlen and flash attention read and the others ignore."""
    kwargs = {
        "input_ids": to_device(batch.input_ids, device),
        "attention_mask": None if batch.attention_mask is None else to_device(batch.attention_mask, device),
        "position_ids": to_device(batch.position_ids, device),
        "use_cache": False,
    }
    if batch.packed:
        kwargs.update(packed_attention_kwargs(batch.position_ids, device))
    if batch.images:
        if image_processor is None:
            raise ValueError("a micro-batch has images but the model was loaded without an image processor (is it a "
                             "vision-language model?)")
        kwargs.update({key: value.to(device) for key, value in vision_tensors(image_processor, batch.images).items()})
    return kwargs


def causal_lm_log_probs(model: Callable[..., Any], batch: MicroBatch, device: torch.device, *,
                        temperature: float = 1.0, with_entropy: bool = False,
                        supports_logits_to_keep: bool = True, chunk_size: int = 1024,
                        image_processor: Any = None, output_router_logits: bool = False) -> ForwardOutput:
    """Log-probs (and entropy) of the response tokens of `batch` under a causal LM (module or engine).

    Only the positions that predict response tokens go through the LM head (`logits_to_keep`); the log-probs are
    read from the model's logits in place (`token_log_probs` picks rows by index, no gathered copy).
    `output_router_logits` asks a mixture-of-experts model for its load-balancing loss (`ForwardOutput.aux_loss`),
    which transformers computes over every input token but padding (the attention mask; a packed row has none).
    """
    rows, columns, sample, offset = response_token_index(batch)
    predicting = columns - 1
    kwargs = model_inputs(batch, device, image_processor)
    if output_router_logits:
        kwargs["output_router_logits"] = True
    if supports_logits_to_keep:
        kept_columns = torch.unique(predicting)  # sorted
        outputs = model(**kwargs, logits_to_keep=to_device(kept_columns, device))
        logits = outputs.logits  # [rows, kept, V]
        flat_rows = rows * kept_columns.numel() + torch.searchsorted(kept_columns, predicting)
    else:
        outputs = model(**kwargs)
        logits = outputs.logits  # [rows, seq, V]
        flat_rows = rows * logits.shape[1] + predicting
    labels = batch.input_ids[rows, columns]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    count = flat_rows.numel()
    if count == flat_logits.shape[0] and torch.equal(flat_rows, torch.arange(count, device=flat_rows.device)):
        flat_rows = None  # every kept position predicts a response token, in order: read the logits as they are
    log_probs, entropy = token_log_probs(flat_logits, labels, rows=flat_rows,
                                         temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size)
    return ForwardOutput(
        log_probs=to_response_layout(log_probs, batch, sample, offset),
        entropy=None if entropy is None else to_response_layout(entropy, batch, sample, offset),
        aux_loss=outputs.aux_loss if output_router_logits else None)


def is_mixture_of_experts(model: nn.Module) -> bool:
    """Whether a Hugging Face model routes tokens to experts and can return router logits (its config has
    `output_router_logits`, as Mixtral, Qwen2/3-MoE and the other transformers MoE models do)."""
    return hasattr(getattr(model, "config", None), "output_router_logits")


def predicting_on_shard(batch: MicroBatch, shard: SequenceShard
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The response tokens whose predicting position lies on `shard`: (input column, sample, offset, local position)."""
    _, columns, sample, offset = response_token_index(batch)
    predicting = columns - 1
    mine = (predicting >= shard.start) & (predicting < shard.stop)
    return columns[mine], sample[mine], offset[mine], predicting[mine] - shard.start


def sequence_parallel_log_probs(model: Callable[..., Any], batch: MicroBatch, device: torch.device,
                                sp: SequenceParallel, *, temperature: float = 1.0, with_entropy: bool = False,
                                supports_logits_to_keep: bool = True, chunk_size: int = 1024) -> ForwardOutput:
    """`causal_lm_log_probs` on this rank's slice of a packed micro-batch, summed over the sequence-parallel group.

    Every rank keeps at least one position (a zero-weighted anchor), so every layer is in its autograd graph and the
    backward collectives of the attention gathers run on all ranks of the group.
    """
    shard = shard_packed_row(batch.input_ids, batch.position_ids, sp, device=device)
    columns, sample, offset, local = predicting_on_shard(batch, shard)
    kept = torch.unique(local) if local.numel() else torch.zeros(1, dtype=torch.long)
    if supports_logits_to_keep:
        logits = model(**shard.model_inputs(), logits_to_keep=to_device(kept, device)).logits[0]  # [kept, V]
        flat_rows = torch.searchsorted(kept, local)
    else:
        logits = model(**shard.model_inputs()).logits[0]  # [slice, V]
        flat_rows = local
    labels = batch.input_ids[0, columns]
    log_probs, entropy = token_log_probs(logits, labels, rows=flat_rows, temperature=temperature,
                                         with_entropy=with_entropy, chunk_size=chunk_size)
    anchor = logits[:1, :1].sum().float() * 0.0

    def whole(flat: torch.Tensor) -> torch.Tensor:
        return sum_over_group(to_response_layout(flat, batch, sample, offset) + anchor, sp.group)

    return ForwardOutput(log_probs=whole(log_probs), entropy=None if entropy is None else whole(entropy))


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (only the kept positions go through the LM head)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters
