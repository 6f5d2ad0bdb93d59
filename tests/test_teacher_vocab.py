"""Teacher ids the student's tokenizer cannot produce (models.teacher_oov, models/vocab_map.py), on
the real Qwen2.5 / Qwen3 id layout (tests/qwen_like_tokenizers.py): Qwen3's </think> = 151668 is
an embedding row the Qwen2.5 student's tokenizer (len 151,665) decodes as '' and writes as
'</' 'think' '>' = 522, 26865, 29. Both models have 151,936 embedding rows.

The score-step tests use hand-built tiny models with those 151,936 rows: a teacher whose argmax is
151668 at every position (its layers add nothing, every hidden state points one way, and only a
few lm_head columns are non-zero), a random student. Expectations are computed with numpy from the
models' own hidden states and weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.qwen_like_tokenizers import (
    EMBED_ROWS,
    END_THINK,
    GT,
    LT,
    LT_SLASH,
    QWEN3_LEN,
    QWEN25_LEN,
    THINK,
    THINK_WORD,
    qwen3_tokenizer,
    qwen25_tokenizer,
)
from tgpo_jax.configtree import ConfigError
from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import abstract_model
from tgpo_jax.models.layers import MASK_VALUE
from tgpo_jax.models.params import param_specs
from tgpo_jax.models.vocab_map import (
    TEACHER_OOV_MODES,
    build_teacher_id_map,
    check_teacher_oov,
    describe_teacher_id_map,
    student_usable_vocab,
)
from tgpo_jax.objectives import losses as L
from tgpo_jax.objectives.batch import Batch
from tgpo_jax.objectives.logprobs import student_stats
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.train.score import response_hidden, score

E = 16
B, P, T = 2, 3, 4


@pytest.fixture(scope="module")
def toks():
    return qwen25_tokenizer(), qwen3_tokenizer()


def _table(toks, mode):
    student, teacher = toks
    return build_teacher_id_map(student, teacher, teacher_rows=EMBED_ROWS, student_rows=EMBED_ROWS, mode=mode)


# ---------------------------------------------------------------- the tokenizers and the table


def test_the_stand_in_tokenizers_have_qwens_layout(toks):
    student, teacher = toks
    assert (len(student), len(teacher)) == (QWEN25_LEN, QWEN3_LEN)
    assert student.encode("</think>", add_special_tokens=False) == [LT_SLASH, THINK_WORD, GT]
    assert teacher.encode("<think>\n</think>", add_special_tokens=False) == [THINK, 198, END_THINK]
    assert student.decode([END_THINK]) == ""  # the row the authors' setting pulls the student toward
    assert (student.eos_token_id, teacher.eos_token_id) == (151643, 151645)


# teacher id -> expected student id per mode; -1 = masked. Shared ids keep their id in every mode.
EXPECTED = {
    "map": {0: 0, LT_SLASH: LT_SLASH, 151664: 151664, 151665: LT, 151666: LT_SLASH, THINK: LT, END_THINK: LT_SLASH},
    "mask": {0: 0, LT_SLASH: LT_SLASH, 151664: 151664, 151665: -1, 151666: -1, THINK: -1, END_THINK: -1},
    "shared": {0: 0, LT_SLASH: LT_SLASH, 151664: 151664, 151665: 151665, THINK: THINK, END_THINK: END_THINK},
}


@pytest.mark.parametrize("mode", TEACHER_OOV_MODES)
def test_teacher_id_table(toks, mode):
    table = _table(toks, mode)
    assert table.student_id_V.shape == (EMBED_ROWS,) and table.student_id_V.dtype == np.int32
    for v, want in EXPECTED[mode].items():
        assert table.student_id_V[v] == want, v
    np.testing.assert_array_equal(table.student_id_V[:QWEN25_LEN], np.arange(QWEN25_LEN))
    # rows past the teacher's tokenizer have no text: masked, except that `shared` keeps them
    padding = table.student_id_V[QWEN3_LEN:]
    want_padding = np.arange(QWEN3_LEN, EMBED_ROWS) if mode == "shared" else np.full(EMBED_ROWS - QWEN3_LEN, -1)
    np.testing.assert_array_equal(padding, want_padding)
    np.testing.assert_array_equal(np.flatnonzero(table.oov_V), np.arange(QWEN25_LEN, EMBED_ROWS))


def test_usable_vocab_and_mode_errors():
    assert student_usable_vocab("map", QWEN25_LEN, EMBED_ROWS) == QWEN25_LEN
    assert student_usable_vocab("mask", QWEN25_LEN, EMBED_ROWS) == QWEN25_LEN
    assert student_usable_vocab("shared", QWEN25_LEN, EMBED_ROWS) == EMBED_ROWS
    assert student_usable_vocab("map", 300, 256) == 256  # a tokenizer longer than the rows
    with pytest.raises(ValueError, match=r"teacher_oov='drop'; accepted: map, mask, shared"):
        check_teacher_oov("drop")
    from tgpo_jax.train.config import ModelPairConfig, load_train_config

    assert ModelPairConfig().teacher_oov == "map"
    with pytest.raises(ConfigError, match=r"models.teacher_oov='drop': must be one of map, mask, shared"):
        load_train_config({"models": {"student": "s", "teacher_oov": "drop"}, "objective": {"name": "grpo"}})


def test_the_pre_run_description_names_each_teacher_only_id(toks):
    student, teacher = toks
    lines = {
        m: describe_teacher_id_map(_table(toks, m), student, teacher, m, student_rows=EMBED_ROWS) for m in EXPECTED
    }
    text = {m: "\n".join(v) for m, v in lines.items()}
    assert "151668 '</think>': mapped to 522 '</' (the student writes '</think>' as '</' 'think' '>')" in text["map"]
    assert "151667 '<think>': mapped to 27 '<'" in text["map"]
    assert "151668 '</think>': masked out of the teacher terms" in text["mask"]
    assert "151668 '</think>': kept as id 151668, which the student's tokenizer decodes as ''" in text["shared"]
    assert "151669..151935 (267 embedding rows with no teacher token): 267 masked" in text["map"]
    assert "267 kept as they are" in text["shared"]
    assert all(len(v) == 6 for v in lines.values())  # header, 4 teacher-only tokens, the padding rows


# ------------------------------------------------------------------------- the score step


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=EMBED_ROWS,
        hidden_size=E,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        tie_word_embeddings=False,
        qkv_bias=True,  # as Qwen2's config.json implies
        **kw,
    )


def _model(cfg: ModelConfig, edit) -> nnx.Module:
    """A Decoder for cfg with numpy-drawn weights (no random op per shape to compile), then `edit`
    applied to the nested parameter dict."""
    rng = np.random.default_rng(0)
    params: dict = {}
    for path, spec in param_specs(cfg).items():
        *parents, leaf = path.split(".")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        shape = spec.shape
        node[leaf] = {"zeros": np.zeros(shape), "ones": np.ones(shape)}.get(spec.init, 0.3 * rng.standard_normal(shape))
        node[leaf] = node[leaf].astype(np.float32)
    edit(params)
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# The teacher's logits: column v of its lm_head is non-zero only for these ids, in this order.
TEACHER_TOP = (END_THINK, LT_SLASH, GT)


def _teacher_edit(params):
    """Layers that add nothing (zero output projections), embeddings dominated by one direction:
    every final hidden state is about sqrt(E) e_0, so the logits are 10, 9, 8 x sqrt(E) at
    TEACHER_TOP and 0 elsewhere: argmax 151668 at every position."""
    params["layers"]["o_kernel"][...] = 0
    params["layers"]["down_kernel"][...] = 0
    params["embed"] *= 0.01
    params["embed"][:, 0] = 50.0
    params["lm_head"][...] = 0
    for weight, v in zip((10.0, 9.0, 8.0), TEACHER_TOP):
        params["lm_head"][0, v] = weight


@pytest.fixture(scope="module")
def teacher():
    return _model(_cfg(), _teacher_edit)


def _student(mode: str):
    usable = student_usable_vocab(mode, QWEN25_LEN, EMBED_ROWS)
    return _model(_cfg(valid_vocab_size=usable if usable < EMBED_ROWS else None), lambda p: None)


def _batch() -> Batch:
    rng = np.random.default_rng(1)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)  # 6 real response tokens
    return Batch(
        prompt_BP=jnp.asarray(rng.integers(1, 1000, (B, P)), jnp.int32),
        prompt_mask_BP=jnp.ones((B, P), jnp.int32),
        tokens_BT=jnp.asarray(rng.integers(1, 1000, (B, T)) * mask, jnp.int32),
        mask_BT=jnp.asarray(mask),
    )


def _score(toks, teacher, mode, obj_cfg, *, with_map=True):
    student = _student(mode)
    (sg, ss), (tg, ts) = nnx.split(student), nnx.split(teacher)
    id_map = _table(toks, mode) if with_map else None
    got, gap = score(sg, ss, tg, ts, _batch(), jax.random.key(0), obj_cfg=obj_cfg, chunk=T, id_map=id_map)
    return student, got, {k: float(v) for k, v in gap.items()}


def _log_softmax(z, usable: int):
    """float64 log-softmax over the first `usable` ids (the rest -inf)."""
    z = np.asarray(z, np.float64).copy()
    z[..., usable:] = -np.inf
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


N_TOKENS = 6
# per mode: (teacher_ids_BT on real tokens, teacher_valid_BT there, masked, mapped)
SCORED = {"map": (LT_SLASH, 1.0, 0, N_TOKENS), "mask": (0, 0.0, N_TOKENS, 0), "shared": (END_THINK, 1.0, 0, 0)}


@pytest.mark.parametrize("mode", TEACHER_OOV_MODES)
def test_the_score_step_applies_the_table_and_counts(toks, teacher, mode):
    _, got, gap = _score(toks, teacher, mode, ObjectiveConfig(name="tgpo_reg"))
    mask = np.asarray(got.mask_BT) > 0
    want_id, want_valid, masked, mapped = SCORED[mode]
    np.testing.assert_array_equal(np.asarray(got.teacher_ids_BT)[mask], want_id)
    np.testing.assert_array_equal(np.asarray(got.teacher_valid_BT)[mask], want_valid)
    assert (gap["teacher/masked_ids"], gap["teacher/mapped_ids"]) == (masked, mapped)
    assert gap["teacher/oov_frac"] == 1.0  # every target is 151668, whatever is done with it


def test_without_a_table_ids_beyond_the_students_tokenizer_are_masked(toks, teacher):
    _, got, gap = _score(toks, teacher, "mask", ObjectiveConfig(name="tgpo_reg"), with_map=False)
    assert float(np.asarray(got.teacher_valid_BT).sum()) == 0.0
    assert (gap["teacher/masked_ids"], gap["teacher/mapped_ids"], gap["teacher/oov_frac"]) == (N_TOKENS, 0, 1.0)


def _ce_and_grad(student, got):
    """The TGPO-Reg CE term (token mean over the real tokens) and its gradient w.r.t. the lm_head."""
    b = got
    h = response_hidden(student, b.prompt_BP, b.prompt_mask_BP, b.tokens_BT, b.mask_BT)
    usable = student.cfg.valid_vocab_size or student.cfg.vocab_size
    mask = b.mask_BT.astype(jnp.float32)

    def loss(head_EV):
        cur = student_stats(h, head_EV, b.tokens_BT, b.teacher_ids_BT[..., None], chunk=T, valid_vocab=usable)
        return jnp.sum(L.teacher_ce(cur.extra_logp_BTK[..., 0], b.teacher_valid_BT) * mask) / jnp.sum(mask)

    head = student.lm_head_EV()
    value, grad = jax.value_and_grad(loss)(head)
    return float(value), np.asarray(grad), np.asarray(h, np.float64), np.asarray(head, np.float64), usable


def _expected_pull(h_BTE, head_EV, usable, target, mask_BT):
    """(-mean log p(target), d loss / d head[:, target]) = (.., sum_t h_t (p_t(target) - 1) / N)."""
    logp = _log_softmax(h_BTE @ head_EV, usable)[..., target]
    m = mask_BT.astype(bool)
    return -logp[m].mean(), (h_BTE[m] * (np.exp(logp[m]) - 1.0)[:, None]).sum(0) / m.sum()


@pytest.mark.parametrize("mode", TEACHER_OOV_MODES)
def test_a_teacher_argmax_of_151668_pulls_the_student_only_where_the_mode_says(toks, teacher, mode):
    """map: the CE pull goes to '</' (522); mask: no loss, no gradient; shared (the authors'): the
    pull goes to 151668, a row the student's tokenizer decodes as ''. In map and mask the student
    cannot put mass on 151668 at all (its usable vocabulary is its tokenizer's 151,665 ids)."""
    student, got, _ = _score(toks, teacher, mode, ObjectiveConfig(name="tgpo_reg"))
    value, grad, h, head, usable = _ce_and_grad(student, got)
    mask = np.asarray(got.mask_BT)
    if mode == "mask":
        assert value == 0.0 and not grad.any()
        return
    np.testing.assert_array_equal(grad[:, END_THINK] == 0, mode != "shared")
    target = LT_SLASH if mode == "map" else END_THINK
    want_value, want_grad = _expected_pull(h, head, usable, target, mask)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad[:, target], want_grad, rtol=1e-4, atol=1e-6)


def test_forward_topk_merges_mapped_duplicates(toks, teacher):
    """Teacher top-3 = 151668, 522, 29. map: 151668 becomes 522, so slot 0 carries
    log(p(151668) + p(522)) and slot 1 leaves the support; mask: slot 0 leaves it; shared: as is."""
    obj = ObjectiveConfig(name="tgpo_fwd_topk", fwd_topk=3)
    student, got, _ = _score(toks, teacher, "shared", obj)
    h = response_hidden(teacher, got.prompt_BP, got.prompt_mask_BP, got.tokens_BT, got.mask_BT)
    lp = _log_softmax(np.asarray(h, np.float64) @ np.asarray(teacher.lm_head_EV(), np.float64), EMBED_ROWS)
    lp3 = lp[..., list(TEACHER_TOP)]  # [B, T, 3]
    masked = MASK_VALUE
    want = {
        "shared": (TEACHER_TOP, lp3),
        "mask": ((0, LT_SLASH, GT), np.stack([np.full(lp3.shape[:2], masked), lp3[..., 1], lp3[..., 2]], -1)),
        "map": (
            (LT_SLASH, LT_SLASH, GT),
            np.stack([np.logaddexp(lp3[..., 0], lp3[..., 1]), np.full(lp3.shape[:2], masked), lp3[..., 2]], -1),
        ),
    }
    for mode, (ids, logp) in want.items():
        _, got, _ = _score(toks, teacher, mode, obj)
        np.testing.assert_array_equal(np.asarray(got.teacher_topk_ids_BTK), np.broadcast_to(ids, (B, T, 3)))
        np.testing.assert_allclose(np.asarray(got.teacher_topk_logp_BTK), logp, rtol=1e-5, atol=1e-5, err_msg=mode)


# ------------------------------------------------------- a run's set-up and first iteration


def _student_edit(params):
    """As the teacher, but the student's logits favour the ids its tokenizer lacks (151665..):
    a sampler that did not mask them would emit nothing else."""
    _teacher_edit(params)
    params["lm_head"][0, :] = 0.0
    params["lm_head"][0, QWEN25_LEN:] = 10.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, toks):
    from tgpo_jax.models.hf_export import save_hf

    root = tmp_path_factory.mktemp("qwen_layout")
    student_tok, teacher_tok = toks
    s, t = str(root / "student"), str(root / "teacher")
    save_hf(_model(_cfg(), _student_edit), s, tokenizer=student_tok)
    save_hf(_model(_cfg(), _teacher_edit), t, tokenizer=teacher_tok)
    return root, s, t


def _run_cfg(checkpoints, mode: str):
    from tgpo_jax.train.config import load_train_config

    root, s, t = checkpoints
    return load_train_config(
        {
            "run_dir": str(root / f"run_{mode}"),
            "models": {"student": s, "teacher": t, "allow_tokenizer_mismatch": True, "teacher_oov": mode},
            "objective": {"name": "tgpo_reg", "lambda_0": 1.0, "lambda_decay": 0.0},
            "rollout": {"prompts_per_iteration": 4, "n": 2, "max_new_tokens": 4, "prompt_buckets": [8]},
            "data": {"max_prompt_len": 8},
            "train": {"mini_batches": 1, "micro_batch": 8, "logprob_chunk": 4},
        }
    )


class _Rewards:
    def submit(self, texts, answers):
        from concurrent.futures import Future

        f = Future()
        f.set_result([1.0, 0.0] * (len(texts) // 2))
        return f


@pytest.mark.parametrize("mode", ["map", "shared"])
def test_a_run_prints_the_handling_samples_only_tokenizer_ids_and_reports_the_share(checkpoints, toks, mode, capsys):
    """Before training: the tokenizer differences and each teacher-only id's handling; the student
    samples only ids its tokenizer holds (except in `shared`, the authors' setting, where its favoured
    rows 151665.. are what it samples); after iteration 1: teacher/oov_frac and its printed line."""
    from tgpo_jax.train.iteration import Example, run_iteration
    from tgpo_jax.train.loop import oov_line
    from tgpo_jax.train.setup import build_model_parts

    cfg = _run_cfg(checkpoints, mode)
    with pytest.warns(UserWarning, match="mismatched tokenizers"):
        models, state, tokenizer = build_model_parts(cfg)
    out = capsys.readouterr().out
    assert "[vocab] tokenizer check: len(student)=151665, len(teacher)=151669" in out
    assert "[vocab]   - [special_token] eos_token: student '<|endoftext|>' (id 151643) vs teacher '<|im_end|>'" in out
    handling = "mapped to 522 '</'" if mode == "map" else "kept as id 151668"
    assert f"[vocab]   151668 '</think>': {handling}" in out
    assert models.sampler.cfg.valid_vocab_size == (QWEN25_LEN if mode == "map" else None)
    np.testing.assert_array_equal(np.asarray(models.teacher_id_map.student_id_V), _table(toks, mode).student_id_V)

    prompts = [Example([10, 11, 12], "1"), Example([13, 14], "2"), Example([15], "3"), Example([16, 17], "4")]
    kw = dict(obj_cfg=cfg.objective, reward_fn=_Rewards(), mini_batches=1, chunk=4, score_micro_batch=8)
    rollouts, sample = [], models.sampler.sample
    models.sampler.sample = lambda *a, **kw: rollouts.append(sample(*a, **kw)) or rollouts[-1]
    state, metrics = run_iteration(models, state, prompts, 1, jax.random.key(0), sampling=cfg.rollout_sampling, **kw)
    sampled = np.asarray(rollouts[0].tokens_BT)
    assert sampled.shape == (8, 4) and (sampled < QWEN25_LEN).all() == (mode == "map")
    assert (sampled >= QWEN25_LEN).all() == (mode == "shared")
    n_tokens = 8 * 4  # no stop id is sampled: every row runs to max_new_tokens
    assert metrics["teacher/oov_frac"] == 1.0
    assert (metrics["teacher/mapped_ids"], metrics["teacher/masked_ids"]) == (
        (n_tokens, 0) if mode == "map" else (0, 0)
    )
    assert oov_line(metrics, 1, cfg) == (
        f"[vocab] iteration 1: 100.000% of the teacher's target positions are ids the student's tokenizer lacks; "
        f"0 targets masked, {n_tokens if mode == 'map' else 0} mapped to the student's first piece "
        f"(models.teacher_oov: {mode})"
    )
