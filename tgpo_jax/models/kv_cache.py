"""A preallocated key/value cache for every layer, written in place slot by slot.

A left-padded batch writes its prompt into slots [0, P) (pad slots are marked invalid in `mask_BS`)
and each decode step writes one slot at `index`: one scalar slot for every row (the static
sampler), or a [B] vector, each row at its own slot (the continuous-batching engine, whose rows are
at different points of different requests; an index at or past the cache's end writes nothing).
Two layouts (`ModelConfig.cache_layers`):
- per layer ("unroll"): `k`, `v` are tuples of [batch, kv_heads, slots, head_dim] buffers. A step
  writes one slot of each buffer in place and no step slices a layer out of a stacked cache
  (which XLA:CPU materialises as a copy per layer and step); the layers are unrolled.
- stacked ("scan"): `k`, `v` are single [layers, batch, kv_heads, slots, head_dim] arrays that
  the layer scan carries, writing each step's slot in place; one compiled layer body.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tgpo_jax.models.config import ModelConfig


def scans_cache(cfg: ModelConfig) -> bool:
    """True when the KV-cache path scans a stacked cache (`cache_layers`: "scan", or "auto" off CPU)."""
    if cfg.cache_layers == "auto":
        return cfg.target_platform() != "cpu"
    return cfg.cache_layers == "scan"


@flax.struct.dataclass
class KVCache:
    k: tuple | jax.Array  # per layer [B, K, S, D], or stacked [L, B, K, S, D]
    v: tuple | jax.Array
    mask_BS: jax.Array  # bool: slot holds a real (non-pad) token
    index: jax.Array  # int32 scalar, or [B]: the next slot to write (per row)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = dtype or cfg.jnp_dtype
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        if scans_cache(cfg):
            k = jnp.zeros((cfg.num_layers, *shape), dtype)
            v = jnp.zeros((cfg.num_layers, *shape), dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=k, v=v, mask_BS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def kv_axes(self) -> tuple:
        """Logical axes of each k / v array (a stacked cache leads with an unsharded [layers] axis)."""
        return ((None,) if self.stacked else ()) + ("batch", "act_kv_heads", "cache_seq", None)

    @property
    def max_len(self) -> int:
        return self.mask_BS.shape[1]

    @property
    def dtype(self):
        return jax.tree.leaves(self.k)[0].dtype

    def allowed_BTS(self, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes the new tokens' validity into the slot mask and returns (new slot mask,
        allowed[b, t, s]): query t (at slot index + t of its row) may see slot s iff
        s <= index + t and s is a real token."""
        T = mask_BT.shape[1]
        if self.index.ndim == 0:
            mask_BS = jax.lax.dynamic_update_slice(self.mask_BS, mask_BT.astype(bool), (0, self.index))
            q_slot_BT = jnp.broadcast_to(self.index + jnp.arange(T), mask_BT.shape)
        else:
            q_slot_BT = self.index[:, None] + jnp.arange(T)[None, :]
            rows_BT = jnp.broadcast_to(jnp.arange(mask_BT.shape[0])[:, None], mask_BT.shape)
            mask_BS = self.mask_BS.at[rows_BT, q_slot_BT].set(mask_BT.astype(bool), mode="drop")
        causal_BTS = jnp.arange(self.max_len)[None, None, :] <= q_slot_BT[:, :, None]
        return mask_BS, causal_BTS & mask_BS[:, None, :]


def _row_slots(index: jax.Array, B: int, T: int) -> tuple[jax.Array, jax.Array]:
    """(rows [B, T], slots [B, T]): row b's T new tokens go to slots index[b] + t."""
    return jnp.broadcast_to(jnp.arange(B)[:, None], (B, T)), index[:, None] + jnp.arange(T)[None, :]


def write_slots(k_BKSD: jax.Array, new_k_BTKD: jax.Array, index: jax.Array) -> jax.Array:
    """Writes T new keys of one layer at slots [index, index + T) (per row for a [B] index), in place."""
    if index.ndim == 1:
        rows, slots = _row_slots(index, *new_k_BTKD.shape[:2])
        return k_BKSD.at[rows, :, slots, :].set(new_k_BTKD.astype(k_BKSD.dtype), mode="drop")
    new = jnp.swapaxes(new_k_BTKD, 1, 2).astype(k_BKSD.dtype)  # [B, K, T, D]
    return jax.lax.dynamic_update_slice(k_BKSD, new, (0, 0, index, 0))


def write_layer_slots(k_LBKSD: jax.Array, new_k_BTKD: jax.Array, layer: jax.Array, index: jax.Array):
    """Writes T new keys of layer `layer` into a stacked cache in place; returns (the stacked
    cache, that layer's [B, K, S, D] buffer)."""
    if index.ndim == 1:
        rows, slots = _row_slots(index, *new_k_BTKD.shape[:2])
        k_LBKSD = k_LBKSD.at[layer, rows, :, slots, :].set(new_k_BTKD.astype(k_LBKSD.dtype), mode="drop")
    else:
        new = jnp.swapaxes(new_k_BTKD, 1, 2).astype(k_LBKSD.dtype)[None]  # [1, B, K, T, D]
        k_LBKSD = jax.lax.dynamic_update_slice(k_LBKSD, new, (layer, 0, 0, index, 0))
    return k_LBKSD, jax.lax.dynamic_index_in_dim(k_LBKSD, layer, 0, keepdims=False)


@flax.struct.dataclass
class PageIndex:
    """What a paged layer needs beside its pool (kernels/paged.py): each row's page table
    (group-local page ids), each row's length (its next write position), the page groups and the
    pages per group and layer (a stacked pool's layer l starts at local page l * pages)."""

    table_NM: jax.Array
    lengths_N: jax.Array
    pages: int = flax.struct.field(pytree_node=False)
    groups: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class PagedKVCache:
    """A paged KV cache for decode (the continuous-batching engine's `rollout.kv_pages`): every row's
    tokens live in pages of one pool found through its page table (layout: kernels/paged.py).
    Per layer ("unroll"): k, v are tuples of [K, G * P, page_size, D]; stacked ("scan"): single
    [K, G * L * P, page_size, D] arrays, group-major then layer-major, so a device holding group
    g's slab holds every layer's pages of that group. Decode only: one new token per row."""

    k: tuple | jax.Array
    v: tuple | jax.Array
    index: PageIndex

    @classmethod
    def init(cls, cfg: ModelConfig, rows: int, pages: int, page_size: int, max_len: int, groups: int, dtype=None):
        """pages: per group and layer (page 0 of each group is the trash page)."""
        dtype = dtype or cfg.jnp_dtype
        K, D, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        M = -(-max_len // page_size)
        if scans_cache(cfg):
            k = jnp.zeros((K, groups * L * pages, page_size, D), dtype)
            v = jnp.zeros_like(k)
        else:
            k = tuple(jnp.zeros((K, groups * pages, page_size, D), dtype) for _ in range(L))
            v = tuple(jnp.zeros((K, groups * pages, page_size, D), dtype) for _ in range(L))
        index = PageIndex(jnp.zeros((rows, M), jnp.int32), jnp.zeros((rows,), jnp.int32), pages, groups)
        return cls(k=k, v=v, index=index)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def page_size(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[2]

    @property
    def dtype(self):
        return jax.tree.leaves(self.k)[0].dtype

    @property
    def kv_axes(self) -> tuple:
        """Logical axes of each pool: kv heads, then pages split over the batch axes by group."""
        return ("act_kv_heads", "batch", None, None)
