"""ModelConfig.attn_impl="sdpa" (jax.nn.dot_product_attention, is_causal + padding mask) equals our
einsum attention: values and gradients at the layer, and the whole decoder's hidden states, with
GQA and left padding. On CPU the backend's choice is XLA; "cudnn" is GPU-only and is exercised by
`launch/gpu_bench_train_step.sh`."""

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


@pytest.mark.parametrize("H, K", [(4, 2), (4, 4), (6, 1)])
def test_layer_values_and_gradients(H, K):
    B, T, D = 2, 9, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, K, D))
    v = jax.random.normal(kv, (B, T, K, D))
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    allowed = _causal_allowed(jnp.asarray(mask))
    real = mask.astype(bool)  # pad query rows see no key: their unused output is arbitrary
    ref = L.attention(q, k, v, allowed)
    got = L.sdpa_attention(q, k, v, allowed, "xla")
    assert np.abs(np.asarray(ref - got))[real].max() <= 1e-6

    w = jax.random.normal(jax.random.key(1), ref.shape) * jnp.asarray(mask)[:, :, None, None]
    g_ref = jax.grad(lambda *a: jnp.sum(L.attention(*a, allowed) * w), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(lambda *a: jnp.sum(L.sdpa_attention(*a, allowed, "xla") * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_got):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def test_decoder_hidden_states_equal():
    cfg = tiny_config("qwen2")
    tokens = jax.random.randint(jax.random.key(2), (3, 11), 1, cfg.vocab_size)
    mask = jnp.ones((3, 11), jnp.int32).at[2, :4].set(0)
    pos = left_pad_positions(mask)
    h0, _ = Decoder(cfg, nnx.Rngs(0))(tokens, pos, mask)
    h1, _ = Decoder(dataclasses.replace(cfg, attn_impl="sdpa"), nnx.Rngs(0))(tokens, pos, mask)
    valid = np.asarray(mask, bool)
    assert np.abs(np.asarray(h0 - h1))[valid].max() <= 1e-5


def test_unknown_impl_rejected():
    with pytest.raises(ModelConfigError, match="attn_impl='flash'.*einsum, sdpa, cudnn"):
        dataclasses.replace(tiny_config("qwen2"), attn_impl="flash")
