"""The jitted `score` step: one student forward (old log-probs, its top-K where needed) and one
teacher forward (argmax or sample, log-prob of the student's token, top-K) over a rollout batch,
in micro-batches of rows scored one after another inside one program (bounded memory at any batch
size). It fills only the Batch fields the objective lists in `Objective.scored` (registry.py).

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
from tgpo_jax.models.vocab_map import TeacherIdMap, apply_teacher_id_map
from tgpo_jax.objectives.batch import Batch, merge_micro_batches, split_micro_batches
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


def score(
    s_graphdef,
    s_state,
    t_graphdef,
    t_state,
    batch: Batch,
    key,
    *,
    obj_cfg: ObjectiveConfig,
    chunk: int,
    micro_batch: int | None = None,
    temperature: float = 1.0,
    id_map: TeacherIdMap | None = None,
):
    """(batch with old_logp_BT and the objective's `scored` fields filled, gap metrics).

    batch: a Batch with the rollout fields (prompt_BP, prompt_mask_BP, tokens_BT, mask_BT); the
    fields the objective does not ask for stay None (batch.py documents each field).
    micro_batch: rows per scoring micro-batch (must divide B); None: all B rows at once.
    temperature: the rollout temperature (rollout.temperature); the student is scored from
    logits / temperature (logprobs.py), the teacher at obj_cfg.teacher_temperature_at(temperature).
    id_map: the teacher-id table of models/vocab_map.py (arrays over the teacher's rows) applied to
    every teacher target id; None: teacher ids below the student's usable vocabulary are kept."""
    fields, metrics = _score(
        s_graphdef,
        s_state,
        t_graphdef,
        t_state,
        batch,
        key,
        id_map,
        obj_cfg=obj_cfg,
        chunk=chunk,
        micro_batch=micro_batch or batch.size,
        temperature=temperature,
    )
    return batch.replace(**fields), metrics


@functools.partial(
    jax.jit, static_argnames=("s_graphdef", "t_graphdef", "obj_cfg", "chunk", "micro_batch", "temperature")
)
def _score(
    s_graphdef,
    s_state,
    t_graphdef,
    t_state,
    batch: Batch,
    key,
    id_map: TeacherIdMap | None = None,
    *,
    obj_cfg: ObjectiveConfig,
    chunk: int,
    micro_batch: int,
    temperature: float = 1.0,
):
    """The scored fields {Batch field name: array [B, ...]} and the gap metrics. Only the new fields
    leave the jit (returning the whole batch would copy the rollout arrays).

    The B rows are scored in M = B / micro_batch micro-batches, one after another (`lax.map`), so
    only one micro-batch's activations and logit chunks are live at a time. The split is strided
    (`split_micro_batches`: no gather of a data-parallel batch) and every output goes back to the
    original row order. Nothing depends on the split: the teacher's sample is keyed by each row's
    index in the whole batch, and the gap metrics are formed from per-row sums over all B rows."""
    rows = (
        batch.prompt_BP,
        batch.prompt_mask_BP,
        batch.tokens_BT,
        batch.mask_BT,
        jnp.arange(batch.size, dtype=jnp.int32),
    )
    needs_teacher = obj_cfg.objective.needs_teacher

    def one(rows_b):  # the models are merged inside the loop body: their arrays are its inputs
        student = nnx.merge(s_graphdef, s_state)
        teacher = nnx.merge(t_graphdef, t_state) if needs_teacher else None
        return _score_rows(
            student, teacher, *rows_b, key, id_map, obj_cfg=obj_cfg, chunk=chunk, temperature=temperature
        )

    fields, row_sums = merge_micro_batches(jax.lax.map(one, split_micro_batches(rows, micro_batch)))
    return fields, (_gap_metrics(row_sums) if needs_teacher else {})


def _score_rows(
    student, teacher, prompt_BP, prompt_mask_BP, y_BT, mask_BT, rows_B, key, id_map, *, obj_cfg, chunk, temperature=1.0
):
    """(scored fields, per-row gap sums) of one micro-batch of rows; rows_B: their indices in the
    whole batch. teacher: None for an objective without one (the gap sums are then {})."""
    obj = obj_cfg.objective
    no_ids = jnp.zeros(y_BT.shape + (0,), jnp.int32)  # student_old_stats' "no extra ids" (K = 0)
    hS = response_hidden(student, prompt_BP, prompt_mask_BP, y_BT, mask_BT)
    s_vocab = _vocab(student.cfg)
    old = functools.partial(
        student_old_stats, hS, student.lm_head_EV(), y_BT, chunk=chunk, valid_vocab=s_vocab, temperature=temperature
    )
    out = {}
    s_topk = obj.student_topk(obj_cfg)
    s_topk_ids = no_ids
    if s_topk:  # the teacher must be read at the student's own top-K ids: student pass first
        old_logp, _, s_topk_ids, out["old_topk_logp_BTK"] = old(no_ids, top_k=s_topk)
        out["student_topk_ids_BTK"] = s_topk_ids
    if teacher is None:
        out["old_logp_BT"], *_ = old(no_ids)
        return out, {}
    hT = response_hidden(teacher, prompt_BP, prompt_mask_BP, y_BT, mask_BT)
    t = teacher_stats(
        hT,
        teacher.lm_head_EV(),
        y_BT,
        s_topk_ids,
        key,
        chunk=chunk,
        top_k=obj.teacher_topk(obj_cfg),
        sample=obj.teacher_sample,
        valid_vocab=_vocab(teacher.cfg),
        rows_B=rows_B,
        temperature=obj_cfg.teacher_temperature_at(temperature),
    )
    # A teacher id the student's tokenizer cannot produce is mapped to the student's first piece of
    # its text or masked out of the teacher terms (models.teacher_oov), and counted either way.
    ids, valid, changed, oov = apply_teacher_id_map(id_map, t.ids_BT, s_vocab)
    if not s_topk:
        # pi_old(y*_t) is read in the same pass as pi_old(y_t), only where the objective uses it
        old_logp, at_logp, _, _ = old(ids[..., None] if "old_p_teacher_BT" in obj.scored else no_ids)
        if "old_p_teacher_BT" in obj.scored:
            out["old_p_teacher_BT"] = jnp.exp(at_logp[..., 0]) * valid
    out.update(_teacher_fields(obj.scored, t, ids, valid, s_vocab, id_map), old_logp_BT=old_logp)
    fields = {k: v for k, v in out.items() if k == "old_logp_BT" or k in obj.scored}
    return fields, _gap_row_sums(old_logp, t, y_BT, mask_BT.astype(jnp.float32), valid, changed, oov)


def _teacher_fields(scored: frozenset[str], t, ids_BT, valid_BT, s_vocab: int, id_map) -> dict:
    """The teacher-side Batch fields the objective asked for (`scored`)."""
    out = {
        "teacher_ids_BT": ids_BT,
        "teacher_valid_BT": valid_BT,
        "teacher_logp_BT": t.logp_y_BT,
        "teacher_at_student_topk_BTK": t.at_logp_BTJ,
    }
    if "teacher_topk_ids_BTK" in scored or "teacher_topk_logp_BTK" in scored:
        # top-K ids the student cannot produce are mapped or drop out of the renormalised support
        topk_ids, kept, _, _ = apply_teacher_id_map(id_map, t.topk_ids_BTK, s_vocab)
        out["teacher_topk_ids_BTK"] = topk_ids
        out["teacher_topk_logp_BTK"] = _merge_duplicates(topk_ids, jnp.where(kept > 0, t.topk_logp_BTK, MASK_VALUE))
    return {k: v for k, v in out.items() if k in scored}


def _merge_duplicates(ids_BTK, logp_BTK):
    """logp_BTK with the mass of entries sharing an id summed into the first of them (the others get
    MASK_VALUE, leaving the support): after mapping, '</think>' and '</' of one top-K both stand for
    student id '</', which must appear once in the forward-KL support. Masked entries stay masked.
    One entry k at a time (lax.map): [B, T, K] temporaries, never [B, T, K, K] (K may be 100)."""
    K = ids_BTK.shape[-1]
    live_BTK = logp_BTK > 0.5 * MASK_VALUE

    def entry(k):
        same_BTK = (ids_BTK == ids_BTK[..., k, None]) & live_BTK & live_BTK[..., k, None]
        merged_BT = jax.nn.logsumexp(jnp.where(same_BTK, logp_BTK, -jnp.inf), -1)
        first_BT = ~jnp.any(same_BTK & (jnp.arange(K) < k), -1)
        return jnp.where(live_BTK[..., k] & first_BT, merged_BT, MASK_VALUE)

    return jnp.moveaxis(jax.lax.map(entry, jnp.arange(K)), 0, -1)


def _gap_row_sums(old_logp_BT, t, y_BT, mask_BT, valid_BT, changed_BT, oov_BT) -> dict:
    """Per-row sums [B] over the real response tokens (mask_BT) of the gap terms, and the token count."""
    row_sum = lambda x_BT: jnp.sum(x_BT * mask_BT, -1)  # noqa: E731
    return {
        "tokens": jnp.sum(mask_BT, -1),
        "reverse_kl_k1": row_sum(old_logp_BT - t.logp_y_BT),
        "mismatch": row_sum((t.argmax_BT != y_BT).astype(jnp.float32)),
        "teacher_logp": row_sum(t.logp_y_BT),
        "teacher_low_mass": row_sum((t.logp_y_BT < jnp.log(1e-3)).astype(jnp.float32)),
        "masked_ids": row_sum(1.0 - valid_BT),
        "mapped_ids": row_sum(changed_BT),
        "oov": row_sum(oov_BT),
    }


def _gap_metrics(row_sums_B: dict) -> dict:
    """Teacher/student gap on the sampled responses, from `_gap_row_sums` over all B rows: with
    N = sum_b tokens_b, token means mean(x) = sum_b x_b / max(N, 1) of
      reverse_kl_k1 = log pi_old(y_t) - log pi_T(y_t),  mismatch = [argmax pi_T != y_t],
      teacher_low_mass = [pi_T(y_t) < 1e-3];
    teacher_ppl = exp(-mean(log pi_T(y_t))). Of the teacher's targets (argmax or sample):
    teacher/masked_ids = the count masked out of the teacher terms, teacher/mapped_ids = the count
    replaced by the student's first piece of their text, teacher/oov_frac = mean([the target is not
    an id of the student's tokenizer]) (models/vocab_map.py), whatever was done with it."""
    total = {k: jnp.sum(v) for k, v in row_sums_B.items()}
    mean = lambda k: total[k] / jnp.maximum(total["tokens"], 1.0)  # noqa: E731
    return {
        "gap/reverse_kl_k1": mean("reverse_kl_k1"),
        "gap/mismatch_ratio": mean("mismatch"),
        "gap/teacher_ppl": jnp.exp(-mean("teacher_logp")),
        "gap/teacher_low_mass_frac": mean("teacher_low_mass"),
        "teacher/masked_ids": total["masked_ids"],
        "teacher/mapped_ids": total["mapped_ids"],
        "teacher/oov_frac": mean("oov"),
    }
