"""Decode attention over a paged KV cache (kernels/paged.py): the XLA block path and jax's Pallas TPU
`paged_attention` kernel (run here in interpret mode) against the dense reference attention over
each row's tokens, collected from the pool page by page in numpy; ragged lengths (1 token, a
length on and off page and block boundaries, an empty row), grouped-query heads, shuffled pages,
fp32 and bf16; the per-row writes; the 8-device mesh under shard_map; the `auto` choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgpo_jax.kernels import paged
from tgpo_jax.kernels import reference as R
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
from tgpo_jax.sharding.rules import ActivationSharding


def _pool(N, H, K, D, page_size, M, lengths, dtype=jnp.float32, seed=0, pages=None):
    """q [N, H, D], k/v pools [K, P, page_size, D], a table whose rows own disjoint pages in a
    shuffled order (page 0 left out: the trash page), and the lengths."""
    pages = pages or N * M + 1
    rng = np.random.default_rng(seed)
    table = rng.permutation(np.arange(1, pages))[: N * M].reshape(N, M).astype(np.int32)
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (N, H, D)).astype(dtype)
    k, v = (jax.random.normal(kk, (K, pages, page_size, D)).astype(dtype) for kk in ks[1:])
    return q, k, v, jnp.asarray(table), jnp.asarray(np.asarray(lengths, np.int32))


def _dense_reference(q, k, v, table, lengths):
    """The reference attention (kernels.reference) over each row's tokens [0, length), gathered
    one token at a time from (table[n, j // page_size], j % page_size)."""
    k, v, table, lengths = (np.asarray(x) for x in (k, v, table, lengths))
    N, M = table.shape
    S = k.shape[2]
    dense_k = np.zeros((N, k.shape[0], M * S, k.shape[3]), k.dtype)
    dense_v = np.zeros_like(dense_k)
    for n in range(N):
        for j in range(lengths[n]):
            dense_k[n, :, j] = k[:, table[n, j // S], j % S]
            dense_v[n, :, j] = v[:, table[n, j // S], j % S]
    allowed = (np.arange(M * S)[None, None, :] < lengths[:, None, None]).astype(bool)
    out = R.attention(q[:, None], jnp.asarray(dense_k), jnp.asarray(dense_v), jnp.asarray(allowed), kv_layout="bksd")
    return out[:, 0]


# lengths: 1 token; on a page boundary; mid-page; the table's full length; one more row mid-block
LENGTHS = (1, 8, 13, 32, 21)


@pytest.mark.parametrize("H, K", [(4, 2), (6, 1), (2, 2)])
@pytest.mark.parametrize("bp", [1, 2, 4])
def test_xla_paged_attention_equals_the_dense_reference(H, K, bp):
    q, k, v, table, lengths = _pool(5, H, K, 16, 8, 4, LENGTHS)
    got = jax.jit(paged.xla_attention, static_argnums=5)(q, k, v, lengths, table, bp)
    ref = _dense_reference(q, k, v, table, lengths)
    assert np.abs(np.asarray(got - ref)).max() <= 1e-6


def test_xla_paged_attention_reads_no_page_past_the_longest_row():
    """Pages beyond every row's length hold NaN: a path that read them would return NaN."""
    q, k, v, table, lengths = _pool(3, 4, 2, 16, 8, 6, (3, 9, 16))
    for j in range(2, 6):  # the longest row ends in page 1 of its table
        k = k.at[:, table[:, j]].set(jnp.nan)
        v = v.at[:, table[:, j]].set(jnp.nan)
    got = paged.xla_attention(q, k, v, lengths, table, 2)
    ref = _dense_reference(q, k, v, table, lengths)
    assert np.abs(np.asarray(got - ref)).max() <= 1e-6


def test_an_empty_row_attends_to_nothing_and_returns_zeros():
    q, k, v, table, lengths = _pool(2, 4, 2, 128, 16, 2, (0, 5))
    for fn in (paged.xla_attention, lambda *a: paged.pallas_attention(*a, interpret=True)):
        out = np.asarray(fn(q, k, v, lengths, table, 1))
        assert np.all(out[0] == 0) and np.all(np.isfinite(out[1]))


def _bf16_rounded(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("H, K, bp", [(4, 2, 1), (16, 2, 2), (2, 1, 4)])
def test_pallas_paged_attention_equals_the_reference_over_bf16_pages(H, K, bp):
    """fp32 queries and pages: the kernel casts the pages to bf16 before its matmuls, so it is held
    to the reference over the same pages rounded to bf16 (1e-5); 16 query heads per kv head is
    the kernel's other q layout (groups % 8 == 0)."""
    lengths = (1, 16, 13, 64, 33)
    q, k, v, table, lengths = _pool(5, H, K, 128, 16, 4, lengths, seed=1)
    got = paged.pallas_attention(q, k, v, lengths, table, bp, interpret=True)
    assert got.dtype == jnp.float32
    ref = _dense_reference(q, _bf16_rounded(k), _bf16_rounded(v), table, lengths)
    assert np.abs(np.asarray(got - ref)).max() <= 1e-5


def test_bf16_paged_attention_is_within_a_few_bf16_eps_of_fp32():
    """bf16 q and pages, both paths: within 4 bf16 epsilons (4 * 2^-8) of the largest value of the
    fp32 reference, as the project holds its other bf16 kernels."""
    q, k, v, table, lengths = _pool(5, 4, 2, 128, 16, 4, (1, 16, 13, 64, 33), seed=2)
    ref = np.asarray(_dense_reference(q, k, v, table, lengths))
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    xla = jax.jit(paged.xla_attention, static_argnums=5)  # as the decoder runs it: under jit
    for name, fn in (("xla", xla), ("pallas", lambda *a: paged.pallas_attention(*a, interpret=True))):
        out = fn(bf[0], bf[1], bf[2], lengths, table, 2)
        assert out.dtype == jnp.bfloat16
        err = np.abs(np.asarray(out.astype(jnp.float32)) - ref).max() / np.abs(ref).max()
        assert err <= 4 * 2.0**-8, name


def test_a_step_writes_each_rows_token_at_its_position_and_idle_rows_into_the_trash_page():
    N, K, D, S, M = 3, 2, 16, 8, 3
    q, k, v, table, _ = _pool(N, 4, K, D, S, M, (0, 0, 0))
    table = table.at[2].set(0)  # row 2 idle: every entry the trash page
    lengths = jnp.asarray([0, 11, 0], jnp.int32)
    new = jax.random.normal(jax.random.key(9), (N, K, D))
    out, k2, _ = paged.local_step(q, new, new, k, v, lengths, table, 0, impl="xla", interpret=True)
    np.testing.assert_array_equal(np.asarray(k2[:, table[0, 0], 0]), np.asarray(new[0]))
    np.testing.assert_array_equal(np.asarray(k2[:, table[1, 1], 3]), np.asarray(new[1]))  # 11 = 8 + 3
    np.testing.assert_array_equal(np.asarray(k2[:, 0, 0]), np.asarray(new[2]))
    changed = np.argwhere(np.any(np.asarray(k2 != k), axis=(0, 3)))
    assert sorted(map(tuple, changed)) == sorted([(int(table[0, 0]), 0), (int(table[1, 1]), 3), (0, 0)])
    # row 0 attends to its one new token: its output is that token's value, per query head's kv head
    np.testing.assert_allclose(np.asarray(out[0]), np.repeat(np.asarray(new[0]), 2, axis=0), atol=1e-6)


def test_a_stacked_pool_reads_the_layers_pages_through_offset_ids():
    q, k, v, table, lengths = _pool(3, 4, 2, 16, 8, 2, (3, 9, 16), pages=7)
    other = jax.random.normal(jax.random.key(3), k.shape)
    stacked_k, stacked_v = jnp.concatenate([other, k], 1), jnp.concatenate([other, v], 1)  # layer 1 at 7
    new = jnp.zeros((3, 2, 16))
    got, sk, _ = paged.local_step(q, new, new, stacked_k, stacked_v, lengths - 1, table, 7, impl="xla", interpret=True)
    ref, k1, _ = paged.local_step(q, new, new, k, v, lengths - 1, table, 0, impl="xla", interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(sk[:, 7:]), np.asarray(k1))
    np.testing.assert_array_equal(np.asarray(sk[:, :7]), np.asarray(other))


def _sharding(mesh_shape):
    mesh = build_mesh(MeshConfig.from_dict(mesh_shape), jax.devices()[:8])
    return ActivationSharding(mesh, ShardingRules())


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_under_shard_map_each_device_uses_its_own_page_group(impl):
    """8 rows over 4 batch shards (data 2 x fsdp 2) and kv heads over tensor 2: 4 page groups of 9
    pages per layer; the table holds group-local ids. Equals the same implementation's one-device
    step on the global pool (global id = group * 9 + local id)."""
    sh = _sharding({"data": 2, "fsdp": 2, "tensor": 2})
    N, H, K, D, S, M, Pl = 8, 4, 2, 128, 16, 2, 9
    lengths = jnp.asarray([1, 16, 5, 31, 0, 17, 2, 9], jnp.int32)
    rng = np.random.default_rng(0)
    local = np.stack([rng.permutation(np.arange(1, Pl))[:M] for _ in range(N)]).astype(np.int32)
    assert paged.page_groups(sh, N, 4 * Pl) == 4
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (N, H, D))
    k, v = (jax.random.normal(kk, (K, 4 * Pl, S, D)) for kk in ks[1:3])
    new_k, new_v = (jax.random.normal(kk, (N, K, D)) for kk in ks[3:])
    fn = jax.jit(lambda *a: paged.decode_step(*a, platform="cpu", sharding=sh, impl=impl))
    got = fn(q, new_k, new_v, k, v, lengths, jnp.asarray(local))
    glob = jnp.asarray(local + (np.arange(N) // 2 * Pl)[:, None])  # rows 2g, 2g + 1 are group g's
    ref = paged.local_step(q, new_k, new_v, k, v, lengths, glob, 0, impl=impl, interpret=True)
    assert np.abs(np.asarray(got[0] - ref[0])).max() <= 1e-6
    for a, b in zip(got[1:], ref[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_takes_the_kernel_for_bf16_tpu_caches_with_128_wide_heads_only():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert paged.resolve("auto", "tpu", 128, 16, bf16) == "pallas"
    assert paged.resolve("auto", "tpu", 128, 16, f32) == "xla"  # the kernel would round pages to bf16
    assert paged.resolve("auto", "tpu", 64, 16, bf16) == "xla"
    assert paged.resolve("auto", "tpu", 128, 8, bf16) == "xla"
    assert paged.resolve("auto", "cpu", 128, 16, bf16) == "xla"
    assert paged.resolve("auto", "gpu", 128, 16, bf16) == "xla"
    assert paged.resolve("pallas", "cpu", 128, 16, f32) == "pallas"
    with pytest.raises(ValueError, match="accepted: auto, pallas, xla"):
        paged.resolve("splash", "tpu", 128, 16, bf16)
    assert [paged.block_pages(m, 16) for m in (1, 7, 32, 72)] == [1, 7, 32, 24]
    assert [paged.block_pages(m, 128) for m in (72, 7)] == [4, 1]
