"""The two KV-cache layouts (ModelConfig.cache_layers): per-layer buffers with unrolled layers, and
one stacked cache scanned by a single layer body. Both must give the full forward's logits, the same
sampled tokens, and the scan's compiled program must not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.models import Decoder, KVCache, left_pad_positions
from tgpo_jax.models.config import ModelConfig, ModelConfigError
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.rollout.sampler import Sampler
from tgpo_jax.rollout.sampling import SamplingParams
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, init_sharded

MOE_MIX = ModelConfig(
    "Qwen3MoeForCausalLM",
    96,
    32,
    48,
    3,
    4,
    2,
    8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    mlp_only_layers=(1,),
    qk_norm=True,
    moe_block_size=4,
)
CONFIGS = {"qwen3": tiny_config("qwen3", num_layers=3), "qwen3_moe_mixed": MOE_MIX}


def _model(cfg: ModelConfig, layout: str) -> Decoder:
    return Decoder(dataclasses.replace(cfg, cache_layers=layout), nnx.Rngs(0))  # same seed: same weights


def _batch(V, B=3, P=7, n_new=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 5])[:B]
    mask = np.concatenate([(np.arange(P)[None] >= P - lengths[:, None]), np.ones((B, n_new), bool)], 1)
    tokens = rng.integers(1, V, mask.shape) * mask
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)


@pytest.mark.parametrize("name", CONFIGS)
def test_both_layouts_decode_the_full_forward_logits(name):
    cfg = CONFIGS[name]
    P, n_new = 7, 5
    tokens, mask = _batch(cfg.vocab_size, P=P, n_new=n_new)
    pos = left_pad_positions(mask)
    full = np.asarray(_model(cfg, "unroll")(tokens, pos, mask)[0])
    step = jax.jit(lambda m, t, p, k, c: m(t, p, k, c))
    for layout in ("unroll", "scan"):
        model = _model(cfg, layout)
        cache = KVCache.init(model.cfg, tokens.shape[0], P + n_new + 2)
        assert cache.stacked == (layout == "scan")
        logits, cache = step(model, tokens[:, :P], pos[:, :P], mask[:, :P], cache)
        got = [np.asarray(logits)]
        for i in range(P, P + n_new):
            logits, cache = step(model, tokens[:, i : i + 1], pos[:, i : i + 1], mask[:, i : i + 1], cache)
            got.append(np.asarray(logits))
        valid = np.asarray(mask, bool)
        assert np.abs(np.concatenate(got, 1) - full)[valid].max() <= 1e-5, layout
        assert int(cache.index) == P + n_new


def test_sampler_gives_the_same_tokens_with_either_layout_sharded_or_not():
    cfg = tiny_config("qwen2")
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16]]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2)
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
    outs = {}
    for layout in ("unroll", "scan"):
        c = dataclasses.replace(cfg, cache_layers=layout)
        for where, model in (
            ("local", Decoder(c, nnx.Rngs(0))),
            ("mesh", init_sharded(c, mesh, ShardingRules(), seed=0)),
        ):
            outs[layout, where] = Sampler(model, stop_ids=(5,)).sample(prompts, params, jax.random.key(4))
    ref = outs["unroll", "local"]
    for k, r in outs.items():
        assert np.array_equal(r.tokens_BT, ref.tokens_BT) and np.array_equal(r.mask_BT, ref.mask_BT), k
        assert np.abs(r.logp_BT - ref.logp_BT).max() <= 1e-5, k


def _decode_step_hlo_size(cfg: ModelConfig) -> int:
    model = Decoder(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = KVCache.init(cfg, 2, 16)
    one = jnp.ones((2, 1), jnp.int32)

    def step(state, cache):
        return nnx.merge(graphdef, state)(one, one, one, cache)[0]

    return len(jax.jit(step).lower(state, cache).as_text())


def test_scanned_cache_program_does_not_grow_with_depth():
    size = {
        (layout, n): _decode_step_hlo_size(tiny_config("qwen2", num_layers=n, cache_layers=layout))
        for layout in ("scan", "unroll")
        for n in (2, 8)
    }
    assert size["scan", 8] <= 1.02 * size["scan", 2], size
    assert size["unroll", 8] >= 2 * size["unroll", 2], size  # the contrast: unrolled grows


def test_bad_cache_layout_is_rejected():
    with pytest.raises(ModelConfigError, match=r"cache_layers='stack'; accepted: auto, unroll, scan"):
        tiny_config("qwen2", cache_layers="stack")


def test_generate_gives_the_same_tokens_with_either_layout():
    from tgpo_jax.rollout.generate import generate

    cfg = tiny_config("llama", num_layers=3)
    tokens, mask = _batch(cfg.vocab_size, n_new=0)
    outs = [
        generate(_model(cfg, layout), tokens, mask, jax.random.key(2), max_new_tokens=8, temperature=0.7)
        for layout in ("unroll", "scan")
    ]
    assert np.array_equal(np.asarray(outs[0].tokens_BT), np.asarray(outs[1].tokens_BT))
    assert np.abs(np.asarray(outs[0].logp_BT) - np.asarray(outs[1].logp_BT)).max() <= 1e-5
