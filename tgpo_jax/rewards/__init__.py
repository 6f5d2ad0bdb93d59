"""Verifiable rewards: the paper's math reward (math-verify after "</think>"), a boxed-answer string
grader, reasoning-gym scorers, all run in worker processes with a hard per-item timeout."""

from tgpo_jax.rewards.boxed import boxed_equal, last_boxed, normalize_answer
from tgpo_jax.rewards.pool import PoolResult, VerifierPool
from tgpo_jax.rewards.reward_fn import RewardConfig, RewardFn, RewardResult
from tgpo_jax.rewards.scorers import THINK_END, answer_part, math_score, rg_score, score_one

__all__ = [
    "RewardConfig",
    "RewardFn",
    "RewardResult",
    "VerifierPool",
    "PoolResult",
    "boxed_equal",
    "last_boxed",
    "normalize_answer",
    "THINK_END",
    "answer_part",
    "math_score",
    "rg_score",
    "score_one",
]
