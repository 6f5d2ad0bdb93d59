"""Offline stand-ins for the Qwen2.5(-Math) and Qwen3 tokenizers with the REAL id layout of the
parts the vocabulary handling depends on (no download; the BPE ranks are not on this machine).

- 151,643 byte-level BPE entries: ids 0..255 are the 256 byte symbols in GPT-2 / Qwen order
  (so '<' = 27, '>' = 29, 'Ġ' = 220 as in Qwen), '</' = 522 and 'think' = 26865 with the merges
  that build them, and unique filler tokens (never produced by a merge) everywhere else;
  Qwen2's pre-tokenizer regex, so "</think>" splits into "</", "think", ">" -> 522, 26865, 29
  exactly as the real Qwen2.5 tokenizer writes it.
- Qwen2.5's 22 added tokens at 151643..151664 (len 151,665; eos = pad = <|endoftext|>, as in
  Qwen2.5-Math base) and Qwen3's four more at 151665..151668 (<think> = 151667, </think> = 151668;
  len 151,669; eos <|im_end|>, pad <|endoftext|>, as in Qwen3-*-Thinking-2507). Which added tokens
  are `special` follows the real tokenizer_config.json files.
"""

from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

NUM_BPE = 151_643
QWEN25_LEN, QWEN3_LEN = 151_665, 151_669
EMBED_ROWS = 151_936  # config vocab_size of both Qwen2.5-Math-1.5B and Qwen3-30B-A3B
LT, GT, LT_SLASH, THINK_WORD = 27, 29, 522, 26865
THINK, END_THINK = 151_667, 151_668

_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (text, special) in id order from 151643 (Qwen2.5's tokenizer_config.json added_tokens_decoder)
QWEN25_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN3_EXTRA = (("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False))


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode symbols in rank order (printable bytes first, then the rest)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _filler(i: int) -> str:
    """A unique lowercase token 'zq' + base-26 digits of i: decodes to itself, never merged."""
    s = ""
    while True:
        i, r = divmod(i, 26)
        s = chr(ord("a") + r) + s
        if not i:
            return "zq" + s


def _bpe() -> Tokenizer:
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    placed = {LT_SLASH: "</", 339: "th", 258: "in", 766: "ink", THINK_WORD: "think"}
    merges = [("<", "/"), ("t", "h"), ("i", "n"), ("in", "k"), ("th", "ink")]
    k = 0
    for i in range(256, NUM_BPE):
        if i in placed:
            vocab[placed[i]] = i
        else:
            vocab[_filler(k)] = i
            k += 1
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _with_added(added, eos: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe())
    for text, special in added:  # one at a time, so each lands at the next id
        tok.add_tokens([text], special_tokens=special)
    tok.eos_token, tok.pad_token = eos, "<|endoftext|>"
    return tok


@functools.cache
def qwen25_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2.5-Math student's layout: len 151,665, no <think> tokens."""
    return _with_added(QWEN25_ADDED, eos="<|endoftext|>")


@functools.cache
def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen3-Thinking teacher's layout: len 151,669, </think> = 151668."""
    return _with_added(QWEN25_ADDED + QWEN3_EXTRA, eos="<|im_end|>")
