"""One step's negatives as the loss sees them: which item rows to embed, which logits are valid, and the
log expected count each logit is corrected by. numpy and scipy only: testable without a model.

A batch has B rows (user, positive). Its draws (trainer/samplers.py) are *shared* columns (one set for
the whole batch: uniform, popularity, in-batch) and *per-user* columns (hard, feedback: their own items
per row, with a validity mask). ``assemble`` lays them out as C shared columns followed by W per-user
columns and computes, for every logit, ``log E[count of that item in the row's negatives]`` summed over
every source that could have drawn it (the balance heuristic of multiple importance sampling):

- a shared column or a positive: Σ over the shared sources of ``n_s q_s(j)`` (in-batch: ``B q(j)``);
- a per-user column: its own source's ``n q(j | u)`` plus the shared sources' expected count of ``j``.

A shared column can also be in a row's per-user window; that share is left out (an item must land in
both, and finding it costs a (B, C) membership test per step).

When several rows of a batch belong to one user (dense data: a batch of 1024 rows holds ~340 users on
ml-latest-small), their shared columns can be scored once per user: ``query_of_row`` maps rows to
query rows, and the mask and corrections of the shared block then have one row per query (the user's
own items are masked, which covers each row's positive). Per-user sources need one query per row.

With ``merge``, a shared item drawn m times (a popular item is several rows' positive, or also a uniform
draw) is one column whose correction is lowered by log m: Σ over its m copies of e^(s - log n·q) is
e^(s - (log n·q - log m)), so the sampled softmax's loss and gradients are the same, for fewer columns
to score (a batch of 1024 positives and 512 uniform draws holds ~825 distinct items on ml-100k, ~1230 on
ml-latest-small, ~1460 on gowalla). The same holds for BPR's self-normalised weights, not for NCE's mean.

Given ``known`` (the rows' users' training positives), a shared column that is one of the row's user's
own items is masked too, not only the row's own positive: an in-batch column is another row's positive,
and on dense data a fifth of them belong to the row's own user (ml-100k 24%, ml-latest-small 21%;
uniform draws 5-8%). Taught as negatives they pushed down what the user had chosen; masking them gave
+2.4% and +3.5% NDCG@10 there (docs/benchmarks.md). Per-user sources need no mask: mined negatives
already skip known positives, feedback negatives are the user's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from trainer.samplers import Draw, Sampler

_TINY = 1e-30  # log of an impossible count stays finite; masked columns never reach the loss anyway


@dataclass
class Columns:
    """What one step scores. ``lookup`` is every item row to embed, in the order ``scores`` reads it."""

    lookup: np.ndarray  # positives (B), then the shared draws that are not in-batch, then per-user rows
    shared: list[tuple[str, int]]  # (source, width) of the shared blocks, in column order
    # (Q, C + W): False for accidental hits (a row's own positive) and invalid slots; None when ``off`` holds it
    valid: np.ndarray | None
    neg_logq: np.ndarray  # (1, C) without per-user columns, else (B, C + W)
    pos_logq: np.ndarray  # (B,)
    live: np.ndarray  # rows that have per-user negatives (their W columns are embedded)
    width: int  # W
    sources: list[tuple[str, int]]  # (source, width) of every block, shared first
    query_of_row: np.ndarray | None = None  # (B,): the query row that scores each row; None: row b is query b
    # merged shared columns: for each drawn shared column, the merged column that scores it (None: unmerged)
    expand: np.ndarray | None = None
    # the masked logits as a sparse (Q, C) matrix, in place of a dense ``valid``, when queries are shared:
    # a user's own items are ~0.1% of the block on gowalla (5% on ml-latest-small), yet the dense mask
    # cost a numpy (Q, C) block and a masked pass over the logits every step (~3 ms of a ~28 ms step)
    off: sparse.csr_matrix | None = None

    @property
    def mask(self) -> np.ndarray:
        """The dense (Q, C + W) validity, built from ``off`` when that is how it is kept."""
        if self.valid is None:
            assert self.off is not None
            self.valid = np.ones(self.off.shape, dtype=bool)
            self.valid[self.off_positions()] = False
        return self.valid

    def off_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """The (query row, column) positions of ``off``'s masked logits."""
        assert self.off is not None
        rows = np.repeat(np.arange(self.off.shape[0]), np.diff(self.off.indptr))
        return rows, self.off.indices.astype(np.int64)

    def row_mask(self, rows: slice) -> np.ndarray:
        """The mask of training rows ``rows`` (one mask row per training row), one column per draw."""
        mask = self.mask[rows] if self.query_of_row is None else self.mask[self.query_of_row[rows]]
        cols = self.draw_columns()
        return mask if cols is None else mask[:, cols]

    def draw_columns(self) -> np.ndarray | None:
        """For each drawn column (shared draws, then per-user ones), the scored column that holds it: what
        per-source diagnostics read to see one column per draw again. None: every draw is a column."""
        if self.expand is None:
            return None
        n_columns = (self.valid if self.valid is not None else self.off).shape[1]
        return np.concatenate([self.expand, np.arange(self.width) + n_columns - self.width])


def expected_counts(items: np.ndarray, shared: Sequence[Sampler], batch: int) -> np.ndarray:
    """Σ over shared samplers of the expected number of draws of each item in one batch."""
    total = np.zeros(np.shape(items), dtype=np.float64)
    for s in shared:
        total += (batch if s.name == "in-batch" else s.n) * s.prob(items)
    return total


def assemble(positives: np.ndarray, draws: Sequence[Draw], shared_samplers: Sequence[Sampler],
             logq: bool = True, known: sparse.csr_matrix | None = None,
             query_of_row: np.ndarray | None = None, merge: bool = False) -> Columns:
    """Lay out one batch's draws; ``shared_samplers`` are the active samplers whose q is global;
    ``known`` (rows × items, optional): each row's user's training positives, masked out of the shared
    columns. With ``query_of_row``, ``known`` has one row per query and rows share their query's mask.
    With ``merge``, repeated shared items are one column each (see the module doc)."""
    b = positives.size
    shared = [d for d in draws if d.shared]
    per_user = [d for d in draws if not d.shared]
    drawn = np.concatenate([d.items for d in shared]) if shared else np.zeros(0, dtype=np.int64)
    s_items, expand, off = drawn, None, None  # the shared columns: one per draw, or (merged) one per distinct item
    if merge and drawn.size:
        s_items, expand = np.unique(drawn, return_inverse=True)
        lookup = [positives, s_items]
    else:
        lookup = [positives, *[d.items for d in shared if d.source != "in-batch"]]  # in-batch reuses positives
    if query_of_row is not None:
        if known is None or per_user:
            raise ValueError("rows share a query's columns only with the known mask and no per-user draws")
        off = known[:, s_items]  # a row's positive is one of its user's known items
        off.eliminate_zeros()
        mask = None
    else:
        mask = s_items[None, :] != positives[:, None]
        if known is not None and s_items.size:
            mask &= ~(known[:, s_items].toarray() > 0)
    s_logq, pos_logq = _shared_logq(positives, drawn, shared, shared_samplers, b, expand, logq)
    live, width = np.zeros(0, dtype=np.int64), 0
    neg_logq = s_logq[None, :]
    if per_user:
        u_items = np.concatenate([d.items for d in per_user], axis=1)
        valid = np.concatenate([d.valid for d in per_user], axis=1)
        width = u_items.shape[1]
        live = np.flatnonzero(valid.any(1))  # hard mining may cover part of the batch
        lookup.append(u_items[live].reshape(-1))
        u_count = np.concatenate([d.n * d.q for d in per_user], axis=1)
        if shared_samplers:
            u_count = u_count + expected_counts(u_items, shared_samplers, b)
        mask = np.concatenate([mask, valid & (u_items != positives[:, None])], axis=1)
        u_logq = np.log(np.maximum(u_count, _TINY)) if logq else np.zeros(u_count.shape)
        neg_logq = np.concatenate([np.broadcast_to(neg_logq, (b, neg_logq.shape[1])), u_logq], axis=1)
    if not logq and expand is None:
        neg_logq = np.zeros((1, 1))
    shared_blocks = ([("merged", s_items.size)] if expand is not None
                     else [(d.source, d.items.shape[-1]) for d in shared])
    return Columns(np.concatenate(lookup).astype(np.int64), shared_blocks,
                   mask, neg_logq.astype(np.float32), pos_logq.astype(np.float32), live, width,
                   [(d.source, d.items.shape[-1]) for d in (*shared, *per_user)], query_of_row, expand, off)


def _shared_logq(positives: np.ndarray, drawn: np.ndarray, shared: Sequence[Draw], shared_samplers: Sequence[Sampler],
                 b: int, expand: np.ndarray | None, logq: bool) -> tuple[np.ndarray, np.ndarray]:
    """The shared columns' corrections (C,) and the positives' (B,); ``drawn`` are the shared draws' items
    in order. A merged column holds m draws: its correction is -log Σ over them of e^(-correction)
    (log n·q - log m when they share their q)."""
    if shared_samplers:
        s_count = expected_counts(drawn, shared_samplers, b)
        pos_count = expected_counts(positives, shared_samplers, b)
    else:  # no global q (a per-user source alone): each shared draw by its own q, positives uncorrected
        s_count = np.concatenate([d.n * d.q for d in shared]) if shared else np.zeros(0)
        pos_count = np.ones(b)
    s_logq = np.log(np.maximum(s_count, _TINY)) if logq else np.zeros(s_count.shape)
    if expand is not None:
        s_logq = -np.log(np.bincount(expand, weights=np.exp(-s_logq)))
    pos_logq = np.log(np.maximum(pos_count, _TINY)) if logq and shared_samplers else np.zeros(b)
    return s_logq, pos_logq
