"""Attention over a KV cache that reads only the slots some query may see: the blocks of the cache
before the longest row's end (`live`), with an online softmax across blocks (the XLA version of
issue 24's live-cache decode attention; a Pallas ragged kernel would also skip per row).

A decode step of the static sampler at step t of T_new reads prompt + t slots instead of
prompt + T_new; the continuous-batching engine's rows are at different steps and the longest one
sets the bound. Values equal `reference.attention` on every query that may see some slot (a query
that may see none, a pad row no caller reads, averages the visited blocks instead of all slots)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tgpo_jax.kernels.common import MASK_VALUE, merge_heads, split_heads

BLOCK = 256  # slots per block: large enough that the loop's per-trip cost stays small on CPU


def live_attention(
    q_BTHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, allowed_BTS: jax.Array, live: jax.Array, block: int = BLOCK
) -> jax.Array:
    """Grouped-query attention [B, T, H, D] over cache slots [0, live) (int32 scalar), block by block.
    The last block may start before a block boundary (dynamic_slice keeps it inside the cache):
    slots it shares with the previous block are masked, so no slot counts twice."""
    B, T, H, D = q_BTHD.shape
    K, S = k_BKSD.shape[1], k_BKSD.shape[2]
    block = min(block, S)
    q = split_heads(q_BTHD, K)  # [B, K, G, T, D]
    scale, G = 1.0 / math.sqrt(D), H // K

    def body(j, carry):
        m, denom, acc = carry
        start = jnp.minimum(j * block, S - block)
        kb = jax.lax.dynamic_slice_in_dim(k_BKSD, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v_BKSD, start, block, axis=2)
        ab = jax.lax.dynamic_slice_in_dim(allowed_BTS, start, block, axis=2)
        fresh = start + jnp.arange(block) >= j * block  # not already visited by block j - 1
        s = jnp.einsum("bkgtd,bksd->bkgts", q, kb, preferred_element_type=jnp.float32) * scale
        s = jnp.where((ab & fresh)[:, None, None], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, denom * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    init = (
        jnp.full((B, K, G, T), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G, T), jnp.float32),
        jnp.zeros((B, K, G, T, D), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, (live + block - 1) // block, body, init)
    return merge_heads(acc / denom[..., None]).astype(q_BTHD.dtype)
