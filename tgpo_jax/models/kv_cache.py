"""A preallocated key/value cache for every layer, written in place slot by slot.

Slots are shared by the whole batch: a left-padded batch writes its prompt into slots [0, P) (pad
slots are marked invalid in `mask_BS`) and each decode step writes one slot at `index`.
Layout [layers, batch, kv_heads, slots, head_dim]: the attention contraction reads each head's
slots contiguously, and the forward carries the whole cache through its layer scan, updating one
slot of one layer in place (no per-layer copies).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tgpo_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k_LBKSD: jax.Array
    v_LBKSD: jax.Array
    mask_BS: jax.Array  # bool: slot holds a real (non-pad) token
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.jnp_dtype
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k_LBKSD=jnp.zeros(shape, dtype),
            v_LBKSD=jnp.zeros(shape, dtype),
            mask_BS=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k_LBKSD.shape[3]

    def allowed_BTS(self, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes the new tokens' validity into the slot mask and returns (new slot mask,
        allowed[b, t, s]): query t (at slot index + t) may see slot s iff s <= index + t and s is
        a real token."""
        T = mask_BT.shape[1]
        mask_BS = jax.lax.dynamic_update_slice(self.mask_BS, mask_BT.astype(bool), (0, self.index))
        q_slot = self.index + jnp.arange(T)
        causal_TS = jnp.arange(self.max_len)[None, :] <= q_slot[:, None]
        return mask_BS, causal_TS[None] & mask_BS[:, None, :]


def write_slots(k_LBKSD: jax.Array, layer: jax.Array, new_k_BTKD: jax.Array, index: jax.Array) -> jax.Array:
    """Writes T new keys of one layer at slots [index, index + T), in place."""
    new = jnp.swapaxes(new_k_BTKD, 1, 2)[None].astype(k_LBKSD.dtype)  # [1, B, K, T, D]
    return jax.lax.dynamic_update_slice(k_LBKSD, new, (layer, 0, 0, index, 0))
