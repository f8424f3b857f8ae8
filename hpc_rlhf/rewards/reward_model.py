"""A learned reward model: a Hugging Face sequence-classification model with one output (num_labels=1).

The score of a sequence is the head's logit at its LAST REAL TOKEN (the last position whose attention mask is 1),
computed from the per-token logits. This differs from `*ForSequenceClassification.forward`, which pools at the last
token that is not `pad_token_id` and so skips a final eos when pad == eos.

Batches are right-padded: token ids [B, T] with attention mask [B, T], ones then zeros in every row. Right padding keeps
each real token at the position it had alone, so a score does not depend on how much padding, or which other sequences,
share its micro-batch. When the model's config has `reward_mean` and `reward_std` (written when the reward model was
trained), scores are normalised to (logit - reward_mean) / reward_std.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpc_rlhf.dtypes import torch_dtype
from hpc_rlhf.rewards.result import RewardError, RewardResult, check_batch, empty_result, to_reward_result
from hpc_rlhf.training.sequence_parallel import sequence_parallel, shard_packed_row, use_sequence_parallel_attention

def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "bf16", "float32", ...)."""
    try:
        return torch_dtype(dtype, "reward model dtype")
    except ValueError as err:
        raise RewardError(str(err)) from None


def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row of a right-padded [B, T] mask."""
    if attention_mask.dim() != 2:
        raise RewardError(f"attention_mask must be [batch, seq_len], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.long)
    lengths = mask.sum(dim=1)
    empty = (lengths == 0).nonzero()
    if empty.numel():
        raise RewardError(f"row {int(empty[0, 0])} of the batch has no real tokens (attention_mask all zero)")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # Right padding: every position below the length is real, every position from it on is padding.
    not_right_padded = ((positions < lengths[:, None]).to(torch.long) != mask).any(dim=1).nonzero()
    if not_right_padded.numel():
        raise RewardError(f"row {int(not_right_padded[0, 0])} of attention_mask is not right-padded (ones then "
                          f"zeros); left padding would shift token positions and change the score")
    return lengths - 1


def right_pad(sequences: Sequence[Sequence[int] | torch.Tensor],
              pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences into (input_ids [B, T], attention_mask [B, T])."""
    rows = [torch.as_tensor(seq, dtype=torch.long).reshape(-1) for seq in sequences]
    for index, row in enumerate(rows):
        if row.numel() == 0:
            raise RewardError(f"token_ids[{index}] is empty; every sequence needs at least one token")
    longest = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : row.numel()] = row
        attention_mask[index, : row.numel()] = 1
    return input_ids, attention_mask


class RewardModel:
    """Scores sequences with a sequence-classification model, in eval mode, without gradients, micro-batched."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = torch.float32, micro_batch_size: int = 8, *,
                 zero3: Any = None, group: Any = None, sp_group: Any = None):
        """`zero3` (an EngineConfig with zero_stage=3) partitions the model over `group`, the reward role's
        process group, as for the reference: a 70B reward model then fits. Every rank of the group must then call
        `score_sequences` together (ranks may hold different numbers of sequences). With `sp_group` (sequence
        parallelism, `ds.ring_attn_size`) the ranks of that group score the same sequences, each micro-batch packed
        into one row and split between them."""
        from transformers import AutoModelForSequenceClassification

        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise RewardError(f"reward model micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
        if not Path(model_path).is_dir():
            raise RewardError(f"reward model folder {str(model_path)!r} does not exist")
        self.model_path = str(model_path)
        self.micro_batch_size = micro_batch_size
        self.mpu = None
        if zero3 is not None:
            from hpc_rlhf.training.deepspeed_setup import init_inference_engine
            from hpc_rlhf.training.zero3_loading import load_partitioned

            model = load_partitioned(AutoModelForSequenceClassification, self.model_path, zero3, group, num_labels=1)
            model.requires_grad_(False)
            engine, self.mpu = init_inference_engine(model, zero3, group)
            self.model, self.device = engine.module, engine.device
        else:
            self.device = torch.device(device)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.model_path, num_labels=1, dtype=resolve_dtype(dtype))
            self.model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.sp = None if sp_group is None else sequence_parallel(sp_group, dist.get_world_size(sp_group))
        if self.sp is not None:
            use_sequence_parallel_attention(self.model)
        config = self.model.config
        if not hasattr(self.model, "score"):
            raise RewardError(f"{type(self.model).__name__} at {self.model_path} has no `score` head; only decoder "
                              f"models with a sequence-classification `score` layer are supported")
        self.backbone = getattr(self.model, self.model.base_model_prefix)
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
        self.reward_mean = 0.0 if mean is None else float(mean)
        self.reward_std = 1.0 if std is None else float(std)
        if self.reward_std <= 0:
            raise RewardError(f"config.reward_std of {self.model_path} must be > 0, got {self.reward_std}")
        self.tokenizer = self._load_tokenizer()

    def _load_tokenizer(self) -> Any:
        """The tokenizer saved beside the model, or None when the folder has none (then token_ids are required)."""
        from transformers import AutoTokenizer

        folder = Path(self.model_path)
        if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                          "tokenizer.model", "vocab.json")):
            return None
        return AutoTokenizer.from_pretrained(self.model_path)

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised scores, float32 [B], of right-padded `input_ids` [B, T] with `attention_mask` [B, T]."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise RewardError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                              f"must both be [batch, seq_len]")
        starts = list(range(0, input_ids.shape[0], self.micro_batch_size))
        scores = []
        with self._collective_scope() as agreed_count:
            for index in range(agreed_count(len(starts))):
                if index >= len(starts):  # this rank has run out: a one-token batch keeps ZeRO-3 collectives matched
                    self._score_micro_batch(input_ids.new_zeros((1, 1)), attention_mask.new_ones((1, 1)))
                    continue
                start = starts[index]
                scores.append(self._score_micro_batch(input_ids[start:start + self.micro_batch_size],
                                                      attention_mask[start:start + self.micro_batch_size]))
        return ((torch.cat(scores) if scores else torch.zeros(0)) - self.reward_mean) / self.reward_std

    def _score_micro_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = last_real_token_index(attention_mask)
        if self.sp is not None:
            return self._score_split(input_ids, last + 1)
        # Trim the micro-batch to its own longest row: trailing padding cannot change a right-padded score.
        width = int(last.max()) + 1
        ids = input_ids[:, :width].to(self.device)
        mask = attention_mask[:, :width].to(self.device)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = torch.arange(ids.shape[0], device=self.device)
        logits = self.model.score(hidden[rows, last.to(self.device)])
        return logits[:, 0].float().cpu()

    def _score_split(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The rows packed into one row and split over the sequence-parallel group; each score is read on the rank
        holding its sequence's last token and summed over the group."""
        sizes = lengths.tolist()
        packed = torch.cat([row[:size] for row, size in zip(input_ids, sizes)]).unsqueeze(0)
        positions = torch.cat([torch.arange(size) for size in sizes]).unsqueeze(0)
        shard = shard_packed_row(packed, positions, self.sp, device=self.device, pad_token_id=self.pad_token_id)
        hidden = self.backbone(**shard.model_inputs()).last_hidden_state[0]
        ends = torch.cumsum(lengths, 0) - 1
        mine = (ends >= shard.start) & (ends < shard.stop)
        scores = torch.zeros(len(sizes), dtype=torch.float32, device=self.device)
        if bool(mine.any()):
            head = self.model.score(hidden[(ends[mine] - shard.start).to(self.device)])
            scores[mine.to(self.device)] = head[:, 0].float()
        dist.all_reduce(scores, group=self.sp.group)
        return scores.cpu()

    @contextlib.contextmanager
    def _collective_scope(self) -> Iterator[Callable[[int], int]]:
        """Yields `agreed_count(n)`: n for a plain model; the group's largest n under ZeRO-3, inside its scope."""
        if self.mpu is None:
            yield lambda count: count
            return
        from hpc_rlhf.training.deepspeed_setup import all_reduce_in_group, engine_scope

        with engine_scope(self.mpu):
            yield lambda count: int(all_reduce_in_group([count], dist.ReduceOp.MAX, self.mpu)[0])

    def score_sequences(self, token_ids: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """Normalised scores, float32 [B], of unpadded token id sequences (each prompt + response)."""
        if len(token_ids) == 0:
            if self.mpu is not None:  # still take part in the group's forwards
                self.score_tokens(torch.zeros((0, 1), dtype=torch.long), torch.ones((0, 1), dtype=torch.long))
            return torch.zeros(0)
        input_ids, attention_mask = right_pad(token_ids, self.pad_token_id)
        return self.score_tokens(input_ids, attention_mask)

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                 token_ids: Sequence[Sequence[int] | torch.Tensor] | None = None) -> RewardResult:
        """Rewards for one batch: scores `token_ids` when given, else the query texts tokenized as they are
        (no special tokens added: a query is a full rendered sequence). Scores equal rewards."""
        source = f"reward model {self.model_path}"
        check_batch(queries, prompts, labels, source)
        if token_ids is None:
            if self.tokenizer is None:
                raise RewardError(f"{source} has no tokenizer saved beside it; pass token_ids")
            token_ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in queries]
        elif len(token_ids) != len(queries):
            raise RewardError(f"{source}: got {len(token_ids)} token_ids for {len(queries)} queries")
        if not queries:
            return empty_result()
        return to_reward_result(self.score_sequences(token_ids), len(queries), source)
