"""A PolicyFn backed by a real model and the rollout Sampler, and the `tgpo-jax eval` driver."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tgpo_jax.eval.evaluator import EVAL_REWARD, Completion, EvalItem, EvalReport, PolicyFn, evaluate

if TYPE_CHECKING:
    from tgpo_jax.data.sources import LoadStats


def stop_ids_for(tokenizer, model_cfg, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The project's one stop-id policy (tgpo_jax.rollout.text.stop_ids_for)."""
    from tgpo_jax.rollout.text import stop_ids_for as policy

    return policy(tokenizer, model_cfg, extra)


def policy_from_sampler(
    sampler, tokenizer, params, *, seed: int = 0, pad_to: int | None = None, state=None
) -> PolicyFn:
    """The one sampling policy of evaluation, shared by `tgpo-jax eval` and the in-run evaluator:
    call c of the returned PolicyFn samples with key fold_in(key(seed), c) and SamplingParams
    `params` (n replaced by the call's k), so the same model, items, batch size and seed give the
    same generations in both. `pad_to` pads every call to that many prompts (repeats of the last
    one, outputs dropped) so all chunks share one compiled shape. state: the weights sampled (the
    trainer's current parameters); None: the sampler's model's own."""
    import jax

    calls = [0]

    def policy(items: Sequence[EvalItem], n: int) -> list[list[Completion]]:
        prompts = [it.prompt_ids for it in items]
        if any(p is None for p in prompts):
            raise ValueError("sampler_policy needs rendered prompt_ids on every EvalItem")
        if pad_to and len(prompts) < pad_to:
            prompts = prompts + [prompts[-1]] * (pad_to - len(prompts))
        key = jax.random.fold_in(jax.random.key(seed), calls[0])
        out = sampler.sample(prompts, dataclasses.replace(params, n=n), key, state=state)
        calls[0] += 1
        return [[_completion(tokenizer, out, i * n + j) for j in range(n)] for i in range(len(items))]

    return policy


def sampler_policy(
    model,
    tokenizer,
    *,
    max_new_tokens: int,
    temperature: float = 0.6,
    top_p: float = 1.0,
    seed: int = 0,
    pad_to: int | None = None,
    stop_ids: Sequence[int] = (),
) -> PolicyFn:
    """policy_from_sampler over a new Sampler of `model` with the project's stop ids (+ `stop_ids`)."""
    from tgpo_jax.rollout.sampler import Sampler
    from tgpo_jax.rollout.sampling import SamplingParams

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = Sampler(model, stop_ids=stop_ids_for(tokenizer, model.cfg, stop_ids), pad_id=pad_id)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return policy_from_sampler(sampler, tokenizer, params, seed=seed, pad_to=pad_to)


def _completion(tokenizer, out, row: int) -> Completion:
    length = int(out.lengths_B[row])
    text = tokenizer.decode(out.tokens_BT[row, :length].tolist(), skip_special_tokens=True)
    return Completion(text=text, num_tokens=length, truncated=bool(out.finish_B[row] == 1))


def load_eval_items(files: Sequence[str], tokenizer, **data_overrides) -> tuple[list[EvalItem], LoadStats]:
    """Eval items of jsonl/parquet files (data_source column, else the file stem) rendered with the
    tokenizer; returns (items, LoadStats: rows skipped for a missing answer, prompts dropped as too long)."""
    from tgpo_jax.data import DataConfig, build_prompt_set

    cfg = DataConfig(files=tuple(files), shuffle=False, **data_overrides)
    ps = build_prompt_set(cfg, tokenizer)
    items = [EvalItem(r["problem"], r["answer"], r["data_source"], r["index"], r["prompt_ids"]) for r in ps.records]
    return items, ps.stats


def _check_context(items: Sequence[EvalItem], max_new_tokens: int, context: int, model_dir: str) -> None:
    """The longest rendered prompt plus the response limit must fit the model's context (before any
    weight is read)."""
    from tgpo_jax.rollout.text import context_problem

    longest = max((len(it.prompt_ids) for it in items), default=0)
    desc = f"the longest prompt ({longest} tokens)"
    if problem := context_problem(
        longest, max_new_tokens, context, prompt_desc=desc, new_label="--max-new-tokens", model_label=model_dir
    ):
        raise ValueError(problem)


def run_eval(
    model_dir: str,
    files: Sequence[str],
    *,
    k: int = 1,
    k_per_source: Mapping[str, int] | None = None,
    max_new_tokens: int = 8192,
    temperature: float = 0.6,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    timeout_s: float = 10.0,
    num_workers: int = 0,
    think_format: bool = True,
    stop_ids: Sequence[int] = (),
    **data_overrides,
) -> EvalReport:
    """Loads a HF checkpoint directory and evaluates it on `files` (see `evaluate`). config.json,
    the tokenizer and the prompts' lengths against the model's context are checked before the
    weights are read."""
    from tgpo_jax.models.config import read_model_config
    from tgpo_jax.models.hf_import import load_model, load_tokenizer
    from tgpo_jax.models.vocab_map import usable_vocab_override
    from tgpo_jax.rewards import RewardFn

    cfg = read_model_config(model_dir, "--model")
    tokenizer = load_tokenizer(model_dir, key="--model")
    items, stats = load_eval_items(files, tokenizer, think_suffix=think_format, **data_overrides)
    _check_context(items, max_new_tokens, cfg.max_position_embeddings, model_dir)
    # ids the tokenizer cannot produce are never sampled, as in training (models/vocab_map.py)
    model = load_model(model_dir, cfg_overrides=usable_vocab_override(len(tokenizer), cfg.vocab_size))
    policy = sampler_policy(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        pad_to=batch_size,
        stop_ids=stop_ids,
    )
    reward_cfg = dataclasses.replace(
        EVAL_REWARD, think_format=think_format, timeout_s=timeout_s, num_workers=num_workers
    )
    with RewardFn(reward_cfg) as reward:
        report = evaluate(
            policy,
            items,
            k,
            k_per_source=k_per_source,
            reward_fn=reward,
            batch_size=batch_size,
            dropped_prompts=stats.dropped_too_long,
        )
    report.meta = {
        "model": model_dir,
        "files": list(files),
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "think_format": think_format,
        "stop_ids": list(stop_ids),
        "data_stats": dataclasses.asdict(stats),
    }
    return report


__all__ = ["policy_from_sampler", "sampler_policy", "stop_ids_for", "load_eval_items", "run_eval"]
