"""Negative samplers: one small class per strategy behind one interface. Torch-free (numpy + faiss).

Every draw returns the item rows, the probability q of one draw under that sampler, and a source
label, so a loss can apply the logQ correction whatever mix of samplers produced the negatives.
Two shapes exist: *shared* draws (one set of negatives for the whole batch: uniform, popularity,
in-batch) and *per-user* draws (hard, feedback), which carry a validity mask because a user can
have fewer candidates than requested. The HTTP service imports this module for its admin endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from trainer.config import STRATEGIES, SamplerConfig
from trainer.indexes import build_index
from trainer.kernels import in_rows


@dataclass
class Draw:
    """Negatives from one source. Shared: items/q have shape (n,); per-user: (B, n) with ``valid``."""

    items: np.ndarray
    q: np.ndarray
    source: str
    shared: bool
    n: int  # draws per row: the expected count of item j in the set is n * q(j)
    valid: np.ndarray | None = None


class PairIndex:
    """Fast membership test for (user, item) pairs, e.g. "is this sampled negative a known positive?"."""

    def __init__(self, matrix: sparse.csr_matrix) -> None:
        m = sparse.csr_matrix(matrix, copy=True)
        m.sum_duplicates()  # canonical: each row's indices sorted and unique
        self.indptr, self.indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Elementwise membership; users broadcasts against items."""
        u, i = np.broadcast_arrays(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64))
        if u.size and (u.min() < 0 or u.max() >= self.indptr.size - 1):
            raise ValueError(f"user rows must lie in [0, {self.indptr.size - 1})")
        out = np.empty(u.shape, dtype=bool)
        in_rows(self.indptr, self.indices, np.ascontiguousarray(u).ravel(), np.ascontiguousarray(i).ravel(),
                out.reshape(-1))
        return out


class Sampler:
    """Interface: ``sample`` returns a list of Draws; ``prob`` gives q for any item when it is defined."""

    name = "base"
    shared = True

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"{self.name}: need at least one negative per draw, got {n}")
        self.n = int(n)

    def sample(
        self, users: np.ndarray, positives: np.ndarray, rng: np.random.Generator,
        user_vectors: np.ndarray | None = None, step: int = 0,
    ) -> list[Draw]:
        raise NotImplementedError

    def prob(self, items: np.ndarray) -> np.ndarray | None:
        """q(item) for one draw, or None when the sampler's q depends on the user (hard, feedback)."""
        return None

    def on_step(self, step: int, item_vectors: Any) -> None:
        """Called before every training step; ``item_vectors`` is a zero-argument callable."""

    def stats(self) -> dict[str, float]:
        return {}


class UniformSampler(Sampler):
    """q(j) = 1/|I| over the candidate items (those with a train positive)."""

    name = "uniform"

    def __init__(self, candidates: np.ndarray, n: int = 256) -> None:
        super().__init__(n)
        self.items = np.flatnonzero(candidates).astype(np.int64)
        if self.items.size == 0:
            raise ValueError("uniform: no candidate items")
        self._q = np.zeros(len(candidates))
        self._q[self.items] = 1.0 / self.items.size

    def sample(self, users, positives, rng, user_vectors=None, step=0):  # noqa: ANN001, ANN201
        items = self.items[rng.integers(0, self.items.size, self.n)]
        return [Draw(items, self._q[items], self.name, True, self.n)]

    def prob(self, items: np.ndarray) -> np.ndarray:
        return self._q[items]


class AliasTable:
    """Walker/Vose alias method: O(n) build, O(1) per draw from any discrete distribution."""

    def __init__(self, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError("alias table needs non-negative weights with a positive sum")
        n = w.size
        self.p = w / w.sum()
        scaled = self.p * n
        self.prob = np.ones(n)
        self.alias = np.arange(n)
        small = list(np.flatnonzero(scaled < 1.0))
        large = list(np.flatnonzero(scaled >= 1.0))
        scaled = scaled.copy()
        while small and large:
            s, g = small.pop(), large.pop()
            self.prob[s] = scaled[s]
            self.alias[s] = g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        # leftovers are 1 up to rounding
        for rest in (small, large):
            for k in rest:
                self.prob[k] = 1.0

    def draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        k = rng.integers(0, self.p.size, size)
        return np.where(rng.random(size) < self.prob[k], k, self.alias[k])


class PopularitySampler(Sampler):
    """q(j) ∝ count(j)^alpha (word2vec's 0.75 by default); alpha = 0 is uniform over seen items."""

    name = "popularity"

    def __init__(self, popularity: np.ndarray, n: int = 256, alpha: float = 0.75) -> None:
        super().__init__(n)
        counts = np.asarray(popularity, dtype=np.float64)
        weights = np.where(counts > 0, counts, 0.0) ** alpha * (counts > 0)
        self.alpha = alpha
        self.table = AliasTable(weights)

    def sample(self, users, positives, rng, user_vectors=None, step=0):  # noqa: ANN001, ANN201
        items = self.table.draw(rng, self.n)
        return [Draw(items, self.table.p[items], self.name, True, self.n)]

    def prob(self, items: np.ndarray) -> np.ndarray:
        return self.table.p[items]


class InBatchSampler(Sampler):
    """The batch's other positives; q(j) = count(j)/total because positives arrive by popularity.

    Its Draw is the batch's positives in row order, so column b is row b's own positive: the loss
    masks that diagonal (and repeats of the same item) rather than treating it as a negative.
    """

    name = "in-batch"

    def __init__(self, popularity: np.ndarray) -> None:
        super().__init__(1)
        counts = np.asarray(popularity, dtype=np.float64)
        self._q = counts / counts.sum()

    def sample(self, users, positives, rng, user_vectors=None, step=0):  # noqa: ANN001, ANN201
        items = np.asarray(positives, dtype=np.int64)
        return [Draw(items, self._q[items], self.name, True, int(items.size))]

    def prob(self, items: np.ndarray) -> np.ndarray:
        return self._q[items]


def _pick_per_row(eligible: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform draws (with replacement) of n column positions among each row's eligible columns."""
    m = eligible.sum(axis=1)
    order = np.argsort(~eligible, axis=1, kind="stable")  # eligible columns first, in rank order
    k = np.floor(rng.random((eligible.shape[0], n)) * np.maximum(m, 1)[:, None]).astype(np.int64)
    cols = np.take_along_axis(order, k, axis=1)
    return cols, m


class HardSampler(Sampler):
    """FAISS-mined hard negatives (ANCE-style), per user.

    The index over item vectors is rebuilt every ``refresh_every`` steps; between rebuilds it is
    stale by up to that many steps (reported). For each user: search the top ``pool`` items with
    the *current* user vector, drop known positives, skip the first ``skip`` remaining ranks (the
    likeliest false negatives) and draw ``n`` uniformly from the rest: q = 1/|rest| for that user.
    ``max_rows`` caps how many rows of a batch get hard negatives: the search is the cost that grows
    with the catalogue, and a quarter of a shuffled batch is still a fair sample of users.
    """

    name = "hard"
    shared = False

    def __init__(
        self, known: sparse.csr_matrix, n: int = 16, *, pool: int = 100, skip: int = 5,
        refresh_every: int = 200, index_type: str = "flat", candidates: np.ndarray | None = None,
        retrain_every: int = 10, max_rows: int | None = None,
    ) -> None:
        super().__init__(n)
        if pool <= skip:
            raise ValueError(f"hard: pool ({pool}) must exceed skip ({skip})")
        self.known = PairIndex(known)
        self.pool, self.skip, self.refresh_every, self.index_type = pool, skip, max(1, refresh_every), index_type
        self.retrain_every = max(1, retrain_every)
        self.max_rows = max_rows  # mine for the first max_rows rows of a (shuffled) batch only; None: all
        self.candidates = None if candidates is None else np.flatnonzero(candidates).astype(np.int64)
        self.index: Any = None
        self.built_at = -1
        self.refreshes = 0
        self.refresh_seconds = 0.0
        self.search_seconds = 0.0
        self.staleness_sum = 0
        self.samples = 0
        self.gpu: Any = None  # (resources, device) once use_gpu found a GPU build of FAISS

    def use_gpu(self, device: int = 0) -> bool:
        """Search on GPU ``device`` when this FAISS build has GPU support; False (CPU search) otherwise."""
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= device:
            return False
        self.gpu = (faiss.StandardGpuResources(), device)
        return True

    def refresh(self, item_vectors: np.ndarray, step: int = 0) -> None:
        """Rebuild the index over current item vectors. An IVF index keeps its coarse quantiser and only
        re-adds the vectors (k-means is the expensive part; a slightly stale partition costs little
        recall); the quantiser is retrained every ``retrain_every`` refreshes."""
        t = time.perf_counter()
        x = np.ascontiguousarray(item_vectors if self.candidates is None else item_vectors[self.candidates],
                                 dtype=np.float32)
        reuse = (self.index is not None and hasattr(self.index, "nprobe") and self.index.ntotal == x.shape[0]
                 and self.refreshes % self.retrain_every != 0)
        if reuse:
            self.index.reset()
            self.index.add(x)
        else:
            self.index = build_index(x, self.index_type)
            if self.gpu is not None:
                import faiss

                self.index = faiss.index_cpu_to_gpu(self.gpu[0], self.gpu[1], self.index)
        self.built_at = step
        self.refreshes += 1
        self.refresh_seconds += time.perf_counter() - t

    def on_step(self, step: int, item_vectors: Any) -> None:
        if self.index is None or step - self.built_at >= self.refresh_every:
            self.refresh(item_vectors(), step)

    def candidates_for(self, users: np.ndarray, user_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, pool) item rows in score order and the mask of those eligible (not known, not skipped)."""
        if self.index is None:
            raise RuntimeError("hard: the index has not been built (call refresh first)")
        t = time.perf_counter()
        _, found = self.index.search(np.ascontiguousarray(user_vectors, dtype=np.float32), self.pool)
        self.search_seconds += time.perf_counter() - t
        if self.candidates is not None:
            found = np.where(found >= 0, self.candidates[np.maximum(found, 0)], -1)
        ok = (found >= 0) & ~self.known.contains(np.asarray(users)[:, None], np.maximum(found, 0))
        rank = np.cumsum(ok, axis=1)  # 1-based rank among non-positive results
        return found, ok & (rank > self.skip)

    def sample(self, users, positives, rng, user_vectors=None, step=0):  # noqa: ANN001, ANN201
        if user_vectors is None:
            raise ValueError("hard: needs the batch's user vectors")
        users = np.asarray(users)
        rows = users.size if self.max_rows is None else min(self.max_rows, users.size)
        found, eligible = self.candidates_for(users[:rows], np.asarray(user_vectors)[:rows])
        cols, m = _pick_per_row(eligible, rng, self.n)
        items = np.zeros((users.size, self.n), dtype=np.int64)
        q = np.ones((users.size, self.n))
        valid = np.zeros((users.size, self.n), dtype=bool)
        valid[:rows] = (m > 0)[:, None]
        items[:rows] = np.where(valid[:rows], np.take_along_axis(found, cols, axis=1), 0)
        q[:rows] = np.where(valid[:rows], 1.0 / np.maximum(m, 1)[:, None], 1.0)
        self.staleness_sum += max(0, step - self.built_at)
        self.samples += 1
        return [Draw(items, q, self.name, False, self.n, valid)]

    def stats(self) -> dict[str, float]:
        return {
            "index_refreshes": self.refreshes,
            "index_refresh_s": round(self.refresh_seconds, 4),
            "hard_search_s": round(self.search_seconds, 4),
            "index_staleness_steps": round(self.staleness_sum / max(self.samples, 1), 2),
        }

    def reset_stats(self) -> None:
        self.refreshes, self.refresh_seconds, self.search_seconds = 0, 0.0, 0.0
        self.staleness_sum, self.samples = 0, 0


class FeedbackSampler(Sampler):
    """The user's own explicit negatives (dislike/skip/hide) and, when given, shown-but-not-clicked items.

    q = 1/|F_u| (uniform over the user's negatives, with replacement); users without any are masked.
    """

    name = "feedback"
    shared = False

    def __init__(self, feedback: sparse.csr_matrix, n: int = 4, impressions: sparse.csr_matrix | None = None) -> None:
        super().__init__(n)
        m = sparse.csr_matrix(feedback, dtype=np.float32)
        if impressions is not None:
            m = m + sparse.csr_matrix(impressions, dtype=np.float32)
        m.sum_duplicates()
        m.sort_indices()
        self.matrix = m

    def sample(self, users, positives, rng, user_vectors=None, step=0):  # noqa: ANN001, ANN201
        users = np.asarray(users, dtype=np.int64)
        start = self.matrix.indptr[users]
        count = self.matrix.indptr[users + 1] - start
        k = np.floor(rng.random((users.size, self.n)) * np.maximum(count, 1)[:, None]).astype(np.int64)
        valid = np.repeat((count > 0)[:, None], self.n, axis=1)
        idx = np.where(valid, start[:, None] + k, 0)
        items = self.matrix.indices[idx].astype(np.int64) if self.matrix.nnz else np.zeros_like(idx)
        q = np.where(valid, 1.0 / np.maximum(count, 1)[:, None], 1.0)
        return [Draw(items, q, self.name, False, self.n, valid)]


@dataclass
class Component:
    sampler: Sampler
    after_step: int = 0  # warm-up: the component joins once training reaches this step


class MixedSampler(Sampler):
    """A blend of samplers (Mixed Negative Sampling); the blend weights are each source's draw count.

    Each source's Draw keeps its own q, so the loss can correct each column by its own expected count.
    """

    name = "mixed"

    def __init__(self, components: list[Component]) -> None:
        if not components:
            raise ValueError("mixed: needs at least one component")
        self.components = components
        self.n = sum(c.sampler.n for c in components)

    def active(self, step: int) -> list[Sampler]:
        return [c.sampler for c in self.components if step >= c.after_step]

    def sample(self, users, positives, rng, user_vectors=None, step=0):  # noqa: ANN001, ANN201
        out: list[Draw] = []
        for s in self.active(step):
            out.extend(s.sample(users, positives, rng, user_vectors, step))
        return out

    def on_step(self, step: int, item_vectors: Any) -> None:
        for s in self.active(step):
            s.on_step(step, item_vectors)

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for c in self.components:
            merged.update(c.sampler.stats())
        return merged

    def find(self, name: str) -> Sampler | None:
        return next((c.sampler for c in self.components if c.sampler.name == name), None)


def make_sampler(
    cfg: SamplerConfig, *, popularity: np.ndarray, known: sparse.csr_matrix,
    feedback: sparse.csr_matrix | None = None, impressions: sparse.csr_matrix | None = None,
) -> Sampler:
    """Build the sampler for a strategy. "hard" and "feedback" ride on uniform negatives (a softmax over
    a handful of per-user negatives alone is too narrow); "mixed" blends the sources in ``cfg.mixed``."""
    candidates = popularity > 0

    def one(name: str) -> Component:
        if name == "uniform":
            return Component(UniformSampler(candidates, cfg.n_negatives))
        if name == "popularity":
            return Component(PopularitySampler(popularity, cfg.n_negatives, cfg.alpha))
        if name == "in-batch":
            return Component(InBatchSampler(popularity))
        if name == "hard":
            return Component(
                HardSampler(known, cfg.n_hard, pool=cfg.pool, skip=cfg.skip, refresh_every=cfg.refresh_every,
                            index_type=cfg.index_type, candidates=candidates, max_rows=cfg.hard_rows),
                after_step=cfg.hard_warmup_steps,
            )
        if name == "feedback":
            if feedback is None:
                raise ValueError("feedback: no explicit-negative matrix given")
            return Component(FeedbackSampler(feedback, cfg.n_feedback, impressions))
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")

    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if cfg.strategy in ("hard", "feedback"):
        return MixedSampler([one("uniform"), one(cfg.strategy)])
    if cfg.strategy == "mixed":
        return MixedSampler([one(name) for name in cfg.mixed])
    return one(cfg.strategy).sampler
