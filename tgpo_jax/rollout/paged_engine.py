"""The continuous-batching engine (rollout/engine.py) over a paged KV cache (issue 24, item 2):
`rollout.kv_pages` > 0. Same requests, same queue, same per-request keys, same outputs; what
changes is where a slot's keys and values live.

- The cache is a pool of pages shared by all slots (models/kv_cache.PagedKVCache, layout in
  kernels/paged.py) sized by `kv_pages` (pages per layer in all), not slots x (prompt + max_new).
- A request's prompt is copied compacted: its real tokens only, at positions [0, prompt_len), which
  are also their RoPE positions; token t of the response is written at prompt_len + t. So a row
  holds no pad slots, and its length is all the decode attention needs (no slot mask).
- Pages are taken as rows grow and returned when a request stops (rollout/pages.py: safe grants,
  oldest first, so the loop cannot deadlock when the pool is smaller than the worst case). A row
  refused a page skips the step; an insert waits until the pool can take it.
- Decode attention reads only each row's pages (the Pallas TPU kernel, or the XLA block path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tgpo_jax.kernels import paged as paged_kernels
from tgpo_jax.models.kv_cache import PagedKVCache, scans_cache
from tgpo_jax.rollout import pages as pg
from tgpo_jax.rollout.decode_loop import _decode_step, prefill_prompts
from tgpo_jax.rollout.engine import _first_tokens, _record, _select_rows, request_keys, run_slots
from tgpo_jax.rollout.sampling import SamplingParams


def row_groups(sharding, rows: int) -> int:
    """Page groups: the batch shards where they divide the rows, else 1 (kernels/paged.py)."""
    if sharding is None or sharding.mesh.size == 1:
        return 1
    from tgpo_jax.sharding.rules import axis_size

    n = axis_size(sharding.mesh, sharding.rules.spec(("batch",))[0])
    return n if rows % n == 0 else 1


def pages_per_group(kv_pages: int, groups: int, page_size: int, max_tokens: int) -> int:
    """Pages of each group (and layer), the trash page included; raises when one request of
    max_tokens tokens could not fit a group (the engine would wait for it forever)."""
    per = -(-kv_pages // groups)
    need = pg.pages_for(max_tokens, page_size)
    if per - 1 < need:
        raise ValueError(
            f"rollout.kv_pages={kv_pages}: {groups} page group(s) of {per} pages (one a trash page) of "
            f"{page_size} tokens cannot hold one request of {max_tokens} tokens ({need} pages); "
            f"need kv_pages >= {groups * (need + 1)}"
        )
    return per


def _new_cache(model, rows: int, kv_pages: int, page_size: int, max_len: int) -> PagedKVCache:
    sh = model.sharding
    G = row_groups(sh, rows)
    per = pages_per_group(kv_pages, G, page_size, max_len - 1)  # the last token is never written
    cache = PagedKVCache.init(model.cfg, rows, per, page_size, max_len, G)
    if sh is None:
        return cache
    axes = cache.kv_axes if G > 1 else (cache.kv_axes[0], None, None, None)
    k, v = (jax.tree.map(lambda x: sh.constrain(x, axes), t) for t in (cache.k, cache.v))
    return cache.replace(k=k, v=v)


def paged_engine_fn(
    graphdef,
    state,
    prompt_PT,
    mask_PT,
    key,
    *,
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    slots: int,
    kv_pages: int,
    page_size: int,
    stop_at_B=None,
):
    """engine.engine_fn over a paged cache of kv_pages pages of page_size tokens (per layer)."""
    if slots < 1:
        raise ValueError(f"slots={slots}: the engine needs at least one decode slot")
    model = nnx.merge(graphdef, state)
    P, T = prompt_PT.shape
    n, T_new = params.n, params.max_new_tokens
    N = min(slots, P * n)
    cache = _new_cache(model, N, kv_pages, page_size, T + T_new)
    logits_PV, prompts = prefill_prompts(model, prompt_PT, mask_PT, cache.dtype)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    out, done_B = _first_tokens(logits_PV, key, params, stops, stop_at_B)
    ctx = dict(
        model=model,
        layers=None if scans_cache(model.cfg) else model.layer_list(),
        prompts=prompts,
        len_P=jnp.sum(mask_PT, axis=1).astype(jnp.int32),
        T=T,
        tok0_B=out["tokens"][:, 0],
        queue_B=jnp.argsort(done_B.astype(jnp.int32), stable=True),
        pending=jnp.sum(~done_B).astype(jnp.int32),
        key=key,
        params=params,
        stops=stops,
        stop_at_B=stop_at_B,
    )
    init = dict(
        cache=cache,
        pool=pg.new_pool(cache.index.groups, cache.index.pages, N),
        req=jnp.full((N,), -1, jnp.int32),
        step=jnp.zeros((N,), jnp.int32),
        tok=jnp.zeros((N,), jnp.int32),
        run=jnp.zeros((N,), bool),
        next=jnp.zeros((), jnp.int32),
        out=out,
    )
    return run_slots(ctx, init, _insert, _step)


def _positions(ctx, req_N, step_N):
    """Each live row's write position this step (= the RoPE position of token step - 1)."""
    return ctx["len_P"][jnp.maximum(req_N, 0) // ctx["params"].n] + step_N - 1


def _insert(ctx, c):
    """Grants this step's pages (rows crossing a page boundary, new requests in idle slots, in
    queue order) and inserts the admitted requests: their prompt's k/v copied into their pages.
    Sets c["run"]: the rows that decode this step (live and not refused a page)."""
    params, ps = ctx["params"], c["cache"].page_size
    live, pool = c["req"] >= 0, c["pool"]
    idle = ~live
    rank = jnp.cumsum(idle) - 1  # an idle slot's rank among the idle slots
    q = c["next"] + rank
    cand = idle & (q < ctx["pending"])
    req_new = ctx["queue_B"][jnp.clip(q, 0, ctx["queue_B"].shape[0] - 1)]
    len_new = ctx["len_P"][req_new // params.n]
    pos = _positions(ctx, c["req"], c["step"])
    want = jnp.where(live, (pos // ps >= pool.held_N).astype(jnp.int32), 0)
    want = jnp.where(cand, pg.pages_for(len_new + 1, ps), want)  # the prompt and the first new token
    need_new = pg.pages_for(len_new + params.max_new_tokens - 1, ps)
    rem = jnp.where(cand, need_new, pool.need_N - pool.held_N)
    key = jnp.where(live, pool.seq_N, jnp.where(cand, q, pg.BIG))
    max_want = pg.pages_for(ctx["T"] + 1, ps)
    cache = c["cache"]
    granted, pool, table = pg.grant(pool, cache.index.table_NM, key, want, rem, cand, rank, max_want)
    ins = cand & granted
    pool = pool.replace(need_N=jnp.where(ins, need_new, pool.need_N), seq_N=jnp.where(ins, q, pool.seq_N))
    cache = cache.replace(index=cache.index.replace(table_NM=table))
    cache = _copy_prompts(cache, ctx["prompts"], ctx["len_P"], req_new // params.n, ins)
    return dict(
        c,
        cache=cache,
        pool=pool,
        req=jnp.where(ins, req_new, c["req"]),
        step=jnp.where(ins, 1, c["step"]),
        tok=jnp.where(ins, ctx["tok0_B"][req_new], c["tok"]),
        next=c["next"] + jnp.sum(ins).astype(jnp.int32),
        run=ins | (live & ((want == 0) | granted)),
    )


def _prompt_targets(cache: PagedKVCache, row, length, T: int):
    """(global page [T], slot [T]) of a prompt's T left-padded slots in row `row`'s pages: real
    token t (t >= T - length) goes to position t - (T - length); pads to a page past the pool
    (dropped). Per layer; a stacked pool adds layer * pages to the page."""
    idx = cache.index
    j = jnp.arange(T) - (T - length)
    local = idx.table_NM[row, jnp.clip(j, 0) // cache.page_size]
    layers = jax.tree.leaves(cache.k)[0].shape[1] // (idx.groups * idx.pages)  # 1 per layer, L stacked
    group = row // (idx.table_NM.shape[0] // idx.groups)
    page = group * layers * idx.pages + local
    return jnp.where(j >= 0, page, jax.tree.leaves(cache.k)[0].shape[1] * 2), j % cache.page_size


def _copy_prompts(cache: PagedKVCache, prompts, len_P, prompt_N, ins_N) -> PagedKVCache:
    """Copies prompt prompt_N[s]'s prefilled k/v, compacted, into the pages of every inserting row
    s: one in-place scatter per inserted row and pool, in a loop of as many trips as rows insert."""
    T = jax.tree.leaves(prompts.k)[0].shape[-2]
    rows_N = jnp.argsort(~ins_N, stable=True)  # inserting rows first
    pages = cache.index.pages

    def one(i, kv):
        k, v = kv
        s = rows_N[i]
        p = prompt_N[s]
        page_T, slot_T = _prompt_targets(cache, s, len_P[p], T)

        def put(pool, part):  # pool [K, pages, S, D]; part [P, K, T, D] or stacked [L, P, K, T, D]
            src = part[p] if part.ndim == 4 else jnp.swapaxes(part[:, p], 0, 1)  # [K, T, D] / [K, L, T, D]
            L = 1 if part.ndim == 4 else part.shape[0]
            page_LT = page_T[None] + (jnp.arange(L) * pages)[:, None]
            slot_LT = jnp.broadcast_to(slot_T, page_LT.shape)
            # as paged.write_tokens: one row per (kv head, token), D the only window (row-major pool)
            new = src.reshape(src.shape[0], L * T, -1).swapaxes(0, 1)  # [L * T, K, D]
            return paged_kernels.write_tokens(pool, new, page_LT.reshape(-1), slot_LT.reshape(-1))

        return jax.tree.map(put, k, prompts.k), jax.tree.map(put, v, prompts.v)

    k, v = jax.lax.fori_loop(0, jnp.sum(ins_N).astype(jnp.int32), one, (cache.k, cache.v))
    return cache.replace(k=k, v=v)


def _step(ctx, c):
    """One decode step of every slot; rows not in c["run"] (idle, or refused a page) compute on
    and record nothing. Stopped requests give their pages back."""
    live, run = c["req"] >= 0, c["run"]
    req = jnp.maximum(c["req"], 0)
    step, params = c["step"], ctx["params"]
    pos = jnp.where(live, _positions(ctx, c["req"], step), 0)
    cache = c["cache"]
    cache = cache.replace(index=cache.index.replace(lengths_N=pos))
    logits, cache = _decode_step(ctx["model"], ctx["layers"], c["tok"], pos, cache)
    tok, logp = _select_rows(logits, request_keys(ctx["key"], req, step), params)
    forced = None if ctx["stop_at_B"] is None else ctx["stop_at_B"][req] == step + 1
    out, hit = _record(c["out"], jnp.where(run, req, -1), step, tok, logp, ctx["stops"], forced)
    done = run & (hit | (step + 1 >= params.max_new_tokens))
    pool, table = pg.release(c["pool"], cache.index.table_NM, done)
    cache = cache.replace(index=cache.index.replace(table_NM=table))
    return dict(
        c,
        cache=cache,
        pool=pool,
        out=out,
        tok=jnp.where(run, tok, c["tok"]),
        step=jnp.where(run, step + 1, step),
        req=jnp.where(done, -1, c["req"]),
    )
