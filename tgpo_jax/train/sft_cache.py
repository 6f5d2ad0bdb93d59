"""The toy task's SFT models, cached: a tiny model (`make_tiny_checkpoint`) fine-tuned by `sft` on a
seeded mix of the two chain_sum solution styles, and its held-out accuracy.

A model is kept under <out>/<name> keyed by everything that determines it (its SFTSpec, the train
file's digest, the tokenizer vocabulary, the prompt settings), so a rerun with the same key reuses
it and an interrupted one continues from its last SFT checkpoint (demo_dirs.py). The keys must stay
as they are: a changed key makes every existing user redo the SFT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from tgpo_jax.demo_dirs import KEY_FILE, claim_dir, file_digest, is_cached, write_key
from tgpo_jax.tasks.chain_sum import write_style_mix


@dataclasses.dataclass(frozen=True)
class SFTSpec:
    """A tiny model made by `make_tiny_checkpoint` and fine-tuned by `sft` on a mix of the two
    solution styles: a seeded `style_b_frac` of the training problems in style B, the rest in A."""

    style_b_frac: float  # 0: style A only; 1: style B only
    arch: str = "qwen2"
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    max_solution_len: int = 48

    def model_kwargs(self) -> dict[str, int]:
        """The architecture fields, as keyword arguments of `tiny_config` / `make_tiny_checkpoint`."""
        return {
            k: getattr(self, k)
            for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        }


def sft_model(
    out_dir: str, name: str, spec: SFTSpec, train_path: str, data_section: dict, log=print
) -> tuple[str, bool]:
    """(HF directory, reused?) of the model fine-tuned by `spec`; reused when its key matches. An
    unfinished SFT for the same key (an interrupted demo) continues from its last checkpoint."""
    from tgpo_jax.models.tiny import TINY_VOCAB, make_tiny_checkpoint
    from tgpo_jax.train.sft import load_sft_config, sft

    root = os.path.join(out_dir, name)
    hf_dir = os.path.join(root, "hf")
    key = {
        "spec": dataclasses.asdict(spec),
        "data": file_digest(train_path),
        "vocab": TINY_VOCAB,
        "prompt": {k: data_section.get(k) for k in ("system_prompt", "template", "max_prompt_len")},
        # sft trains over the tokenizer's ids only (6518221): models cached before are not reused
        "softmax": "tokenizer_ids",
    }
    if is_cached(root, key, os.path.join("hf", "config.json")):
        log(f"[demo] {name}: cached SFT model {hf_dir} (key matches, skipping training)")
        return hf_dir, True
    every = sft_checkpoint_every(spec.steps)
    if claim_dir(root, "sft", key):
        log(f"[demo] {name}: continuing the unfinished SFT in {root} (same key)")
    log(
        f"[demo] {name}: SFT {spec.steps} steps, a checkpoint every {every} (an interrupted demo continues "
        f"from the last) -> {hf_dir}"
    )
    sft_data = write_style_mix(train_path, os.path.join(root, "sft_data.jsonl"), spec.style_b_frac, spec.seed)
    init = os.path.join(root, "init")
    if not os.path.isfile(os.path.join(init, "config.json")):  # seeded: the same weights when made again
        make_tiny_checkpoint(init, arch=spec.arch, seed=spec.seed, **spec.model_kwargs())
    cfg = load_sft_config(
        {
            "run_dir": os.path.join(root, "sft"),
            "model": init,
            "out_dir": hf_dir,
            "steps": spec.steps,
            "batch_size": spec.batch_size,
            "micro_batch": spec.batch_size,
            "max_solution_len": spec.max_solution_len,
            "logprob_chunk": 16,
            "log_every": max(1, spec.steps // 10),
            "progress": True,
            "checkpoint_every": every,
            "overwrite_out_dir": True,  # hf/ is inside the demo's own directory
            "optimizer": {"lr": spec.lr, "weight_decay": 0.0, "warmup_steps": spec.warmup_steps},
            "data": {**data_section, "files": [sft_data], "solution_column": "solution"},
        }
    )
    t0 = time.perf_counter()
    sft(cfg)
    shutil.rmtree(init, ignore_errors=True)
    write_key(root, key)
    log(f"[demo] {name}: SFT {spec.steps} steps in {time.perf_counter() - t0:.0f}s -> {hf_dir}")
    return hf_dir, False


def sft_checkpoint_every(steps: int) -> int:
    """About ten checkpoints per SFT (a tiny model's save is a fraction of a second), at least two
    steps apart so that the seconds-scale quick mode stays quick."""
    return max(2, steps // 10)


def heldout_accuracy(model_dir: str, eval_path: str, cfg) -> float:
    """avg@k accuracy of a HF model on the held-out file with the run's eval settings (sampling,
    prompt rendering, grading). Cached next to the model, keyed by the model and those settings."""
    from tgpo_jax.eval.model_policy import run_eval

    root = os.path.dirname(model_dir)
    path = os.path.join(root, "heldout_eval.json")
    prompt = {k: cfg.data[k] for k in ("system_prompt", "template", "max_prompt_len") if k in cfg.data}
    key = {
        "eval_file": file_digest(eval_path),
        "k": cfg.eval.k,
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "seed": cfg.train.seed,
        "model": file_digest(os.path.join(root, KEY_FILE)),
        "prompt": prompt,
        # the in-run evaluator's batch (its random draws depend on it): iteration 0 of the run
        # reproduces this figure for the same model
        "batch_size": cfg.eval_batch_prompts,
    }
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["accuracy"]
    except (OSError, ValueError, KeyError):
        pass
    with open(eval_path) as f:
        n_items = sum(1 for line in f if line.strip())
    rep = run_eval(
        model_dir,
        [eval_path],
        k=cfg.eval.k,
        max_new_tokens=cfg.eval.max_new_tokens,
        temperature=cfg.eval.temperature,
        top_p=cfg.eval.top_p,
        batch_size=min(cfg.eval_batch_prompts, n_items),
        seed=cfg.train.seed,
        num_workers=cfg.rewards.workers,
        timeout_s=cfg.rewards.timeout_s,
        **prompt,
    )
    with open(path, "w") as f:
        json.dump({"key": key, "accuracy": rep.mean_accuracy, "mean_length": rep.mean_length}, f)
    return rep.mean_accuracy
