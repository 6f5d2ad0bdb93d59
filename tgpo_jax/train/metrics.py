"""Metrics sinks: JSONL, TensorBoard event files, a progress bar and a PNG of the main curves.

Every record carries both counters: `iteration` (one rollout batch) and `optimizer_step`."""

from __future__ import annotations

import json
import math
import os
from typing import Any

MAIN_CURVES = ("reward/mean", "eval/score", "loss/total", "gap/reverse_kl_k1", "gap/mismatch_ratio",
               "response/length_mean", "actor/entropy", "teacher/lambda")


def _scalar(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


class MetricsWriter:
    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, progress: bool = True,
                 total_iterations: int = 0, initial_iteration: int = 0):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._jsonl = open(self.path, "a") if jsonl else None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iterations, initial=initial_iteration, desc="iteration", unit="it",
                             dynamic_ncols=True)

    def write(self, iteration: int, optimizer_step: int, metrics: dict[str, Any]) -> None:
        record = {"iteration": iteration, "optimizer_step": optimizer_step}
        record.update({k: _scalar(v) for k, v in sorted(metrics.items())})
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in record.items():
                if k not in ("iteration", "optimizer_step") and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()
        if self._bar:
            self._bar.update(1)
            post = {"reward": record.get("reward/mean"), "loss": record.get("loss/total")}
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in post.items() if v is not None})

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._bar:
            self._bar.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path: str, out_png: str, keys=MAIN_CURVES) -> str | None:
    """A grid of the main curves against iteration; returns the path, or None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    present = [k for k in keys if any(k in r and math.isfinite(r[k]) for r in rows)]
    if not present:
        return None
    n = len(present)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.5 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, present):
        pts = [(r["iteration"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
