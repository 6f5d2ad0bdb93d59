"""Mixture-of-experts MLP (Qwen3-MoE): top-k routing and exact, capacity-free expert dispatch.

Notation: N tokens, E hidden, X experts, M expert width (moe_intermediate_size), K experts per
token, A = N*K (token, expert) assignments.

Routing (transformers' Qwen3MoeTopKRouter):
  logits_NX = x_NE @ router_EX;  p_NX = softmax(logits) in fp32;  (w_NK, ids_NK) = top_k(p, K);
  w /= sum_k w  when norm_topk_prob;  w cast to the compute dtype.
Expert MLP: y_NE = sum_k w[n,k] * down_{ids[n,k]}( silu(x_n @ gate_e) * (x_n @ up_e) ).

Dispatch: the A assignments are sorted by expert (a stable argsort), so each expert's rows are a
contiguous group; group sizes come from a bincount. No token is ever dropped (no capacity factor):
  "ragged": lax.ragged_dot over the sorted rows (a grouped-matmul kernel on GPU / TPU; XLA:CPU only
            has a dense fallback, so "auto" does not pick it there);
  "blocks": each group is padded to a multiple of `block` rows and a loop runs one [block, E] x
            [E, M] SwiGLU per USED block with that block's expert weights: work
            <= (A + X*(block-1)) rows instead of the N*X rows of running every expert on every token;
  "dense":  every expert on every token, weighted by the (mostly zero) routing weights; a reference
            for tests, never a default.
Expert parallelism: the X experts are split over a mesh axis; each shard sorts only the assignments
to its own experts (the others sort to the end and are masked), and a psum over the axis adds the
shards' partial outputs (see `moe_block`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tgpo_jax.models.config import ModelConfig


def route(x_NE: jax.Array, router_EX: jax.Array, top_k: int, norm_topk_prob: bool):
    """(weights_NK in x's dtype, expert ids_NK int32) as in transformers' Qwen3MoeTopKRouter."""
    logits_NX = jnp.einsum("ne,ex->nx", x_NE, router_EX.astype(x_NE.dtype))
    probs_NX = jax.nn.softmax(logits_NX.astype(jnp.float32), axis=-1)
    w_NK, ids_NK = jax.lax.top_k(probs_NX, top_k)
    if norm_topk_prob:
        w_NK = w_NK / jnp.sum(w_NK, axis=-1, keepdims=True)
    return w_NK.astype(x_NE.dtype), ids_NK.astype(jnp.int32)


def _swiglu_rows(x_RE, gate_EM, up_EM, down_ME):
    h_RM = jax.nn.silu(x_RE @ gate_EM) * (x_RE @ up_EM)
    return h_RM @ down_ME


def experts_ragged(xs_AE, group_sizes_X, gate_XEM, up_XEM, down_XME):
    """Grouped SwiGLU over expert-sorted rows with lax.ragged_dot; rows past sum(group_sizes)
    are unspecified (callers mask them)."""
    g = jax.lax.ragged_dot(xs_AE, gate_XEM, group_sizes_X)
    u = jax.lax.ragged_dot(xs_AE, up_XEM, group_sizes_X)
    return jax.lax.ragged_dot(jax.nn.silu(g) * u, down_XME, group_sizes_X)


def experts_blocks(xs_AE, group_sizes_X, gate_XEM, up_XEM, down_XME, block: int):
    """Grouped SwiGLU over expert-sorted rows, one expert per block of `block` rows.

    Group x's rows land at padded offset pstart_x = sum_{y<x} ceil(gs_y/block)*block; at most
    nb = ceil((A + X*(block-1)) / block) blocks exist (a static bound); the loop runs only over the
    ceil-sum of used blocks (a dynamic trip count). Rows past sum(group_sizes) give zeros."""
    A, E = xs_AE.shape
    X = group_sizes_X.shape[0]
    nb = -(-(A + X * (block - 1)) // block)
    gs = group_sizes_X.astype(jnp.int32)
    padded = -(-gs // block) * block
    pend_X = jnp.cumsum(padded)
    start_X = jnp.cumsum(gs) - gs
    row_A = jnp.arange(A, dtype=jnp.int32)
    expert_A = jnp.minimum(jnp.searchsorted(jnp.cumsum(gs), row_A, side="right"), X - 1)
    pos_A = pend_X[expert_A] - padded[expert_A] + row_A - start_X[expert_A]
    pos_A = jnp.where(row_A < jnp.sum(gs), pos_A, nb * block)  # out of range: dropped / zero-filled
    xp_PE = jnp.zeros((nb * block, E), xs_AE.dtype).at[pos_A].set(xs_AE, mode="drop")
    block_expert = jnp.minimum(jnp.searchsorted(pend_X, jnp.arange(nb) * block, side="right"), X - 1)

    def body(j, yp_PE):
        e = block_expert[j]
        xb = jax.lax.dynamic_slice_in_dim(xp_PE, j * block, block)
        yb = _swiglu_rows(xb, gate_XEM[e], up_XEM[e], down_XME[e])
        return jax.lax.dynamic_update_slice_in_dim(yp_PE, yb.astype(yp_PE.dtype), j * block, 0)

    yp_PE = jax.lax.fori_loop(0, pend_X[-1] // block, body, jnp.zeros_like(xp_PE))
    return yp_PE.at[pos_A].get(mode="fill", fill_value=0)


def experts_dense(x_NE, w_NK, ids_NK, gate_XEM, up_XEM, down_XME, expert_offset=0):
    """Reference: every (local) expert on every token, y = sum_x c[n,x] * mlp_x(x_n)."""
    X = gate_XEM.shape[0]
    c_NX = jnp.sum(jax.nn.one_hot(ids_NK - expert_offset, X, dtype=x_NE.dtype) * w_NK[..., None], axis=1)
    h_NXM = jax.nn.silu(jnp.einsum("ne,xem->nxm", x_NE, gate_XEM)) * jnp.einsum("ne,xem->nxm", x_NE, up_XEM)
    y_NXE = jnp.einsum("nxm,xme->nxe", h_NXM, down_XME)
    return jnp.einsum("nxe,nx->ne", y_NXE, c_NX)


def experts_sorted(x_NE, w_NK, ids_NK, gate_XEM, up_XEM, down_XME, *, impl: str, block: int, expert_offset=0):
    """y_NE = sum_k w[n,k] * mlp_{ids[n,k]}(x_n) over the experts held here: ids in
    [expert_offset, expert_offset + X_local); other assignments contribute 0 (another shard's)."""
    if impl == "dense":
        return experts_dense(x_NE, w_NK, ids_NK, gate_XEM, up_XEM, down_XME, expert_offset)
    N, K = ids_NK.shape
    X = gate_XEM.shape[0]
    local_A = ids_NK.reshape(-1) - expert_offset
    mine_A = (local_A >= 0) & (local_A < X)
    key_A = jnp.where(mine_A, local_A, X)  # other shards' assignments sort to the end
    order_A = jnp.argsort(key_A, stable=True)
    token_A = order_A // K
    group_sizes_X = jnp.bincount(key_A, length=X + 1)[:X].astype(jnp.int32)
    xs_AE = x_NE[token_A]
    if impl == "ragged":
        y_AE = experts_ragged(xs_AE, group_sizes_X, gate_XEM, up_XEM, down_XME)
    elif impl == "blocks":
        y_AE = experts_blocks(xs_AE, group_sizes_X, gate_XEM, up_XEM, down_XME, block)
    else:
        raise ValueError(f"unknown moe impl {impl!r}; accepted: ragged, blocks, dense")
    wsorted_A = jnp.where(mine_A, w_NK.reshape(-1), 0)[order_A]
    contrib_AE = jnp.where(mine_A[order_A][:, None], y_AE * wsorted_A[:, None].astype(y_AE.dtype), 0)
    return jnp.zeros_like(x_NE).at[token_A].add(contrib_AE.astype(x_NE.dtype))


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The experts' dispatch: `impl`, or for "auto" ragged_dot on accelerators and sorted blocks on
    CPU, by `platform` (the model's target platform; default: the default backend's)."""
    if impl != "auto":
        return impl
    return "ragged" if (platform or jax.default_backend()) in ("gpu", "cuda", "rocm", "tpu") else "blocks"


def _expert_axis(sh, num_experts: int):
    """The mesh axis experts are split over, or None (no sharding / size 1)."""
    if sh is None:
        return None
    axes = sh.rules.mesh_axes("expert")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if len(axes) > 1:
        raise ValueError(f"the 'expert' logical axis must map to one mesh axis; got {axes}")
    if not axes or sh.mesh.shape[axes[0]] == 1:
        return None
    return axes[0]


def moe_block(cfg: ModelConfig, sh, w: dict, x_BTE: jax.Array) -> jax.Array:
    """The sparse MLP of one layer: [B, T, E] -> [B, T, E]. w: router_kernel [E, X], gate_kernel /
    up_kernel [X, E, M], down_kernel [X, M, E] (already in the compute dtype)."""
    B, T, E = x_BTE.shape
    w_BTK, ids_BTK = route(x_BTE.reshape(B * T, E), w["router_kernel"], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    w_BTK, ids_BTK = w_BTK.reshape(B, T, -1), ids_BTK.reshape(B, T, -1)
    impl = resolve_impl(cfg.moe_impl, cfg.target_platform())
    run = functools.partial(experts_sorted, impl=impl, block=cfg.moe_block_size)

    def local(x, wk, ids, g, u, d, offset):
        b, t, _ = x.shape
        y = run(x.reshape(b * t, E), wk.reshape(b * t, -1), ids.reshape(b * t, -1), g, u, d, expert_offset=offset)
        return y.reshape(b, t, E)

    axis = _expert_axis(sh, cfg.num_experts)
    mats = (w["gate_kernel"], w["up_kernel"], w["down_kernel"])
    if axis is None:
        return local(x_BTE, w_BTK, ids_BTK, *mats, 0)
    return _expert_parallel(sh, axis, local, x_BTE, w_BTK, ids_BTK, mats, cfg.num_experts)


def _expert_parallel(sh, axis: str, local, x_BTE, w_BTK, ids_BTK, mats, num_experts: int):
    """shard_map over the whole mesh: experts split over `axis`, tokens split over the batch mesh
    axes other than `axis` (all-gathered over `axis`), every other dim replicated (weights are
    gathered at use, as FSDP does for dense layers); the shards' partial sums are psum'ed."""
    n_shards = sh.mesh.shape[axis]
    if num_experts % n_shards:
        raise ValueError(f"num_experts={num_experts} is not divisible by mesh axis {axis!r} of size {n_shards}")
    batch = sh.rules.mesh_axes("batch")
    batch = tuple(a for a in ((batch,) if isinstance(batch, str) else tuple(batch or ())) if a != axis)
    n_batch = 1
    for a in batch:
        n_batch *= sh.mesh.shape[a]
    bspec = (batch if len(batch) > 1 else batch[0]) if batch and x_BTE.shape[0] % n_batch == 0 else None
    x_local = num_experts // n_shards

    def body(x, wk, ids, g, u, d):
        offset = jax.lax.axis_index(axis) * x_local
        return jax.lax.psum(local(x, wk, ids, g, u, d, offset), axis)

    act, wspec = P(bspec, None, None), P(axis, None, None)
    return jax.shard_map(
        body, mesh=sh.mesh, in_specs=(act, act, act, wspec, wspec, wspec), out_specs=act, check_vma=False
    )(x_BTE, w_BTK, ids_BTK, *mats)
