"""ModelConfig: one typed description of a decoder (dense Qwen2 / Qwen3 / Llama, or the Qwen3-MoE
mixture-of-experts variant), read from and written to Hugging Face config.json dictionaries."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from tgpo_jax.models.runtime_options import RuntimeOptions

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM")
_MODEL_TYPES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPES = tuple(_DTYPES)  # the accepted param_dtype / dtype names


class ModelConfigError(ValueError):
    """A checkpoint's config.json describes something this project cannot build."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; rope_type 'default' (none) or 'llama3'."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig(RuntimeOptions):
    """What a decoder is (the fields of its HF config.json), plus how it is computed: the
    keyword-only runtime options it inherits (models/runtime_options.py: attention kernel, query
    blocks, KV-cache layout, remat policy, MoE dispatch), which never come from or go to config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    # Rows of embed / lm_head at or beyond this id are padding: their logits are forced to a large
    # negative value so they never win an argmax or get sampled. None means every row is real.
    valid_vocab_size: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Token ids from config.json kept for export round trips and generation defaults.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (Qwen3-MoE). num_experts = 0: a dense model. Layer i is sparse iff
    # num_experts > 0, i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; other layers
    # keep a dense SwiGLU of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ModelConfigError(f"{name}={getattr(self, name)!r}; accepted: {', '.join(_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.valid_vocab_size is not None and not 0 < self.valid_vocab_size <= self.vocab_size:
            raise ModelConfigError(f"valid_vocab_size={self.valid_vocab_size} must be in [1, {self.vocab_size}]")
        self._check_moe()

    def _check_moe(self):
        is_moe_arch = self.architecture in MOE_ARCHITECTURES
        if not is_moe_arch and self.num_experts:
            raise ModelConfigError(f"num_experts={self.num_experts} given for dense architecture {self.architecture}")
        if problems := self.runtime_problems():
            raise ModelConfigError(problems[0])
        if not is_moe_arch or self.num_experts == 0:
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        if self.moe_intermediate_size < 1:
            raise ModelConfigError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.decoder_sparse_step < 1:
            raise ModelConfigError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ModelConfigError(f"mlp_only_layers {bad} are not layer indices in [0, {self.num_layers})")

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: True where the MLP is a mixture of experts (transformers' Qwen3MoeDecoderLayer rule)."""
        return tuple(
            self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_layers)
        )

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.sparse_layers) if s)

    @property
    def dense_mlp_layer_ids(self) -> tuple[int, ...]:
        """Layers with a dense SwiGLU in a MoE architecture (empty for dense architectures, whose
        MLP weights live in the main layer stack)."""
        if self.architecture not in MOE_ARCHITECTURES:
            return ()
        return tuple(i for i, s in enumerate(self.sparse_layers) if not s)

    @property
    def is_moe(self) -> bool:
        return self.architecture in MOE_ARCHITECTURES

    @property
    def model_type(self) -> str:
        return _MODEL_TYPES[self.architecture]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str = "float32") -> ModelConfig:
        arch = _architecture_of(hf)
        if hf.get("use_sliding_window"):
            raise ModelConfigError("use_sliding_window=true is not supported (full attention only)")
        if hf.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=true is not supported")
        n_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // n_heads
        theta, scaling = _rope_of(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        moe = _moe_of(hf) if arch in MOE_ARCHITECTURES else {}
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            # Qwen2 always has q/k/v biases and no o_proj bias; Llama / Qwen3 follow attention_bias.
            qkv_bias=True if arch == "Qwen2ForCausalLM" else attention_bias,
            o_bias=False if arch == "Qwen2ForCausalLM" else attention_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            param_dtype=param_dtype,
            dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(e) if isinstance(e := hf.get("eos_token_id"), list) else e,
            pad_token_id=hf.get("pad_token_id"),
            **moe,
        )

    @classmethod
    def from_hf_dir(cls, path: str, **kw) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory not found: {path}")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {path} (expected a Hugging Face model directory)")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ModelConfigError(f"{cfg_path}: the top level must be a JSON object, got {type(hf).__name__}")
        # One line naming the file, never a KeyError / int() traceback from deep inside the parser.
        try:
            return cls.from_hf_dict(hf, **kw)
        except KeyError as e:
            raise ModelConfigError(f"{cfg_path} lacks the required field {e.args[0]!r}") from None
        except ModelConfigError as e:
            raise ModelConfigError(f"{cfg_path}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ModelConfigError(f"{cfg_path} has a field of the wrong type: {e}") from None

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": _rope_to_hf(self),
            "torch_dtype": torch_dtype or self.param_dtype,
            "use_cache": True,
        }
        if self.architecture != "Qwen2ForCausalLM":
            hf["attention_bias"] = self.qkv_bias
        if self.architecture == "LlamaForCausalLM":
            hf["mlp_bias"] = False
        if self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            hf["use_sliding_window"] = False
        if self.is_moe:
            hf.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                output_router_logits=False,
            )
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, k) is not None:
                v = getattr(self, k)
                hf[k] = list(v) if isinstance(v, tuple) else v
        return hf


def read_model_config(path: str, key: str, **kw) -> ModelConfig:
    """ModelConfig.from_hf_dir, its errors prefixed with the config key or flag that named `path`
    (e.g. "models.student: model directory not found: ..."): read before any weights or tokenizer,
    so a missing or corrupt directory fails first and in one line."""
    try:
        return ModelConfig.from_hf_dir(path, **kw)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}") from None
    except ModelConfigError as e:
        raise ModelConfigError(f"{key}: {e}") from None


def _architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    by_type = {v: k for k, v in _MODEL_TYPES.items()}
    if not archs and hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    found = archs or [hf.get("model_type")]
    raise ModelConfigError(f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _moe_of(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE fields; transformers 5 writes `num_local_experts`, released checkpoints `num_experts`."""
    n = hf.get("num_experts", hf.get("num_local_experts"))
    if n is None:
        raise ModelConfigError("Qwen3MoeForCausalLM config.json lacks num_experts (or num_local_experts)")
    return dict(
        num_experts=int(n),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(hf.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in (hf.get("mlp_only_layers") or ())),
    )


def _rope_of(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Reads RoPE from transformers-5 `rope_parameters` or legacy `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    src = params if params.get("rope_type", params.get("type")) not in (None, "default") else legacy
    rope_type = src.get("rope_type", src.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), RopeScaling()
    if rope_type != "llama3":
        raise ModelConfigError(f"rope_type {rope_type!r} is not supported; supported: default, llama3")
    return float(theta), RopeScaling(
        rope_type="llama3",
        factor=float(src["factor"]),
        low_freq_factor=float(src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(src.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(src.get("original_max_position_embeddings", 8192)),
    )


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": rs.rope_type}
    if rs.rope_type == "llama3":
        out.update(
            factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    return out
