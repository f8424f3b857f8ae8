"""Pick the one reward source a run uses: a Python reward function, a remote HTTP service, or a reward model.

Every source is called the same way, `score(queries, prompts, labels, token_ids=None) -> RewardResult`, so the trainer
and the agent executors do not care where rewards come from. Exactly one source may be given: summing several sources
would need weights and per-source logging, which this toolkit leaves to a user's own reward function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from hpc_rlhf.rewards.remote import RemoteReward
from hpc_rlhf.rewards.result import RewardError, RewardResult
from hpc_rlhf.rewards.reward_func import RewardFunction
from hpc_rlhf.rewards.reward_model import RewardModel


class RewardSource(Protocol):
    """Anything that scores a batch: RewardFunction, RemoteReward, RewardModel."""

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                 token_ids: Sequence[Sequence[int]] | None = None) -> RewardResult: ...


def make_reward_source(
    *,
    reward_func_path: str | None = None,
    remote_url: str | Sequence[str] | None = None,
    reward_model_path: str | Path | None = None,
    remote_timeout_s: float = 30.0,
    remote_max_retries: int = 3,
    remote_backoff_s: float = 1.0,
    remote_batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    micro_batch_size: int = 8,
) -> RewardSource:
    """The reward source named by exactly one of reward_func_path, remote_url and reward_model_path.

    `remote_url` is one URL, a list of URLs or a comma-separated string of URLs; a batch is spread over them."""
    given = {name: value for name, value in (("reward_func_path", reward_func_path), ("remote_url", remote_url),
                                             ("reward_model_path", reward_model_path)) if value}
    if len(given) != 1:
        named = ", ".join(given) if given else "none"
        raise RewardError(f"give exactly one reward source (reward_func_path, remote_url or reward_model_path); "
                          f"got {named}. To combine sources, write a reward function that calls them.")
    if reward_func_path:
        return RewardFunction(reward_func_path)
    if remote_url:
        return RemoteReward(remote_url, timeout_s=remote_timeout_s, max_retries=remote_max_retries,
                            backoff_s=remote_backoff_s, batch_size=remote_batch_size)
    return RewardModel(reward_model_path, device=device, dtype=dtype, micro_batch_size=micro_batch_size)


def reward_source_from_config(reward_config: Any, *, device: str | torch.device = "cpu",
                              dtype: str | torch.dtype = torch.float32) -> RewardSource:
    """The source a `reward:` config section names (`pretrain`, `reward_func_path` or `remote_url`).

    Optional fields `remote_backoff_s` and `remote_batch_size` are used when the section has them.
    """
    return make_reward_source(
        reward_func_path=reward_config.reward_func_path,
        remote_url=reward_config.remote_url,
        reward_model_path=reward_config.pretrain,
        remote_timeout_s=reward_config.remote_timeout_s,
        remote_max_retries=reward_config.remote_max_retries,
        remote_backoff_s=getattr(reward_config, "remote_backoff_s", 1.0),
        remote_batch_size=getattr(reward_config, "remote_batch_size", 64),
        device=device,
        dtype=dtype,
        micro_batch_size=reward_config.micro_batch_size,
    )
