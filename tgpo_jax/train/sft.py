"""`tgpo-jax sft --config FILE`: supervised fine-tuning on (prompt, solution) pairs with the same
models, mesh, data pipeline, metrics and checkpoint machinery as TGPO training. Used to make the
small teachers and students of the demo and of the divergence experiment. The result is exported
as a HF directory (`out_dir`) that `tgpo-jax train` reads.

With `checkpoint_every`, an interrupted run resumes from its latest checkpoint when the same
command is run again (train state and data-iterator state, so it ends with the weights of an
uninterrupted run). `out_dir` must be new or empty, or with `overwrite_out_dir` a previous model
export: that is checked before anything is loaded."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from tgpo_jax.configtree import ConfigError, apply_overrides, from_dict, load_yaml
from tgpo_jax.data import DataConfig, build_prompt_set, make_data_iterator
from tgpo_jax.data.config import DataSection
from tgpo_jax.data.prompts import bucket_for
from tgpo_jax.models.config import read_model_config
from tgpo_jax.models.hf_export import check_out_dir, save_hf
from tgpo_jax.models.hf_import import load_tokenizer
from tgpo_jax.models.runtime_options import runtime_option_problems
from tgpo_jax.models.vocab_map import usable_vocab_override
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded
from tgpo_jax.train.checkpoint import RunCheckpoints, abstract_of
from tgpo_jax.train.metrics import MetricsWriter, plot_curves
from tgpo_jax.train.setup import batch_putter
from tgpo_jax.train.sft_step import make_sft_step
from tgpo_jax.train.step import OptimizerConfig, init_train_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    run_dir: str = "runs/sft"
    model: str = ""  # local HF directory to start from
    out_dir: str = ""  # where the fine-tuned model is exported (default: <run_dir>/hf)
    # the same sections (and YAML forms) as a train config's sharding.mesh, sharding.student_rules, data
    mesh: MeshConfig = MeshConfig()
    rules: ShardingRules = ShardingRules()
    data: DataSection = dataclasses.field(default_factory=DataSection)  # needs a solution_column
    steps: int = 200
    batch_size: int = 16
    micro_batch: int = 16
    max_solution_len: int = 128
    logprob_chunk: int = 64
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, weight_decay=0.0)
    checkpoint_every: int = 0  # steps between checkpoints (0: none); a rerun resumes from the latest
    log_every: int = 10
    progress: bool = True  # a progress bar with an ETA on stderr
    overwrite_out_dir: bool = False  # replace a previous model export in out_dir (never anything else)
    # the model's cache-free attention (ModelConfig.attn_impl / attn_query_block), defaulting as in
    # a train config: the fused CPU kernel on CPU devices, else einsum (query blocks on CPU)
    attn_impl: str = "auto"
    attn_query_block: int = -1

    def model_overrides(self) -> dict:
        return {"attn_impl": self.attn_impl, "attn_query_block": self.attn_query_block}


def load_sft_config(path_or_dict, overrides=None) -> SFTConfig:
    d = load_yaml(path_or_dict) if isinstance(path_or_dict, str) else dict(path_or_dict)
    cfg = from_dict(SFTConfig, apply_overrides(d, overrides or []))
    problems = []
    if not cfg.model:
        problems.append("model: a local HF model directory is required")
    if not cfg.data.get("solution_column"):
        problems.append("data.solution_column: SFT needs a column of solutions")
    problems += DataSection(cfg.data).problems("data")
    if cfg.batch_size % cfg.micro_batch:
        problems.append(f"micro_batch={cfg.micro_batch} does not divide batch_size={cfg.batch_size}")
    if cfg.max_solution_len % min(cfg.logprob_chunk, cfg.max_solution_len):
        problems.append(f"logprob_chunk={cfg.logprob_chunk} must divide max_solution_len={cfg.max_solution_len}")
    problems += _dir_problems(cfg)
    problems += runtime_option_problems(**cfg.model_overrides())
    if problems:
        raise ConfigError("invalid sft config:\n  " + "\n  ".join(problems))
    return cfg


def export_dir(cfg: SFTConfig) -> str:
    return cfg.out_dir or os.path.join(cfg.run_dir, "hf")


def _dir_problems(cfg: SFTConfig) -> list[str]:
    """The export replaces out_dir whole: it may not be the run directory or a folder above it."""
    problems = []
    out, run = os.path.abspath(export_dir(cfg)), os.path.abspath(cfg.run_dir)
    if out == run or run.startswith(out.rstrip(os.sep) + os.sep):
        problems.append(
            f"out_dir={cfg.out_dir!r} would hold run_dir={cfg.run_dir!r} (checkpoints, metrics): the "
            f"export needs a directory of its own, e.g. the default <run_dir>/hf"
        )
    if cfg.checkpoint_every < 0:
        problems.append(f"checkpoint_every={cfg.checkpoint_every}: accepted: 0 (no checkpoints) or a number of steps")
    return problems


def _buckets(max_len: int) -> tuple[int, ...]:
    """Prompt lengths padded to powers of two (one compile each), up to max_prompt_len."""
    out, b = [], 32
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def _solutions(batch, tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Solution token ids (+ EOS) right-padded to max_len, and their mask; longer ones are cut
    at max_len (counted by the caller through the mask's last column)."""
    toks = np.zeros((len(batch), max_len), np.int32)
    mask = np.zeros_like(toks)
    for i, sol in enumerate(batch.solutions):
        ids = tokenizer(sol or "", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[:max_len]
        toks[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    return toks, mask


def _resume(cfg: SFTConfig, ckpt: RunCheckpoints | None, state, data, log=print):
    """(steps already done, train state) from the run's latest loadable checkpoint, if it has one."""
    found = ckpt.restore_latest(abstract_of(state)) if ckpt is not None else None
    if found is None:
        if os.path.exists(os.path.join(cfg.run_dir, "metrics.jsonl")):
            why = "no loadable checkpoint in it" if ckpt else "checkpoint_every=0 keeps none"
            log(f"[sft] run_dir={cfg.run_dir!r} holds an earlier run but {why}: starting at step 1")
        return 0, state
    step, state, meta = found
    if step > cfg.steps:
        raise ValueError(
            f"run_dir={cfg.run_dir!r} holds a checkpoint at step {step}, beyond steps={cfg.steps}: "
            f"choose another run_dir, or steps >= {step} to continue that run"
        )
    data.set_state(meta["data_state"])
    log(f"[sft] resumed from step {step} (checkpoint in {ckpt.latest.directory}); {cfg.steps - step} steps to go")
    return step, state


def _progress_bar(cfg: SFTConfig, done: int):
    """Steps done / steps with an ETA, on stderr (stdout stays for results)."""
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps,
        initial=done,
        desc="sft",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not cfg.progress,
    )


@dataclasses.dataclass
class _Run:
    """What the step loop needs, built from the config."""

    tokenizer: Any
    data: Any
    max_prompt_len: int
    graphdef: Any
    state: Any
    step: Any
    put: Any


def _build(cfg: SFTConfig) -> _Run:
    tokenizer = load_tokenizer(cfg.model)
    data_cfg = DataConfig.from_dict({**cfg.data, "batch_size": cfg.batch_size})
    data = make_data_iterator(data_cfg, tokenizer, prompt_set=build_prompt_set(data_cfg, tokenizer))
    mesh = build_mesh(MeshConfig.from_dict(cfg.mesh))
    rules = ShardingRules.from_dict(cfg.rules)
    # ids the tokenizer cannot produce stay out of the softmax, as in the TGPO run that follows
    # (models/vocab_map.py): the SFT model never learns to rank them
    rows = read_model_config(cfg.model, "model").vocab_size
    overrides = cfg.model_overrides() | usable_vocab_override(len(tokenizer), rows)
    model = load_sharded(cfg.model, mesh, rules, cfg_overrides=overrides)
    optimizer = make_optimizer(cfg.optimizer)
    graphdef, state = init_train_state(model, optimizer)
    step = make_sft_step(graphdef, optimizer, micro_batch=cfg.micro_batch, chunk=cfg.logprob_chunk)
    return _Run(tokenizer, data, data_cfg.max_prompt_len, graphdef, state, step, batch_putter(mesh, rules))


def _batch(run: _Run, cfg: SFTConfig) -> dict:
    b = next(run.data)
    pad = run.tokenizer.pad_token_id or 0
    bucket = bucket_for(max(map(len, b.prompt_ids)), _buckets(run.max_prompt_len))
    prompt, prompt_mask = b.left_padded(pad, length=bucket)
    toks, mask = _solutions(b, run.tokenizer, cfg.max_solution_len)
    return run.put({"prompt": prompt, "prompt_mask": prompt_mask, "tokens": toks, "mask": mask})


def _train(cfg: SFTConfig, run: _Run, ckpt: RunCheckpoints | None, done: int) -> str:
    """Steps done+1 .. cfg.steps, with metrics, checkpoints and the progress bar; returns metrics.jsonl."""
    writer = MetricsWriter(cfg.run_dir, tensorboard=True, progress=False, initial_iteration=done)
    bar = _progress_bar(cfg, done)
    previous = None  # the metrics of the step before: the bar counts steps once they have run
    try:
        for i in range(done + 1, cfg.steps + 1):
            run.state, m = run.step(run.state, _batch(run, cfg))
            # Dispatch is asynchronous and would run tens of steps ahead of the device between two
            # metric reads, so a bar counting dispatches jumps and its ETA swings. Waiting for the
            # step before (not this one) keeps the next batch's host work overlapping this step.
            if previous is not None:
                jax.block_until_ready(previous)
                bar.update(1)
            previous = m
            if i % cfg.log_every == 0 or i == cfg.steps:
                metrics = {k: float(v) for k, v in jax.device_get(m).items()}
                writer.write(i, i, metrics)
                bar.set_postfix(loss=f"{metrics.get('sft/loss', float('nan')):.3f}")
            if ckpt and i % cfg.checkpoint_every == 0:
                ckpt.save(i, run.state, {"iteration": i, "data_state": run.data.get_state()})
        if previous is not None:
            jax.block_until_ready(previous)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    return writer.path


def sft(cfg: SFTConfig) -> str:
    """Runs (or resumes) the fine-tuning and exports the model; returns the exported directory."""
    out_dir = export_dir(cfg)
    names = ("out_dir", "overwrite_out_dir=true")
    # before the slow part: a destination that will be refused should not cost a training run
    check_out_dir(out_dir, overwrite=cfg.overwrite_out_dir, name=names[0], overwrite_flag=names[1])
    run = _build(cfg)
    ckpt = RunCheckpoints(cfg.run_dir, keep=1, keep_best=0) if cfg.checkpoint_every else None
    try:
        done, run.state = _resume(cfg, ckpt, run.state, run.data)
        metrics_path = _train(cfg, run, ckpt, done)
    finally:
        if ckpt:
            ckpt.close()  # waits for the last asynchronous save, also when interrupted
    plot_curves(metrics_path, os.path.join(cfg.run_dir, "sft_curves.png"), keys=("sft/loss", "sft/grad_norm"))
    trained = nnx.merge(run.graphdef, run.state.params)
    return save_hf(trained, out_dir, tokenizer=run.tokenizer, overwrite=cfg.overwrite_out_dir, names=names)
