"""Sequence parallelism (`ds.ring_attn_size`): the ranks of a sequence-parallel group split one packed micro-batch.

Consecutive groups of `ring_attn_size` ranks of a role group take the same micro-batches; rank i of a group runs the
model on the i-th contiguous slice of the packed row (padded to a multiple of the group size). Everything but attention
is per token, so it runs on the slice as it is. Attention gathers the keys and values of the whole row from the group
before each layer's attention (all-gather; the backward sums the key/value gradients of every rank's queries and keeps
this rank's slice) and masks by packed sample and causality in global positions: each query sees exactly the keys it
sees unsplit, so outputs and gradients equal the unsplit ones up to float rounding. This is the all-gather form of
context parallelism (no ring of partial softmaxes); its cost is the gathered keys/values of one layer at a time.

Per-token results (log-probs, values) are computed on the slice that holds their predicting position and summed over
the group (`sum_over_group`, whose backward is the identity), so every rank of the group holds the whole micro-batch's
results and computes the same loss; the parameter gradients of the group's ranks then add up to the unsplit gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

SP_ATTENTION = "hpc_rlhf_sequence_parallel"  # the attention implementation name models use under sequence parallelism
SHARD_KWARG = "sequence_shard"  # the forward keyword that carries a `SequenceShard` down to the attention layers


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's sequence-parallel group: `size` consecutive ranks of its role group; `rank` is its place in it."""

    group: dist.ProcessGroup
    size: int
    rank: int


def sequence_parallel(group: dist.ProcessGroup | None, size: int) -> SequenceParallel | None:
    """This rank's handle on its sequence-parallel `group` of `size` ranks (None when `size` is 1). The groups are
    created collectively beforehand (`distributed.groups.build_role_groups`)."""
    if size == 1:
        return None
    if group is None:
        raise ValueError(f"ring_attn_size={size} needs this rank's sequence-parallel group; build the role groups "
                         f"with ring_attn_size={size}")
    if dist.get_world_size(group) != size:
        raise ValueError(f"the sequence-parallel group has {dist.get_world_size(group)} ranks, ring_attn_size={size}")
    return SequenceParallel(group=group, size=size, rank=dist.get_rank(group))


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed sample index of every token of a packed row (positions restart at 0 for each sample)."""
    return torch.cumsum((position_ids == 0).long(), dim=0) - 1


def shard_mask(segments: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[1, 1, stop - start, T] bool: query `start + i` may attend key j (same packed sample, j <= start + i)."""
    queries = torch.arange(start, stop, device=segments.device)
    keys = torch.arange(segments.numel(), device=segments.device)
    allowed = (segments[start:stop, None] == segments[None, :]) & (keys[None, :] <= queries[:, None])
    return allowed[None, None]


@dataclass(frozen=True)
class SequenceShard:
    """One rank's slice [start, stop) of a packed row (padded to `size` equal slices), ready for the model."""

    input_ids: torch.Tensor  # [1, stop - start]
    position_ids: torch.Tensor  # [1, stop - start]
    mask: torch.Tensor  # [1, 1, stop - start, padded length] bool
    start: int
    stop: int
    group: dist.ProcessGroup

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the Hugging Face forward pass on this slice."""
        return {"input_ids": self.input_ids, "attention_mask": None, "position_ids": self.position_ids,
                "use_cache": False, SHARD_KWARG: self}


def shard_packed_row(input_ids: torch.Tensor, position_ids: torch.Tensor, sp: SequenceParallel, *,
                     device: torch.device, pad_token_id: int = 0) -> SequenceShard:
    """This rank's slice of a packed row ([1, T] ids and positions). The row is padded to a multiple of the group
    size with one extra packed sample of pad tokens, which attends only to itself and whose outputs nobody reads."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"sequence parallelism needs packed micro-batches (one row), got input_ids of shape "
                         f"{tuple(input_ids.shape)}; set train.packing_samples: true")
    length = input_ids.shape[1]
    chunk = -(-length // sp.size)
    pad = chunk * sp.size - length
    ids, positions = input_ids[0], position_ids[0]
    if pad:
        ids = torch.cat([ids, ids.new_full((pad,), pad_token_id)])
        positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype)])
    start, stop = sp.rank * chunk, (sp.rank + 1) * chunk
    segments = segment_ids(positions.to(device))
    return SequenceShard(input_ids=ids[start:stop].unsqueeze(0).to(device),
                         position_ids=positions[start:stop].unsqueeze(0).to(device),
                         mask=shard_mask(segments, start, stop), start=start, stop=stop, group=sp.group)


class _GatherSequence(torch.autograd.Function):
    """[B, H, C, D] per rank -> [B, H, size * C, D] on every rank; backward sums the gradients over the group and
    keeps this rank's slice (every rank's queries read every rank's keys)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        ctx.group, ctx.rank, ctx.chunk = group, dist.get_rank(group), local.shape[2]
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, :, ctx.rank * ctx.chunk:(ctx.rank + 1) * ctx.chunk].contiguous(), None


class _SumOverGroup(torch.autograd.Function):
    """Sum of a tensor over the group; backward is the identity, because every rank goes on to compute the same
    loss from the sum and backpropagates it through its own contribution only."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def gather_sequence(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather along the sequence dimension (dim 2 of [B, H, C, D]), differentiable."""
    return _GatherSequence.apply(local, group)


def sum_over_group(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token results held by one rank each (zeros elsewhere) -> the whole tensor on every rank, differentiable."""
    return _SumOverGroup.apply(local, group)


def sequence_parallel_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Hugging Face attention function: keys and values of the whole row, the shard's mask, SDPA. A forward without
    a shard (e.g. generation on the trained model) is plain SDPA with the mask the model built."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shard: SequenceShard | None = kwargs.pop(SHARD_KWARG, None)
    if shard is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, gather_sequence(key, shard.group),
                                  gather_sequence(value, shard.group), shard.mask, is_causal=False, **kwargs)


def use_sequence_parallel_attention(model: torch.nn.Module) -> None:
    """Make a Hugging Face model's attention layers run `sequence_parallel_attention` (registered under
    `SP_ATTENTION`, with SDPA's mask builder for forwards without a shard)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SP_ATTENTION, sequence_parallel_attention)
    AttentionMaskInterface.register(SP_ATTENTION, sdpa_mask)
    model.config._attn_implementation = SP_ATTENTION
