"""Per-token loss terms of TGPO, its variants and baselines (../shared/TGPO_SPEC.md sections 2-4).

Every function returns per-token terms [B, T] (not yet masked or averaged): the train step masks
them and divides by the aggregation denominator (see `aggregate`). `cur` holds the current
student's log-probs from the same forward pass; `batch` the rollout + scoring results.
Shapes: B sequences, T response positions, K top-K width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tgpo_jax.models.layers import MASK_VALUE


def pg_clip(adv_BT, logp_BT, old_logp_BT, eps_low: float, eps_high: float):
    """PPO clipped surrogate per token:
        ratio = exp(logp - old_logp)
        l_t   = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    Returns (l_BT, ratio_BT, clipped_BT) where clipped marks tokens whose clipped branch is taken."""
    ratio = jnp.exp(logp_BT - old_logp_BT)
    unclipped = -adv_BT * ratio
    clipped = -adv_BT * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.maximum(unclipped, clipped), ratio, (clipped > unclipped).astype(jnp.float32)


def entropy_bonus(entropy_BT, coef: float):
    """-c_ent * H_t (the entropy enters the loss with a minus sign: it is maximised)."""
    return -coef * entropy_BT


def teacher_ce(teacher_id_logp_BT, teacher_valid_BT):
    """CE_T per token = -log pi(teacher_ids_t | x, y_<t); 0 where the teacher id is outside the
    student's vocabulary (masked, counted in metrics)."""
    return -teacher_id_logp_BT * teacher_valid_BT


def tgpo_adv_advantage(adv_BT, old_p_teacher_BT, teacher_valid_BT, lam):
    """TGPO-Adv: A'_t = A_t + lambda * pi_old(teacher_ids_t) (a probability, no gradient)."""
    return adv_BT + lam * jax.lax.stop_gradient(old_p_teacher_BT) * teacher_valid_BT


def forward_topk_kl(student_topk_logp_BTK, teacher_topk_logp_BTK, student_renorm: bool):
    """FKL_t = sum_{v in S_t} p_T(v) [log p_T(v) - log p(v)], S_t = teacher top-K, p_T renormalised
    over S_t; the student renormalised over S_t (default) or its full-vocab log pi(v)."""
    # Slots the score step masked (ids the student cannot decode) carry MASK_VALUE: they leave
    # the support of both distributions.
    in_support = teacher_topk_logp_BTK > 0.5 * MASK_VALUE
    log_pt = teacher_topk_logp_BTK - jax.nn.logsumexp(teacher_topk_logp_BTK, -1, keepdims=True)
    log_p = student_topk_logp_BTK
    if student_renorm:
        masked = jnp.where(in_support, log_p, MASK_VALUE)
        log_p = log_p - jax.nn.logsumexp(masked, -1, keepdims=True)
    return jnp.sum(jnp.where(in_support, jnp.exp(log_pt) * (log_pt - log_p), 0.0), -1)


def rkl_advantage(teacher_logp_BT, old_logp_BT):
    """RKL (on-policy distillation): A_t = log pi_T(y_t) - log pi_old(y_t), per token."""
    return teacher_logp_BT - old_logp_BT


def rkl_centered_advantage(teacher_logp_BT, old_logp_BT, old_topk_logp_BTK, teacher_at_topk_logp_BTK):
    """A_t = R_t(y_t) - sum_{v in TopK(pi_old)} pi_old(v) R_t(v), R_t(v) = log pi_T(v) - log pi_old(v),
    with the true (not renormalised) student probabilities."""
    baseline = jnp.sum(jnp.exp(old_topk_logp_BTK) * (teacher_at_topk_logp_BTK - old_topk_logp_BTK), -1)
    return (teacher_logp_BT - old_logp_BT) - baseline


def rkl_loss(logp_BT, teacher_logp_BT, kind: str):
    """RKL as a loss with logr = log pi(y_t) - log pi_T(y_t) (current pi):
    k1: stop_grad(logr) * log pi(y_t);  k2: 0.5 * logr^2;  k3: exp(-logr) - 1 + logr."""
    logr = logp_BT - teacher_logp_BT
    if kind == "k1":
        return jax.lax.stop_gradient(logr) * logp_BT
    if kind == "k2":
        return 0.5 * jnp.square(logr)
    if kind == "k3":
        return jnp.exp(-logr) - 1.0 + logr
    raise ValueError(f"unknown RKL estimator {kind!r}; accepted: k1, k2, k3")


def rkl_dist(student_topk_logp_BTK, teacher_at_topk_logp_BTK):
    """Full reverse KL over the student's top-K support S, both renormalised over S:
    sum_{v in S} q(v) [log q(v) - log p_T(v)]."""
    log_q = student_topk_logp_BTK - jax.nn.logsumexp(student_topk_logp_BTK, -1, keepdims=True)
    log_pt = teacher_at_topk_logp_BTK - jax.nn.logsumexp(teacher_at_topk_logp_BTK, -1, keepdims=True)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_pt), -1)


def kdrl_term(logp_BT, teacher_logp_BT):
    """KDRL regulariser per token (`kdrl`, the k2 form): 0.5 * (log pi_T(y_t) - log pi(y_t))^2,
    ADDED with beta. Gradient: beta * (log pi(y_t) - log pi_T(y_t)) * grad log pi(y_t), which pulls
    log pi(y_t) towards log pi_T(y_t) from either side (a reverse-KL penalty estimate)."""
    return 0.5 * jnp.square(teacher_logp_BT - logp_BT)


def kdrl_k1_term(logp_BT, teacher_logp_BT):
    """The authors' latest KDRL code (`kdrl_k1`), per token, with its sign as written there:

        term_t = -(log pi(y_t) - log pi_T(y_t))      (the caller multiplies by beta)

    i.e. loss = PG - beta * token_mean(log pi(y_t) - log pi_T(y_t)): their code states
    J = J_GRPO - beta * KL(pi || pi_T) but SUBTRACTS the k1 estimate from the loss. log pi_T(y_t)
    is a constant (no gradient), so d term_t / d log pi(y_t) = -1: minimising it RAISES the
    log-prob of every sampled token, whatever the teacher says; the teacher only shifts the value.
    It is not a KL penalty; reproduced as written so that their runs can be matched."""
    return -(logp_BT - jax.lax.stop_gradient(teacher_logp_BT))


def luffy_pg(adv_BT, logp_BT, old_logp_BT, offpolicy_B, gamma: float):
    """LUFFY: off-policy (teacher-written) rows get -A * f(pi(y_t)), f(p) = p / (p + gamma); on-policy
    rows get -A * ratio, unclipped."""
    p = jnp.exp(logp_BT)
    off = -adv_BT * p / (p + gamma)
    on = -adv_BT * jnp.exp(logp_BT - old_logp_BT)
    return jnp.where(offpolicy_B[:, None], off, on)


def aggregate(loss_BT, mask_BT, denom):
    """sum over valid tokens / denom. `token_mean` passes the mini-batch's valid-token count,
    `microbatch_sum` the micro-batch's own count (the authors' behaviour), LUFFY T_max * B; a [B]
    denom divides each row by its own (train.micro_batch_tokens: the token count of the row's
    micro-batch in the authors' dynamic split, times their ranks)."""
    if jnp.ndim(denom) == 1:
        return jnp.sum(jnp.sum(loss_BT * mask_BT, -1) / jnp.maximum(denom, 1.0))
    return jnp.sum(loss_BT * mask_BT) / jnp.maximum(denom, 1.0)
