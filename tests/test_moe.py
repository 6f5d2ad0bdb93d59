"""Qwen3-MoE: logits parity with transformers' Qwen3MoeForCausalLM (sharded safetensors layout),
expert-sharded == unsharded on 8 CPU devices, sparse dispatch (no all-experts computation), teacher
scoring, the estimator and config errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import hf_logits, left_padded_batch

from tgpo_jax.models import Decoder, ModelConfigError, left_pad_positions
from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.hf_export import flat_params, save_hf
from tgpo_jax.models.hf_import import INDEX_FILE, load_model
from tgpo_jax.models.moe import experts_sorted, moe_block, resolve_impl, route
from tgpo_jax.models.params import param_specs
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded

TOL = 1e-4
VOCAB, X, TOPK = 96, 8, 2
HF_MOE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=X,
    num_experts_per_tok=TOPK,
    max_position_embeddings=128,
)
CASES = {
    "all_sparse": {},
    # layers 0 and 2 sparse, layer 1 dense (mlp_only_layers): the scan picks the MLP per layer
    "mixed_norm_topk": dict(norm_topk_prob=True, mlp_only_layers=[1]),
}


def _make_hf(out_dir, seed=0, **kw):
    """A random Qwen3MoeForCausalLM with weights scaled up so routing is decisive and the experts'
    outputs move the logits (at init scale 0.02 they would hardly matter); saved in the sharded
    safetensors layout (model.safetensors.index.json + several files)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**HF_MOE, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "mlp" in name:
                p.normal_(0.0, 1.0 if name.endswith("gate.weight") else 0.25)
    model.save_pretrained(out_dir, max_shard_size="40KB")
    return model


_CKPTS: dict = {}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """case name -> (name, HF model, checkpoint dir), each built once per module."""

    def get(name):
        if name not in _CKPTS:
            d = str(tmp_path_factory.mktemp(name))
            _CKPTS[name] = (name, _make_hf(d, **CASES[name]), d)
        return _CKPTS[name]

    return get


@pytest.fixture(params=list(CASES))
def pair(request, ckpt):
    return ckpt(request.param)


def _logits(model, tokens, mask):
    out, _ = model(jnp.asarray(tokens), left_pad_positions(jnp.asarray(mask)), jnp.asarray(mask))
    return np.asarray(out)


def test_logits_match_transformers(pair):
    import torch

    name, hf, path = pair
    assert (
        os.path.isfile(os.path.join(path, INDEX_FILE))
        and len(set(json.load(open(os.path.join(path, INDEX_FILE)))["weight_map"].values())) > 1
    )
    model = load_model(path)
    assert model.cfg.moe_layer_ids == tuple(i for i, l in enumerate(hf.model.layers) if hasattr(l.mlp, "experts"))
    tokens, mask = left_padded_batch(VOCAB)
    valid = mask.astype(bool)
    ref = hf_logits(hf, tokens, mask)
    for impl in ("blocks", "ragged", "dense"):
        ours = _logits(
            load_model(path, cfg_overrides=dict(moe_impl=impl, moe_block_size=4)) if impl != "blocks" else model,
            tokens,
            mask,
        )
        diff = np.abs(ours - ref)[valid].max()
        assert diff <= TOL, f"{name} {impl}: max abs logits diff {diff}"
    # tokens are routed to different experts: every expert is some token's choice in layer 0
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )
    top = out.router_logits[0].topk(TOPK, -1).indices.numpy().reshape(*tokens.shape, TOPK)[valid]
    assert len(np.unique(top)) == X
    # the experts matter at this scale: dropping one expert moves the logits far beyond TOL
    flat = flat_params(model)
    flat["moe.down_kernel"] = flat["moe.down_kernel"].at[:, 3].set(0.0)
    from tgpo_jax.models.hf_import import model_from_flat

    assert np.abs(_logits(model_from_flat(model.cfg, flat), tokens, mask) - ref)[valid].max() > 100 * TOL


def test_kv_cache_decode_equals_full_forward(ckpt):
    _, _, path = ckpt("all_sparse")
    model = load_model(path)
    from tgpo_jax.models import KVCache

    tokens, mask = left_padded_batch(VOCAB, lengths=(5, 9, 2), seed=1)
    B, P = tokens.shape
    new = np.random.default_rng(2).integers(0, VOCAB, (B, 3)).astype(np.int32)
    full_t, full_m = np.concatenate([tokens, new], 1), np.concatenate([mask, np.ones((B, 3), np.int32)], 1)
    full = _logits(model, full_t, full_m)
    pos = np.asarray(left_pad_positions(jnp.asarray(full_m)))
    cache = KVCache.init(model.cfg, B, P + 3)
    step = jax.jit(lambda m, t, p, k, c: m(t, p, k, c))
    got, cache = step(model, jnp.asarray(tokens), jnp.asarray(pos[:, :P]), jnp.asarray(mask), cache)
    steps = [np.asarray(got)]
    for i in range(3):
        sl = slice(P + i, P + i + 1)
        got, cache = step(model, jnp.asarray(full_t[:, sl]), jnp.asarray(pos[:, sl]), jnp.asarray(full_m[:, sl]), cache)
        steps.append(np.asarray(got))
    assert np.abs(np.concatenate(steps, 1) - full)[full_m.astype(bool)].max() <= 1e-4


def test_export_round_trip_loads_in_transformers(ckpt, tmp_path):
    import transformers as tf

    name, hf, path = ckpt("mixed_norm_topk")
    model = load_model(path)
    out = save_hf(model, str(tmp_path / "exp"))
    again = tf.Qwen3MoeForCausalLM.from_pretrained(out).eval()
    tokens, mask = left_padded_batch(VOCAB)
    a, b = hf_logits(again, tokens, mask), hf_logits(hf, tokens, mask)
    assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-5


# ------------------------------------------------------------------------------ expert sharding
@pytest.mark.parametrize(
    "case,mesh_dict,rules",
    [
        ("all_sparse", {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}, {"expert": "expert"}),
        ("all_sparse", {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, {"expert": "expert"}),
        # experts over an axis the batch also uses; expert MLP width over tensor
        ("all_sparse", {"data": 1, "fsdp": 4, "tensor": 2}, {"expert": "fsdp"}),
        ("mixed_norm_topk", {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}, {"expert": "expert"}),
    ],
    ids=["expert8", "data2xexpert4", "fsdp4xtensor2", "mixed-fsdp2xexpert4"],
)
def test_expert_sharded_equals_unsharded(ckpt, case, mesh_dict, rules):
    _, _, path = ckpt(case)
    mesh = build_mesh(MeshConfig.from_dict(mesh_dict))
    sharded = load_sharded(path, mesh, ShardingRules.from_dict(rules))
    ax = rules["expert"]
    gate = sharded.moe.gate_kernel[...]
    assert {s.data.shape[1] for s in gate.addressable_shards} == {X // mesh.shape[ax]}
    tokens, mask = left_padded_batch(VOCAB, lengths=(7, 12, 3, 12, 5, 9, 11, 2))
    fwd = jax.jit(lambda m, t, k: m(t, left_pad_positions(k), k)[0])
    got = np.asarray(fwd(sharded, jnp.asarray(tokens), jnp.asarray(mask)))
    want = _logits(load_model(path), tokens, mask)
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-5
    hlo = fwd.lower(sharded, jnp.asarray(tokens), jnp.asarray(mask)).compile().as_text()
    assert "all-reduce" in hlo  # the shards' partial expert sums are added


# ------------------------------------------------------------------------------ sparse dispatch
def _var_sizes(jaxpr):
    """Element counts of every value the program computes, inside loops and branches too."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield math.prod(v.aval.shape)
        for p in eqn.params.values():
            for j in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from _var_sizes(inner)
                elif hasattr(j, "eqns"):
                    yield from _var_sizes(j)


def test_default_dispatch_never_builds_all_experts():
    """N tokens, X experts of width M: running every expert on every token needs an [N, X, M]
    intermediate (and N*X*M*E*6 FLOPs). The default path's largest intermediate stays far below it,
    and so does the compiled program's temporary memory."""
    N, E, M, Xb, K = 512, 32, 32, 64, 2
    cfg = ModelConfig(
        "Qwen3MoeForCausalLM",
        VOCAB,
        E,
        48,
        1,
        4,
        2,
        8,
        num_experts=Xb,
        num_experts_per_tok=K,
        moe_intermediate_size=M,
        moe_block_size=8,
    )
    assert resolve_impl(cfg.moe_impl) == "blocks"  # CPU: ragged_dot has only a dense fallback here
    rng = np.random.default_rng(0)
    w = {
        "router_kernel": jnp.asarray(rng.normal(size=(E, Xb)), jnp.float32),
        "gate_kernel": jnp.asarray(rng.normal(size=(Xb, E, M)), jnp.float32),
        "up_kernel": jnp.asarray(rng.normal(size=(Xb, E, M)), jnp.float32),
        "down_kernel": jnp.asarray(rng.normal(size=(Xb, M, E)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(4, N // 4, E)), jnp.float32)
    dense_bound = N * Xb * M
    for impl, small in (("auto", True), ("dense", False)):
        f = lambda w, x: moe_block(cfg.replace(moe_impl=impl), None, w, x)  # noqa: E731
        biggest = max(_var_sizes(jax.make_jaxpr(f)(w, x).jaxpr))
        temp = jax.jit(f).lower(w, x).compile().memory_analysis().temp_size_in_bytes
        if small:
            assert biggest <= dense_bound / 8, (impl, biggest, dense_bound)
            assert temp <= 4 * dense_bound / 4, (impl, temp)
        else:  # the reference really is the dense bound (so the check above measures something)
            assert biggest >= dense_bound and temp >= 4 * dense_bound
    np.testing.assert_allclose(
        np.asarray(moe_block(cfg, None, w, x)),
        np.asarray(moe_block(cfg.replace(moe_impl="dense"), None, w, x)),
        rtol=2e-4,
        atol=2e-3,
    )


def test_blocks_dispatch_hand_example():
    """4 tokens, 3 experts, top-1, identity-like experts: y_n = w_n * down(silu(x@g)*(x@u)) by hand."""
    x = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.5]])
    ids = jnp.asarray([[2], [0], [2], [1]], jnp.int32)
    wts = jnp.asarray([[0.5], [1.0], [2.0], [1.5]])
    g = jnp.stack([jnp.eye(2) * (e + 1) for e in range(3)])
    u = jnp.ones((3, 2, 2))
    d = jnp.stack([jnp.eye(2)] * 3)
    want = []
    for n in range(4):
        e = int(ids[n, 0])
        h = jax.nn.silu(x[n] @ g[e]) * (x[n] @ u[e])
        want.append(float(wts[n, 0]) * np.asarray(h @ d[e]))
    for impl in ("blocks", "ragged", "dense"):
        got = experts_sorted(x, wts, ids, g, u, d, impl=impl, block=2)
        np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-6, atol=1e-6)


def test_router_matches_hand_softmax_topk():
    x = jnp.asarray([[1.0, 0.0]])
    r = jnp.asarray([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])  # logits [0, 1, 2]
    p = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    w, ids = route(x, r, 2, False)
    assert ids.tolist() == [[2, 1]] and np.allclose(w, [[p[2], p[1]]])
    w, _ = route(x, r, 2, True)
    assert np.allclose(w, [[p[2] / (p[2] + p[1]), p[1] / (p[2] + p[1])]])


# ------------------------------------------------------------------------------ scoring, estimate, errors
def test_teacher_scoring_with_moe_teacher(ckpt):
    from tgpo_jax.models.tiny import tiny_config
    from tgpo_jax.objectives.batch import Batch
    from tgpo_jax.objectives.registry import ObjectiveConfig
    from tgpo_jax.train.score import score

    _, _, path = ckpt("all_sparse")
    teacher = load_model(path)
    student = Decoder(tiny_config("qwen3", vocab_size=VOCAB), nnx.Rngs(0))
    prompt, pmask = left_padded_batch(VOCAB, lengths=(3, 5, 2, 4), seed=3)
    resp = np.random.default_rng(4).integers(0, VOCAB, (4, 6)).astype(np.int32)
    batch = Batch(
        prompt_BP=jnp.asarray(prompt),
        prompt_mask_BP=jnp.asarray(pmask),
        tokens_BT=jnp.asarray(resp),
        mask_BT=jnp.ones((4, 6), jnp.int32),
    )
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)

    def scored(name, **kw):  # each objective gets only the teacher fields it reads
        return score(sg, ss, tg, ts, batch, jax.random.key(0), obj_cfg=ObjectiveConfig(name=name, **kw), chunk=3)[0]

    out = scored("tgpo_fwd_topk", fwd_topk=5)
    toks, m = np.concatenate([prompt, resp], 1), np.concatenate([pmask, np.ones((4, 6), np.int32)], 1)
    z = _logits(teacher, toks, m)[:, prompt.shape[1] - 1 : -1]
    lp = z - z.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        np.asarray(scored("kdrl").teacher_logp_BT), np.take_along_axis(lp, resp[..., None], -1)[..., 0], atol=1e-4
    )
    assert np.array_equal(np.asarray(scored("tgpo_reg").teacher_ids_BT), z.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.teacher_topk_logp_BTK), -np.sort(-lp, -1)[..., :5], atol=1e-4)


def test_qwen3_30b_a3b_config_and_estimate():
    from tgpo_jax.sharding.estimate import estimate, load_estimate_config

    d = os.path.join(os.path.dirname(__file__), "..", "configs", "hf_configs", "Qwen3-30B-A3B-Thinking-2507")
    cfg = ModelConfig.from_hf_dir(d)
    n = sum(math.prod(s.shape) for s in param_specs(cfg).values())
    assert n == 30_532_122_624  # the published "30.5B" (3.3B active)
    assert cfg.moe_layer_ids == tuple(range(48)) and cfg.norm_topk_prob and cfg.num_experts == 128
    est = estimate(
        load_estimate_config(
            {
                "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
                "num_devices": 8,
                "student": {"hf_config": os.path.join(d, "..", "Qwen2.5-Math-1.5B")},
                "teacher": {"hf_config": d, "rules": {"expert": "fsdp"}},
                "batch": {
                    "rollout_batch": 8,
                    "micro_batch": 8,
                    "prompt_len": 16,
                    "response_len": 48,
                    "logits_chunk": 16,
                },
            }
        )
    )
    t = est.models["teacher"]
    # bf16; everything split 8 ways except q_norm / k_norm ([layers, head_dim], replicated)
    norms = 48 * 2 * 128
    assert t.n_params == n and t.items["params"] == (n - norms) * 2 // 8 + norms * 2
    # teacher scoring on one token per device: N=8*64/8 tokens, A = 8*N assignments
    N, A = 64, 8 * 64
    moe = N * 128 * 4 + A * 8 + A * (2 * 2048 + 3 * 768) * 2
    assert t.items["activations"] >= moe


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 must be in \[1, num_experts=8\]"),
        (dict(mlp_only_layers=(5,)), r"mlp_only_layers \[5\] are not layer indices in \[0, 2\)"),
        (dict(moe_impl="fast"), r"moe_impl='fast'; accepted: auto, ragged, blocks, dense"),
    ],
)
def test_bad_moe_configs(kw, msg):
    base = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    with pytest.raises(ModelConfigError, match=msg):
        ModelConfig("Qwen3MoeForCausalLM", VOCAB, 32, 48, 2, 4, 2, 8, **{**base, **kw})
    with pytest.raises(ModelConfigError, match="num_experts=8 given for dense architecture"):
        ModelConfig("Qwen3ForCausalLM", VOCAB, 32, 48, 2, 4, 2, 8, num_experts=8)


def test_experts_not_divisible_by_expert_axis():
    cfg = ModelConfig(
        "Qwen3MoeForCausalLM", VOCAB, 32, 48, 1, 4, 2, 8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16
    )
    mesh = build_mesh(MeshConfig.from_dict({"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}))
    from tgpo_jax.sharding import ShardingConfigError, param_shardings

    with pytest.raises(ShardingConfigError, match=r"parameter moe.gate_kernel dim 1 \(expert=6\) is not divisible"):
        param_shardings(cfg, ShardingRules.from_dict({"expert": "expert"}), mesh)
