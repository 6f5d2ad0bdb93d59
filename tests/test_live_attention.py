"""Decode attention over the live part of the KV cache only (kernels/decode.py) and per-row cache
positions (KVCache.index as a [B] vector): values against the full-cache reference attention, and
whole rollouts (static sampler and continuous-batching engine) with the live path on and off."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.kernels import attention as KA
from tgpo_jax.kernels import decode
from tgpo_jax.kernels import reference as R
from tgpo_jax.models.decoder import Decoder
from tgpo_jax.models.kv_cache import KVCache, write_layer_slots, write_slots
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.rollout.decode_loop import rollout_fn
from tgpo_jax.rollout.engine import engine_fn
from tgpo_jax.rollout.sampling import SamplingParams


@pytest.mark.parametrize("S, block", [(600, 256), (512, 128), (300, 300)])
@pytest.mark.parametrize("T", [1, 3])
def test_live_attention_equals_the_full_cache(S, block, T):
    """Rows at different ends (one at the live bound), random pad slots, GQA; bounds on and off
    block boundaries, a last block that overlaps the one before (600 = 2 x 256 + 88)."""
    B, H, K, D = 3, 4, 2, 16
    ks = jax.random.split(jax.random.key(S + T), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(kk, (B, K, S, D)) for kk in ks[1:])
    for live in sorted({1 + T, 100, block, block + 1, S - 1, S}):
        end = np.array([live - T, max(0, live - 50 - T), (live - T) // 2])  # each row's first query slot
        q_slot = end[:, None] + np.arange(T)[None]
        real = np.random.default_rng(live).random((B, S)) > 0.2
        real[:, 0] = True
        allowed = (np.arange(S)[None, None] <= q_slot[:, :, None]) & real[:, None, :]
        ref = R.attention(q, k, v, jnp.asarray(allowed), kv_layout="bksd")
        got = decode.live_attention(q, k, v, jnp.asarray(allowed), jnp.asarray(live), block=block)
        assert np.abs(np.asarray(got - ref)).max() <= 1e-6, live


def test_cached_attention_takes_the_live_path_for_decode_over_a_long_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "live_attention", lambda *a, **kw: calls.append(a[-1]) or a[0])
    q, allowed = jnp.zeros((2, 1, 4, 16)), jnp.ones((2, 1, 2 * decode.BLOCK), bool)
    kv = jnp.zeros((2, 2, 2 * decode.BLOCK, 16))
    KA.cached_attention(q, kv, kv, allowed, jnp.asarray(7))
    assert len(calls) == 1
    KA.cached_attention(q, kv[:, :, :100], kv[:, :, :100], allowed[..., :100], jnp.asarray(7))  # short cache
    KA.cached_attention(jnp.zeros((2, 64, 4, 16)), kv, kv, jnp.ones((2, 64, 2 * decode.BLOCK), bool), 7)  # prefill
    assert len(calls) == 1


def test_per_row_writes_land_at_each_rows_slot_and_drop_past_the_end():
    cfg = tiny_config("qwen2")
    B, S, T = 3, 10, 2
    cache = KVCache.init(cfg, B, S)
    new = jnp.arange(B * T * cfg.num_kv_heads * cfg.head_dim, dtype=jnp.float32).reshape(B, T, cfg.num_kv_heads, -1)
    index = jnp.asarray([0, 4, 9])  # row 2: its second token falls past the end and is dropped
    k = write_slots(cache.k[0], new, index)
    for b, i in enumerate([0, 4, 9]):
        for t in range(T):
            if i + t < S:
                np.testing.assert_array_equal(np.asarray(k[b, :, i + t]), np.asarray(new[b, t]))
    assert int((np.asarray(k) != 0).any(axis=(1, 3)).sum()) == 5  # 2 + 2 + 1 slots written
    stacked = jnp.zeros((cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim))
    all_layers, layer1 = write_layer_slots(stacked, new, jnp.asarray(1), index)
    np.testing.assert_array_equal(np.asarray(layer1), np.asarray(k))
    assert not np.asarray(all_layers[0]).any()
    mask_BS, allowed = KVCache(cache.k, cache.v, cache.mask_BS, index).allowed_BTS(jnp.ones((B, T), jnp.int32))
    assert np.asarray(mask_BS).sum() == 5
    assert np.asarray(allowed[1, 1]).tolist() == [False] * 4 + [True, True] + [False] * 4


def _sampler(kind: str, params: SamplingParams):
    """A fresh jit (traced anew: decode.BLOCK is read at trace time)."""
    fn = functools.partial(rollout_fn, params=params, stop_ids=(3,))
    if kind == "engine":
        fn = functools.partial(engine_fn, params=params, stop_ids=(3,), slots=3)
    return jax.jit(fn, static_argnums=0)


@pytest.mark.parametrize("kind", ["static", "engine"])
def test_rollouts_with_the_live_path_equal_the_full_cache(kind, monkeypatch):
    """A cache of 8 + 600 slots: decode steps take the live path; forcing the full-cache reference
    (a block larger than any cache) gives the same greedy tokens and the same log-probs (1e-5)."""
    cfg = tiny_config("qwen2", tie_word_embeddings=False, cache_layers="unroll")
    model = nnx.split(Decoder(cfg, nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    mask = (np.arange(8)[None] >= np.array([[0], [3], [5]])).astype(np.int32)
    prompts = ((rng.integers(1, cfg.vocab_size, mask.shape) * mask).astype(np.int32), mask)
    params = SamplingParams(temperature=0.0, max_new_tokens=600, n=2)
    live = [np.asarray(x) for x in _sampler(kind, params)(*model, *prompts, jax.random.key(0))]
    monkeypatch.setattr(decode, "BLOCK", 10**6)
    full = [np.asarray(x) for x in _sampler(kind, params)(*model, *prompts, jax.random.key(0))]
    for a, b in zip(live[:2] + live[3:], full[:2] + full[3:]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(live[2], full[2], atol=1e-5)
    assert live[3].max() > 2 * 256  # some row decoded past two blocks of the cache
