"""The demo's output directories: each is the demo's by a marker file, and holds work cached by a
key (a dict of everything that determines it).

Every directory the demo makes gets MARKER (holding the key of its work) before anything else is
written in it, and KEY_FILE (the same key) when its work is complete: `is_cached` then reuses it, an
unfinished directory with the same key is continued (`claim_dir` returns True), and any other one of
the demo's is emptied and started over; a directory without the marker (not the demo's) is never
removed. Used by the demo and by `tgpo-jax experiment divergence`, which share the toy task and its
SFT models (tasks/chain_sum.py, train/sft_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

KEY_FILE = "demo_key.json"  # written last: the stage in this directory is complete
MARKER = ".tgpo_demo"  # written first: this directory is the demo's (JSON: the key of the work in it)
# What earlier versions of the demo (without MARKER) wrote in each directory, so that a directory they
# left half-written is recognised as the demo's too.
LEGACY_CONTENTS = {
    "data": {KEY_FILE, "train.jsonl", "heldout.jsonl", "stats.json", "heldout_head.jsonl"},
    "sft": {KEY_FILE, "sft_data.jsonl", "init", "sft", "hf", "heldout_eval.json"},
    "tgpo": {"config.json", "metrics.jsonl", "checkpoints", "tensorboard", "curves.png"},
}


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of `obj` as sorted JSON: how the cache keys are hashed (any change
    here would re-key, so redo, every cached stage)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """16 hex digits of the sha256 of the file's bytes (a key's stand-in for a data file or model)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def is_cached(dir_: str, key: dict, must_exist: str) -> bool:
    """The work in `dir_` is complete for `key`: its KEY_FILE holds that key and `must_exist` is there."""
    try:
        with open(os.path.join(dir_, KEY_FILE)) as f:
            return json.load(f) == json.loads(json.dumps(key, default=str)) and os.path.exists(
                os.path.join(dir_, must_exist)
            )
    except (OSError, ValueError):
        return False


def write_key(dir_: str, key: dict) -> None:
    """Marks the work in `dir_` complete for `key` (the last write of a stage)."""
    with open(os.path.join(dir_, KEY_FILE), "w") as f:
        json.dump(key, f, indent=2, default=str)


def read_marker(path: str):
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_demo_dir(path: str, kind: str) -> bool:
    """The demo's: it has the marker, or (from a version before the marker) only what the demo writes
    there, or nothing. Temporary export directories (.export-*) left by a kill count as the demo's."""
    if os.path.exists(os.path.join(path, MARKER)):
        return True
    return all(e in LEGACY_CONTENTS[kind] or e.startswith(".export-") for e in os.listdir(path))


def claim_dir(path: str, kind: str, key: dict | None = None) -> bool:
    """Makes `path` the demo's directory for `key`. True when it already holds unfinished work for
    that key, to be continued; else it is emptied (only if it is the demo's) and marked. A directory
    with anything else in it is refused."""
    key = json.loads(json.dumps(key, default=str)) if key is not None else None
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out: {path} exists and is not a directory; choose another --out, or move it away")
    if os.path.isdir(path):
        if not is_demo_dir(path, kind):
            raise ValueError(
                f"--out: {path} exists and was not written by the demo (no {MARKER} in it, and it holds "
                f"{', '.join(sorted(os.listdir(path))[:5])}); choose another --out, or move it away"
            )
        if key is not None and read_marker(path) == {"key": key}:
            for e in os.listdir(path):  # an export a kill interrupted: never to be finished
                if e.startswith(".export-"):
                    shutil.rmtree(os.path.join(path, e), ignore_errors=True)
            return True
        shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"key": key}, f)
    return False
