"""Vocabulary alignment (pad / truncate embed and lm_head) and the student/teacher tokenizer check."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from tgpo_jax.models import layers as L
from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import Decoder, abstract_model, left_pad_positions
from tgpo_jax.models.params import param_specs
from tgpo_jax.models.tiny_tokenizer import build_tiny_tokenizer
from tgpo_jax.models.tokenizer_check import TokenizerMismatchError, TokenizerMismatchWarning, check_tokenizers_agree
from tgpo_jax.models.vocab import VocabAlignmentError, align_vocab, common_vocab_size

V, E = 40, 16  # real vocabulary and hidden size of the tiny model


def tiny_cfg(vocab_size: int = V, tied: bool = False, **kw) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=vocab_size,
        hidden_size=E,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        tie_word_embeddings=tied,
        **kw,
    )


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """The nested parameter dict of a Decoder for cfg, drawn with numpy (a real `Decoder(cfg,
    nnx.Rngs(0))` compiles one random op per parameter shape: seconds on a small CPU)."""
    rng = np.random.default_rng(seed)
    draw = {
        "normal": lambda shape: 0.3 * rng.standard_normal(shape),
        "zeros": np.zeros,
        "ones": lambda shape: 1 + 0.1 * rng.standard_normal(shape),
    }
    params: dict = {}
    for path, spec in param_specs(cfg).items():
        *parents, leaf = path.split(".")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = draw[spec.init](spec.shape).astype(np.float32)
    return params


def model_from(cfg: ModelConfig, params: dict) -> Decoder:
    """A Decoder for cfg holding exactly `params`."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("tied", [False, True])
def test_random_params_have_the_decoder_layout(tied):
    cfg = tiny_cfg(tied=tied)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    params = random_params(cfg, 0)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract)
    assert ("lm_head" in params) == (not tied) and params["embed"].shape == (V, E)


# Two rows, the second left-padded; ids cover the first and the last real token.
TOKENS_BT = jnp.array([[0, 5, 17, 38, 39], [3, 3, 39, 0, 21]], jnp.int32)
MASK_BT = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], jnp.int32)


def forward(model: Decoder):
    logits_BTV, _ = model(TOKENS_BT, left_pad_positions(MASK_BT), MASK_BT)
    return np.asarray(logits_BTV)


def real_rows(params: dict, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray | None]:
    head = None if cfg.tie_word_embeddings else np.asarray(params["lm_head"])
    return np.asarray(params["embed"]), head


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("tied", [False, True])
def test_padding_keeps_real_logits_and_masks_padded_ids(tied):
    cfg = tiny_cfg(tied=tied)
    params = random_params(cfg, 0)
    model = model_from(cfg, params)
    new_params, new_cfg = align_vocab(params, cfg, 64)

    assert (new_cfg.vocab_size, new_cfg.valid_vocab_size, new_cfg.tie_word_embeddings) == (64, V, tied)
    embed, head = real_rows(params, cfg)
    new_embed, new_head = real_rows(new_params, new_cfg)
    assert new_embed.shape == (64, E)
    np.testing.assert_array_equal(new_embed[:V], embed)
    np.testing.assert_array_equal(new_embed[V:], 0.0)
    if tied:
        assert "lm_head" not in new_params
    else:
        assert new_head.shape == (E, 64)
        np.testing.assert_array_equal(new_head[:, :V], head)
        np.testing.assert_array_equal(new_head[:, V:], 0.0)

    ref_BTV = forward(model)
    out_BTV = forward(model_from(new_cfg, new_params))
    assert out_BTV.shape == (2, 5, 64)
    np.testing.assert_allclose(out_BTV[..., :V], ref_BTV, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_BTV[..., V:], np.float32(L.MASK_VALUE))
    np.testing.assert_array_equal(out_BTV.argmax(-1), ref_BTV.argmax(-1))


def very_negative_params(cfg: ModelConfig) -> dict:
    """Params whose logits are hand-computable: every layer's output projections are zero, so the
    residual stream is the embedding e_v = c_v * ones(E) with c_v = (200 + v) / E; the final norm is
    -1, so h = -ones(E) for every token, and logit_v = h . e_v = -(200 + v) (tied or untied)."""
    params = random_params(cfg, 0)
    c_V = (200.0 + np.arange(cfg.vocab_size, dtype=np.float32)) / E
    params["embed"] = np.repeat(c_V[:, None], E, axis=1)
    params["final_norm"] = -np.ones(E, np.float32)
    params["layers"]["o_kernel"] = np.zeros_like(params["layers"]["o_kernel"])
    params["layers"]["down_kernel"] = np.zeros_like(params["layers"]["down_kernel"])
    if not cfg.tie_word_embeddings:
        params["lm_head"] = params["embed"].T.copy()
    return params


@pytest.mark.parametrize("tied", [False, True])
def test_padded_ids_never_win_even_when_all_real_logits_are_very_negative(tied):
    cfg = tiny_cfg(tied=tied)
    params = very_negative_params(cfg)
    expected_V = -(200.0 + np.arange(V))
    np.testing.assert_allclose(forward(model_from(cfg, params)), np.broadcast_to(expected_V, (2, 5, V)), rtol=1e-5)

    new_params, new_cfg = align_vocab(params, cfg, 64)
    out_BTV = forward(model_from(new_cfg, new_params))
    np.testing.assert_allclose(out_BTV[..., :V], np.broadcast_to(expected_V, (2, 5, V)), rtol=1e-5)
    assert (out_BTV[..., V:] < -1e30).all()
    np.testing.assert_array_equal(out_BTV.argmax(-1), 0)  # the largest real logit is -200, at id 0

    # The zero rows alone would score 0 > -200: without the valid_vocab_size mask a pad id wins.
    unmasked_BTV = forward(model_from(new_cfg.replace(valid_vocab_size=None), new_params))
    assert (unmasked_BTV.argmax(-1) >= V).all()


# ---------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("tied", [False, True])
def test_truncating_padding_rows_keeps_logits(tied):
    cfg = tiny_cfg(tied=tied)
    params = random_params(cfg, 1)
    ref_BTV = forward(model_from(cfg, params))
    padded, padded_cfg = align_vocab(params, cfg, 64)

    cut, cut_cfg = align_vocab(padded, padded_cfg, 48)
    assert (cut_cfg.vocab_size, cut_cfg.valid_vocab_size) == (48, V)
    assert cut["embed"].shape == (48, E)
    assert tied or cut["lm_head"].shape == (E, 48)
    out_BTV = forward(model_from(cut_cfg, cut))
    np.testing.assert_allclose(out_BTV[..., :V], ref_BTV, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_BTV[..., V:], np.float32(L.MASK_VALUE))

    exact, exact_cfg = align_vocab(padded, padded_cfg, V)  # drop every padding row
    assert (exact_cfg.vocab_size, exact_cfg.valid_vocab_size) == (V, V)
    np.testing.assert_array_equal(np.asarray(exact["embed"]), params["embed"])
    np.testing.assert_allclose(forward(model_from(exact_cfg, exact)), ref_BTV, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_truncating_real_rows_raises(tied):
    cfg = tiny_cfg(vocab_size=64, tied=tied)
    params = random_params(cfg, 0)
    with pytest.raises(VocabAlignmentError, match=r"from 64 to 48 rows.*ids below 64"):
        align_vocab(params, cfg, 48)  # every row is real when valid_vocab_size is None
    with pytest.raises(VocabAlignmentError, match=r"ids below 50 .*real_vocab_size=50"):
        align_vocab(params, cfg, 48, real_vocab_size=50)
    cut, cut_cfg = align_vocab(params, cfg, 50, real_vocab_size=50)
    assert (cut_cfg.vocab_size, cut_cfg.valid_vocab_size, cut["embed"].shape) == (50, 50, (50, E))
    padded_cfg = cfg.replace(valid_vocab_size=40)
    with pytest.raises(VocabAlignmentError, match=r"ids below 40 .*valid_vocab_size=40"):
        align_vocab(params, padded_cfg, 39)
    assert issubclass(VocabAlignmentError, ValueError)


def test_valid_vocab_size_is_the_smallest_known_bound():
    cfg = tiny_cfg(vocab_size=64)
    params = random_params(cfg, 0)
    assert align_vocab(params, cfg, 64, real_vocab_size=50)[1].valid_vocab_size == 50
    assert align_vocab(params, cfg.replace(valid_vocab_size=40), 64, real_vocab_size=50)[1].valid_vocab_size == 40
    assert align_vocab(params, cfg, 100)[1].valid_vocab_size == 64
    assert align_vocab(params, cfg, 100, real_vocab_size=80)[1].valid_vocab_size == 64


def test_qwen_sizes_with_numpy_arrays():
    """Qwen2.5-7B (152,064 rows) and -3B (151,936 rows) share a 151,665-id tokenizer."""
    rng = np.random.default_rng(0)
    big = tiny_cfg(vocab_size=152064)
    params = {
        "embed": rng.standard_normal((152064, 2)).astype(np.float16),
        "lm_head": rng.standard_normal((2, 152064)).astype(np.float16),
    }
    cut, cut_cfg = align_vocab(params, big, 151936, real_vocab_size=151665)
    assert (cut_cfg.vocab_size, cut_cfg.valid_vocab_size) == (151936, 151665)
    assert cut["embed"].shape == (151936, 2) and cut["lm_head"].shape == (2, 151936)
    assert cut["embed"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(cut["lm_head"]), params["lm_head"][:, :151936])
    with pytest.raises(VocabAlignmentError, match="151665"):
        align_vocab(params, big, 151664, real_vocab_size=151665)

    small = tiny_cfg(vocab_size=151936)
    small_params = {"embed": params["embed"][:151936], "lm_head": params["lm_head"][:, :151936]}
    padded, padded_cfg = align_vocab(small_params, small, 152064, real_vocab_size=151665)
    assert (padded_cfg.vocab_size, padded_cfg.valid_vocab_size) == (152064, 151665)
    np.testing.assert_array_equal(np.asarray(padded["embed"][:151936]), small_params["embed"])
    np.testing.assert_array_equal(np.asarray(padded["embed"][151936:]), 0)
    assert params["embed"].shape == (152064, 2)  # inputs untouched


def test_layout_errors_and_inputs_unchanged():
    cfg = tiny_cfg()
    params = random_params(cfg, 0)
    without_head = {k: v for k, v in params.items() if k != "lm_head"}
    with pytest.raises(VocabAlignmentError, match="no 'lm_head'"):
        align_vocab(without_head, cfg, 64)
    with pytest.raises(VocabAlignmentError, match="has an 'lm_head'|have an 'lm_head'"):
        align_vocab(params, cfg.replace(tie_word_embeddings=True), 64)
    with pytest.raises(VocabAlignmentError, match=r"embed has shape \(40, 16\); expected \[41, E\]"):
        align_vocab(params, cfg.replace(vocab_size=41), 64)
    with pytest.raises(VocabAlignmentError, match="positive"):
        align_vocab(params, cfg, 0)
    align_vocab(params, cfg, 64)
    assert params["embed"].shape == (V, E) and params["lm_head"].shape == (E, V)


def test_common_vocab_size():
    assert common_vocab_size(152064, 151936) == 152064
    assert common_vocab_size(152064, 151936, multiple=128) == 152064  # 1188 * 128
    assert common_vocab_size(151665, multiple=128) == 151680  # 1185 * 128
    assert common_vocab_size(100, 130, multiple=64) == 192
    assert common_vocab_size(7) == 7
    for bad in [(), (0,), (5, -1)]:
        with pytest.raises(ValueError):
            common_vocab_size(*bad)
    with pytest.raises(ValueError):
        common_vocab_size(10, multiple=0)


# ---------------------------------------------------------------------------- tokenizer agreement
@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def variant(tok, edit, **special_tokens) -> PreTrainedTokenizerFast:
    """A copy of tok whose tokenizer.json was changed by edit(dict) in place."""
    data = json.loads(tok.backend_tokenizer.to_str())
    edit(data)
    return wrap(Tokenizer.from_str(json.dumps(data)), **special_tokens)


def wrap(backend: Tokenizer, **special_tokens) -> PreTrainedTokenizerFast:
    """backend with the tiny tokenizer's special tokens unless overridden."""
    kwargs = dict(
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **(kwargs | special_tokens))


def test_identical_tokenizers_agree(tok):
    other = build_tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_tokenizers_agree(tok, other)
    assert report.ok and report.disagreements == ()
    assert (report.student_len, report.teacher_len, report.num_special_tokens) == (len(tok), len(tok), 3)
    assert "no disagreement" in str(report)


def swap_chat_tokens(data):
    """<|im_start|> and <|im_end|> exchange ids (the added tokens are numbered in list order)."""
    eot, start, end = data["added_tokens"]
    start["id"], end["id"] = end["id"], start["id"]
    data["added_tokens"] = [eot, end, start]


def test_swapped_special_token_ids_fail_with_the_ids(tok):
    n = len(tok) - 3  # the special tokens follow the learned vocabulary: <|endoftext|> is n
    teacher = variant(tok, swap_chat_tokens)
    assert teacher.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [n + 2, n + 1]
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_agree(tok, teacher)
    msg = str(err.value)
    assert f"id of '<|im_start|>': student {n + 1} vs teacher {n + 2}" in msg
    assert f"id of '<|im_end|>': student {n + 2} vs teacher {n + 1}" in msg
    assert "encoding of '<|im_start|>user\\nWhat is 2 + 2?" in msg
    assert "allow_tokenizer_mismatch: true" in msg
    assert "len(tokenizer)" not in msg and "<|endoftext|>" not in msg


def test_different_merges_fail_naming_the_text(tok):
    def drop_answer_merge(data):
        merges = data["model"]["merges"]
        hits = [m for m in merges if "".join(m) == "Ġanswer"]
        assert len(hits) == 1
        merges.remove(hits[0])

    teacher = variant(tok, drop_answer_merge)
    answer_id = tok.convert_tokens_to_ids("Ġanswer")
    text = "The answer is 4."
    assert answer_id in tok.encode(text) and answer_id not in teacher.encode(text)
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_agree(tok, teacher, probe_texts=[text, "4 + 4 = 8"])
    msg = str(err.value)
    assert "encoding of 'The answer is 4.'" in msg and f"student {answer_id} 'Ġanswer'" in msg
    assert "4 + 4 = 8" not in msg and "len(tokenizer)" not in msg  # same vocabulary, other text agrees


def test_smaller_vocabulary_fails_on_length_and_special_ids(tok):
    teacher = build_tiny_tokenizer(vocab_size=300)
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_agree(tok, teacher)
    msg = str(err.value)
    n = len(tok) - 3
    assert f"len(tokenizer): student {len(tok)} vs teacher 300" in msg
    assert f"eos_token: student '<|endoftext|>' (id {n}) vs teacher '<|endoftext|>' (id 297)" in msg


def test_different_eos_token_is_reported(tok):
    teacher = variant(tok, lambda data: None, eos_token="<|im_end|>")  # Qwen instruct vs base
    expected = r"eos_token: student '<\|endoftext\|>' \(id \d+\) vs teacher '<\|im_end\|>'"
    with pytest.raises(TokenizerMismatchError, match=expected):
        check_tokenizers_agree(tok, teacher)


def test_allow_mismatch_returns_report_and_warns(tok):
    teacher = variant(tok, swap_chat_tokens)
    with pytest.warns(TokenizerMismatchWarning, match="allow_tokenizer_mismatch"):
        report = check_tokenizers_agree(tok, teacher, probe_texts=["<|im_start|>", "plain text"], allow_mismatch=True)
    assert not report.ok and report.num_probe_texts == 2
    n = len(tok) - 3
    kinds = {(d.kind, d.what): (d.student, d.teacher) for d in report.disagreements}
    assert kinds == {
        ("special_token", "id of '<|im_end|>'"): (n + 2, n + 1),
        ("special_token", "id of '<|im_start|>'"): (n + 1, n + 2),
        ("encoding", "encoding of '<|im_start|>'"): ([n + 1], [n + 2]),
    }


def test_a_tokenizer_that_adds_a_bos_fails(tok):
    n = len(tok) - 3
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    bos = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", n)])
    backend.post_processor = bos
    teacher = wrap(backend)
    text = "The answer is 4."
    assert teacher.encode(text) == [n] + tok.encode(text)
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_agree(tok, teacher, probe_texts=[text, "7 + 8"])
    (only,) = err.value.args[0].split("disagreement(s)\n")[1].split("\nIf the")[0].splitlines()
    assert only.startswith("  - [encoding] encoding of 'The answer is 4.' with add_special_tokens=True")
    assert f"student {tok.encode(text)[0]} 'The' vs teacher {n} '<|endoftext|>'" in only
