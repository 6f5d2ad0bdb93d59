"""Text in, text out around the jitted sampler: chat-template rendering, the one stop-id policy of
training, evaluation and `tgpo-jax sample`, the context-length check, decoding."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from tgpo_jax.models.config import read_model_config
from tgpo_jax.models.hf_import import load_model, load_tokenizer
from tgpo_jax.models.vocab_map import usable_vocab_override
from tgpo_jax.rollout.sampling import SamplingParams, sampling_problems

CHATML_END = "<|im_end|>"


def render_prompts(tokenizer, prompts: list[str], *, chat: bool) -> list[list[int]]:
    if chat and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
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


def stop_ids_for(tokenizer, model_cfg, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The stop ids of every sampler in the project (training rollouts, the in-run evaluator,
    `tgpo-jax eval` and `tgpo-jax sample`), so one model scores the same everywhere: the
    tokenizer's and config.json's EOS ids, ChatML's <|im_end|> when the vocabulary has it (a chat
    turn ends there even in base models whose EOS is <|endoftext|>), and any configured extras."""
    ids = set(eos_ids_of(tokenizer, model_cfg)) | {int(s) for s in extra}
    im_end = tokenizer.convert_tokens_to_ids(CHATML_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end >= 0:
        ids.add(im_end)
    return tuple(sorted(ids))


def context_problem(
    prompt_len: int, max_new_tokens: int, context: int, *, prompt_desc: str, new_label: str, model_label: str
) -> str | None:
    """A message when a prompt plus its longest response needs more positions than the model was
    built for (max_position_embeddings): RoPE would run past its trained range without an error.
    `prompt_desc` names where prompt_len comes from, e.g. "data.max_prompt_len=1024"."""
    if prompt_len + max_new_tokens <= context:
        return None
    return (
        f"{prompt_desc} + {new_label}={max_new_tokens} = {prompt_len + max_new_tokens} positions exceed "
        f"{model_label}'s context of {context} (max_position_embeddings in its config.json); lower one of "
        "them or use a model with a longer context"
    )


def check_sample_args(prompts: Sequence[str], **sampling) -> SamplingParams:
    """`tgpo-jax sample`'s flags, checked before any file is read: ValueError naming the flag."""
    problems = sampling_problems(style="flag", **sampling)
    problems += [f"--prompt #{i + 1} is empty: give some text" for i, p in enumerate(prompts) if not p]
    if problems:
        raise ValueError("; ".join(problems))
    return SamplingParams(**sampling)


def run_sample(
    model_dir: str,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    top_k: int = 0,
    chat: bool = True,
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """Samples one response per prompt. Every input is checked (flags, model directory, rendered
    prompt lengths against the model's context) before the weights are read or anything compiles."""
    from tgpo_jax.rollout.sampler import Sampler

    params = check_sample_args(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k
    )
    cfg = read_model_config(model_dir, "--model")
    tokenizer = load_tokenizer(model_dir, key="--model")
    ids = render_prompts(tokenizer, prompts, chat=chat)
    problems = [f"--prompt #{i + 1} renders to no tokens" for i, p in enumerate(ids) if not p]
    problems += [
        m
        for i, p in enumerate(ids)
        if (
            m := context_problem(
                len(p),
                max_new_tokens,
                cfg.max_position_embeddings,
                prompt_desc=f"--prompt #{i + 1} ({len(p)} tokens)",
                new_label="--max-new-tokens",
                model_label=model_dir,
            )
        )
    ]
    if problems:
        raise ValueError("; ".join(problems))
    # ids the tokenizer cannot produce are never sampled, as in training (models/vocab_map.py)
    model = load_model(model_dir, cfg_overrides=usable_vocab_override(len(tokenizer), cfg.vocab_size))
    sampler = Sampler(model, stop_ids=stop_ids_for(tokenizer, cfg, stop_ids), pad_id=tokenizer.pad_token_id or 0)
    out = sampler.sample(ids, params, jax.random.key(seed))
    toks, lens = np.asarray(out.tokens_BT), np.asarray(out.lengths_B)
    return [
        f"[{i}] prompt={p!r}\n    response ({lens[i]} tokens): {tokenizer.decode(toks[i, : lens[i]])!r}"
        for i, p in enumerate(prompts)
    ]
