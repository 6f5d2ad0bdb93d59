"""The authors' dynamic micro-batches on the host (objectives/token_budget.py), against partitions
worked out by hand step by step (largest differencing with veRL's tie-breaks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgpo_jax.objectives.token_budget import authors_mini_batches, largest_differencing, micro_batches


def test_largest_differencing_any_size_hand_worked():
    """[8, 7, 6, 5, 4] into 2 (rows 0..4). Singletons pop largest first: {8} + {7} -> [8 | 7];
    {6} + {5} -> [6 | 5]; then {4} (spread 4) with [8 | 7] (spread 1, the larger first set of the
    two tied states): {4} takes 7 -> [11 | 8]; [11 | 8] (spread 3) with [6 | 5]: 11 takes 5, 8 takes
    6 -> [16 | 14]. Not the optimum 15 | 15 ({8, 7} | {6, 5, 4}): it is the heuristic veRL runs."""
    parts = largest_differencing([8, 7, 6, 5, 4], 2, equal_size=False)
    assert parts == [[1, 3, 4], [0, 2]]


def test_largest_differencing_equal_size_hand_worked():
    """[1..6] into 2 equal sets: seeded in ascending pairs [2 | 1], [4 | 3], [6 | 5] (all spread 1;
    the larger first set pops first): [6 | 5] + [4 | 3] -> [6+3 | 5+4], the tie of sums broken by
    the item lists ((5, 6) > (4, 5)); [2 | 1] (spread 1) + [9 | 9]: 2 takes {5, 4}, 1 takes {6, 3}
    -> [11 | 10]."""
    parts = largest_differencing([1, 2, 3, 4, 5, 6], 2, equal_size=True)
    assert parts == [[1, 3, 4], [0, 2, 5]]
    assert [sum(np.array([1, 2, 3, 4, 5, 6])[p]) for p in parts] == [11, 10]


def test_largest_differencing_rejects_impossible_splits():
    with pytest.raises(ValueError, match="cannot split 2 rows into 3"):
        largest_differencing([5, 5], 3, equal_size=False)
    with pytest.raises(ValueError, match="5 rows do not split into 2 equal-sized sets"):
        largest_differencing([1, 2, 3, 4, 5], 2, equal_size=True)


def test_micro_batches_count_is_the_token_budget_ceiling():
    assert micro_batches([8, 7, 6, 5, 4], 16) == [[1, 3, 4], [0, 2]]  # 30 tokens / 16: 2 micro-batches
    assert micro_batches([8, 7, 6, 5, 4], 30) == [[0, 1, 2, 3, 4]]  # fits in one
    assert sorted(map(len, micro_batches([8, 7, 6, 5, 4], 8))) == [1, 1, 1, 2]  # ceil(30 / 8) = 4
    with pytest.raises(ValueError, match="a sequence of 8 tokens exceeds the micro-batch budget of 7"):
        micro_batches([8, 1], 7)


def test_authors_mini_batches_two_ranks_hand_worked():
    """4 rows of [10, 3, 6, 5] tokens (response [6, 1, 4, 2]) over 2 ranks: seeded [5 | 3] (rows 3,
    1; spread 2) and [10 | 6] (rows 0, 2; spread 4); [10 | 6] + [5 | 3] -> [13 | 11]: rank 0 holds
    rows {0, 1}, rank 1 rows {2, 3}. Budget 10: k = max(ceil(13/10), ceil(11/10)) = 2 micro-batches
    per rank, one row each: denominators 2 ranks x each row's own response tokens. Budget 20:
    k = 1, one micro-batch per rank."""
    seq, resp = np.array([10, 3, 6, 5]), np.array([6, 1, 4, 2])
    [(rows, denom)] = authors_mini_batches(seq, resp, mini_batches=1, budget=10, ranks=2)
    np.testing.assert_array_equal(rows, [0, 1, 2, 3])
    np.testing.assert_array_equal(denom, [12.0, 2.0, 8.0, 4.0])
    [(rows, denom)] = authors_mini_batches(seq, resp, mini_batches=1, budget=20, ranks=2)
    np.testing.assert_array_equal(denom, [14.0, 14.0, 12.0, 12.0])


def test_authors_mini_batches_ranks_pick_the_mini_batch_rows():
    """8 rows, 2 ranks, 2 mini-batches: each rank's balanced set (ascending row ids) is cut in two,
    and mini-batch j is the union of the ranks' j-th halves, not rows [4j, 4j + 4)."""
    seq = np.array([9, 1, 8, 2, 7, 3, 6, 4])
    resp = np.ones(8, int)
    ranks = largest_differencing(seq, 2, equal_size=True)
    assert sorted(len(r) for r in ranks) == [4, 4]
    out = authors_mini_batches(seq, resp, mini_batches=2, budget=100, ranks=2)
    want = [sorted(ranks[0][2 * j : 2 * j + 2] + ranks[1][2 * j : 2 * j + 2]) for j in range(2)]
    assert [r.tolist() for r, _ in out] == want
    assert sorted(np.concatenate([r for r, _ in out]).tolist()) == list(range(8))
    for _, denom in out:  # budget 100: one micro-batch of 2 rows (2 response tokens) per rank
        np.testing.assert_array_equal(denom, 2 * 2.0)


def test_one_rank_is_the_contiguous_split_and_each_micro_batch_weighs_one():
    """ranks = 1: mini-batch j is rows [j*b, (j+1)*b); sum over its rows of response tokens /
    denominator counts its micro-batches (each micro-batch's token mean has total weight 1)."""
    rng = np.random.default_rng(0)
    resp = rng.integers(1, 60, 32)
    seq = resp + rng.integers(5, 20, 32)
    out = authors_mini_batches(seq, resp, mini_batches=2, budget=150)
    for j, (rows, denom) in enumerate(out):
        np.testing.assert_array_equal(rows, np.arange(16 * j, 16 * j + 16))
        k = -(-int(seq[rows].sum()) // 150)
        assert k > 2
        np.testing.assert_allclose((resp[rows] / denom).sum(), k, rtol=1e-6)
        parts = micro_batches(seq[rows], 150)
        for part in parts:  # every row of a micro-batch divides by that micro-batch's response tokens
            np.testing.assert_array_equal(denom[part], resp[rows][part].sum())


def test_iteration_mini_batches_carry_the_plan():
    """train/iteration.py's mini-batches: contiguous slices without a budget (agg_denom_B None);
    with one, the rows and per-row denominators of authors_mini_batches, counted from the masks
    (prompt + response tokens for the budget, response tokens for the denominators)."""
    from tgpo_jax.objectives.batch import Batch
    from tgpo_jax.train.iteration import _mini_batches

    rng = np.random.default_rng(1)
    B, P, T = 16, 6, 12
    prompt_mask = (np.arange(P)[None] >= rng.integers(0, 5, B)[:, None]).astype(np.int32)  # left-padded
    mask = (np.arange(T)[None] < rng.integers(1, T + 1, B)[:, None]).astype(np.int32)
    host = Batch(np.zeros((B, P), np.int32), prompt_mask, np.arange(B * T).reshape(B, T), mask)
    full = jax.tree.map(jnp.asarray, host)
    plain = _mini_batches(full, host, jnp.asarray, 2, 0, 1)
    assert [np.asarray(m.tokens_BT)[:, 0].tolist() for m in plain] == [list(range(0, 96, 12)), list(range(96, 192, 12))]
    assert all(m.agg_denom_B is None for m in plain)
    seq, resp = prompt_mask.sum(-1) + mask.sum(-1), mask.sum(-1)
    for ranks in (1, 2):
        got = _mini_batches(full, host, jnp.asarray, 2, 20, ranks)
        want = authors_mini_batches(seq, resp, mini_batches=2, budget=20, ranks=ranks)
        for m, (rows, denom) in zip(got, want):
            np.testing.assert_array_equal(np.asarray(m.tokens_BT)[:, 0] // T, rows)  # which rows
            np.testing.assert_array_equal(np.asarray(m.agg_denom_B), denom)
        if ranks == 2:
            assert any(not np.array_equal(r, np.arange(r[0], r[0] + 8)) for r, _ in want)  # not contiguous
