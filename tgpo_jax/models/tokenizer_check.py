"""A check that a student's and a teacher's tokenizers agree: distillation compares per-token
distributions, so every id must mean the same text in both models. `check_tokenizers_agree`
compares the two tokenizers on probe texts and special tokens (the embedding sizes are aligned
separately, by models/vocab.py's `align_vocab`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any


class TokenizerMismatchError(ValueError):
    """The student's and the teacher's tokenizers map some text or special token to different ids."""


class TokenizerMismatchWarning(UserWarning):
    """Emitted when a tokenizer mismatch was explicitly allowed."""


DEFAULT_PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Let's compute 12 + 7 = 19. The answer is \\boxed{19}.",
    "So the probability is \\boxed{3/4}, i.e. $\\frac{3}{4} = 0.75$.",
    "\\int_0^1 x^2 \\, dx = \\left[\\frac{x^3}{3}\\right]_0^1 = \\frac{1}{3}",
    "0123456789 3.14159 -42 1,000,000 2024-01-31 1e-5",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "  leading spaces,\ttabs,\n\nblank lines,   and trailing spaces   ",
    "Unicode: café, naïve, Straße, 数学, π ≈ 3.14, ∑, émoji 🙂",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
)
_NAMED_SPECIAL_TOKENS = ("eos_token", "bos_token", "pad_token", "unk_token")


@dataclasses.dataclass(frozen=True)
class Disagreement:
    """One way the tokenizers differ. kind: 'length' | 'special_token' | 'encoding'."""

    kind: str
    what: str
    student: Any
    teacher: Any
    detail: str = ""

    def describe(self) -> str:
        student, teacher = _fmt_value(self.student), _fmt_value(self.teacher)
        line = f"[{self.kind}] {self.what}: student {student} vs teacher {teacher}"
        return f"{line} ({self.detail})" if self.detail else line


@dataclasses.dataclass(frozen=True)
class TokenizerReport:
    """Outcome of check_tokenizers_agree; `ok` when no disagreement was found."""

    student_len: int
    teacher_len: int
    num_probe_texts: int
    num_special_tokens: int
    disagreements: tuple[Disagreement, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.disagreements

    def __str__(self) -> str:
        head = (
            f"tokenizer check: len(student)={self.student_len}, len(teacher)={self.teacher_len}, "
            f"{self.num_probe_texts} probe texts, {self.num_special_tokens} special tokens: "
        )
        if self.ok:
            return head + "no disagreement"
        lines = [head + f"{len(self.disagreements)} disagreement(s)"]
        lines += [f"  - {d.describe()}" for d in self.disagreements]
        return "\n".join(lines)


def check_tokenizers_agree(
    student_tok, teacher_tok, *, probe_texts: Sequence[str] | None = None, allow_mismatch: bool = False
) -> TokenizerReport:
    """Compares two Hugging Face tokenizers: len(tokenizer), the eos/bos/pad/unk tokens and their ids,
    the ids of every other special token, and the encodings (without added special tokens) of the
    probe texts (default DEFAULT_PROBE_TEXTS: English, math/LaTeX, digits, code, whitespace, unicode,
    chat markup), plus the encoding of the first probe with the tokenizer's added special tokens
    (e.g. a BOS).

    Returns the report when the tokenizers agree, or when allow_mismatch (then also warns with a
    TokenizerMismatchWarning). Raises TokenizerMismatchError otherwise.
    """
    texts = tuple(DEFAULT_PROBE_TEXTS if probe_texts is None else probe_texts)
    found: list[Disagreement] = []
    if len(student_tok) != len(teacher_tok):
        found.append(Disagreement("length", "len(tokenizer)", len(student_tok), len(teacher_tok)))
    specials = _special_token_table(student_tok) | _special_token_table(teacher_tok)
    found += _compare_special_tokens(student_tok, teacher_tok, sorted(specials))
    found += _compare_encodings(student_tok, teacher_tok, texts)
    report = TokenizerReport(len(student_tok), len(teacher_tok), len(texts), len(specials), tuple(found))
    if report.ok:
        return report
    if not allow_mismatch:
        raise TokenizerMismatchError(
            f"the student's and the teacher's tokenizers disagree, so their per-token log-probs would "
            f"not refer to the same text.\n{report}\nIf the differences are harmless for this run, set "
            f"`allow_tokenizer_mismatch: true` in the config to proceed anyway."
        )
    warnings.warn(
        f"proceeding with mismatched tokenizers (allow_tokenizer_mismatch: true)\n{report}",
        TokenizerMismatchWarning,
        stacklevel=2,
    )
    return report


def _special_token_table(tok) -> set[str]:
    """The strings of every special token: named ones, extra ones and added tokens marked special."""
    names = set(tok.all_special_tokens)
    names |= {str(t) for t in tok.added_tokens_decoder.values() if getattr(t, "special", False)}
    return names


def _compare_special_tokens(student_tok, teacher_tok, special_tokens: Sequence[str]) -> list[Disagreement]:
    """Disagreements in the named special tokens (string and id) and in the id of each special token."""
    found = []
    for attr in _NAMED_SPECIAL_TOKENS:
        s = (getattr(student_tok, attr), getattr(student_tok, attr + "_id"))
        t = (getattr(teacher_tok, attr), getattr(teacher_tok, attr + "_id"))
        if s != t:
            found.append(Disagreement("special_token", attr, _fmt_token(*s), _fmt_token(*t)))
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    for token in special_tokens:
        s_id, t_id = s_vocab.get(token), t_vocab.get(token)
        if s_id != t_id:
            found.append(Disagreement("special_token", f"id of {token!r}", s_id, t_id))
    return found


def _compare_encodings(student_tok, teacher_tok, texts: Sequence[str]) -> list[Disagreement]:
    """Disagreements in the ids of each text (no added special tokens); then, when texts[0] itself
    agrees, in its ids with the tokenizers' added special tokens (a BOS one adds and the other not)."""
    found: list[Disagreement] = []
    for i, text in enumerate(texts):
        found += _compare_one_encoding(student_tok, teacher_tok, text, add_special=False)
        if i == 0 and not found:  # only when the plain encoding agrees: isolates BOS/EOS handling
            found += _compare_one_encoding(student_tok, teacher_tok, text, add_special=True)
    return found


def _compare_one_encoding(student_tok, teacher_tok, text: str, *, add_special: bool) -> list[Disagreement]:
    """[] when both tokenizers give the same ids for text, else [the Disagreement]."""
    s_ids = list(student_tok.encode(text, add_special_tokens=add_special))
    t_ids = list(teacher_tok.encode(text, add_special_tokens=add_special))
    if s_ids == t_ids:
        return []
    what = f"encoding of {text!r}" + (" with add_special_tokens=True" if add_special else "")
    return [Disagreement("encoding", what, s_ids, t_ids, _first_difference(student_tok, teacher_tok, s_ids, t_ids))]


def _fmt_value(value: Any, limit: int = 32) -> str:
    """str(value) ('absent' for None); a list of ids is cut after `limit` entries for readability."""
    if value is None:
        return "absent"
    if not isinstance(value, list) or len(value) <= limit:
        return str(value)
    return f"{str(value[:limit])[:-1]}, ... ({len(value)} ids)]"


def _first_difference(student_tok, teacher_tok, s_ids: list[int], t_ids: list[int]) -> str:
    """'first difference at position i: student id 'tok' vs teacher id 'tok''."""
    i = next((k for k, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))
    s = f"{s_ids[i]} {student_tok.convert_ids_to_tokens(s_ids[i])!r}" if i < len(s_ids) else "<end>"
    t = f"{t_ids[i]} {teacher_tok.convert_ids_to_tokens(t_ids[i])!r}" if i < len(t_ids) else "<end>"
    return f"first difference at position {i}: student {s} vs teacher {t}"


def _fmt_token(token, token_id) -> str:
    return "None" if token is None else f"{str(token)!r} (id {token_id})"


__all__ = [
    "TokenizerMismatchError",
    "TokenizerMismatchWarning",
    "check_tokenizers_agree",
    "TokenizerReport",
    "Disagreement",
    "DEFAULT_PROBE_TEXTS",
]
