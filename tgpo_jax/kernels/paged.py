"""Decode attention over a paged KV cache (issue 24, item 2): each row's keys and values live in
pages of a pool shared by all rows, found through the row's page table, and a decode step reads
only the pages a row holds, so it costs what the live rows hold rather than rows x max length.

Layout (the one jax's Pallas TPU `paged_attention` kernel reads; names used below):
- a pool per layer: k and v pages [K, P, page_size, D] (K kv heads, P pages, D head_dim). A stacked
  cache keeps every layer in one [K, L * P, page_size, D] array, layer l's pages at l * P + p: the
  kernel reads the whole array through offset page ids, so no step copies a layer out of it.
- table_NM (int32 [N, M]): row n's token j lives in page table[n, j // page_size], slot
  j % page_size. Page ids are local to the row's page group (below); page 0 of each group is the
  trash page: unallocated table entries point to it, so idle rows (and rows waiting for a page)
  write there and nothing real is overwritten.
- lengths_N (int32 [N]): row n holds tokens [0, lengths[n]); a step writes its new token at
  position lengths[n] and attends to lengths[n] + 1 tokens.
- page groups: on a mesh whose batch axes split the N rows into G shards, the pool's page axis is
  split alike and rows of shard g use only group g's pages, so writes and reads stay on the device
  (under shard_map; `page_groups` says how many groups a mesh gives).

Implementations (`resolve`):
- pallas: jax.experimental.pallas.ops.tpu.paged_attention (TPU; interpret mode off TPU, tests). It
  runs ceil(length / block) blocks per row and kv head. It casts K/V pages to bf16 before its
  matmuls (paged_attention_kernel._maybe_dequantize), so `auto` takes it for bf16 caches only.
- xla: blocks of pages gathered through the table up to the longest row, with an online softmax
  across blocks (CPU, GPU, and fp32 caches on TPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tgpo_jax.kernels.common import MASK_VALUE

LANES = 128  # the kernel's head_dim is a multiple of the TPU's 128 lanes
BLOCK_TOKENS = 512  # tokens per attention block: pages per block = the largest divisor of M within it
IMPLS = ("auto", "pallas", "xla")


def block_pages(M: int, page_size: int, tokens: int = BLOCK_TOKENS) -> int:
    """Pages per attention block: the largest divisor of M (the kernel needs one) of at most
    `tokens` tokens, at least 1."""
    best = 1
    for d in range(1, M + 1):
        if M % d == 0 and d * page_size <= tokens:
            best = d
    return best


def pallas_why_not(platform: str, head_dim: int, page_size: int, dtype) -> str | None:
    """None if `auto` should take the Pallas kernel, else why not."""
    if platform != "tpu":
        return f"the paged Pallas kernel is a TPU kernel; the mesh is on {platform}"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"the kernel computes in bf16; the cache is {jnp.dtype(dtype).name}"
    if head_dim % LANES:
        return f"head_dim {head_dim} is not a multiple of {LANES}"
    if page_size % 16:
        return f"page_size {page_size} is not a multiple of 16 (a bf16 tile's rows)"
    return None


def resolve(impl: str, platform: str, head_dim: int, page_size: int, dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"paged attention impl {impl!r}; accepted: {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if pallas_why_not(platform, head_dim, page_size, dtype) is None else "xla"
    return impl


def token_pages(table_NM: jax.Array, pos_N: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """(page [N], slot [N]) of each row's token at position pos_N (clipped to the table's end)."""
    page = jnp.take_along_axis(table_NM, (pos_N // page_size)[:, None], axis=1, mode="clip")[:, 0]
    return page, pos_N % page_size


def write_tokens(k_KPSD: jax.Array, new_NKD: jax.Array, page_N: jax.Array, slot_N: jax.Array) -> jax.Array:
    """Writes row n's new key into (page_N[n], slot_N[n]) of the pool, in place. Every update is one
    [D] row indexed by (kv head, page, slot): with D, the minor dimension, as the scatter's only
    window the pool stays row-major (the kernel's layout). A scatter whose window also spans K
    made the TPU compiler lay the pool out K-minor and copy it back for the kernel in every layer
    of every step."""
    K, N = k_KPSD.shape[0], page_N.shape[0]
    head_KN = jnp.broadcast_to(jnp.arange(K, dtype=page_N.dtype)[:, None], (K, N))
    page_KN, slot_KN = (jnp.broadcast_to(x[None, :], (K, N)) for x in (page_N, slot_N))
    new = jnp.swapaxes(new_NKD, 0, 1).astype(k_KPSD.dtype)  # [K, N, D]
    return k_KPSD.at[head_KN, page_KN, slot_KN].set(new, mode="drop")


def xla_attention(q_NHD, k_KPSD, v_KPSD, lengths_N, table_NM, pages_per_block: int) -> jax.Array:
    """Grouped-query attention of one query per row over tokens [0, lengths[n]) of its pages:
    blocks of `pages_per_block` pages, gathered through the table, up to the longest row only.
    A row of length 0 returns zeros (as the Pallas kernel does)."""
    N, H, D = q_NHD.shape
    K, _, S, _ = k_KPSD.shape
    M = table_NM.shape[1]
    bp = pages_per_block
    # batch dims (k, n) leading both operands: the canonical batched matmul (XLA:CPU runs no
    # bf16 x bf16 -> fp32 dot in another order)
    q_KNGD = q_NHD.reshape(N, K, H // K, D).transpose(1, 0, 2, 3)
    scale = 1.0 / math.sqrt(D)

    def body(j, carry):
        m, denom, acc = carry
        pages_NB = jax.lax.dynamic_slice_in_dim(table_NM, j * bp, bp, axis=1)
        kb, vb = (x[:, pages_NB].reshape(K, N, bp * S, D) for x in (k_KPSD, v_KPSD))  # [K, N, T, D]
        s = jnp.einsum("kngd,kntd->kngt", q_KNGD, kb, preferred_element_type=jnp.float32) * scale
        live_NT = (j * bp * S + jnp.arange(bp * S)[None] < lengths_N[:, None])[:, None]  # [N, 1, T]
        s = jnp.where(live_NT, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(live_NT, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("kngt,kntd->kngd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, denom * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    G = H // K
    init = (
        jnp.full((K, N, G), -jnp.inf, jnp.float32),
        jnp.zeros((K, N, G), jnp.float32),
        jnp.zeros((K, N, G, D), jnp.float32),
    )
    blocks = jnp.minimum((jnp.max(lengths_N) + bp * S - 1) // (bp * S), M // bp)
    _, denom, acc = jax.lax.fori_loop(0, blocks, body, init)
    out = acc / jnp.maximum(denom, 1e-30)[..., None]  # length-0 rows: 0 / tiny = 0
    return out.transpose(1, 0, 2, 3).reshape(N, H, D).astype(q_NHD.dtype)


def pallas_attention(q_NHD, k_KPSD, v_KPSD, lengths_N, table_NM, pages_per_block: int, interpret: bool):
    """The same attention through the Pallas TPU kernel (which applies no softmax scale: q is
    scaled here, in fp32, as the reference scales the scores)."""
    # imported here: Pallas is a heavy import, and only the TPU path needs it
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    q = (q_NHD.astype(jnp.float32) * (1.0 / math.sqrt(q_NHD.shape[-1]))).astype(q_NHD.dtype)

    def call():
        return paged_attention(q, k_KPSD, v_KPSD, lengths_N, table_NM, pages_per_compute_block=pages_per_block)

    if interpret:
        with pltpu.force_tpu_interpret_mode():
            return call()
    return call()


def local_step(q_NHD, new_k_NKD, new_v_NKD, k_pool, v_pool, lengths_N, table_NM, first_page, *, impl, interpret):
    """One decode step of one device's rows: writes each row's new key and value at position
    lengths[n], then attends over its lengths[n] + 1 tokens. first_page: the page id offset of this
    layer in a stacked pool (0 for a per-layer pool). Returns (out [N, H, D], k_pool, v_pool)."""
    page_size = k_pool.shape[2]
    table = table_NM + first_page
    page_N, slot_N = token_pages(table, lengths_N, page_size)
    k_pool = write_tokens(k_pool, new_k_NKD, page_N, slot_N)
    v_pool = write_tokens(v_pool, new_v_NKD, page_N, slot_N)
    bp = block_pages(table.shape[1], page_size)
    if impl == "pallas":
        out = pallas_attention(q_NHD, k_pool, v_pool, lengths_N + 1, table, bp, interpret)
    else:
        out = xla_attention(q_NHD, k_pool, v_pool, lengths_N + 1, table, bp)
    return out, k_pool, v_pool


def page_groups(sharding, rows: int, pages: int) -> int:
    """How many page groups the mesh's batch axes give: the batch shards where they divide both
    the rows and the pages per layer, else 1 (rows and pages replicated)."""
    if sharding is None or sharding.mesh.size == 1:
        return 1
    from tgpo_jax.sharding.rules import axis_size

    n = axis_size(sharding.mesh, sharding.rules.spec(("batch",))[0])
    return n if rows % n == 0 and pages % n == 0 else 1


def _specs(sharding, H: int, K: int, groups: int):
    """(query spec, pool spec, row spec): rows and page groups over the batch axes (when groups > 1),
    query and kv heads over their axes when both split alike."""
    rules, mesh = sharding.rules, sharding.mesh
    from tgpo_jax.sharding.rules import axis_size

    b = rules.spec(("batch",))[0] if groups > 1 else None
    h, kh = rules.spec(("act_heads",))[0], rules.spec(("act_kv_heads",))[0]
    n = axis_size(mesh, h)
    heads = h if h is not None and h == kh and H % n == 0 and K % n == 0 else None
    return P(b, heads, None), P(heads, b, None, None), P(b)


def decode_step(
    q_NHD,
    new_k_NKD,
    new_v_NKD,
    k_pool,
    v_pool,
    lengths_N,
    table_NM,
    first_page=0,
    *,
    platform,
    sharding,
    groups=None,
    impl="auto",
):
    """`local_step` on one device, or under shard_map on a mesh (rows, page groups and heads split
    as `_specs` says; a kernel call cannot be partitioned by GSPMD, and the pages a row writes and
    reads are on its own device). groups: the cache's page groups (None: `page_groups`).
    Returns (out [N, H, D], k_pool, v_pool)."""
    K, _, page_size, D = k_pool.shape
    name = resolve(impl, platform, D, page_size, k_pool.dtype)
    step = lambda *a: local_step(*a, impl=name, interpret=platform != "tpu")  # noqa: E731
    first = jnp.asarray(first_page, jnp.int32)
    if sharding is None or sharding.mesh.size == 1:
        return step(q_NHD, new_k_NKD, new_v_NKD, k_pool, v_pool, lengths_N, table_NM, first)
    N, H, _ = q_NHD.shape
    groups = page_groups(sharding, N, k_pool.shape[1]) if groups is None else groups
    qs, pool, rows = _specs(sharding, H, K, groups)
    kvs = P(rows[0], qs[1], None)
    in_specs = (qs, kvs, kvs, pool, pool, rows, P(rows[0], None), P())
    fn = jax.shard_map(step, mesh=sharding.mesh, in_specs=in_specs, out_specs=(qs, pool, pool), check_vma=False)
    return fn(q_NHD, new_k_NKD, new_v_NKD, k_pool, v_pool, lengths_N, table_NM, first)
