"""A preallocated key/value cache for every layer, written in place slot by slot.

Slots are shared by the whole batch: a left-padded batch writes its prompt into slots [0, P) (pad
slots are marked invalid in `mask_BS`) and each decode step writes one slot at `index`.
One buffer per layer, each [batch, kv_heads, slots, head_dim]: the attention contraction reads each
head's slots contiguously, a step writes one slot of each buffer in place, and no step slices a
layer out of a stacked cache (which XLA materialises as a copy per layer and step).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tgpo_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: tuple  # per layer: [B, K, S, D]
    v: tuple
    mask_BS: jax.Array  # bool: slot holds a real (non-pad) token
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.jnp_dtype
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            mask_BS=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def allowed_BTS(self, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes the new tokens' validity into the slot mask and returns (new slot mask,
        allowed[b, t, s]): query t (at slot index + t) may see slot s iff s <= index + t and s is
        a real token."""
        T = mask_BT.shape[1]
        mask_BS = jax.lax.dynamic_update_slice(self.mask_BS, mask_BT.astype(bool), (0, self.index))
        q_slot = self.index + jnp.arange(T)
        causal_TS = jnp.arange(self.max_len)[None, :] <= q_slot[:, None]
        return mask_BS, causal_TS[None] & mask_BS[:, None, :]


def write_slots(k_BKSD: jax.Array, new_k_BTKD: jax.Array, index: jax.Array) -> jax.Array:
    """Writes T new keys of one layer at slots [index, index + T), in place."""
    new = jnp.swapaxes(new_k_BTKD, 1, 2).astype(k_BKSD.dtype)  # [B, K, T, D]
    return jax.lax.dynamic_update_slice(k_BKSD, new, (0, 0, index, 0))
