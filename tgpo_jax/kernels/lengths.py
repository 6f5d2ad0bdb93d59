"""Causal self-attention through `jax.nn.dot_product_attention` with the padding given as sequence
lengths, never as a dense [B, 1, T, T] mask (attn_impl "sdpa" and "cudnn").

cuDNN's padding mask keeps the first `length` positions of a row, but our rows are left-padded
(pads, prompt, response, trailing pads). Each row is therefore rotated left by its number of
leading pads, so that its real tokens occupy [0, n); the kernel runs causal with
query / key lengths n; the output is rotated back. Rotation moves whole positions (RoPE was already
applied with each token's own position), and under the causal mask a real query reads exactly the
real keys at or before it, as in `reference.causal_attention`. The one assumption: a row's real
tokens are contiguous (left padding, real tokens, trailing padding), which is how the rollout lays
out every row. Query rows past n (padding) get whatever the kernel returns; no caller reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rotate(x_BT: jax.Array, shift_B: jax.Array) -> jax.Array:
    """x[b, t] <- x[b, (t + shift[b]) mod T] along axis 1 (any trailing axes)."""
    T = x_BT.shape[1]
    idx_BT = (jnp.arange(T)[None, :] + shift_B[:, None]) % T
    return jnp.take_along_axis(x_BT, idx_BT.reshape(idx_BT.shape + (1,) * (x_BT.ndim - 2)), axis=1)


def causal_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    key_mask_BT: jax.Array,
    implementation: str | None = None,
) -> jax.Array:
    """Grouped-query causal self-attention [B, T, H, D] (see the module docstring).
    implementation: None (the backend's choice), "xla" or "cudnn" (GPU only, bf16 / fp16)."""
    T = q_BTHD.shape[1]
    real_BT = key_mask_BT.astype(bool)
    n_B = jnp.sum(real_BT, axis=1, dtype=jnp.int32)
    lead_B = jnp.where(n_B > 0, jnp.argmax(real_BT, axis=1), 0).astype(jnp.int32)
    q, k, v = (_rotate(a, lead_B) for a in (q_BTHD, k_BTKD, v_BTKD))
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=n_B, key_value_seq_lengths=n_B, implementation=implementation
    )
    return _rotate(out, (T - lead_B) % T)
