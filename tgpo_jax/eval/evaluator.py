"""avg@k evaluation, independent of any model: a policy function produces k generations per item,
the reward function grades them (math-verify OR boxed grader after "</think>" by default), and the
report gives accuracy per data source, their unweighted mean, mean response length and truncation
rate.

    PolicyFn = (items: Sequence[EvalItem], n: int) -> per item, a list of n Completion

Scoring of one chunk runs in the reward workers while the policy generates the next chunk.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tgpo_jax.rewards.reward_fn import RewardConfig, RewardFn


@dataclasses.dataclass
class EvalItem:
    """One evaluation problem."""

    problem: str
    answer: Any  # ground-truth string or reasoning-gym payload
    data_source: str
    index: int = 0
    prompt_ids: list[int] | None = None  # rendered prompt (model policies need it)


@dataclasses.dataclass
class Completion:
    """One sampled response, as text (rollout.generate.Generation is the sampler's token-level output)."""

    text: str
    num_tokens: int
    truncated: bool  # stopped by the length limit (finish == length)


PolicyFn = Callable[[Sequence[EvalItem], int], Sequence[Sequence[Completion]]]

# The paper's evaluation grader: math-verify OR the boxed grader, on the text after "</think>".
EVAL_REWARD = RewardConfig(think_format=True, boxed_fallback=True)


@dataclasses.dataclass
class SourceResult:
    """avg@k of one data source over its N items."""

    data_source: str
    n_items: int
    k: int
    accuracy: float  # mean over items of (correct samples / k)
    std_error: float  # sqrt(sum_i p_i (1 - p_i) / k) / N with p_i the item accuracies
    mean_length: float  # response tokens, over all N * k responses
    truncation_rate: float  # fraction of responses that hit max_new_tokens
    item_accuracy: list[float]  # per item, in item order


def _k_of(source: str, k: int, k_per_source: Mapping[str, int] | None) -> int:
    kk = int((k_per_source or {}).get(source, k))
    if kk < 1:
        raise ValueError(f"k={kk} for data source {source!r} must be >= 1")
    return kk


def _chunks(items: Sequence[EvalItem], k_per_item: Sequence[int], batch_size: int):
    """(k, [item positions]) chunks of at most batch_size items sharing one k, shortest prompts first."""
    order = sorted(range(len(items)), key=lambda i: (k_per_item[i], len(items[i].prompt_ids or ()), i))
    chunk: list[int] = []
    for i in order:
        if chunk and (k_per_item[chunk[0]] != k_per_item[i] or len(chunk) == batch_size):
            yield k_per_item[chunk[0]], chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield k_per_item[chunk[0]], chunk


def _progress_bar(n_items: int, enabled: bool):
    """Items generated / all items with an ETA, on stderr; not left on screen once done, as evals
    also run between the iterations of a training run (whose own bar stays)."""
    from tqdm import tqdm

    return tqdm(
        total=n_items, desc="eval", unit="item", file=sys.stderr, dynamic_ncols=True, leave=False, disable=not enabled
    )


def _generate_and_submit(policy_fn: PolicyFn, items, k_per_item, batch_size, reward: RewardFn, bar):
    """Runs the policy chunk by chunk; returns per item (generations, future-of-scores, offset)."""
    per_item: dict[int, tuple[list[Completion], Any, int]] = {}
    for k, chunk in _chunks(items, k_per_item, batch_size):
        chunk_items = [items[i] for i in chunk]
        gens = [list(g) for g in policy_fn(chunk_items, k)]
        if len(gens) != len(chunk) or any(len(g) != k for g in gens):
            raise ValueError(f"the policy returned {[len(g) for g in gens]} generations for {len(chunk)} items x k={k}")
        fut = reward.submit([g.text for gs in gens for g in gs], [it.answer for it in chunk_items for _ in range(k)])
        for j, i in enumerate(chunk):
            per_item[i] = (gens[j], fut, j * k)
        bar.update(len(chunk))
    return per_item


def _source_result(source: str, k: int, scores: list[np.ndarray], gens: list[list[Completion]]) -> SourceResult:
    item_acc = np.asarray([s.mean() for s in scores], np.float64)
    n = len(item_acc)
    lengths = [g.num_tokens for gs in gens for g in gs]
    truncated = [g.truncated for gs in gens for g in gs]
    std_error = math.sqrt(float(np.sum(item_acc * (1 - item_acc))) / k) / n
    return SourceResult(
        source,
        n,
        k,
        float(item_acc.mean()),
        std_error,
        float(np.mean(lengths)),
        float(np.mean(truncated)),
        item_acc.tolist(),
    )


def evaluate(
    policy_fn: PolicyFn,
    items: Sequence[EvalItem],
    k: int = 1,
    *,
    k_per_source: Mapping[str, int] | None = None,
    reward_fn: RewardFn | None = None,
    batch_size: int = 64,
    dropped_prompts: int = 0,
    progress: bool = True,
) -> EvalReport:
    """avg@k of `policy_fn` on `items` (k samples per item; k_per_source overrides k by data source).
    `reward_fn` defaults to the paper's evaluation grader (EVAL_REWARD), created and closed here.
    `progress`: a bar over the items with an ETA on stderr (False: none)."""
    if not items:
        raise ValueError("no evaluation items")
    k_per_item = [_k_of(it.data_source, k, k_per_source) for it in items]
    own = reward_fn is None
    reward = RewardFn(EVAL_REWARD) if own else reward_fn
    try:
        with _progress_bar(len(items), progress) as bar:
            per_item = _generate_and_submit(policy_fn, items, k_per_item, batch_size, reward, bar)
        results = {id(fut): fut.result() for _, fut, _ in per_item.values()}
    finally:
        if own:
            reward.close()
    by_source: dict[str, tuple[list, list]] = {}
    for i, it in enumerate(items):
        gens, fut, off = per_item[i]
        scores, gl = by_source.setdefault(it.data_source, ([], []))
        scores.append(results[id(fut)][off : off + len(gens)])
        gl.append(gens)
    sources = {s: _source_result(s, _k_of(s, k, k_per_source), sc, gl) for s, (sc, gl) in sorted(by_source.items())}
    return EvalReport.build(sources, dropped_prompts)


@dataclasses.dataclass
class EvalReport:
    """Per-source results and the summary numbers."""

    sources: dict[str, SourceResult]
    mean_accuracy: float  # unweighted mean of the per-source accuracies
    mean_length: float  # over all responses of all sources
    truncation_rate: float  # over all responses of all sources
    dropped_prompts: int = 0  # items whose prompt exceeded max_prompt_len (not evaluated)
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, sources: dict[str, SourceResult], dropped_prompts: int = 0) -> EvalReport:
        n_resp = np.asarray([r.n_items * r.k for r in sources.values()], np.float64)
        lengths = np.asarray([r.mean_length for r in sources.values()])
        trunc = np.asarray([r.truncation_rate for r in sources.values()])
        return cls(
            sources,
            float(np.mean([r.accuracy for r in sources.values()])),
            float(np.sum(lengths * n_resp) / n_resp.sum()),
            float(np.sum(trunc * n_resp) / n_resp.sum()),
            dropped_prompts,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        from tgpo_jax.eval.report import markdown_table

        return markdown_table(self)

    def write(self, out_dir: str, name: str = "eval") -> tuple[str, str]:
        from tgpo_jax.eval.report import write_report

        return write_report(self, out_dir, name)


__all__ = ["EvalItem", "Completion", "PolicyFn", "SourceResult", "EvalReport", "evaluate", "EVAL_REWARD"]
