"""Rewards: Python reward functions, remote HTTP reward services and reward models, behind one call.

    score = make_reward_source(reward_func_path="hpc_rlhf/tasks/arithmetic.py")
    result = score(queries, prompts, labels)          # RewardResult(rewards, scores, extra_logs), float32 [B]
"""

from hpc_rlhf.rewards.remote import RemoteReward
from hpc_rlhf.rewards.result import RewardError, RewardResult, to_reward_result
from hpc_rlhf.rewards.reward_func import RewardFunction, load_reward_func
from hpc_rlhf.rewards.reward_model import RewardModel
from hpc_rlhf.rewards.source import RewardSource, make_reward_source, reward_source_from_config

__all__ = [
    "RemoteReward",
    "RewardError",
    "RewardFunction",
    "RewardModel",
    "RewardResult",
    "RewardSource",
    "load_reward_func",
    "make_reward_source",
    "reward_source_from_config",
    "to_reward_result",
]
