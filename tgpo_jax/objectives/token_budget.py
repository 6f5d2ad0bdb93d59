"""The authors' dynamic micro-batches (veRL `use_dynamic_bsz`), reproduced on the host so that a
fixed-shape train step gives their loss exactly (`train.micro_batch_tokens`, loss_agg
microbatch_sum; docs/objectives.md).

What their trainer (a veRL 0.1 copy inside LUFFY: verl/utils/seqlen_balancing.py and
mix_src/mix_actor.py) does with a rollout batch, with token counts = prompt + response tokens
(attention_mask) per sequence:
  1. with R data-parallel ranks, the batch is split into R equal-sized row sets balanced by token
     count (`_balance_batch`: largest differencing, equal sizes); rank r takes set r, its row
     indices ascending, and cuts it into its `mini_batches` contiguous mini-batches;
  2. per mini-batch, every rank makes k = max over ranks of ceil(its tokens / budget) micro-batches
     (`rearrange_micro_batches`: largest differencing into k sets of any size);
  3. each micro-batch's loss is a token mean over ITS response tokens; the micro-batch losses are
     summed (their gradient_accumulation divisor is 1) and the gradients averaged over ranks.
So sequence i contributes sum_t loss_t / (R * n_i), n_i = the response tokens of its micro-batch:
the loss depends only on which rows share a micro-batch, and per-row denominators R * n_i give it
whatever the physical micro-batch split of our step.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


class _Bin:
    """One set under construction: its items (row index, length) in insertion order and their sum."""

    __slots__ = ("items", "total")

    def __init__(self):
        self.items: list[tuple[int, int]] = []
        self.total = 0

    def add(self, idx: int, length: int) -> None:
        self.items.append((idx, length))
        self.total += length

    def order_key(self):
        # veRL's set order: by sum, then item count, then the item list itself
        return self.total, len(self.items), self.items


class _Partial:
    """k bins, kept in descending `order_key` order (a stable sort, as Python's sorted(reverse=True))."""

    __slots__ = ("bins",)

    def __init__(self, items: Sequence[tuple[int, int]], k: int):
        self.bins = [_Bin() for _ in range(k)]
        for b, (idx, length) in zip(self.bins, items):
            b.add(idx, length)
        self._sort()

    def _sort(self) -> None:
        self.bins.sort(key=_Bin.order_key, reverse=True)

    @property
    def spread(self) -> int:
        return self.bins[0].total - self.bins[-1].total

    def absorb(self, other: _Partial) -> None:
        """The differencing step: this one's largest bin takes the other's smallest, and so on."""
        for mine, theirs in zip(self.bins, reversed(other.bins)):
            for idx, length in theirs.items:
                mine.add(idx, length)
        self._sort()

    def __lt__(self, other: _Partial) -> bool:
        # heapq pops the "smallest": here the largest spread, ties to the larger first bin
        if self.spread != other.spread:
            return self.spread > other.spread
        return other.bins[0].order_key() < self.bins[0].order_key()


def largest_differencing(lengths: Sequence[int], k: int, equal_size: bool) -> list[list[int]]:
    """Karmarkar-Karp (largest differencing) partition of row indices into k sets balanced by the
    sum of `lengths`, with veRL's order of operations and tie-breaks (get_seqlen_balanced_partitions):
    each set's indices ascending, sets in the algorithm's final order. equal_size: every set gets
    len(lengths) / k rows (rows are seeded k at a time in ascending length)."""
    n = len(lengths)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} rows into {k} non-empty sets")
    if equal_size and n % k:
        raise ValueError(f"{n} rows do not split into {k} equal-sized sets")
    ascending = sorted((int(length), i) for i, length in enumerate(lengths))
    group = k if equal_size else 1
    heap = []
    for start in range(0, n, group):
        heapq.heappush(heap, _Partial([(i, length) for length, i in ascending[start : start + group]], k))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.absorb(second)
        heapq.heappush(heap, first)
    sets = [sorted(idx for idx, _ in b.items) for b in heap[0].bins]
    if any(not s for s in sets):
        raise ValueError(f"largest differencing left an empty set splitting {n} rows into {k}")
    return sets


def micro_batches(lengths: Sequence[int], budget: int, k: int | None = None) -> list[list[int]]:
    """veRL's rearrange_micro_batches on one rank's mini-batch: k = ceil(sum(lengths) / budget)
    micro-batches (or the given k: the maximum over ranks) balanced by token count."""
    if max(lengths) > budget:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the micro-batch budget of {budget}")
    k = -(-int(sum(lengths)) // budget) if k is None else k
    return largest_differencing(lengths, k, equal_size=False)


def authors_mini_batches(
    seq_len_B: np.ndarray, resp_len_B: np.ndarray, *, mini_batches: int, budget: int, ranks: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The authors' mini-batches of a rollout batch and each row's aggregation denominator.

    seq_len_B: prompt + response tokens of each row (what the budget counts); resp_len_B: response
    tokens (what each micro-batch's token mean divides by). Returns, per optimizer step j, (rows_b:
    the rows of mini-batch j, denom_b: ranks * the response tokens of each row's micro-batch).
    With ranks = 1 mini-batch j is rows [j*b, (j+1)*b), the contiguous split."""
    B = len(seq_len_B)
    if B % (ranks * mini_batches):
        raise ValueError(f"{B} rows do not split into {ranks} ranks x {mini_batches} mini-batches")
    per_rank = largest_differencing(seq_len_B, ranks, equal_size=True) if ranks > 1 else [list(range(B))]
    rows_per = B // (ranks * mini_batches)
    out = []
    for j in range(mini_batches):
        shards = [np.asarray(rank_rows[j * rows_per : (j + 1) * rows_per]) for rank_rows in per_rank]
        k = max(-(-int(seq_len_B[s].sum()) // budget) for s in shards)  # veRL: all-reduce MAX over ranks
        rows, denoms = [], []
        for s in shards:
            for part in micro_batches(seq_len_B[s], budget, k):
                members = s[part]
                rows.append(members)
                denoms.append(np.full(len(members), ranks * float(resp_len_B[members].sum())))
        rows_b, denom_b = np.concatenate(rows), np.concatenate(denoms)
        order = np.argsort(rows_b, kind="stable")  # rows ascending: a contiguous slice when ranks = 1
        out.append((rows_b[order], denom_b[order].astype(np.float32)))
    return out
