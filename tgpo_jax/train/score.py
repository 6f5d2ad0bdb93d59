"""The jitted `score` step: one student forward (old log-probs, its top-K where needed) and one
teacher forward (argmax or sample, log-prob of the student's token, top-K) over a rollout batch.
It fills only the Batch fields the objective lists in `Objective.scored` (registry.py).

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
from tgpo_jax.objectives.batch import Batch
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


def score(s_graphdef, s_state, t_graphdef, t_state, batch: Batch, key, *, obj_cfg: ObjectiveConfig, chunk: int):
    """(batch with old_logp_BT and the objective's `scored` fields filled, gap metrics).

    batch: a Batch with the rollout fields (prompt_BP, prompt_mask_BP, tokens_BT, mask_BT); the
    fields the objective does not ask for stay None (batch.py documents each field)."""
    fields, metrics = _score(s_graphdef, s_state, t_graphdef, t_state, batch, key, obj_cfg=obj_cfg, chunk=chunk)
    return batch.replace(**fields), metrics


@functools.partial(jax.jit, static_argnames=("s_graphdef", "t_graphdef", "obj_cfg", "chunk"))
def _score(s_graphdef, s_state, t_graphdef, t_state, batch: Batch, key, *, obj_cfg: ObjectiveConfig, chunk: int):
    """The scored fields {Batch field name: array} and the gap metrics. Only the new fields leave
    the jit (returning the whole batch would copy the rollout arrays)."""
    obj = obj_cfg.objective
    student = nnx.merge(s_graphdef, s_state)
    y, mask = batch.tokens_BT, batch.mask_BT
    no_ids = jnp.zeros(y.shape + (0,), jnp.int32)  # student_old_stats' "no extra ids" (K = 0)
    hS = response_hidden(student, batch.prompt_BP, batch.prompt_mask_BP, y, mask)
    s_vocab, s_head = _vocab(student.cfg), student.lm_head_EV()
    out = {}
    s_topk = obj.student_topk(obj_cfg)
    s_topk_ids = no_ids
    if s_topk:  # the teacher must be read at the student's own top-K ids: student pass first
        old_logp, _, s_topk_ids, out["old_topk_logp_BTK"] = student_old_stats(
            hS, s_head, y, no_ids, chunk=chunk, top_k=s_topk, valid_vocab=s_vocab
        )
        out["student_topk_ids_BTK"] = s_topk_ids
    if not obj.needs_teacher:
        out["old_logp_BT"], *_ = student_old_stats(hS, s_head, y, no_ids, chunk=chunk, valid_vocab=s_vocab)
        return out, {}
    teacher = nnx.merge(t_graphdef, t_state)
    hT = response_hidden(teacher, batch.prompt_BP, batch.prompt_mask_BP, y, mask)
    t = teacher_stats(
        hT,
        teacher.lm_head_EV(),
        y,
        s_topk_ids,
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
        # pi_old(y*_t) is read in the same pass as pi_old(y_t), only where the objective uses it
        at_ids = ids[..., None] if "old_p_teacher_BT" in obj.scored else no_ids
        old_logp, at_logp, _, _ = student_old_stats(hS, s_head, y, at_ids, chunk=chunk, valid_vocab=s_vocab)
        if "old_p_teacher_BT" in obj.scored:
            out["old_p_teacher_BT"] = jnp.exp(at_logp[..., 0]) * valid
    out.update(_teacher_fields(obj.scored, t, ids, valid, s_vocab), old_logp_BT=old_logp)
    return {k: v for k, v in out.items() if k == "old_logp_BT" or k in obj.scored}, _gap_metrics(
        old_logp, t, y, mask.astype(jnp.float32), valid
    )


def _teacher_fields(scored: frozenset[str], t, ids_BT, valid_BT, s_vocab: int) -> dict:
    """The teacher-side Batch fields the objective asked for (`scored`)."""
    out = {
        "teacher_ids_BT": ids_BT,
        "teacher_valid_BT": valid_BT,
        "teacher_logp_BT": t.logp_y_BT,
        "teacher_at_student_topk_BTK": t.at_logp_BTJ,
    }
    if "teacher_topk_ids_BTK" in scored or "teacher_topk_logp_BTK" in scored:
        # top-K ids the student cannot decode drop out of the renormalised support
        decodable = t.topk_ids_BTK < s_vocab
        out["teacher_topk_ids_BTK"] = jnp.where(decodable, t.topk_ids_BTK, 0)
        out["teacher_topk_logp_BTK"] = jnp.where(decodable, t.topk_logp_BTK, MASK_VALUE)
    return {k: v for k, v in out.items() if k in scored}


def _gap_metrics(old_logp_BT, t, y_BT, mask_BT, valid_BT) -> dict:
    """Teacher/student gap on the sampled responses (token means over real response tokens)."""
    return {
        "gap/reverse_kl_k1": _masked_mean(old_logp_BT - t.logp_y_BT, mask_BT),
        "gap/mismatch_ratio": _masked_mean((t.argmax_BT != y_BT).astype(jnp.float32), mask_BT),
        "gap/teacher_ppl": jnp.exp(-_masked_mean(t.logp_y_BT, mask_BT)),
        "gap/teacher_low_mass_frac": _masked_mean((t.logp_y_BT < jnp.log(1e-3)).astype(jnp.float32), mask_BT),
        "teacher/masked_ids": jnp.sum((1.0 - valid_BT) * mask_BT),
    }
