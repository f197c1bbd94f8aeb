"""Each sampler draws from the distribution it reports (q), and hard/feedback respect their rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse, stats

from trainer.samplers import (
    AliasTable,
    Component,
    FeedbackSampler,
    HardSampler,
    InBatchSampler,
    MixedSampler,
    PairIndex,
    PopularitySampler,
    SamplerConfig,
    UniformSampler,
    make_sampler,
)


def _chi2_pvalue(draws: np.ndarray, q: np.ndarray) -> float:
    """Goodness of fit of the draws' histogram to q (bins with q > 0)."""
    counts = np.bincount(draws, minlength=q.size)
    support = q > 0
    assert counts[~support].sum() == 0, "drew an item the sampler says has probability 0"
    expected = q[support] / q[support].sum() * draws.size
    return float(stats.chisquare(counts[support], expected).pvalue)


def _collect(sampler, rounds: int, rng: np.random.Generator, **kw) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    items, qs = [], []
    for _ in range(rounds):
        (d,) = sampler.sample(np.zeros(1, np.int64), np.zeros(1, np.int64), rng, **kw)
        items.append(d.items.ravel())
        qs.append(d.q.ravel())
    return np.concatenate(items), np.concatenate(qs)


POP = np.array([0, 1, 2, 5, 10, 30, 100, 400, 1000, 3], dtype=np.int64)


def test_uniform_matches_q_and_skips_non_candidates() -> None:
    s = UniformSampler(POP > 0, n=500)
    items, q = _collect(s, 200, np.random.default_rng(0))
    assert np.allclose(q, 1 / 9)
    assert _chi2_pvalue(items, s.prob(np.arange(POP.size))) > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_popularity_alias_matches_count_power_alpha(alpha: float) -> None:
    s = PopularitySampler(POP, n=1000, alpha=alpha)
    want = np.where(POP > 0, POP.astype(float) ** alpha, 0)
    want /= want.sum()
    assert np.allclose(s.prob(np.arange(POP.size)), want)
    items, q = _collect(s, 200, np.random.default_rng(1))
    assert np.allclose(q, want[items])
    assert _chi2_pvalue(items, want) > 1e-3


def test_alias_table_on_random_weights() -> None:
    w = np.random.default_rng(2).random(300) ** 3
    draws = AliasTable(w).draw(np.random.default_rng(3), 300_000)
    assert _chi2_pvalue(draws, w / w.sum()) > 1e-3


def test_in_batch_returns_the_batch_positives_with_popularity_q() -> None:
    s = InBatchSampler(POP)
    positives = np.array([8, 8, 3, 7])
    (d,) = s.sample(np.arange(4), positives, np.random.default_rng(0))
    assert d.shared and d.items.tolist() == positives.tolist()
    assert np.allclose(d.q, POP[positives] / POP.sum())
    # positives drawn from the event stream are popularity distributed: q is their real law
    stream = np.repeat(np.arange(POP.size), POP)
    batch = np.random.default_rng(1).choice(stream, 50_000)
    assert _chi2_pvalue(batch, s.prob(np.arange(POP.size))) > 1e-3


def _hard_setup(n_items: int = 60, dim: int = 8) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    rng = np.random.default_rng(4)
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    users = rng.normal(size=(5, dim)).astype(np.float32)
    known = sparse.random(5, n_items, density=0.2, random_state=5, format="csr")
    known.data[:] = 1
    return users, items, known


def test_hard_never_returns_known_positives_or_skipped_ranks_and_is_uniform_over_the_rest() -> None:
    users, items, known = _hard_setup()
    s = HardSampler(known, n=4000, pool=30, skip=5)
    s.refresh(items)
    rng = np.random.default_rng(0)
    (d,) = s.sample(np.arange(5), np.zeros(5, np.int64), rng, users)
    for u in range(5):
        ranking = np.argsort(-(items @ users[u]), kind="stable")[:30]
        non_pos = [i for i in ranking if known[u, i] == 0]
        skipped, allowed = set(non_pos[:5]), non_pos[5:]
        got = d.items[u]
        assert not set(got.tolist()) & set(known[u].indices.tolist())
        assert not set(got.tolist()) & skipped
        assert set(got.tolist()) <= set(allowed)
        assert np.allclose(d.q[u], 1 / len(allowed))
        q = np.zeros(items.shape[0])
        q[allowed] = 1 / len(allowed)
        assert _chi2_pvalue(got, q) > 1e-3


def test_hard_index_is_refreshed_on_schedule_and_reports_staleness() -> None:
    users, items, known = _hard_setup()
    s = HardSampler(known, n=2, pool=20, skip=2, refresh_every=3)
    built = []
    for step in range(10):
        before = s.refreshes
        s.on_step(step, lambda: items)
        if s.refreshes > before:
            built.append(step)
        s.sample(np.arange(5), np.zeros(5, np.int64), np.random.default_rng(step), users, step)
    assert built == [0, 3, 6, 9]
    st = s.stats()
    assert st["index_refreshes"] == 4 and st["index_refresh_s"] > 0
    assert st["index_staleness_steps"] == pytest.approx(np.mean([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_hard_index_types_find_mostly_the_exact_top(kind: str) -> None:
    rng = np.random.default_rng(6)
    items = rng.normal(size=(2000, 16)).astype(np.float32)
    users = rng.normal(size=(20, 16)).astype(np.float32)
    s = HardSampler(sparse.csr_matrix((20, 2000)), n=1, pool=50, skip=0, index_type=kind)
    s.refresh(items)
    found, _ = s.candidates_for(np.arange(20), users)
    exact = np.argsort(-(users @ items.T), axis=1)[:, :50]
    overlap = np.mean([len(set(found[u]) & set(exact[u])) / 50 for u in range(20)])
    assert overlap > (0.999 if kind == "flat" else 0.3)


def test_feedback_draws_only_the_users_negatives() -> None:
    fb = sparse.csr_matrix(([1.0, 1.0, 1.0], ([0, 0, 2], [3, 7, 5])), shape=(3, 10))
    imp = sparse.csr_matrix(([1.0], ([0], [9])), shape=(3, 10))
    s = FeedbackSampler(fb, n=3000, impressions=imp)
    (d,) = s.sample(np.array([0, 1, 2]), np.zeros(3, np.int64), np.random.default_rng(0))
    assert set(d.items[0].tolist()) == {3, 7, 9} and np.allclose(d.q[0], 1 / 3)
    assert not d.valid[1].any()  # user 1 has no feedback
    assert set(d.items[2].tolist()) == {5} and np.allclose(d.q[2], 1.0)
    assert _chi2_pvalue(d.items[0], np.isin(np.arange(10), [3, 7, 9]) / 3) > 1e-3


def test_mixed_keeps_each_source_and_q_and_honours_warmup() -> None:
    users, items, known = _hard_setup()
    pop = np.ones(60, dtype=np.int64)
    mixed = MixedSampler([Component(PopularitySampler(pop, 16)),
                          Component(HardSampler(known, 4, pool=20, skip=2), after_step=5)])
    mixed.on_step(0, lambda: items)
    early = mixed.sample(np.arange(5), np.zeros(5, np.int64), np.random.default_rng(0), users, step=0)
    assert [d.source for d in early] == ["popularity"]
    mixed.on_step(5, lambda: items)
    late = mixed.sample(np.arange(5), np.zeros(5, np.int64), np.random.default_rng(0), users, step=5)
    assert [d.source for d in late] == ["popularity", "hard"]
    assert np.allclose(late[0].q, 1 / 60) and late[1].q.shape == (5, 4)


def test_make_sampler_rejects_unknown_strategy_and_builds_the_rest() -> None:
    pop = POP
    known = sparse.csr_matrix((2, POP.size))
    with pytest.raises(ValueError, match="unknown strategy"):
        make_sampler(SamplerConfig(strategy="nope"), popularity=pop, known=known)
    for name in ("uniform", "popularity", "in-batch", "hard", "feedback", "mixed"):
        s = make_sampler(SamplerConfig(strategy=name), popularity=pop, known=known, feedback=known)
        assert s.n >= 1


def test_pair_index_membership() -> None:
    m = sparse.csr_matrix(([1.0, 1.0], ([0, 1], [2, 0])), shape=(2, 3))
    idx = PairIndex(m)
    assert idx.contains(np.array([[0], [1]]), np.array([[0, 1, 2], [0, 1, 2]])).tolist() == [
        [False, False, True], [True, False, False]]
