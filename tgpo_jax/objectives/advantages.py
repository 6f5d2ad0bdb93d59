"""Outcome advantages and the teacher-coefficient schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

GRPO_EPS = 1e-6


def grpo_advantages(rewards_B, group_size: int, eps: float = GRPO_EPS):
    """A_b = (r_b - mean_g) / (std_g + eps) within each consecutive group of `group_size` rows
    (rows are prompt-major), std with ddof=1. A group whose rewards are all equal gets A = 0 and
    is kept (it still receives the teacher term). Works on numpy or jax arrays."""
    xp = jnp if isinstance(rewards_B, jax.Array) else np
    if group_size < 2:
        raise ValueError(f"GRPO needs a group size >= 2 (std with ddof=1); got {group_size}")
    if rewards_B.shape[0] % group_size:
        raise ValueError(f"{rewards_B.shape[0]} rewards do not split into groups of {group_size}")
    r_GN = rewards_B.reshape(-1, group_size).astype(xp.float32)
    mean = r_GN.mean(-1, keepdims=True)
    std = r_GN.std(-1, ddof=1, keepdims=True)
    return ((r_GN - mean) / (std + eps)).reshape(-1)


def teacher_coef(iteration, lambda_0: float, decay: float, lambda_min: float):
    """lambda_s = max(lambda_0 - (s - 1) * decay, lambda_min), s = iteration counter from 1.

    The iteration where the floor is reached is found in float64 on the host, so that fp32
    rounding never leaves a 1e-10 residue where the schedule should be exactly lambda_min."""
    s = jnp.asarray(iteration, jnp.float32)
    lam = jnp.maximum(lambda_0 - (s - 1.0) * decay, lambda_min)
    if decay > 0:
        # first s with lambda_0 - (s-1)*decay <= lambda_min; the tolerance absorbs float64 noise
        # in ratios that are whole numbers (0.002 / 1e-5 = 199.99999999999997)
        s_floor = math.ceil((lambda_0 - lambda_min) / decay - 1e-9) + 1
        lam = jnp.where(s >= s_floor, lambda_min, lam)
    return lam
