"""Causal self-attention through the Pallas TPU splash-attention kernel (attn_impl "splash").

Splash attention is a block-sparse flash attention: it visits only the [block_q, block_kv] tiles
the causal mask leaves, keeps the softmax statistics per query row (no [T, T] score tensor in HBM)
and has its own backward kernels. Left padding is given as segment ids (1: a real token, 0: a
pad): a real query reads only real keys at or before it, a pad query only pads, so no row is fully
masked. Grouped-query heads are read as they are (query head h reads kv head h // (H / K)); k and
v are never repeated except where the mesh splits query heads but not kv heads into groups the
kernel cannot express (see `_local_kv`).

On a mesh the kernel runs under shard_map, batch rows and heads split as the activation rules split
them; the sequence must be whole on each device. Off TPU it runs in Pallas' interpret mode (tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tgpo_jax.kernels.common import ATTN_OUT, KV_AXES, Q_AXES

LANES = 128  # the kernel's block sizes are multiples of the TPU's 128 lanes
MAX_BLOCK = 512


def block_size(T: int) -> int:
    """Query and key block: the padded sequence for short ones, else 512 (the block MaxText uses
    for long sequences: 18 x 18 tiles at 9,216 positions, half of them skipped by the mask)."""
    return min(MAX_BLOCK, -(-T // LANES) * LANES)


def padded_length(T: int) -> int:
    b = block_size(T)
    return -(-T // b) * b


def _kernel(heads: int, T: int, interpret: bool):
    # imported here: Pallas is a heavy import, and only a splash forward needs it
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = block_size(T)
    sizes = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(heads)])
    kernel = sk.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=ATTN_OUT,
        interpret=interpret,
    )
    return kernel, sk.SegmentIds


def local_attention(q_BTHD, k_BTKD, v_BTKD, key_mask_BT, *, interpret: bool) -> jax.Array:
    """Splash attention on one device's rows and heads: [B, T, H, D] in q's dtype."""
    B, T, H, D = q_BTHD.shape
    Tp = padded_length(T)
    # Pad at the end: under the causal mask no real query reads a key past its own position.
    pad = lambda a: jnp.pad(a, ((0, 0), (0, Tp - T)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
    scale = 1.0 / math.sqrt(D)
    q = (q_BTHD.astype(jnp.float32) * scale).astype(q_BTHD.dtype)
    q_BHTD, k_BKTD, v_BKTD = (jnp.swapaxes(pad(a), 1, 2) for a in (q, k_BTKD, v_BTKD))
    seg_BT = pad(key_mask_BT.astype(jnp.int32))
    kernel, segment_ids = _kernel(H, Tp, interpret)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s)))(
        q_BHTD, k_BKTD, v_BKTD, seg_BT
    )
    return jnp.swapaxes(out, 1, 2)[:, :T].astype(q_BTHD.dtype)


def _local_kv(k_BTKD, v_BTKD, h: int, G: int, head_axes):
    """The kv heads this device's h query heads read, when query heads are split over `head_axes`
    and kv heads are not: a contiguous slice where the split keeps whole groups (h % G == 0) or
    stays within one (G % h == 0), else one kv head per query head (repeated)."""
    j = jax.lax.axis_index(head_axes)
    first = j * h
    if h % G == 0:
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, first // G, h // G, axis=2)  # noqa: E731
    elif G % h == 0:
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, first // G, 1, axis=2)  # noqa: E731
    else:
        idx = (first + jnp.arange(h)) // G
        take = lambda a: jnp.take(a, idx, axis=2)  # noqa: E731
    return take(k_BTKD), take(v_BTKD)


def why_not(sh, q_shape, k_shape) -> str | None:
    """None if the kernel can run on this sharding, else why not (a sharded sequence)."""
    if sh is None or sh.mesh.size == 1:
        return None
    qs = sh.spec_for(q_shape, Q_AXES)
    if qs[1] is not None:
        return f"the sequence is sharded over {qs[1]!r}; splash attention needs whole rows"
    return None


def causal_attention(q_BTHD, k_BTKD, v_BTKD, key_mask_BT, *, sharding=None, interpret: bool = False) -> jax.Array:
    """Grouped-query causal self-attention [B, T, H, D] with key mask [B, T] through splash attention,
    under shard_map on a multi-device mesh (see the module docstring)."""
    sh = sharding
    if (why := why_not(sh, q_BTHD.shape, k_BTKD.shape)) is not None:
        raise ValueError(f"attn_impl='splash': {why}")
    if sh is None or sh.mesh.size == 1:
        return local_attention(q_BTHD, k_BTKD, v_BTKD, key_mask_BT, interpret=interpret)
    H, K = q_BTHD.shape[2], k_BTKD.shape[2]
    qs = sh.spec_for(q_BTHD.shape, Q_AXES)
    ks = sh.spec_for(k_BTKD.shape, KV_AXES)
    regroup = qs[2] is not None and ks[2] != qs[2]
    if regroup:  # each device takes its query heads' kv heads from all of them
        ks = P(qs[0], None, None, None)
    elif qs[2] is None and ks[2] is not None:
        ks = P(qs[0], None, None, None)  # kv heads split but query heads not: every device reads all
    h = H // _axes_size(sh.mesh, qs[2]) if qs[2] is not None else H

    def body(q, k, v, m):
        if regroup:
            k, v = _local_kv(k, v, h, H // K, qs[2])
        return local_attention(q, k, v, m, interpret=interpret)

    return jax.shard_map(body, mesh=sh.mesh, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs, check_vma=False)(
        q_BTHD, k_BTKD, v_BTKD, key_mask_BT
    )


def _axes_size(mesh, axes) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)
