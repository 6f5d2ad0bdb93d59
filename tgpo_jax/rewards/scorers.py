"""The scoring functions themselves: pure, in-process, no timeout of their own.

They are run by `VerifierPool` workers (in each worker's main thread, under a hard per-item
timeout); call them directly only on trusted text. Model output is treated as data: it is scanned,
parsed by math-verify / reasoning-gym scorers, never passed to eval or exec by this code. Some
reasoning-gym scorers (and sympy's parse_expr, which math-verify and others call) do `eval` the
answer: in the workers, `tgpo_jax.rewards.sandbox.install()` restricts that to literals and sympy
math (see there), so direct in-process calls are for trusted text only.

An `answer` is either a ground-truth string (math: math-verify, optionally OR the boxed grader) or
a reasoning-gym payload `{"reasoning_gym": task, "config": {...}, "entry": {...}}` (the task's own
`score_answer`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tgpo_jax.rewards.boxed import boxed_equal, last_boxed

THINK_END = "</think>"
RG_KEY = "reasoning_gym"


def answer_part(text: str, think_format: bool) -> str | None:
    """The part of a response that is graded: with the think format, the text after the last
    `</think>` (None when there is no `</think>`: reward 0); without it, the whole text."""
    if not think_format:
        return text
    i = text.rfind(THINK_END)
    return None if i < 0 else text[i + len(THINK_END) :]


def _silence_math_verify() -> None:
    # math-verify logs the whole prediction on a parse timeout: 100 kB of braces per line.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def math_verify_equal(pred_text: str, gold: str, timeout_s: int | None = None) -> bool:
    """math-verify's verdict on `pred_text` against `gold` (the paper's check).

    The gold answer is wrapped in `\\boxed{}` unless it already has a box or `$` delimiters, and
    parsed as LaTeX; the prediction is parsed with expression and LaTeX extraction. `timeout_s` is
    math-verify's own signal-based timeout: an int only in a process's main thread, else None.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    _silence_math_verify()
    gold = str(gold).strip()
    gold_text = gold if ("\\boxed" in gold or "$" in gold) else "\\boxed{" + gold + "}"
    g = parse(gold_text, extraction_config=(LatexExtractionConfig(),), parsing_timeout=timeout_s)
    if not g:
        g = parse(gold, parsing_timeout=timeout_s)
    if not g:
        return False
    p = parse(pred_text, extraction_config=(ExprExtractionConfig(), LatexExtractionConfig()), parsing_timeout=timeout_s)
    return bool(p) and bool(verify(g, p, timeout_seconds=timeout_s))


def math_score(
    text: str, gold: str, *, think_format: bool = True, boxed_fallback: bool = False, timeout_s: int | None = None
) -> float:
    """The paper's reward: 1.0 if the graded part (see `answer_part`) passes math-verify against
    `gold` (or, with `boxed_fallback`, the boxed string grader accepts it), else 0.0."""
    part = answer_part(text, think_format)
    if part is None:
        return 0.0
    if boxed_fallback and boxed_equal(part, gold):
        return 1.0
    return 1.0 if math_verify_equal(part, gold, timeout_s) else 0.0


def extract_rg_answer(part: str) -> str:
    """The answer a reasoning-gym scorer sees: the last `<answer>..</answer>`, else the last boxed
    answer, else the stripped text."""
    i = part.rfind("<answer>")
    if i >= 0:
        j = part.find("</answer>", i)
        if j >= 0:
            return part[i + len("<answer>") : j].strip()
    boxed = last_boxed(part)
    return (boxed if boxed is not None else part).strip()


_RG_DATASETS: dict = {}


def _rg_dataset(task: str, config: Mapping[str, Any]):
    """The task's dataset object built with the config the prompts were made with (cached)."""
    key = (task, repr(sorted(config.items())))
    if key not in _RG_DATASETS:
        import reasoning_gym  # noqa: F401  (registers the tasks)
        from reasoning_gym.factory import DATASETS

        if task not in DATASETS:
            raise ValueError(f"unknown reasoning-gym task {task!r}")
        dataset_cls, config_cls = DATASETS[task]
        _RG_DATASETS[key] = dataset_cls(config=_rg_config(config_cls, config))
        from tgpo_jax.rewards import sandbox

        if sandbox.installed():  # a task may import more reasoning_gym modules on first use
            sandbox.install()
    return _RG_DATASETS[key]


def _rg_config(config_cls, config: Mapping[str, Any]):
    """The task config back from its `dataclasses.asdict` form: fields typed as a dataclass (arc_agi's
    and rearc's board_format_opts) are rebuilt from their dicts, else the task's board parser fails on
    the dict and every answer, the right one included, scores 0."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_cls)
    kwargs = dict(config)
    for f in dataclasses.fields(config_cls):
        hint = hints.get(f.name)
        if dataclasses.is_dataclass(hint) and isinstance(kwargs.get(f.name), Mapping):
            kwargs[f.name] = hint(**kwargs[f.name])
    return config_cls(**kwargs)


def rg_score(text: str, payload: Mapping[str, Any], *, think_format: bool = True) -> float:
    """reasoning-gym's own `score_answer` (a float in [0, 1]) on the extracted answer."""
    part = answer_part(text, think_format)
    if part is None:
        return 0.0
    ds = _rg_dataset(payload[RG_KEY], payload.get("config") or {})
    return float(ds.score_answer(extract_rg_answer(part), payload["entry"]))


def score_one(text: str, answer: str | Mapping[str, Any], options: Mapping[str, Any]) -> float:
    """Dispatch on the answer type: a reasoning-gym payload or a math ground truth."""
    think = bool(options.get("think_format", True))
    if isinstance(answer, Mapping) and RG_KEY in answer:
        return rg_score(text, answer, think_format=think)
    return math_score(
        text,
        str(answer),
        think_format=think,
        boxed_fallback=bool(options.get("boxed_fallback")),
        timeout_s=options.get("inner_timeout_s"),
    )


__all__ = [
    "THINK_END",
    "RG_KEY",
    "answer_part",
    "math_verify_equal",
    "math_score",
    "extract_rg_answer",
    "rg_score",
    "score_one",
]
