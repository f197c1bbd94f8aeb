"""How a user's query vector is made: the one rule shared by training's export, the service's fresh vectors
and cold-user fold-in. Torch-free (numpy), so the request path can use it.

A model scores item j for user u as one inner product ``query(u) · item(j)``, which is what FAISS serves:

- ``item(j) = [normalize(e_j), b_j]`` with ``b_j`` a learned item bias when the tower has one (popularity
  and quality that a cosine cannot carry), else ``normalize(e_j)``;
- ``query(u) = [normalize(v_u) / τ, 1]`` (no trailing 1 without a bias), where ``v_u`` sums the parts the
  tower has: the *pooled* history ``Σ_{j ∈ H_u} c_j / |H_u|^β`` over the user's positive items (the
  ``history`` table c, so a new event changes the vector without retraining) and a *free* trained vector
  ``p_u``. With ``normalize_parts`` each part is normalised before the sum, so they weigh alike.

Checkpoints written before towers existed have neither table: their stored user vectors are the free
vectors, and a cold user is folded in by pooling item vectors (``items_as_history``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import sparse

EPS = 1e-12


@dataclass(frozen=True)
class UserTower:
    temperature: float = 1.0
    free: bool = True  # a trained vector per user (user_free_embeddings.npy, or the stored user vectors)
    pooled: bool = False  # a history table (history_embeddings.npy) pooled over the user's items
    pool_exponent: float = 0.5  # β: 0 sums, 1 averages, 0.5 in between (FISM)
    bias: bool = False  # item vectors end with a bias column, queries with a 1
    normalize_parts: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> UserTower:
        """The tower a checkpoint's manifest records; an older checkpoint's is free vectors, no bias."""
        spec = manifest.get("user_tower")
        if not spec:
            return cls(temperature=1.0, free=True, pooled=False, bias=False)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in spec.items() if k in known})


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, EPS)


def pool(history: np.ndarray, rows: np.ndarray, exponent: float) -> np.ndarray:
    """``Σ_{j ∈ rows} history[j] / |rows|^exponent`` (zeros for no rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros(history.shape[1], dtype=np.float32)
    return np.asarray(history[rows], dtype=np.float32).sum(axis=0) / np.float32(rows.size) ** exponent


def finish(tower: UserTower, v: np.ndarray) -> np.ndarray:
    """Turn summed parts (..., d) into query vectors: normalised, divided by τ, a 1 appended with a bias."""
    q = (_normalize(v) / tower.temperature).astype(np.float32)
    if tower.bias:
        q = np.concatenate([q, np.ones(q.shape[:-1] + (1,), dtype=np.float32)], axis=-1)
    return q


def query(tower: UserTower, history: np.ndarray | None, rows: np.ndarray | list[int],
          free: np.ndarray | None = None) -> np.ndarray | None:
    """One user's query vector from their positive item rows and (when the tower has one) free vector.

    None when there is nothing to go on (no history, no free vector): the caller falls back to popular.
    """
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    if tower.pooled and history is not None and rows.size:
        parts.append(pool(history, rows, tower.pool_exponent))
    if tower.free and free is not None:
        parts.append(np.asarray(free, dtype=np.float32))
    if not parts:
        return None
    if tower.normalize_parts:
        parts = [_normalize(p) for p in parts]
    return finish(tower, np.sum(parts, axis=0))


def pool_all(history: np.ndarray, positives: sparse.csr_matrix, exponent: float) -> np.ndarray:
    """Pooled history of every row of ``positives`` (a users × items 0/1 matrix), as one sparse product."""
    m = sparse.csr_matrix(positives, dtype=np.float32)
    counts = np.diff(m.indptr).astype(np.float32)
    scale = np.where(counts > 0, np.maximum(counts, 1.0) ** -exponent, 0.0).astype(np.float32)
    return np.asarray(sparse.diags(scale) @ (m @ np.asarray(history, dtype=np.float32)), dtype=np.float32)


def items_as_history(item_vectors: np.ndarray, tower: UserTower) -> np.ndarray:
    """The item vectors without their bias column: what a tower without a history table pools."""
    return item_vectors[:, :-1] if tower.bias else item_vectors
