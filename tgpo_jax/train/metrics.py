"""Metrics sinks: JSONL, TensorBoard event files, a progress bar and a PNG of the main curves.

Every record carries both counters: `iteration` (one rollout batch) and `optimizer_step`.
metrics.jsonl holds one record per iteration however often a run resumes: a writer that starts
after iteration s (`initial_iteration=s`) first drops the records of later iterations (the re-run
replaces them) and any line that does not parse (a partial last line from a crash or a full disk),
rewriting the file atomically; then each record is appended as one complete line, flushed and
fsynced, so a crash leaves at most one partial last line.
The run directory may be a gs:// (or s3://) URL: files then go through `tgpo_jax.paths` (etils.epath),
and TensorBoard event files through an epath-backed tensorboardX writer (`register_tensorboard_scheme`)."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import warnings
from typing import Any

from tgpo_jax import paths

MAIN_CURVES = (
    "reward/mean",
    "eval/score",
    "loss/total",
    "gap/reverse_kl_k1",
    "gap/mismatch_ratio",
    "response/length_mean",
    "actor/entropy",
    "teacher/lambda",
)


def _scalar(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


class _LineAppender:
    """A local file opened for appending whole lines: unbuffered (one write call per record, so
    nothing is left half in a Python buffer), flushed to disk with fsync."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "ab", buffering=0)

    def _write_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a write may be short (e.g. the last bytes before a full disk)
            view = view[self._f.write(view) :]

    def write(self, text: str) -> None:
        try:
            self._write_bytes(text.encode())
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not append a metrics record to {self.path}: {e.strerror or os.strerror(e.errno or errno.EIO)}",
            ) from e

    def flush(self) -> None:
        pass  # unbuffered; fsynced per record

    def close(self) -> None:
        self._f.close()


def _parse_lines(path: str, text: str) -> tuple[list[dict], list[str]]:
    """(records, problems): each line that is not a JSON object is a problem naming path:line."""
    records, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError(f"a JSON {type(r).__name__}, not an object")
        except ValueError as e:
            problems.append(f"{path}:{n}: {e} in {line[:80]!r}")
            continue
        records.append(r)
    return records, problems


def truncate_jsonl(path: str, last_iteration: int, key: str = "iteration") -> int:
    """Keeps the records with `key` <= last_iteration and drops lines that do not parse (with a
    warning naming file and line); rewrites the file atomically if anything was dropped. Returns
    how many lines were dropped."""
    if not paths.exists(path):
        return 0
    text = paths.read_text(path)
    records, problems = _parse_lines(path, text)
    for p in problems:
        warnings.warn(
            f"dropping a metrics line that does not parse (a crash or a full disk mid-write): {p}", stacklevel=2
        )
    keep = [r for r in records if isinstance(r.get(key), (int, float)) and r[key] <= last_iteration]
    dropped = len(problems) + len(records) - len(keep)
    if dropped or (text and not text.endswith("\n")):
        paths.replace_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return dropped


class MetricsWriter:
    def __init__(
        self,
        run_dir: str,
        *,
        jsonl: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        total_iterations: int = 0,
        initial_iteration: int = 0,
    ):
        """`initial_iteration`: the iterations (SFT: steps) already done; records of later ones in an
        existing metrics.jsonl are dropped, since this run writes them again."""
        paths.makedirs(run_dir)
        self.run_dir = run_dir
        self.path = paths.join(run_dir, "metrics.jsonl")
        self._jsonl = None
        if jsonl:
            truncate_jsonl(self.path, initial_iteration)
            self._jsonl = paths.open_append(self.path) if paths.is_remote(self.path) else _LineAppender(self.path)
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

            self._bar = tqdm(
                total=total_iterations, initial=initial_iteration, desc="iteration", unit="it", dynamic_ncols=True
            )

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
    """The records of a JSONL file. A last line that does not parse (a run stopped mid-write) is
    skipped with a warning; any other bad line is a ValueError naming the file and line."""
    text = paths.read_text(path)
    records, problems = _parse_lines(path, text)
    if not problems:
        return records
    last = max(n for n, line in enumerate(text.splitlines(), 1) if line.strip())
    if len(problems) == 1 and problems[0].startswith(f"{path}:{last}:"):
        warnings.warn(f"skipping a partial last line: {problems[0]}", stacklevel=2)
        return records
    raise ValueError(f"not a JSONL record: {problems[0]}")


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
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(4.5 * cols, 3.2 * ((n + cols - 1) // cols)), squeeze=False
    )
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
