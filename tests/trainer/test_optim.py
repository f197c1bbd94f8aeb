"""RowAdam must be SparseAdam, only faster: same updates on the same sparse gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.optim import RowAdam


def _train(make_opt) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - an optimiser's constructor
    torch.manual_seed(0)
    users, items = nn.Embedding(300, 8, sparse=True), nn.Embedding(200, 8, sparse=True)
    opt = make_opt([*users.parameters(), *items.parameters()], lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        u = torch.randint(0, 300, (64,), generator=g)
        i = torch.randint(0, 200, (150,), generator=g)  # repeated rows: gradients to be summed
        loss = (users(u) @ items(i).T).sigmoid().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return users.weight.detach(), items.weight.detach()


@pytest.mark.parametrize("compiled", [True, False])
def test_row_adam_matches_sparse_adam(compiled: bool) -> None:
    """Both routes (the compiled pass over touched rows, the torch gather-update-scatter) are SparseAdam."""
    ours_all = _train(lambda params, lr: RowAdam(params, lr=lr, compiled=compiled))
    for ours, theirs in zip(ours_all, _train(torch.optim.SparseAdam), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert not torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.parametrize("compiled", [True, False])
def test_untouched_rows_do_not_move(compiled: bool) -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = RowAdam(emb.parameters(), lr=0.1, compiled=compiled)
    emb(torch.tensor([2, 2, 7])).sum().backward()
    opt.step()
    moved = (emb.weight.detach() != before).any(1)
    assert moved.tolist() == [i in (2, 7) for i in range(10)]


def test_dense_gradients_and_bad_settings_are_refused() -> None:
    lin = nn.Linear(2, 2)
    lin(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        RowAdam(lin.parameters()).step()
    with pytest.raises(ValueError):
        RowAdam(lin.parameters(), lr=0)


def test_a_gradient_outside_its_table_is_refused_before_the_compiled_pass() -> None:
    """The compiled pass writes without bounds checks: an index past the table must stop, not corrupt."""
    emb = nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = RowAdam(emb.parameters(), lr=0.1)
    for rows in ([3, 10], [-1, 3]):  # a tensor that breaks the invariants sparse_coo_tensor can check
        emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(2, 4), (10, 4), check_invariants=False)
        with pytest.raises(RuntimeError, match="does not fit its table"):
            opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("compiled", [True, False])
def test_an_empty_gradient_moves_nothing(compiled: bool) -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = RowAdam(emb.parameters(), lr=0.1, compiled=compiled)
    emb.weight.grad = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long), torch.zeros(0, 4), (10, 4),
                                              check_invariants=True)
    opt.step()
    assert torch.equal(emb.weight.detach(), before)
