"""A continuous-batching rollout engine: a fixed pool of decode slots refilled from the queue of
requests as rows finish, all inside ONE jitted function (issue 24, item 1).

`decode_loop.rollout_fn` decodes every row until the longest row is done, so with a spread of
response lengths most rows idle most steps. Here `slots` rows decode; a request that stops frees
its slot and the next pending request takes it, so the step count follows the total work
(about sum of lengths / slots) rather than the longest row.

- Prefill: every prompt ONCE up front (P rows, last-position logits only, as rollout_fn). Token 0 of
  every request is drawn from its prompt's logits right there: it needs no forward, so doing it
  before the loop keeps the [slots, V] gather and top-p sort out of the loop, and a request that
  stops at token 0 (or max_new_tokens == 1) never takes a slot.
- Insert: pending requests, in request order, take idle slots: the prompt's prefilled k/v rows are
  copied into the slot's cache slots [0, prompt_len) and the slot mask is the prompt mask. No
  prefill happens inside the loop.
- Decode: one step for all slots, each at its own position; idle slots compute but write nothing.
- Per-row write position: the cache's index is a [slots] vector (KVCache), so the decoder writes
  each row's new k/v at the row's own slot prompt_len + step - 1 and each row's query sees its own
  slots; decode attention reads only the cache blocks before the longest row's end
  (kernels/decode.py). Idle slots write at slot 0 of their own row, which the next insert
  overwrites.
- Randomness per request, never per slot: token t of request r uses fold_in(fold_in(key, r), t), so
  a sample's tokens depend only on the key and its request, not on the slot count or schedule.
Shapes: P prompts of T (padded) tokens, B = P x n requests, N decode slots (rows of the KV cache),
S = T + max_new_tokens cache slots per row, V the vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tgpo_jax.models.decoder import left_pad_positions
from tgpo_jax.models.kv_cache import KVCache
from tgpo_jax.rollout.decode_loop import FINISH_LENGTH, FINISH_STOP, _decode_step, _new_cache, prefill_prompts
from tgpo_jax.rollout.sampling import SamplingParams, select


def engine_fn(
    graphdef,
    state,
    prompt_PT,
    mask_PT,
    key,
    *,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    slots: int,
    stop_at_B=None,
    kv_pages: int = 0,
    page_size: int = 128,
):
    """(tokens_BT, mask_BT, logp_BT, lengths_B, finish_B) for B = P x params.n requests, prompt-major
    (request r is sample r % n of prompt r // n), as `decode_loop.rollout_fn` returns them, decoded
    by `slots` rows (clamped to [1, B]). stop_at_B (int32 [B], benchmarks only): as in rollout_fn,
    request r stops after exactly stop_at_B[r] tokens (FINISH_STOP); None leaves the program as is.
    kv_pages > 0: the KV cache is a pool of that many pages of page_size tokens shared by the slots
    (rollout/paged_engine.py); 0: one dense row of prompt + max_new_tokens slots per slot."""
    if kv_pages:
        from tgpo_jax.rollout.paged_engine import paged_engine_fn  # imports this module

        return paged_engine_fn(
            graphdef,
            state,
            prompt_PT,
            mask_PT,
            key,
            params=params,
            stop_ids=stop_ids,
            slots=slots,
            kv_pages=kv_pages,
            page_size=page_size,
            stop_at_B=stop_at_B,
        )
    if slots < 1:
        raise ValueError(f"slots={slots}: the engine needs at least one decode slot")
    model = nnx.merge(graphdef, state)
    P, T = prompt_PT.shape
    n, T_new = params.n, params.max_new_tokens
    B = P * n
    cache = _new_cache(model, min(slots, B), T + T_new)
    logits_PV, prompts = prefill_prompts(model, prompt_PT, mask_PT, cache.dtype)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    out, done_B = _first_tokens(logits_PV, key, params, stops, stop_at_B)
    queue_B = jnp.argsort(done_B.astype(jnp.int32), stable=True)  # requests still to decode first, in order
    ctx = dict(
        model=model,
        layers=None if cache.stacked else model.layer_list(),  # sliced once here, not in every step
        prompts=prompts,
        mask_PT=mask_PT,
        next_pos_P=left_pad_positions(mask_PT)[:, -1] + 1,
        tok0_B=out["tokens"][:, 0],
        queue_B=queue_B,
        pending=jnp.sum(~done_B).astype(jnp.int32),
        key=key,
        params=params,
        stops=stops,
        stop_at_B=stop_at_B,
    )
    N = cache.mask_BS.shape[0]
    init = dict(
        cache=cache.replace(index=jnp.zeros((N,), jnp.int32)),  # per-row write slots, set each step
        req=jnp.full((N,), -1, jnp.int32),  # request in each slot; -1: idle
        step=jnp.zeros((N,), jnp.int32),  # the slot's next token index (tokens [0, step) are emitted)
        tok=jnp.zeros((N,), jnp.int32),  # the slot's last emitted token: the next forward's input
        next=jnp.zeros((), jnp.int32),  # requests queue_B[:next] have been inserted
        out=out,
    )
    return run_slots(ctx, init, _insert, _step)


def run_slots(ctx, init, insert, step):
    """The decode loop of both engines (dense here, paged in paged_engine.py): insert pending
    requests into idle slots, step every slot, until no request is pending or live; then the
    outputs (tokens_BT, mask_BT, logp_BT, lengths_B, finish_B)."""
    c = jax.lax.while_loop(
        lambda c: (c["next"] < ctx["pending"]) | jnp.any(c["req"] >= 0),
        lambda c: step(ctx, insert(ctx, c)),
        init,
    )
    out = c["out"]
    finish = jnp.where(out["stopped"], FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return out["tokens"], out["mask"], out["logp"], out["mask"].sum(-1), finish


def request_keys(key, req_N, step_N):
    """The key of request req_N[s]'s token step_N[s]: fold_in(fold_in(key, r), t), per row."""
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(req_N, step_N)


def _select_rows(logits_NV, keys_N, params: SamplingParams):
    """`select` with one key per row: (tokens [N], their log-probs [N])."""
    tok, logp = jax.vmap(lambda x_V, k: select(x_V[None], k, params))(logits_NV, keys_N)
    return tok[:, 0], logp[:, 0]


def _first_tokens(logits_PV, key, params: SamplingParams, stops, stop_at_B=None):
    """Token 0 of every request, drawn from its prompt's prefill logits, recorded in fresh [B, T]
    outputs. Returns (outputs, done [B]: stopped at token 0 (a stop id or stop_at_B == 1) or
    max_new_tokens == 1)."""
    n, T_new = params.n, params.max_new_tokens
    B = logits_PV.shape[0] * n
    req_B = jnp.arange(B, dtype=jnp.int32)
    tok, logp = _select_rows(jnp.repeat(logits_PV, n, axis=0), request_keys(key, req_B, 0 * req_B), params)
    zeros = jnp.zeros((B, T_new), jnp.int32)
    stopped = jnp.isin(tok, stops)
    if stop_at_B is not None:
        stopped = stopped | (stop_at_B == 1)
    out = dict(
        tokens=zeros.at[:, 0].set(tok),
        mask=zeros.at[:, 0].set(1),
        logp=jnp.zeros((B, T_new), jnp.float32).at[:, 0].set(logp),
        stopped=stopped,
    )
    return out, stopped | (T_new == 1)


def _insert(ctx, c):
    """Puts pending requests (in queue order) into idle slots: the rank of each idle slot among the
    idle slots picks its request. An inserted slot resumes at token 1 (token 0 is drawn already)."""
    idle = c["req"] < 0
    q = c["next"] + jnp.cumsum(idle) - 1
    ins = idle & (q < ctx["pending"])
    req = jnp.where(ins, ctx["queue_B"][jnp.minimum(q, ctx["queue_B"].shape[0] - 1)], c["req"])
    n = ctx["params"].n
    # most steps insert nothing: the copy loop then runs no trip
    cache = _copy_prompts(c["cache"], ctx["prompts"], ctx["mask_PT"], jnp.maximum(req, 0) // n, ins)
    return dict(
        c,
        cache=cache,
        req=req,
        step=jnp.where(ins, 1, c["step"]),
        tok=jnp.where(ins, ctx["tok0_B"][jnp.maximum(req, 0)], c["tok"]),
        next=c["next"] + jnp.sum(ins).astype(jnp.int32),
    )


def _copy_prompts(cache: KVCache, prompts: KVCache, mask_PT, prompt_N, ins_N) -> KVCache:
    """Copies prompt prompt_N[s]'s prefilled k/v into slots [0, T) of every inserting row s (ins_N)
    and makes its slot mask the prompt's mask: nothing of the row's previous request stays visible.
    One in-place dynamic_update_slice per inserted row, in a loop of as many trips as rows insert:
    a scatter (or a cond around one) made XLA copy the whole cache every step."""
    ax = cache.kv_axes.index("batch")
    T = mask_PT.shape[1]
    rows_N = jnp.argsort(~ins_N, stable=True)  # inserting rows first
    fresh_PS = jnp.zeros((mask_PT.shape[0], cache.max_len), bool).at[:, :T].set(mask_PT.astype(bool))

    def one(i, c):
        k, v, mask_NS = c
        s = rows_N[i]
        p = prompt_N[s]

        def put(big, part):  # big [.., N, K, S, D]; part [.., P, K, T, D]
            row = jax.lax.dynamic_slice_in_dim(part, p, 1, axis=ax)
            start = (0,) * ax + (s, 0, 0, 0)
            return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), start)

        k = jax.tree.map(put, k, prompts.k)
        v = jax.tree.map(put, v, prompts.v)
        mask_NS = jax.lax.dynamic_update_slice(mask_NS, fresh_PS[p][None], (s, 0))
        return k, v, mask_NS

    k, v, mask_NS = jax.lax.fori_loop(0, jnp.sum(ins_N).astype(jnp.int32), one, (cache.k, cache.v, cache.mask_BS))
    return cache.replace(k=k, v=v, mask_BS=mask_NS)


def _step(ctx, c):
    """One decode step of every slot: forward each slot's last token at its own position, draw the
    next token with its request's key, record it at (request, step) and free the finished slots."""
    live = c["req"] >= 0
    req = jnp.maximum(c["req"], 0)  # idle slots compute on request 0's numbers and record nothing
    step = c["step"]
    T = ctx["mask_PT"].shape[1]
    params = ctx["params"]
    pos = ctx["next_pos_P"][req // params.n] + step - 1  # the RoPE position of token step - 1
    cache = c["cache"].replace(index=jnp.where(live, T + step - 1, 0).astype(jnp.int32))
    logits, cache = _decode_step(ctx["model"], ctx["layers"], c["tok"], pos, cache)
    tok, logp = _select_rows(logits, request_keys(ctx["key"], req, step), params)
    # a forced stop (stop_at_B): this step's token is the request's stop_at-th
    forced = None if ctx["stop_at_B"] is None else ctx["stop_at_B"][req] == step + 1
    out, hit = _record(c["out"], jnp.where(live, req, -1), step, tok, logp, ctx["stops"], forced)
    done = hit | (step + 1 >= params.max_new_tokens)
    return dict(
        c,
        cache=cache,
        out=out,
        tok=tok,
        step=jnp.where(live, step + 1, step),
        req=jnp.where(live & done, -1, c["req"]),
    )


def _record(out, req_N, step_N, tok_N, logp_N, stops, forced_N=None):
    """Writes each slot's token at (its request, its step) of the [B, T] outputs; slots with
    request -1 are pointed out of range and dropped. forced_N (bool [N] or None): slots whose token
    ends the request as a stop id would. Returns (outputs, the slots that hit a stop)."""
    live = req_N >= 0
    r = jnp.where(live, req_N, out["tokens"].shape[0])
    hit = jnp.isin(tok_N, stops)
    if forced_N is not None:
        hit = hit | forced_N
    hit = live & hit
    return dict(
        tokens=out["tokens"].at[r, step_N].set(tok_N, mode="drop"),
        mask=out["mask"].at[r, step_N].set(1, mode="drop"),
        logp=out["logp"].at[r, step_N].set(logp_N, mode="drop"),
        stopped=out["stopped"].at[r].set(hit, mode="drop"),
    ), hit
