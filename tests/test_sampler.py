"""The rollout sampler: exactness against transformers and a teacher-forced recompute, sampling
distributions, stop handling, bucketing and sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import TINY, left_padded_batch, make_hf_model
from scipy import stats as sps

from tgpo_jax.models import left_pad_positions
from tgpo_jax.models.hf_import import load_model
from tgpo_jax.rollout.decode_loop import FINISH_LENGTH, FINISH_STOP
from tgpo_jax.rollout.sampler import Sampler
from tgpo_jax.rollout.sampling import SamplingParams, processed_logits
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded

V = TINY["vocab_size"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("q2")
    hf = make_hf_model("qwen2", str(d))
    return str(d), hf, load_model(str(d))


def _prompts(lengths=(4, 9, 2, 6), seed=3):
    tokens, mask = left_padded_batch(V, lengths=lengths, seed=seed)
    return [list(map(int, r[m.astype(bool)])) for r, m in zip(tokens, mask)], tokens, mask


def test_greedy_equals_transformers_generate_left_padded(tiny):
    _, hf, model = tiny
    prompts, tokens, mask = _prompts()
    r = Sampler(model, stop_ids=()).sample(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=12, n=2), jax.random.key(0)
    )
    ref = hf.generate(
        input_ids=torch.tensor(tokens).long(),
        attention_mask=torch.tensor(mask),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, tokens.shape[1] :].numpy()
    assert np.array_equal(r.tokens_BT, np.repeat(ref, 2, axis=0))
    assert (r.finish_B == FINISH_LENGTH).all() and (r.lengths_B == 12).all()


@pytest.fixture(scope="module")
def peaked(tiny):
    """The tiny model with its head scaled so next-token logits spread over several nats (a random
    init is nearly uniform, which would make temperature tests powerless)."""
    from tgpo_jax.models.hf_export import flat_params
    from tgpo_jax.models.hf_import import model_from_flat

    flat = dict(flat_params(tiny[2]))
    flat["lm_head"] = flat["lm_head"] * 40.0
    return model_from_flat(tiny[2].cfg, flat)


def _first_token_logits(model, prompt):
    t = jnp.asarray([prompt], jnp.int32)
    m = jnp.ones_like(t)
    return np.asarray(model(t, left_pad_positions(m), m)[0][0, -1], np.float64)


@pytest.mark.parametrize("tau", [0.7, 1.5])
def test_sampled_frequencies_match_softmax_at_temperature(peaked, tau):
    model = peaked
    prompt = _prompts()[0][1]
    n = 6000
    r = Sampler(model, stop_ids=()).sample(
        [prompt], SamplingParams(temperature=tau, max_new_tokens=1, n=n), jax.random.key(7)
    )
    logits = _first_token_logits(model, prompt) / tau
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert logits.max() - np.median(logits) > 3  # a distribution with shape
    counts = np.bincount(r.tokens_BT[:, 0], minlength=V)
    stat, pval = _chisquare(counts, p, n)
    assert pval > 1e-3, (stat, pval)
    # and the test has power: the distribution at temperature 1 is rejected
    q = np.exp(logits * tau - (logits * tau).max())
    q /= q.sum()
    assert _chisquare(counts, q, n)[1] < 1e-6


def _chisquare(counts, p, n):
    """Chi-square goodness of fit with rare tokens pooled so every expected count is >= 5."""
    order = np.argsort(-p)
    big = order[p[order] * n >= 5]
    obs, exp = counts[big].astype(float), p[big] * n
    rest_exp = n - exp.sum()
    if rest_exp >= 5:
        obs, exp = np.append(obs, n - obs.sum()), np.append(exp, rest_exp)
    else:  # fold the sliver of leftover mass into the last bucket
        obs[-1] += n - obs.sum()
        exp[-1] += rest_exp
    return sps.chisquare(obs, exp)


def test_top_p_and_top_k_stay_inside_their_sets(peaked):
    model = peaked
    prompt = _prompts()[0][0]
    logits = _first_token_logits(model, prompt)
    order = np.argsort(-logits)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = set(order[mass_before < 0.6].tolist())
    r = Sampler(model, stop_ids=()).sample(
        [prompt], SamplingParams(top_p=0.6, max_new_tokens=1, n=3000), jax.random.key(1)
    )
    seen = set(r.tokens_BT[:, 0].tolist())
    assert seen <= nucleus and len(seen) == len(nucleus) > 1
    r = Sampler(model, stop_ids=()).sample(
        [prompt], SamplingParams(top_k=5, max_new_tokens=1, n=3000), jax.random.key(2)
    )
    assert set(r.tokens_BT[:, 0].tolist()) == set(order[:5].tolist())


def test_logprobs_equal_teacher_forced_recompute(tiny):
    _, _, model = tiny
    prompts, _, _ = _prompts()
    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=10, n=3)
    r = Sampler(model, stop_ids=()).sample(prompts, params, jax.random.key(3))
    full_t = np.concatenate([r.prompt_tokens_BP, r.tokens_BT], 1)
    full_m = np.concatenate([r.prompt_mask_BP, r.mask_BT], 1)
    logits = model(jnp.asarray(full_t), left_pad_positions(jnp.asarray(full_m)), jnp.asarray(full_m))[0]
    P = r.prompt_tokens_BP.shape[1]
    pred = processed_logits(logits[:, P - 1 : -1].reshape(-1, V), params)
    logp = np.asarray(jax.nn.log_softmax(pred, -1)).reshape(len(full_t), -1, V)
    want = np.take_along_axis(logp, r.tokens_BT[..., None], -1)[..., 0]
    valid = r.mask_BT.astype(bool)
    assert np.abs(want - r.logp_BT)[valid].max() <= 1e-5


def test_stop_tokens_end_rows_and_mask_the_rest(tiny):
    _, _, model = tiny
    prompts, _, _ = _prompts()
    free = Sampler(model, stop_ids=()).sample(prompts, SamplingParams(max_new_tokens=16, n=2), jax.random.key(4))
    stop = int(free.tokens_BT[1, 5])
    r = Sampler(model, stop_ids=(stop,)).sample(prompts, SamplingParams(max_new_tokens=16, n=2), jax.random.key(4))
    for b in range(len(r.tokens_BT)):
        hits = np.flatnonzero(free.tokens_BT[b] == stop)
        n = hits[0] + 1 if len(hits) else 16
        assert r.mask_BT[b].tolist() == [1] * n + [0] * (16 - n)
        assert np.array_equal(r.tokens_BT[b, :n], free.tokens_BT[b, :n])
        assert (r.tokens_BT[b, n:] == 0).all() and (r.logp_BT[b, n:] == 0).all()
        assert r.finish_B[b] == (FINISH_STOP if len(hits) else FINISH_LENGTH)
        assert r.lengths_B[b] == n
    assert (r.finish_B == FINISH_STOP).any()


def test_one_compile_per_bucket(tiny):
    _, _, model = tiny
    s = Sampler(model, stop_ids=(), prompt_buckets=(8, 16))
    params = SamplingParams(max_new_tokens=4, n=2)
    for lengths in [(3, 5), (7, 2), (8, 1)]:
        s.sample(_prompts(lengths)[0], params, jax.random.key(0))
    assert s.stats.compiles == 1 and s.stats.compile_s > 0
    s.sample(_prompts((12, 3))[0], params, jax.random.key(0))
    assert s.stats.compiles == 2 and s.stats.shapes == [(2, 8), (2, 16)]
    with pytest.raises(ValueError, match="longer than the largest prompt bucket"):
        s.sample([[1] * 17], params, jax.random.key(0))


def test_sharded_and_unsharded_sampling_agree(tiny):
    path, _, model = tiny
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
    sharded = load_sharded(path, mesh, ShardingRules())
    prompts, _, _ = _prompts((4, 9, 2, 6, 3, 5))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=4)
    a = Sampler(model, stop_ids=(5,)).sample(prompts, params, jax.random.key(11))
    b = Sampler(sharded, stop_ids=(5,)).sample(prompts, params, jax.random.key(11))
    assert np.array_equal(a.tokens_BT, b.tokens_BT) and np.array_equal(a.mask_BT, b.mask_BT)
    assert np.abs(a.logp_BT - b.logp_BT).max() <= 1e-5


def test_prefill_computes_only_the_last_positions_logits():
    """The prefill's next-token logits equal, bit for bit, those of the same forward computing
    logits at every prompt position (the unbounded version), and no [P, T, V] array exists in its
    program."""
    from flax import nnx

    from tests.jaxpr_helpers import iter_eqns
    from tgpo_jax.models.decoder import Decoder
    from tgpo_jax.models.kv_cache import KVCache
    from tgpo_jax.models.tiny import tiny_config
    from tgpo_jax.rollout.decode_loop import _prefill

    cfg = tiny_config("qwen2", vocab_size=97)
    model = Decoder(cfg, nnx.Rngs(3))
    P, T, n = 3, 6, 2
    prompt = jax.random.randint(jax.random.key(0), (P, T), 1, cfg.vocab_size)
    mask = jnp.asarray([[1] * T, [0, 0, 1, 1, 1, 1], [0] * (T - 1) + [1]], jnp.int32)
    cache = KVCache.init(cfg, P * n, T + 4)
    logits_BV, _ = _prefill(model, prompt, mask, cache, n)
    # the unbounded version: the same cached forward with logits at every prompt position
    full_PTV, _ = model(prompt, left_pad_positions(mask), mask, KVCache.init(cfg, P, T))
    np.testing.assert_array_equal(np.asarray(logits_BV), np.repeat(np.asarray(full_PTV[:, -1]), n, axis=0))
    graph, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda st: _prefill(nnx.merge(graph, st), prompt, mask, cache, n)[0])(state).jaxpr
    shapes = {tuple(v.aval.shape) for e in iter_eqns(jaxpr) for v in e.outvars if hasattr(v.aval, "shape")}
    assert (P, T, cfg.vocab_size) not in shapes and (P, cfg.vocab_size) in shapes
