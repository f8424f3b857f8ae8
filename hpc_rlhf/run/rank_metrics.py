"""Metrics each rank reports for one step (a PPO tick), how they add up on the rank, and how rank 0 merges them.

The prefix of a metric's name is its family, and the family says how values combine (KEY_FAMILIES):

    sum/<name>      counts (tokens, samples, evaluation sums): added on a rank and over ranks; rank 0 logs what is
                    derived from them (throughput/<tokens>_per_s, eval means, count/<name> for sample counts)
    max/<name>_s    phase times in seconds: added on a rank (a phase may run twice in a tick), the slowest rank over
                    ranks; logged as time/<name>_s
    anything else   the last value on a rank, the mean over the ranks that report it; logged as it is

`with timed(metrics, "actor_update"):` measures a phase into max/actor_update_s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

SUM = "sum/"
MAX = "max/"
PLAIN = ""


@dataclass(frozen=True)
class KeyFamily:
    """How the metrics whose names start with `prefix` combine."""

    prefix: str
    adds_on_rank: bool  # several reports on one rank add up (else the last one stands)
    over_ranks: Callable[[list[float]], float]
    logged_as: Optional[str]  # the prefix rank 0 logs the merged value under; None: only what is derived is logged


KEY_FAMILIES: tuple[KeyFamily, ...] = (
    KeyFamily(SUM, adds_on_rank=True, over_ranks=lambda values: sum(values, 0.0), logged_as=None),
    KeyFamily(MAX, adds_on_rank=True, over_ranks=lambda values: max(0.0, *values), logged_as="time/"),
    KeyFamily(PLAIN, adds_on_rank=False, over_ranks=lambda values: sum(values) / len(values), logged_as=PLAIN),
)
FAMILIES: dict[str, KeyFamily] = {family.prefix: family for family in KEY_FAMILIES}
LOGGED_ORDER = (PLAIN, MAX)  # the merged row: the averaged metrics, then the phase times, then what is derived

# throughput/<tokens>_per_s = sum/<tokens> over all ranks / max/<seconds> of the slowest rank.
THROUGHPUT: tuple[tuple[str, str], ...] = (
    ("generate_tokens", "generate_engine_s"), ("train_tokens", "actor_update_s"),
    ("actor_logprob_tokens", "actor_logprob_s"), ("reference_tokens", "reference_s"),
    ("critic_forward_tokens", "critic_forward_s"), ("critic_train_tokens", "critic_train_s"),
    ("reward_model_tokens", "reward_model_s"),
)
# <logged name> = sum/<numerator> / sum/<denominator>, when the denominator is not 0.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("eval/reward_mean", "eval_reward", "eval_count"),
    ("eval/accuracy", "eval_score", "eval_count"),
)
COUNTED_SUFFIX = "samples"  # sum/<name>samples is also logged as count/<name>samples


def family_of(key: str) -> KeyFamily:
    """The family of a metric name (the first whose prefix it starts with; every name has one)."""
    return next(family for family in KEY_FAMILIES if key.startswith(family.prefix))


def phase_time(name: str, prefix: str = MAX) -> str:
    """The key of a phase's seconds: max/<name>_s on a rank (logged as time/<name>_s)."""
    return f"{prefix}{name}_s"


def is_phase_time(key: str) -> bool:
    return family_of(key).prefix == MAX


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for queued GPU work, so that a phase's wall time includes its kernels (no-op on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(metrics: dict[str, float], name: str, *, sync: Optional[torch.device] = None,
          prefix: str = MAX) -> Iterator[None]:
    """Add the wall time of the block to metrics["max/<name>_s"] (a rank that logs its own metrics, unmerged, passes
    prefix="time/"); with `sync`, the device's queued work is waited for before the clock stops."""
    key = phase_time(name, prefix)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(sync)
        metrics[key] = metrics.get(key, 0.0) + (time.perf_counter() - start)


def accumulate(metrics: dict[str, float], new: Mapping[str, float]) -> None:
    """Add `new` into one rank's step metrics: families that add on a rank (counts, phase times) add up, the others
    replace."""
    for key, value in new.items():
        metrics[key] = metrics.get(key, 0.0) + value if family_of(key).adds_on_rank else value


def mean_metrics(steps: Sequence[Mapping[str, float]], prefix: str) -> dict[str, float]:
    """Average optimizer-step metrics; bare names (loss, grad_norm, lr) get the role's prefix."""
    if not steps:
        return {}
    return {(key if "/" in key else prefix + key): sum(m[key] for m in steps) / len(steps) for key in steps[0]}


def merge_metrics(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine every rank's metrics by family (KEY_FAMILIES), then derive throughputs, ratios and sample counts."""
    values: dict[str, dict[str, list[float]]] = {family.prefix: {} for family in KEY_FAMILIES}
    for metrics in per_rank:
        for key, value in metrics.items():
            family = family_of(key)
            values[family.prefix].setdefault(key[len(family.prefix):], []).append(value)
    reduced = {family.prefix: {name: family.over_ranks(found) for name, found in values[family.prefix].items()}
               for family in KEY_FAMILIES}
    merged: dict[str, float] = {}
    for prefix in LOGGED_ORDER:
        merged.update({f"{FAMILIES[prefix].logged_as}{name}": value for name, value in reduced[prefix].items()})
    sums, times = reduced[SUM], reduced[MAX]
    for tokens, seconds in THROUGHPUT:
        if tokens in sums and times.get(seconds):
            merged[f"throughput/{tokens}_per_s"] = sums[tokens] / times[seconds]
    for name, numerator, denominator in RATIOS:
        if sums.get(denominator):
            merged[name] = sums[numerator] / sums[denominator]
    merged.update({f"count/{name}": value for name, value in sums.items() if name.endswith(COUNTED_SUFFIX)})
    return merged
