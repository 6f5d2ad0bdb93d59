"""Tiny random checkpoints made offline (our own init + HF export + a trained byte-level BPE), for
the demo and for tests that need a complete HF directory without torch."""

from __future__ import annotations

from flax import nnx

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import Decoder
from tgpo_jax.models.hf_export import save_hf
from tgpo_jax.models.tiny_tokenizer import build_tiny_tokenizer

TINY_VOCAB = 512
_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def tiny_config(arch: str = "qwen2", **overrides) -> ModelConfig:
    if arch not in _ARCH:
        raise ValueError(f"unknown tiny arch {arch!r}; accepted: {', '.join(_ARCH)}")
    name = _ARCH[arch]
    kw = dict(
        architecture=name,
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        qkv_bias=name == "Qwen2ForCausalLM",
        qk_norm=name == "Qwen3ForCausalLM",
        tie_word_embeddings=arch == "qwen2",
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def make_tiny_checkpoint(out_dir: str, *, arch: str = "qwen2", seed: int = 0, **overrides) -> str:
    tokenizer = build_tiny_tokenizer(vocab_size=TINY_VOCAB)
    cfg = tiny_config(arch, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = Decoder(cfg, nnx.Rngs(seed))
    return save_hf(model, out_dir, tokenizer=tokenizer)
