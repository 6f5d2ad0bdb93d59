"""The cache-free attention kernels equal our full-score einsum attention (`kernels.reference`):
values and gradients at the layer, and the whole decoder's hidden states, with GQA and left
padding. Query-blocked (ModelConfig.attn_query_block, fixed or auto) and
jax.nn.dot_product_attention with the padding as sequence lengths (attn_impl="sdpa"; on CPU the
backend's choice is XLA; "cudnn" runs the same code with cuDNN forced, GPU-only, exercised by
`launch/gpu_device_check.sh`). Splash attention: tests/test_splash_attention.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.jaxpr_helpers import iter_eqns
from tgpo_jax.kernels import MASK_VALUE, auto_query_block, lengths
from tgpo_jax.kernels import reference as R
from tgpo_jax.kernels.blocked import blocked_causal_attention
from tgpo_jax.models.config import ModelConfigError
from tgpo_jax.models.decoder import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config


def _assert_layer_equal(kernel, B, T, H, K, D):
    """kernel(q, k, v, key_mask) against `R.causal_attention`: values on real query rows within 1e-6,
    gradients of a padding-masked weighted sum within 1e-5. Row 1 is left-padded by 3."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, K, D))
    v = jax.random.normal(kv, (B, T, K, D))
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    key_mask = jnp.asarray(mask)
    # Pad query rows see no key at all: their (unused) output is arbitrary in both; compare real rows.
    real = mask.astype(bool)
    ref = R.causal_attention(q, k, v, key_mask)
    got = kernel(q, k, v, key_mask)
    assert np.abs(np.asarray(ref - got))[real].max() <= 1e-6

    w = jax.random.normal(jax.random.key(1), ref.shape) * jnp.asarray(mask)[:, :, None, None]
    g_ref = jax.grad(lambda *a: jnp.sum(R.causal_attention(*a, key_mask) * w), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(lambda *a: jnp.sum(kernel(*a, key_mask) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_got):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def _assert_decoder_equal(B, T, pad, seed, **cfg_changes):
    """The tiny decoder's hidden states with `cfg_changes` equal the default's (1e-5, real tokens);
    the last row is left-padded by `pad`."""
    cfg = tiny_config("qwen2")
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 1, cfg.vocab_size)
    mask = jnp.ones((B, T), jnp.int32).at[B - 1, :pad].set(0)
    pos = left_pad_positions(mask)
    h0, _ = Decoder(cfg, nnx.Rngs(0))(tokens, pos, mask)
    h1, _ = Decoder(dataclasses.replace(cfg, **cfg_changes), nnx.Rngs(0))(tokens, pos, mask)
    valid = np.asarray(mask, bool)
    assert np.abs(np.asarray(h0 - h1))[valid].max() <= 1e-5


# ---------------------------------------------------------------- query-blocked attention
@pytest.mark.parametrize("T, block", [(13, 4), (12, 6), (7, 1)])
def test_blocked_layer_values_and_gradients(T, block):
    _assert_layer_equal(lambda q, k, v, a: blocked_causal_attention(q, k, v, a, block), 2, T, 4, 2, 8)


def _autodiff_blocked(q, k, v, allowed, block):
    """Reference: `R.attention` per query block (keys up to the block's end), differentiated by
    autodiff. A fully masked query row (left padding) is uniform over its block's keys."""
    T = q.shape[1]
    return jnp.concatenate(
        [
            R.attention(
                q[:, t0 : t0 + block], k[:, : t0 + block], v[:, : t0 + block], allowed[:, t0 : t0 + block, : t0 + block]
            )
            for t0 in range(0, T, block)
        ],
        1,
    )


@pytest.mark.parametrize("T, block, H, K", [(13, 4, 4, 2), (12, 6, 2, 2), (9, 3, 6, 2)])
def test_blocked_custom_vjp_equals_autodiff_on_every_row(T, block, H, K):
    """The hand-written backward pass against autodiff of the same blocked forward, with a random
    cotangent on every row, fully masked pad rows included (1e-5, fp32)."""
    B, D = 3, 8
    kq, kk, kv, kg = jax.random.split(jax.random.key(4), 4)
    q, k, v = (
        jax.random.normal(kq, (B, T, H, D)),
        jax.random.normal(kk, (B, T, K, D)),
        jax.random.normal(kv, (B, T, K, D)),
    )
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    mask[2, : T - 2] = 0  # whole blocks of pad rows
    allowed = R.causal_allowed(jnp.asarray(mask))
    w = jax.random.normal(kg, (B, T, H, D))
    ref, got = _autodiff_blocked(q, k, v, allowed, block), blocked_causal_attention(q, k, v, jnp.asarray(mask), block)
    assert np.abs(np.asarray(ref - got)).max() <= 1e-6
    g_ref = jax.grad(lambda *a: jnp.sum(_autodiff_blocked(*a, allowed, block) * w), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(lambda *a: jnp.sum(blocked_causal_attention(*a, jnp.asarray(mask), block) * w), argnums=(0, 1, 2))(
        q, k, v
    )
    for a, b in zip(g_ref, g_got):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def test_blocked_backward_recomputes_no_forward_under_remat():
    """Under the decoder's "attn_out" remat policy the kernel's saved residuals (output, row max,
    1 / row sum) spare the backward pass a second attention forward: the gradient's jaxpr holds
    as many score-sized exponentials as without remat (one per block in the forward, one in the
    backward), and the gradients are equal."""
    from jax.ad_checkpoint import checkpoint_policies

    B, T, H, K, D, block = 2, 12, 4, 2, 8, 4
    q, k, v = (
        jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    )
    key_mask = jnp.ones((B, T), jnp.int32)
    f = lambda q, k, v: jnp.sum(jnp.sin(blocked_causal_attention(q, k, v, key_mask, block)))  # noqa: E731
    remat = jax.checkpoint(f, policy=checkpoint_policies.save_only_these_names("attn_out"))

    def exps(fn):  # score-sized exponentials in the gradient's jaxpr
        jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v)
        return sum(e.primitive.name == "exp" and e.outvars[0].aval.ndim == 5 for e in iter_eqns(jaxpr.jaxpr))

    n_blocks = T // block
    assert exps(f) == 2 * n_blocks
    assert exps(remat) == 2 * n_blocks
    # control: saving nothing, the backward recomputes the forward's exponentials too
    assert exps(jax.checkpoint(f, policy=checkpoint_policies.nothing_saveable)) == 3 * n_blocks
    for a, b in zip(jax.grad(f, argnums=(0, 1, 2))(q, k, v), jax.grad(remat, argnums=(0, 1, 2))(q, k, v)):
        assert np.abs(np.asarray(a - b)).max() <= 1e-6


def test_blocked_decoder_hidden_states_equal():
    _assert_decoder_equal(3, 11, 4, seed=2, attn_query_block=3)


def test_negative_block_rejected():
    with pytest.raises(ModelConfigError, match="attn_query_block"):
        dataclasses.replace(tiny_config("qwen2"), attn_query_block=-2)


def test_auto_query_block_choice():
    # explicit settings are kept; auto blocks only on CPU, and never more than 16 blocks
    assert auto_query_block(0, 320, "cpu") == 0 and auto_query_block(64, 320, "gpu") == 64
    assert auto_query_block(-1, 320, "gpu") == 0 and auto_query_block(-1, 320, "tpu") == 0
    assert auto_query_block(-1, 64, "cpu") == 0
    assert auto_query_block(-1, 112, "cpu") == 32 and auto_query_block(-1, 320, "cpu") == 32
    assert auto_query_block(-1, 4160, "cpu") == 260


def test_auto_decoder_equals_full_scores():
    _assert_decoder_equal(2, 100, 9, seed=3, attn_query_block=-1)


# ---------------------------------------------------------------- jax.nn.dot_product_attention
@pytest.mark.parametrize("H, K", [(4, 2), (4, 4), (6, 1)])
def test_sdpa_layer_values_and_gradients(H, K):
    _assert_layer_equal(lambda q, k, v, m: lengths.causal_attention(q, k, v, m, "xla"), 2, 9, H, K, 8)


def test_sdpa_decoder_hidden_states_equal():
    _assert_decoder_equal(3, 11, 4, seed=2, attn_impl="sdpa")


def test_unknown_impl_rejected():
    with pytest.raises(ModelConfigError, match="attn_impl='flash'.*einsum, sdpa, cudnn, cpu, splash, auto"):
        dataclasses.replace(tiny_config("qwen2"), attn_impl="flash")


@pytest.mark.parametrize("block", [0, 8])
def test_remat_policies_give_the_no_remat_gradients(block):
    """Training's layer recomputation (keeping nothing, or each layer's attention output) changes
    what is stored, never the values: parameter gradients equal those without recomputation."""
    cfg = tiny_config("qwen3", num_layers=3, attn_query_block=block)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (3, 24)), jnp.int32)
    mask = jnp.asarray(np.arange(24)[None] >= np.array([[0], [5], [11]]), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(3, 24, cfg.hidden_size)), jnp.float32)

    def grads(policy, remat):
        graphdef, state = nnx.split(Decoder(dataclasses.replace(cfg, remat_policy=policy), nnx.Rngs(0)))

        def loss(state):
            h, _ = nnx.merge(graphdef, state).hidden_states(tokens, left_pad_positions(mask), mask, remat=remat)
            return jnp.sum(h * weights * mask[..., None])

        return jax.tree.leaves(jax.jit(jax.grad(loss))(state))

    # Recomputation reorders fp32 sums (fusions differ), so gradients agree to fp32 rounding at
    # their own scale (|g| up to ~100 here): 1e-6 of the largest entry per parameter.
    ref = grads("nothing", False)
    for policy in ("nothing", "attn_out", "auto"):
        for a, b in zip(grads(policy, True), ref):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), (policy, np.abs(a - b).max(), np.abs(b).max())
    with pytest.raises(ModelConfigError, match=r"remat_policy='dots'; accepted: auto, nothing, attn_out"):
        tiny_config("qwen2", remat_policy="dots")


def test_blocked_bf16_within_bf16_precision_of_fp32():
    """bf16 inputs stay bf16 (output and gradients), and agree with the fp32 kernel to within 4
    bf16 epsilons (4 * 2^-8) of the largest value: the kernel accumulates in fp32."""
    B, T, H, K, D, block = 2, 12, 4, 2, 8, 4
    q, k, v = (
        jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    )
    w = jax.random.normal(jax.random.key(9), (B, T, H, D))
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    allowed = jnp.asarray(mask)  # the key mask
    tol = 4 * 2.0**-8

    def close(a, ref):
        return float(jnp.abs(a.astype(jnp.float32) - ref).max() / jnp.abs(ref).max()) <= tol

    loss = lambda *a: jnp.sum(blocked_causal_attention(*a, allowed, block).astype(jnp.float32) * w)  # noqa: E731
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out16, out32 = blocked_causal_attention(*bf, allowed, block), blocked_causal_attention(q, k, v, allowed, block)
    assert out16.dtype == jnp.bfloat16 and close(out16, out32)
    g16, g32 = jax.grad(loss, argnums=(0, 1, 2))(*bf), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 and close(g, r) for g, r in zip(g16, g32))


def test_blocked_mask_is_not_hoisted_out_of_the_layer_loop(monkeypatch):
    """XLA:CPU's loop-invariant code motion hoisted the causal mask and the MASK_VALUE fill out of
    the decoder's layer scan as materialised score-sized arrays (a pred mask and a broadcast f32
    constant per query block) that every layer's select read back from memory. In the compiled
    train step, no top-level fusion may produce such an array. Control: the same scores without
    the barrier in `_masked_scores` do produce them."""
    import re

    from tgpo_jax.bench import train_step_workload as tb
    from tgpo_jax.kernels import blocked as BA
    from tgpo_jax.objectives.batch import Batch
    from tgpo_jax.objectives.registry import ObjectiveConfig
    from tgpo_jax.train.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

    s = tb.Settings(
        model="demo",
        batch=8,
        prompt_len=32,
        response_len=64,
        micro_batch=4,
        chunk=16,
        peer=False,
        old_logp="zeros",
        attn_impl="einsum",
    )  # "auto" would take the fused CPU kernel
    cfg = tb.model_config(s)
    assert auto_query_block(cfg.attn_query_block, s.seq_len, "cpu") == 32  # the blocked kernel is in use
    mb = Batch.from_arrays({k: jnp.asarray(v) for k, v in tb.make_minibatch(s, cfg.vocab_size).items()})
    opt = make_optimizer(OptimizerConfig())
    B, K, G = s.micro_batch, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    # a top-level (unfused) fusion producing a [B, K, G, t, s] pred, or a broadcast f32 of that shape
    hoisted = re.compile(
        rf"%(\S+) = (pred\[{B},{K},{G},\d+,\d+\]\S* fusion|f32\[{B},{K},{G},\d+,\d+\]\S* fusion"
        rf"\(%constant)"
    )

    def score_sized_constants():
        gd, state = init_train_state(tb.init_model(cfg, 0), opt)
        step = make_train_step(
            gd, opt, obj_cfg=ObjectiveConfig(name="tgpo_reg"), micro_batch=s.micro_batch, chunk=s.chunk
        )
        return hoisted.findall(step.lower(state, mb, 1).compile().as_text())

    assert score_sized_constants() == []

    def untied(q, k, key_mask, t0, t1):  # _masked_scores without the barrier
        sc = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, t0:t1], k[:, :, :t1], preferred_element_type=jnp.float32)
        causal = jnp.arange(t1)[None, :] <= jnp.arange(t0, t1)[:, None]
        allowed = (causal[None] & key_mask[:, None, :t1])[:, None, None]
        return jnp.where(allowed, sc / np.sqrt(q.shape[-1]), MASK_VALUE), allowed

    monkeypatch.setattr(BA, "_masked_scores", untied)
    assert score_sized_constants(), "control: the unbarriered mask is no longer hoisted; the check above tests nothing"
