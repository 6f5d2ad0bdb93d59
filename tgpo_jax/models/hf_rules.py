"""The name/layout table between Hugging Face checkpoints and this project's parameters.

Each rule maps one of our parameter paths (see params.py) to an HF tensor name (with `{i}` for the
layer index of stacked parameters, and `{x}` for the expert index of a MoE layer's per-expert
weights, which HF stores one tensor per expert) and a layout transform. HF linear weights are [out, in]; ours
are [in, out] with attention heads split out ([embed, heads, head_dim] / [heads, head_dim, embed]).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.params import param_specs, stack_layer_ids


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    hf: str
    layout: str  # "same" | "transpose" | "in_heads" | "out_heads" | "heads"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    @property
    def stack_dims(self) -> int:
        """Leading dims of our parameter that index HF tensors: [layers] and, per expert, [experts]."""
        return int(self.stacked) + int("{x}" in self.hf)


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
RULES = (
    Rule("embed", "model.embed_tokens.weight", "same"),
    Rule("final_norm", "model.norm.weight", "same"),
    Rule("lm_head", "lm_head.weight", "transpose"),
    Rule("layers.attn_norm", "model.layers.{i}.input_layernorm.weight", "same"),
    Rule("layers.mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "same"),
    Rule("layers.q_kernel", _ATTN + "q_proj.weight", "in_heads"),
    Rule("layers.k_kernel", _ATTN + "k_proj.weight", "in_heads"),
    Rule("layers.v_kernel", _ATTN + "v_proj.weight", "in_heads"),
    Rule("layers.o_kernel", _ATTN + "o_proj.weight", "out_heads"),
    Rule("layers.q_bias", _ATTN + "q_proj.bias", "heads"),
    Rule("layers.k_bias", _ATTN + "k_proj.bias", "heads"),
    Rule("layers.v_bias", _ATTN + "v_proj.bias", "heads"),
    Rule("layers.o_bias", _ATTN + "o_proj.bias", "same"),
    Rule("layers.q_norm", _ATTN + "q_norm.weight", "same"),
    Rule("layers.k_norm", _ATTN + "k_norm.weight", "same"),
    Rule("layers.gate_kernel", _MLP + "gate_proj.weight", "transpose"),
    Rule("layers.up_kernel", _MLP + "up_proj.weight", "transpose"),
    Rule("layers.down_kernel", _MLP + "down_proj.weight", "transpose"),
    # Qwen3-MoE: router [X, E] and one [out, in] tensor per expert; dense layers of a MoE model.
    Rule("moe.router_kernel", _MLP + "gate.weight", "transpose"),
    Rule("moe.gate_kernel", _MLP + "experts.{x}.gate_proj.weight", "transpose"),
    Rule("moe.up_kernel", _MLP + "experts.{x}.up_proj.weight", "transpose"),
    Rule("moe.down_kernel", _MLP + "experts.{x}.down_proj.weight", "transpose"),
    Rule("dense_mlp.gate_kernel", _MLP + "gate_proj.weight", "transpose"),
    Rule("dense_mlp.up_kernel", _MLP + "up_proj.weight", "transpose"),
    Rule("dense_mlp.down_kernel", _MLP + "down_proj.weight", "transpose"),
)

# Buffers some checkpoints carry that hold nothing we need (RoPE tables are recomputed).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def active_rules(cfg: ModelConfig) -> list[Rule]:
    specs = param_specs(cfg)
    return [r for r in RULES if r.ours in specs]


def hf_shape(rule: Rule, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for one of our (per-layer) parameter shapes."""
    if rule.layout == "same":
        return our_shape
    if rule.layout == "transpose":
        return our_shape[::-1]
    if rule.layout == "in_heads":  # ours [E, H, D] <- hf [H*D, E]
        return (our_shape[1] * our_shape[2], our_shape[0])
    if rule.layout == "out_heads":  # ours [H, D, E] <- hf [E, H*D]
        return (our_shape[2], our_shape[0] * our_shape[1])
    if rule.layout == "heads":  # ours [H, D] <- hf [H*D]
        return (our_shape[0] * our_shape[1],)
    raise ValueError(rule.layout)


def to_ours(rule: Rule, x: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    if rule.layout in ("same", "heads"):
        return x.reshape(our_shape)
    if rule.layout == "transpose":
        return x.T
    if rule.layout == "in_heads":
        return x.T.reshape(our_shape)
    if rule.layout == "out_heads":
        return x.T.reshape(our_shape)
    raise ValueError(rule.layout)


def to_hf(rule: Rule, x: np.ndarray) -> np.ndarray:
    if rule.layout == "same":
        return x
    if rule.layout == "heads":
        return x.reshape(-1)
    if rule.layout == "transpose":
        return x.T
    if rule.layout == "in_heads":  # [E, H, D] -> [H*D, E]
        return x.reshape(x.shape[0], -1).T
    if rule.layout == "out_heads":  # [H, D, E] -> [E, H*D]
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(rule.layout)


def stack_entries(cfg: ModelConfig, rule: Rule) -> list[tuple[tuple[int, ...], str]]:
    """(index into our parameter's leading stack dims, HF tensor name) for every HF tensor of a
    rule; a non-stacked rule gives [((), name)]. Stack entry j of 'moe.*' is HF layer
    cfg.moe_layer_ids[j] (likewise 'dense_mlp.*'), and expert x is `{x}`."""
    if not rule.stacked:
        return [((), rule.hf)]
    layers = stack_layer_ids(cfg, rule.ours.split(".")[0])
    experts = range(cfg.num_experts) if rule.stack_dims == 2 else [None]
    return [
        ((j, x) if x is not None else (j,), rule.hf.format(i=layer, x=x))
        for (j, layer), x in itertools.product(enumerate(layers), experts)
    ]


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[Rule, tuple[int, ...], tuple[int, ...]]]:
    """Every HF tensor name the config implies -> (rule, stack index (() if not stacked), HF shape)."""
    specs = param_specs(cfg)
    out = {}
    for rule in active_rules(cfg):
        inner = specs[rule.ours].shape[rule.stack_dims :]
        for idx, name in stack_entries(cfg, rule):
            out[name] = (rule, idx, hf_shape(rule, inner))
    return out
