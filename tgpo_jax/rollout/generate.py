"""`generate`: left-padded prompts in, one response per prompt out, as a plain function of a model
(no Sampler, no buckets): the rollout engine (engine.py) at one sample per prompt, one slot per
row. It has no decode loop of its own, so it samples exactly as the engine does (greedy at
temperature 0, else softmax(logits / temperature); per-request keys)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tgpo_jax.rollout.engine import engine_fn
from tgpo_jax.rollout.sampling import SamplingParams


class Generation(NamedTuple):
    tokens_BT: jax.Array  # response tokens, 0 after the stop
    mask_BT: jax.Array  # 1 up to and including the stop token
    logp_BT: jax.Array  # log-prob of each sampled token under the sampling distribution
    lengths_B: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "eos_ids"))
def _generate(graphdef, state, prompt_BP, prompt_mask_BP, key, *, params: SamplingParams, eos_ids):
    tokens, mask, logp, lengths, _ = engine_fn(
        graphdef, state, prompt_BP, prompt_mask_BP, key, params=params, stop_ids=eos_ids, slots=prompt_BP.shape[0]
    )
    return Generation(tokens, mask, logp, lengths)


def generate(
    model,
    prompt_BP,
    prompt_mask_BP,
    key,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_ids: tuple[int, ...] = (),
) -> Generation:
    """Left-padded prompts [B, P] -> responses [B, max_new_tokens]."""
    graphdef, state = nnx.split(model)
    params = SamplingParams(temperature=float(temperature), max_new_tokens=max_new_tokens, n=1)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_BP, jnp.int32),
        jnp.asarray(prompt_mask_BP, jnp.int32),
        key,
        params=params,
        eos_ids=tuple(eos_ids),
    )
