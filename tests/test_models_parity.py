"""Logits parity with transformers' PyTorch models (fp32, left-padded mixed-length batches)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import TINY, hf_logits, left_padded_batch, make_hf_model

from tgpo_jax.models import Decoder, KVCache, left_pad_positions
from tgpo_jax.models.hf_import import load_model

KINDS = ["qwen2", "qwen2_tied", "qwen3", "llama3", "llama_tied"]
TOL = 1e-4


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, str(d))
    return request.param, hf, load_model(str(d)), str(d)


def _ours(model, tokens, mask):
    logits, _ = model(jnp.asarray(tokens), left_pad_positions(jnp.asarray(mask)), jnp.asarray(mask))
    return np.asarray(logits)


def test_logits_match_transformers(pair):
    kind, hf, model, _ = pair
    tokens, mask = left_padded_batch(TINY["vocab_size"])
    ref = hf_logits(hf, tokens, mask)
    ours = _ours(model, tokens, mask)
    valid = mask.astype(bool)
    diff = np.abs(ours - ref)[valid].max()
    assert diff <= TOL, f"{kind}: max abs logits diff {diff}"
    assert np.isfinite(ours).all()


def test_config_features_parsed(pair):
    kind, _, model, _ = pair
    cfg = model.cfg
    assert cfg.qkv_bias == kind.startswith("qwen2")
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.tie_word_embeddings == kind.endswith("tied")
    assert (cfg.rope_scaling.rope_type == "llama3") == (kind == "llama3")
    if kind == "qwen3":
        assert cfg.head_dim == 24 != cfg.hidden_size // cfg.num_heads


def test_kv_cache_prefill_then_decode_equals_full_forward(pair):
    kind, _, model, _ = pair
    tokens, mask = left_padded_batch(TINY["vocab_size"], lengths=(5, 9, 2), seed=1)
    B, P = tokens.shape
    n_new = 6
    rng = np.random.default_rng(2)
    new = rng.integers(0, TINY["vocab_size"], (B, n_new)).astype(np.int32)
    full_tokens = np.concatenate([tokens, new], 1)
    full_mask = np.concatenate([mask, np.ones((B, n_new), np.int32)], 1)
    full = _ours(model, full_tokens, full_mask)

    pos = np.asarray(left_pad_positions(jnp.asarray(full_mask)))
    cache = KVCache.init(model.cfg, B, P + n_new + 3)
    step = jax.jit(lambda m, t, p, k, c: m(t, p, k, c))
    logits, cache = step(model, jnp.asarray(tokens), jnp.asarray(pos[:, :P]), jnp.asarray(mask), cache)
    got = [np.asarray(logits)]
    for i in range(n_new):
        sl = slice(P + i, P + i + 1)
        logits, cache = step(
            model, jnp.asarray(full_tokens[:, sl]), jnp.asarray(pos[:, sl]), jnp.asarray(full_mask[:, sl]), cache
        )
        got.append(np.asarray(logits))
    got = np.concatenate(got, 1)
    valid = full_mask.astype(bool)
    assert np.abs(got - full)[valid].max() <= 1e-5
    assert int(cache.index) == P + n_new


def test_bf16_compute_close_to_fp32(pair):
    """bf16 params and compute: same model, logits within bf16 rounding of the fp32 result."""
    kind, _, _, path = pair
    m32 = load_model(path)
    m16 = load_model(path, param_dtype="bfloat16", dtype="bfloat16")
    assert m16.embed[...].dtype == jnp.bfloat16
    tokens, mask = left_padded_batch(TINY["vocab_size"])
    a, b = _ours(m32, tokens, mask), _ours(m16, tokens, mask)
    valid = mask.astype(bool)
    scale = np.abs(a[valid]).max()
    # bf16 keeps 8 mantissa bits: errors of a few 1e-2 relative to the logit scale, not more.
    assert np.abs(a - b)[valid].max() <= 0.05 * scale
    assert (a[valid].argmax(-1) == b[valid].argmax(-1)).mean() > 0.9


def _count_dots(cfg, n_layers):
    model = Decoder(cfg.replace(num_layers=n_layers))
    tok = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda m: m(tok, tok, tok + 1)[0])(model)
    return str(jaxpr).count("dot_general")


def test_layers_are_scanned_not_unrolled(pair):
    """The traced program holds one layer body whatever the depth: compile time is flat in depth."""
    _, _, model, _ = pair
    assert _count_dots(model.cfg, 2) == _count_dots(model.cfg, 12)


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_rope_matches_transformers(kind):
    """RoPE alone (default and llama3 frequencies) against the HF model's own rotary embedding and
    apply_rotary_pos_emb, at positions up to 30,000 (fp32 angles)."""
    import importlib

    import torch

    from tgpo_jax.models import layers as L
    from tgpo_jax.models.config import ModelConfig

    hf = make_hf_model(kind)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    B, T, H, D = 2, 5, 3, cfg.head_dim
    positions = np.array([[0, 1, 2, 3, 4], [29996, 29997, 29998, 29999, 30000]], np.int32)
    q = np.random.default_rng(0).standard_normal((B, T, H, D)).astype(np.float32)
    cos, sin = L.rope_cos_sin(jnp.asarray(positions), L.rope_inv_freq(cfg), jnp.float32)
    ours = np.asarray(L.apply_rope(jnp.asarray(q), cos, sin))
    q_t = torch.from_numpy(q).transpose(1, 2)  # HF: [B, H, T, D]
    with torch.no_grad():
        cos_t, sin_t = hf.model.rotary_emb(q_t, torch.from_numpy(positions).long())
        ref = importlib.import_module(type(hf).__module__).apply_rotary_pos_emb(q_t, q_t, cos_t, sin_t)[0]
    diff = np.abs(ours - ref.transpose(1, 2).numpy()).max()
    assert diff <= 1e-5, f"{kind}: max abs RoPE diff {diff}"
