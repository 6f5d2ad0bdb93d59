"""The public model shapes the benchmarks build with random weights (no checkpoint needed): one
definition each, shared by `bench sampler` and `bench train-step`."""

from __future__ import annotations

QWEN_VOCAB = 151936  # Qwen2 / Qwen2.5 embedding rows


def smollm2_135m():
    """SmolLM2-135M (Llama architecture, tied head)."""
    from tgpo_jax.models.config import ModelConfig

    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def qwen2_5_1_5b():
    """Qwen2.5-1.5B (q/k/v bias, tied head): the paper's student shape."""
    from tgpo_jax.models.config import ModelConfig

    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=QWEN_VOCAB,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        qkv_bias=True,
        tie_word_embeddings=True,
    )
