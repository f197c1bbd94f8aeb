"""Losses over one positive and many sampled negatives per row, each correct for any sampler.

Inputs, for B rows and C negative columns: ``pos`` (B,) and ``neg`` (B, C) logits, the log expected
counts ``pos_logq`` (B,) and ``neg_logq`` (B, C) (zeros to switch the correction off) and a validity
``mask`` (B, C). ``neg_logq`` may be (1, C) when the negatives are shared by the batch. The logQ correction (Yi et al. 2019; TensorFlow's sampled_softmax) subtracts
log(n·q) from every logit so that sampled negatives estimate the full-catalogue partition function
rather than over-penalising the items the sampler favours.

Every loss takes an optional ``weight`` (B,): per-row weights (event-type weights of the positives);
the loss is then the weighted mean over rows. Without it, the plain mean (bit-identical to before).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from trainer.config import LOSSES


def _reduce(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return rows.mean()
    return (rows * weight).sum() / weight.sum()



class _SoftmaxNormaliser(torch.autograd.Function):
    """log(e^p + Σ_valid e^(s - logq)) per row, written out by hand because it is most of a training
    step: autograd's version materialises the corrected block, a masked copy, a concatenation and
    logsumexp's buffers, and as many again backwards. This one makes one (B, C) block, exponentiates it
    in place (shifted by the row's max, for stability) and keeps it: the gradient is that block times
    grad / Σ, one more pass (B=1024, C=1536: 3.5 against 7.3 ms for torch.logsumexp on a masked copy)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, pos: torch.Tensor, neg: torch.Tensor,
                neg_logq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.sub(neg, neg_logq).masked_fill_(~mask, float("-inf"))
        top = torch.maximum(x.amax(dim=1), pos)  # ≥ pos: finite even if a row has no valid negative
        x.sub_(top[:, None]).exp_()
        e_pos = torch.exp(pos - top)
        total = x.sum(dim=1).add_(e_pos)
        ctx.save_for_backward(x, e_pos, total)
        return top + torch.log(total)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, e_pos, total = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = grad / total
        # softmax times the incoming gradient; x is spent (a graph is backpropagated once in training)
        return e_pos * scale, x.mul_(scale[:, None]), None, None


def sampled_softmax(pos: torch.Tensor, neg: torch.Tensor, pos_logq: torch.Tensor, neg_logq: torch.Tensor,
                    mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the positive against the corrected negatives (mean over rows)."""
    p = pos - pos_logq
    return _reduce(_SoftmaxNormaliser.apply(p, neg, neg_logq, mask) - p, weight)


def binary_ns(pos: torch.Tensor, neg: torch.Tensor, pos_logq: torch.Tensor, neg_logq: torch.Tensor,
              mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """word2vec's -log σ(s⁺) - mean log σ(-s⁻) on corrected logits (the NCE form of the correction).

    The negative term is a mean rather than word2vec's sum so that hundreds of shared negatives do
    not drown the positive.
    """
    pos_term = F.softplus(-(pos - pos_logq))
    neg_terms = F.softplus(neg - neg_logq) * mask
    return _reduce(pos_term + neg_terms.sum(1) / mask.sum(1).clamp(min=1), weight)


def bpr(pos: torch.Tensor, neg: torch.Tensor, pos_logq: torch.Tensor, neg_logq: torch.Tensor,
        mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """-log σ(s⁺ - s⁻), each negative weighted by self-normalised importance weights 1/(n·q).

    With the correction on, the weights turn the sampler's distribution back into uniform, so the
    loss estimates BPR under uniform negatives whatever sampled them; off, every negative counts equally.
    """
    logw = torch.where(mask, -neg_logq.expand_as(neg), float("-inf"))
    w = torch.softmax(logw, dim=1).nan_to_num(0.0)
    return _reduce((w * F.softplus(neg - pos[:, None])).sum(1), weight)


def get_loss(name: str):  # noqa: ANN201 - a callable with the signature above
    table = {"softmax": sampled_softmax, "nce": binary_ns, "bpr": bpr}
    if name not in table:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return table[name]
