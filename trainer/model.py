"""The model: item vectors and a user tower, scored by one inner product (what FAISS serves).

Items are ``[normalize(e_j), b_j]``: a cosine part and, by default, a learned bias that carries popularity
and quality, which a cosine alone cannot (measured: +35% NDCG@10 on gowalla, +1% on ml-100k). Users are
queries made by the rule in trainer/towers.py from a pooled history of their items and/or a free
trained vector; training leaves each positive out of its own user's history, so the model learns to
predict an item from the *other* items, which is what it must do for items the user has not had yet.
Cosine scores with a temperature make the softmax sharpness a setting rather than something the norms
drift into, and need no weight decay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core box spinning threads starve each
# other and a training step got 7x slower (measured); set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import sparse  # noqa: E402
from torch import nn  # noqa: E402

from trainer import towers  # noqa: E402
from trainer.kernels import sum_rows  # noqa: E402
from trainer.towers import UserTower  # noqa: E402


@dataclass
class Histories:
    """The history bags behind one step's query rows, as EmbeddingBag arguments.

    ``items``/``offsets`` hold each distinct user's history once; ``inverse`` maps query rows to them.
    ``leave_out`` (optional) are items removed from the query rows ``leave_query`` (a training row's
    positive, left out of the query that scores it); ``counts`` are the query rows' history lengths
    after leaving out."""

    items: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    leave_out: torch.Tensor | None = None
    leave_query: torch.Tensor | None = None

    @classmethod
    def of(cls, positives: sparse.csr_matrix, users: np.ndarray, leave_out: np.ndarray | None = None,
           leave_query: np.ndarray | None = None, device: torch.device | str = "cpu") -> Histories:
        """Query rows for ``users`` (repeats allowed) from their rows of ``positives``, each item of
        ``leave_out`` removed from query row ``leave_query`` (default: the i-th from the i-th)."""
        uniq, inverse = np.unique(np.asarray(users, dtype=np.int64), return_inverse=True)
        starts = positives.indptr[uniq].astype(np.int64)
        lens = positives.indptr[uniq + 1].astype(np.int64) - starts
        offsets = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        flat = np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        counts = lens[inverse]
        if leave_out is not None:
            leave_query = np.arange(len(users)) if leave_query is None else np.asarray(leave_query, np.int64)
            counts = counts - np.bincount(leave_query, minlength=len(users))

        def t(x: np.ndarray | None, dtype: type = np.int64) -> torch.Tensor | None:
            return None if x is None else torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(device)

        return cls(t(positives.indices[flat]), t(offsets), t(inverse), t(counts, np.float32), t(leave_out),
                   t(leave_query))

    def head(self, rows: int) -> Histories:
        """The first ``rows`` query rows alone, with only the bags they use. The hard sampler mines for
        a quarter of a batch: pooling every row's history to search for that quarter cost a sixth of a
        step (5M-event epoch, 2 threads)."""
        if rows >= self.inverse.numel():
            return self
        items, offsets = self.items.cpu().numpy(), self.offsets.cpu().numpy()
        ends = np.append(offsets[1:], items.size)
        used, inverse = np.unique(self.inverse[:rows].cpu().numpy(), return_inverse=True)
        lens = ends[used] - offsets[used]
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        flat = np.repeat(offsets[used] - starts, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        leave_out = leave_query = None
        if self.leave_out is not None and self.leave_query is not None:
            keep = self.leave_query < rows
            leave_out, leave_query = self.leave_out[keep], self.leave_query[keep]

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(self.items.device)

        return Histories(t(items[flat]), t(starts), t(inverse), self.counts[:rows], leave_out, leave_query)

    def pool_matrix(self, n_items: int) -> tuple[torch.Tensor, sparse.csr_matrix]:
        """(the distinct items of every bag, a bags × those items CSR of ones): the sum of a bag is one
        sparse row times the items' vectors, and its gradient reaches each distinct item once."""
        items = self.items.cpu().numpy()
        mark = np.zeros(n_items, dtype=bool)
        mark[items] = True
        rows = np.flatnonzero(mark)
        col = (np.cumsum(mark) - 1)[items]
        indptr = np.append(self.offsets.cpu().numpy(), items.size)
        pool = sparse.csr_matrix((np.ones(items.size, dtype=np.float32), col, indptr),
                                 shape=(indptr.size - 1, rows.size))
        return torch.from_numpy(rows).to(self.items.device), pool


class _PoolSum(torch.autograd.Function):
    """``pool @ vectors`` on the CPU for a CSR ``pool`` of ones. embedding_bag's backward writes one
    gradient row per bag entry (every item of every history in the batch), which the optimiser must then
    coalesce; here the gradient is ``pool.T @ grad``, one row per distinct item (ml-latest-small: ~80k
    entries, ~8k items), by the same row-sum kernel over the transposed matrix."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, vectors: torch.Tensor,
                pool: sparse.csr_matrix) -> torch.Tensor:
        ctx.pool = pool
        return torch.from_numpy(sum_rows(torch.get_num_threads(), pool.indptr, pool.indices,
                                         vectors.detach().contiguous().numpy()))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        t = ctx.pool.T.tocsr()  # type: ignore[attr-defined]
        return torch.from_numpy(sum_rows(torch.get_num_threads(), t.indptr, t.indices,
                                         grad.contiguous().numpy())), None


NORM_EPS = 1e-12  # F.normalize's


class _Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=-1)``, the same forward, with the gradient in one expression:
    ``(g - y·(g·y)) / |x|``. Autograd's chain for it (norm, clamp, expand, divide) took 2.5x as long for a
    step's 1536 item rows (0.95 against 0.36 ms forward and backward, one thread), and a step normalises
    three to four such tensors."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        n = x.norm(2, -1, keepdim=True).clamp_min(NORM_EPS)
        y = x / n
        ctx.save_for_backward(y, n)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        y, n = ctx.saved_tensors  # type: ignore[attr-defined]
        along = (g * y).sum(-1, keepdim=True).masked_fill_(n <= NORM_EPS, 0.0)  # clamped: x / eps is linear
        return (g - y * along).div_(n)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (rows shorter than ``NORM_EPS`` divided by it)."""
    return _Normalize.apply(x)


class HistorySampler:
    """Per-row history bags of at most ``cap`` items, each row's positive left out.

    When a user has more than ``cap`` other items, ``cap`` of them are drawn at random (with replacement),
    so a step's cost no longer grows with the longest histories, and the random subset acts as a dropout
    on the history. The service pools the whole history; the query is normalised, so only its direction
    counts. ``cap=None`` gives the whole history (``Histories.of``)."""

    def __init__(self, positives: sparse.csr_matrix, cap: int | None) -> None:
        self.positives, self.cap = positives, cap
        if cap is not None:  # positives come from data.csr: canonical, indices sorted within each row
            row_of = np.repeat(np.arange(positives.shape[0], dtype=np.int64), np.diff(positives.indptr))
            self.keys = row_of * positives.shape[1] + positives.indices

    def bags(self, users: np.ndarray, leave_out: np.ndarray, rng: np.random.Generator,
             device: torch.device | str = "cpu", row_query: np.ndarray | None = None) -> Histories:
        """Bags for the query users ``users``; ``leave_out[b]`` is training row b's positive, left out of
        query ``row_query[b]`` (default: query b). Capped bags are drawn per row (one query per row)."""
        if self.cap is None:
            return Histories.of(self.positives, users, leave_out, row_query, device)
        if row_query is not None:
            raise ValueError("capped history bags are drawn per training row: one query per row")
        p, cap = self.positives, self.cap
        users = np.asarray(users, dtype=np.int64)
        starts = p.indptr[users].astype(np.int64)
        n = p.indptr[users + 1].astype(np.int64) - starts - 1  # items left once the positive is out
        skip = np.searchsorted(self.keys, users * p.shape[1] + np.asarray(leave_out)) - starts
        m = np.minimum(n, cap)
        offsets = np.concatenate(([0], np.cumsum(m)[:-1])).astype(np.int64)
        j = np.arange(int(m.sum()), dtype=np.int64) - np.repeat(offsets, m)
        n_rep = np.repeat(n, m)
        k = np.where(n_rep <= cap, j, (rng.random(j.size) * n_rep).astype(np.int64))
        k += k >= np.repeat(skip, m)  # step over the left-out positive
        items = p.indices[np.repeat(starts, m) + k].astype(np.int64)

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device)

        return Histories(t(items), t(offsets), t(np.arange(users.size, dtype=np.int64)), t(m.astype(np.float32)))


class TowerModel(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int = 64, *, tower: UserTower | None = None,
                 init_std: float = 0.1, sparse: bool = True, tie_history: bool = False) -> None:
        super().__init__()
        self.tower = tower or UserTower(temperature=0.2, free=True, pooled=False, bias=False)
        if self.tower.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not (self.tower.free or self.tower.pooled):
            raise ValueError("a user tower needs a free vector, a pooled history, or both")
        self.dim = dim

        def table(rows: int, width: int = dim, std: float = init_std) -> nn.Embedding:
            # sparse gradients: a step touches a few thousand rows, not the whole table (trainer/optim.py)
            emb = nn.Embedding(rows, width, sparse=sparse)
            nn.init.normal_(emb.weight, std=std)
            return emb

        self.item = table(n_items)
        self.bias = table(n_items, 1, 0.0) if self.tower.bias else None
        # tied: the history pooled is the item table itself (fewer parameters: an item's vector as a
        # candidate and as evidence of taste is one vector)
        self.history = (self.item if tie_history else table(n_items)) if self.tower.pooled else None
        self.user = table(n_users) if self.tower.free else None
        self.positives: sparse.csr_matrix | None = None  # the histories export() pools by default

    def users(self, rows: torch.Tensor, histories: Histories | None = None) -> torch.Tensor:
        """Query vectors of the users ``rows`` (already divided by τ, with the bias's 1), so that
        users @ items.T are logits; ``histories`` has one query row per entry of ``rows``."""
        if self.history is None:
            return self._query(rows, None, None, None)
        if histories is None:
            raise ValueError("a pooled tower needs the users' histories")
        if self.history.weight.is_cuda:
            s = F.embedding_bag(histories.items, self.history.weight, histories.offsets, mode="sum",
                                sparse=self.history.sparse)
        else:
            distinct, pool = histories.pool_matrix(self.history.num_embeddings)
            s = _PoolSum.apply(self.history(distinct), pool)
        left = None if histories.leave_out is None else self.history(histories.leave_out)
        return self._query(rows, histories, s, left)

    def _query(self, rows: torch.Tensor, histories: Histories | None, s: torch.Tensor | None,
               left: torch.Tensor | None) -> torch.Tensor:
        """``users`` from each bag's sum ``s`` and the vectors of the items left out of the query rows."""
        parts = []
        if s is not None and histories is not None:
            # index_select: its backward is an index_add, ~8x cheaper than s[...]'s accumulating index_put
            s = s.index_select(0, histories.inverse)
            if left is not None:
                s = s.index_add(0, histories.leave_query, left, alpha=-1)
            n = histories.counts
            scale = torch.where(n > 0, n.clamp(min=1.0) ** -self.tower.pool_exponent, torch.zeros_like(n))
            parts.append(s * scale[:, None])
        if self.user is not None:
            parts.append(self.user(rows))
        if self.tower.normalize_parts:
            parts = [normalize(p) for p in parts]
        q = normalize(sum(parts)) / self.tower.temperature
        if self.bias is not None:
            q = torch.cat([q, torch.ones_like(q[:, :1])], dim=1)
        return q

    def items(self, rows: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors of ``rows`` (``vectors``: their rows of the item table, when already looked up)."""
        v = normalize(self.item(rows) if vectors is None else vectors)
        return torch.cat([v, self.bias(rows)], dim=1) if self.bias is not None else v

    def forward(self, user_rows: torch.Tensor, histories: Histories | None,
                item_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item vectors of one step in one call.

        With the history tied to the item table (on the CPU), every row the step reads from that table —
        the candidates, the histories' items, the left-out positives — is looked up at once: one sparse
        gradient, where torch added three with an axpy per row (a ml-latest-small step: -2.6%)."""
        if self.history is not self.item or histories is None or self.item.weight.is_cuda:
            return self.users(user_rows, histories), self.items(item_rows)
        distinct, pool = histories.pool_matrix(self.item.num_embeddings)
        sets = [item_rows, distinct] if histories.leave_out is None else [item_rows, distinct, histories.leave_out]
        got = self.item(torch.cat(sets)).split([len(x) for x in sets])
        left = got[2] if len(got) > 2 else None
        return self._query(user_rows, histories, _PoolSum.apply(got[1], pool), left), self.items(item_rows, got[0])

    @torch.no_grad()
    def tables(self) -> dict[str, np.ndarray | None]:
        """The raw tables a checkpoint stores for the service to make fresh vectors (trainer/towers.py)."""
        def get(emb: nn.Embedding | None) -> np.ndarray | None:
            return None if emb is None else emb.weight.detach().cpu().numpy().astype(np.float32)

        return {"history": get(self.history), "free": get(self.user)}

    @torch.no_grad()
    def export(self, positives: sparse.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(user queries, item vectors) float32, whose dot products equal the training logits.

        Queries are made by trainer/towers.py from the raw tables, the same rule the service applies,
        over ``positives`` (default: the histories the model was trained with)."""
        positives = self.positives if positives is None else positives
        t = self.tables()
        parts = []
        if self.history is not None:
            if positives is None:
                raise ValueError("a pooled tower needs the users' histories to export")
            parts.append(towers.pool_all(t["history"], positives, self.tower.pool_exponent))
        if self.user is not None:
            parts.append(t["free"])
        if self.tower.normalize_parts:
            parts = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), towers.EPS) for p in parts]
        return towers.finish(self.tower, np.sum(parts, axis=0)), self.item_table()

    @torch.no_grad()
    def item_table(self) -> np.ndarray:
        rows = torch.arange(self.item.num_embeddings, device=self.item.weight.device)
        return self.items(rows).cpu().numpy().astype(np.float32)
