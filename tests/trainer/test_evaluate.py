"""Metric definitions on a case small enough to compute by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from trainer import evaluate as ev
from trainer.evaluate import dot_scores, evaluate, popularity_scores, report_users, top_k


def test_metrics_match_hand_computation() -> None:
    # 1 user, 6 items; scores rank items 0..5 in order; item 0 is a train item (excluded); item 5 not a candidate
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 10.0]])
    exclude = sparse.csr_matrix(([1.0], ([0], [0])), shape=(1, 6))
    candidates = np.array([True, True, True, True, True, False])
    out = evaluate(lambda rows: scores[rows], exclude, np.array([0, 0]), np.array([2, 4]), candidates, ks=(2, 10))
    # ranking after exclusions: 1, 2, 3, 4 -> hits at ranks 2 and 4
    d = 1 / np.log2(np.arange(2, 12))
    assert np.isclose(out["recall@2"], 1 / 2)
    assert np.isclose(out["ndcg@2"], d[1] / (d[0] + d[1]))
    assert np.isclose(out["recall@10"], 1.0)
    assert np.isclose(out["ndcg@10"], (d[1] + d[3]) / (d[0] + d[1]))
    assert out["hitrate@2"] == 1.0
    assert np.isclose(out["coverage@10"], 4 / 5)


def test_popularity_baseline_ranks_by_count() -> None:
    exclude = sparse.csr_matrix((2, 3))
    out = evaluate(popularity_scores(np.array([5, 1, 3])), exclude, np.array([0, 1]), np.array([0, 1]),
                   np.ones(3, bool), ks=(1,))
    assert out["hitrate@1"] == 0.5 and out["users"] == 2


def test_top_k_by_blocks_is_the_full_sort() -> None:
    """top_k looks only inside the blocks with the best maxima and the ragged tail: the same columns, in the
    same order, as a full sort, including rows whose best items crowd one block or sit in the tail, and
    rows with fewer rankable (finite) items than k."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((50, 64 * 40 + 17)).astype(np.float32)
    scores[1, 64:84] += 10.0  # all of row 1's best in one block
    scores[2, -17:] += 10.0  # row 2's best in the tail after the last whole block
    scores[3, 5:] = -np.inf  # five rankable items
    for k in (1, 20, 30):
        top = top_k(scores.copy(), k)
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        assert top.shape == (50, k)
        finite = np.isfinite(np.take_along_axis(scores, expected, axis=1))
        assert (np.where(finite, top, -1) == np.where(finite, expected, -1)).all()
    assert set(top_k(scores.copy(), 5)[3]) == {0, 1, 2, 3, 4}


def test_blocks_of_any_size_give_the_same_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large catalogue is scored in fewer users a block (BLOCK_BYTES): the same metrics, block by block."""
    rng = np.random.default_rng(1)
    users, items = rng.standard_normal((40, 8)).astype(np.float32), rng.standard_normal((300, 8)).astype(np.float32)
    exclude = sparse.random(40, 300, density=0.05, random_state=2, format="csr")
    held_u, held_i = np.repeat(np.arange(40), 3), rng.integers(0, 300, 120)
    candidates = rng.random(300) > 0.1
    whole = evaluate(dot_scores(users, items), exclude, held_u, held_i, candidates)
    monkeypatch.setattr(ev, "BLOCK_BYTES", 7 * 4 * 300)  # 7 users a block
    assert ev.block_rows(300) == 7
    assert evaluate(dot_scores(users, items), exclude, held_u, held_i, candidates) == pytest.approx(whole)


def test_a_report_samples_users_only_past_its_budget_of_scores() -> None:
    assert report_users(30_000, 37_000) is None  # gowalla's size: every held-out user
    assert report_users(100_000, 1_000_000) == max(ev.REPORT_MIN_USERS, ev.REPORT_CELLS // 1_000_000)
    assert report_users(10**7, 10**8) == ev.REPORT_MIN_USERS  # never fewer users than this
    assert ev.block_rows(37_000) == 1024 and ev.block_rows(1_000_000) == 67 and ev.block_rows(10**9) == 1


def test_most_popular_walks_its_one_ranking_as_the_full_ranking_would() -> None:
    """popularity_scores carries the ranking every user shares; evaluate walks it past each user's
    excluded items instead of ranking every item per user: the same metrics, including users left with
    fewer rankable items than k and items that are not candidates."""
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 500
    pop = rng.permutation(n_items).astype(np.float32)  # distinct: one order, whatever breaks ties
    exclude = sparse.random(n_users, n_items, density=0.04, random_state=4, format="lil")
    exclude[0, np.argsort(-pop)[:490]] = 1.0  # user 0 keeps only ten items, some not candidates
    exclude = exclude.tocsr()
    held_u, held_i = np.repeat(np.arange(n_users), 2), rng.integers(0, n_items, 2 * n_users)
    candidates = rng.random(n_items) > 0.2
    walked = evaluate(popularity_scores(pop), exclude, held_u, held_i, candidates)
    full = evaluate(lambda rows: np.tile(pop, (len(rows), 1)), exclude, held_u, held_i, candidates)
    assert walked == pytest.approx(full)
    assert hasattr(popularity_scores(pop), "order")
