"""Prompt rendering through the student tokenizer, left padding and length bucketing.

Chat models: [system?, user] through the tokenizer's chat template with the generation prompt, then
the paper's "<think>\\n" suffix (unless the template already ends in it). Base models without a
template: a plain text template. Prompts are never truncated: the caller drops and counts the ones
longer than max_prompt_len.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tgpo_jax.data.config import DEFAULT_PLAIN_TEMPLATE, DataConfig

THINK_PREFIX = "<think>\n"


class PromptRenderer:
    """Problem text -> prompt text -> token ids for one tokenizer."""

    def __init__(
        self,
        tokenizer,
        *,
        system_prompt: str | None = None,
        template: str = "chat",
        plain_template: str = DEFAULT_PLAIN_TEMPLATE,
        think_suffix: bool = True,
    ):
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: set `template: plain` (base models) or use a "
                "tokenizer directory with a chat template"
            )
        if template == "plain" and "{problem}" not in plain_template:
            raise ValueError(f"plain_template {plain_template!r} needs a {{problem}} field")
        self.tokenizer, self.system_prompt, self.template = tokenizer, system_prompt or "", template
        self.plain_template, self.think_suffix = plain_template, think_suffix

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer) -> PromptRenderer:
        return cls(
            tokenizer,
            system_prompt=cfg.system_prompt,
            template=cfg.template,
            plain_template=cfg.plain_template,
            think_suffix=cfg.think_suffix,
        )

    def render(self, problem: str) -> str:
        """The full prompt text the model sees (ends in "<think>\\n" when think_suffix is on)."""
        if self.template == "chat":
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": problem})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            system = self.system_prompt + "\n\n" if self.system_prompt else ""
            text = self.plain_template.replace("{system}", system).replace("{problem}", problem)
        if self.think_suffix and not text.endswith(THINK_PREFIX):
            text += THINK_PREFIX
        return text

    def encode(self, problems: Sequence[str]) -> list[list[int]]:
        """Token ids of each rendered prompt (chat: the template already holds the special tokens, so
        none are added; plain: the tokenizer's default, e.g. a BOS for Llama)."""
        if not problems:
            return []
        texts = [self.render(p) for p in problems]
        enc = self.tokenizer(texts, add_special_tokens=self.template == "plain")
        return [list(map(int, ids)) for ids in enc["input_ids"]]


def left_pad(ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [P, T] int32, mask [P, T] int32), prompts right-aligned; T = length or the longest.
    Raises if a prompt is longer than `length` (no truncation)."""
    longest = max((len(r) for r in ids), default=0)
    T = longest if length is None else length
    if longest > T:
        raise ValueError(f"a prompt of {longest} tokens does not fit in length {T}")
    tokens = np.full((len(ids), T), pad_id, np.int32)
    mask = np.zeros((len(ids), T), np.int32)
    for b, row in enumerate(ids):
        if len(row):
            tokens[b, T - len(row) :] = row
            mask[b, T - len(row) :] = 1
    return tokens, mask


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets sorted ascending or not)."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def bucket_by_length(ids: Sequence[Sequence[int]], buckets: Sequence[int]) -> dict[int, list[int]]:
    """Row indices grouped by their length bucket (ascending bucket order, row order kept inside)."""
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        groups.setdefault(bucket_for(len(row), buckets), []).append(i)
    return dict(sorted(groups.items()))


__all__ = ["PromptRenderer", "THINK_PREFIX", "left_pad", "bucket_for", "bucket_by_length"]
