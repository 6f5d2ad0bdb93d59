"""Jitted generation with a KV cache: one prompt prefill, then a `lax.while_loop` of one-token
decode steps that stops as soon as every row has finished.

This is the minimal sampler the foundation needs (greedy or temperature sampling, EOS stop);
the rollout issue grows it into the full GRPO sampler (groups, top-p/top-k, buckets).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tgpo_jax.models.decoder import left_pad_positions
from tgpo_jax.models.kv_cache import KVCache


class Generation(NamedTuple):
    tokens_BT: jax.Array  # response tokens, 0 after the stop
    mask_BT: jax.Array  # 1 up to and including the stop token
    logp_BT: jax.Array  # log-prob of each sampled token under the sampling distribution
    lengths_B: jax.Array


def _pick(logits_BV: jax.Array, key: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Greedy when temperature == 0, else a sample from softmax(logits / temperature)."""
    if temperature == 0.0:
        tok = jnp.argmax(logits_BV, -1)
        return tok, jax.nn.log_softmax(logits_BV, -1)[jnp.arange(tok.shape[0]), tok]
    scaled = logits_BV / temperature
    tok = jax.random.categorical(key, scaled, axis=-1)
    return tok, jax.nn.log_softmax(scaled, -1)[jnp.arange(tok.shape[0]), tok]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "eos_ids"))
def _generate(graphdef, state, prompt_BP, prompt_mask_BP, key, *, max_new_tokens, temperature, eos_ids):
    model = nnx.merge(graphdef, state)
    B, P = prompt_BP.shape
    cache = KVCache.init(model.cfg, B, P + max_new_tokens)
    pos_BP = left_pad_positions(prompt_mask_BP)
    h_BPE, cache = model.hidden_states(prompt_BP, pos_BP, prompt_mask_BP, cache)
    last_logits_BV = model.logits(h_BPE[:, -1])  # the prompt's last position only (see decode_loop._prefill)
    layers = None if cache.stacked else model.layer_list()  # sliced once, not in every decode step
    next_pos_B = pos_BP[:, -1] + 1
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        t, _, _, done_B, *_ = carry
        return (t < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        t, last_logits_BV, cache, done_B, out_tokens, out_mask, out_logp, key = carry
        key, sub = jax.random.split(key)
        tok_B, logp_B = _pick(last_logits_BV, sub, temperature)
        live_B = ~done_B
        out_tokens = out_tokens.at[:, t].set(jnp.where(live_B, tok_B, 0))
        out_mask = out_mask.at[:, t].set(live_B.astype(jnp.int32))
        out_logp = out_logp.at[:, t].set(jnp.where(live_B, logp_B, 0.0))
        done_B = done_B | jnp.isin(tok_B, eos)
        logits, cache = model(tok_B[:, None], (next_pos_B + t)[:, None], jnp.ones((B, 1), jnp.int32), cache, layers)
        return t + 1, logits[:, -1], cache, done_B, out_tokens, out_mask, out_logp, key

    init = (
        jnp.zeros((), jnp.int32),
        last_logits_BV,
        cache,
        jnp.zeros((B,), bool),
        jnp.zeros((B, max_new_tokens), jnp.int32),
        jnp.zeros((B, max_new_tokens), jnp.int32),
        jnp.zeros((B, max_new_tokens), jnp.float32),
        key,
    )
    _, _, _, _, tokens, mask, logp, _ = jax.lax.while_loop(cond, body, init)
    return Generation(tokens, mask, logp, mask.sum(-1))


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
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_BP, jnp.int32),
        jnp.asarray(prompt_mask_BP, jnp.int32),
        key,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        eos_ids=tuple(eos_ids),
    )
