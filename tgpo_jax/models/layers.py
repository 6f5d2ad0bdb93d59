"""Pure math of the decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Numerics follow transformers' PyTorch implementations (RMSNorm and RoPE angles in fp32, softmax in
fp32) so that fp32 logits agree to ~1e-5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tgpo_jax.models.config import ModelConfig

# Finite "minus infinity": a fully masked row (a left-pad query) then softmaxes to a uniform
# distribution instead of NaN, and NaNs never leak into valid rows through 0 * NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def rms_norm(x_BTE: jax.Array, scale_E: jax.Array, eps: float) -> jax.Array:
    """y = scale * x / sqrt(mean(x^2) + eps), statistics in fp32, result cast back to x.dtype."""
    x32 = x_BTE.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x_BTE.dtype)
    return scale_E.astype(x_BTE.dtype) * normed


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] for rope_type 'default' or 'llama3' (computed on host, fp32)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    rs = cfg.rope_scaling
    if rs.rope_type == "default":
        return inv.astype(np.float32)
    # Llama 3.1 frequency-dependent scaling: long wavelengths are divided by `factor`, short ones
    # kept, and the band in between interpolated smoothly.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BT: jax.Array, inv_freq_D2: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim / 2] of the angles position * inv_freq: the rotate-half layout of HF
    checkpoints repeats them over the two halves of a head, so half the width is all `apply_rope`
    needs (sin / cos are slow on XLA:CPU, about 15x an exp)."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_D2)[None, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BTHD: jax.Array, cos_BTd: jax.Array, sin_BTd: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x1, x0],
    written per half: [x0 c - x1 s, x1 c + x0 s] (the same products and sums, so the same values).
    Written this way XLA fuses it into one loop; the rotate-half concatenation was materialised as
    its own copy in every layer, forward and rematerialised (measured 5% faster train steps at the
    demo's training shape on the 2-core CPU)."""
    half = x_BTHD.shape[-1] // 2
    x0, x1 = x_BTHD[..., :half], x_BTHD[..., half:]
    c, s = cos_BTd[:, :, None, :], sin_BTd[:, :, None, :]
    return jnp.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)


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


def split_heads(q_BTHD: jax.Array, K: int) -> jax.Array:
    """[B, T, H, D] -> [B, K, G, T, D]: query heads grouped by the kv head they read (G = H / K)."""
    B, T, H, D = q_BTHD.shape
    return q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)


def merge_heads(x_BKGTD: jax.Array) -> jax.Array:
    """The inverse of `split_heads`: [B, K, G, T, D] -> [B, T, K * G, D]."""
    B, K, G, T, D = x_BKGTD.shape
    return x_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def auto_query_block(setting: int, T: int, backend: str | None = None) -> int:
    """The query block `blocked_attention.blocked_causal_attention` uses for T positions (0: full
    scores). `setting` >= 0 is taken as is; -1 (auto) picks blocks only on the CPU backend, where
    skipping the upper triangle measured 1.1-1.45x faster train steps at 112-320 positions: blocks
    of 32 rows, or T / 16 for long sequences (at most 16 blocks: the blocks are unrolled at trace
    time). XLA:GPU / TPU get full scores (use attn_impl="cudnn" on GPUs)."""
    if setting >= 0:
        return setting
    if (backend or jax.default_backend()) != "cpu" or T < 96:
        return 0
    return max(32, -(-T // 16))


def sdpa_attention(
    q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, allowed_BTS: jax.Array, implementation: str | None = None
) -> jax.Array:
    """`attention` for cache-free causal self-attention through `jax.nn.dot_product_attention`
    (grouped-query heads as `attention`). `is_causal` lets a fused kernel (cuDNN flash attention on
    GPU) skip the upper triangle; `allowed` still masks left padding. implementation None: the
    backend's choice; "xla" or "cudnn" to force one."""
    return jax.nn.dot_product_attention(
        q_BTHD, k_BSKD, v_BSKD, mask=allowed_BTS[:, None, :, :], is_causal=True, implementation=implementation
    )


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """x [..., *in] @ w [*in, *out] -> [..., *out], where `in` is w's first n_in axes, as ONE 2-D
    matmul of x flattened to [N, prod(in)] by w flattened to [prod(in), prod(out)].

    Why not `einsum("bte,ehd->bthd")`: XLA:CPU lowers a contraction with several free batch-like
    axes, above all its weight gradient (a contraction over b and t), to transposing copies and a
    slower dot. Measured on the 2-core CPU, a SwiGLU over 3,584 x 64 -> 128, forward + backward:
    10.4 ms as 3-D einsums, 3.8 ms as 2-D matmuls (torch: 5.7 ms)."""
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    if x.shape[x.ndim - n_in :] != in_shape:
        raise ValueError(f"dense: input axes {x.shape[x.ndim - n_in :]} do not match the weight's {in_shape}")
    k, n = math.prod(in_shape), math.prod(out_shape)
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, n), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out_shape)


def swiglu(x_BTE, gate_EF, up_EF, down_FE, constrain_hidden=lambda a: a) -> jax.Array:
    """down( silu(x @ gate) * (x @ up) ); `constrain_hidden` pins the [B, T, F] sharding."""
    g = dense(x_BTE, gate_EF)
    u = dense(x_BTE, up_EF)
    return dense(constrain_hidden(jax.nn.silu(g) * u), down_FE)
