"""`tgpo-jax train`: build everything from a validated TrainConfig, resume, iterate, evaluate,
checkpoint, log. Orchestration only: the math lives in objectives/, the jitted steps in train/."""

from __future__ import annotations

import contextlib
import math
import time

import jax

from tgpo_jax import paths
from tgpo_jax.configtree import to_dict
from tgpo_jax.sharding.distributed import initialize
from tgpo_jax.train.checkpoint import RunCheckpoints, abstract_of
from tgpo_jax.train.config import TrainConfig
from tgpo_jax.train.iteration import run_iteration
from tgpo_jax.train.metrics import MetricsWriter, plot_curves
from tgpo_jax.train.run_dir import check_config, record_start, run_dir_lock
from tgpo_jax.train.setup import RunParts, build_run


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops, the last good checkpoint is kept."""


def _resume(parts: RunParts, ckpt: RunCheckpoints, cfg: TrainConfig):
    """(start iteration, train state) from the latest loadable checkpoint, if resuming."""
    if not cfg.checkpoint.resume:
        return 1, parts.train_state
    found = ckpt.restore_latest(abstract_of(parts.train_state))
    if found is None:
        return 1, parts.train_state
    iteration, state, meta = found
    parts.data.set_state(meta["data_state"])
    print(f"[train] resumed from iteration {iteration} (optimizer step {int(state.step)})")
    return iteration + 1, state


def _check_finite(metrics: dict, iteration: int, last_saved: int | None) -> None:
    loss = metrics.get("loss/total", 0.0)
    if not math.isfinite(loss):
        where = f"iteration {last_saved}" if last_saved else "none saved yet"
        raise TrainingDiverged(
            f"non-finite loss ({loss}) at iteration {iteration}; stopping. The last good checkpoint is kept ({where})."
        )


def train(cfg: TrainConfig, *, resume_with_changes: bool = False) -> dict:
    """Runs (or resumes) the configured training; returns the final metrics record.

    The run directory is checked before anything is loaded (`run_dir.py`): a process already
    running in it, or a resume whose config changes the math (unless `resume_with_changes`), is
    refused with a RunDirError. config.json and a history.jsonl record are written once the start
    iteration is known. Multi-process (multi-host): every process runs this same loop on the same
    global batches; only process 0 holds the lock and writes the config, history, metrics and
    plots (Orbax coordinates the checkpoint)."""
    initialize(cfg.sharding.distributed)  # before anything touches the JAX backend
    primary = jax.process_index() == 0
    paths.makedirs(cfg.run_dir)  # run_dir may be a gs:// URL
    with run_dir_lock(cfg.run_dir) if primary else contextlib.nullcontext():
        config = to_dict(cfg)
        changes = check_config(
            cfg.run_dir, config, resume=cfg.checkpoint.resume, resume_with_changes=resume_with_changes
        )
        parts = build_run(cfg)
        ckpt = writer = None
        try:
            ckpt = RunCheckpoints(
                cfg.run_dir,
                keep=cfg.checkpoint.keep,
                keep_best=cfg.checkpoint.keep_best,
                async_save=cfg.checkpoint.async_save,
            )
            start, state = _resume(parts, ckpt, cfg)
            if primary:
                record_start(cfg.run_dir, config, start, changes)
            log = cfg.logging
            writer = MetricsWriter(
                cfg.run_dir,
                jsonl=log.jsonl and primary,
                tensorboard=log.tensorboard and primary,
                progress=log.progress and primary,
                total_iterations=cfg.train.iterations,
                initial_iteration=start - 1,
            )
            metrics = _iterate(cfg, parts, ckpt, writer, start, state)
        finally:
            for part in (ckpt, writer, parts):  # checkpoints first: close() waits for the last save
                if part is not None:
                    part.close()
        if primary and cfg.logging.plot and paths.exists(writer.path):
            plot_curves(writer.path, paths.join(cfg.run_dir, "curves.png"))
    return metrics


def oov_line(metrics: dict, iteration: int, cfg: TrainConfig) -> str | None:
    """The line printed after a run's first iteration when the teacher's targets include ids the
    student's tokenizer lacks (or mismatched tokenizers were allowed): their share and handling."""
    frac = metrics.get("teacher/oov_frac")
    if frac is None or not (frac > 0 or cfg.models.allow_tokenizer_mismatch):
        return None
    masked, mapped = metrics.get("teacher/masked_ids", 0.0), metrics.get("teacher/mapped_ids", 0.0)
    return (
        f"[vocab] iteration {iteration}: {frac:.3%} of the teacher's target positions are ids the student's "
        f"tokenizer lacks; {masked:.0f} targets masked, {mapped:.0f} mapped to the student's first piece "
        f"(models.teacher_oov: {cfg.models.teacher_oov})"
    )


def _iterate(cfg: TrainConfig, parts: RunParts, ckpt: RunCheckpoints, writer: MetricsWriter, start: int, state) -> dict:
    """Iterations start..train.iterations (log, evaluate, checkpoint); returns the last metrics."""
    key = jax.random.key(cfg.train.seed)
    sampling = cfg.rollout_sampling
    last_saved, metrics = (start - 1 if start > 1 else None), {}
    for it in range(start, cfg.train.iterations + 1):
        examples = parts.data.next_batch()
        state, metrics = run_iteration(
            parts.models,
            state,
            examples,
            it,
            key,
            sampling=sampling,
            obj_cfg=cfg.objective,
            reward_fn=parts.reward_fn,
            mini_batches=cfg.train.mini_batches,
            chunk=cfg.train.logprob_chunk,
            score_micro_batch=cfg.score_micro_batch_rows,
            micro_batch_tokens=cfg.train.micro_batch_tokens,
            micro_batch_ranks=cfg.train.micro_batch_ranks,
        )
        _check_finite(metrics, it, last_saved)
        if it == start and jax.process_index() == 0 and (line := oov_line(metrics, it, cfg)):
            print(line)
        score = None
        if cfg.eval.every and (it % cfg.eval.every == 0 or it == cfg.train.iterations):
            t0 = time.perf_counter()
            eval_metrics = parts.evaluate(state.params, it)
            metrics.update(eval_metrics, **{"perf/eval_s": time.perf_counter() - t0})
            score = eval_metrics.get("eval/score")
        writer.write(it, int(state.step), metrics)
        if cfg.checkpoint.every and (it % cfg.checkpoint.every == 0 or it == cfg.train.iterations):
            ckpt.save(
                it,
                state,
                {
                    "iteration": it,
                    "optimizer_step": int(state.step),
                    "seed": cfg.train.seed,
                    "data_state": parts.data.get_state(),
                },
                eval_score=score,
            )
            last_saved = it
    return metrics
