"""The parameter layout of the decoder: one table naming every parameter, its shape, its logical
axes (for sharding rules) and its initialiser. Modules, HF import/export and sharding all read it."""

from __future__ import annotations

import dataclasses
from typing import Callable

from tgpo_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    init: str  # "normal" | "zeros" | "ones"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def layer_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Per-layer parameters, WITHOUT the leading [layers] axis they are stacked on."""
    E, F, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs = {
        "attn_norm": ParamSpec((E,), ("embed",), "ones"),
        "q_kernel": ParamSpec((E, H, D), ("embed", "heads", "head_dim"), "normal"),
        "k_kernel": ParamSpec((E, K, D), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_kernel": ParamSpec((E, K, D), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_kernel": ParamSpec((H, D, E), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ParamSpec((E,), ("embed",), "ones"),
        "gate_kernel": ParamSpec((E, F), ("embed", "mlp"), "normal"),
        "up_kernel": ParamSpec((E, F), ("embed", "mlp"), "normal"),
        "down_kernel": ParamSpec((F, E), ("mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        specs["q_bias"] = ParamSpec((H, D), ("heads", "head_dim"), "zeros")
        specs["k_bias"] = ParamSpec((K, D), ("kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = ParamSpec((K, D), ("kv_heads", "head_dim"), "zeros")
    if cfg.o_bias:
        specs["o_bias"] = ParamSpec((E,), ("embed",), "zeros")
    if cfg.qk_norm:
        specs["q_norm"] = ParamSpec((D,), ("head_dim",), "ones")
        specs["k_norm"] = ParamSpec((D,), ("head_dim",), "ones")
    return specs


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter of the model keyed by its state path ('embed', 'layers.q_kernel', ...)."""
    V, E, L = cfg.vocab_size, cfg.hidden_size, cfg.num_layers
    specs = {"embed": ParamSpec((V, E), ("vocab", "embed"), "normal")}
    for name, s in layer_param_specs(cfg).items():
        specs[f"layers.{name}"] = ParamSpec((L, *s.shape), ("layers", *s.axes), s.init)
    specs["final_norm"] = ParamSpec((E,), ("embed",), "ones")
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((E, V), ("embed", "vocab"), "normal")
    return specs


INIT_STD = 0.02


def initializer(kind: str) -> Callable:
    import jax
    import jax.numpy as jnp

    if kind == "normal":
        return lambda key, shape, dtype: (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    if kind == "zeros":
        return lambda key, shape, dtype: jnp.zeros(shape, dtype)
    if kind == "ones":
        return lambda key, shape, dtype: jnp.ones(shape, dtype)
    raise ValueError(f"unknown initializer {kind!r}")
