"""Orbax checkpoints of a run: the train state (params, optimizer state, optimizer-step counter),
the iteration counter, the RNG seed and the data-iterator state, saved asynchronously.

- `latest/`: an Orbax CheckpointManager keeping the last N iterations.
- `best/`: a second manager keeping the best K by eval score.
Orbax writes each step to a temporary directory and renames it when complete, so a crash or a
full disk mid-save leaves the previous checkpoints intact. On restore, a latest checkpoint that
fails to load (corrupt, incomplete) is skipped with a warning and the one before it is used.
`run_dir` may be a gs:// URL: it is passed to Orbax as is (Orbax and tensorstore write to GCS).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from tgpo_jax import paths

log = logging.getLogger(__name__)


class RunCheckpoints:
    def __init__(self, run_dir: str, *, keep: int = 3, keep_best: int = 1, async_save: bool = True):
        self.root = paths.abspath(paths.join(run_dir, "checkpoints"))
        opts = dict(enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.latest = ocp.CheckpointManager(paths.join(self.root, "latest"),
                                            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts))
        self.best = None
        if keep_best > 0:
            self.best = ocp.CheckpointManager(
                paths.join(self.root, "best"),
                options=ocp.CheckpointManagerOptions(max_to_keep=keep_best, best_fn=lambda m: m["eval/score"],
                                                     best_mode="max", keep_checkpoints_without_metrics=False, **opts))

    @staticmethod
    def _args(state, meta: dict[str, Any]):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, iteration: int, state, meta: dict[str, Any], eval_score: float | None = None) -> None:
        """Saves asynchronously (returns once device buffers are copied). `meta` is JSON: counters,
        seed, data-iterator state."""
        self.latest.save(iteration, args=self._args(state, meta))
        if self.best is not None and eval_score is not None:
            self.best.save(iteration, args=self._args(state, meta), metrics={"eval/score": float(eval_score)})

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(iteration, state, meta) of the newest checkpoint that loads, or None if none does.
        `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (restores in place)."""
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                warnings.warn(f"checkpoint {step} in {self.latest.directory} could not be restored "
                              f"({type(e).__name__}: {str(e)[:200]}); trying the one before", stacklevel=2)
                continue
            return step, restored.state, dict(restored.meta)
        return None

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def abstract_of(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into place."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
