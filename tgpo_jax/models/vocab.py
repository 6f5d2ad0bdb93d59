"""Vocabulary alignment between models that share a tokenizer but not an embedding size.

Checkpoints of one family pad their embedding tables to different sizes (Qwen2.5-7B has 152,064
rows, Qwen2.5-3B 151,936, while the tokenizer has 151,665 ids). Distillation compares per-token
distributions, so student and teacher logits must have the same last axis. `align_vocab` pads or
truncates the embed rows / lm_head columns to a common size and records how many rows are real
(`valid_vocab_size`: the decoder masks the logits of the other rows). That the ids also mean the
same text in both models is checked separately, on the tokenizers (models/tokenizer_check.py).

Shapes: embed [V, E] (rows are token ids), lm_head [E, V] (absent when the embeddings are tied).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tgpo_jax.models.config import ModelConfig


class VocabAlignmentError(ValueError):
    """The parameters cannot be resized to the requested vocabulary size."""


def align_vocab(
    params: dict, cfg: ModelConfig, target_size: int, *, real_vocab_size: int | None = None
) -> tuple[dict, ModelConfig]:
    """Pads (with zero rows) or truncates the vocabulary axis of the parameters to target_size.

    Args:
      params: the nested parameter dict (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`) with
        'embed' [V, E] and, unless cfg.tie_word_embeddings, 'lm_head' [E, V]; V == cfg.vocab_size.
        numpy or jax arrays; the dict is not modified.
      cfg: the model's config.
      target_size: the new V.
      real_vocab_size: number of ids that are real tokens (e.g. len(tokenizer)); ids at or beyond it
        are padding. Combined with cfg.valid_vocab_size (or cfg.vocab_size when that is None).

    Returns:
      (new_params, new_cfg): 'embed' [target_size, E], 'lm_head' [E, target_size] (other entries
      shared with params), and cfg with vocab_size=target_size and valid_vocab_size =
      min(cfg.valid_vocab_size or cfg.vocab_size, real_vocab_size, target_size).

    Raises:
      VocabAlignmentError: target_size would drop rows of real tokens, or the params do not match cfg.
    """
    _check_vocab_layout(params, cfg)
    if target_size <= 0:
        raise VocabAlignmentError(f"target vocabulary size must be positive, got {target_size}")
    real_V, sources = _real_vocab_size(cfg, real_vocab_size)
    if target_size < real_V:
        raise VocabAlignmentError(
            f"cannot truncate the vocabulary from {cfg.vocab_size} to {target_size} rows: ids below "
            f"{real_V} are real tokens ({sources}) and rows {target_size}..{real_V - 1} would be dropped; "
            f"use a target size of at least {real_V}"
        )
    new_params = dict(params)
    new_params["embed"] = _resize_axis(params["embed"], target_size, axis=0)
    if "lm_head" in params:
        new_params["lm_head"] = _resize_axis(params["lm_head"], target_size, axis=1)
    new_cfg = cfg.replace(vocab_size=target_size, valid_vocab_size=min(real_V, target_size))
    return new_params, new_cfg


def common_vocab_size(*sizes: int, multiple: int = 1) -> int:
    """The vocabulary size that every model can be aligned to without dropping rows: max(sizes),
    rounded up to a multiple of `multiple` (1 = no rounding; e.g. 128 keeps the vocab axis evenly
    shardable). Example: common_vocab_size(152064, 151936) == 152064."""
    if not sizes:
        raise ValueError("common_vocab_size needs at least one size")
    if any(int(s) <= 0 for s in sizes) or multiple <= 0:
        raise ValueError(f"sizes and multiple must be positive, got sizes={sizes}, multiple={multiple}")
    largest = max(int(s) for s in sizes)
    return -(-largest // multiple) * multiple


def _check_vocab_layout(params: dict, cfg: ModelConfig) -> None:
    """Raises VocabAlignmentError unless embed is [cfg.vocab_size, E] and lm_head [E, cfg.vocab_size]
    is present exactly when the embeddings are untied."""
    if "embed" not in params:
        raise VocabAlignmentError("params have no 'embed' entry")
    embed_VE = params["embed"]
    if embed_VE.ndim != 2 or embed_VE.shape[0] != cfg.vocab_size:
        raise VocabAlignmentError(f"embed has shape {tuple(embed_VE.shape)}; expected [{cfg.vocab_size}, E]")
    has_head = "lm_head" in params
    if cfg.tie_word_embeddings and has_head:
        raise VocabAlignmentError("cfg.tie_word_embeddings is true but params have an 'lm_head'")
    if not cfg.tie_word_embeddings and not has_head:
        raise VocabAlignmentError("cfg.tie_word_embeddings is false but params have no 'lm_head'")
    if has_head:
        head_EV = params["lm_head"]
        if head_EV.ndim != 2 or tuple(head_EV.shape) != (embed_VE.shape[1], cfg.vocab_size):
            raise VocabAlignmentError(
                f"lm_head has shape {tuple(head_EV.shape)}; expected [{embed_VE.shape[1]}, {cfg.vocab_size}]"
            )


def _real_vocab_size(cfg: ModelConfig, real_vocab_size: int | None) -> tuple[int, str]:
    """The number of leading ids that are real tokens, and a description of where it comes from."""
    if cfg.valid_vocab_size is not None:
        candidates = [(cfg.valid_vocab_size, f"cfg.valid_vocab_size={cfg.valid_vocab_size}")]
    else:
        candidates = [(cfg.vocab_size, f"cfg.vocab_size={cfg.vocab_size} with every row real")]
    if real_vocab_size is not None:
        if real_vocab_size <= 0:
            raise VocabAlignmentError(f"real_vocab_size must be positive, got {real_vocab_size}")
        candidates.append((real_vocab_size, f"real_vocab_size={real_vocab_size}"))
    size, source = min(candidates, key=lambda c: c[0])
    return size, source


def _resize_axis(x, size: int, *, axis: int):
    """x with `axis` truncated or zero-padded (at the end) to `size`; dtype kept."""
    x = jnp.asarray(x)
    current = x.shape[axis]
    if size <= current:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - current)
    return jnp.pad(x, pad)


__all__ = ["VocabAlignmentError", "align_vocab", "common_vocab_size"]
