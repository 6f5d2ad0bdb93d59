"""What a run directory records about itself, and who may write to it.

- `config.json`: the config the run continues with (rewritten atomically at each start).
- `history.jsonl`: one record per start or resume: UTC time, the iteration it starts at, the pid,
  and every accepted config change (`old -> new`), so the settings of earlier iterations stay known.
- `.lock`: an exclusive `fcntl.flock` held by the training process for the whole run. The kernel
  drops it when the process exits, however it exits (SIGKILL included), so a stale file never
  blocks a rerun; the pid written into it is only for the error message.

A resume whose config differs from `config.json` in any key that changes the math is refused
before any model is loaded (`check_config`); `RESUME_NEUTRAL_KEYS` lists the keys that may differ.
Remote run directories (gs://...) get the config check and the history, but no lock: object
stores have no advisory locks, so two processes on one gs:// run_dir are not detected.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from tgpo_jax import paths
from tgpo_jax.configtree import from_dict, to_dict
from tgpo_jax.train.metrics import read_jsonl

# Key paths (dotted; "x.*" = everything under x) that may differ between the config a run was
# started with and the one it resumes with, silently: they change how long, how often, where or
# on which layout the run works, never what one iteration computes. Anything else is refused
# unless `tgpo-jax train --resume-with-changes` is given.
RESUME_NEUTRAL_KEYS = (
    "run_dir",  # the same directory can be reached by another path (a moved disk, a mount point)
    "train.iterations",  # extend (or shorten) a run
    "train.logprob_chunk",  # a memory knob: the same log-probs, computed in other chunk sizes
    "train.score_micro_batch",  # a memory knob: the same per-row scores, in other micro-batches of rows
    "logging.*",
    "checkpoint.*",  # every / keep / keep_best / async_save / resume
    "eval.every",
    "rewards.workers",
    "rewards.timeout_s",
    "sharding.*",  # mesh layout, partition rules, process layout: resuming onto another mesh is a feature
    # runtime kernels of the same forward pass (see ModelPairConfig), chosen per hardware
    "models.attn_impl",
    "models.attn_query_block",
    "models.cache_layers",
    "models.remat_policy",
)

CONFIG_FILE, HISTORY_FILE, LOCK_FILE = "config.json", "history.jsonl", ".lock"
_ABSENT = "<absent>"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (a ValueError: the CLI prints it as one error)."""


class RunDirConflict(RunDirError):
    """The run directory holds a run started with a config that differs in the math."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


def is_neutral(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUME_NEUTRAL_KEYS)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or (prefix and not d):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _normalised(config: dict) -> dict:
    """A stored config with today's defaults filled in (so a field added since does not count as a
    change) and JSON types (tuples as lists); the raw dict when it no longer parses."""
    from tgpo_jax.train.config import TrainConfig

    try:
        config = to_dict(from_dict(TrainConfig, config))
    except (ValueError, TypeError):
        pass
    return json.loads(json.dumps(config))


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs, in key order."""
    a, b = _flatten(_normalised(old)), _flatten(_normalised(new))
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def _existing_steps(run_dir: str) -> list[int]:
    latest = paths.join(run_dir, "checkpoints", "latest")
    if not paths.isdir(latest):
        return []
    return sorted(int(n) for n in paths.listdir(latest) if n.isdigit())


def check_config(run_dir: str, config: dict, *, resume: bool, resume_with_changes: bool = False) -> dict:
    """Compares `config` (a TrainConfig as a dict) with the run already in `run_dir`; returns the
    differences {key: (old, new)} that the new start accepts (neutral ones always, math-changing
    ones only with resume_with_changes). Raises RunDirConflict otherwise. Reads only small files.

    With resume=False (checkpoint.resume) a run_dir holding checkpoints is refused even with
    resume_with_changes: a run from iteration 1 could not save its checkpoints there (Orbax keeps
    only steps above its latest). Checkpoints or metrics without a config.json are refused unless
    resume_with_changes: what they were made with is unknown."""
    stored = paths.join(run_dir, CONFIG_FILE)
    steps = _existing_steps(run_dir)
    if not resume and steps:
        raise RunDirConflict(
            f"checkpoint.resume=false, but run_dir {run_dir} holds checkpoints up to iteration {steps[-1]}: "
            "training again from iteration 1 would mix two runs (Orbax keeps only steps above its latest). "
            "Use a new run_dir, set checkpoint.resume=true, or move its checkpoints/ away."
        )
    if not paths.exists(stored):
        metrics = paths.join(run_dir, "metrics.jsonl")
        if (steps or paths.exists(metrics)) and not resume_with_changes:
            raise RunDirConflict(
                f"run_dir {run_dir} holds checkpoints or metrics.jsonl but no {CONFIG_FILE}, so "
                "what it was started with is unknown. Use a new run_dir, or pass "
                "--resume-with-changes to `tgpo-jax train` to continue it with this config."
            )
        return {}
    changes = config_changes(json.loads(paths.read_text(stored)), config)
    refused = {k: v for k, v in changes.items() if not is_neutral(k)}
    if refused and not resume_with_changes:
        lines = "\n".join(f"  {k}: {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in refused.items())
        raise RunDirConflict(
            f"run_dir {run_dir} was started with a different config ({stored}); resuming would mix two runs:\n"
            f"{lines}\nUse a new run_dir, or pass --resume-with-changes to `tgpo-jax train` to continue this run "
            f"with the new values (recorded in {paths.join(run_dir, HISTORY_FILE)}). "
            f"Keys that may differ: {', '.join(RESUME_NEUTRAL_KEYS)}."
        )
    return changes


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_start(run_dir: str, config: dict, start_iteration: int, changes: dict) -> dict:
    """Writes config.json (the config from now on) and appends the start to history.jsonl."""
    history = paths.join(run_dir, HISTORY_FILE)
    first = not paths.exists(history) and start_iteration == 1
    record = {
        "time": _utc_now(),
        "event": "start" if first else "resume",
        "start_iteration": start_iteration,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    if changes:
        record["changes"] = {k: {"old": o, "new": n, "neutral": is_neutral(k)} for k, (o, n) in changes.items()}
    paths.replace_text(paths.join(run_dir, CONFIG_FILE), json.dumps(config, indent=2))
    f = paths.open_append(history)
    try:
        f.write(json.dumps(record) + "\n")
    finally:
        f.close()
    return record


def read_history(run_dir: str) -> list[dict]:
    """The start / resume records; a partial last line (a crash mid-append) is skipped with a warning,
    as in metrics.jsonl."""
    path = paths.join(run_dir, HISTORY_FILE)
    return read_jsonl(path) if paths.exists(path) else []


@contextlib.contextmanager
def run_dir_lock(run_dir: str) -> Iterator[str | None]:
    """Holds `<run_dir>/.lock` (fcntl.flock, exclusive) for the duration; yields its path, or None
    for a remote run_dir (no lock there, see the module docstring). A second holder fails at once
    with RunDirBusy naming the run_dir and the pid recorded by the first."""
    if paths.is_remote(run_dir):
        yield None
        return
    path = os.path.join(paths.abspath(run_dir), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown (it is starting)"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise RunDirBusy(
            f"run_dir {run_dir} is in use by another process (pid {holder}, from {path}); wait for it "
            "to finish, stop it, or use another run_dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)  # closing releases it too; explicit for readers of this code
        os.close(fd)
