"""Causal self-attention in query blocks with a hand-written backward pass (CPU training).

The forward is `reference.attention` block by block: query rows [t0, t1) read keys [0, t1) only, so
the upper triangle of the scores is skipped. The backward is written out rather than left to
autodiff for two reasons, both measured on the 2-core CPU:

- it keeps, per query row, the softmax's max m and 1 / sum(exp(s - m)), so the probabilities are
  rebuilt with one fused exp pass (no max / sum passes over the scores), and it uses
  D = rowsum(dO * O) instead of rowsum(dP * P);
- it accumulates dK and dV transposed ([B, K, D, S]: dV^T += dO^T P, dK^T += Q^T dS), so that every
  backward matmul has its big [t, s] operand row-major. Autodiff made XLA:CPU copy (transpose) P
  and dS for dV = P^T dO and dK = dS^T Q.

Shapes: q [B, T, H, D], k / v [B, T, K, D] (H % K == 0; query head h reads kv head h // (H / K)),
key_mask [B, T] (query t may attend key s iff s <= t and key s is real), as in a cache-free
forward. The max, the 1 / sum and the output carry the checkpoint name ATTN_OUT, so that the
decoder's "attn_out" remat policy keeps them and the backward recomputes no attention forward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tgpo_jax.kernels.common import ATTN_OUT, MASK_VALUE, merge_heads, split_heads


def _blocks(T: int, block: int):
    return [(t0, min(t0 + block, T)) for t0 in range(0, T, block)]


def _masked_scores(q_BKGTD, k_BKSD, key_mask_BS, t0: int, t1: int):
    """fp32 scores of queries [t0, t1) against keys [0, t1), scaled, MASK_VALUE where not allowed,
    [B, K, G, t, s]; and the allowed mask [B, 1, 1, t, s] (s <= t and key s real). The mask is
    built from iotas and the [B, S] key mask, so no [T, T] mask is read in the fusions."""
    scale = 1.0 / math.sqrt(q_BKGTD.shape[-1])
    # The mask and the fill value depend on nothing the decoder's layer loop changes, so XLA:CPU
    # hoisted them out of the loop as materialised [B, K, G, t, s] arrays (the fill a broadcast
    # constant) that every select then read back from memory. Passed through a barrier together
    # with the query block, they are loop-variant and stay fused into the select (measured 1.5-3.5%
    # faster train steps at the demo's training shape).
    q_block, key_mask_BS, fill = jax.lax.optimization_barrier(
        (q_BKGTD[:, :, :, t0:t1], key_mask_BS, jnp.asarray(MASK_VALUE, jnp.float32))
    )
    s = jnp.einsum("bkgtd,bksd->bkgts", q_block, k_BKSD[:, :, :t1], preferred_element_type=jnp.float32) * scale
    t_pos, s_pos = jnp.arange(t0, t1), jnp.arange(t1)
    allowed = ((s_pos[None, :] <= t_pos[:, None])[None] & key_mask_BS[:, None, :t1])[:, None, None]
    return jnp.where(allowed, s, fill), allowed


def _forward(q_BKGTD, k_BKSD, v_BKSD, key_mask_BS, block: int):
    """Per block: masked scores, softmax (m, 1 / l), output. Returns out [B, K, G, T, D] (fp32),
    m and inv_l [B, K, G, T] (fp32)."""
    outs, ms, inv_ls = [], [], []
    for t0, t1 in _blocks(q_BKGTD.shape[3], block):
        s, _ = _masked_scores(q_BKGTD, k_BKSD, key_mask_BS, t0, t1)
        m = jnp.max(s, axis=-1)
        p = jnp.exp(s - m[..., None])
        inv_l = 1.0 / jnp.sum(p, axis=-1)
        o = jnp.einsum(
            "bkgts,bksd->bkgtd", p.astype(v_BKSD.dtype), v_BKSD[:, :, :t1], preferred_element_type=jnp.float32
        )
        outs.append(o * inv_l[..., None])
        ms.append(m)
        inv_ls.append(inv_l)
    return jnp.concatenate(outs, 3), jnp.concatenate(ms, 3), jnp.concatenate(inv_ls, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BKGTD, k_BKSD, v_BKSD, key_mask_BS, block: int):
    return _forward(q_BKGTD, k_BKSD, v_BKSD, key_mask_BS, block)[0].astype(q_BKGTD.dtype)


def _attention_fwd(q_BKGTD, k_BKSD, v_BKSD, key_mask_BS, block: int):
    out, m, inv_l = _forward(q_BKGTD, k_BKSD, v_BKSD, key_mask_BS, block)
    out = checkpoint_name(out.astype(q_BKGTD.dtype), ATTN_OUT)
    m, inv_l = checkpoint_name(m, ATTN_OUT), checkpoint_name(inv_l, ATTN_OUT)
    return out, (q_BKGTD, k_BKSD, v_BKSD, key_mask_BS, out, m, inv_l)


def _attention_bwd(block: int, res, dout_BKGTD):
    """Per query block [t0, t1), scores in the forward's [B, K, G, t, s] layout:
        P = exp(S - m) / l,  dV^T += dO^T P,  dP = dO V^T,  dS = P (dP - D) / sqrt(d),
        dK^T += Q^T dS,  dQ = dS K,  D = rowsum(dO * O).
    dV and dK are accumulated transposed, [B, K, D, S]: every product is then a row-major matmul
    of a big [t, s] operand by a small one, so XLA:CPU copies only the small [.., D] operands."""
    q, k, v, key_mask_BS, out, m, inv_l = res
    B, K, G, T, D = q.shape
    dt = q.dtype
    scale = 1.0 / math.sqrt(D)
    delta = jnp.sum(dout_BKGTD.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    q_T = jnp.swapaxes(q, 3, 4)  # [B, K, G, D, T]
    do_T = jnp.swapaxes(dout_BKGTD, 3, 4)
    dk_T = jnp.zeros((B, K, D, T), jnp.float32)
    dv_T = jnp.zeros((B, K, D, T), jnp.float32)
    dqs = []
    for t0, t1 in _blocks(T, block):
        s, a = _masked_scores(q, k, key_mask_BS, t0, t1)
        p = jnp.exp(s - m[..., t0:t1, None]) * inv_l[..., t0:t1, None]
        dv_T = dv_T.at[..., :t1].add(
            jnp.einsum("bkgdt,bkgts->bkds", do_T[..., t0:t1], p.astype(dt), preferred_element_type=jnp.float32)
        )
        dp = jnp.einsum(
            "bkgtd,bksd->bkgts", dout_BKGTD[:, :, :, t0:t1], v[:, :, :t1], preferred_element_type=jnp.float32
        )
        ds = (jnp.where(a, p * (dp - delta[..., t0:t1, None]), 0.0) * scale).astype(dt)
        dk_T = dk_T.at[..., :t1].add(
            jnp.einsum("bkgdt,bkgts->bkds", q_T[..., t0:t1], ds, preferred_element_type=jnp.float32)
        )
        dqs.append(jnp.einsum("bkgts,bksd->bkgtd", ds, k[:, :, :t1], preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dqs, 3)
    return dq.astype(dt), jnp.swapaxes(dk_T, 2, 3).astype(k.dtype), jnp.swapaxes(dv_T, 2, 3).astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_causal_attention(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, key_mask_BT: jax.Array, block: int
) -> jax.Array:
    """Grouped-query causal self-attention [B, T, H, D] with key mask [B, T] (nonzero: a real
    token) in query blocks of `block` rows (see the module docstring); values equal
    `reference.causal_attention`'s, fully masked rows included."""
    T, K = q_BTHD.shape[1], k_BSKD.shape[2]
    if k_BSKD.shape[1] != T:
        raise ValueError(f"blocked_causal_attention needs as many keys as queries; got {k_BSKD.shape[1]} vs {T}")
    out = _attention(
        split_heads(q_BTHD, K), jnp.swapaxes(k_BSKD, 1, 2), jnp.swapaxes(v_BSKD, 1, 2), key_mask_BT.astype(bool), block
    )
    return merge_heads(out)
