"""Tiny random transformers models (PyTorch) saved with save_pretrained, for parity tests."""

from __future__ import annotations

import numpy as np

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_hf_model(kind: str, out_dir: str | None = None, seed: int = 0, **overrides):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(TINY, **overrides)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(tie_word_embeddings=False, rope_theta=10000.0, **kw)
        cls = tf.Qwen2ForCausalLM
    elif kind == "qwen2_tied":
        cfg = tf.Qwen2Config(tie_word_embeddings=True, **kw)
        cls = tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        kw.setdefault("head_dim", 24)  # independent of hidden / heads
        cfg = tf.Qwen3Config(tie_word_embeddings=False, **kw)
        cls = tf.Qwen3ForCausalLM
    elif kind == "llama3":
        cfg = tf.LlamaConfig(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            **kw,
        )
        cls = tf.LlamaForCausalLM
    elif kind == "llama_tied":
        cfg = tf.LlamaConfig(tie_word_embeddings=True, **kw)
        cls = tf.LlamaForCausalLM
    else:
        raise ValueError(kind)
    model = cls(cfg).eval().to(torch.float32)
    # Random init gives zero biases and unit norms: perturb them so every parameter is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def left_padded_batch(vocab: int, lengths=(7, 12, 3, 12), seed: int = 0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, T - n :] = rng.integers(0, vocab, n)
        mask[b, T - n :] = 1
    return tokens, mask


def hf_logits(model, tokens, mask):
    import torch

    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()
