"""`tgpo-jax bench rollout` (tgpo_jax/bench/rollout_bench.py) and the forced stop lengths it relies on
(`stop_at_B` of decode_loop.rollout_fn and engine.engine_fn): exact lengths on both samplers, the
length distributions, the engine's simulated schedule, and the command end to end. No timing
assertions (CPU load varies)."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.bench.device_peaks import hbm_gbps
from tgpo_jax.bench.rollout_bench import (
    DISTS,
    RolloutBenchSettings,
    engine_bytes,
    engine_steps,
    matched_chunks,
    matched_steps,
    stop_lengths,
)
from tgpo_jax.cli import main
from tgpo_jax.models.decoder import Decoder
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.rollout.decode_loop import FINISH_LENGTH, FINISH_STOP, rollout_fn
from tgpo_jax.rollout.engine import engine_fn
from tgpo_jax.rollout.sampling import SamplingParams

CFG = tiny_config("qwen2", tie_word_embeddings=False, cache_layers="unroll")
T_NEW = 8
# prompts x n = 3 x 2 requests: one stops at token 0, one runs to the cap, the rest in between
STOP_AT = np.array([1, T_NEW, 3, 5, 2, 7], np.int32)


def _fns(params: SamplingParams, stop_ids=()):
    static = jax.jit(functools.partial(rollout_fn, params=params, stop_ids=stop_ids), static_argnums=0)
    engine = jax.jit(functools.partial(engine_fn, params=params, stop_ids=stop_ids, slots=2), static_argnums=0)
    return static, engine


def _inputs():
    rng = np.random.default_rng(0)
    mask = (np.arange(6)[None] >= 6 - np.array([[5], [2], [6]])).astype(np.int32)  # left-padded, 3 lengths
    prompt = (rng.integers(1, CFG.vocab_size, mask.shape) * mask).astype(np.int32)
    return (*nnx.split(Decoder(CFG, nnx.Rngs(0))), prompt, mask, jax.random.key(3))


def _np(out):
    return [np.asarray(x) for x in out]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_lengths_are_exact_on_both_samplers(temperature):
    params = SamplingParams(temperature=temperature, max_new_tokens=T_NEW, n=2)
    inputs = _inputs()
    runs = {
        name: _np(fn(*inputs, stop_at_B=jnp.asarray(STOP_AT))) for name, fn in zip(("static", "engine"), _fns(params))
    }
    for name, (tokens, mask, logp, lengths, finish) in runs.items():
        assert np.array_equal(lengths, STOP_AT), name
        assert (finish == FINISH_STOP).all(), name  # the cap too: a forced stop, as if a stop id were drawn there
        assert np.array_equal(mask, (np.arange(T_NEW)[None] < STOP_AT[:, None]).astype(np.int32)), name
        assert (tokens[mask == 0] == 0).all() and (logp[mask == 0] == 0).all(), name
    if temperature == 0.0:  # greedy: the same tokens on both sides
        s, e = runs["static"], runs["engine"]
        assert np.array_equal(s[0], e[0]) and np.abs(s[2] - e[2]).max() <= 1e-5


def test_forced_lengths_only_cut_the_free_run():
    """Greedy: forced lengths truncate the tokens of a free run (stop_at_B=None) and change nothing
    else; with every stop at the cap only the finish reason differs."""
    params = SamplingParams(temperature=0.0, max_new_tokens=T_NEW, n=2)
    inputs = _inputs()
    for fn in _fns(params):
        free = _np(fn(*inputs))
        assert (free[4] == FINISH_LENGTH).all() and (free[3] == T_NEW).all()
        cut = _np(fn(*inputs, stop_at_B=jnp.asarray(STOP_AT)))
        assert np.array_equal(cut[0], free[0] * cut[1])
        capped = _np(fn(*inputs, stop_at_B=jnp.full(len(STOP_AT), T_NEW, jnp.int32)))
        assert np.array_equal(capped[0], free[0]) and (capped[4] == FINISH_STOP).all()


def test_a_drawn_stop_id_still_ends_a_request_first():
    params = SamplingParams(temperature=0.0, max_new_tokens=T_NEW, n=2)
    inputs = _inputs()
    free = _np(_fns(params)[0](*inputs))[0]
    stop = int(free[1, 1])  # request 1 (forced to the cap) draws this at token 1
    for fn in _fns(params, (stop,)):
        lengths, finish = _np(fn(*inputs, stop_at_B=jnp.asarray(STOP_AT)))[3:]
        assert lengths[1] <= 2 and finish[1] == FINISH_STOP
        assert (lengths <= STOP_AT).all() and lengths[0] == 1


def test_length_distributions():
    B, T = 200, 256
    for d in DISTS:
        a = stop_lengths(d, B, T, seed=1)
        assert a.dtype == np.int32 and a.shape == (B,) and a.min() >= 1 and a.max() <= T, d
        assert np.array_equal(a, stop_lengths(d, B, T, seed=1)), d  # deterministic
    assert (stop_lengths("fixed", B, T, 0) == T).all()
    u = stop_lengths("uniform", B, T, 0)
    assert u.min() >= T // 16 and u.max() <= T and len(np.unique(u)) > 50
    lt = stop_lengths("long_tail", B, T, 0)
    assert (lt == T).sum() == 30  # round(0.15 x 200) at the cap
    short = lt[lt < T]
    assert short.min() >= T // 16 and short.max() <= T // 4 and T // 16 < np.median(short) < T // 4
    assert not (lt[:30] == T).all()  # shuffled: the long ones are not all at the head of the queue
    assert stop_lengths("long_tail", 4, 16, 0).max() == 16  # at least one request at the cap


def test_engine_schedule():
    L = np.array([1, 5, 3, 8, 2], np.int32)  # decode steps needed: 0, 4, 2, 7, 1
    assert engine_steps(L, 1) == 14  # one slot: the sum
    assert engine_steps(L, 5) == engine_steps(L, 50) == 7  # every request at once: the longest
    assert engine_steps(L, 2) == 9  # in queue order: slot a runs 4 then 1 (to 5), slot b 2 then 7 (to 9)
    assert engine_steps(np.ones(3, np.int32), 2) == 0


def test_quick_command_reports_json(capsys, tmp_path):
    out_file = tmp_path / "rollout.json"
    small = ["--prompts", "2", "--n", "4", "--new-tokens", "16", "--repeats", "1"]
    assert main(["bench", "rollout", "--quick", *small, "--json-out", str(out_file)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r == json.loads(out_file.read_text())
    assert r["model"] == "demo" and r["batch"] == 8 and r["slots"] == 4 and r["new_tokens"] == 16
    assert r["device"] == "cpu" and r["jax_version"] == jax.__version__
    assert r["matched_calls"] == 2 and r["matched_rows"] == 4  # 4 slots = one prompt of n = 4 per call
    for d in DISTS:
        keys = [f"ratio_{d}", f"ratio_matched_{d}"]
        keys += [f"{side}_tokens_per_s_{d}" for side in ("static", "static_matched", "engine")]
        for k in keys:
            assert isinstance(r[k], float) and r[k] > 0 and math.isfinite(r[k]), k
        per = r["dists"][d]
        L = stop_lengths(d, 8, 16, 0)
        assert per["useful_tokens"] == int(L.sum())
        assert per["static_steps"] == per["max_len"] - 1 and per["engine_steps"] >= per["static_steps"]
        assert per["static_matched_steps"] == L[:4].max() - 1 + L[4:].max() - 1  # each call to its longest
        assert per["ratio_matched"] == per["static_matched_median_s"] / per["engine_median_s"]


def test_matched_static_chunks():
    s = RolloutBenchSettings(prompts=5, n=4, slots=8)
    assert matched_chunks(s) == [(0, 2), (2, 2), (4, 1)]  # 8 rows = 2 whole prompts per call; the rest last
    L = np.arange(1, 21, dtype=np.int32)  # request r stops after r + 1 tokens
    assert matched_steps(L, s) == (8 - 1) + (16 - 1) + (20 - 1)
    assert matched_chunks(RolloutBenchSettings(prompts=3, n=4, slots=2)) == [(0, 1), (1, 1), (2, 1)]  # >= 1 prompt
    assert matched_chunks(RolloutBenchSettings(prompts=3, n=4, slots=12)) == [(0, 3)]  # all rows: one call


def test_engine_bytes_by_hand():
    """2 layers x 2 kv heads x head_dim 16, float32: K and V of one position = 2 x 2 x 2 x 16 x 4 B."""
    cfg = tiny_config("qwen2", tie_word_embeddings=False).replace(num_layers=2, num_kv_heads=2, head_dim=16)
    s = RolloutBenchSettings(prompts=1, n=2, prompt_len=5, new_tokens=4, slots=1)
    L = np.array([1, 4], np.int32)  # request 0: prefill only; request 1: decode tokens 1, 2, 3
    weights = sum(x.size for x in jax.tree.leaves(nnx.state(Decoder(cfg, nnx.Rngs(0)), nnx.Param)))
    weights -= cfg.vocab_size * cfg.hidden_size  # untied: the embedding table is gathered, not read
    per_position = 2 * 2 * 2 * 16 * 4
    positions = (5 + 1) + (5 + 2) + (5 + 3)  # request 1's tokens 1..3 attend to prompt + j positions
    assert engine_steps(L, 1) == 3
    assert engine_bytes(cfg, s, L) == 3 * weights * 4 + positions * per_position


def test_device_peaks():
    assert hbm_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert hbm_gbps("NVIDIA H100 PCIe") == 2000.0
    assert hbm_gbps("NVIDIA H200") == 4800.0
    assert hbm_gbps("NVIDIA GH200 480GB") == 4000.0
    assert hbm_gbps("TPU v5 lite") == 819.0 and hbm_gbps("TPU v5") == 2765.0 and hbm_gbps("TPU v6 lite") == 1640.0
    assert hbm_gbps("cpu", "cpu") is None and hbm_gbps("Some Future Chip") is None


def test_hbm_fraction_reported_when_a_bandwidth_is_given(capsys):
    small = ["--prompts", "2", "--n", "2", "--new-tokens", "8", "--repeats", "1", "--dist", "uniform"]
    assert main(["bench", "rollout", "--quick", *small, "--hbm-gbps", "10"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per = r["dists"]["uniform"]
    assert r["hbm_gbps"] == 10.0 and per["engine_bytes"] > 0
    assert r["engine_hbm_fraction_uniform"] == per["engine_bytes"] / per["engine_median_s"] / 1e9 / 10.0
    assert r["engine_hbm_fraction_fixed"] is None  # not run


def test_bad_settings_are_rejected(capsys):
    with pytest.raises(ValueError):
        RolloutBenchSettings(slots=0)
    with pytest.raises(ValueError):
        RolloutBenchSettings(dists=("bimodal",))
    with pytest.raises(ValueError):
        RolloutBenchSettings(new_tokens=0)
    with pytest.raises(ValueError, match="hbm_gbps"):
        RolloutBenchSettings(hbm_gbps=0.0)
