"""What every attention implementation shares: the mask value, the checkpoint name of the
attention output, and the grouped-query head layout."""

from __future__ import annotations

import jax
import numpy as np

# Finite "minus infinity": a fully masked row (a left-pad query) then softmaxes to a uniform
# distribution instead of NaN, and NaNs never leak into valid rows through 0 * NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

ATTN_OUT = "attn_out"  # checkpoint name of each layer's attention output (decoder.remat_policy)

# logical axes of the [B, T, H, D] queries and [B, T, K, D] keys / values (sharding rules)
Q_AXES, KV_AXES = ("batch", "seq", "act_heads", None), ("batch", "seq", "act_kv_heads", None)


def split_heads(q_BTHD: jax.Array, K: int) -> jax.Array:
    """[B, T, H, D] -> [B, K, G, T, D]: query heads grouped by the kv head they read (G = H / K)."""
    B, T, H, D = q_BTHD.shape
    return q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)


def merge_heads(x_BKGTD: jax.Array) -> jax.Array:
    """The inverse of `split_heads`: [B, K, G, T, D] -> [B, T, K * G, D]."""
    B, K, G, T, D = x_BKGTD.shape
    return x_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)
