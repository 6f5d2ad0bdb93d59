"""Orbax checkpoints of a run: the train state (params, optimizer state, optimizer-step counter),
the iteration counter, the RNG seed and the data-iterator state, saved asynchronously.

- `latest/`: an Orbax CheckpointManager keeping the last N iterations.
- `best/`: a second manager keeping the best K by eval score.
Orbax writes each step to a temporary directory and renames it when complete, so a crash or a
full disk mid-save leaves the previous checkpoints intact.

Integrity: once a latest/ step has finished saving (Orbax saves asynchronously, so at the next
`save` or at `close`), its files are checksummed into a manifest (`manifest.py`). On restore each
step is verified against its manifest before it is loaded; a step that fails the check or fails to
load is moved aside to `checkpoints/corrupt/<step>-<UTC time>` with a warning naming it, and the
one before it is used. Moving it out of latest/ matters: Orbax silently refuses to save a step at
or below its latest, so a corrupt step left in place would never be saved again when re-run.
A step without a manifest (older code, or a run killed before the manifest was written) restores
with a warning.
Only latest/ steps are checksummed: they are what resume and `tgpo-jax export` restore; nothing
restores best/ here.

`run_dir` may be a gs:// URL: it is passed to Orbax as is (Orbax and tensorstore write to GCS).
Checksums are local-only (see manifest.py); moving a corrupt step aside on gs:// goes through
etils.epath (a copy per object).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from tgpo_jax import paths
from tgpo_jax.train import manifest

log = logging.getLogger(__name__)
_FINALIZE_TIMEOUT_S = 1200  # Orbax's own default limit for an async save


class RunCheckpoints:
    def __init__(
        self, run_dir: str, *, keep: int = 3, keep_best: int = 1, async_save: bool = True, read_only: bool = False
    ):
        # read_only (`tgpo-jax export`): a bad step is skipped but left where it is, since a training
        # process may hold the run directory (export takes no lock) and moving steps under its
        # Orbax manager would upset it
        self.read_only = read_only
        self.root = paths.abspath(paths.join(run_dir, "checkpoints"))
        self.checksums = not paths.is_remote(self.root)  # local-only, see manifest.py
        self.primary = jax.process_index() == 0  # the one process that writes manifests, moves steps aside
        self._pending: list[int] = []  # latest/ steps saved by this object, manifest not yet written
        self._pending_lock = threading.Lock()  # shared with the watcher threads of async saves
        self._watchers: list[threading.Thread] = []
        self._closing = threading.Event()
        opts = dict(enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.latest = ocp.CheckpointManager(
            paths.join(self.root, "latest"), options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts)
        )
        self.best = None
        if keep_best > 0:
            self.best = ocp.CheckpointManager(
                paths.join(self.root, "best"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best,
                    best_fn=lambda m: m["eval/score"],
                    best_mode="max",
                    keep_checkpoints_without_metrics=False,
                    **opts,
                ),
            )

    @staticmethod
    def _args(state, meta: dict[str, Any]):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, iteration: int, state, meta: dict[str, Any], eval_score: float | None = None) -> None:
        """Saves asynchronously (returns once device buffers are copied). `meta` is JSON: counters,
        seed, data-iterator state. Warns if Orbax declines to save it (a step at or below the
        latest one in latest/: the caller re-runs iterations it did not restore)."""
        with self._pending_lock:
            self._pending.append(iteration)
        if self.latest.save(iteration, args=self._args(state, meta)):
            self._watch(iteration)
        else:
            with self._pending_lock:
                self._pending.remove(iteration)
            warnings.warn(
                f"checkpoint {iteration} was NOT saved: {self.latest.directory} already holds step "
                f"{self.latest.latest_step()} (Orbax only saves steps above its latest)",
                stacklevel=2,
            )
        if self.best is not None and eval_score is not None:
            # best/ may already hold this step from before a resume: the same iteration of the same
            # run, so keeping the stored one (Orbax declines the save) loses nothing.
            self.best.save(iteration, args=self._args(state, meta), metrics={"eval/score": float(eval_score)})

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def _step_dir(self, step: int) -> str:
        return paths.join(str(self.latest.directory), str(step))

    def _watch(self, step: int) -> None:
        """Writes the step's manifest as soon as Orbax has finalized it, so a run killed soon after
        a save still leaves that checkpoint verifiable. Orbax renames the temporary directory to
        `<step>` as its very last act (its post-finalization callback runs before that, while files
        still change), so a thread waits for that name."""
        if not (self.checksums and self.primary):
            return
        t = threading.Thread(target=self._manifest_when_final, args=(step,), daemon=True, name=f"tgpo-checksums-{step}")
        t.start()
        self._watchers.append(t)

    def _manifest_when_final(self, step: int) -> None:
        deadline = time.monotonic() + _FINALIZE_TIMEOUT_S
        while not paths.isdir(self._step_dir(step)) and not self._closing.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._write_manifests()

    def _write_manifests(self) -> None:
        """Checksums the pending steps Orbax has finalized (the final `<step>` directory appears
        only then; it writes into a temporary one before). Runs in a watcher thread too, so a
        failure is a warning: the step then restores unverified, with a warning of its own."""
        with self._pending_lock:
            done = [s for s in self._pending if paths.isdir(self._step_dir(s))]
            self._pending = [s for s in self._pending if s not in done]
        if not (self.checksums and self.primary):
            return
        for step in done:
            try:
                manifest.write(self._step_dir(step))
            except OSError as e:  # deleted by max_to_keep meanwhile, or a full disk
                warnings.warn(f"no checksum manifest for checkpoint {step} ({e})", stacklevel=2)

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(iteration, state, meta) of the newest checkpoint that loads, or None if none does.
        `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (restores in place).
        Each step is verified against its checksum manifest first; one that fails (or fails to
        load) is moved aside (see the module docstring) and the one before it is tried."""
        moved = False
        try:
            for step in sorted(self.latest.all_steps(), reverse=True):
                problem = self._verify(step)
                if problem is None:
                    try:
                        restored = self.latest.restore(
                            step,
                            args=ocp.args.Composite(
                                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                            ),
                        )
                        return step, restored.state, dict(restored.meta)
                    except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                        problem = f"{type(e).__name__}: {str(e)[:200]}"
                where = self._move_aside(step)
                moved = True
                warnings.warn(
                    f"checkpoint {step} in {self.latest.directory} could not be restored ({problem}); "
                    f"{where}; trying the one before",
                    stacklevel=2,
                )
            return None
        finally:
            if moved:
                self._resync()

    def _verify(self, step: int) -> str | None:
        """None if the step may be loaded; else why not (which file fails its checksum)."""
        step_dir = self._step_dir(step)
        if not self.checksums:
            return None
        if not manifest.has_manifest(step_dir):
            warnings.warn(
                f"checkpoint {step} in {self.latest.directory} has no checksum manifest (saved by older "
                "code, or the run stopped before the manifest was written): restoring it unverified",
                stacklevel=3,
            )
            return None
        return manifest.verify(step_dir)

    def _move_aside(self, step: int) -> str:
        """Moves a bad step to checkpoints/corrupt/<step>-<UTC time> (process 0 only); says where."""
        if self.read_only:
            return "skipped and left in place (read-only access)"
        if not self.primary:
            return "process 0 moves it aside"
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        corrupt = paths.join(self.root, "corrupt")
        dest = paths.join(corrupt, f"{step}-{stamp}")
        paths.makedirs(corrupt)
        try:
            if paths.is_remote(dest):
                from etils import epath

                epath.Path(self._step_dir(step)).rename(dest)
            else:
                os.replace(self._step_dir(step), dest)
        except OSError as e:
            return f"could NOT be moved aside to {dest} ({e}), so a re-run of iteration {step} will not be saved"
        return f"moved aside to {dest}"

    def _resync(self) -> None:
        """After steps were moved aside: every process re-reads the step list, so that all agree on
        the latest step (Orbax's save decision) once process 0 has moved them."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tgpo_jax:checkpoints_moved_aside")
        self.latest.reload()

    def close(self) -> None:
        self.wait()
        self._closing.set()
        for t in self._watchers:
            t.join()
        self._write_manifests()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def abstract_of(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into place."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
