"""Show the negatives a sampler would draw for one user under a served model. Torch-free.

Used by the admin endpoint ``GET /admin/users/{id}/negatives`` and by ``recsys negatives show``: the
point is to *see* whether a strategy yields trivial negatives (far below the user's positives),
informative ones, or false negatives (items the user actually likes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from trainer.checkpoint import Checkpoint
from trainer.samplers import (
    STRATEGIES,
    AliasTable,
    Draw,
    FeedbackSampler,
    HardSampler,
    InBatchSampler,
    PopularitySampler,
    UniformSampler,
)

EASY_MARGIN = 3.0  # logits: a negative scoring this far below the user's mean positive score is "easy"


def _feedback_matrix(ckpt: Checkpoint, user: int, items: list[str] | None) -> sparse.csr_matrix:
    rows = [ckpt.item_row[i] for i in (items or []) if i in ckpt.item_row]
    return sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), ([user] * len(rows), rows)),
                             shape=(len(ckpt.user_ids), len(ckpt.item_ids)))


def _draws(ckpt: Checkpoint, user: int, strategy: str, n: int, rng: np.random.Generator, *,
           feedback_items: list[str] | None, pool: int, skip: int, alpha: float) -> list[Draw]:
    pop = np.asarray(ckpt.item_popularity, dtype=np.float64)
    users = np.array([user])
    uvec = np.asarray(ckpt.user_embeddings[user:user + 1], dtype=np.float32)

    def hard(k: int) -> list[Draw]:
        s = HardSampler(ckpt.seen, k, pool=min(pool, len(ckpt.item_ids)), skip=skip)
        s.index = ckpt.load_index()
        s.built_at = 0
        return s.sample(users, np.zeros(1, dtype=np.int64), rng, uvec)

    def in_batch(k: int) -> list[Draw]:
        # a user's in-batch negatives are the positives of a random batch: popularity-distributed
        fake_batch = AliasTable(np.maximum(pop, 0) + (pop.sum() == 0)).draw(rng, k)
        return InBatchSampler(np.maximum(pop, 1e-12)).sample(users, fake_batch, rng)

    def feedback(k: int) -> list[Draw]:
        return FeedbackSampler(_feedback_matrix(ckpt, user, feedback_items), k).sample(users, users, rng)

    if strategy == "uniform":
        return UniformSampler(pop > 0 if (pop > 0).any() else np.ones(pop.size, bool), n).sample(users, users, rng)
    if strategy == "popularity":
        return PopularitySampler(pop if (pop > 0).any() else np.ones(pop.size), n, alpha).sample(users, users, rng)
    if strategy == "in-batch":
        return in_batch(n)
    if strategy == "hard":
        return hard(n)
    if strategy == "feedback":
        return feedback(n)
    # mixed: half in-batch (popularity-distributed), the rest hard, plus feedback when there is any
    out = in_batch(n - n // 2) + hard(max(n // 2, 1))
    if feedback_items:
        out += feedback(max(n // 4, 1))
    return out


def draw_negatives(ckpt: Checkpoint, user_id: str, strategy: str, n: int, *,
                   feedback_items: list[str] | None = None, seed: int | None = None, pool: int = 100,
                   skip: int = 5, alpha: float = 0.75) -> dict[str, Any]:
    """Draw ``n`` negatives for ``user_id`` (external id) with ``strategy`` and describe each one.

    Strategy "feedback" draws from ``feedback_items`` (the caller's explicit negatives for the user;
    when None, those stored in the checkpoint); with none it returns no negatives rather than failing.

    ``easy_share`` is the share of (valid) negatives whose score is more than EASY_MARGIN logits below
    the mean score of the user's known positives: such negatives carry almost no softmax loss.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if user_id not in ckpt.user_row:
        raise KeyError(f"unknown user {user_id!r}: not in model {ckpt.version}")
    if not 1 <= n <= 10_000:
        raise ValueError(f"n must be between 1 and 10000, got {n}")
    user = ckpt.user_row[user_id]
    stored = getattr(ckpt, "feedback", None)  # explicit negatives saved with the checkpoint, if any
    if feedback_items is None and stored is not None and stored.nnz:
        feedback_items = [ckpt.item_ids[i] for i in stored.indices[stored.indptr[user]:stored.indptr[user + 1]]]
    rng = np.random.default_rng(seed)
    draws = _draws(ckpt, user, strategy, n, rng, feedback_items=feedback_items, pool=pool, skip=skip, alpha=alpha)

    scores = np.asarray(ckpt.item_embeddings, dtype=np.float32) @ np.asarray(ckpt.user_embeddings[user], np.float32)
    order_scores = np.sort(scores)
    seen = ckpt.seen.indices[ckpt.seen.indptr[user]:ckpt.seen.indptr[user + 1]]
    seen_set = set(seen.tolist())
    mean_pos = float(scores[seen].mean()) if seen.size else None

    negatives = []
    for d in draws:
        items, q = d.items.reshape(-1), d.q.reshape(-1)
        valid = np.ones(items.size, bool) if d.valid is None else d.valid.reshape(-1)
        for item, qi, ok in zip(items.tolist(), q.tolist(), valid.tolist(), strict=True):
            if not ok:
                continue
            s = float(scores[item])
            negatives.append({
                "item_id": ckpt.item_ids[item], "source": d.source, "q": float(qi), "score": s,
                "rank": int(scores.size - np.searchsorted(order_scores, s, side="right") + 1),
                "popularity": int(ckpt.item_popularity[item]), "known_positive": item in seen_set,
            })
    got = np.array([x["score"] for x in negatives]) if negatives else np.zeros(0)
    summary: dict[str, Any] = {
        "count": len(negatives),
        "mean_score": float(got.mean()) if got.size else None,
        "mean_positive_score": mean_pos,
        "easy_margin": EASY_MARGIN,
        "easy_share": float((got < mean_pos - EASY_MARGIN).mean()) if got.size and mean_pos is not None else None,
        "known_positive_share": float(np.mean([x["known_positive"] for x in negatives])) if negatives else None,
        "median_rank": float(np.median([x["rank"] for x in negatives])) if negatives else None,
        "n_items": int(scores.size),
    }
    return {"user_id": user_id, "strategy": strategy, "model_version": ckpt.version,
            "negatives": negatives, "summary": summary}
