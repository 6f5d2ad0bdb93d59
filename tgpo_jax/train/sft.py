"""`tgpo-jax sft --config FILE`: supervised fine-tuning on (prompt, solution) pairs with the same
models, mesh, data pipeline, metrics and checkpoint machinery as TGPO training. Used to make the
small teachers and students of the demo and of the divergence experiment. The result is exported
as a HF directory (`out_dir`) that `tgpo-jax train` reads."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from tgpo_jax.configtree import ConfigError, apply_overrides, from_dict, load_yaml
from tgpo_jax.data import DataConfig, build_prompt_set, make_data_iterator
from tgpo_jax.data.prompts import bucket_for
from tgpo_jax.models.hf_export import save_hf
from tgpo_jax.models.config import runtime_option_problems
from tgpo_jax.models.hf_import import load_tokenizer
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded
from tgpo_jax.train.checkpoint import RunCheckpoints
from tgpo_jax.train.metrics import MetricsWriter, plot_curves
from tgpo_jax.train.setup import batch_putter
from tgpo_jax.train.sft_step import make_sft_step
from tgpo_jax.train.step import OptimizerConfig, init_train_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    run_dir: str = "runs/sft"
    model: str = ""  # local HF directory to start from
    out_dir: str = ""  # where the fine-tuned model is exported (default: <run_dir>/hf)
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    rules: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)  # needs a solution_column
    steps: int = 200
    batch_size: int = 16
    micro_batch: int = 16
    max_solution_len: int = 128
    logprob_chunk: int = 64
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, weight_decay=0.0)
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True
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
    if cfg.batch_size % cfg.micro_batch:
        problems.append(f"micro_batch={cfg.micro_batch} does not divide batch_size={cfg.batch_size}")
    if cfg.max_solution_len % min(cfg.logprob_chunk, cfg.max_solution_len):
        problems.append(f"logprob_chunk={cfg.logprob_chunk} must divide max_solution_len={cfg.max_solution_len}")
    problems += runtime_option_problems(**cfg.model_overrides())
    if problems:
        raise ConfigError("invalid sft config:\n  " + "\n  ".join(problems))
    return cfg


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
        toks[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    return toks, mask


def sft(cfg: SFTConfig) -> str:
    """Runs the fine-tuning and exports the model; returns the exported directory."""
    tokenizer = load_tokenizer(cfg.model)
    data_cfg = DataConfig.from_dict({**cfg.data, "batch_size": cfg.batch_size})
    data = make_data_iterator(data_cfg, tokenizer, prompt_set=build_prompt_set(data_cfg, tokenizer))
    mesh = build_mesh(MeshConfig.from_dict(cfg.mesh))
    rules = ShardingRules.from_dict(cfg.rules)
    model = load_sharded(cfg.model, mesh, rules, cfg_overrides=cfg.model_overrides())
    optimizer = make_optimizer(cfg.optimizer)
    graphdef, state = init_train_state(model, optimizer)
    step = make_sft_step(graphdef, optimizer, micro_batch=cfg.micro_batch, chunk=cfg.logprob_chunk)
    put = batch_putter(mesh, rules)
    pad = tokenizer.pad_token_id or 0
    writer = MetricsWriter(cfg.run_dir, tensorboard=True, progress=cfg.progress, total_iterations=cfg.steps)
    ckpt = RunCheckpoints(cfg.run_dir, keep=1, keep_best=0) if cfg.checkpoint_every else None
    try:
        for i in range(1, cfg.steps + 1):
            b = next(data)
            longest = max(map(len, b.prompt_ids))
            prompt, prompt_mask = b.left_padded(pad, length=bucket_for(longest, _buckets(data_cfg.max_prompt_len)))
            toks, mask = _solutions(b, tokenizer, cfg.max_solution_len)
            state, m = step(state, put({"prompt": prompt, "prompt_mask": prompt_mask, "tokens": toks, "mask": mask}))
            if i % cfg.log_every == 0 or i == cfg.steps:
                writer.write(i, i, {k: float(v) for k, v in jax.device_get(m).items()})
            if ckpt and i % cfg.checkpoint_every == 0:
                ckpt.save(i, state, {"iteration": i, "data_state": data.get_state()})
    finally:
        writer.close()
        if ckpt:
            ckpt.close()
    plot_curves(writer.path, os.path.join(cfg.run_dir, "sft_curves.png"), keys=("sft/loss", "sft/grad_norm"))
    trained = nnx.merge(graphdef, state.params)
    return save_hf(trained, cfg.out_dir or os.path.join(cfg.run_dir, "hf"), tokenizer=tokenizer)
