"""A tiny, deterministic, Qwen-like tokenizer built offline: the tokenizer of tiny random models in
demos and tests.

It is a byte-level BPE (every UTF-8 string encodes; no unknown token) trained with the `tokenizers`
library on a small embedded corpus of English and arithmetic reasoning, with Qwen2's pre-tokenizer
(digits split one by one) and NFC normalisation. Like Qwen, the special tokens come after the learned
vocabulary: `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>`, and the chat template is
ChatML. Training on a fixed corpus with a fixed vocabulary size gives the same files every time.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
_NUM_BYTES = 256  # the byte-level alphabet: one base token per byte value
MIN_VOCAB_SIZE = _NUM_BYTES + len(SPECIAL_TOKENS)

# Qwen2's pre-tokenization regex (tokenizer.json of Qwen2 / Qwen2.5): single digits, words with an
# optional leading non-letter, punctuation runs, newlines and whitespace runs.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as used by Qwen2.5 instruct models (without Qwen's default system prompt or tool calling).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_CORPUS = (
    "Let's compute 12 + 7 = 19. The answer is \\boxed{19}.",
    "Let's compute 45 - 18 = 27. The answer is \\boxed{27}.",
    "First, 6 * 8 = 48. Then 48 + 2 = 50. So the answer is \\boxed{50}.",
    "We need to find the sum of 3, 5 and 9. 3 + 5 = 8 and 8 + 9 = 17. The answer is \\boxed{17}.",
    "Tom has 4 apples and buys 3 more. Now he has 4 + 3 = 7 apples. The answer is \\boxed{7}.",
    "A train travels 60 miles per hour for 2 hours, so it travels 60 * 2 = 120 miles.",
    "Half of 36 is 36 / 2 = 18. The answer is \\boxed{18}.",
    "The fraction 3/4 equals 0.75, so the answer is \\boxed{3/4}.",
    "To solve x + 5 = 12, subtract 5 from both sides: x = 12 - 5 = 7.",
    "If 2x = 10, then x = 10 / 2 = 5. Therefore x = 5 and the answer is \\boxed{5}.",
    "The area of a rectangle with sides 3 and 4 is 3 * 4 = 12 square units.",
    "The perimeter of a square with side 5 is 4 * 5 = 20.",
    "Let me think step by step. 100 - 37 = 63, and 63 + 14 = 77.",
    "Sarah reads 15 pages a day for 6 days: 15 * 6 = 90 pages in total.",
    "The product of 7 and 9 is 63, and the sum of 7 and 9 is 16.",
    "Check: 19 - 7 = 12, which matches the first number, so the answer is correct.",
    "We have $\\frac{1}{2} + \\frac{1}{4} = \\frac{3}{4}$.",
    "The square root of 81 is 9 because 9 * 9 = 81.",
    "There are 24 hours in a day and 7 days in a week, so a week has 24 * 7 = 168 hours.",
    "The average of 4, 8 and 12 is (4 + 8 + 12) / 3 = 24 / 3 = 8.",
    "Question: What is 13 + 29?",
    "Answer: 13 + 29 = 42. The answer is \\boxed{42}.",
    "Question: A shop sells pens for 3 dollars each. How much do 5 pens cost?",
    "Answer: 5 * 3 = 15 dollars. The answer is \\boxed{15}.",
    "Think carefully, show your reasoning, and put the final answer in \\boxed{}.",
    "The quick brown fox jumps over the lazy dog.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "A good explanation is short, clear and correct.",
    "The teacher explains the problem and the student writes the solution.",
    "Reasoning step by step helps to avoid mistakes in long calculations.",
    "Numbers can be even or odd: 2, 4 and 6 are even; 1, 3 and 5 are odd.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    total += i\n",
    "You are a helpful assistant.",
    "Please solve the following problem and explain each step.",
    "Sure! Let's work through it together.",
)


def _train_bpe(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with at most vocab_size - len(SPECIAL_TOKENS) learned tokens, then the special
    tokens appended after them (ids len(vocab), len(vocab) + 1, ...)."""
    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tiny_tokenizer(out_dir: str | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A tiny Qwen-like tokenizer with len(tokenizer) <= vocab_size.

    Args:
      out_dir: when given, the tokenizer is saved there (save_pretrained) so that
        `AutoTokenizer.from_pretrained(out_dir)` loads it offline.
      vocab_size: upper bound on the number of ids (learned tokens + 3 special tokens), so that a
        model whose embedding has vocab_size rows can embed every id. At least 259 (256 bytes + 3).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer: it needs at least "
            f"{MIN_VOCAB_SIZE} ids ({_NUM_BYTES} byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # explicit, so that every AutoTokenizer class (picked from the model's config.json) agrees
        unk_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    assert len(hf_tok) <= vocab_size, (len(hf_tok), vocab_size)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        hf_tok.save_pretrained(out_dir)
    return hf_tok


__all__ = ["build_tiny_tokenizer", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "MIN_VOCAB_SIZE"]
