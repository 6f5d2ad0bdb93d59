"""Metrics sinks: JSONL, TensorBoard event files, a progress bar and a PNG of the main curves.

Every record carries both counters: `iteration` (one rollout batch) and `optimizer_step`.
The run directory may be a gs:// (or s3://) URL: files then go through `tgpo_jax.paths` (etils.epath),
and TensorBoard event files through an epath-backed tensorboardX writer (`register_tensorboard_scheme`)."""

from __future__ import annotations

import io
import json
import math
from typing import Any

from tgpo_jax import paths

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
        paths.makedirs(run_dir)
        self.run_dir = run_dir
        self.path = paths.join(run_dir, "metrics.jsonl")
        self._jsonl = paths.open_append(self.path) if jsonl else None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = paths.join(run_dir, "tensorboard")
            if paths.is_remote(tb_dir):
                register_tensorboard_scheme(paths.scheme(tb_dir))
            self._tb = SummaryWriter(tb_dir)
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
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    paths.write_bytes(out_png, buf.getvalue())
    return out_png


class _EpathEventFile:
    """A tensorboardX record file on an object store: buffered, rewritten whole on each flush."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.write_bytes(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFactory:
    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        paths.makedirs(path)


def register_tensorboard_scheme(scheme: str) -> None:
    """Routes tensorboardX event files under `scheme`:// through etils.epath (gcsfs for gs://),
    instead of tensorboardX's own GCS writer, which needs google-cloud-storage."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EpathEventFactory())
