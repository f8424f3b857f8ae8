"""`RewardResult`, the one shape every reward source returns, and the checks that turn raw outputs into it.

A reward function or a remote service may answer with a tensor, a list, a NumPy array or a dict
{"rewards", "scores"?, "extra_logs"?}; `to_reward_result` accepts all of them and checks lengths, types and finiteness,
so the trainer sees one well-formed shape and a bad output is reported where it was produced.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

RESULT_KEYS = ("rewards", "scores", "extra_logs")


class RewardError(ValueError):
    """A reward source produced something unusable, or could not be reached or loaded."""


@dataclass(frozen=True)
class RewardResult:
    """Rewards of one batch of B samples.

    rewards: float32 [B], the training signal (before KL shaping, clipping or normalisation).
    scores: float32 [B], what dynamic filtering and evaluation look at (e.g. 0/1 correctness); defaults to rewards.
    extra_logs: name -> float32 [B] per-sample values to log; a scalar log is repeated for every sample.
    """

    rewards: torch.Tensor
    scores: torch.Tensor
    extra_logs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def to_json(self) -> dict[str, Any]:
        """Plain lists, as a remote reward service sends them."""
        return {
            "rewards": self.rewards.tolist(),
            "scores": self.scores.tolist(),
            "extra_logs": {name: values.tolist() for name, values in self.extra_logs.items()},
        }

    @staticmethod
    def concat(parts: Sequence[RewardResult]) -> RewardResult:
        """Join the results of consecutive chunks of one batch, in order; every chunk must log the same names."""
        if not parts:
            raise ValueError("RewardResult.concat needs at least one result")
        names = list(parts[0].extra_logs)
        for index, part in enumerate(parts[1:], start=1):
            if set(part.extra_logs) != set(names):
                raise RewardError(f"extra_logs of chunk {index} has keys {sorted(part.extra_logs)}, but chunk 0 has "
                                  f"{sorted(names)}: every chunk must log the same names")
        return RewardResult(
            rewards=torch.cat([p.rewards for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            extra_logs={name: torch.cat([p.extra_logs[name] for p in parts]) for name in names},
        )


def empty_result() -> RewardResult:
    """The result of an empty batch."""
    return RewardResult(rewards=torch.zeros(0), scores=torch.zeros(0), extra_logs={})


def _as_float_vector(values: Any, field_name: str, batch_size: int, source: str) -> torch.Tensor:
    """`values` as a float32 [batch_size] tensor, or a RewardError naming the field and what was wrong."""
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise RewardError(f"{source}: {field_name} has dtype {values.dtype}, expected real numbers")
        tensor = values.detach().to("cpu", torch.float64)
    elif isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"{source}: {field_name} must be a list or 1-D tensor of numbers, "
                          f"got {type(values).__name__}")
    else:
        items = values.tolist() if hasattr(values, "tolist") else list(values)
        for index, item in enumerate(items):
            if not isinstance(item, numbers.Real):
                raise RewardError(f"{source}: {field_name}[{index}] is {item!r} ({type(item).__name__}), "
                                  f"expected a number")
        tensor = torch.tensor([float(item) for item in items], dtype=torch.float64)
    if tensor.dim() != 1:
        raise RewardError(f"{source}: {field_name} must be 1-D with one value per sample, got shape "
                          f"{tuple(tensor.shape)}")
    if tensor.shape[0] != batch_size:
        raise RewardError(f"{source}: {field_name} has {tensor.shape[0]} values, expected {batch_size} "
                          f"(one per sample)")
    return tensor.to(torch.float32)


def _check_finite(values: torch.Tensor, field_name: str, source: str) -> None:
    """Refuse NaN or infinite rewards/scores, naming the first bad sample."""
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        index = int(bad[0, 0])
        raise RewardError(f"{source}: {field_name}[{index}] is {values[index].item()} "
                          f"({bad.numel()} non-finite value(s) in the batch); rewards must be finite numbers")


def _as_log_vector(values: Any, name: str, batch_size: int, source: str) -> torch.Tensor:
    """An extra log as float32 [batch_size]: per-sample values are checked, a scalar is repeated."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return torch.full((batch_size,), float(values), dtype=torch.float32)
    if isinstance(values, torch.Tensor) and values.dim() == 0:
        return torch.full((batch_size,), float(values.item()), dtype=torch.float32)
    return _as_float_vector(values, f"extra_logs[{name!r}]", batch_size, source)


def to_reward_result(output: Any, batch_size: int, source: str) -> RewardResult:
    """Check and convert a reward source's raw output for a batch of `batch_size` samples.

    `output` is rewards alone (tensor, list, NumPy array) or a dict with "rewards" and optional "scores" and
    "extra_logs" (a dict of per-sample values or scalars). `source` names the producer in error messages.
    """
    if isinstance(output, RewardResult):
        output = {"rewards": output.rewards, "scores": output.scores, "extra_logs": output.extra_logs}
    if isinstance(output, dict):
        if "rewards" not in output:
            raise RewardError(f"{source}: the result has no 'rewards' (keys: {sorted(map(str, output))})")
        unknown = sorted(str(key) for key in output if key not in RESULT_KEYS)
        if unknown:
            raise RewardError(f"{source}: unexpected key(s) {unknown} in the result; allowed keys are "
                              f"{list(RESULT_KEYS)}")
        raw_rewards, raw_scores, raw_logs = output["rewards"], output.get("scores"), output.get("extra_logs")
    elif isinstance(output, (torch.Tensor, list, tuple)) or hasattr(output, "__array__"):
        raw_rewards, raw_scores, raw_logs = output, None, None
    else:
        raise RewardError(f"{source}: returned {type(output).__name__}; expected a list or tensor of rewards, or a "
                          f"dict with 'rewards' and optional 'scores' and 'extra_logs'")

    rewards = _as_float_vector(raw_rewards, "rewards", batch_size, source)
    _check_finite(rewards, "rewards", source)
    if raw_scores is None:
        scores = rewards.clone()
    else:
        scores = _as_float_vector(raw_scores, "scores", batch_size, source)
        _check_finite(scores, "scores", source)

    if raw_logs is None:
        raw_logs = {}
    if not isinstance(raw_logs, dict):
        raise RewardError(f"{source}: extra_logs must be a dict of name -> values, got {type(raw_logs).__name__}")
    extra_logs = {str(name): _as_log_vector(values, str(name), batch_size, source)
                  for name, values in raw_logs.items()}
    return RewardResult(rewards=rewards, scores=scores, extra_logs=extra_logs)


def check_batch(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None, source: str) -> list:
    """Check that queries, prompts and labels line up; returns labels (a list of None when labels is None)."""
    for name, values in (("queries", queries), ("prompts", prompts)):
        if isinstance(values, str) or not hasattr(values, "__len__"):
            raise RewardError(f"{source}: {name} must be a list of strings, got {type(values).__name__}")
    labels = [None] * len(queries) if labels is None else list(labels)
    if not len(queries) == len(prompts) == len(labels):
        raise RewardError(f"{source}: got {len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; "
                          f"they must be the same length")
    return labels

