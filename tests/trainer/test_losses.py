"""The logQ correction: right sign and, with many samples, the full-catalogue softmax it stands for."""

from __future__ import annotations

import numpy as np
import torch

from trainer.losses import binary_ns, bpr, get_loss, sampled_softmax


def _toy(n_draws: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A user scoring 50 items; negatives drawn from a skewed q that favours the high-scoring items."""
    rng = np.random.default_rng(seed)
    scores = np.linspace(-2, 3, 50)
    q = np.exp(scores) / np.exp(scores).sum()
    draws = rng.choice(50, size=n_draws, p=q)
    pos = torch.tensor([0.5])
    neg = torch.tensor(scores[draws], dtype=torch.float32)[None, :]
    neg_logq = torch.tensor(np.log(n_draws * q[draws]), dtype=torch.float32)[None, :]
    full = float(torch.logsumexp(torch.tensor(np.r_[0.5, scores]), 0) - 0.5)
    return pos, neg, neg_logq, full


def test_logq_correction_recovers_the_full_softmax_and_no_correction_does_not() -> None:
    pos, neg, neg_logq, full = _toy(20_000)
    mask = torch.ones_like(neg, dtype=torch.bool)
    corrected = float(sampled_softmax(pos, neg, torch.zeros(1), neg_logq, mask))
    raw = float(sampled_softmax(pos, neg, torch.zeros(1), torch.zeros_like(neg), mask))
    assert abs(corrected - full) < 0.05
    assert raw > full + 5  # without correction the popular negatives are counted n times over


def test_logq_sign_lowers_popular_negatives() -> None:
    """The gradient on a popular negative shrinks with the correction: it is not over-penalised."""
    neg = torch.tensor([[1.0, 1.0]], requires_grad=True)
    pos = torch.tensor([1.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    logq = torch.log(torch.tensor([[0.5, 0.01]]))  # item 0 popular, item 1 rare
    sampled_softmax(pos, neg, torch.zeros(1), logq, mask).backward()
    g = neg.grad[0]
    assert g[0] < g[1]  # the rare item is pushed down harder than the popular one
    for loss in (binary_ns, bpr):
        neg.grad = None
        loss(pos, neg, torch.zeros(1), logq, mask).backward()
        assert neg.grad[0, 0] < neg.grad[0, 1], loss.__name__


def test_masked_columns_carry_no_gradient() -> None:
    neg = torch.tensor([[3.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, True]])
    for name in ("softmax", "nce", "bpr"):
        neg.grad = None
        get_loss(name)(torch.tensor([1.0]), neg, torch.zeros(1), torch.zeros(1, 2), mask).backward()
        assert neg.grad[0, 0] == 0 and neg.grad[0, 1] > 0, name


def _reference_softmax(pos, neg, pos_logq, neg_logq, mask, weight):  # noqa: ANN001, ANN202
    """The loss as autograd would build it from its definition."""
    logits = torch.cat([(pos - pos_logq)[:, None], torch.where(mask, neg - neg_logq, float("-inf"))], dim=1)
    rows = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return (rows * weight).sum() / weight.sum()


def test_softmax_value_and_gradients_match_autograd_of_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    b, c = 6, 9
    mask = torch.rand(b, c, generator=g) > 0.3
    mask[2] = False  # a row without any valid negative: zero loss, finite gradients
    weight = torch.rand(b, generator=g) + 0.5
    for neg_logq in (torch.randn(1, c, generator=g), torch.randn(b, c, generator=g)):
        pos_logq = torch.randn(b, generator=g)
        grads = []
        for loss_fn in (sampled_softmax, _reference_softmax):
            pos = torch.randn(b, generator=torch.Generator().manual_seed(1)).requires_grad_()
            neg = torch.randn(b, c, generator=torch.Generator().manual_seed(2)).requires_grad_()
            loss = loss_fn(pos, neg, pos_logq, neg_logq, mask, weight)
            loss.backward()
            grads.append((loss.detach(), pos.grad, neg.grad))
        for ours, ref in zip(*grads, strict=True):
            assert torch.allclose(ours, ref, atol=1e-6), (ours, ref)
        assert torch.isfinite(grads[0][2]).all() and (grads[0][2][~mask] == 0).all()


def test_rows_that_share_a_query_read_its_negatives_as_if_each_had_its_own_copy() -> None:
    """Rows of one user score their shared negatives once per user (``rows``): the same loss and the same
    gradients as copying that user's logits, corrections and mask to each of its rows."""
    g = torch.Generator().manual_seed(3)
    q, b, c = 4, 9, 7
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 0])
    mask = torch.rand(q, c, generator=g) > 0.3
    mask[3] = False  # a user without any valid negative
    neg_logq, pos_logq, weight = torch.randn(1, c, generator=g), torch.randn(b, generator=g), torch.rand(b, generator=g)
    for name in ("softmax", "nce", "bpr"):
        results = []
        for shared in (True, False):
            pos = torch.randn(b, generator=torch.Generator().manual_seed(1)).requires_grad_()
            neg = torch.randn(q, c, generator=torch.Generator().manual_seed(2)).requires_grad_()
            if shared:
                loss = get_loss(name)(pos, neg, pos_logq, neg_logq, mask, weight, rows)
            else:
                loss = get_loss(name)(pos, neg[rows], pos_logq, neg_logq, mask[rows], weight)
            loss.backward()
            results.append((loss.detach(), pos.grad, neg.grad))
        for ours, ref in zip(*results, strict=True):
            assert torch.allclose(ours, ref, atol=1e-6), (name, ours, ref)


def _positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = (~mask).nonzero().T
    return rows, cols


def test_a_mask_given_as_its_masked_positions_is_the_dense_mask() -> None:
    """The shared block's mask travels as the positions of its few masked logits (trainer/batch.py): every
    loss, with and without shared queries, gives the same value and gradients as with the dense mask."""
    g = torch.Generator().manual_seed(4)
    q, b, c = 4, 9, 7
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 0])
    mask = torch.rand(q, c, generator=g) > 0.2
    mask[3] = False  # a user without any valid negative
    neg_logq, pos_logq = torch.randn(1, c, generator=g), torch.randn(b, generator=g)
    for name in ("softmax", "nce", "bpr"):
        for query_rows, block_mask in ((rows, mask), (None, mask[rows])):  # shared queries, one per row
            results = []
            for m in (block_mask, _positions(block_mask)):
                pos = torch.randn(b, generator=torch.Generator().manual_seed(1)).requires_grad_()
                neg = torch.randn(block_mask.shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
                loss = get_loss(name)(pos, neg, pos_logq, neg_logq, m, None, query_rows)
                loss.backward()
                results.append((loss.detach(), pos.grad, neg.grad))
            for dense, sparse in zip(*results, strict=True):
                assert torch.equal(dense, sparse), (name, dense, sparse)
