"""Load a local Hugging Face checkpoint directory (config.json + safetensors, one file or the
sharded index layout; dense or Qwen3-MoE with one tensor per expert) into a Decoder.

Everything is validated from the safetensors headers before a byte of weight data is read, so bad
input fails with a clear message and nothing is half-built. Tensors are then streamed one at a
time from memory-mapped files and placed straight into their target shardings with
`jax.make_array_from_callback`: a device only ever receives its own shard, and the host never
holds more than one stacked parameter.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import Decoder, abstract_model
from tgpo_jax.models.hf_rules import IGNORED_SUFFIXES, expected_hf_tensors, to_ours
from tgpo_jax.models.params import param_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ACCEPTED_DTYPES = ("BF16", "F16", "F32")


class CheckpointError(ValueError):
    """The checkpoint directory cannot be loaded as it is."""


def weight_files(path: str) -> dict[str, str]:
    """tensor name -> file path, from the index (sharded checkpoints) or the single file."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        missing = sorted({fn for fn in weight_map.values() if not os.path.isfile(os.path.join(path, fn))})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return {name: os.path.join(path, fn) for name, fn in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in _open(single).keys()}
    found = sorted(os.listdir(path))
    hint = (
        " (pickled .bin/.pt weights are not read: convert them to safetensors)"
        if any(f.endswith((".bin", ".pt", ".pth")) for f in found)
        else ""
    )
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}; files found: {', '.join(found) or 'none'}"
    )


def _open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt or unreadable safetensors file {file}: {e}") from e


def validate_checkpoint(cfg: ModelConfig, files: Mapping[str, str]) -> dict[str, tuple]:
    """Checks names, shapes and dtypes against the config from the headers only. Returns the
    expected-tensor table of `expected_hf_tensors`. Raises CheckpointError naming every problem."""
    expected = expected_hf_tensors(cfg)
    present = {n for n in files if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still store the shared matrix
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    handles = {f: _open(f) for f in sorted(set(files.values()))}
    for name, (_, _, shape) in expected.items():
        if name not in files:
            continue
        sl = handles[files[name]].get_slice(name)
        found_shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if found_shape != shape:
            problems.append(f"tensor {name} has shape {list(found_shape)}, expected {list(shape)} from config.json")
        if dtype not in ACCEPTED_DTYPES:
            problems.append(f"tensor {name} has dtype {dtype}; accepted: {', '.join(ACCEPTED_DTYPES)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match config.json ({cfg.architecture}):\n  " + "\n  ".join(problems)
        )
    return expected


def _param_reader(cfg: ModelConfig, handles, files, expected, path: str):
    """A function index -> numpy block of our parameter `path` (index = tuple of slices). A
    stacked parameter reads only the HF tensors its block covers (its layers and, for experts, its
    experts), so an expert-sharded device never receives other shards' experts."""
    spec = param_specs(cfg)[path]
    by_idx = {idx: n for n, (r, idx, _) in expected.items() if r.ours == path}
    rule = next(r for r, _, _ in expected.values() if r.ours == path)
    np_dtype = _NP_DTYPES[cfg.param_dtype]
    k = rule.stack_dims
    inner = spec.shape[k:]

    def read(name):
        # copy=False: a file already in the param dtype is not copied a second time (get_tensor
        # returns a fresh array).
        return to_ours(rule, handles[files[name]].get_tensor(name), inner).astype(np_dtype, copy=False)

    if k == 0:
        return lambda index: read(by_idx[()])[index]

    def read_stacked(index):
        """The block `index` of a stacked parameter, filled one HF tensor at a time into one
        preallocated array: the host holds the block plus a single HF tensor, never a list of
        per-layer copies next to their stacked result."""
        index = tuple(index) + (slice(None),) * (len(spec.shape) - len(index))
        ranges = [range(spec.shape[d])[index[d]] for d in range(k)]
        out = np.empty([len(range(n)[s]) for n, s in zip(spec.shape, index)], np_dtype)
        for pos, combo in zip(itertools.product(*(range(len(r)) for r in ranges)), itertools.product(*ranges)):
            out[pos] = read(by_idx[combo])[index[k:]]
        return out

    return read_stacked


def load_params(path: str, cfg: ModelConfig, shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> dict:
    """Reads the checkpoint at `path` into a flat dict {param path: jax.Array}, each array created
    directly in `shardings[path]` (default: the first local device)."""
    files = weight_files(path)
    expected = validate_checkpoint(cfg, files)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files.values()))}
        for p, spec in param_specs(cfg).items():
            reader = _param_reader(cfg, handles, files, expected, p)
            sharding = (shardings or {}).get(p, default)
            out[p] = jax.make_array_from_callback(spec.shape, sharding, reader)
    return out


def load_model(
    path: str,
    *,
    param_dtype: str = "float32",
    dtype: str = "float32",
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    cfg_overrides: dict[str, Any] | None = None,
    activation_sharding: Any = None,
) -> Decoder:
    """A Decoder with the weights of the HF directory `path` (config.json + safetensors)."""
    cfg = ModelConfig.from_hf_dir(path, param_dtype=param_dtype, dtype=dtype)
    if cfg_overrides:
        cfg = cfg.replace(**cfg_overrides)
    flat = load_params(path, cfg, shardings)
    return model_from_flat(cfg, flat, activation_sharding)


def model_from_flat(cfg: ModelConfig, flat: Mapping[str, jax.Array], activation_sharding: Any = None) -> Decoder:
    """Builds a Decoder around given parameter arrays (no random init is run)."""
    model = abstract_model(cfg, activation_sharding)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for p, value in flat.items():
        node = pure
        *parents, leaf = p.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_tokenizer(path: str, key: str | None = None):
    """The tokenizer saved beside the weights, through transformers' AutoTokenizer (offline).
    `key`: the config key or flag that named `path`, put in front of the errors."""
    from transformers import AutoTokenizer

    where = f"{key}: " if key else ""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}tokenizer directory not found: {path}")
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{where}no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
