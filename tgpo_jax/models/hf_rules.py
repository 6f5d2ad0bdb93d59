"""The name/layout table between Hugging Face checkpoints and this project's parameters.

Each rule maps one of our parameter paths (see params.py) to an HF tensor name (with `{i}` for the
layer index of stacked parameters) and a layout transform. HF linear weights are [out, in]; ours
are [in, out] with attention heads split out ([embed, heads, head_dim] / [heads, head_dim, embed]).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.params import param_specs


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    hf: str
    layout: str  # "same" | "transpose" | "in_heads" | "out_heads" | "heads"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


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


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[Rule, int | None, tuple[int, ...]]]:
    """Every HF tensor name the config implies -> (rule, layer index or None, HF shape)."""
    specs = param_specs(cfg)
    out = {}
    for rule in active_rules(cfg):
        shape = specs[rule.ours].shape
        if rule.stacked:
            for i in range(cfg.num_layers):
                out[rule.hf.format(i=i)] = (rule, i, hf_shape(rule, shape[1:]))
        else:
            out[rule.hf] = (rule, None, hf_shape(rule, shape))
    return out
