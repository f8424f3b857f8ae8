"""Micro-batching of variable-length RL samples (prompt + response) for the actor, critic and reference.

Two layouts of the model input:
- padded: one row per sample, right-padded, with a 2-D attention mask;
- packed: all samples of a micro-batch concatenated into one row, `position_ids` restarting at 0 for each
  sample and `attention_mask=None`. Hugging Face models (transformers >= 4.54, sdpa / eager / flash-attention)
  then derive a block-diagonal causal mask from the position ids, so samples never attend to each other.

and two ways of grouping samples into micro-batches: a fixed number of samples, or a token budget
(`max_tokens_per_microbatch`, first-fit decreasing, deterministic).

Samples of a vision-language model carry their prompt's images (PNG bytes); a micro-batch holds the images of its
samples in sample order, which is the order of their placeholder tokens in the padded input, and the model wrapper
turns them into vision tensors for its forward pass. Such micro-batches are never packed.

Whatever the input layout, per-token results (log-probs, values, entropy) and the per-token training
tensors (advantages, old log-probs, ...) use one *response layout*: `[num_samples, max_response_len]`,
right-padded, with `action_mask` marking the tokens that are trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

LossWeighting = Literal["token", "sample", "micro_batch"]
LOSS_WEIGHTINGS: tuple[str, ...] = ("token", "sample", "micro_batch")


@dataclass(frozen=True)
class TokenSample:
    """One trajectory: prompt and response token ids plus per-response-token tensors.

    `action_mask` is False for response tokens that are not trained on (environment feedback in multi-turn
    rollouts); it defaults to all True. Each tensor of `response_tensors` has one value per response token.
    """

    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    action_mask: torch.Tensor | None = None
    response_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    images: tuple[bytes, ...] = ()  # the prompt's images (PNG bytes), vision-language models only

    def __post_init__(self) -> None:
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be a 1-D integer tensor, got {_describe(ids)}")
        if self.prompt_ids.numel() < 1:
            raise ValueError("prompt_ids must hold at least one token (the first response token is predicted from it)")
        if self.response_ids.numel() < 1:
            raise ValueError("response_ids must hold at least one token")
        num_actions = self.response_ids.numel()
        if self.action_mask is not None and tuple(self.action_mask.shape) != (num_actions,):
            raise ValueError(f"action_mask must have shape ({num_actions},) like response_ids, "
                             f"got {tuple(self.action_mask.shape)}")
        for key, value in self.response_tensors.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (num_actions,):
                raise ValueError(f"response_tensors[{key!r}] must have shape ({num_actions},) like response_ids, "
                                 f"got {_describe(value)}")

    @property
    def num_tokens(self) -> int:
        """Prompt plus response length: what the model reads."""
        return self.prompt_ids.numel() + self.response_ids.numel()


@dataclass(frozen=True)
class MicroBatch:
    """Model input for a group of samples plus their response-layout tensors.

    Response token `j` of sample `s` sits in the input at row `response_rows[s]`, column
    `response_starts[s] + j`; it is predicted from the logits one column earlier.
    """

    input_ids: torch.Tensor  # [rows, seq]
    attention_mask: torch.Tensor | None  # [rows, seq]; None when packed
    position_ids: torch.Tensor  # [rows, seq]
    response_rows: torch.Tensor  # [S]
    response_starts: torch.Tensor  # [S]
    response_lengths: torch.Tensor  # [S]
    action_mask: torch.Tensor  # [S, A] bool, False on padding and untrained tokens
    response_tensors: dict[str, torch.Tensor]  # each [S, A], zero on padding
    sample_indices: torch.Tensor  # [S], positions in the list the micro-batch was made from
    is_padding: bool = False  # a filler so that all data-parallel ranks run the same number of micro-batches
    images: tuple[bytes, ...] = ()  # the samples' images (PNG bytes) in sample order; padded layout only

    @property
    def num_samples(self) -> int:
        return int(self.sample_indices.numel())

    @property
    def num_action_tokens(self) -> int:
        return int(self.action_mask.sum())

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def response_mask(self) -> torch.Tensor:
        """[S, A] bool: True on every real response token (trained or not)."""
        width = self.action_mask.shape[1]
        positions = torch.arange(width, device=self.response_lengths.device)
        return positions.unsqueeze(0) < self.response_lengths.unsqueeze(1)

    def response_layout_to(self, device: torch.device | str) -> MicroBatch:
        """The micro-batch with its response-layout tensors (action mask, lengths, per-token targets) on `device`,
        where the model's outputs are, so that loss functions combine them directly."""
        return dataclasses.replace(
            self, action_mask=to_device(self.action_mask, device),
            response_lengths=to_device(self.response_lengths, device),
            response_tensors={name: to_device(t, device) for name, t in self.response_tensors.items()})


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, copied host -> device without waiting for the device: a blocking copy would first wait
    for every kernel queued so far, and the update's host then stops launching while the device drains. (A copy from
    pageable memory is staged before the call returns, so the source may change right after.)"""
    return tensor.to(device, non_blocking=True)


def make_micro_batches(samples: Sequence[TokenSample], *, micro_batch_size: int | None = None,
                       max_tokens_per_microbatch: int | None = None, packing: bool = False,
                       pad_token_id: int = 0) -> list[MicroBatch]:
    """Split `samples` into micro-batches of `micro_batch_size` samples, or by token budget.

    Exactly one of `micro_batch_size` / `max_tokens_per_microbatch` must be given. The budget counts the
    tokens the model processes: the sum of sample lengths when packing, rows x longest sample otherwise.
    """
    if (micro_batch_size is None) == (max_tokens_per_microbatch is None):
        raise ValueError("give exactly one of micro_batch_size and max_tokens_per_microbatch, got "
                         f"micro_batch_size={micro_batch_size}, max_tokens_per_microbatch={max_tokens_per_microbatch}")
    if not samples:
        raise ValueError("samples is empty")
    if micro_batch_size is not None:
        groups = group_by_count(len(samples), micro_batch_size)
    else:
        lengths = [s.num_tokens for s in samples]
        groups = group_by_token_budget(lengths, max_tokens_per_microbatch, packing=packing)
    return [collate([samples[i] for i in group], group, packing=packing, pad_token_id=pad_token_id)
            for group in groups]


def group_by_count(num_samples: int, micro_batch_size: int) -> list[list[int]]:
    """Consecutive groups of `micro_batch_size` sample indices (the last one may be smaller)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [list(range(i, min(i + micro_batch_size, num_samples))) for i in range(0, num_samples, micro_batch_size)]


def group_by_token_budget(lengths: Sequence[int], max_tokens: int, *, packing: bool) -> list[list[int]]:
    """First-fit decreasing: longest samples first, each into the first group it fits in.

    A group's cost is the sum of its lengths when packing, else its size times its longest length. Ties
    are broken by index, so the result is deterministic; indices within a group are ascending.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    for index, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(f"sample {index} has {length} tokens, more than max_tokens_per_microbatch={max_tokens}; "
                             "raise the budget to at least the longest prompt + response")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    costs: list[int] = []  # packed: token sum; padded: longest length (the group's first member)
    for index in order:
        for g, group in enumerate(groups):
            if packing:
                fits = costs[g] + lengths[index] <= max_tokens
            else:
                fits = (len(group) + 1) * costs[g] <= max_tokens
            if fits:
                group.append(index)
                if packing:
                    costs[g] += lengths[index]
                break
        else:
            groups.append([index])
            costs.append(lengths[index])
    return [sorted(group) for group in groups]


def collate(samples: Sequence[TokenSample], indices: Sequence[int], *, packing: bool,
            pad_token_id: int = 0) -> MicroBatch:
    """Build one micro-batch from `samples` (their positions in the caller's list are `indices`)."""
    if len(samples) != len(indices) or not samples:
        raise ValueError(f"need one index per sample and at least one sample, got {len(samples)} samples "
                         f"and {len(indices)} indices")
    keys = set(samples[0].response_tensors)
    for index, sample in zip(indices, samples):
        if set(sample.response_tensors) != keys:
            raise ValueError(f"sample {index} has response_tensors {sorted(sample.response_tensors)}, "
                             f"expected the same keys as the others: {sorted(keys)}")
    images = tuple(image for sample in samples for image in sample.images)
    if images and packing:
        raise ValueError("samples with images cannot be packed (train.packing_samples is for text-only data)")
    sequences = [torch.cat([s.prompt_ids, s.response_ids]).long() for s in samples]
    prompt_lengths = torch.tensor([s.prompt_ids.numel() for s in samples])
    response_lengths = torch.tensor([s.response_ids.numel() for s in samples])
    num_samples = len(samples)

    if packing:
        input_ids = torch.cat(sequences).unsqueeze(0)
        position_ids = torch.cat([torch.arange(seq.numel()) for seq in sequences]).unsqueeze(0)
        attention_mask = None
        offsets = torch.cumsum(torch.tensor([0] + [seq.numel() for seq in sequences[:-1]]), dim=0)
        response_rows = torch.zeros(num_samples, dtype=torch.long)
        response_starts = offsets + prompt_lengths
    else:
        width = max(seq.numel() for seq in sequences)
        input_ids = torch.full((num_samples, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((num_samples, width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : seq.numel()] = seq
            attention_mask[row, : seq.numel()] = 1
        position_ids = torch.arange(width).unsqueeze(0).expand(num_samples, width).clone()
        response_rows = torch.arange(num_samples)
        response_starts = prompt_lengths.clone()

    max_actions = int(response_lengths.max())
    action_mask = torch.zeros((num_samples, max_actions), dtype=torch.bool)
    response_tensors = {key: torch.zeros((num_samples, max_actions), dtype=samples[0].response_tensors[key].dtype)
                        for key in keys}
    for row, sample in enumerate(samples):
        n = sample.response_ids.numel()
        action_mask[row, :n] = True if sample.action_mask is None else sample.action_mask.bool()
        for key in keys:
            response_tensors[key][row, :n] = sample.response_tensors[key]

    return MicroBatch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      response_rows=response_rows, response_starts=response_starts.long(),
                      response_lengths=response_lengths, action_mask=action_mask,
                      response_tensors=response_tensors, sample_indices=torch.tensor(list(indices)), images=images)


def response_token_index(batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat index of every real response token: (input row, input column, sample, offset in response).

    Ordered sample by sample, token by token, so `out[sample, offset] = flat_values` fills the response layout.
    """
    lengths = batch.response_lengths
    sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    first_of_sample = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(first_of_sample, lengths)
    rows = batch.response_rows[sample]
    columns = batch.response_starts[sample] + offset
    return rows, columns, sample, offset


def pad_micro_batch_count(micro_batches: Sequence[MicroBatch], count: int) -> list[MicroBatch]:
    """Append fillers (copies of the smallest micro-batch, `is_padding=True`) up to `count` micro-batches.

    Every data-parallel rank must run the same number of forward/backward passes under ZeRO; fillers run
    the model and contribute nothing (their loss weight is 0, their outputs are dropped).
    """
    if count < len(micro_batches):
        raise ValueError(f"cannot pad {len(micro_batches)} micro-batches down to {count}")
    if not micro_batches:
        raise ValueError("cannot pad an empty list of micro-batches: every rank needs at least one sample")
    smallest = min(micro_batches, key=lambda mb: mb.input_ids.numel())
    filler = dataclasses.replace(smallest, is_padding=True)
    return list(micro_batches) + [filler] * (count - len(micro_batches))


def loss_units(batch: MicroBatch, weighting: str) -> int:
    """How many units (action tokens or samples) a micro-batch's mean loss averages over."""
    if batch.is_padding:
        return 0
    if weighting == "token":
        return batch.num_action_tokens
    if weighting == "sample":
        return batch.num_samples
    if weighting == "micro_batch":
        return 1
    raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")


def loss_weights(micro_batches: Sequence[MicroBatch], weighting: str, *, global_units: float,
                 dp_size: int) -> list[float]:
    """Factor for each micro-batch's mean loss so that the data-parallel *averaged* gradient is the gradient of
    the mean over all units (tokens, samples or micro-batches) of all ranks.

    `global_units` is the sum of `loss_units` over every micro-batch of every rank. DeepSpeed divides the
    summed gradients by `dp_size`, hence the factor `dp_size / global_units` per unit.
    """
    if global_units <= 0:
        raise ValueError(f"the batch has no {weighting} units to average over (global_units={global_units}); "
                         "is every action_mask all False?")
    return [loss_units(mb, weighting) * dp_size / global_units for mb in micro_batches]


def scatter_to_samples(micro_batches: Sequence[MicroBatch], values: Sequence[torch.Tensor],
                       num_samples: int) -> list[torch.Tensor]:
    """Per-sample 1-D tensors (length = response length) from response-layout results, in the original order."""
    if len(micro_batches) != len(values):
        raise ValueError(f"got {len(values)} result tensors for {len(micro_batches)} micro-batches")
    result: list[torch.Tensor | None] = [None] * num_samples
    for batch, value in zip(micro_batches, values):
        if batch.is_padding:
            continue
        for row, (index, length) in enumerate(zip(batch.sample_indices.tolist(), batch.response_lengths.tolist())):
            if not 0 <= index < num_samples:
                raise ValueError(f"micro-batch holds sample index {index}, outside 0..{num_samples - 1}")
            result[index] = value[row, :length]
    missing = [i for i, r in enumerate(result) if r is None]
    if missing:
        raise ValueError(f"samples {missing[:10]} are in none of the micro-batches")
    return result  # type: ignore[return-value]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
