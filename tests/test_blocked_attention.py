"""Query-blocked causal attention (ModelConfig.attn_query_block) equals the full-score attention:
values and gradients, at the layer and through the whole decoder, with GQA and left padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.models import layers as L
from tgpo_jax.models.config import ModelConfigError
from tgpo_jax.models.decoder import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config


def _causal_allowed(mask_BT):
    T = mask_BT.shape[1]
    return (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & mask_BT.astype(bool)[:, None, :]


@pytest.mark.parametrize("T, block", [(13, 4), (12, 6), (7, 1)])
def test_layer_values_and_gradients(T, block):
    B, H, K, D = 2, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, K, D))
    v = jax.random.normal(kv, (B, T, K, D))
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0  # left padding on one row
    allowed = _causal_allowed(jnp.asarray(mask))
    full = L.attention(q, k, v, allowed)
    blocked = L.causal_blocked_attention(q, k, v, allowed, block)
    # Pad query rows see no key at all: their (unused) output is arbitrary in both; compare real rows.
    real = mask.astype(bool)
    assert np.abs(np.asarray(full - blocked))[real].max() <= 1e-6

    w = jax.random.normal(jax.random.key(1), full.shape) * jnp.asarray(mask)[:, :, None, None]
    g_full = jax.grad(lambda *a: jnp.sum(L.attention(*a, allowed) * w), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(lambda *a: jnp.sum(L.causal_blocked_attention(*a, allowed, block) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_full, g_blk):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def test_decoder_hidden_states_equal_and_cache_path_unchanged():
    cfg = tiny_config("qwen2")
    tokens = jax.random.randint(jax.random.key(2), (3, 11), 1, cfg.vocab_size)
    mask = jnp.ones((3, 11), jnp.int32).at[2, :4].set(0)
    pos = left_pad_positions(mask)
    base = Decoder(cfg, nnx.Rngs(0))
    h0, _ = base(tokens, pos, mask)
    blocked = Decoder(dataclasses.replace(cfg, attn_query_block=3), nnx.Rngs(0))
    h1, _ = blocked(tokens, pos, mask)
    valid = np.asarray(mask, bool)
    assert np.abs(np.asarray(h0 - h1))[valid].max() <= 1e-5


def test_negative_block_rejected():
    with pytest.raises(ModelConfigError, match="attn_query_block"):
        dataclasses.replace(tiny_config("qwen2"), attn_query_block=-2)


def test_auto_query_block_choice():
    # explicit settings are kept; auto blocks only on CPU, and never more than 16 blocks
    assert L.auto_query_block(0, 320, "cpu") == 0 and L.auto_query_block(64, 320, "gpu") == 64
    assert L.auto_query_block(-1, 320, "gpu") == 0 and L.auto_query_block(-1, 320, "tpu") == 0
    assert L.auto_query_block(-1, 64, "cpu") == 0
    assert L.auto_query_block(-1, 112, "cpu") == 32 and L.auto_query_block(-1, 320, "cpu") == 32
    assert L.auto_query_block(-1, 4160, "cpu") == 260


def test_auto_decoder_equals_full_scores():
    cfg = tiny_config("qwen2")
    tokens = jax.random.randint(jax.random.key(3), (2, 100), 1, cfg.vocab_size)
    mask = jnp.ones((2, 100), jnp.int32).at[1, :9].set(0)
    pos = left_pad_positions(mask)
    h0, _ = Decoder(cfg, nnx.Rngs(0))(tokens, pos, mask)
    h1, _ = Decoder(dataclasses.replace(cfg, attn_query_block=-1), nnx.Rngs(0))(tokens, pos, mask)
    valid = np.asarray(mask, bool)
    assert np.abs(np.asarray(h0 - h1))[valid].max() <= 1e-5
