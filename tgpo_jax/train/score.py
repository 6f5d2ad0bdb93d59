"""The jitted `score` step: one student forward (old log-probs, its top-K where needed) and one
teacher forward (argmax or sample, log-prob of the student's token, top-K) over a rollout batch.

The teacher is run teacher-forced on the STUDENT's token ids; logits at sequence position P-1+t
predict response token t. Results are reused by every mini-batch update of the iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tgpo_jax.models.decoder import left_pad_positions
from tgpo_jax.models.layers import MASK_VALUE
from tgpo_jax.objectives.logprobs import student_old_stats, teacher_stats
from tgpo_jax.objectives.registry import ObjectiveConfig


def response_hidden(model, prompt_BP, prompt_mask_BP, resp_BT, resp_mask_BT, remat: bool = False):
    """Final hidden states [B, T, E] at the positions that predict each response token."""
    tokens = jnp.concatenate([prompt_BP, resp_BT], 1)
    mask = jnp.concatenate([prompt_mask_BP, resp_mask_BT], 1)
    h, _ = model.hidden_states(tokens, left_pad_positions(mask), mask, remat=remat)
    P, T = prompt_BP.shape[1], resp_BT.shape[1]
    return h[:, P - 1 : P + T - 1]


def _vocab(cfg):
    return cfg.valid_vocab_size or cfg.vocab_size


def _masked_mean(x_BT, mask_BT):
    return jnp.sum(x_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


@functools.partial(jax.jit, static_argnames=("s_graphdef", "t_graphdef", "obj_cfg", "chunk"))
def score(s_graphdef, s_state, t_graphdef, t_state, batch, key, *, obj_cfg: ObjectiveConfig, chunk: int):
    """batch: prompt [B, P], prompt_mask, tokens [B, T] (response), mask. Returns (scored, metrics)."""
    obj = obj_cfg.objective
    student = nnx.merge(s_graphdef, s_state)
    y, mask = batch["tokens"], batch["mask"]
    mask_f = mask.astype(jnp.float32)
    B, T = y.shape
    zeros_k = lambda k, dt=jnp.float32: jnp.zeros((B, T, k), dt)  # noqa: E731
    hS = response_hidden(student, batch["prompt"], batch["prompt_mask"], y, mask)
    s_vocab, s_head = _vocab(student.cfg), student.lm_head_EV()
    out = {
        "student_topk_ids": zeros_k(0, jnp.int32),
        "old_topk_logp": zeros_k(0),
        "teacher_at_student_topk": zeros_k(0),
        "teacher_topk_ids": zeros_k(0, jnp.int32),
        "teacher_topk_logp": zeros_k(0),
    }
    s_topk = obj.student_topk(obj_cfg)
    if s_topk:  # the teacher must be read at the student's own top-K ids: student pass first
        old_logp, _, out["student_topk_ids"], out["old_topk_logp"] = student_old_stats(
            hS, s_head, y, zeros_k(0, jnp.int32), chunk=chunk, top_k=s_topk, valid_vocab=s_vocab
        )
    if not obj.needs_teacher:
        old_logp, *_ = student_old_stats(hS, s_head, y, zeros_k(0, jnp.int32), chunk=chunk, valid_vocab=s_vocab)
        out.update(
            old_logp=old_logp,
            teacher_ids=jnp.zeros_like(y),
            teacher_valid=jnp.zeros_like(mask_f),
            teacher_logp=jnp.zeros_like(mask_f),
            old_p_teacher=jnp.zeros_like(mask_f),
        )
        return out, {}
    teacher = nnx.merge(t_graphdef, t_state)
    hT = response_hidden(teacher, batch["prompt"], batch["prompt_mask"], y, mask)
    t = teacher_stats(
        hT,
        teacher.lm_head_EV(),
        y,
        out["student_topk_ids"],
        key,
        chunk=chunk,
        top_k=obj.teacher_topk(obj_cfg),
        sample=obj.teacher_sample,
        valid_vocab=_vocab(teacher.cfg),
    )
    # A teacher id the student cannot decode is masked out of the CE term and counted.
    valid = (t.ids_BT < s_vocab).astype(jnp.float32)
    ids = jnp.where(valid > 0, t.ids_BT, 0)
    if not s_topk:
        old_logp, at_logp, _, _ = student_old_stats(hS, s_head, y, ids[..., None], chunk=chunk, valid_vocab=s_vocab)
        out["old_p_teacher"] = jnp.exp(at_logp[..., 0]) * valid
    else:
        out["old_p_teacher"] = jnp.zeros_like(mask_f)
    out.update(
        old_logp=old_logp,
        teacher_ids=ids,
        teacher_valid=valid,
        teacher_logp=t.logp_y_BT,
        # top-K ids the student cannot decode drop out of the renormalised support
        teacher_topk_ids=jnp.where(t.topk_ids_BTK < s_vocab, t.topk_ids_BTK, 0),
        teacher_topk_logp=jnp.where(t.topk_ids_BTK < s_vocab, t.topk_logp_BTK, MASK_VALUE),
        teacher_at_student_topk=t.at_logp_BTJ,
    )
    metrics = {
        "gap/reverse_kl_k1": _masked_mean(old_logp - t.logp_y_BT, mask_f),
        "gap/mismatch_ratio": _masked_mean((t.argmax_BT != y).astype(jnp.float32), mask_f),
        "gap/teacher_ppl": jnp.exp(-_masked_mean(t.logp_y_BT, mask_f)),
        "gap/teacher_low_mass_frac": _masked_mean((t.logp_y_BT < jnp.log(1e-3)).astype(jnp.float32), mask_f),
        "teacher/masked_ids": jnp.sum((1.0 - valid) * mask_f),
    }
    return out, metrics
