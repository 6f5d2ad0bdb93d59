"""Prefill + decode as ONE jitted function (the device side of the rollout sampler).

- Each prompt is prefilled once; its KV slots are copied to its n group members.
- Decode is a `lax.while_loop` that exits as soon as every row has stopped.
- The KV cache is allocated inside the program, not passed in: the compiler lays it out as the
  decode loop writes it (a cache passed in row-major was copied whole into that layout: 15.75 GiB
  per device at the paper's shapes on a v5p-8) and its memory is free again once the rollout
  returns, for the scoring and train programs that follow.
Random draws use `fold_in(key, step)`, so tokens depend on the key only, not on the sharding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tgpo_jax.models.decoder import left_pad_positions
from tgpo_jax.models.kv_cache import KVCache
from tgpo_jax.rollout.sampling import SamplingParams, select

FINISH_STOP, FINISH_LENGTH = 0, 1


class Rollout(NamedTuple):
    """Responses for B = prompts x n rows; row b belongs to prompt b // n."""

    tokens_BT: np.ndarray  # int32, 0 after the stop
    mask_BT: np.ndarray  # int32, 1 up to and including the stop token
    logp_BT: np.ndarray  # fp32 log-prob of each sampled token under the sampling distribution
    lengths_B: np.ndarray
    finish_B: np.ndarray  # FINISH_STOP or FINISH_LENGTH
    prompt_tokens_BP: np.ndarray  # the left-padded prompt of each row (repeated n times)
    prompt_mask_BP: np.ndarray


def _constrain_cache(model, x, axes):
    sh = getattr(model, "sharding", None)
    return x if sh is None else sh.constrain(x, axes)


def _new_cache(model, B: int, S: int) -> KVCache:
    """The zeroed KV cache of B rows x S slots, sharded as the model's rules shard the cache."""
    cache = KVCache.init(model.cfg, B, S)
    k, v = (jax.tree.map(lambda x: _constrain_cache(model, x, cache.kv_axes), t) for t in (cache.k, cache.v))
    return KVCache(k, v, _constrain_cache(model, cache.mask_BS, ("batch", None)), cache.index)


def prefill_prompts(model, prompt_PT, mask_PT, dtype):
    """Runs the prompts once: (logits [P, V] of each prompt's last position, their KVCache of
    P rows x T slots)."""
    P, T = prompt_PT.shape
    small = KVCache.init(model.cfg, P, T, dtype=dtype)
    # the next token needs the last position's logits only: [P, V], not [P, T, V] in fp32 (at the
    # paper's 128 prompts x 1,024 tokens x 151,936 that would be 74 GiB)
    h_PTE, small = model.hidden_states(prompt_PT, left_pad_positions(mask_PT), mask_PT, small)
    return model.logits(h_PTE[:, -1]), small


def _prefill(model, prompt_PT, mask_PT, cache: KVCache, n: int):
    """Runs the prompts once and fills slots [0, T) of the big cache for all n copies."""
    T = prompt_PT.shape[1]
    logits_PV, small = prefill_prompts(model, prompt_PT, mask_PT, cache.dtype)
    axes = cache.kv_axes
    fill = lambda big, part: _constrain_cache(  # noqa: E731
        model, jax.lax.dynamic_update_slice(big, jnp.repeat(part, n, axis=axes.index("batch")), (0,) * big.ndim), axes
    )
    k, v = jax.tree.map(fill, cache.k, small.k), jax.tree.map(fill, cache.v, small.v)
    rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    slot_mask = jnp.zeros(cache.mask_BS.shape, bool).at[:, :T].set(rep(mask_PT.astype(bool)))
    big = KVCache(k, v, slot_mask, jnp.asarray(T, jnp.int32))
    return rep(logits_PV), big


def rollout_fn(
    graphdef, state, prompt_PT, mask_PT, key, *, params: SamplingParams, stop_ids: tuple[int, ...], stop_at_B=None
):
    """(tokens_BT, mask_BT, logp_BT, lengths_B, finish_B) for P prompts x params.n samples.

    stop_at_B (int32 [B], benchmarks only): row b stops after exactly stop_at_B[b] tokens (FINISH_STOP),
    as if its last token were a stop id; a stop id drawn earlier still ends it first. None: no forced
    stops, and the compiled program is the one without the argument."""
    model = nnx.merge(graphdef, state)
    n, T_new = params.n, params.max_new_tokens
    cache = _new_cache(model, prompt_PT.shape[0] * n, prompt_PT.shape[1] + T_new)
    logits_BV, cache = _prefill(model, prompt_PT, mask_PT, cache, n)
    layers = None if cache.stacked else model.layer_list()  # sliced once here, not in every decode step
    B = logits_BV.shape[0]
    next_pos_B = jnp.repeat(left_pad_positions(mask_PT)[:, -1] + 1, n)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def emit(c, t, tok, logp):
        """Records step t's token for the rows still running."""
        live = ~c["done"]
        hit = live & jnp.isin(tok, stops)
        if stop_at_B is not None:  # a forced stop: token t is the row's stop_at_B-th
            hit = hit | (live & (stop_at_B == t + 1))
        return dict(
            c,
            tok=tok,
            tokens=c["tokens"].at[:, t].set(jnp.where(live, tok, 0)),
            mask=c["mask"].at[:, t].set(live.astype(jnp.int32)),
            logp=c["logp"].at[:, t].set(jnp.where(live, logp, 0.0)),
            stopped=c["stopped"] | hit,
            done=c["done"] | hit,
        )

    def cond(c):
        return (c["t"] < T_new) & ~jnp.all(c["done"])

    def body(c):
        # forward the previous token, then draw token t: the last draw needs no extra forward
        t = c["t"]
        logits, cache_t = _decode_step(model, layers, c["tok"], next_pos_B + t - 1, c["cache"])
        tok, logp = select(logits, jax.random.fold_in(key, t), params)
        return dict(emit(c, t, tok, logp), cache=cache_t, t=t + 1)

    zeros = jnp.zeros((B, T_new), jnp.int32)
    init = dict(
        t=jnp.ones((), jnp.int32),
        cache=cache,
        tok=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        stopped=jnp.zeros((B,), bool),
        tokens=zeros,
        mask=zeros,
        logp=jnp.zeros((B, T_new), jnp.float32),
    )
    tok0, logp0 = select(logits_BV, jax.random.fold_in(key, 0), params)
    c = jax.lax.while_loop(cond, body, emit(init, 0, tok0, logp0))
    finish = jnp.where(c["stopped"], FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return c["tokens"], c["mask"], c["logp"], c["mask"].sum(-1), finish


def _decode_step(model, layers, tok_B, pos_B, cache):
    logits, cache = model(tok_B[:, None], pos_B[:, None], jnp.ones((tok_B.shape[0], 1), jnp.int32), cache, layers)
    return logits[:, -1], cache
