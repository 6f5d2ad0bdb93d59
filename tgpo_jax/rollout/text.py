"""Text in, text out around the jitted generator: chat-template rendering, left padding, decoding."""

from __future__ import annotations

import jax
import numpy as np

from tgpo_jax.data.prompts import left_pad
from tgpo_jax.models.hf_import import load_model, load_tokenizer
from tgpo_jax.rollout.generate import generate


def render_prompts(tokenizer, prompts: list[str], *, chat: bool) -> list[list[int]]:
    if chat and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
            for p in prompts
        ]
    return [tokenizer(p)["input_ids"] for p in prompts]


def eos_ids_of(tokenizer, cfg) -> tuple[int, ...]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = cfg.eos_token_id
    ids.update([eos] if isinstance(eos, int) else list(eos or ()))
    return tuple(sorted(ids))


def run_sample(model_dir: str, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
               chat: bool = True) -> list[str]:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokens, mask = left_pad(render_prompts(tokenizer, prompts, chat=chat), tokenizer.pad_token_id or 0)
    out = generate(model, tokens, mask, jax.random.key(seed), max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_ids=eos_ids_of(tokenizer, model.cfg))
    toks, lens = np.asarray(out.tokens_BT), np.asarray(out.lengths_B)
    return [
        f"[{i}] prompt={p!r}\n    response ({lens[i]} tokens): {tokenizer.decode(toks[i, :lens[i]])!r}"
        for i, p in enumerate(prompts)
    ]
