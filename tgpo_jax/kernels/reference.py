"""Attention as two einsums around an fp32 softmax: the reference every other implementation is
tested against, the cache path (prefill, decode) and the `einsum` kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tgpo_jax.kernels.common import MASK_VALUE, merge_heads, split_heads


def attention(
    q_BTHD: jax.Array, k: jax.Array, v: jax.Array, allowed_BTS: jax.Array, kv_layout: str = "bskd"
) -> jax.Array:
    """Grouped-query softmax attention. q has H heads, k/v have K heads (H % K == 0); query head h
    reads kv head h // (H / K). allowed[b, t, s] says whether query t may attend key slot s.
    k/v are [B, S, K, D] (kv_layout "bskd") or [B, K, S, D] ("bksd", the KV cache's layout).
    Returns [B, T, H, D] in q's dtype; scores and softmax in fp32."""
    D = q_BTHD.shape[-1]
    # Heads-first operands: both contractions become plain batched matmuls, and XLA does not
    # transpose the [.., T, S] score tensors in the backward pass (measured -25% step time on CPU).
    k_BKSD, v_BKSD = (k, v) if kv_layout == "bksd" else (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    q_BKGTD = split_heads(q_BTHD, k_BKSD.shape[1])
    scores = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(D))
    scores = jnp.where(allowed_BTS[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_BKSD, preferred_element_type=jnp.float32)
    return merge_heads(out).astype(q_BTHD.dtype)


def causal_allowed(key_mask_BT: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t may read key s iff s <= t and key s is a real token."""
    T = key_mask_BT.shape[1]
    return (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & key_mask_BT.astype(bool)[:, None, :]


def causal_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, key_mask_BT: jax.Array) -> jax.Array:
    """Cache-free causal self-attention with full [T, T] scores (`attention` under `causal_allowed`)."""
    return attention(q_BTHD, k_BTKD, v_BTKD, causal_allowed(key_mask_BT))
