"""A string grader for boxed answers: the last `\\boxed{...}` (balanced braces) of a text, normalised
and compared as a string with the normalised ground truth.

It is the OR-fallback of the paper's evaluation (math-verify OR boxed grader). Everything here is
linear-time string scanning: no regex with backtracking over model output, no eval.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
MAX_ANSWER_CHARS = 1000  # a longer "answer" is never graded correct by string comparison


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (braces balanced), or of the
    last `\\boxed 5` (space form, up to whitespace or `$`). None when there is none or it is
    unclosed."""
    start = max(text.rfind(c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if text.startswith(" ", i) and not text.startswith("{", i):
        rest = text[i:].lstrip(" ")
        end = next((j for j, ch in enumerate(rest) if ch.isspace() or ch == "$"), len(rest))
        return rest[:end] or None
    if not text.startswith("{", i):
        return None
    return _balanced(text, i)


def _balanced(text: str, open_at: int) -> str | None:
    """The text between the brace at `open_at` and its matching close brace (None if unclosed)."""
    depth = 0
    for j in range(open_at, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : j]
    return None


_REMOVE = (
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\quad",
    "\\displaystyle",
    "\\$",
    "$",
    "^\\circ",
    "^{\\circ}",
    "\\%",
    "%",
)
_REPLACE = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\le ", "\\leq "), ("\\ge ", "\\geq "))
_TEXT_WRAPPERS = ("\\text", "\\textbf", "\\mathrm", "\\mbox", "\\mathbf")
_SIMPLE_FRAC = re.compile(r"^(-?\d+)/(\d+)$")  # anchored, no nested quantifiers: linear


def normalize_answer(s: str) -> str:
    """A canonical string for comparison (after the MATH benchmark's `strip_string`): no spaces or
    sizing commands, \\dfrac -> \\frac, \\text{..} unwrapped, `a/b` -> \\frac{a}{b}, leading zero
    added to `.5`, trailing `.0`s, `.`, units of degrees and percent removed."""
    s = s.strip()
    for old in _REMOVE:
        s = s.replace(old, "")
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = _unwrap_text(s)
    s = "".join(s.split()).rstrip(".")
    s = _fix_short_fracs(s)
    m = _SIMPLE_FRAC.match(s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s.startswith("."):
        s = "0" + s
    if "." in s and s.replace(".", "", 1).lstrip("-").isdigit():
        s = s.rstrip("0").rstrip(".")
    if len(s) >= 2 and s[1] == "=" and s[0].isalpha():  # "x=5" -> "5"
        s = s[2:]
    return s


def _unwrap_text(s: str) -> str:
    """`\\text{abc}` -> `abc` for each wrapper command (balanced braces)."""
    for cmd in _TEXT_WRAPPERS:
        out, i = [], 0
        while True:
            j = s.find(cmd + "{", i)
            if j < 0:
                out.append(s[i:])
                break
            inner = _balanced(s, j + len(cmd))
            if inner is None:
                out.append(s[i:])
                break
            out.append(s[i:j] + inner)
            i = j + len(cmd) + len(inner) + 2
        s = "".join(out)
    return s


def _fix_short_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}` (single-character arguments)."""
    parts = s.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        out.append("\\frac")
        if part.startswith("{") or not part:
            out.append(part)
            continue
        a, rest = part[0], part[1:]
        if rest.startswith("{"):
            out.append("{" + a + "}" + rest)
        elif rest:
            out.append("{" + a + "}{" + rest[0] + "}" + rest[1:])
        else:
            out.append("{" + a + "}")
    return "".join(out)


def boxed_equal(text: str, gold: str) -> bool:
    """True when the last boxed answer of `text` equals `gold` after normalisation."""
    pred = last_boxed(text)
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return False
    gold_inner = last_boxed(gold) if "\\boxed" in gold else gold
    if gold_inner is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold_inner)
    return bool(a) and a == b


__all__ = ["last_boxed", "normalize_answer", "boxed_equal"]
