"""The query-vector rule shared by training's export and the service (trainer/towers.py)."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from trainer.towers import UserTower, items_as_history, pool_all, query


def test_query_pools_history_adds_the_free_vector_and_appends_the_bias_one() -> None:
    rng = np.random.default_rng(0)
    history, free = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    tower = UserTower(temperature=0.2, free=True, pooled=True, pool_exponent=0.5, bias=True)
    q = query(tower, history, [1, 3], free)
    v = (history[1] + history[3]) / np.sqrt(2) + free
    assert q.shape == (5,) and q[-1] == 1.0
    np.testing.assert_allclose(q[:4], v / np.linalg.norm(v) / 0.2, rtol=1e-5)


def test_query_without_history_or_free_vector_is_none_and_parts_can_weigh_alike() -> None:
    history = np.eye(3, dtype=np.float32) * 10
    pooled_only = UserTower(temperature=1.0, free=False, pooled=True)
    assert query(pooled_only, history, []) is None
    both = UserTower(temperature=1.0, free=True, pooled=True, normalize_parts=True)
    q = query(both, history, [0], np.array([0, 0.001, 0], np.float32))
    np.testing.assert_allclose(q, np.array([1, 1, 0]) / np.sqrt(2), rtol=1e-5)  # 10x norm, same weight


def test_pool_all_equals_pooling_each_user() -> None:
    rng = np.random.default_rng(1)
    history = rng.normal(size=(7, 3)).astype(np.float32)
    dense = (rng.random((5, 7)) < 0.4).astype(np.float32)
    dense[4] = 0  # a user with no history pools to zeros
    pos = sparse.csr_matrix(dense)
    got = pool_all(history, pos, 0.5)
    for u in range(5):
        rows = pos.indices[pos.indptr[u]:pos.indptr[u + 1]]
        want = history[rows].sum(0) / max(rows.size, 1) ** 0.5
        np.testing.assert_allclose(got[u], want, rtol=1e-5, atol=1e-6)


def test_old_manifests_read_as_free_vectors_and_bias_columns_are_dropped_for_pooling() -> None:
    assert UserTower.from_manifest({}) == UserTower(temperature=1.0, free=True, pooled=False, bias=False)
    tower = UserTower.from_manifest({"user_tower": {"temperature": 0.1, "bias": True, "unknown": 1}})
    assert tower.temperature == 0.1 and tower.bias
    assert items_as_history(np.ones((2, 5)), tower).shape == (2, 4)
