"""The reward function of the training loop and the evaluator: a typed config, a process pool, and an
async `submit` so a batch is scored on the host while the device works on something else.

    reward = RewardFn(RewardConfig(think_format=True))           # the paper's training reward
    fut = reward.submit(texts, answers)                          # returns at once
    ...                                                          # device work
    r_B = fut.result()                                           # float32 [B] in {0, 1}
    reward.close()
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tgpo_jax.rewards.pool import START_METHODS, PoolResult, VerifierPool


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How responses are graded.

    think_format: the graded text is the part after "</think>"; no "</think>" -> 0 (paper: on).
    boxed_fallback: also accept when the boxed string grader matches (paper: off for the training
      reward, on for evaluation: "math-verify OR boxed grader").
    timeout_s: hard limit per item; a slower item scores 0 and its worker is replaced.
    num_workers: scoring processes (0: min(8, CPU count)); a train config sets it from `rewards.workers`
      (train.config.RewardsSection.reward_config), the eval CLI from --num-workers.
    start_method: 'subprocess' (default: fresh interpreters, no __main__ guard needed), 'forkserver'
      (faster worker restarts; the main script needs an `if __name__ == "__main__"` guard) or 'spawn'.
    memory_limit_mb: extra address space a worker may map beyond its start-up size (None: no cap), so
      a pathological answer fails fast with MemoryError (score 0) instead of eating the host.
    """

    think_format: bool = True
    boxed_fallback: bool = False
    timeout_s: float = 10.0
    num_workers: int = 0
    start_method: str = "subprocess"
    memory_limit_mb: int | None = 4096

    def __post_init__(self):
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method={self.start_method!r}; accepted: {', '.join(START_METHODS)}")
        problems = [
            f"{name}={value!r}: must be {accepted}"
            for name, value, ok, accepted in (
                ("timeout_s", self.timeout_s, self.timeout_s > 0, "> 0 (seconds per graded response)"),
                ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0 (0: min(8, CPUs))"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))

    def inner_timeout_s(self) -> int | None:
        """math-verify's own (signal) timeout inside the worker: below the hard limit, >= 1 s."""
        return max(1, int(self.timeout_s / 2)) if self.timeout_s >= 2 else None


@dataclasses.dataclass
class RewardResult:
    """Scores of one batch (B items) and what went wrong where."""

    scores: np.ndarray  # float32 [B]
    timed_out: np.ndarray  # bool [B]
    failed: np.ndarray  # bool [B]
    seconds: np.ndarray  # float64 [B] per-item scoring time

    @property
    def num_timeouts(self) -> int:
        return int(self.timed_out.sum())

    @property
    def num_failures(self) -> int:
        return int(self.failed.sum())


class RewardFn:
    """Scores (text, answer) pairs in worker processes. `answer` is a ground-truth string (math) or a
    reasoning-gym payload dict (see tgpo_jax.rewards.scorers). Use as a context manager or close()."""

    def __init__(self, config: RewardConfig | None = None, **overrides):
        self.config = dataclasses.replace(config or RewardConfig(), **overrides)
        workers = self.config.num_workers or min(8, os.cpu_count() or 1)
        self._pool = VerifierPool(
            workers,
            self.config.timeout_s,
            start_method=self.config.start_method,
            memory_limit_mb=self.config.memory_limit_mb,
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgpo-reward")
        self._options = {
            "think_format": self.config.think_format,
            "boxed_fallback": self.config.boxed_fallback,
            "inner_timeout_s": self.config.inner_timeout_s(),
        }
        self.counters = {"items": 0, "timeouts": 0, "failures": 0}  # over the RewardFn's life (for logging)

    def submit(self, texts: Sequence[str], answers: Sequence[Any]) -> concurrent.futures.Future[np.ndarray]:
        """Starts scoring in the background; the future's result is float32 scores [B]. Batches
        submitted one after another are scored in submission order."""
        return self._submit(texts, answers, detailed=False)

    def submit_detailed(self, texts: Sequence[str], answers: Sequence[Any]) -> concurrent.futures.Future[RewardResult]:
        """Like `submit`, but the future's result is a RewardResult (timeouts, failures, timings)."""
        return self._submit(texts, answers, detailed=True)

    def __call__(self, texts: Sequence[str], answers: Sequence[Any]) -> np.ndarray:
        """Blocking: float32 scores [B]."""
        return self.submit(texts, answers).result()

    def _submit(self, texts, answers, detailed: bool) -> concurrent.futures.Future:
        texts, answers = [_as_text(t) for t in texts], list(answers)
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
        return self._executor.submit(self._score, texts, answers, detailed)

    def _score(self, texts: list[str], answers: list, detailed: bool):
        r: PoolResult = self._pool.run(texts, answers, self._options)
        self.counters["items"] += len(texts)
        self.counters["timeouts"] += int(r.timed_out.sum())
        self.counters["failures"] += int(r.failed.sum())
        return RewardResult(r.scores, r.timed_out, r.failed, r.seconds) if detailed else r.scores

    @property
    def restarts(self) -> int:
        """Workers replaced so far (timeouts + crashes)."""
        return self._pool.restarts

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_text(t: str | bytes) -> str:
    """Model output as str: bytes are decoded with errors='replace' (invalid UTF-8 never raises)."""
    return t.decode("utf-8", errors="replace") if isinstance(t, (bytes, bytearray)) else str(t)


__all__ = ["RewardConfig", "RewardFn", "RewardResult"]
