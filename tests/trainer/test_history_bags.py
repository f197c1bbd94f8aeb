"""History bags of a pooled tower: each row's positive left out, at most ``cap`` items, nothing invented."""

from __future__ import annotations

import numpy as np

from trainer.data import csr
from trainer.model import HistorySampler


def _bags(bags, rows: int) -> list[list[int]]:  # noqa: ANN001 - trainer.model.Histories
    items, offsets = bags.items.numpy(), np.append(bags.offsets.numpy(), bags.items.numel())
    inverse = bags.inverse.numpy()
    return [items[offsets[inverse[b]]:offsets[inverse[b] + 1]].tolist() for b in range(rows)]


def test_capped_bags_leave_the_positive_out_and_draw_only_the_users_items() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 200
    u = rng.integers(0, n_users, 3000)
    i = rng.integers(0, n_items, 3000)
    positives = csr(u, i, n_users, n_items)
    rows = rng.integers(0, u.size, 500)
    users, leave_out = u[rows], i[rows]
    for cap in (3, 8, 1000):
        bags = HistorySampler(positives, cap).bags(users, leave_out, rng)
        got = _bags(bags, users.size)
        for b, (user, pos) in enumerate(zip(users, leave_out, strict=True)):
            history = set(positives.indices[positives.indptr[user]:positives.indptr[user + 1]].tolist())
            assert pos not in got[b] and set(got[b]) <= history - {pos}
            assert len(got[b]) == min(cap, len(history) - 1) == bags.counts[b]
            if len(history) - 1 <= cap:
                assert sorted(got[b]) == sorted(history - {pos})  # short histories are taken whole


def test_no_cap_is_the_whole_history() -> None:
    positives = csr(np.array([0, 0, 0, 1]), np.array([1, 2, 3, 2]), 2, 4)
    bags = HistorySampler(positives, None).bags(np.array([0, 1]), np.array([2, 2]), np.random.default_rng(0))
    assert bags.counts.tolist() == [2.0, 0.0] and bags.leave_out.tolist() == [2, 2]
