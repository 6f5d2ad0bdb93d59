"""The fused CPU attention kernel (kernels/cpu.py, C++ through the XLA FFI) against our
einsum attention `kernels.reference` and autodiff of it: values and gradients on every row (GQA,
left padding, whole pad rows, lengths that are not a multiple of the kernel's 16-key chunks,
every supported head_dim), the decoder's hidden states, the remat contract, the selection rule
of attn_impl "auto", and clear errors where it cannot run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.jaxpr_helpers import iter_eqns
from tgpo_jax.kernels import cpu as CA
from tgpo_jax.kernels import reference as R
from tgpo_jax.models.decoder import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config

pytestmark = pytest.mark.skipif(
    CA.unavailable_reason() is not None, reason=f"fused CPU attention kernel unavailable: {CA.unavailable_reason()}"
)


def _inputs(B, T, H, K, D, seed=0):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, K, D))
    v = jax.random.normal(kv, (B, T, K, D))
    mask = np.ones((B, T), np.int32)
    if B > 1:
        mask[1, : min(3, T - 1)] = 0  # left padding
    if B > 2:
        mask[2, : T - 1] = 0  # one real token
    return q, k, v, mask, jax.random.normal(kw, (B, T, H, D))


def _reference(q, k, v, mask):
    """`R.attention` with a causal + key mask, and 0 on rows that may attend no key (the kernel's
    stated value there; the XLA paths average over masked keys on such rows)."""
    T = q.shape[1]
    allowed = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & jnp.asarray(mask, bool)[:, None, :]
    out = R.attention(q, k, v, allowed)
    return jnp.where(jnp.any(allowed, -1)[:, :, None, None], out, 0.0)


@pytest.mark.parametrize(
    "B, T, H, K, D",
    [(3, 13, 4, 2, 8), (3, 40, 4, 2, 16), (2, 33, 6, 2, 32), (2, 17, 2, 2, 64), (1, 5, 2, 1, 128), (3, 1, 2, 1, 16)],
)
def test_values_and_gradients_equal_einsum_attention_on_every_row(B, T, H, K, D):
    q, k, v, mask, w = _inputs(B, T, H, K, D)
    ref, got = _reference(q, k, v, mask), CA.causal_attention(q, k, v, jnp.asarray(mask))
    assert got.shape == ref.shape and got.dtype == jnp.float32
    assert np.abs(np.asarray(ref - got)).max() <= 1e-6
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, jnp.asarray(mask)) * w)  # noqa: E731
    g_ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(CA.causal_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_got):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def test_keys_a_row_may_not_read_get_zero_weight_at_any_score():
    """A later (or masked) key's score may exceed the row's max by any amount. Its weight must
    be exactly 0, never exp(overflow) * 0 = NaN. Row b of the batch puts key 1 at
    80 + 0.1 b above query 0's only allowed score (0), and so sweeps past exp's range at ~88.7.
    Key 0 is left padding in the odd rows, where query 1 then reads key 1 only."""
    B, T, D = 200, 2, 16
    excess = 80.0 + 0.1 * np.arange(B)
    q = np.zeros((B, T, 1, D), np.float32)
    k = np.zeros((B, T, 1, D), np.float32)
    q[:, 0, 0, 0] = 1.0
    k[:, 1, 0, 0] = excess * np.sqrt(D)  # score of (query 0, key 1) = excess
    v = np.random.default_rng(0).normal(size=(B, T, 1, D)).astype(np.float32)
    mask = np.ones((B, T), np.int32)
    mask[1::2, 0] = 0
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    got = CA.causal_attention(q, k, v, jnp.asarray(mask))
    assert np.isfinite(np.asarray(got)).all()
    assert np.abs(np.asarray(got - _reference(q, k, v, mask))).max() <= 1e-5
    w = jnp.ones(got.shape)
    grads = jax.grad(lambda q, k, v: jnp.sum(CA.causal_attention(q, k, v, jnp.asarray(mask)) * w), argnums=(0, 1, 2))(
        q, k, v
    )
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_large_scores_keep_values_and_gradients_finite_and_equal():
    B, T, H, K, D = 2, 20, 2, 1, 16
    q, k, v, mask, w = _inputs(B, T, H, K, D, seed=5)
    q = q * 30.0
    k = k.at[:, T // 2 :].multiply(30.0)  # later keys score far above the earlier ones
    ref, got = _reference(q, k, v, mask), CA.causal_attention(q, k, v, jnp.asarray(mask))
    assert np.isfinite(np.asarray(got)).all()
    assert np.abs(np.asarray(ref - got)).max() <= 1e-5
    g = jax.grad(lambda q, k, v: jnp.sum(CA.causal_attention(q, k, v, jnp.asarray(mask)) * w), argnums=(0, 1, 2))(
        q, k, v
    )
    assert all(np.isfinite(np.asarray(a)).all() for a in g)


def _numpy_attention(q, k, v, mask):
    """Causal grouped-query attention in float64 numpy, written from the definition: 0 on rows
    with no allowed key."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h // G].T / np.sqrt(D)
            allowed = np.tril(np.ones((T, T), bool)) & mask[b].astype(bool)[None, :]
            s = np.where(allowed, s, -np.inf)
            m = np.max(s, -1, keepdims=True)
            p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
            l = p.sum(-1, keepdims=True)
            out[b, :, h] = np.where(l > 0, p / np.where(l > 0, l, 1.0), 0.0) @ v[b, :, h // G]
    return out


def test_gradients_match_central_differences_of_a_float64_reference():
    """An independent check of the hand-written backward pass: d/dq, d/dk, d/dv of a weighted sum
    at random entries against central differences of a float64 numpy attention."""
    B, T, H, K, D = 3, 9, 2, 1, 8
    q, k, v, mask, w = _inputs(B, T, H, K, D, seed=3)
    grads = jax.grad(lambda q, k, v: jnp.sum(CA.causal_attention(q, k, v, jnp.asarray(mask)) * w), argnums=(0, 1, 2))(
        q, k, v
    )
    x64 = [np.asarray(a, np.float64) for a in (q, k, v)]
    w64 = np.asarray(w, np.float64)
    assert (
        np.abs(_numpy_attention(*x64, mask) - np.asarray(CA.causal_attention(q, k, v, jnp.asarray(mask)))).max() <= 1e-6
    )
    rng = np.random.default_rng(0)
    for arg, g in enumerate(grads):
        for _ in range(8):
            idx = tuple(rng.integers(0, n) for n in x64[arg].shape)
            plus, minus = [a.copy() for a in x64], [a.copy() for a in x64]
            plus[arg][idx] += 1e-6
            minus[arg][idx] -= 1e-6
            fd = (np.sum(_numpy_attention(*plus, mask) * w64) - np.sum(_numpy_attention(*minus, mask) * w64)) / 2e-6
            assert abs(fd - float(g[idx])) <= 1e-4 * max(1.0, abs(fd)), (arg, idx, fd, float(g[idx]))


def test_decoder_hidden_states_equal_the_default_kernel():
    cfg = tiny_config("qwen2")
    B, T, pad = 3, 21, 4
    tokens = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.vocab_size)
    mask = jnp.ones((B, T), jnp.int32).at[B - 1, :pad].set(0)
    pos = left_pad_positions(mask)
    h0, _ = Decoder(cfg, nnx.Rngs(0))(tokens, pos, mask)
    h1, _ = Decoder(dataclasses.replace(cfg, attn_impl="cpu"), nnx.Rngs(0))(tokens, pos, mask)
    valid = np.asarray(mask, bool)
    assert np.abs(np.asarray(h0 - h1))[valid].max() <= 1e-5


def _ffi_calls(fn, *args) -> list[str]:
    """Target names of the FFI calls in fn's jaxpr, sub-jaxprs (remat, scan, custom_vjp) included."""
    return [
        e.params["target_name"] for e in iter_eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "ffi_call"
    ]


@pytest.mark.parametrize("sharded", [False, True])
def test_backward_reruns_no_forward_kernel_under_attn_out_remat(sharded):
    """Under the decoder's "attn_out" remat policy the kernel's output and log-sum-exp are kept,
    so the gradient runs the forward kernel once and the backward kernel once, also per device
    under shard_map; saving nothing, the forward runs twice (the control)."""
    from jax.ad_checkpoint import checkpoint_policies

    from tgpo_jax.kernels.attention import _cpu_attention
    from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
    from tgpo_jax.sharding.rules import ActivationSharding

    q, k, v, mask, _ = _inputs(4, 12, 4, 2, 8)
    sh = None
    if sharded:
        sh = ActivationSharding(
            build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}), jax.devices()[:8]), ShardingRules()
        )
    f = lambda q, k, v: jnp.sum(jnp.sin(_cpu_attention(sh, q, k, v, jnp.asarray(mask))))  # noqa: E731
    grad = lambda fn: jax.grad(fn, argnums=(0, 1, 2))  # noqa: E731
    kept = jax.checkpoint(f, policy=checkpoint_policies.save_only_these_names("attn_out"))
    none = jax.checkpoint(f, policy=checkpoint_policies.nothing_saveable)
    assert sorted(_ffi_calls(grad(kept), q, k, v)) == [CA._BWD, CA._FWD]
    assert sorted(_ffi_calls(grad(none), q, k, v)) == [CA._BWD, CA._FWD, CA._FWD]
    for a, b in zip(grad(f)(q, k, v), grad(kept)(q, k, v)):
        assert np.abs(np.asarray(a - b)).max() <= 1e-6


def test_auto_selection_on_one_device_and_per_shard_on_a_mesh():
    """attn_impl "auto": the kernel in an unsharded forward, and on a multi-device CPU mesh under
    shard_map on each device's rows and heads (the FFI call sees the local shapes); the XLA path
    where the heads cannot be split alike or the sequence is sharded, and there "cpu" says why;
    "einsum" never."""
    from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
    from tgpo_jax.sharding.rules import ActivationSharding

    cfg = tiny_config("qwen2")  # 4 query heads, 2 kv heads of 16
    B, T = 4, 8
    tokens = jnp.ones((B, T), jnp.int32)
    mask = jnp.ones((B, T), jnp.int32)
    pos = left_pad_positions(mask)

    def q_shapes(impl, mesh_shape=None, rules=None):
        sh = (
            None
            if mesh_shape is None
            else ActivationSharding(
                build_mesh(MeshConfig.from_dict(mesh_shape), jax.devices()[:8]), ShardingRules.from_dict(rules)
            )
        )
        graph, state = nnx.split(Decoder(dataclasses.replace(cfg, attn_impl=impl), nnx.Rngs(0), sharding=sh))
        jaxpr = jax.make_jaxpr(lambda st: nnx.merge(graph, st).hidden_states(tokens, pos, mask)[0])(state).jaxpr
        return [
            (e.params["target_name"], e.invars[0].aval.shape)
            for e in iter_eqns(jaxpr)
            if e.primitive.name == "ffi_call"
        ]

    assert q_shapes("auto") == [(CA._FWD, (B, T, 4, 16))]
    assert q_shapes("einsum") == []
    assert q_shapes("auto", {"data": 2, "fsdp": 2, "tensor": 2}) == [(CA._FWD, (B // 4, T, 2, 16))]
    assert q_shapes("auto", {"data": 8, "fsdp": 1, "tensor": 1}) == [(CA._FWD, (B, T, 4, 16))]  # B % 8: rows replicated
    split_unlike = ({"data": 2, "fsdp": 1, "tensor": 4}, None)  # 4 query heads split 4 ways, 2 kv heads not
    seq_sharded = ({"data": 2, "fsdp": 1, "tensor": 4}, {"seq": "tensor", "act_heads": None, "act_kv_heads": None})
    for (mesh_shape, rules), why in ((split_unlike, "kv heads"), (seq_sharded, "sequence is sharded")):
        assert q_shapes("auto", mesh_shape, rules) == []
        with pytest.raises(CA.CpuKernelUnavailable, match=why):
            q_shapes("cpu", mesh_shape, rules)


def test_unsupported_inputs_raise_a_clear_error():
    q, k, v, mask, _ = _inputs(2, 8, 2, 1, 16)
    with pytest.raises(CA.CpuKernelUnavailable, match="fp32 only"):
        CA.causal_attention(q.astype(jnp.bfloat16), k, v, jnp.asarray(mask))
    q12, k12, v12, _, _ = _inputs(2, 8, 2, 1, 12)
    with pytest.raises(CA.CpuKernelUnavailable, match="head_dim in"):
        CA.causal_attention(q12, k12, v12, jnp.asarray(mask))
    with pytest.raises(ValueError, match="H % K == 0"):
        CA.causal_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), jnp.asarray(mask))
    cfg = dataclasses.replace(tiny_config("qwen2"), attn_impl="cpu", dtype="bfloat16")
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(CA.CpuKernelUnavailable, match="attn_impl='cpu': .*fp32 only"):
        Decoder(cfg, nnx.Rngs(0))(tokens, left_pad_positions(tokens), tokens)


def test_build_failure_names_the_compiler_and_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TGPO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(CA.CpuKernelUnavailable, match="no-such-compiler-xyz"):
        CA.build()
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(CA.CpuKernelUnavailable, match="cannot compile"):
        CA.build()
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("tmp*"))


def test_library_is_keyed_by_source_compiler_and_cpu(tmp_path, monkeypatch):
    """A -march=native build is reused only for the same source, flags, compiler, jax version and
    CPU (model and feature flags): a home directory shared by hosts with other CPUs gets its own."""
    monkeypatch.setenv("TGPO_KERNEL_CACHE", str(tmp_path))
    base = CA.library_path("/usr/bin/c++")
    assert base.parent == tmp_path and base == CA.library_path("/usr/bin/c++")
    assert CA.library_path("/usr/bin/clang++") != base
    monkeypatch.setattr(CA, "_cpu_model", lambda: "model name : other\nflags : sse2")
    assert CA.library_path("/usr/bin/c++") != base
