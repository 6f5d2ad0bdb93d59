"""Attention kernels: one module (`attention`) owns every implementation and the `auto` choice;
the decoder calls `causal_attention` (cache-free) and `cached_attention` and holds no kernel code."""

from tgpo_jax.kernels.attention import (
    IMPLS,
    AttentionUnavailable,
    auto_query_block,
    cached_attention,
    causal_attention,
    resolve,
)
from tgpo_jax.kernels.common import ATTN_OUT, MASK_VALUE

__all__ = [
    "ATTN_OUT",
    "IMPLS",
    "MASK_VALUE",
    "AttentionUnavailable",
    "auto_query_block",
    "cached_attention",
    "causal_attention",
    "resolve",
]
