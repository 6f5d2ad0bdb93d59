"""Chunked log-probs, the score step and the jitted train step (CPU, tiny models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgpo_jax.models import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.objectives.advantages import grpo_advantages
from tgpo_jax.objectives.batch import SCORED_FIELDS, Batch
from tgpo_jax.objectives.logprobs import student_stats
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.rollout.sampler import Sampler
from tgpo_jax.rollout.sampling import SamplingParams
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, init_sharded
from tgpo_jax.train.score import score
from tgpo_jax.train.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

S_CFG = tiny_config("qwen2")
T_CFG = tiny_config("llama", num_layers=3, vocab_size=576, valid_vocab_size=560)  # a bigger teacher vocab


# ------------------------------------------------------------------------- chunked log-probs
def _full_stats(h, head, y, ids, valid_vocab=None, temperature=1.0):
    """Full [B, T, V] logits / temperature and autodiff; ids >= valid_vocab do not exist (the
    columns are cut)."""
    z = jnp.einsum("bte,ev->btv", h, head[:, :valid_vocab]) / temperature
    logp = jax.nn.log_softmax(z, -1)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return (jnp.take_along_axis(logp, y[..., None], -1)[..., 0], jnp.take_along_axis(logp, ids, -1), ent)


@pytest.mark.parametrize("valid_vocab, temperature", [(None, 1.0), (43, 1.0), (None, 0.6), (43, 1.7)])
def test_chunked_equals_unchunked_values_and_gradients(valid_vocab, temperature):
    """Values and gradients (h and head) of the chunked custom-VJP path against autodiff through
    full logits / temperature, with repeated ids (an extra id equal to y, two equal extra ids) and,
    with valid_vocab, masked vocabulary columns, under a large entropy weight."""
    rng = np.random.default_rng(0)
    B, T, E, V, K = 2, 24, 16, 50, 3
    n_ids = valid_vocab or V
    h = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(E, V)), jnp.float32)
    y = jnp.asarray(rng.integers(0, n_ids, (B, T)), jnp.int32)
    ids = rng.integers(0, n_ids, (B, T, K))
    ids[:, ::3, 0] = np.asarray(y)[:, ::3]
    ids[:, ::4, 2] = ids[:, ::4, 1]
    ids = jnp.asarray(ids, jnp.int32)
    w = jnp.asarray([0.7, -1.3, 5.0], jnp.float32)

    def scalar(stats):
        return w[0] * stats[0].sum() + w[1] * stats[1].sum() + w[2] * stats[2].sum()

    kw = dict(valid_vocab=valid_vocab, temperature=temperature)
    ref = _full_stats(h, head, y, ids, **kw)
    g_ref = jax.grad(lambda h, hd: scalar(_full_stats(h, hd, y, ids, **kw)), argnums=(0, 1))(h, head)
    if temperature != 1.0:  # the reference really is another distribution than the T = 1 one
        assert np.abs(np.asarray(ref[0] - _full_stats(h, head, y, ids, valid_vocab)[0])).max() > 0.1
    for chunk in (4, 8, 24):
        got = student_stats(h, head, y, ids, chunk=chunk, **kw)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        g_got = jax.grad(lambda h, hd: scalar(student_stats(h, hd, y, ids, chunk=chunk, **kw)), argnums=(0, 1))(h, head)
        # d(logits / T)/d(h, head) carries a factor 1 / T: so do the gradients and their fp32
        # rounding (the T = 1 tolerance, in the units of the T = 1 problem)
        for a, b in zip(g_got, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-5 / min(temperature, 1.0), rtol=0)


def test_chunked_path_never_builds_full_logits():
    B, T, E, V = 2, 64, 8, 1000
    h = jnp.ones((B, T, E))
    head = jnp.ones((E, V))
    y = jnp.zeros((B, T), jnp.int32)
    ids = jnp.zeros((B, T, 0), jnp.int32)
    f = jax.grad(lambda h, hd: student_stats(h, hd, y, ids, chunk=8).logp_BT.sum(), argnums=(0, 1))
    hlo = jax.jit(f).lower(h, head).compile().as_text()
    assert f"f32[{B},{T},{V}]" not in hlo and f"f32[{B},8,{V}]" in hlo


# ------------------------------------------------------------------------- rollout fixtures
@pytest.fixture(scope="module")
def rollout():
    student = Decoder(S_CFG, nnx.Rngs(0))
    teacher = Decoder(T_CFG, nnx.Rngs(1))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    r = Sampler(student, stop_ids=(7,)).sample(prompts, SamplingParams(max_new_tokens=16, n=4), jax.random.key(0))
    # Rows of different lengths whatever was sampled (as stop tokens would give): row i keeps its
    # first 16 - (i % 5) * 3 tokens.
    keep = 16 - (np.arange(16) % 5) * 3
    mask = (np.arange(16)[None] < keep[:, None]).astype(np.int32) * r.mask_BT
    batch = Batch(
        prompt_BP=jnp.asarray(r.prompt_tokens_BP),
        prompt_mask_BP=jnp.asarray(r.prompt_mask_BP),
        tokens_BT=jnp.asarray(r.tokens_BT * mask),
        mask_BT=jnp.asarray(mask),
    )
    rewards = (r.tokens_BT[:, 0] % 3 == 0).astype(np.float32)
    return student, teacher, batch, jnp.asarray(grpo_advantages(rewards, 4))


def _full_logits(model, batch):
    toks = jnp.concatenate([batch.prompt_BP, batch.tokens_BT], 1)
    mask = jnp.concatenate([batch.prompt_mask_BP, batch.mask_BT], 1)
    P, T = batch.prompt_BP.shape[1], batch.tokens_BT.shape[1]
    return np.asarray(model(toks, left_pad_positions(mask), mask)[0][:, P - 1 : P + T - 1])


def test_score_step_matches_full_forward(rollout):
    student, teacher, batch, _ = rollout
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)

    def scored(name, **kw):
        return score(sg, ss, tg, ts, batch, jax.random.key(0), obj_cfg=ObjectiveConfig(name=name, **kw), chunk=8)

    out, metrics = scored("tgpo_fwd_topk", fwd_topk=5)
    # only what the objective reads is computed (plus old_logp_BT, always)
    assert {f for f in SCORED_FIELDS if getattr(out, f) is not None} == {
        "teacher_topk_ids_BTK",
        "teacher_topk_logp_BTK",
    }
    out_kdrl, out_reg = scored("kdrl")[0], scored("tgpo_reg")[0]
    zs, zt = _full_logits(student, batch), _full_logits(teacher, batch)
    y, m = np.asarray(batch.tokens_BT), np.asarray(batch.mask_BT).astype(bool)
    lps = zs - np.log(np.exp(zs - zs.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zs.max(-1, keepdims=True)
    zt_valid = np.where(np.arange(zt.shape[-1]) < 560, zt, -np.inf)
    lpt = (
        zt_valid
        - np.log(np.exp(zt_valid - zt_valid.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - zt_valid.max(-1, keepdims=True)
    )
    old = np.take_along_axis(lps, y[..., None], -1)[..., 0]
    tlp = np.take_along_axis(lpt, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.old_logp_BT)[m], old[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_kdrl.teacher_logp_BT)[m], tlp[m], atol=1e-5)
    argmax = zt_valid.argmax(-1)
    in_vocab = argmax < S_CFG.vocab_size
    assert (np.asarray(out_reg.teacher_valid_BT) == in_vocab).all()
    assert np.array_equal(np.asarray(out_reg.teacher_ids_BT)[in_vocab], argmax[in_vocab])
    assert float(metrics["teacher/masked_ids"]) == (~in_vocab & m).sum()
    np.testing.assert_allclose(float(metrics["gap/reverse_kl_k1"]), (old - tlp)[m].mean(), atol=1e-5)
    np.testing.assert_allclose(float(metrics["gap/mismatch_ratio"]), (argmax != y)[m].mean(), atol=1e-6)
    # teacher top-5 = the 5 largest teacher log-probs (ids beyond the student vocab dropped)
    top5 = np.sort(lpt, -1)[..., ::-1][..., :5]
    tk = np.asarray(out.teacher_topk_logp_BTK)
    kept = tk > -1e30
    np.testing.assert_allclose(tk[kept], top5[kept], atol=1e-5)
    # p_old(teacher id) for TGPO-Adv
    out2, _ = scored("tgpo_adv")
    want = np.exp(np.take_along_axis(lps, np.asarray(out_reg.teacher_ids_BT)[..., None], -1)[..., 0]) * in_vocab
    np.testing.assert_allclose(np.asarray(out2.old_p_teacher_BT)[m], want[m], atol=1e-6)


def test_score_at_the_rollout_temperature_returns_the_samplers_log_probs():
    """Sampled at T = 0.6 (top-k / top-p off), the score step at temperature 0.6 returns, for every
    sampled token, the log-prob the sampler drew it with (the sampler's own logp_BT, taken in the
    cached decode: an independent computation) to fp32 tolerance; at T = 1 it would not. The
    teacher is read at its own temperature 1 (objective.teacher_temperature: one, the default) or,
    with `rollout`, at 0.6: log softmax(z_T / t)(y_t) of its full forward."""
    T = 0.6
    student, teacher = Decoder(S_CFG, nnx.Rngs(0)), Decoder(T_CFG, nnx.Rngs(1))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    params = SamplingParams(temperature=T, max_new_tokens=16, n=2)
    r = Sampler(student, stop_ids=(318, 195)).sample(prompts, params, jax.random.key(3))  # ids it samples
    batch = Batch(*(jnp.asarray(a) for a in (r.prompt_tokens_BP, r.prompt_mask_BP, r.tokens_BT, r.mask_BT)))
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)
    m = r.mask_BT.astype(bool)
    assert m.sum() > 40 and (~m).any()  # rows of different lengths

    def scored(temperature, teacher_temperature="one"):
        cfg = ObjectiveConfig(name="kdrl", teacher_temperature=teacher_temperature)
        return score(sg, ss, tg, ts, batch, jax.random.key(0), obj_cfg=cfg, chunk=8, temperature=temperature)[0]

    out = scored(T)
    np.testing.assert_allclose(np.asarray(out.old_logp_BT)[m], r.logp_BT[m], atol=2e-5, rtol=0)
    assert np.abs(np.asarray(scored(1.0).old_logp_BT)[m] - r.logp_BT[m]).max() > 0.05

    def teacher_logp(t):  # log softmax(z_T / t)(y_t) of the teacher's full forward, in numpy
        zt = np.where(np.arange(T_CFG.vocab_size) < 560, _full_logits(teacher, batch), -np.inf) / t
        lpt = zt - zt.max(-1, keepdims=True) - np.log(np.exp(zt - zt.max(-1, keepdims=True)).sum(-1, keepdims=True))
        return np.take_along_axis(lpt, r.tokens_BT[..., None], -1)[..., 0]

    # the teacher at its own temperature 1 by default, at the rollout's with teacher_temperature=rollout
    np.testing.assert_allclose(np.asarray(out.teacher_logp_BT)[m], teacher_logp(1.0)[m], atol=1e-5)
    at_rollout = scored(T, "rollout").teacher_logp_BT
    np.testing.assert_allclose(np.asarray(at_rollout)[m], teacher_logp(T)[m], atol=1e-5)
    assert np.abs(teacher_logp(T)[m] - teacher_logp(1.0)[m]).max() > 0.05


def test_train_step_at_the_score_temperature_starts_at_ratio_one(rollout):
    """Before any update pi == pi_old, so with the score and train steps at the same temperature
    every PPO ratio is 1 (to fp32 tolerance); a train step at another temperature than the score
    step is visibly off (what the project had before: T = 1 in training, rollouts at T)."""
    student, teacher, batch, adv = rollout
    cfg = ObjectiveConfig(name="grpo")
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)
    opt = make_optimizer(OptimizerConfig(lr=0.0, weight_decay=0.0))
    ratios = {}
    for t_score, t_train in ((0.6, 0.6), (1.7, 1.7), (0.6, 1.0)):
        scored, _ = score(sg, ss, tg, ts, batch, jax.random.key(0), obj_cfg=cfg, chunk=8, temperature=t_score)
        graphdef, state = init_train_state(Decoder(S_CFG, nnx.Rngs(0)), opt)
        step = make_train_step(graphdef, opt, obj_cfg=cfg, micro_batch=4, chunk=8, temperature=t_train)
        _, met = step(state, scored.replace(adv_B=adv), 1)
        ratios[t_score, t_train] = (float(met["actor/ratio_min"]), float(met["actor/ratio_max"]))
    for t in (0.6, 1.7):
        np.testing.assert_allclose(ratios[t, t], (1.0, 1.0), atol=2e-5)
    lo, hi = ratios[0.6, 1.0]
    assert lo < 0.9 and hi > 1.1, (lo, hi)


def _minibatch(rollout, name="tgpo_reg", **kw):
    student, teacher, batch, adv = rollout
    cfg = ObjectiveConfig(name=name, **kw)
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)
    scored, _ = score(sg, ss, tg, ts, batch, jax.random.key(0), obj_cfg=cfg, chunk=8)
    off = jnp.arange(16) % 4 == 0 if cfg.objective.offpolicy_rows else None  # as the iteration sets it
    return cfg, scored.replace(adv_B=adv, offpolicy_B=off)


def test_train_step_lowers_the_loss(rollout):
    cfg, mb = _minibatch(rollout, lambda_0=0.5)
    opt = make_optimizer(OptimizerConfig(lr=3e-3))
    graphdef, state = init_train_state(Decoder(S_CFG, nnx.Rngs(0)), opt)
    step = make_train_step(graphdef, opt, obj_cfg=cfg, micro_batch=4, chunk=8)
    losses = []
    for _ in range(5):
        state, met = step(state, mb, 1)
        losses.append(float(met["loss/total"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert int(state.step) == 5
    assert float(met["teacher/lambda"]) == pytest.approx(0.5)
    assert 0 < float(met["actor/grad_norm"]) and float(met["actor/ratio_min"]) <= 1 <= float(met["actor/ratio_max"])


@pytest.mark.parametrize("name", ["grpo", "luffy", "rkl_reg_dist"])
def test_train_step_compiles_once_per_objective(rollout, name):
    """The mini-batches of an iteration (row slices of one scored Batch, absent fields None) share
    one compiled step; the scored batch holds exactly the objective's fields."""
    cfg, full = _minibatch(rollout, name, rkl_dist_topk=4)
    present = {f for f in SCORED_FIELDS if getattr(full, f) is not None}
    assert present == set(cfg.objective.scored)
    assert (full.offpolicy_B is not None) == cfg.objective.offpolicy_rows
    opt = make_optimizer(OptimizerConfig(lr=1e-3))
    graphdef, state = init_train_state(Decoder(S_CFG, nnx.Rngs(0)), opt)
    step = make_train_step(graphdef, opt, obj_cfg=cfg, micro_batch=4, chunk=8)
    for j in range(2):
        state, met = step(state, jax.tree.map(lambda x, j=j: x[j * 8 : (j + 1) * 8], full), j + 1)
        assert np.isfinite(float(met["loss/total"]))
    assert step._cache_size() == 1
    assert "teacher/lambda" not in met  # none of these has a teacher coefficient


def test_microbatch_sum_and_token_mean_differ_as_specified(rollout):
    """token_mean: one global mean over the mini-batch's valid tokens. microbatch_sum: each
    micro-batch's own token mean, SUMMED over micro-batches (the authors' behaviour)."""
    results = {}
    for agg in ("token_mean", "microbatch_sum"):
        cfg, mb = _minibatch(rollout, loss_agg=agg)
        opt = make_optimizer(OptimizerConfig(lr=0.0, weight_decay=0.0))
        graphdef, state = init_train_state(Decoder(S_CFG, nnx.Rngs(0)), opt)
        _, met = make_train_step(graphdef, opt, obj_cfg=cfg, micro_batch=4, chunk=8)(state, mb, 1)
        results[agg] = met
    # micro-batch m holds rows m, m + 4, m + 8, m + 12 (strided; see split_micro_batches)
    by_micro = lambda a: np.swapaxes(np.asarray(a).reshape(4, 4, -1), 0, 1)  # noqa: E731
    mask = by_micro(mb.mask_BT).astype(np.float64)
    ce_tok = results["token_mean"]["loss/ce_teacher"]
    ce_mb = results["microbatch_sum"]["loss/ce_teacher"]
    # Recompute both from per-token values, with no model in the loop: the CE term is
    # lam * -log pi(teacher id), and before any update pi == pi_old, whose probability of the
    # teacher id the tgpo_adv scoring returns.
    cfg, mb = _minibatch(rollout, name="tgpo_adv")
    p = by_micro(mb.old_p_teacher_BT)
    valid = by_micro(mb.teacher_valid_BT)
    ce_BT = -0.002 * np.log(np.where(valid > 0, p, 1.0)) * valid
    want_tok = (ce_BT * mask).sum() / mask.sum()
    want_mb = sum((ce_BT[i] * mask[i]).sum() / mask[i].sum() for i in range(4))
    np.testing.assert_allclose(float(ce_tok), want_tok, rtol=1e-5)
    np.testing.assert_allclose(float(ce_mb), want_mb, rtol=1e-5)
    # micro-batches hold different token counts here, so the two aggregations really differ
    assert len(set(mask.sum((1, 2)).tolist())) > 1
    assert abs(want_mb - 4 * want_tok) > 1e-6


@pytest.mark.parametrize("attn_impl", ["einsum", "cpu"])
def test_sharded_train_step_equals_single_device(rollout, attn_impl):
    """The 8-device (data 2, fsdp 2, tensor 2) step against the single-device einsum step; with
    "cpu" the fused kernel runs per device under shard_map (1 row, 2 query and 1 kv head each)."""
    from tgpo_jax.kernels import cpu as cpu_attention

    if attn_impl == "cpu" and (why := cpu_attention.unavailable_reason()) is not None:
        pytest.skip(f"fused CPU attention kernel unavailable: {why}")
    cfg, mb = _minibatch(rollout, lambda_0=0.5)
    # Adam's first update is lr * g / (|g| + eps): at |g| ~ eps = 1e-8 (a gradient entry that is a
    # cancellation of terms ~1e-2) it turns an fp32 rounding difference of 1e-9 in g, from the
    # sharded sums' order, into 2.5e-5 of parameter. eps = 1e-6 keeps that amplification below
    # lr / eps = 1e3, so the parameters compare the two programs' gradients, not Adam's sign of noise.
    opt = make_optimizer(OptimizerConfig(lr=1e-3, eps=1e-6))
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
    sharded_cfg = S_CFG.replace(attn_impl=attn_impl)
    results = []
    for model in (Decoder(S_CFG, nnx.Rngs(0)), init_sharded(sharded_cfg, mesh, ShardingRules(), seed=0)):
        graphdef, state = init_train_state(model, opt)
        step = make_train_step(graphdef, opt, obj_cfg=cfg, micro_batch=4, chunk=8)
        for _ in range(2):
            state, met = step(state, mb, 1)
        results.append((state, met))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), atol=1e-5, rtol=1e-5, err_msg=k)
    leaf = jax.tree.leaves(s2.params)[0]
    assert len(leaf.sharding.device_set) == 8


def _per_device_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_data_parallel_step_splits_the_compute(rollout):
    """On an 8-way data mesh (batch rows in contiguous blocks per device, parameters replicated)
    each device does about 1/8 of the single-device step's FLOPs and the only collectives are the
    all-reduces of gradients and metrics: every micro-batch is spread over all devices, so no
    batch rows move between devices. (A contiguous micro-batch split compiled to 16 all-gathers
    and 17 collective-permutes here, and to 4x the ideal FLOPs on a model without activation
    constraints.)"""
    from tgpo_jax.sharding.distributed import put_batch

    cfg, mb = _minibatch(rollout)
    mb = jax.tree.map(lambda v: np.concatenate([np.asarray(v)] * 2), mb)  # 32 rows: 4 per device
    opt = make_optimizer(OptimizerConfig(lr=1e-3))
    flops = {}
    for n in (1, 8):
        rules = ShardingRules()
        mesh = build_mesh(MeshConfig.from_dict({"data": n, "fsdp": 1, "tensor": 1}), jax.devices()[:n])
        graphdef, state = init_train_state(init_sharded(S_CFG, mesh, rules, seed=0), opt)
        batch = jax.tree.map(lambda v, mesh=mesh: put_batch(v, mesh, rules), mb)
        step = make_train_step(graphdef, opt, obj_cfg=cfg, micro_batch=8, chunk=8, state=state)
        compiled = step.lower(state, batch, 1).compile()
        flops[n] = _per_device_flops(compiled)
    hlo = compiled.as_text()
    moves = {op: hlo.count(op + "(") for op in ("all-gather", "collective-permute", "all-to-all")}
    assert moves == {"all-gather": 0, "collective-permute": 0, "all-to-all": 0}, moves
    assert flops[8] * 8 <= 1.25 * flops[1], flops


def test_adamw_moments_are_sharded_as_their_parameters():
    """A sharded student's AdamW moments take each parameter's sharding (left to the compiler,
    `jit(optimizer.init)` replicated them: every device held the whole optimizer state), so a
    device holds 2 x its parameter shard of moments; the counters are replicated."""
    mesh = build_mesh(MeshConfig.from_dict({"data": 1, "fsdp": 4, "tensor": 2}))
    cfg = tiny_config("qwen2", hidden_size=64, intermediate_size=128)
    _, state = init_train_state(init_sharded(cfg, mesh, ShardingRules(), seed=0), make_optimizer(OptimizerConfig()))
    specs = [p.sharding.spec for p in jax.tree.leaves(state.params)]
    assert any(s != jax.sharding.PartitionSpec() for s in specs)
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        assert [m.sharding.spec for m in jax.tree.leaves(moments)] == specs
    one_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert one_device((adam.mu, adam.nu)) == 2 * one_device(state.params)
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec() == state.step.sharding.spec


# ------------------------------------------------------------------------- the authors' token budget
def _grad_catcher():
    """An 'optimizer' whose new state is the gradient itself (and whose update is 0): the step's
    exact accumulated gradient, with no subtraction of parameters."""
    import optax

    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )


def _literal_authors_loss(params, graphdef, mb, micro_batches_per_rank, lam, temperature):
    """The authors' loss written out plainly: for every rank, for every one of its micro-batches
    (a list of row indices), the tgpo_reg terms from a full forward of THOSE rows only, each term a
    token mean over the micro-batch's own response tokens; micro-batch losses summed per rank and
    averaged over ranks (gradients averaged by data parallelism)."""
    model = nnx.merge(graphdef, params)
    total = 0.0
    for rank in micro_batches_per_rank:
        for rows in rank:
            idx = np.asarray(rows)
            sub = jax.tree.map(lambda x, idx=idx: x[idx], mb)
            toks = jnp.concatenate([sub.prompt_BP, sub.tokens_BT], 1)
            mask = jnp.concatenate([sub.prompt_mask_BP, sub.mask_BT], 1)
            P, T = sub.prompt_BP.shape[1], sub.tokens_BT.shape[1]
            z = model(toks, left_pad_positions(mask), mask)[0][:, P - 1 : P + T - 1] / temperature
            logp = jax.nn.log_softmax(z.astype(jnp.float32), -1)
            lp_y = jnp.take_along_axis(logp, sub.tokens_BT[..., None], -1)[..., 0]
            lp_teacher = jnp.take_along_axis(logp, sub.teacher_ids_BT[..., None], -1)[..., 0]
            ratio = jnp.exp(lp_y - sub.old_logp_BT)
            adv = sub.adv_B[:, None]
            pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 0.8, 1.2))
            ce = -lam * lp_teacher * sub.teacher_valid_BT
            ent = 0.001 * jnp.sum(jnp.exp(logp) * logp, -1)  # -c_ent * H
            m = sub.mask_BT.astype(jnp.float32)
            total = total + sum(jnp.sum(x * m) / jnp.sum(m) for x in (pg, ce, ent))
    return total / len(micro_batches_per_rank)


@pytest.mark.parametrize("ranks, budget", [(1, 48), (2, 40)])
def test_token_budget_loss_and_gradient_equal_the_literal_split(rollout, ranks, budget):
    """A 16-row mini-batch with per-row denominators from the authors' split (token budget
    `budget`, `ranks` data-parallel ranks): the step's loss terms and its accumulated gradient equal
    the literal reference (split into the authors' micro-batches, token mean each, summed), for
    every fixed micro-batch size of the step, at temperature 0.8."""
    from tgpo_jax.objectives.token_budget import authors_mini_batches, largest_differencing, micro_batches

    student, teacher, batch, adv = rollout
    T = 0.8
    cfg = ObjectiveConfig(name="tgpo_reg", loss_agg="microbatch_sum", lambda_0=0.5)
    sg, ss = nnx.split(student)
    tg, ts = nnx.split(teacher)
    scored, _ = score(sg, ss, tg, ts, batch, jax.random.key(0), obj_cfg=cfg, chunk=8, temperature=T)
    resp = np.asarray(batch.mask_BT).sum(-1)
    seq = np.asarray(batch.prompt_mask_BP).sum(-1) + resp
    [(rows, denom)] = authors_mini_batches(seq, resp, mini_batches=1, budget=budget, ranks=ranks)
    np.testing.assert_array_equal(rows, np.arange(16))
    mb = scored.replace(adv_B=adv, agg_denom_B=jnp.asarray(denom))

    # the authors' micro-batches, rebuilt step by step from the partition functions
    rank_rows = largest_differencing(seq, ranks, equal_size=True) if ranks > 1 else [list(range(16))]
    k = max(-(-int(seq[r].sum()) // budget) for r in rank_rows)
    split = [[np.asarray(r)[p].tolist() for p in micro_batches(seq[r], budget, k)] for r in rank_rows]
    sizes = sorted(len(rows) for rank in split for rows in rank)
    assert k >= 3 and len(set(sizes)) > 1, sizes  # several micro-batches of different sizes

    graphdef, state = init_train_state(Decoder(S_CFG, nnx.Rngs(0)), _grad_catcher())
    want, want_g = jax.value_and_grad(_literal_authors_loss)(state.params, graphdef, mb, split, 0.5, T)
    for micro_batch in (2, 16):
        step = make_train_step(graphdef, _grad_catcher(), obj_cfg=cfg, micro_batch=micro_batch, chunk=8, temperature=T)
        new, met = step(jax.tree.map(jnp.copy, state), mb, 1)
        got = sum(float(met[f"loss/{k}"]) for k in ("pg", "ce_teacher", "entropy"))
        np.testing.assert_allclose(got, float(want), rtol=1e-5, err_msg=f"micro_batch={micro_batch}")
        for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
        n_micro = sum(len(rank) for rank in split) / ranks  # diagnostics: means over their micro-batches
        ent_sum = sum(float(_plain_entropy_mean(student, mb, rows, T)) for rank in split for rows in rank) / ranks
        np.testing.assert_allclose(float(met["actor/entropy"]), ent_sum / n_micro, rtol=1e-5)
    # without the per-row denominators the fixed split of 4 rows gives another loss
    fixed = make_train_step(graphdef, _grad_catcher(), obj_cfg=cfg, micro_batch=4, chunk=8, temperature=T)
    _, met = fixed(jax.tree.map(jnp.copy, state), mb.replace(agg_denom_B=None), 1)
    assert abs(sum(float(met[f"loss/{k}"]) for k in ("pg", "ce_teacher", "entropy")) - float(want)) > 1e-3


def _plain_entropy_mean(model, mb, rows, temperature):
    """Token mean of the full-vocabulary entropy over the given rows' response tokens."""
    sub = jax.tree.map(lambda x: x[np.asarray(rows)], mb)
    z = _full_logits(model, sub) / temperature
    lp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    H = -(np.exp(lp) * lp).sum(-1)
    m = np.asarray(sub.mask_BT, np.float64)
    return (H * m).sum() / m.sum()
