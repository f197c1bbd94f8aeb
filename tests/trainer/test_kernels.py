"""The compiled loops of a training step: the products they replace, whatever the thread count."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from trainer.kernels import adam_rows, sum_rows


def test_row_sums_are_the_csr_product_with_any_thread_count() -> None:
    rng = np.random.default_rng(0)
    dense = (rng.random((50, 300)) < 0.05).astype(np.float32)
    dense[7] = 0  # an empty bag sums to zeros
    pool = sparse.csr_matrix(dense)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    results = []
    for threads in (1, 2):  # the plain loop and the threaded one
        results.append(sum_rows(threads, pool.indptr, pool.indices, vectors))
    np.testing.assert_allclose(results[0], pool @ vectors, rtol=1e-5, atol=1e-5)
    assert np.array_equal(results[0], results[1]) and not results[0][7].any()


def test_adam_on_rows_is_the_same_plain_and_threaded() -> None:
    """The one-thread (plain) compilation and the threaded one update every row bit for bit alike,
    rows touched several times included (their gradients summed in order)."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((40, 8)).astype(np.float32)
    touched = rng.integers(0, 40, 60)  # repeats: some rows get several gradient rows
    order = np.argsort(touched, kind="stable")
    ordered = touched[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ordered)) + 1, [ordered.size]))
    values = rng.standard_normal((60, 8)).astype(np.float32)
    results = []
    for threads in (1, 2):
        w, m, v = weight.copy(), np.zeros_like(weight), np.zeros_like(weight)
        for _ in range(3):
            adam_rows(threads, w, m, v, ordered[starts[:-1]], starts, order, values, 0.9, 0.999, 0.01, 1e-8)
        results.append((w, m, v))
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(results[0][0], weight)  # the touched rows moved
    untouched = np.setdiff1d(np.arange(40), touched)
    assert np.array_equal(results[0][0][untouched], weight[untouched])


def test_pair_membership_matches_the_matrix() -> None:
    """PairIndex.contains (the in_rows kernel) against the matrix itself, duplicates and empty rows
    included, with broadcasting as the samplers use it."""
    from trainer.samplers import PairIndex

    rng = np.random.default_rng(3)
    n_users, n_items = 50, 300
    u, i = rng.integers(0, n_users, 2000), rng.integers(0, n_items, 2000)
    u[u == 7] = 8  # row 7 stays empty
    m = sparse.csr_matrix((np.ones(u.size), (u, i)), shape=(n_users, n_items))  # repeats are summed
    index = PairIndex(m)
    users = rng.integers(0, n_users, 400)
    items = rng.integers(0, n_items, (400, 30))
    dense = m.toarray() > 0
    assert np.array_equal(index.contains(users[:, None], items), dense[users[:, None], items])
    assert not index.contains(np.array([7]), np.arange(n_items)).any()
    assert index.contains(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0,)
