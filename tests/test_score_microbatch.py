"""The score step in micro-batches of rows: splitting the rollout batch (strided, scored one
micro-batch at a time) changes neither the scored fields, nor the teacher's sampled targets, nor
the gap metrics (CPU, tiny models; one test on an 8-device data-parallel mesh)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.models import Decoder
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.objectives.batch import SCORED_FIELDS, Batch, merge_micro_batches, split_micro_batches
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, init_sharded
from tgpo_jax.sharding.distributed import put_batch
from tgpo_jax.train.score import _score, score

S_CFG = tiny_config("qwen2")
# a bigger teacher vocabulary: some teacher ids are ones the student cannot decode (masked, counted)
T_CFG = tiny_config("llama", num_layers=3, vocab_size=576, valid_vocab_size=560)
B, P, T, CHUNK = 16, 6, 16, 8

# At least one objective per scoring path: teacher argmax CE, pi_old at the teacher id, teacher
# top-K, the student's top-K read by the teacher, the teacher's sample, no teacher.
OBJECTIVES = {
    "tgpo_reg": {},
    "tgpo_adv": {},
    "tgpo_fwd_topk": {"fwd_topk": 5},
    "rkl_centered": {"rkl_centered_topk": 6},
    "tgpo_mc": {},
    "grpo": {},
}


def _rollout_batch(vocab: int, seed: int = 0) -> Batch:
    """Left-padded prompts and right-padded responses of varied lengths (some rows end early)."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(2, P + 1, B)
    prompt_mask = (np.arange(P)[None] >= (P - p_len)[:, None]).astype(np.int32)
    r_len = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < r_len[:, None]).astype(np.int32)
    return Batch(
        prompt_BP=jnp.asarray(rng.integers(1, vocab, (B, P)) * prompt_mask, jnp.int32),
        prompt_mask_BP=jnp.asarray(prompt_mask),
        tokens_BT=jnp.asarray(rng.integers(1, vocab, (B, T)) * mask, jnp.int32),
        mask_BT=jnp.asarray(mask),
    )


@pytest.fixture(scope="module")
def models():
    (sg, ss), (tg, ts) = nnx.split(Decoder(S_CFG, nnx.Rngs(0))), nnx.split(Decoder(T_CFG, nnx.Rngs(1)))
    return sg, ss, tg, ts


def _assert_same(got_scored: tuple[Batch, dict], want_scored: tuple[Batch, dict]):
    """Two `score` results (batch, gap metrics): integer fields exactly, fp32 fields and gap metrics
    to rtol 1e-6."""
    (got, got_gap), (want, want_gap) = got_scored, want_scored
    for f in ("old_logp_BT", *SCORED_FIELDS):
        a, b = getattr(got, f), getattr(want, f)
        assert (a is None) == (b is None), f
        if a is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(b.dtype, np.integer):
            np.testing.assert_array_equal(a, b, err_msg=f)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=f)
    assert set(got_gap) == set(want_gap)
    for k in want_gap:
        np.testing.assert_allclose(float(got_gap[k]), float(want_gap[k]), rtol=1e-6, atol=0, err_msg=k)


def test_split_and_merge_are_inverse_and_strided():
    x = jnp.arange(12 * 2).reshape(12, 2)
    split = split_micro_batches(x, 3)  # M = 4 micro-batches of 3 rows: m holds rows m, m + 4, m + 8
    np.testing.assert_array_equal(split[1, :, 0], [2, 10, 18])
    np.testing.assert_array_equal(merge_micro_batches(split), x)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_micro_batched_score_equals_the_whole_batch(models, name):
    sg, ss, tg, ts = models
    obj = ObjectiveConfig(name=name, **OBJECTIVES[name])
    batch = _rollout_batch(S_CFG.vocab_size)
    key = jax.random.key(3)
    run = lambda mb: score(sg, ss, tg, ts, batch, key, obj_cfg=obj, chunk=CHUNK, micro_batch=mb)  # noqa: E731
    whole, whole_gap = run(B)
    assert {f for f in SCORED_FIELDS if getattr(whole, f) is not None} == set(obj.objective.scored)
    assert bool(whole_gap) == obj.objective.needs_teacher
    if obj.objective.needs_teacher:
        assert 0 < float(whole_gap["teacher/masked_ids"])  # the masked-id path is exercised
    for mb in (B // 2, B // 4):
        _assert_same(run(mb), (whole, whole_gap))


def test_teacher_sample_is_keyed_by_row_and_position(models):
    """tgpo_mc's target is a real sample (not the argmax), drawn from the key: another key draws
    other ids; the same rows in another batch position draw other ids (keyed by the global row)."""
    sg, ss, tg, ts = models
    batch = _rollout_batch(S_CFG.vocab_size)
    mask = np.asarray(batch.mask_BT).astype(bool)
    run = lambda name, key, b=batch: (
        score(  # noqa: E731
            sg, ss, tg, ts, b, key, obj_cfg=ObjectiveConfig(name=name), chunk=CHUNK, micro_batch=4
        )[0].teacher_ids_BT
    )
    mc, argmax = np.asarray(run("tgpo_mc", jax.random.key(3))), np.asarray(run("tgpo_reg", jax.random.key(3)))
    assert (mc != argmax)[mask].mean() > 0.5
    assert (mc != np.asarray(run("tgpo_mc", jax.random.key(4))))[mask].mean() > 0.5
    flipped = jax.tree.map(lambda x: x[::-1], batch)
    assert (mc[::-1] != np.asarray(run("tgpo_mc", jax.random.key(3), flipped)))[mask[::-1]].mean() > 0.5


def test_micro_batched_score_on_a_data_parallel_mesh():
    """8 devices, models and batch sharded over `data`: micro-batches of 8 rows (one per device)
    give the whole batch's fields and metrics (teacher samples included), every scored field keeps
    the batch sharding, and the strided split gathers nothing across devices."""
    mesh = build_mesh(MeshConfig.from_dict({"data": 8, "fsdp": 1, "tensor": 1}))
    rules = ShardingRules()
    sg, ss = nnx.split(init_sharded(S_CFG, mesh, rules, seed=0))
    tg, ts = nnx.split(init_sharded(T_CFG, mesh, ShardingRules.from_dict({"embed": None}), seed=1))
    obj = ObjectiveConfig(name="tgpo_mc")
    batch = jax.tree.map(lambda x: put_batch(np.asarray(x), mesh, rules), _rollout_batch(S_CFG.vocab_size))
    args, kw = (sg, ss, tg, ts, batch, jax.random.key(3)), dict(obj_cfg=obj, chunk=CHUNK)
    got = score(*args, **kw, micro_batch=8)
    _assert_same(got, score(*args, **kw, micro_batch=B))
    for f in ("old_logp_BT", "teacher_ids_BT", "teacher_valid_BT"):
        assert getattr(got[0], f).sharding.is_equivalent_to(batch.mask_BT.sharding, 2), f
    assert "all-gather" not in _score.lower(*args, **kw, micro_batch=8).compile().as_text()
