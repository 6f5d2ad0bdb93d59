"""The tiny offline tokenizer used by demos and tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from tgpo_jax.models.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


TEXTS = [
    "Let's compute 12 + 7 = 19. The answer is \\boxed{19}.",
    "So the answer is \\boxed{3/4}, i.e. $\\frac{3}{4}$.",
    "  two leading spaces,\ttab,\n\nblank line, trailing   ",
    "Unicode: café, 数学, π ≈ 3.14, 🙂",
    "def f(x):\n    return x ** 2\n",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_vocabulary_and_special_tokens(tok):
    n = len(tok)
    assert n <= 512
    # Qwen layout: the special tokens come right after the learned vocabulary.
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [n - 3, n - 2, n - 1]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == n - 3
    # unk is explicit (= <|endoftext|>, as Qwen2Tokenizer sets it), so that every tokenizer class
    # AutoTokenizer may pick from a model's config.json reports the same special tokens
    assert tok.bos_token is None and tok.unk_token == "<|endoftext|>"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)  # no BOS
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == n - 2 and ids[-1] == n - 1 and tok.decode(ids[1:-1]) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # Qwen2 pre-tokenization: every digit is its own token, and the 256 bytes come first.
    digits = tok.encode("2024", add_special_tokens=False)
    assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]


def test_vocab_size_bounds_the_ids():
    small = build_tiny_tokenizer(vocab_size=300)
    assert len(small) == 300  # the corpus has far more than 297 mergeable pairs
    assert small.convert_tokens_to_ids("<|im_end|>") == 299
    with pytest.raises(ValueError, match="at least 259"):
        build_tiny_tokenizer(vocab_size=258)


EXPECTED_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n2 + 3 = 5. The answer is \\boxed{5}.<|im_end|>\n"
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is \\boxed{5}."},
]


def test_chat_template(tok):
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_CHAT.split("2 + 3 = 5")[0]
    assert tok.apply_chat_template(MESSAGES[1:2], tokenize=False) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    ids = tok.apply_chat_template(MESSAGES[:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_save_and_reload_with_auto_tokenizer(tok, tmp_path):
    build_tiny_tokenizer(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tok)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT


def _read_all(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_deterministic_files(tmp_path):
    build_tiny_tokenizer(str(tmp_path / "a"))
    build_tiny_tokenizer(str(tmp_path / "b"))
    # A fresh interpreter (other hash seeds) must write the same bytes too.
    code = "import sys; from tgpo_jax.models import tiny_tokenizer as t; t.build_tiny_tokenizer(sys.argv[1])"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env, timeout=60)
    a = _read_all(tmp_path / "a")
    assert "tokenizer.json" in a and "tokenizer_config.json" in a
    assert _read_all(tmp_path / "b") == a
    assert _read_all(tmp_path / "c") == a


def test_same_special_tokens_whatever_the_model_family(tmp_path):
    """AutoTokenizer picks its class from the directory's config.json (qwen2 vs llama); the tiny
    tokenizer must report identical special tokens under both, or student/teacher checks fail."""
    from tgpo_jax.models.hf_import import load_tokenizer
    from tgpo_jax.models.tiny import make_tiny_checkpoint
    from tgpo_jax.models.tokenizer_check import check_tokenizers_agree

    a = load_tokenizer(make_tiny_checkpoint(str(tmp_path / "q"), arch="qwen2"))
    b = load_tokenizer(make_tiny_checkpoint(str(tmp_path / "l"), arch="llama"))
    assert (a.unk_token, a.eos_token, a.pad_token) == (b.unk_token, b.eos_token, b.pad_token)
    assert check_tokenizers_agree(a, b).ok
