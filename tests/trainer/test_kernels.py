"""The compiled loops of a training step: the products they replace, whatever the thread count."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from trainer.kernels import set_threads, sum_rows


def test_row_sums_are_the_csr_product_with_any_thread_count() -> None:
    rng = np.random.default_rng(0)
    dense = (rng.random((50, 300)) < 0.05).astype(np.float32)
    dense[7] = 0  # an empty bag sums to zeros
    pool = sparse.csr_matrix(dense)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    results = []
    for threads in (1, 2):
        set_threads(threads)
        results.append(sum_rows(pool.indptr, pool.indices, vectors))
    np.testing.assert_allclose(results[0], pool @ vectors, rtol=1e-5, atol=1e-5)
    assert np.array_equal(results[0], results[1]) and not results[0][7].any()
