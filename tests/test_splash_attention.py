"""Splash attention (kernels/splash.py, the Pallas TPU kernel run here in interpret mode) and the
sequence-length path of sdpa / cudnn (kernels/lengths.py) against the full-score einsum reference
(`kernels.reference`): values and gradients on the real query rows with ragged left padding (and
trailing padding, and an almost empty row), grouped-query heads, fp32 and bf16, on one device and
under shard_map on an 8-device mesh for every way the rules can split query and kv heads; the
decoder's hidden states and parameter gradients; and the `auto` choice per platform."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.kernels import AttentionUnavailable, causal_attention, lengths, resolve, splash
from tgpo_jax.kernels import reference as R
from tgpo_jax.models.decoder import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
from tgpo_jax.sharding.rules import ActivationSharding


def _ragged_mask(B: int, T: int) -> np.ndarray:
    """Row 0 full; then left padding of several lengths, one with trailing padding too (a response
    that stopped early), and one row with a single real token."""
    mask = np.ones((B, T), np.int32)
    layouts = [(0, 0), (7, 0), (T // 3, 5), (T - 1, 0), (3, T // 4)]
    for b in range(B):
        lead, trail = layouts[b % len(layouts)]
        mask[b, :lead] = 0
        mask[b, T - trail :] = 0
    return mask


def _inputs(B, T, H, K, D, dtype=jnp.float32, seed=0):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D)).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, D)).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, D)).astype(dtype)
    mask = _ragged_mask(B, T)
    # cotangent on the real query rows only: pad rows' outputs are arbitrary (never read)
    w = jax.random.normal(kw, (B, T, H, D)) * mask[:, :, None, None]
    return q, k, v, mask, w


def _values_and_grads(fn, q, k, v, mask, w):
    m = jnp.asarray(mask)
    out = jax.jit(fn)(q, k, v, m)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, m).astype(jnp.float32) * w), argnums=(0, 1, 2)))(q, k, v)
    return out, grads


def _assert_equal_to_reference(fn, q, k, v, mask, w, val_tol=1e-6, grad_tol=1e-5):
    out, grads = _values_and_grads(fn, q, k, v, mask, w)
    ref, ref_grads = _values_and_grads(R.causal_attention, q, k, v, mask, w)
    real = mask.astype(bool)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert np.abs(np.asarray(out - ref))[real].max() <= val_tol
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and np.abs(np.asarray(g - r)).max() <= grad_tol


def _splash(q, k, v, m):
    return splash.causal_attention(q, k, v, m, interpret=True)


# ---------------------------------------------------------------- one device
@pytest.mark.parametrize(
    "B, T, H, K, D",
    [
        (5, 40, 4, 2, 16),  # one 128-block (padded from 40)
        (3, 200, 6, 1, 32),  # multi-query, one 256-block
        (2, 600, 4, 4, 16),  # 2 x 2 blocks of 512: the upper tile skipped, partial diagonal tiles
    ],
)
def test_splash_values_and_gradients_equal_einsum(B, T, H, K, D):
    _assert_equal_to_reference(_splash, *_inputs(B, T, H, K, D))


def test_splash_bf16_is_as_close_to_fp32_as_einsum_in_bf16():
    """bf16 inputs stay bf16; against the fp32 reference, splash in bf16 is within 4 bf16 epsilons
    (4 * 2^-8) of the largest value, as the einsum path in bf16 is (both accumulate in fp32)."""
    q, k, v, mask, w = _inputs(3, 160, 4, 2, 32)
    ref, ref_grads = _values_and_grads(R.causal_attention, q, k, v, mask, w)
    real = mask.astype(bool)
    tol = 4 * 2.0**-8
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    for fn in (_splash, R.causal_attention):
        out, grads = _values_and_grads(fn, *bf, mask, w)
        assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
        err = np.abs(np.asarray(out.astype(jnp.float32) - ref))[real].max() / np.abs(np.asarray(ref))[real].max()
        assert err <= tol, fn
        for g, r in zip(grads, ref_grads):
            assert float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max()) <= tol, fn


def test_splash_block_sizes_follow_the_sequence_length():
    assert [splash.block_size(t) for t in (1, 40, 128, 129, 300, 512, 600, 9216)] == [
        128,
        128,
        128,
        256,
        384,
        512,
        512,
        512,
    ]
    assert [splash.padded_length(t) for t in (40, 600, 9216)] == [128, 1024, 9216]


# ---------------------------------------------------------------- sequence lengths (sdpa / cudnn)
@pytest.mark.parametrize("H, K", [(4, 2), (4, 4), (6, 1)])
def test_lengths_path_equals_einsum_with_ragged_padding(H, K):
    """The rotate-to-lengths path that attn_impl "cudnn" runs on GPU, here through XLA's
    implementation of the same call (cuDNN needs a GPU)."""
    fn = lambda q, k, v, m: lengths.causal_attention(q, k, v, m, "xla")  # noqa: E731
    _assert_equal_to_reference(fn, *_inputs(5, 23, H, K, 8))


def test_cudnn_gets_lengths_and_no_mask(monkeypatch):
    """What a GPU run's attn_impl "cudnn" hands jax.nn.dot_product_attention: cuDNN forced, the
    real-token counts as query and key lengths, no mask or bias. The call is replayed through XLA's
    implementation here (no GPU), and its output equals the reference's."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, **kw):
        calls.append((bias, mask, kw))
        return original(q, k, v, bias, mask, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v, mask, w = _inputs(5, 24, 4, 2, 8, dtype=jnp.bfloat16)
    fn = lambda *a: causal_attention(*a, impl="cudnn", platform="gpu")  # noqa: E731
    out = fn(q, k, v, jnp.asarray(mask))
    (bias, m, kw), *_ = calls
    assert bias is None and m is None and kw["implementation"] == "cudnn" and kw["is_causal"] is True
    np.testing.assert_array_equal(np.asarray(kw["query_seq_lengths"]), mask.sum(1))
    np.testing.assert_array_equal(np.asarray(kw["key_value_seq_lengths"]), mask.sum(1))
    ref = lengths.causal_attention(q, k, v, jnp.asarray(mask), "xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


# ---------------------------------------------------------------- under shard_map on 8 devices
def _sharding(mesh_shape: dict, rules: dict | None = None) -> ActivationSharding:
    mesh = build_mesh(MeshConfig.from_dict(mesh_shape), jax.devices()[:8])
    return ActivationSharding(mesh, ShardingRules.from_dict(rules))


@pytest.mark.parametrize(
    "mesh_shape, rules, H, K",
    [
        ({"data": 8, "fsdp": 1, "tensor": 1}, None, 4, 2),  # rows only
        ({"data": 2, "fsdp": 2, "tensor": 2}, None, 8, 4),  # rows, and query and kv heads alike
        ({"data": 2, "fsdp": 1, "tensor": 4}, None, 4, 2),  # 1 query head per device, kv heads whole: a slice of 1
        ({"data": 4, "fsdp": 1, "tensor": 2}, {"act_kv_heads": None}, 8, 4),  # 4 query heads: a slice of 2 kv heads
        ({"data": 4, "fsdp": 1, "tensor": 2}, None, 6, 3),  # 3 query heads over 2 kv groups: kv heads gathered
    ],
)
def test_splash_under_shard_map_equals_einsum(mesh_shape, rules, H, K):
    sh = _sharding(mesh_shape, rules)
    q, k, v, mask, w = _inputs(8, 72, H, K, 16, seed=1)
    fn = lambda q, k, v, m: splash.causal_attention(q, k, v, m, sharding=sh, interpret=True)  # noqa: E731
    _assert_equal_to_reference(fn, q, k, v, mask, w)


def test_splash_refuses_a_sharded_sequence():
    sh = _sharding({"data": 2, "fsdp": 1, "tensor": 4}, {"seq": "tensor", "act_heads": None, "act_kv_heads": None})
    q, k, v, mask, _ = _inputs(2, 16, 4, 2, 16)
    with pytest.raises(ValueError, match="sequence is sharded over 'tensor'"):
        splash.causal_attention(q, k, v, jnp.asarray(mask), sharding=sh, interpret=True)


# ---------------------------------------------------------------- the decoder
@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_decoder_with_splash_equals_einsum(mesh_shape):
    """Hidden states (1e-5) and parameter gradients through the training recomputation, with the
    "attn_out" policy keeping splash's named residuals (1e-6 of each parameter's largest entry)."""
    cfg = tiny_config("qwen3", num_layers=2)
    B, T = 4, 48
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.asarray(_ragged_mask(B, T))
    w = jnp.asarray(rng.normal(size=(B, T, cfg.hidden_size)), jnp.float32) * mask[..., None]
    sh = None if mesh_shape is None else _sharding(mesh_shape)

    def run(impl):
        c = dataclasses.replace(cfg, attn_impl=impl, remat_policy="attn_out")
        graphdef, state = nnx.split(Decoder(c, nnx.Rngs(0), sharding=sh))

        def hidden(state):
            return nnx.merge(graphdef, state).hidden_states(tokens, left_pad_positions(mask), mask, remat=True)[0]

        h = jax.jit(hidden)(state)
        g = jax.jit(jax.grad(lambda s: jnp.sum(hidden(s) * w)))(state)
        return h, jax.tree.leaves(g)

    h_ref, g_ref = run("einsum")
    h, g = run("splash")
    assert np.abs(np.asarray(h - h_ref))[np.asarray(mask, bool)].max() <= 1e-5
    for a, b in zip(g, g_ref):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


# ---------------------------------------------------------------- the auto choice
def test_auto_picks_each_platforms_kernel_where_it_applies():
    q128, k128, q64 = (2, 256, 12, 128), (2, 256, 2, 128), (2, 256, 12, 64)
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert resolve("auto", "tpu", None, q128, k128, bf16) == "splash"
    assert resolve("auto", "tpu", None, q128, k128, f32) == "splash"
    assert resolve("auto", "tpu", None, q64, (2, 256, 2, 64), bf16) == "einsum"  # head_dim not 128-lane
    seq = _sharding({"data": 2, "fsdp": 1, "tensor": 4}, {"seq": "tensor", "act_heads": None, "act_kv_heads": None})
    assert resolve("auto", "tpu", seq, q128, k128, bf16) == "einsum"
    assert resolve("auto", "gpu", None, q128, k128, bf16) == "cudnn"
    assert resolve("auto", "gpu", None, q128, k128, f32) == "einsum"
    assert resolve("auto", "gpu", None, (2, 256, 12, 256), (2, 256, 2, 256), bf16) == "einsum"
    assert resolve("einsum", "tpu", None, q128, k128, bf16) == "einsum"


def test_an_explicit_kernel_that_cannot_run_says_why():
    q, k = (2, 256, 12, 128), (2, 256, 2, 128)
    with pytest.raises(AttentionUnavailable, match="attn_impl='cudnn': cuDNN attention needs a GPU mesh; .* cpu"):
        resolve("cudnn", "cpu", None, q, k, jnp.bfloat16)
    with pytest.raises(AttentionUnavailable, match="attn_impl='cudnn': .*bfloat16 or float16, got float32"):
        resolve("cudnn", "gpu", None, q, k, jnp.float32)
    seq = _sharding({"data": 2, "fsdp": 1, "tensor": 4}, {"seq": "tensor", "act_heads": None, "act_kv_heads": None})
    with pytest.raises(AttentionUnavailable, match="attn_impl='splash': the sequence is sharded"):
        resolve("splash", "tpu", seq, q, k, jnp.bfloat16)


def test_every_entry_point_offers_the_same_implementations():
    """The config's accepted values and `bench train-step --attn-impl` are the kernel module's list."""
    import argparse

    from tgpo_jax.bench.train_step_bench import add_arguments
    from tgpo_jax.kernels import IMPLS
    from tgpo_jax.models.runtime_options import ATTN_IMPLS

    p = argparse.ArgumentParser()
    add_arguments(p)
    (action,) = [a for a in p._actions if a.dest == "attn_impl"]
    assert tuple(action.choices) == IMPLS == ATTN_IMPLS
