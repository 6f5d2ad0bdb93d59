"""The continuous-batching rollout engine (tgpo_jax/rollout/engine.py): greedy parity with the static
sampler (decode_loop.rollout_fn) at any slot count, per-request randomness (tokens independent of the
slot count), both KV-cache layouts, and an 8-device mesh."""

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from tgpo_jax.models.decoder import Decoder
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.rollout.decode_loop import FINISH_LENGTH, FINISH_STOP, rollout_fn
from tgpo_jax.rollout.engine import engine_fn
from tgpo_jax.rollout.sampling import SamplingParams

# untied head: a tied random tiny model greedily repeats its last prompt token; this one does not
CFG = tiny_config("qwen2", tie_word_embeddings=False, cache_layers="unroll")
T_NEW = 10


def _split(layout: str = "unroll"):
    return nnx.split(Decoder(dataclasses.replace(CFG, cache_layers=layout), nnx.Rngs(0)))  # same weights


def _prompts(lengths=(5, 2, 4), T=6, seed=0):
    """Left-padded prompts of different lengths: (tokens [P, T], mask [P, T])."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] >= T - np.asarray(lengths)[:, None]).astype(np.int32)
    return (rng.integers(1, CFG.vocab_size, mask.shape) * mask).astype(np.int32), mask


@functools.cache
def _engine(params: SamplingParams, stop_ids: tuple, slots: int):
    return jax.jit(functools.partial(engine_fn, params=params, stop_ids=stop_ids, slots=slots), static_argnums=0)


@functools.cache
def _static(params: SamplingParams, stop_ids: tuple):
    return jax.jit(functools.partial(rollout_fn, params=params, stop_ids=stop_ids), static_argnums=0)


def _run(fn, model, prompts, key=0):
    return [np.asarray(x) for x in fn(*model, *prompts, jax.random.key(key))]


def _stop_that_splits(tokens_BT):
    """A token the greedy model emits after token 0 in some rows and never in others: a stop id that
    ends some rows early and lets others run to the length limit."""
    for tok in np.unique(tokens_BT[:, 1:]):
        rows = (tokens_BT == tok).any(1)
        if rows.any() and not rows.all() and (tokens_BT[rows, 0] != tok).all():
            return int(tok)
    raise AssertionError("no token splits the greedy rows")


def test_greedy_engine_equals_the_static_sampler_at_every_slot_count():
    model, prompts = _split(), _prompts()
    params = SamplingParams(temperature=0.0, max_new_tokens=T_NEW, n=2)
    free = _run(_static(params, ()), model, prompts)
    stop = _stop_that_splits(free[0])
    ref = _run(_static(params, (stop,)), model, prompts)
    tokens, mask, logp, lengths, finish = ref
    assert (finish == FINISH_STOP).any() and (finish == FINISH_LENGTH).any()  # not vacuous
    assert lengths.min() < T_NEW and lengths.max() == T_NEW
    B = len(tokens)
    for slots in (1, 2, B, B + 3):
        got = _run(_engine(params, (stop,), slots), model, prompts)
        for name, a, b in zip(("tokens", "mask", "lengths", "finish"), got[:2] + got[3:], ref[:2] + ref[3:]):
            assert np.array_equal(a, b), (slots, name, a, b)
        assert np.abs(got[2] - logp).max() <= 1e-5, slots


def test_token_zero_stops_and_one_token_responses_never_take_a_slot():
    model, prompts = _split(), _prompts()
    params = SamplingParams(temperature=0.0, max_new_tokens=T_NEW, n=2)
    first = _run(_static(params, ()), model, prompts)[0][:, 0]
    stops = (int(first[0]),)  # prompt 0's greedy token 0: its rows stop at once, the others decode
    for p, stop_ids in ((params, stops), (dataclasses.replace(params, max_new_tokens=1), ())):
        ref = _run(_static(p, stop_ids), model, prompts)
        got = _run(_engine(p, stop_ids, 2), model, prompts)
        assert all(np.array_equal(a, b) for a, b in zip(got[:2] + got[3:], ref[:2] + ref[3:]))
        assert ref[3].min() == 1
        assert np.abs(got[2] - ref[2]).max() <= 1e-5


def _sampled_params():
    return SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=T_NEW, n=3)


# a random tiny model draws nearly uniformly: 48 stop ids end about a tenth of the draws, so
# requests finish at different steps and the slots are refilled in a different order per slot count
SAMPLED_STOPS = tuple(range(1, CFG.vocab_size, CFG.vocab_size // 48))


def test_sampled_tokens_do_not_depend_on_the_slot_count():
    model, prompts = _split(), _prompts()
    params = _sampled_params()
    B = len(prompts[0]) * params.n
    runs = {slots: _run(_engine(params, SAMPLED_STOPS, slots), model, prompts, key=5) for slots in (1, 3, B)}
    ref = runs[B]
    assert ref[3].min() < T_NEW and ref[3].max() == T_NEW  # some stop early, some run to the limit
    for slots, got in runs.items():
        assert all(np.array_equal(a, b) for a, b in zip(got[:2] + got[3:], ref[:2] + ref[3:])), slots
        assert np.abs(got[2] - ref[2]).max() <= 1e-5, slots
    other = _run(_engine(params, SAMPLED_STOPS, 3), model, prompts, key=6)
    assert not np.array_equal(other[0], ref[0])
    # the n samples of a prompt differ (per-request keys), and tokens after a stop are 0
    assert not np.array_equal(ref[0][0], ref[0][1])
    valid = ref[1].astype(bool)
    assert (ref[0][~valid] == 0).all() and (ref[2][~valid] == 0).all()


def test_both_cache_layouts_give_the_same_tokens():
    prompts, params = _prompts(), _sampled_params()
    outs = [_run(_engine(params, SAMPLED_STOPS, 3), _split(layout), prompts, key=5) for layout in ("unroll", "scan")]
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert np.abs(outs[0][2] - outs[1][2]).max() <= 1e-5


def test_an_8_device_mesh_gives_the_local_tokens():
    from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, init_sharded

    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
    sharded = nnx.split(init_sharded(CFG, mesh, ShardingRules(), seed=0))
    prompts, params = _prompts(lengths=(5, 2, 4, 6)), _sampled_params()
    fn = _engine(params, SAMPLED_STOPS, 3)  # 3 slots: not a multiple of the 4 batch shards
    local, got = _run(fn, _split(), prompts, key=5), _run(fn, sharded, prompts, key=5)
    assert np.array_equal(local[0], got[0]) and np.array_equal(local[1], got[1])
    assert np.abs(local[2] - got[2]).max() <= 1e-5


def test_the_sampler_runs_the_engine_on_the_weights_it_is_given():
    """Sampler is the engine behind the host API: at temperature 0, with the auto slot count and
    with 3 slots, its rows (prompt-major, n per prompt) equal the static sampler's on the same
    left-padded prompts; `state=` samples those weights, not the model's own; rollout.slots < 0 is
    refused."""
    import pytest

    from tgpo_jax.rollout.sampler import Sampler
    from tgpo_jax.train.config import load_train_config

    graphdef, own = _split()
    other = nnx.split(Decoder(CFG, nnx.Rngs(1)))[1]
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    T = 16  # the smallest default prompt bucket
    mask = np.zeros((3, T), np.int32)
    tokens = np.zeros((3, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    params = SamplingParams(temperature=0.0, max_new_tokens=T_NEW, n=2)
    model = nnx.merge(graphdef, own)
    for state in (own, other):
        ref = _run(_static(params, ()), (graphdef, state), (tokens, mask))
        for slots in (0, 3):
            got = Sampler(model, stop_ids=(), slots=slots).sample(prompts, params, jax.random.key(0), state=state)
            for a, b in zip(got[:2] + got[3:5], ref[:2] + ref[3:]):
                assert np.array_equal(np.asarray(a), b), slots
            assert np.abs(np.asarray(got[2]) - ref[2]).max() <= 1e-5
    own_out = Sampler(model, stop_ids=()).sample(prompts, params, jax.random.key(0))
    assert np.array_equal(own_out.tokens_BT, _run(_static(params, ()), (graphdef, own), (tokens, mask))[0])
    assert not np.array_equal(own_out.tokens_BT, ref[0])  # the two weight sets answer differently
    with pytest.raises(ValueError, match=r"rollout.slots=-1: must be >= 0"):
        load_train_config("configs/demo.yaml", ["rollout.slots=-1"])
    donated = jax.tree.map(lambda x: x + 0, other)
    jax.tree.leaves(donated)[0].delete()  # as a train step's donation leaves the state it was given
    with pytest.raises(ValueError, match="donated"):
        Sampler(model, stop_ids=()).sample(prompts, params, jax.random.key(0), state=donated)


def test_auto_slots_is_half_the_requests_in_whole_shards():
    from tgpo_jax.rollout.slots import auto_slots, engine_slots

    assert [auto_slots(r, 1) for r in (1, 2, 6, 7, 1024)] == [1, 1, 3, 4, 512]
    assert [auto_slots(r, 4) for r in (4, 8, 12, 1024)] == [4, 4, 8, 512]
    assert [engine_slots(r, c, 4) for r, c in ((8, 0), (8, 3), (8, 16), (4, 0))] == [4, 3, 8, 4]
