"""Rewards: functions by name (math, format, exact, module:function), weighted, run with time limits.

    reward = build_reward([{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1}])
    total, parts = reward(response, answer)
    with RewardPool(specs, num_workers=4, timeout_s=10) as pool:
        rewards, metrics = pool.score(responses, answers)
"""

from system.rewards.math_answer import extract_answer
from system.rewards.pool import RewardPool
from system.rewards.registry import REGISTRY, CombinedReward, build_reward, make_reward

__all__ = ["REGISTRY", "CombinedReward", "RewardPool", "build_reward", "extract_answer", "make_reward"]
