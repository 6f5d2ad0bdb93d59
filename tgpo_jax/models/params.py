"""The parameter layout of the decoder: one table naming every parameter, its shape, its logical
axes (for sharding rules) and its initialiser. Modules, HF import/export and sharding all read it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tgpo_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    init: str  # "normal" | "zeros" | "ones"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def layer_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Per-layer parameters, WITHOUT the leading [layers] axis they are stacked on. A MoE
    architecture keeps its MLP weights out of this stack (see `moe_param_specs`)."""
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
    if cfg.is_moe:
        for k in ("gate_kernel", "up_kernel", "down_kernel"):
            del specs[k]
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


def moe_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """One sparse layer's parameters (no leading [layers] axis), X experts of width M:
    router [E, X]; per-expert SwiGLU gate / up [X, E, M] and down [X, M, E]."""
    E, X, M = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    return {
        "router_kernel": ParamSpec((E, X), ("embed", "router"), "normal"),
        "gate_kernel": ParamSpec((X, E, M), ("expert", "embed", "moe_mlp"), "normal"),
        "up_kernel": ParamSpec((X, E, M), ("expert", "embed", "moe_mlp"), "normal"),
        "down_kernel": ParamSpec((X, M, E), ("expert", "moe_mlp", "embed"), "normal"),
    }


def dense_mlp_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """A dense SwiGLU layer's parameters (no leading [layers] axis)."""
    E, F = cfg.hidden_size, cfg.intermediate_size
    return {
        "gate_kernel": ParamSpec((E, F), ("embed", "mlp"), "normal"),
        "up_kernel": ParamSpec((E, F), ("embed", "mlp"), "normal"),
        "down_kernel": ParamSpec((F, E), ("mlp", "embed"), "normal"),
    }


# Stacks of layer parameters: state-path prefix -> the HF layer index of each stack entry.
def stack_layer_ids(cfg: ModelConfig, prefix: str) -> tuple[int, ...]:
    """'layers' holds every layer; in a MoE architecture 'moe' holds the sparse layers' MLPs and
    'dense_mlp' the dense layers' MLPs (mlp_only_layers / decoder_sparse_step)."""
    if prefix == "layers":
        return tuple(range(cfg.num_layers))
    if prefix == "moe":
        return cfg.moe_layer_ids
    if prefix == "dense_mlp":
        return cfg.dense_mlp_layer_ids
    raise ValueError(f"unknown parameter stack {prefix!r}")


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter of the model keyed by its state path ('embed', 'layers.q_kernel',
    'moe.gate_kernel', ...); stacked parameters carry a leading [layers] axis."""
    V, E = cfg.vocab_size, cfg.hidden_size
    specs = {"embed": ParamSpec((V, E), ("vocab", "embed"), "normal")}
    stacks = [("layers", layer_param_specs(cfg))]
    if cfg.is_moe:
        stacks += [("moe", moe_param_specs(cfg)), ("dense_mlp", dense_mlp_param_specs(cfg))]
    for prefix, per_layer in stacks:
        n = len(stack_layer_ids(cfg, prefix))
        if n == 0:
            continue
        for name, s in per_layer.items():
            specs[f"{prefix}.{name}"] = ParamSpec((n, *s.shape), ("layers", *s.axes), s.init)
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
