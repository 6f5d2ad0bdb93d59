"""Write a Decoder as a Hugging Face directory: config.json + safetensors (sharded above a size
limit, with model.safetensors.index.json) + the tokenizer, loadable by transformers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.hf_import import INDEX_FILE, SINGLE_FILE
from tgpo_jax.models.hf_rules import active_rules, stack_entries, to_hf

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_TORCH_DTYPE_NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def flat_params(model) -> dict[str, jax.Array]:
    """{'embed': ..., 'layers.q_kernel': ..., ...} from a Decoder."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(pure, "")
    return out


def _hf_tensors(cfg: ModelConfig, flat: dict[str, jax.Array], np_dtype):
    """Yields (hf name, numpy array), one parameter on host at a time."""
    for rule in active_rules(cfg):
        host = np.asarray(jax.device_get(flat[rule.ours])).astype(np_dtype)
        for idx, name in stack_entries(cfg, rule):
            yield name, np.ascontiguousarray(to_hf(rule, host[idx]))
        del host


def save_hf(
    model,
    out_dir: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | None = None,
    tokenizer=None,
) -> str:
    """Writes `model` to `out_dir` as an HF checkpoint. The directory is assembled in a temporary
    sibling and moved into place at the end, so a failure never leaves a half-written export."""
    cfg: ModelConfig = model.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}; accepted: {', '.join(_TORCH_DTYPE_NAMES)}")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        _write_weights(cfg, flat_params(model), tmp, _TORCH_DTYPE_NAMES[dtype], max_shard_bytes)
        # Padded vocabulary rows (valid_vocab_size) are exported as they are: the HF model has the
        # same number of rows, and the tokenizer never produces those ids.
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(torch_dtype=dtype), f, indent=2)
        _write_tokenizer(tmp, tokenizer_dir, tokenizer)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_weights(cfg, flat, out_dir, np_dtype, max_shard_bytes):
    shards: list[list[str]] = [[]]
    pending: dict[str, np.ndarray] = {}
    size = 0
    weight_map: dict[str, str] = {}

    def flush():
        nonlocal pending, size
        if pending:
            name = f"part-{len(shards) - 1:05d}.safetensors"
            save_file(pending, os.path.join(out_dir, name), metadata={"format": "pt"})
            for k in pending:
                weight_map[k] = name
            shards.append([])
        pending, size = {}, 0

    for name, arr in _hf_tensors(cfg, flat, np_dtype):
        if pending and size + arr.nbytes > max_shard_bytes:
            flush()
        pending[name] = arr
        size += arr.nbytes
    flush()
    n = len(shards) - 1
    if n == 1:
        os.replace(os.path.join(out_dir, "part-00000.safetensors"), os.path.join(out_dir, SINGLE_FILE))
        return
    final = {f"part-{i:05d}.safetensors": f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)}
    for old, new in final.items():
        os.replace(os.path.join(out_dir, old), os.path.join(out_dir, new))
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in final.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def _write_tokenizer(out_dir: str, tokenizer_dir: str | None, tokenizer) -> None:
    if tokenizer is None and tokenizer_dir is not None:
        from tgpo_jax.models.hf_import import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
