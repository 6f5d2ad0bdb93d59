"""The continuous-batching engine over a paged KV cache (rollout/paged_engine.py, rollout/pages.py)
against the dense engine: the same tokens, masks, lengths and finish reasons (log-probs within 1e-5)
at two slot counts, greedy and sampled, both cache layouts, a pool far below the worst case (rows
wait for pages), and an 8-device mesh; the page allocator's bookkeeping."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.models.decoder import Decoder
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.rollout import pages as pg
from tgpo_jax.rollout.engine import engine_fn
from tgpo_jax.rollout.sampling import SamplingParams

CFG = tiny_config("qwen2", tie_word_embeddings=False, cache_layers="unroll")
T_NEW = 12
PAGE = 4
# a random tiny model draws nearly uniformly: these stop ids end about a tenth of the draws
STOPS = tuple(range(1, CFG.vocab_size, CFG.vocab_size // 48))


def _split(layout: str = "unroll"):
    return nnx.split(Decoder(dataclasses.replace(CFG, cache_layers=layout), nnx.Rngs(0)))


def _prompts(lengths=(5, 2, 7, 1), T=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] >= T - np.asarray(lengths)[:, None]).astype(np.int32)
    return (rng.integers(1, CFG.vocab_size, mask.shape) * mask).astype(np.int32), mask


@functools.cache
def _engine(params, slots, kv_pages=0):
    fn = functools.partial(engine_fn, params=params, stop_ids=STOPS, slots=slots, kv_pages=kv_pages, page_size=PAGE)
    return jax.jit(fn, static_argnums=0)


def _run(fn, model, prompts, key=0):
    return [np.asarray(x) for x in fn(*model, *prompts, jax.random.key(key))]


def _assert_same(got, ref, what):
    for name, a, b in zip(("tokens", "mask", "lengths", "finish"), got[:2] + got[3:], ref[:2] + ref[3:]):
        assert np.array_equal(a, b), (what, name, a, b)
    assert np.abs(got[2] - ref[2]).max() <= 1e-5, what


def _refusals(monkeypatch):
    """Counts, per step, the live rows refused a page (a fresh trace sees the patched grant)."""
    seen = []
    grant = pg.grant

    def spy(pool, table, key, want, rem, cand, rank, max_want):
        granted, pool, table = grant(pool, table, key, want, rem, cand, rank, max_want)
        jax.debug.callback(lambda x: seen.append(int(x)), jnp.sum((want > 0) & ~cand & ~granted))
        return granted, pool, table

    monkeypatch.setattr(pg, "grant", spy)
    return seen


# worst case per request: 7 + 12 - 1 = 18 tokens = 5 pages of 4; 3 slots x 5 = 15 pages (+ trash)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("slots, kv_pages", [(3, 16), (6, 8)])
def test_the_paged_engine_gives_the_dense_engines_tokens(temperature, slots, kv_pages, monkeypatch):
    """kv_pages 16: the worst case of every slot fits. kv_pages 8: 7 usable pages for 6 slots,
    below two worst-case requests: rows wait for pages (counted), yet every token equals the dense
    engine's."""
    model, prompts = _split(), _prompts()
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=T_NEW, n=3)
    ref = _run(_engine(params, slots), model, prompts, key=5)
    assert ref[3].min() < T_NEW and ref[3].max() == T_NEW  # some stop early, some run to the limit
    refused = _refusals(monkeypatch)
    fn = functools.partial(engine_fn, params=params, stop_ids=STOPS, slots=slots, kv_pages=kv_pages, page_size=PAGE)
    got = _run(jax.jit(fn, static_argnums=0), model, prompts, key=5)
    _assert_same(got, ref, (slots, kv_pages))
    assert (sum(refused) > 0) == (kv_pages == 8), refused


def test_the_stacked_pool_gives_the_per_layer_pools_tokens():
    prompts = _prompts()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=T_NEW, n=3)
    outs = [_run(_engine(params, 4, 12), _split(layout), prompts, key=5) for layout in ("unroll", "scan")]
    _assert_same(outs[1], outs[0], "scan")
    _assert_same(outs[0], _run(_engine(params, 4), _split(), prompts, key=5), "dense")


def test_an_8_device_mesh_gives_the_local_tokens():
    """4 slots over 4 batch shards: 4 page groups, each device's rows in its own pages."""
    from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, init_sharded

    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
    sharded = nnx.split(init_sharded(CFG, mesh, ShardingRules(), seed=0))
    prompts = _prompts()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=T_NEW, n=2)
    fn = _engine(params, 4, 4 * 7)
    _assert_same(_run(fn, sharded, prompts, key=5), _run(_engine(params, 4), _split(), prompts, key=5), "mesh")


def test_a_pool_that_cannot_hold_one_request_is_refused():
    params = SamplingParams(temperature=0.0, max_new_tokens=T_NEW, n=1)
    with pytest.raises(ValueError, match=r"rollout.kv_pages=5: .*cannot hold one request of 19 tokens \(5 pages\)"):
        _engine(params, 2, 5)(*_split(), *_prompts(), jax.random.key(0))


def test_grants_are_safe_oldest_first_and_pages_come_back():
    """One group of 8 pages (7 usable). Rows 0 (age 0, holds 3, may need 5) and 1 (age 1, holds 2,
    may need 4) both cross a page boundary with 2 pages free: granting row 1 would leave row 0 a
    slack of 0 - 1 < 0, so only row 0 (the oldest) is granted. A new request (needing 2 pages in
    all, wanting 1) is then refused too (FIFO after a refusal)."""
    pool = pg.new_pool(1, 8, 3)
    table = jnp.zeros((3, 5), jnp.int32)
    want = jnp.asarray([3, 2, 0], jnp.int32)
    key, rem, cand, rank = (
        jnp.asarray([0, 1, pg.BIG]),
        want * 0 + jnp.asarray([5, 4, 0]),
        jnp.zeros(3, bool),
        jnp.zeros(3),
    )
    granted, pool, table = pg.grant(pool, table, key, want, rem, cand, rank, 3)  # the two rows arrive
    assert granted.tolist() == [True, True, False] and int(pool.count_G[0]) == 2
    pool = pool.replace(need_N=jnp.asarray([5, 4, 0]), seq_N=jnp.asarray([0, 1, pg.BIG]))
    held = np.asarray(table)[:2]
    assert len(set(held[0, :3]) | set(held[1, :2])) == 5 and 0 not in held[0, :3] and 0 not in held[1, :2]
    want, rem = jnp.asarray([1, 1, 1]), jnp.asarray([2, 2, 2])
    key, cand, rank = jnp.asarray([0, 1, 2]), jnp.asarray([False, False, True]), jnp.asarray([0, 0, 0])
    granted, pool2, table2 = pg.grant(pool, table, key, want, rem, cand, rank, 3)
    assert granted.tolist() == [True, False, False] and int(pool2.count_G[0]) == 1
    assert int(table2[0, 3]) not in set(held[0, :3]) | set(held[1, :2]) | {0}
    pool3, table3 = pg.release(pool2, table2, jnp.asarray([True, True, False]))
    assert int(pool3.count_G[0]) == 7 and not np.asarray(table3).any()
    assert sorted(np.asarray(pool3.free_GU[0]).tolist()) == list(range(1, 8))


def test_the_sampler_runs_the_paged_engine_from_the_config_keys():
    """Sampler(slots, kv_pages, page_size), as train setup builds it from rollout.*: the same
    responses as the dense engine (also at the auto slot count); kv_pages < 0 or page_size 0 is
    refused."""
    from tgpo_jax.rollout.sampler import Sampler
    from tgpo_jax.train.config import load_train_config

    model = Decoder(CFG, nnx.Rngs(0))
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=T_NEW, n=2)
    dense = Sampler(model, stop_ids=STOPS, slots=3).sample(prompts, params, jax.random.key(1))
    paged = Sampler(model, stop_ids=STOPS, slots=3, kv_pages=12, page_size=PAGE).sample(
        prompts, params, jax.random.key(1)
    )
    for a, b in zip(dense, paged):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    auto = Sampler(model, stop_ids=STOPS, kv_pages=12, page_size=PAGE).sample(prompts, params, jax.random.key(1))
    for a, b in zip(dense, auto):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    base = ["models.student=unused", "models.teacher=unused", "data.files=[t.jsonl]", "eval.data.files=[e.jsonl]"]
    cfg = load_train_config(
        "configs/demo.yaml", base + ["rollout.slots=4", "rollout.kv_pages=64", "rollout.page_size=16"]
    )
    assert (cfg.rollout.kv_pages, cfg.rollout.page_size) == (64, 16)
    for bad in (["rollout.kv_pages=-1"], ["rollout.page_size=0"]):
        with pytest.raises(ValueError, match=bad[-1].split("=")[0].replace(".", r"\.")):
            load_train_config("configs/demo.yaml", base + bad)
