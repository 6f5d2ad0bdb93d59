"""Page allocation of the paged KV cache, inside the engine's jitted loop (rollout/paged_engine.py).

Pages are taken as rows grow: a request gets the pages of its prompt and first token when it takes
a slot, then one page each time its length crosses a page boundary, and gives all back when it
stops. The pool is therefore sized by the tokens in flight, not by slots x (prompt + max_new_tokens):
`rollout.kv_pages` may be far below the worst case.

A pool smaller than the worst case can run dry while every row still needs pages (a deadlock if
rows just waited). Grants therefore keep the pool in a safe state (the banker's algorithm with one
resource): ordering the live rows by age (insertion order), every row i could still finish if the
older ones finished first and freed their pages:
    slack_i = free + (pages held by rows older than i) - (pages row i may still need) >= 0.
Granting g pages to row k lowers slack_i by g for every row i older than k and leaves the others
unchanged, so a grant is safe iff min over older rows of their slack, less the grants already
given between them and k, is >= g. The oldest row is always granted, so the loop always progresses;
a row that is refused a page skips the step (its output is dropped and recomputed next step,
the same token, as draws are keyed by request and token index). A new request joins as the
youngest row, in queue order; the first refusal stops grants to every younger row (FIFO).

Groups: rows of page group g (kernels/paged.py) take pages of group g only; each group runs this
independently (vmapped), with local page ids 1..P-1 (page 0 is the trash page).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

BIG = 2**30  # the key of an idle row, the slack of a row that constrains nothing


@flax.struct.dataclass
class PagePool:
    free_GU: jax.Array  # int32 [G, P - 1]: each group's free local page ids, a stack valid in [0, count)
    count_G: jax.Array  # int32 [G]
    held_N: jax.Array  # int32 [N]: row n holds pages table[n, :held[n]]
    need_N: jax.Array  # int32 [N]: the pages its request may need in all (0: idle)
    seq_N: jax.Array  # int32 [N]: its request's insertion number (its age); BIG: idle


def new_pool(groups: int, pages: int, rows: int) -> PagePool:
    free = jnp.broadcast_to(jnp.arange(1, pages, dtype=jnp.int32), (groups, pages - 1))
    zeros = jnp.zeros((rows,), jnp.int32)
    return PagePool(free, jnp.full((groups,), pages - 1, jnp.int32), zeros, zeros, zeros + BIG)


def pages_for(tokens, page_size: int):
    return (tokens + page_size - 1) // page_size


def _group_grant(count, key_n, want_n, held_n, rem_n):
    """One group's safe grants: (granted [n], stack start [n]: a granted row takes the stack's
    entries [start, start + want)). Rows are visited by key (age; BIG: idle, wants nothing)."""
    order = jnp.argsort(key_n, stable=True)
    w, h, r = want_n[order], held_n[order], rem_n[order]
    slack = jnp.where(key_n[order] < BIG, count + jnp.cumsum(h) - h - r, BIG)
    gcum = jnp.cumsum(w)
    # min over older rows i of slack_i - (grants to rows after i up to k) = min_i(slack_i + gcum_i) - gcum_k
    older = jnp.concatenate([jnp.full((1,), BIG, jnp.int32), jax.lax.cummin(slack + gcum)[:-1]])
    ok = (older >= gcum) & (count >= gcum) & (slack >= 0)
    refused = (w > 0) & ~ok
    granted = (w > 0) & (jnp.cumsum(refused) == 0)  # no grant after the first refusal
    inverse = jnp.argsort(order)
    return granted[inverse], (count - gcum)[inverse]


def _group_take(free_U, count, table_nM, held_n, granted_n, start_n, want_n, max_want: int):
    """Pops the granted pages off the group's stack into the rows' tables at [held, held + want)."""
    n, M = table_nM.shape
    j = jnp.arange(max_want)[None]
    take = granted_n[:, None] & (j < want_n[:, None])
    page = free_U[jnp.clip(start_n[:, None] + j, 0, free_U.shape[0] - 1)]
    col = jnp.where(take, held_n[:, None] + j, M)  # M: out of range, dropped
    table = table_nM.at[jnp.arange(n)[:, None], col].set(page, mode="drop")
    taken = jnp.sum(jnp.where(granted_n, want_n, 0))
    return table, count - taken, held_n + jnp.where(granted_n, want_n, 0)


def grant(pool: PagePool, table_NM, key_N, want_N, rem_N, candidate_N, rank_N, max_want: int):
    """Grants pages to the rows that want them (want_N: 1 for a live row crossing a page boundary,
    its first pages for a new request in an idle row), safely and oldest first, then cuts the new
    requests at the first refused one over all groups (queue order). Returns (granted [N], pool,
    table)."""
    G = pool.count_G.shape[0]
    grouped = lambda x: x.reshape(G, -1, *x.shape[1:])  # noqa: E731
    held = grouped(pool.held_N)
    granted, start = jax.vmap(_group_grant)(pool.count_G, grouped(key_N), grouped(want_N), held, grouped(rem_N))
    granted = granted.reshape(-1)
    refused_new = candidate_N & (want_N > 0) & ~granted
    cut = jnp.min(jnp.where(refused_new, rank_N, BIG))
    granted = granted & ~(candidate_N & (rank_N >= cut))
    take = jax.vmap(lambda *a: _group_take(*a, max_want=max_want))
    table, count, held = take(
        pool.free_GU, pool.count_G, grouped(table_NM), held, grouped(granted), start, grouped(want_N)
    )
    return granted, pool.replace(count_G=count, held_N=held.reshape(-1)), table.reshape(table_NM.shape)


def _group_release(free_U, count, table_nM, held_n, done_n):
    c = jnp.where(done_n, held_n, 0)
    offset = count + jnp.cumsum(c) - c
    j = jnp.arange(table_nM.shape[1])[None]
    pos = jnp.where(j < c[:, None], offset[:, None] + j, free_U.shape[0])  # past the stack: dropped
    return free_U.at[pos].set(table_nM, mode="drop"), count + jnp.sum(c)


def release(pool: PagePool, table_NM, done_N):
    """Pushes the pages of the rows that stopped back onto their group's stack; their tables point
    at the trash page again. Returns (pool, table)."""
    G = pool.count_G.shape[0]
    grouped = lambda x: x.reshape(G, -1, *x.shape[1:])  # noqa: E731
    free, count = jax.vmap(_group_release)(
        pool.free_GU, pool.count_G, grouped(table_NM), grouped(pool.held_N), grouped(done_N)
    )
    zero = lambda x: jnp.where(done_N, 0, x)  # noqa: E731
    pool = pool.replace(
        free_GU=free,
        count_G=count,
        held_N=zero(pool.held_N),
        need_N=zero(pool.need_N),
        seq_N=jnp.where(done_N, BIG, pool.seq_N),
    )
    return pool, jnp.where(done_N[:, None], 0, table_NM)
