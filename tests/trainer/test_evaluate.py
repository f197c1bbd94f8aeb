"""Metric definitions on a case small enough to compute by hand."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from trainer.evaluate import evaluate, popularity_scores


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
