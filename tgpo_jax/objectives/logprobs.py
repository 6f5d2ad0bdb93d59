"""Per-token quantities of a softmax over the vocabulary, computed from final hidden states in
chunks over the sequence so that neither the forward nor the backward pass ever holds [B, T, V]
logits: each chunk's logits are rematerialised in the backward pass (a custom VJP on the student
side).

Student side (differentiable): log pi(y_t), log pi(extra ids) (teacher argmax, top-K ids, ...),
entropy. Teacher side (no grad): argmax, one sample, log pi_T(y_t), top-K ids and log-probs,
log pi_T at given ids.

Temperature: every function takes the rollout temperature T and works with the distribution
softmax(z / T), the one the sampler drew the response from (veRL divides the actor's, the
reference's and the teacher's logits by the rollout temperature the same way). So log-probs,
ratios, entropies and teacher quantities are all of the tempered distributions; at T = 1 nothing
changes. T must be > 0 (greedy sampling never feeds training; the train config rejects it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tgpo_jax.models.layers import MASK_VALUE, dense


def chunk_logits(h_BCE: jax.Array, head_EV: jax.Array, valid_vocab: int | None, temperature: float = 1.0) -> jax.Array:
    """fp32 logits / temperature [B, C, V] for one chunk; ids >= valid_vocab get a large negative
    value (after the division: masked columns stay at exactly MASK_VALUE)."""
    logits = dense(h_BCE, head_EV.astype(h_BCE.dtype), preferred_element_type=jnp.float32)
    if temperature != 1.0:  # a Python float: T = 1 compiles to the very program it always was
        logits = logits / jnp.float32(temperature)
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, MASK_VALUE)
    return logits


def _map_chunks(fn: Callable, chunk: int, *arrays_BT):
    """Applies fn to [B, chunk, ...] slices of every array (split on axis 1) with a scan, and
    concatenates the per-chunk outputs back to [B, T, ...]."""
    T = arrays_BT[0].shape[1]
    chunk = min(chunk, T)
    if T % chunk:
        raise ValueError(f"sequence length {T} is not a multiple of the log-prob chunk {chunk}")
    n = T // chunk
    split = [jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0) for a in arrays_BT]

    def body(_, xs):
        return None, fn(*xs)

    _, out = jax.lax.scan(body, None, split)
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape(o.shape[1], T, *o.shape[3:]), out)


class StudentStats(NamedTuple):
    logp_BT: jax.Array  # log pi(y_t)
    extra_logp_BTK: jax.Array  # log pi(ids[b, t, k]) for the requested extra ids (K may be 0)
    entropy_BT: jax.Array  # full-vocab entropy of pi(. | prefix)


def student_stats(
    h_BTE,
    head_EV,
    targets_BT,
    extra_ids_BTK,
    *,
    chunk: int,
    valid_vocab: int | None = None,
    temperature: float = 1.0,
) -> StudentStats:
    """log pi(y_t), log pi(extra ids), entropy of the tempered policy pi = softmax(z / T);
    differentiable w.r.t. h and head, with the chunk logits recomputed in the backward pass (see
    `_student_chunk_bwd`). With z_t = (h_t @ head) / T:

      logp_t = z_t[y_t] - logsumexp(z_t)
      H_t    = -sum_v p_v log p_v,   log p = z_t - logsumexp(z_t)
    """
    return _map_chunks(
        lambda h, y, ids: _student_chunk(h, head_EV, y, ids, valid_vocab, temperature),
        chunk,
        h_BTE,
        targets_BT,
        extra_ids_BTK,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _student_chunk(h_BCE, head_EV, y_BC, ids_BCK, valid_vocab, temperature) -> StudentStats:
    return _student_chunk_fwd(h_BCE, head_EV, y_BC, ids_BCK, valid_vocab, temperature)[0]


def _student_chunk_fwd(h_BCE, head_EV, y_BC, ids_BCK, valid_vocab, temperature):
    """The chunk's StudentStats; residuals: the inputs plus logsumexp and entropy [B, C]."""
    z = chunk_logits(h_BCE, head_EV, valid_vocab, temperature)
    lse = jax.nn.logsumexp(z, -1)
    # log-probs from the one logsumexp: no second max / sum pass over the vocabulary (a softmax
    # would redo both)
    logp = z - lse[..., None]
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    stats = StudentStats(*_gather_logp(logp, y_BC, ids_BCK), ent)
    return stats, (h_BCE, head_EV, y_BC, ids_BCK, lse, ent)


def _gather_logp(logp_BCV, y_BC, ids_BCK):
    return jnp.take_along_axis(logp_BCV, y_BC[..., None], -1)[..., 0], jnp.take_along_axis(logp_BCV, ids_BCK, -1)


def _student_chunk_bwd(valid_vocab, temperature, res, g: StudentStats):
    """One pass over the recomputed chunk logits z (already divided by T: the 1/T of dz/d(h @ head)
    comes back through the vjp of `chunk_logits`). With p = softmax(z), lp = log p and cotangents
    g_y, g_k, g_H of log p(y), log p(ids_k), H:

      dz = onehot(y) g_y + sum_k onehot(ids_k) g_k - p (g_y + sum_k g_k + g_H (lp + H))

    (dH/dz_v = -p_v (lp_v + H)). Autodiff of the forward re-derives logsumexp and the entropy
    and writes several [B, C, V] temporaries; this saves both from the forward and writes one.
    Masked vocabulary columns (ids >= valid_vocab) get 0 through the `where` in `chunk_logits`."""
    h_BCE, head_EV, y_BC, ids_BCK, lse_BC, ent_BC = res
    z, pull = jax.vjp(lambda h, w: chunk_logits(h, w, valid_vocab, temperature), h_BCE, head_EV)
    logp = z - lse_BC[..., None]
    p = jnp.exp(logp)
    g_sum = (g.logp_BT + g.extra_logp_BTK.sum(-1))[..., None]
    dz = -p * (g_sum + g.entropy_BT[..., None] * (logp + ent_BC[..., None]))
    # the one-hot terms as the transpose of the forward's gathers: a scatter with batch dims,
    # which GSPMD keeps on each device's rows (an .at[b, c, y] scatter was all-gathered)
    _, pull_gather = jax.vjp(lambda z: _gather_logp(z, y_BC, ids_BCK), z)
    dh, dhead = pull(pull_gather((g.logp_BT, g.extra_logp_BTK))[0] + dz)
    return dh, dhead, None, None


_student_chunk.defvjp(_student_chunk_fwd, _student_chunk_bwd)


class TeacherStats(NamedTuple):
    ids_BT: jax.Array  # argmax (or a temperature-1 sample) of pi_T: the CE target
    argmax_BT: jax.Array  # argmax of pi_T (divergence metrics)
    logp_y_BT: jax.Array  # log pi_T(y_t)
    logp_ids_BT: jax.Array  # log pi_T(ids_BT)
    topk_ids_BTK: jax.Array  # teacher top-K ids (K may be 0)
    topk_logp_BTK: jax.Array
    at_logp_BTJ: jax.Array  # log pi_T at caller-given ids (e.g. the student's top-K)


def teacher_stats(
    h_BTE,
    head_EV,
    targets_BT,
    at_ids_BTJ,
    key,
    *,
    chunk: int,
    top_k: int = 0,
    sample: bool = False,
    valid_vocab: int | None = None,
    rows_B: jax.Array | None = None,
    temperature: float = 1.0,
) -> TeacherStats:
    """Teacher quantities at every response position (no gradient flows), of softmax(z / T): the
    authors' veRL scores the teacher at the rollout temperature too. The argmax and top-K ids do
    not depend on T; log-probs and the sample (drawn from the tempered teacher) do.

    rows_B: int32 [B], each row's index in the whole rollout batch (default 0..B-1); with `sample`,
    row r's draw at position t is keyed by (key, r, t), so it does not depend on how the batch was
    split into micro-batches or the sequence into chunks."""
    h_BTE = jax.lax.stop_gradient(h_BTE)
    B, T = targets_BT.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    rows_B = jnp.arange(B, dtype=jnp.int32) if rows_B is None else rows_B

    def one(h_BCE, y_BC, at_BCJ, pos_BC):
        z = chunk_logits(h_BCE, head_EV, valid_vocab, temperature)
        logp = jax.nn.log_softmax(z, -1)
        argmax = jnp.argmax(z, -1).astype(jnp.int32)
        ids = argmax
        if sample:  # Gumbel-max: argmax_v (log p_v + g_v) is a draw from p
            ids = jnp.argmax(logp + _gumbel_BCV(key, rows_B, pos_BC[0], z.shape[-1]), -1).astype(jnp.int32)
        gather = lambda i: jnp.take_along_axis(logp, i, -1)  # noqa: E731
        tk_logp, tk_ids = (
            jax.lax.top_k(logp, top_k) if top_k else (logp[..., :0], jnp.zeros(logp.shape[:-1] + (0,), jnp.int32))
        )
        return TeacherStats(
            ids,
            argmax,
            gather(y_BC[..., None])[..., 0],
            gather(ids[..., None])[..., 0],
            tk_ids.astype(jnp.int32),
            tk_logp,
            gather(at_BCJ),
        )

    return _map_chunks(one, chunk, h_BTE, targets_BT, at_ids_BTJ, pos_BT)


def _gumbel_BCV(key, rows_B, pos_C, V: int) -> jax.Array:
    """Standard Gumbel noise [B, C, V]; row b, position t drawn with fold_in(fold_in(key, rows_B[b]), t)."""
    one = lambda r, t: jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, r), t), (V,))  # noqa: E731
    return jax.vmap(lambda r: jax.vmap(lambda t: one(r, t))(pos_C))(rows_B)


def student_old_stats(
    h_BTE,
    head_EV,
    targets_BT,
    at_ids_BTJ,
    *,
    chunk: int,
    top_k: int = 0,
    valid_vocab: int | None = None,
    temperature: float = 1.0,
):
    """Old-student quantities (no grad) of softmax(z / T): log pi_old(y_t) (at the rollout
    temperature, the sampler's own log-prob of y_t when top-k / top-p are off), log pi_old(at ids),
    and its own top-K (ids, log-probs) for the RKL-centered / RKL-dist baselines."""
    h_BTE = jax.lax.stop_gradient(h_BTE)

    def one(h_BCE, y_BC, at_BCJ):
        logp = jax.nn.log_softmax(chunk_logits(h_BCE, head_EV, valid_vocab, temperature), -1)
        tk_logp, tk_ids = (
            jax.lax.top_k(logp, top_k) if top_k else (logp[..., :0], jnp.zeros(logp.shape[:-1] + (0,), jnp.int32))
        )
        return (
            jnp.take_along_axis(logp, y_BC[..., None], -1)[..., 0],
            jnp.take_along_axis(logp, at_BCJ, -1),
            tk_ids.astype(jnp.int32),
            tk_logp,
        )

    return _map_chunks(one, chunk, h_BTE, targets_BT, at_ids_BTJ)
