"""Write a Decoder as a Hugging Face directory: config.json + safetensors (sharded above a size
limit, with model.safetensors.index.json) + the tokenizer, loadable by transformers.

The destination is only ever a new or empty directory, or (with overwrite) a previous model export:
`check_out_dir` refuses anything else, so an export pointed at a run directory cannot replace it."""

from __future__ import annotations

import fnmatch
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
# What a model export may hold: the weights, their config and index, and what transformers writes for a
# tokenizer or a generation config. Anything else (checkpoints/, metrics.jsonl, ...) is not ours to replace.
MODEL_EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class OutputDirError(FileExistsError, ValueError):
    """The destination of an export holds something it may not replace. A ValueError too, so the
    command line prints it as one line like its other usage errors."""


def is_model_export(path: str) -> bool:
    """True for a directory of a config.json, safetensors and tokenizer/generation files only."""
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return (
        "config.json" in entries
        and any(e.endswith(".safetensors") for e in entries)
        and all(os.path.isfile(os.path.join(path, e)) for e in entries)
        and all(any(fnmatch.fnmatchcase(e, pat) for pat in MODEL_EXPORT_FILES) for e in entries)
    )


def check_out_dir(
    path: str, *, overwrite: bool = False, name: str = "out_dir", overwrite_flag: str = "overwrite=True"
) -> None:
    """Raises OutputDirError unless `path` is absent, an empty directory, or (with `overwrite`) a
    previous model export. `name` / `overwrite_flag` are the option spellings the message uses."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        # the export renames a directory into place: it would replace a link, not write through it
        what = "a symbolic link" if os.path.islink(path) else "not a directory"
        raise OutputDirError(f"{name}: {path} exists and is {what}; choose a new or empty directory")
    entries = sorted(os.listdir(path))
    if not entries:
        return
    shown = ", ".join(e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in entries[:6])
    shown += ", ..." if len(entries) > 6 else ""
    if not is_model_export(path):
        raise OutputDirError(
            f"{name}: {path} is not empty and is not a model export (it holds {shown}); "
            f"refusing to replace it, even with {overwrite_flag}; choose a new or empty directory"
        )
    if not overwrite:
        raise OutputDirError(
            f"{name}: {path} already holds a model export; choose a new or empty directory, "
            f"or pass {overwrite_flag} to replace it"
        )


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
    overwrite: bool = False,
    names: tuple[str, str] = ("out_dir", "overwrite=True"),
) -> str:
    """Writes `model` to `out_dir` as an HF checkpoint. `out_dir` must be absent or empty, or with
    `overwrite` a previous model export (see `check_out_dir`). The directory is assembled in a
    temporary sibling and moved into place at the end, so a failure never leaves a half-written
    export (and keeps a previous one). `names`: how the caller spells out_dir and overwrite, for errors."""
    cfg: ModelConfig = model.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}; accepted: {', '.join(_TORCH_DTYPE_NAMES)}")
    check = dict(overwrite=overwrite, name=names[0], overwrite_flag=names[1])
    check_out_dir(out_dir, **check)
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
        _normal_modes(tmp)
        check_out_dir(out_dir, **check)  # again: it may have been filled while we wrote
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (changing it, even
    briefly, would race with any other thread creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _normal_modes(root: str) -> None:
    """Gives the export the modes of any file the user makes (0o666 / 0o777 less the umask):
    mkdtemp makes its directory 0700, and safetensors writes its files 0600."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Renames tmp to out_dir. A previous export there is first renamed aside and removed only once
    the new one is in place, so an interruption leaves one of the two complete under out_dir's
    parent (a rename over an empty directory replaces it directly)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = tempfile.mkdtemp(prefix=".export-old-", dir=os.path.dirname(tmp))
        os.replace(out_dir, os.path.join(old, "previous"))
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(os.path.join(old, "previous"), out_dir)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, out_dir)


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
