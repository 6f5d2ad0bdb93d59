"""`tgpo-jax export --checkpoint RUN_DIR --to-hf OUT`: the trained student of a run as a Hugging
Face directory (config.json, safetensors, tokenizer) that transformers loads."""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import abstract_model
from tgpo_jax.models.hf_export import check_out_dir, save_hf
from tgpo_jax.models.hf_import import load_tokenizer
from tgpo_jax.train.checkpoint import RunCheckpoints
from tgpo_jax.train.config import load_train_config
from tgpo_jax.train.step import TrainState, make_optimizer


def _run_dir_of(path: str) -> str:
    """Accepts a run directory or its checkpoints/ (or checkpoints/latest) folder."""
    p = os.path.abspath(path)
    for _ in range(3):
        if os.path.isfile(os.path.join(p, "config.json")) and os.path.isdir(os.path.join(p, "checkpoints")):
            return p
        p = os.path.dirname(p)
    raise FileNotFoundError(f"{path} is not a run directory (expected config.json and checkpoints/ in it or above it)")


def _abstract_state(student_cfg: ModelConfig, optimizer) -> TrainState:
    params = nnx.state(abstract_model(student_cfg))
    opt_state = jax.eval_shape(optimizer.init, params)
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))  # noqa: E731
    return jax.tree.map(sds, TrainState(params, opt_state, jax.ShapeDtypeStruct((), jax.numpy.int32)))


def export_run(path: str, out_dir: str, *, dtype: str | None = None, overwrite: bool = False) -> tuple[str, int]:
    """Writes the latest loadable checkpoint's student to out_dir; returns (out_dir, iteration).
    out_dir must be new or empty, or with `overwrite` a previous model export; anything else (the
    run directory itself, a folder above it) is refused before a checkpoint is read."""
    names = ("--to-hf", "--overwrite")
    check_out_dir(out_dir, overwrite=overwrite, name=names[0], overwrite_flag=names[1])
    run_dir = _run_dir_of(path)
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = load_train_config(json.load(f))
    m = cfg.models
    student_cfg = ModelConfig.from_hf_dir(m.student, param_dtype=m.param_dtype, dtype=m.dtype)
    ckpt = RunCheckpoints(run_dir, keep=cfg.checkpoint.keep, keep_best=0, async_save=False, read_only=True)
    try:
        found = ckpt.restore_latest(_abstract_state(student_cfg, make_optimizer(cfg.optimizer)))
    finally:
        ckpt.close()
    if found is None:
        raise FileNotFoundError(f"no loadable checkpoint under {run_dir}/checkpoints/latest")
    iteration, state, _ = found
    graphdef, _ = nnx.split(abstract_model(student_cfg))
    model = nnx.merge(graphdef, state.params)
    save_hf(
        model,
        out_dir,
        dtype=dtype,
        tokenizer=load_tokenizer(m.tokenizer or m.student),
        overwrite=overwrite,
        names=names,
    )
    return out_dir, iteration
