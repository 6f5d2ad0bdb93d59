"""Decoders (Qwen2 / Qwen3 / Llama), Hugging Face import and export, vocabulary alignment."""

from tgpo_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError, RopeScaling
from tgpo_jax.models.decoder import Decoder, abstract_model, apply, init_model, left_pad_positions
from tgpo_jax.models.kv_cache import KVCache

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "ModelConfigError",
    "RopeScaling",
    "Decoder",
    "KVCache",
    "abstract_model",
    "apply",
    "init_model",
    "left_pad_positions",
]
