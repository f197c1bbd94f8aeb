"""History bags of a pooled tower: each row's positive left out, at most ``cap`` items, nothing invented."""

from __future__ import annotations

import numpy as np

from trainer.data import csr
from trainer.model import HistorySampler


def _bags(bags, rows: int) -> list[list[int]]:  # noqa: ANN001 - trainer.model.Histories
    items, offsets = bags.items.numpy(), np.append(bags.offsets.numpy(), bags.items.numel())
    inverse = bags.inverse.numpy()
    return [items[offsets[inverse[b]]:offsets[inverse[b] + 1]].tolist() for b in range(rows)]


def _batch(rng: np.random.Generator, n_users: int, n_items: int, events: int, rows: int):  # noqa: ANN202
    """A random log's positives and a batch of its rows: (positives, the rows' users, their positives)."""
    u = rng.integers(0, n_users, events)
    i = rng.integers(0, n_items, events)
    picked = rng.integers(0, u.size, rows)
    return csr(u, i, n_users, n_items), u[picked], i[picked]


def test_capped_bags_leave_the_positive_out_and_draw_only_the_users_items() -> None:
    rng = np.random.default_rng(0)
    positives, users, leave_out = _batch(rng, 30, 200, 3000, 500)
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


def test_a_shared_query_leaves_out_every_positive_its_rows_score() -> None:
    """Rows of one user share one query (trainer/train.py: _step): it pools the user's history without
    any of the positives those rows predict, so no row sees its own positive."""
    import torch

    from trainer.model import Histories, TowerModel
    from trainer.towers import UserTower, finish, pool

    rng = np.random.default_rng(0)
    n_users, n_items = 5, 40
    u = rng.integers(0, n_users, 150)
    i = rng.integers(0, n_items, 150)
    positives = csr(u, i, n_users, n_items)
    row_u = positives.nonzero()[0][::3]  # training rows: several per user
    row_i = positives.nonzero()[1][::3]
    users, row_query = np.unique(row_u, return_inverse=True)
    tower = UserTower(temperature=0.2, free=False, pooled=True, bias=False)
    model = TowerModel(n_users, n_items, 8, tower=tower, tie_history=True)
    with torch.no_grad():
        q = model.users(torch.from_numpy(users), Histories.of(positives, users, row_i, row_query)).numpy()
    table = model.item.weight.detach().numpy()
    for k, user in enumerate(users):
        history = set(positives.indices[positives.indptr[user]:positives.indptr[user + 1]].tolist())
        kept = sorted(history - set(row_i[row_query == k].tolist()))
        np.testing.assert_allclose(q[k], finish(tower, pool(table, np.array(kept), 0.5)), atol=1e-5)


def test_the_head_of_the_bags_makes_the_first_rows_queries() -> None:
    """The hard sampler searches with the first rows' queries only (Histories.head): the same vectors
    as those rows of the whole batch's queries, for whole and capped histories."""
    import torch

    from trainer.model import TowerModel
    from trainer.towers import UserTower

    rng = np.random.default_rng(1)
    positives, users, leave_out = _batch(rng, 40, 120, 2000, 300)
    tower = UserTower(temperature=0.2, free=True, pooled=True, bias=False)
    model = TowerModel(40, 120, 8, tower=tower)
    for cap in (None, 5):
        bags = HistorySampler(positives, cap).bags(users, leave_out, rng)
        with torch.no_grad():
            whole = model.users(torch.from_numpy(users), bags).numpy()
            for head in (1, 77, 300, 400):
                part = model.users(torch.from_numpy(users[:head]), bags.head(head)).numpy()
                np.testing.assert_allclose(part, whole[:head], atol=1e-6)
