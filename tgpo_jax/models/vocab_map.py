"""Which teacher ids may be a target of the student, and as which student id.

The teacher scores the STUDENT's token ids, but its argmax (or sample, or top-K entries) ranges over
the teacher's own vocabulary. An id the student's tokenizer cannot produce must not become a
training target: the student would be pulled toward an embedding row that decodes to nothing
(Qwen3's `</think>` = 151668 is such a row for a Qwen2.5 student, whose tokenizer has 151,665 ids
and writes "</think>" as '</' 'think' '>' = 522, 26865, 29).

`build_teacher_id_map` computes, once on the host from both tokenizers, a table over the teacher's
embedding rows that the score step applies to every teacher target id:

  student_id_V[v] = the student id that stands for teacher id v, or -1 (the target is masked out
                    of the teacher terms);
  oov_V[v]        = v is not an id of the student's tokenizer holding the same token (the metric
                    teacher/oov_frac counts the teacher targets for which it holds).

`models.teacher_oov` (TEACHER_OOV_MODES) picks the table:

  map    (default) a shared id maps to itself; any other teacher id with text maps to the FIRST id
         of the student's own tokenisation of that text ('</think>' -> '</' = 522), so the pull
         follows what the student can write; ids without text (padding rows, byte fragments that
         decode to nothing whole) are masked.
  mask   a shared id maps to itself; every other teacher id is masked.
  shared the authors' behaviour (their data/align_tokenizer.py): ids are shared as they are; every
         id below the student's embedding rows is kept, ids the student's tokenizer lacks included.
         The student's usable vocabulary is then its embedding rows, not its tokenizer's length.

"Shared id": below both the student's tokenizer length and its embedding rows, and both tokenizers
hold the same token string there. Pure numpy on the host; `apply_teacher_id_map` is the jnp side.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

TEACHER_OOV_MODES = ("map", "mask", "shared")
DEFAULT_TEACHER_OOV = "map"


class TeacherIdMap(NamedTuple):
    """A pytree of two arrays over the teacher's embedding rows V (see the module docstring)."""

    student_id_V: np.ndarray  # int32 [V]: student id standing for teacher id v; -1: masked
    oov_V: np.ndarray  # bool [V]: v is not an id of the student's tokenizer with the same token


def check_teacher_oov(mode: str) -> None:
    """Raises ValueError naming the accepted modes for an unknown `models.teacher_oov`."""
    if mode not in TEACHER_OOV_MODES:
        raise ValueError(f"teacher_oov={mode!r}; accepted: {', '.join(TEACHER_OOV_MODES)}")


def student_usable_vocab(mode: str, tokenizer_len: int, student_rows: int) -> int:
    """How many leading ids the student may sample and be trained on: its tokenizer's length
    (capped at its embedding rows), except in `shared` mode (the authors': every embedding row)."""
    check_teacher_oov(mode)
    return student_rows if mode == "shared" else min(tokenizer_len, student_rows)


def usable_vocab_override(tokenizer_len: int, rows: int, mode: str = DEFAULT_TEACHER_OOV) -> dict:
    """ModelConfig overrides that mask a model's logits beyond `student_usable_vocab` ({} when every
    row is usable): its sampler never emits, and no log-prob is taken over, an id without a token."""
    usable = student_usable_vocab(mode, tokenizer_len, rows)
    return {"valid_vocab_size": usable} if usable < rows else {}


def build_teacher_id_map(student_tok, teacher_tok, *, teacher_rows: int, student_rows: int, mode: str) -> TeacherIdMap:
    """The table for `mode` over teacher_rows ids (the teacher's embedding rows after alignment)."""
    check_teacher_oov(mode)
    s_len = min(len(student_tok), student_rows)
    shared_V = shared_ids(student_tok, teacher_tok, s_len, teacher_rows)
    ids_V = np.arange(teacher_rows, dtype=np.int32)
    if mode == "shared":
        student_id_V = np.where(ids_V < student_rows, ids_V, -1).astype(np.int32)
    else:
        student_id_V = np.where(shared_V, ids_V, -1).astype(np.int32)
        if mode == "map":
            others = np.flatnonzero(~shared_V[: min(len(teacher_tok), teacher_rows)])
            student_id_V[others] = first_pieces(student_tok, teacher_tok, others, s_len)
    return TeacherIdMap(student_id_V, ~shared_V)


def shared_ids(student_tok, teacher_tok, student_len: int, teacher_rows: int) -> np.ndarray:
    """bool [teacher_rows]: id v < student_len where both tokenizers hold the same token string."""
    n = min(student_len, len(teacher_tok), teacher_rows)
    s_tokens = student_tok.convert_ids_to_tokens(list(range(n)))
    t_tokens = teacher_tok.convert_ids_to_tokens(list(range(n)))
    out = np.zeros(teacher_rows, bool)
    out[:n] = [s is not None and s == t for s, t in zip(s_tokens, t_tokens)]
    return out


def first_pieces(student_tok, teacher_tok, teacher_ids: Iterable[int], student_len: int) -> np.ndarray:
    """int32 [len(teacher_ids)]: for each teacher id, the student id of the same token string if the
    student has one, else the first id of the student's encoding of the token's decoded text; -1
    when the text is empty or not whole characters (a byte fragment decodes to U+FFFD)."""
    teacher_ids = [int(v) for v in teacher_ids]
    s_vocab = student_tok.get_vocab()
    out = np.full(len(teacher_ids), -1, np.int32)
    texts, slots = [], []
    for i, (v, token) in enumerate(zip(teacher_ids, teacher_tok.convert_ids_to_tokens(teacher_ids))):
        same = s_vocab.get(token) if token is not None else None
        if same is not None and same < student_len:
            out[i] = same
            continue
        text = teacher_tok.decode([v], skip_special_tokens=False) if token is not None else ""
        if text and "\ufffd" not in text:
            texts.append(text)
            slots.append(i)
    if texts:  # one batched call: a wholly different tokenizer pair may leave ~10^5 ids to encode
        for i, ids in zip(slots, student_tok(texts, add_special_tokens=False)["input_ids"]):
            out[i] = ids[0] if ids and ids[0] < student_len else -1
    return out


def describe_teacher_id_map(
    id_map: TeacherIdMap, student_tok, teacher_tok, mode: str, *, student_rows: int, limit: int = 24
) -> list[str]:
    """Lines saying how each teacher id that is not a shared id is handled: one per id holding a
    token in the teacher's tokenizer (at most `limit`), one for the rows without a token."""
    t_len = min(len(teacher_tok), len(id_map.oov_V))
    with_token = [int(v) for v in np.flatnonzero(id_map.oov_V[:t_len])]
    lines = [f"teacher ids the student's tokenizer does not hold (models.teacher_oov: {mode}):"]
    for v in with_token[:limit]:
        lines.append(
            f"  {v} {teacher_tok.convert_ids_to_tokens(v)!r}: {_handling(id_map, v, student_tok, teacher_tok)}"
        )
    if len(with_token) > limit:
        lines.append(f"  ... and {len(with_token) - limit} more ids holding a teacher token")
    rows = len(id_map.oov_V)
    if t_len < rows:
        kept = int(np.sum(id_map.student_id_V[t_len:] >= 0))
        lines.append(
            f"  {t_len}..{rows - 1} ({rows - t_len} embedding rows with no teacher token): "
            + (f"{kept} kept as they are (ids below the student's {student_rows} rows), " if kept else "")
            + f"{rows - t_len - kept} masked"
        )
    return lines


def _handling(id_map: TeacherIdMap, v: int, student_tok, teacher_tok) -> str:
    """How teacher id v (not a shared id) is handled, in words."""
    target = int(id_map.student_id_V[v])
    text = teacher_tok.decode([v], skip_special_tokens=False)
    if target < 0:
        return "masked out of the teacher terms"
    if target == v:
        shown = student_tok.decode([v], skip_special_tokens=False) if v < len(student_tok) else ""
        return f"kept as id {v}, which the student's tokenizer decodes as {shown!r} (the authors' behaviour)"
    pieces = student_tok.convert_ids_to_tokens(student_tok(text, add_special_tokens=False)["input_ids"])
    shown = " ".join(repr(p) for p in pieces[:6]) + (f" ... ({len(pieces)} pieces)" if len(pieces) > 6 else "")
    return f"mapped to {target} {student_tok.convert_ids_to_tokens(target)!r} (the student writes {text!r} as {shown})"


def apply_teacher_id_map(id_map: TeacherIdMap | None, ids, student_vocab: int):
    """(student ids, valid, changed, oov) for teacher target ids of any shape (jnp arrays).

    valid: 1.0 where the target stays in the teacher terms (ids set to 0 elsewhere), changed: 1.0
    where it became another id (map mode), oov: 1.0 where the teacher id is not a shared id.
    id_map None: no tokenizer information, so only ids below the student's usable vocabulary are
    kept (as they are) and counted as shared."""
    import jax.numpy as jnp

    if id_map is None:
        mapped, oov = ids, ids >= student_vocab
    else:
        mapped, oov = id_map.student_id_V[ids], id_map.oov_V[ids]
    valid = (mapped >= 0) & (mapped < student_vocab)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return jnp.where(valid, mapped, 0), f32(valid), f32(valid & (mapped != ids)), f32(oov)


__all__ = [
    "DEFAULT_TEACHER_OOV",
    "TEACHER_OOV_MODES",
    "TeacherIdMap",
    "apply_teacher_id_map",
    "build_teacher_id_map",
    "check_teacher_oov",
    "describe_teacher_id_map",
    "first_pieces",
    "shared_ids",
    "student_usable_vocab",
    "usable_vocab_override",
]
