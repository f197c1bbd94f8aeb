"""trainer/batch.py: the columns, masks and log expected counts of one step, without a model."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.batch import assemble
from trainer.samplers import Draw, InBatchSampler, PopularitySampler, UniformSampler

N = 40
POPULARITY = np.arange(1, N + 1, dtype=np.float64) ** 1.5


def test_mixed_shared_sources_estimate_the_full_softmax_partition() -> None:
    """With the correction, Σ over sampled columns of exp(s - log E[count]) has expectation Σ_j exp(s_j):
    the sampled softmax's denominator estimates the full catalogue's, whatever mix of sources drew it."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0.0, 1.5, N)
    uniform, popularity = UniformSampler(np.ones(N, bool), n=7), PopularitySampler(POPULARITY, n=5, alpha=0.75)
    positives = np.array([0])  # one row whose positive is item 0 (masked where it was drawn)
    estimates = []
    for _ in range(20_000):
        draws = uniform.sample(None, positives, rng) + popularity.sample(None, positives, rng)
        cols = assemble(positives, draws, [uniform, popularity])
        items = np.concatenate([d.items for d in draws])
        estimates.append(float((np.exp(scores[items] - cols.neg_logq[0]) * cols.mask[0]).sum()))
    full = float(np.exp(scores[1:]).sum())  # every item but the row's positive
    assert np.mean(estimates) == pytest.approx(full, rel=0.02)
    # without the correction the same draws estimate something else (the popular items dominate)
    plain = assemble(positives, draws, [uniform, popularity], logq=False)
    assert plain.neg_logq.shape == (1, 1) and not plain.neg_logq.any()


def test_per_user_columns_are_corrected_by_every_source_that_could_draw_them() -> None:
    in_batch = InBatchSampler(POPULARITY)
    uniform = UniformSampler(np.ones(N, bool), n=4)
    positives = np.array([3, 7, 3])
    rng = np.random.default_rng(1)
    shared = in_batch.sample(None, positives, rng) + uniform.sample(None, positives, rng)
    # a per-user source drawing 2 of a 4-item window per row; row 2 has none
    items = np.array([[10, 11], [7, 12], [0, 0]])
    valid = np.array([[True, True], [True, True], [False, False]])
    hard = Draw(items, np.full((3, 2), 0.25), "hard", False, 2, valid)
    cols = assemble(positives, [*shared, hard], [in_batch, uniform])

    c = 3 + 4  # shared columns: the in-batch positives, then the uniform draws
    assert cols.mask.shape == cols.neg_logq.shape == (3, c + 2)
    assert cols.sources == [("in-batch", 3), ("uniform", 4), ("hard", 2)]
    q_pop = POPULARITY / POPULARITY.sum()
    expected = 2 * 0.25 + 3 * q_pop[items[0]] + 4 / N  # own source + in-batch + uniform
    assert np.allclose(cols.neg_logq[0, c:], np.log(expected), rtol=1e-5)
    assert np.allclose(cols.pos_logq, np.log(3 * q_pop[positives] + 4 / N), rtol=1e-5)
    # the in-batch diagonal and repeats of a row's own positive are masked, as are invalid per-user slots
    assert not cols.mask[0, 0] and not cols.mask[0, 2] and cols.mask[0, 1]
    assert not cols.mask[1, c]  # row 1's hard draw is its own positive
    assert not cols.mask[2, c:].any()
    # rows with per-user negatives are embedded once each, after the positives and the uniform draws
    assert cols.live.tolist() == [0, 1] and cols.width == 2
    assert cols.lookup.tolist() == [*positives, *shared[1].items, 10, 11, 7, 12]


def test_a_per_user_source_alone_leaves_the_positives_uncorrected() -> None:
    items, valid = np.array([[5, 6]]), np.array([[True, False]])
    cols = assemble(np.array([1]), [Draw(items, np.full((1, 2), 0.5), "feedback", False, 2, valid)], [])
    assert cols.pos_logq.tolist() == [0.0]
    assert cols.mask.tolist() == [[True, False]]
    assert cols.neg_logq[0, 0] == pytest.approx(0.0)  # log(2 × 0.5)


def _loss_and_grads(cols, positives: np.ndarray, loss_name: str, seed: int = 0) -> tuple[float, np.ndarray]:
    """The loss of one batch scored the way trainer/train.py scores it, and its gradient on the item table."""
    import torch

    from trainer.losses import get_loss
    from trainer.train import _logits

    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(N, 8, generator=gen, requires_grad=True)
    users = torch.randn(positives.size, 8, generator=gen)
    pos, neg = _logits(users, table[torch.from_numpy(cols.lookup)], cols, positives.size)
    loss = get_loss(loss_name)(pos, neg, torch.from_numpy(cols.pos_logq), torch.from_numpy(cols.neg_logq),
                               torch.from_numpy(cols.mask))
    loss.backward()
    return float(loss.detach()), table.grad.numpy()


@pytest.mark.parametrize("loss_name", ["softmax", "bpr"])
@pytest.mark.parametrize("logq", [True, False])
@pytest.mark.parametrize("with_hard", [False, True])
def test_merged_repeats_give_the_same_loss_and_gradients(loss_name: str, logq: bool, with_hard: bool) -> None:
    """A popular item that is several rows' positive, or also a uniform draw, is scored once with its
    correction lowered by log m: the loss and every gradient are those of one column per draw."""
    rng = np.random.default_rng(3)
    in_batch, uniform = InBatchSampler(POPULARITY), UniformSampler(np.ones(N, bool), n=12)
    positives = np.array([3, 7, 3, 3, 9, 7])
    draws = in_batch.sample(None, positives, rng) + uniform.sample(None, positives, rng)
    if with_hard:  # per-user columns after the shared ones, never merged
        valid = np.array([[1, 1], [1, 1], [1, 1], [0, 0], [1, 0], [1, 1]], bool)
        items = np.array([[3, 11], [7, 12], [5, 3], [0, 0], [9, 9], [1, 2]])
        draws.append(Draw(items, np.full((6, 2), 0.25), "hard", False, 2, valid))
    plain = assemble(positives, draws, [in_batch, uniform], logq)
    merged = assemble(positives, draws, [in_batch, uniform], logq, merge=True)
    assert merged.mask.shape[1] < plain.mask.shape[1]  # the repeats are gone
    assert np.array_equal(merged.row_mask(slice(0, 6)), plain.row_mask(slice(0, 6)))
    loss, grad = _loss_and_grads(plain, positives, loss_name)
    m_loss, m_grad = _loss_and_grads(merged, positives, loss_name)
    assert m_loss == pytest.approx(loss, rel=1e-5)
    assert np.allclose(m_grad, grad, rtol=1e-4, atol=1e-6)
