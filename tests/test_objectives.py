"""Objectives of TGPO, its variants and baselines (../shared/TGPO_SPEC.md sections 1-4).

Every expectation here is computed independently of the code under test: numbers written out by
hand, or plain numpy formulas restating the spec. Gradients are checked in float64 against central
finite differences (or, for the k1 estimator whose value contains a stop_gradient, against the hand
formula of its gradient).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgpo_jax.models.layers import MASK_VALUE
from tgpo_jax.objectives import losses as L
from tgpo_jax.objectives.advantages import grpo_advantages, teacher_coef
from tgpo_jax.objectives.batch import SCORED_FIELDS, Batch
from tgpo_jax.objectives.logprobs import StudentStats, student_stats
from tgpo_jax.objectives.registry import OBJECTIVES, ObjectiveConfig, get_objective

FD_EPS = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-9


# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def x64():
    """float64 inside the test only; restored afterwards."""
    with jax.enable_x64(True):
        yield


def fd_grad(f, x, eps=FD_EPS):
    """Central finite differences of a scalar function f at x (numpy float64)."""
    f = jax.jit(f)
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (float(f(jnp.asarray(xp))) - float(f(jnp.asarray(xm)))) / (2 * eps)
    return g


def ad_grad(f, x):
    g = jax.grad(f)(jnp.asarray(np.asarray(x, np.float64)))
    assert g.dtype == jnp.float64
    return np.asarray(g)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def stats_from_logits(z_BTV, y_BT, ids_BTK):
    """A model-free StudentStats: the 'student' is a table of logits."""
    lp = jax.nn.log_softmax(z_BTV, -1)
    return StudentStats(
        jnp.take_along_axis(lp, y_BT[..., None], -1)[..., 0],
        jnp.take_along_axis(lp, ids_BTK, -1),
        -jnp.sum(jnp.exp(lp) * lp, -1),
    )


def make_batch(rng, B=2, T=3, V=6, K=3, adv_B=None, float_dtype=np.float32):
    """A Batch with every optional field set (batch.py), probabilities consistent with the given
    random 'old student' / 'teacher' logit tables."""
    z_old = rng.normal(size=(B, T, V))
    z_t = rng.normal(size=(B, T, V)) * 2
    lp_old, lp_t = np_log_softmax(z_old), np_log_softmax(z_t)
    y = rng.integers(0, V, size=(B, T))
    mask = np.ones((B, T))
    mask[1, -1] = 0
    t_ids = lp_t.argmax(-1)
    valid = np.ones((B, T))
    valid[0, 1] = 0
    t_topk = np.argsort(-lp_t, -1)[..., :K]
    s_topk = np.argsort(-lp_old, -1)[..., :K]
    g = lambda a, i: np.take_along_axis(a, i, -1)  # noqa: E731
    f = lambda a: jnp.asarray(a, float_dtype)  # noqa: E731
    batch = Batch(
        prompt_BP=jnp.ones((B, 1), jnp.int32),  # the terms never read the prompt
        prompt_mask_BP=jnp.ones((B, 1), jnp.int32),
        tokens_BT=jnp.asarray(y, jnp.int32),
        mask_BT=f(mask),
        adv_B=f(np.array([1.0, -0.5]) if adv_B is None else adv_B),
        old_logp_BT=f(g(lp_old, y[..., None])[..., 0]),
        teacher_ids_BT=jnp.asarray(t_ids, jnp.int32),
        teacher_valid_BT=f(valid),
        teacher_logp_BT=f(g(lp_t, y[..., None])[..., 0]),
        old_p_teacher_BT=f(np.exp(g(lp_old, t_ids[..., None])[..., 0]) * valid),
        teacher_topk_ids_BTK=jnp.asarray(t_topk, jnp.int32),
        teacher_topk_logp_BTK=f(g(lp_t, t_topk)),
        student_topk_ids_BTK=jnp.asarray(s_topk, jnp.int32),
        old_topk_logp_BTK=f(g(lp_old, s_topk)),
        teacher_at_student_topk_BTK=f(g(lp_t, s_topk)),
        offpolicy_B=jnp.asarray([True, False]),
    )
    return batch, z_old, y


# ------------------------------------------------------------------------------------------------
# 1. loss functions on hand-built tensors


def test_pg_clip_symmetric_eps_cases():
    # columns: A>0 ratio 1.5 (clipped at 1.2) | A>0 ratio 1.1 (inside) | A>0 ratio 0.5 (unclipped branch)
    # row 2:   A<0 ratio 0.5 (clipped at 0.8) | A<0 ratio 1.5 (unclipped branch) | A=0
    adv = jnp.array([[1.5, 1.5, 1.5], [-2.0, -2.0, 0.0]])
    ratio = np.array([[1.5, 1.1, 0.5], [0.5, 1.5, 3.0]])
    old = np.array([[-1.0, -2.0, -0.3], [-0.7, -1.2, -2.5]])
    logp = old + np.log(ratio)
    loss, r, clipped = L.pg_clip(adv, jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), 0.2, 0.2)
    expected = np.array([[-1.5 * 1.2, -1.5 * 1.1, -1.5 * 0.5], [2.0 * 0.8, 2.0 * 1.5, 0.0]])
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r, ratio, rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[1, 0, 0], [1, 0, 0]])


def test_pg_clip_asymmetric_eps():
    # eps_low = 0.2, eps_high = 0.28 (clip range [0.8, 1.28])
    adv = jnp.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    ratio = np.array([[1.25, 1.5, 0.7], [0.75, 0.9, 1.5]])
    old = np.full((2, 3), -1.0)
    loss, _, clipped = L.pg_clip(
        adv, jnp.asarray(old + np.log(ratio), jnp.float32), jnp.asarray(old, jnp.float32), 0.2, 0.28
    )
    expected = np.array(
        [
            [
                -1.25,  # inside [0.8, 1.28]: a symmetric 0.2 would have clipped it to -1.2
                -1.28,  # A>0 clipped at 1 + eps_high
                -0.7,
            ],  # A>0 below the range: unclipped branch is the max
            [
                0.8,  # A<0 clipped at 1 - eps_low
                0.9,  # inside
                1.5,
            ],
        ]
    )  # A<0 above the range: unclipped branch is the max
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[0, 1, 0], [1, 0, 0]])


def test_entropy_bonus():
    H = jnp.array([[0.5, 1.0, 2.0], [0.0, 3.0, 4.0]])
    np.testing.assert_allclose(L.entropy_bonus(H, 0.001), -0.001 * np.asarray(H), rtol=1e-7)


def test_teacher_ce_masks_invalid_teacher_id():
    logp = jnp.array([[-0.5, -2.0, -50.0], [-0.1, -3.0, -7.0]])
    valid = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    np.testing.assert_allclose(L.teacher_ce(logp, valid), [[0.5, 2.0, 0.0], [0.1, 0.0, 7.0]], rtol=1e-7)


def test_tgpo_adv_advantage_adds_probability_not_logprob():
    adv = jnp.array([[0.5, -1.0, 0.0]])
    p_old = np.array([[0.25, 0.6, 0.9]])
    valid = jnp.array([[1.0, 1.0, 0.0]])
    out = np.asarray(L.tgpo_adv_advantage(adv, jnp.asarray(p_old, jnp.float32), valid, 0.02))
    np.testing.assert_allclose(out, [[0.5 + 0.02 * 0.25, -1.0 + 0.02 * 0.6, 0.0]], rtol=1e-6)
    with_logp = np.array([[0.5 + 0.02 * math.log(0.25), -1.0 + 0.02 * math.log(0.6), 0.0]])
    assert np.abs(out - with_logp)[0, :2].min() > 1e-3  # the log-prob reading is clearly different
    # no gradient flows into the old-student probability
    g = jax.grad(lambda p: L.tgpo_adv_advantage(adv, p, valid, 0.02).sum())(jnp.asarray(p_old, jnp.float32))
    np.testing.assert_array_equal(g, 0.0)


def _fkl_ref(pt_unnorm, p_student, renorm):
    pt = np.asarray(pt_unnorm) / np.sum(pt_unnorm)
    q = np.asarray(p_student) / np.sum(p_student) if renorm else np.asarray(p_student)
    return float(np.sum(pt * (np.log(pt) - np.log(q))))


def test_forward_topk_kl_student_renorm_vs_full_vocab():
    t = np.log([0.5, 0.3, 0.1])  # teacher top-3 (mass 0.9) -> renormalised 5/9, 3/9, 1/9
    s = np.log([0.2, 0.1, 0.05])  # student full-vocab probabilities at those ids (mass 0.35)
    t_ = jnp.asarray(t, jnp.float32)[None, None]
    s_ = jnp.asarray(s, jnp.float32)[None, None]
    ren = float(L.forward_topk_kl(s_, t_, True)[0, 0])
    full = float(L.forward_topk_kl(s_, t_, False)[0, 0])
    pt = np.array([5, 3, 1]) / 9
    exp_ren = sum(pt[i] * (math.log(pt[i]) - math.log([0.2, 0.1, 0.05][i] / 0.35)) for i in range(3))
    exp_full = sum(pt[i] * (math.log(pt[i]) - math.log([0.2, 0.1, 0.05][i])) for i in range(3))
    np.testing.assert_allclose(ren, exp_ren, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full, exp_full, rtol=1e-5, atol=1e-6)
    assert full - ren == pytest.approx(-math.log(0.35), rel=1e-5)  # differ by -log(student mass on S)


@pytest.mark.parametrize("renorm", [True, False])
def test_forward_topk_kl_masked_slot_leaves_support(renorm):
    # slot 1 is an id the student cannot decode: the score step wrote MASK_VALUE as its teacher
    # log-prob; whatever the student's value there, it must not count.
    t = jnp.array([[[math.log(0.5), MASK_VALUE, math.log(0.1)]]], jnp.float32)
    out = []
    for s_mid in (0.4, 0.01):
        s = jnp.asarray(np.log([[[0.2, s_mid, 0.05]]]), jnp.float32)
        out.append(float(L.forward_topk_kl(s, t, renorm)[0, 0]))
    expected = _fkl_ref([0.5, 0.1], [0.2, 0.05], renorm)  # support {0, 2}: pT = 5/6, 1/6
    np.testing.assert_allclose(out, [expected, expected], rtol=1e-5, atol=1e-6)


def test_forward_topk_kl_fully_masked_row_is_zero_and_finite_grad():
    t = jnp.full((1, 1, 3), MASK_VALUE, jnp.float32)
    s = jnp.asarray(np.log([[[0.2, 0.1, 0.05]]]), jnp.float32)
    for renorm in (True, False):
        assert float(L.forward_topk_kl(s, t, renorm)[0, 0]) == 0.0
        g = jax.grad(lambda x: L.forward_topk_kl(x, t, renorm).sum())(s)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0.0)


def test_rkl_advantage():
    t = jnp.array([[-1.0, -3.0]])
    o = jnp.array([[-2.0, -0.5]])
    np.testing.assert_allclose(L.rkl_advantage(t, o), [[1.0, -2.5]])


def test_rkl_centered_advantage_uses_true_probabilities():
    p_old_topk = np.array([0.5, 0.2, 0.1])  # mass 0.8: renormalising would change the baseline
    pt_topk = np.array([0.3, 0.3, 0.2])
    t_y, o_y = math.log(0.3), math.log(0.5)
    out = float(
        L.rkl_centered_advantage(
            jnp.array([[t_y]]),
            jnp.array([[o_y]]),
            jnp.asarray(np.log(p_old_topk), jnp.float32)[None, None],
            jnp.asarray(np.log(pt_topk), jnp.float32)[None, None],
        )[0, 0]
    )
    baseline = (
        0.5 * (math.log(0.3) - math.log(0.5))
        + 0.2 * (math.log(0.3) - math.log(0.2))
        + 0.1 * (math.log(0.2) - math.log(0.1))
    )
    expected = (t_y - o_y) - baseline
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    q = p_old_topk / 0.8
    renorm_baseline = float(np.sum(q * (np.log(pt_topk) - np.log(p_old_topk))))
    assert abs(out - ((t_y - o_y) - renorm_baseline)) > 1e-2


def test_rkl_loss_values():
    logp = jnp.array([[-1.0, -0.5]])
    t = jnp.array([[-2.0, -0.1]])  # logr = [1.0, -0.4]
    np.testing.assert_allclose(L.rkl_loss(logp, t, "k1"), [[1.0 * -1.0, -0.4 * -0.5]], rtol=1e-6)
    np.testing.assert_allclose(L.rkl_loss(logp, t, "k2"), [[0.5, 0.08]], rtol=1e-6)
    np.testing.assert_allclose(
        L.rkl_loss(logp, t, "k3"), [[math.exp(-1.0) - 1.0 + 1.0, math.exp(0.4) - 1.0 - 0.4]], rtol=1e-5
    )
    with pytest.raises(ValueError, match="k1, k2, k3"):
        L.rkl_loss(logp, t, "k4")


def test_rkl_dist_both_renormalised():
    s = np.log([0.4, 0.2, 0.1])  # student top-3, mass 0.7
    t = np.log([0.1, 0.3, 0.2])  # teacher at those ids, mass 0.6
    out = float(L.rkl_dist(jnp.asarray(s, jnp.float32)[None, None], jnp.asarray(t, jnp.float32)[None, None])[0, 0])
    q = np.array([4, 2, 1]) / 7
    pt = np.array([1, 3, 2]) / 6
    np.testing.assert_allclose(out, float(np.sum(q * (np.log(q) - np.log(pt)))), rtol=1e-5)


def test_kdrl_term():
    logp = jnp.array([[-1.0, -0.2, -4.0]])
    t = jnp.array([[-0.5, -0.2, -1.0]])
    np.testing.assert_allclose(L.kdrl_term(logp, t), [[0.125, 0.0, 4.5]], rtol=1e-6)


def test_kdrl_k1_term_is_minus_logratio():
    """The authors' latest KDRL code: loss = pg - beta * token_mean(log pi(y_t) - log pi_T(y_t))."""
    logp = jnp.array([[-1.0, -0.2, -4.0]])
    t = jnp.array([[-0.5, -0.2, -1.0]])
    np.testing.assert_allclose(L.kdrl_k1_term(logp, t), [[0.5, 0.0, 3.0]], rtol=1e-6)


def test_luffy_pg_offpolicy_and_onpolicy_rows():
    adv = jnp.array([[1.0, -1.0], [2.0, -1.0]])
    logp = np.log([[0.3, 0.05], [0.9, 0.2]])
    old = np.log([[0.6, 0.5], [0.3, 0.8]])
    out = L.luffy_pg(adv, jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), jnp.array([True, False]), 0.1)
    expected = [
        [-1.0 * 0.3 / 0.4, 1.0 * 0.05 / 0.15],  # off-policy: -A p/(p+0.1), old_logp unused
        [-2.0 * 3.0, 1.0 * 0.25],
    ]  # on-policy: -A ratio; ratio 3 is NOT clipped to 1.2
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_aggregate():
    loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(L.aggregate(loss, mask, 3.0)) == pytest.approx(7.0 / 3.0)
    assert float(L.aggregate(loss, mask, 6.0)) == pytest.approx(7.0 / 6.0)  # e.g. LUFFY's B * T_max
    assert float(L.aggregate(loss, mask, 0.0)) == pytest.approx(7.0)  # empty micro-batch: no 0-division
    assert float(L.aggregate(loss, jnp.zeros_like(mask), 0.0)) == 0.0


def test_step_denominators():
    from tgpo_jax.train.step import _denominators

    mask = jnp.array([[[1, 1, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 0]]])  # [M=2, b=2, T=3]: 3 and 5 tokens
    np.testing.assert_allclose(_denominators(mask, ObjectiveConfig(name="grpo")), [8.0, 8.0])
    np.testing.assert_allclose(_denominators(mask, ObjectiveConfig(name="grpo", loss_agg="microbatch_sum")), [3.0, 5.0])
    np.testing.assert_allclose(_denominators(mask, ObjectiveConfig(name="luffy")), [12.0, 12.0])


# ------------------------------------------------------------------------------------------------
# 2. gradients (float64)


def test_pg_clip_grad_unclipped_and_clipped(x64):
    adv = np.array([[1.5, 1.5, 1.5, -2.0], [-2.0, -2.0, 0.7, 0.3]])
    ratio = np.array([[1.5, 1.1, 0.5, 0.5], [1.5, 0.9, 1.0 + 0.35, 0.6]])
    clipped = np.array([[1, 0, 0, 1], [0, 0, 1, 0]], bool)
    old = np.array([[-1.0, -2.0, -0.3, -0.8], [-1.2, -0.4, -2.0, -1.5]])
    logp0 = old + np.log(ratio)
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=adv.shape)

    def f(logp):
        return jnp.sum(w * L.pg_clip(jnp.asarray(adv), logp, jnp.asarray(old), 0.2, 0.2)[0])

    g = ad_grad(f, logp0)
    hand = np.where(clipped, 0.0, -w * adv * ratio)  # d(-A r)/dlogp = -A r ; 0 where clipped
    np.testing.assert_allclose(g, hand, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, fd_grad(f, logp0), rtol=FD_RTOL, atol=FD_ATOL)
    assert np.all(g[clipped] == 0.0) and np.all(g[~clipped] != 0.0)


def test_rkl_k1_grad_is_stopgrad_logr(x64):
    logp0 = np.array([[-1.0, -0.5, -2.5]])
    t = jnp.array([[-2.0, -0.1, -2.5]])
    w = np.array([[1.0, 2.0, 0.5]])
    g = ad_grad(lambda lp: jnp.sum(w * L.rkl_loss(lp, t, "k1")), logp0)
    logr = logp0 - np.asarray(t)
    np.testing.assert_allclose(g, w * logr, rtol=1e-12, atol=1e-15)  # NOT w * (logr + 1)
    assert np.abs(g - w * (logr + 1.0)).max() > 0.4


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_rkl_k2_k3_grad_vs_fd(x64, kind):
    logp0 = np.array([[-1.0, -0.5, -2.5], [-0.2, -3.0, -1.1]])
    t = jnp.array([[-2.0, -0.1, -2.4], [-0.9, -1.0, -1.1]])
    w = np.random.default_rng(1).uniform(0.5, 2.0, size=logp0.shape)
    f = lambda lp: jnp.sum(w * L.rkl_loss(lp, t, kind))  # noqa: E731
    g = ad_grad(f, logp0)
    np.testing.assert_allclose(g, fd_grad(f, logp0), rtol=FD_RTOL, atol=FD_ATOL)
    logr = logp0 - np.asarray(t)
    hand = w * (logr if kind == "k2" else 1.0 - np.exp(-logr))
    np.testing.assert_allclose(g, hand, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("renorm", [True, False])
def test_forward_topk_kl_grad_wrt_student_logits(x64, renorm):
    rng = np.random.default_rng(2)
    B, T, V, K = 2, 2, 5, 3
    z0 = rng.normal(size=(B, T, V))
    ids = jnp.asarray(np.argsort(-rng.normal(size=(B, T, V)), -1)[..., :K])
    t = np_log_softmax(rng.normal(size=(B, T, V)) * 2)
    t_topk = np.take_along_axis(t, np.asarray(ids), -1)
    t_topk[1, 0, 2] = MASK_VALUE  # a slot that drops out of the support
    t_topk = jnp.asarray(t_topk)
    w = rng.uniform(0.5, 2.0, size=(B, T))

    def f(z):
        s = jnp.take_along_axis(jax.nn.log_softmax(z, -1), ids, -1)
        return jnp.sum(w * L.forward_topk_kl(s, t_topk, renorm))

    g = ad_grad(f, z0)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, fd_grad(f, z0), rtol=FD_RTOL, atol=FD_ATOL)


def test_rkl_dist_grad_wrt_student_logits(x64):
    rng = np.random.default_rng(3)
    B, T, V, K = 2, 2, 6, 3
    z0 = rng.normal(size=(B, T, V))
    ids = jnp.asarray(np.argsort(-z0, -1)[..., :K])
    t_at = jnp.asarray(np.take_along_axis(np_log_softmax(rng.normal(size=(B, T, V))), np.asarray(ids), -1))
    w = rng.uniform(0.5, 2.0, size=(B, T))

    def f(z):
        s = jnp.take_along_axis(jax.nn.log_softmax(z, -1), ids, -1)
        return jnp.sum(w * L.rkl_dist(s, t_at))

    np.testing.assert_allclose(ad_grad(f, z0), fd_grad(f, z0), rtol=FD_RTOL, atol=FD_ATOL)


def test_kdrl_and_teacher_ce_grads(x64):
    logp0 = np.array([[-1.0, -0.2, -4.0], [-0.7, -2.2, -0.01]])
    t = jnp.array([[-0.5, -0.3, -1.0], [-3.0, -2.2, -0.5]])
    valid = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    w = np.random.default_rng(4).uniform(0.5, 2.0, size=logp0.shape)
    fk = lambda lp: jnp.sum(w * L.kdrl_term(lp, t))  # noqa: E731
    gk = ad_grad(fk, logp0)
    np.testing.assert_allclose(gk, fd_grad(fk, logp0), rtol=FD_RTOL, atol=FD_ATOL)
    np.testing.assert_allclose(gk, w * (logp0 - np.asarray(t)), rtol=1e-12, atol=1e-15)
    fc = lambda lp: jnp.sum(w * L.teacher_ce(lp, valid))  # noqa: E731
    gc = ad_grad(fc, logp0)
    np.testing.assert_allclose(gc, fd_grad(fc, logp0), rtol=FD_RTOL, atol=FD_ATOL)
    np.testing.assert_allclose(gc, -w * np.asarray(valid), rtol=1e-12)


def test_kdrl_k1_grad_raises_every_sampled_token(x64):
    """d/dlogp of -(logp - logp_T) is -1 whatever the teacher says (no gradient reaches logp_T):
    a gradient step RAISES log pi(y_t) even where the student already exceeds the teacher, where
    the k2 form (kdrl) lowers it."""
    logp0 = np.array([[-1.0, -0.2, -4.0], [-0.7, -2.2, -0.01]])
    t = np.array([[-0.5, -0.3, -1.0], [-3.0, -2.2, -0.5]])
    w = np.random.default_rng(12).uniform(0.5, 2.0, size=logp0.shape)
    f = lambda lp: jnp.sum(w * L.kdrl_k1_term(lp, jnp.asarray(t)))  # noqa: E731
    g = ad_grad(f, logp0)
    np.testing.assert_allclose(g, fd_grad(f, logp0), rtol=FD_RTOL, atol=FD_ATOL)
    np.testing.assert_array_equal(g, -w)
    g_teacher = ad_grad(lambda tt: jnp.sum(w * L.kdrl_k1_term(jnp.asarray(logp0), tt)), t)
    np.testing.assert_array_equal(g_teacher, 0.0)

    # through the logits of one position: d/dz [-beta * log softmax(z)[y]] = -beta (onehot(y) - p)
    z0 = np.array([0.3, 2.0, -1.0, 0.5])
    y, beta = 1, 0.002
    lp_t = jnp.asarray(-3.0)  # the student's log p(y) = -0.35 is far ABOVE the teacher's

    def per_token(z, term):
        return beta * term(jax.nn.log_softmax(z)[y], lp_t)

    p = np.exp(np_log_softmax(z0))
    g_k1 = ad_grad(lambda z: per_token(z, L.kdrl_k1_term), z0)
    np.testing.assert_allclose(g_k1, -beta * (np.eye(4)[y] - p), rtol=1e-12, atol=1e-18)
    step = lambda g: float(jax.nn.log_softmax(jnp.asarray(z0 - 10.0 * g))[y])  # noqa: E731
    before = float(np_log_softmax(z0)[y])
    assert step(g_k1) > before  # k1 as the authors wrote it: pushed further up
    assert step(ad_grad(lambda z: per_token(z, L.kdrl_term), z0)) < before  # k2: pulled towards the teacher


def test_student_stats_values_and_entropy_grad_wrt_head(x64):
    """student_stats computes its logits in fp32 by design (preferred_element_type=float32, also
    under x64), so the float64 finite differences are taken of the REFERENCE entropy
    H(softmax(h @ head)) in numpy, and compared with the autodiff gradient through student_stats
    (float32 finite differences of student_stats itself are too noisy for a tight check)."""
    rng = np.random.default_rng(5)
    B, T, E, V = 1, 2, 3, 5
    h_np = rng.normal(size=(B, T, E))
    h = jnp.asarray(h_np, jnp.float32)
    head0 = rng.normal(size=(E, V)).astype(np.float32).astype(np.float64)
    y = jnp.array([[1, 4]], jnp.int32)
    ids = jnp.array([[[0, 2], [3, 3]]], jnp.int32)
    st = student_stats(h, jnp.asarray(head0, jnp.float32), y, ids, chunk=1)
    h64 = np.asarray(h, np.float64)
    lp = np_log_softmax(np.einsum("bte,ev->btv", h64, head0))
    np.testing.assert_allclose(st.logp_BT, np.take_along_axis(lp, np.asarray(y)[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(st.extra_logp_BTK, np.take_along_axis(lp, np.asarray(ids), -1), rtol=1e-5)
    np.testing.assert_allclose(st.entropy_BT, -np.sum(np.exp(lp) * lp, -1), rtol=1e-5)

    w = np.array([[1.0, 0.5]])

    def ref_entropy(hd):  # float64 numpy restatement of the weighted entropy
        lps = np_log_softmax(np.einsum("bte,ev->btv", h64, hd))
        return float(np.sum(w * -np.sum(np.exp(lps) * lps, -1)))

    fd = np.zeros_like(head0)
    for idx in np.ndindex(head0.shape):
        hp, hm = head0.copy(), head0.copy()
        hp[idx] += FD_EPS
        hm[idx] -= FD_EPS
        fd[idx] = (ref_entropy(hp) - ref_entropy(hm)) / (2 * FD_EPS)

    f = lambda hd: jnp.sum(jnp.asarray(w, jnp.float32) * student_stats(h, hd, y, ids, chunk=1).entropy_BT)  # noqa: E731
    g = np.asarray(jax.grad(f)(jnp.asarray(head0, jnp.float32)), np.float64)
    assert np.abs(fd).max() > 1e-2
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 3. behaviour of the registered objectives


def _aggregated_total(terms, mask):
    denom = jnp.sum(mask)
    return sum(L.aggregate(v, mask, denom) for v in terms.values())


def test_tgpo_reg_raises_logp_of_teacher_argmax_where_advantage_is_zero(x64):
    rng = np.random.default_rng(6)
    B, T, V = 2, 3, 6
    cfg = ObjectiveConfig(name="tgpo_reg")
    obj = OBJECTIVES["tgpo_reg"]
    z0 = jnp.asarray(rng.normal(size=(B, T, V)) * 1.5)
    y = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    teacher = np.array(jnp.argmin(z0, -1))  # the student's least likely token: far from its own choice
    teacher[0, 0] = int(jnp.argmax(z0[0, 0]))  # ... and once its own argmax
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = Batch(
        prompt_BP=jnp.ones((B, 1), jnp.int32),
        prompt_mask_BP=jnp.ones((B, 1), jnp.int32),
        tokens_BT=y,
        mask_BT=mask,
        adv_B=jnp.zeros((B,)),
        teacher_ids_BT=jnp.asarray(teacher, jnp.int32),
        teacher_valid_BT=jnp.ones((B, T)),
        old_logp_BT=jnp.take_along_axis(jax.nn.log_softmax(z0, -1), y[..., None], -1)[..., 0],
    )
    ids = obj.extra_ids(batch, cfg)
    assert ids.shape == (B, T, 1)

    def total(z, lam, keep=None):
        terms = obj.terms(stats_from_logits(z, y, ids), batch, cfg, lam)
        if keep is not None:
            terms = {k: v for k, v in terms.items() if k in keep}
        return _aggregated_total(terms, mask)

    lam = 0.002  # the paper's lambda_0, with the default c_ent = 0.001
    g = jax.grad(total)(z0, lam)
    z1 = z0 - 50.0 * g  # one plain gradient step
    lp_t = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z, -1), ids, -1)[..., 0]  # noqa: E731
    delta = np.asarray(lp_t(z1) - lp_t(z0))
    m = np.asarray(mask) > 0
    assert np.all(delta[m] > 0), delta
    np.testing.assert_array_equal(delta[~m], 0.0)  # padding positions get no gradient

    # the CE part of the gradient is exactly lam / N * (softmax(z) - onehot(teacher)) on valid tokens
    g_ce = np.asarray(jax.grad(total)(z0, lam, keep={"ce_teacher"}))
    p = np.exp(np_log_softmax(np.asarray(z0)))
    onehot = np.eye(V)[teacher]
    np.testing.assert_allclose(g_ce, lam / 5.0 * (p - onehot) * np.asarray(mask)[..., None], rtol=1e-10, atol=1e-15)

    # adv = 0 everywhere: the PG term contributes nothing, and with lam = 0 only the entropy is left
    np.testing.assert_array_equal(jax.grad(total)(z0, lam, keep={"pg"}), 0.0)
    g0 = np.asarray(jax.grad(total)(z0, 0.0))
    g_ent = np.asarray(jax.grad(total)(z0, 0.0, keep={"entropy"}))
    assert np.abs(g_ent).max() > 0
    np.testing.assert_allclose(g0, g_ent, rtol=1e-12, atol=1e-18)


def test_tgpo_adv_adds_lambda_times_probability(x64):
    rng = np.random.default_rng(7)
    batch, z_old, y = make_batch(rng, float_dtype=np.float64)
    cfg = ObjectiveConfig(name="tgpo_adv")
    obj = OBJECTIVES["tgpo_adv"]
    # cur == old student: ratio 1, so pg = -A' exactly and A' can be read off
    cur = stats_from_logits(jnp.asarray(z_old), jnp.asarray(y), obj.extra_ids(batch, cfg))
    lam = 0.02
    a_new = -np.asarray(obj.terms(cur, batch, cfg, lam)["pg"])
    a_out = np.asarray(batch.adv_B)[:, None] * np.asarray(batch.mask_BT)
    p_old = np.exp(np.take_along_axis(np_log_softmax(z_old), np.asarray(batch.teacher_ids_BT)[..., None], -1)[..., 0])
    np.testing.assert_allclose(a_new - a_out, lam * p_old * np.asarray(batch.teacher_valid_BT), rtol=1e-10, atol=1e-14)
    assert set(obj.terms(cur, batch, cfg, lam)) == {"pg", "entropy"}  # no CE term


def _stats_for(name, batch, z_old, y, cfg):
    return stats_from_logits(jnp.asarray(z_old, jnp.float32), jnp.asarray(y), OBJECTIVES[name].extra_ids(batch, cfg))


@pytest.mark.parametrize("name", ["rkl", "rkl_centered", "rkl_reg_k1", "rkl_reg_k2", "rkl_reg_k3", "rkl_reg_dist"])
def test_rkl_family_ignores_outcome_reward(name):
    rng = np.random.default_rng(8)
    batch, z_old, y = make_batch(rng)
    cfg = ObjectiveConfig(name=name)
    z_cur = z_old + 0.1 * rng.normal(size=z_old.shape)  # ratio != 1
    cur = _stats_for(name, batch, z_cur, y, cfg)
    a = OBJECTIVES[name].terms(cur, batch, cfg, 0.002)
    b = OBJECTIVES[name].terms(cur, batch.replace(adv_B=jnp.array([-3.0, 7.0])), cfg, 0.002)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "name", ["grpo", "tgpo_reg", "tgpo_adv", "tgpo_mc", "tgpo_fwd_topk", "kdrl", "kdrl_k1", "luffy"]
)
def test_outcome_objectives_depend_on_reward(name):
    rng = np.random.default_rng(8)
    batch, z_old, y = make_batch(rng)
    cfg = ObjectiveConfig(name=name)
    z_cur = z_old + 0.1 * rng.normal(size=z_old.shape)
    cur = _stats_for(name, batch, z_cur, y, cfg)
    a = OBJECTIVES[name].terms(cur, batch, cfg, 0.002)["pg"]
    b = OBJECTIVES[name].terms(cur, batch.replace(adv_B=jnp.array([-3.0, 7.0])), cfg, 0.002)["pg"]
    m = np.asarray(batch.mask_BT) > 0
    assert np.all(np.asarray(a)[m] != np.asarray(b)[m])


def _expected_advantage(name, batch, lam):
    """Per-token advantage of each PG objective, restated from the spec in numpy."""
    mask = np.asarray(batch.mask_BT, np.float64)
    out = np.asarray(batch.adv_B, np.float64)[:, None] * mask
    if name in ("grpo", "tgpo_reg", "tgpo_mc", "tgpo_fwd_topk", "kdrl", "kdrl_k1"):
        return out
    if name == "tgpo_adv":
        return out + lam * np.asarray(batch.old_p_teacher_BT) * np.asarray(batch.teacher_valid_BT)
    R_y = np.asarray(batch.teacher_logp_BT, np.float64) - np.asarray(batch.old_logp_BT, np.float64)
    if name == "rkl":
        return R_y * mask
    if name == "rkl_centered":
        lo = np.asarray(batch.old_topk_logp_BTK, np.float64)
        base = np.sum(np.exp(lo) * (np.asarray(batch.teacher_at_student_topk_BTK, np.float64) - lo), -1)
        return (R_y - base) * mask
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name", ["grpo", "tgpo_reg", "tgpo_mc", "tgpo_adv", "tgpo_fwd_topk", "kdrl", "kdrl_k1", "rkl", "rkl_centered"]
)
def test_registry_pg_wiring_at_ratio_one(name):
    """With the current student equal to the old one (ratio 1), pg = -A exactly: checks which
    advantage each objective feeds to PG_clip, and the entropy term -c_ent * H."""
    rng = np.random.default_rng(9)
    batch, z_old, y = make_batch(rng)
    cfg = ObjectiveConfig(name=name)
    cur = _stats_for(name, batch, z_old, y, cfg)
    terms = OBJECTIVES[name].terms(cur, batch, cfg, 0.002)
    np.testing.assert_allclose(terms["pg"], -_expected_advantage(name, batch, 0.002), rtol=1e-5, atol=1e-7)
    lp = np_log_softmax(z_old)
    np.testing.assert_allclose(terms["entropy"], 0.001 * np.sum(np.exp(lp) * lp, -1), rtol=1e-5, atol=1e-9)


def test_registry_teacher_terms():
    rng = np.random.default_rng(10)
    batch, z_old, y = make_batch(rng)
    lp = np_log_softmax(z_old + 0.1 * rng.normal(size=z_old.shape))
    z_cur = lp  # log-probs are valid logits
    y_np = np.asarray(y)
    lp_y = np.take_along_axis(lp, y_np[..., None], -1)[..., 0]
    lam = 0.002

    cfg = ObjectiveConfig(name="tgpo_reg")
    t = OBJECTIVES["tgpo_reg"].terms(_stats_for("tgpo_reg", batch, z_cur, y, cfg), batch, cfg, lam)
    lp_teacher = np.take_along_axis(lp, np.asarray(batch.teacher_ids_BT)[..., None], -1)[..., 0]
    np.testing.assert_allclose(t["ce_teacher"], -lam * lp_teacher * np.asarray(batch.teacher_valid_BT), rtol=1e-5)
    assert set(t) == {"pg", "entropy", "ce_teacher"}

    cfg = ObjectiveConfig(name="kdrl")
    t = OBJECTIVES["kdrl"].terms(_stats_for("kdrl", batch, z_cur, y, cfg), batch, cfg, lam)
    np.testing.assert_allclose(
        t["kdrl"], 0.002 * 0.5 * (np.asarray(batch.teacher_logp_BT) - lp_y) ** 2, rtol=1e-4, atol=1e-9
    )
    assert set(t) == {"pg", "entropy", "kdrl"}
    cfg = ObjectiveConfig(name="kdrl_k1", kdrl_beta=0.01)  # beta is objective.kdrl_beta, not lambda
    t = OBJECTIVES["kdrl_k1"].terms(_stats_for("kdrl_k1", batch, z_cur, y, cfg), batch, cfg, lam)
    np.testing.assert_allclose(t["kdrl"], -0.01 * (lp_y - np.asarray(batch.teacher_logp_BT)), rtol=1e-4, atol=1e-9)
    assert set(t) == {"pg", "entropy", "kdrl"}

    for kind in ("k1", "k2", "k3"):
        name = f"rkl_reg_{kind}"
        cfg = ObjectiveConfig(name=name)
        t = OBJECTIVES[name].terms(_stats_for(name, batch, z_cur, y, cfg), batch, cfg, lam)
        logr = lp_y - np.asarray(batch.teacher_logp_BT)
        want = {"k1": logr * lp_y, "k2": 0.5 * logr**2, "k3": np.exp(-logr) - 1 + logr}[kind]
        np.testing.assert_allclose(t["rkl"], want, rtol=1e-4, atol=1e-6)
        assert set(t) == {"rkl", "entropy"}

    cfg = ObjectiveConfig(name="rkl_reg_dist")
    t = OBJECTIVES["rkl_reg_dist"].terms(_stats_for("rkl_reg_dist", batch, z_cur, y, cfg), batch, cfg, lam)
    s = np.take_along_axis(lp, np.asarray(batch.student_topk_ids_BTK), -1)
    q = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    pt = np.exp(np.asarray(batch.teacher_at_student_topk_BTK, np.float64))
    pt = pt / pt.sum(-1, keepdims=True)
    np.testing.assert_allclose(t["rkl"], np.sum(q * (np.log(q) - np.log(pt)), -1), rtol=1e-4, atol=1e-6)

    for renorm in (True, False):
        cfg = ObjectiveConfig(name="tgpo_fwd_topk", fwd_topk_student_renorm=renorm)
        t = OBJECTIVES["tgpo_fwd_topk"].terms(_stats_for("tgpo_fwd_topk", batch, z_cur, y, cfg), batch, cfg, lam)
        s = np.take_along_axis(lp, np.asarray(batch.teacher_topk_ids_BTK), -1)
        if renorm:
            s = s - np.log(np.exp(s).sum(-1, keepdims=True))
        ptl = np.asarray(batch.teacher_topk_logp_BTK, np.float64)
        ptl = ptl - np.log(np.exp(ptl).sum(-1, keepdims=True))
        np.testing.assert_allclose(t["fkl_teacher"], lam * np.sum(np.exp(ptl) * (ptl - s), -1), rtol=1e-4, atol=1e-8)

    cfg = ObjectiveConfig(name="luffy")
    t = OBJECTIVES["luffy"].terms(_stats_for("luffy", batch, z_cur, y, cfg), batch, cfg, lam)
    A = np.asarray(batch.adv_B)[:, None] * np.asarray(batch.mask_BT)
    p = np.exp(lp_y)
    ratio = np.exp(lp_y - np.asarray(batch.old_logp_BT))
    want = np.where(np.asarray(batch.offpolicy_B)[:, None], -A * p / (p + 0.1), -A * ratio)
    np.testing.assert_allclose(t["pg"], want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 4. GRPO advantages


def test_grpo_advantages_hand_example():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    out = grpo_advantages(r, 4)
    s1 = math.sqrt((4 * 0.25) / 3)  # group 1: mean 0.5, deviations +-0.5, ddof=1
    s3 = math.sqrt((3 * 0.0625 + 0.5625) / 3)  # group 3: mean 0.25 -> std 0.5
    expected = [
        0.5 / (s1 + 1e-6),
        -0.5 / (s1 + 1e-6),
        -0.5 / (s1 + 1e-6),
        0.5 / (s1 + 1e-6),
        0.0,
        0.0,
        0.0,
        0.0,
        -0.25 / (s3 + 1e-6),
        -0.25 / (s3 + 1e-6),
        -0.25 / (s3 + 1e-6),
        0.75 / (s3 + 1e-6),
    ]
    assert out.shape == (12,)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # the eps is added to the std (not to the variance): with std 0.5 the factor is 1 / 0.500001
    assert out[-1] == pytest.approx(0.75 / 0.500001, rel=1e-6)


def test_grpo_all_equal_group_is_exactly_zero_and_kept():
    for v in (0.0, 1.0):
        out = grpo_advantages(np.full(8, v), 8)
        assert out.shape == (8,)
        assert np.all(out == 0.0)
    out = grpo_advantages(jnp.full((8,), 1.0), 4)
    assert out.shape == (8,) and np.all(np.asarray(out) == 0.0)


def test_grpo_bad_group_sizes_raise():
    with pytest.raises(ValueError, match="group size"):
        grpo_advantages(np.array([1.0, 0.0]), 1)
    with pytest.raises(ValueError):
        grpo_advantages(np.array([1.0, 0.0, 1.0]), 2)


def test_grpo_numpy_and_jax_agree():
    r = np.random.default_rng(11).integers(0, 2, size=32).astype(np.float64)
    a_np = grpo_advantages(r, 8)
    a_jx = grpo_advantages(jnp.asarray(r), 8)
    assert isinstance(a_np, np.ndarray) and isinstance(a_jx, jax.Array)
    np.testing.assert_allclose(np.asarray(a_jx), a_np, rtol=1e-6, atol=1e-7)
    ref = []
    for g in r.reshape(-1, 8):  # plain python restatement
        m = sum(g) / 8
        sd = math.sqrt(sum((x - m) ** 2 for x in g) / 7)
        ref += [(x - m) / (sd + 1e-6) for x in g]
    np.testing.assert_allclose(a_np, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 5. the teacher-coefficient schedule


def test_teacher_coef_tgpo_reg_paper_defaults():
    sched = ObjectiveConfig(name="tgpo_reg").schedule()
    assert sched == (0.002, 1e-5, 0.0)
    lam = lambda s: float(teacher_coef(s, *sched))  # noqa: E731
    assert lam(1) == pytest.approx(0.002, rel=1e-6)
    assert lam(100) == pytest.approx(0.002 - 1e-5 * 99, rel=1e-5)
    assert lam(200) == pytest.approx(1e-5, rel=1e-3)
    assert lam(201) == 0.0
    assert lam(300) == 0.0
    # the same under jit with a traced iteration counter (as in the train step)
    jl = jax.jit(lambda s: teacher_coef(s, *sched))
    assert float(jl(jnp.int32(201))) == 0.0 and float(jl(jnp.int32(300))) == 0.0
    assert float(jl(jnp.int32(100))) == pytest.approx(0.00101, rel=1e-5)


def test_teacher_coef_tgpo_adv_defaults_and_overrides():
    sched = ObjectiveConfig(name="tgpo_adv").schedule()
    assert sched == (0.02, 1e-4, 0.0)
    assert float(teacher_coef(1, *sched)) == pytest.approx(0.02, rel=1e-6)
    assert float(teacher_coef(101, *sched)) == pytest.approx(0.01, rel=1e-5)
    assert float(teacher_coef(201, *sched)) == 0.0
    assert float(teacher_coef(300, *sched)) == 0.0
    assert ObjectiveConfig(name="tgpo_adv", lambda_0=0.05, lambda_min=0.001).schedule() == (0.05, 1e-4, 0.001)
    assert ObjectiveConfig(name="tgpo_fwd_topk").schedule() == (0.002, 1e-5, 0.0)
    # a positive floor is held, and no decay means a constant
    assert float(teacher_coef(1000, 0.002, 1e-5, 0.0005)) == pytest.approx(0.0005, rel=1e-6)
    assert float(teacher_coef(1000, 0.002, 0.0, 0.0)) == pytest.approx(0.002, rel=1e-6)


def test_teacher_coef_non_integer_steps_to_floor():
    # lambda_s = max(0.0023 - (s - 1) * 0.001, 0): 0.0023, 0.0013, 0.0003, 0
    for s, want in [(1, 0.0023), (2, 0.0013), (3, 0.0003), (4, 0.0)]:
        assert float(teacher_coef(s, 0.0023, 1e-3, 0.0)) == pytest.approx(want, rel=1e-4, abs=1e-9), s


# ------------------------------------------------------------------------------------------------
# 6. ObjectiveConfig validation


def test_objective_config_unknown_name_lists_accepted():
    with pytest.raises(ValueError) as e:
        ObjectiveConfig(name="ppo")
    msg = str(e.value)
    assert "'ppo'" in msg
    for n in (
        "tgpo_reg",
        "tgpo_adv",
        "tgpo_mc",
        "tgpo_fwd_topk",
        "grpo",
        "rkl",
        "rkl_centered",
        "rkl_reg_k1",
        "rkl_reg_k2",
        "rkl_reg_k3",
        "rkl_reg_dist",
        "kdrl",
        "kdrl_k1",
        "luffy",
    ):
        assert n in msg
        ObjectiveConfig(name=n)  # every listed name is accepted


def test_objective_config_bad_loss_agg():
    with pytest.raises(ValueError, match="token_mean, microbatch_sum"):
        ObjectiveConfig(loss_agg="seq_mean")
    ObjectiveConfig(loss_agg="microbatch_sum")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_terms_read_only_the_fields_the_objective_asks_the_score_step_for(name):
    """Every optional Batch field outside `Objective.scored` (and offpolicy_B outside LUFFY) set to
    None, as the score step and the iteration leave them: the terms are unchanged."""
    obj = OBJECTIVES[name]
    batch, z_old, y = make_batch(np.random.default_rng(9))
    keep = obj.scored | ({"offpolicy_B"} if obj.offpolicy_rows else set())
    slim = batch.replace(**{f: None for f in (*SCORED_FIELDS, "offpolicy_B") if f not in keep})
    cfg = ObjectiveConfig(name=name, fwd_topk=3, rkl_centered_topk=3, rkl_dist_topk=3)
    cur = stats_from_logits(jnp.asarray(z_old, jnp.float32), jnp.asarray(y), obj.extra_ids(slim, cfg))
    want, got = obj.terms(cur, batch, cfg, 0.002), obj.terms(cur, slim, cfg, 0.002)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_objective_traits():
    assert get_objective("tgpo_reg").has_lambda and not get_objective("grpo").has_lambda
    assert [n for n, o in OBJECTIVES.items() if not o.needs_teacher] == ["grpo", "luffy"]
    assert [n for n, o in OBJECTIVES.items() if o.offpolicy_rows] == ["luffy"]
    assert {n for n, o in OBJECTIVES.items() if not o.group_advantages} == {
        "rkl",
        "rkl_centered",
        "rkl_reg_k1",
        "rkl_reg_k2",
        "rkl_reg_k3",
        "rkl_reg_dist",
    }
    assert ObjectiveConfig(name="grpo").schedule() == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown objective 'nope'; accepted: tgpo_reg"):
        get_objective("nope")
