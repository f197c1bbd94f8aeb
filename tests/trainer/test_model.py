"""The model's own autograd pieces against torch's reference for them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.model import normalize


def test_normalize_is_f_normalize_forward_and_backward() -> None:
    """Same vectors bit for bit; gradients equal to rounding, also for a zero row (divided by eps)."""
    torch.manual_seed(0)
    x = torch.randn(300, 17, dtype=torch.float64)
    x[7] = 0.0
    x[8] = 1e-14  # shorter than eps: clamped
    g = torch.randn(300, 17, dtype=torch.float64)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = normalize(ours), F.normalize(ref, dim=-1)
    assert torch.equal(y_ours, y_ref)
    y_ours.backward(g)
    y_ref.backward(g)
    assert torch.allclose(ours.grad, ref.grad, rtol=1e-10, atol=0)
    assert torch.autograd.gradcheck(normalize, (torch.randn(5, 4, dtype=torch.float64, requires_grad=True),))
