"""Show the negatives the trainer's own sampler draws for one user under a checkpoint. Torch-free.

Used by the admin endpoint ``GET /admin/users/{id}/negatives`` and by ``recsys negatives show``: the
point is to *see* whether training yields trivial negatives (far below the user's positives),
informative ones, or false negatives (items the user actually likes).

The sampler is the one training used: ``make_sampler`` with the configuration recorded in the
checkpoint's manifest (``config.sampler``). Strategy ``trained`` draws what training drew, its sources
blended as training blends them ("hard" and "feedback" ride on uniform negatives); ``mixed`` draws the
recorded blend; a single source's name (uniform, popularity, in-batch, hard, feedback) draws that source
alone, with its recorded settings. Outside training there is no batch: in-batch negatives are the
positives of a simulated batch of the trained size, drawn by popularity (as training batches arrive), and
hard negatives are mined from an exact index over the checkpoint's item vectors, after any warm-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import sparse

from trainer.checkpoint import Checkpoint
from trainer.samplers import (
    STRATEGIES,
    AliasTable,
    Draw,
    HardSampler,
    MixedSampler,
    Sampler,
    SamplerConfig,
    make_sampler,
)

TRAINED = "trained"
CHOICES = (TRAINED, *STRATEGIES)
EASY_MARGIN = 3.0  # logits: a negative scoring this far below the user's mean positive score is "easy"
DEFAULT_BATCH = 1024  # trainer.train.TrainConfig.batch_size, for checkpoints that do not record theirs
AFTER_WARMUP = 2**62  # the training step the draws are made at: every warm-up is over
MAX_ROUNDS = 64  # training steps drawn at most to fill each source's share


def recorded_config(ckpt: Checkpoint) -> tuple[SamplerConfig, int, bool]:
    """The checkpoint's sampler configuration, its training batch size, and whether the manifest recorded
    a sampler configuration at all (False: the defaults stand in). Keys this version does not know are
    ignored, so a checkpoint from a newer trainer still loads."""
    config = ckpt.manifest.get("config") or {}
    recorded = config.get("sampler")
    known = {f.name for f in dataclasses.fields(SamplerConfig)}
    values = {k: v for k, v in (recorded or {}).items() if k in known}
    if "mixed" in values:
        values["mixed"] = tuple(values["mixed"])
    return SamplerConfig(**values), int(config.get("batch_size") or DEFAULT_BATCH), isinstance(recorded, dict)


def _components(sampler: Sampler) -> list[Sampler]:
    return [c.sampler for c in sampler.components] if isinstance(sampler, MixedSampler) else [sampler]


def _feedback_matrix(ckpt: Checkpoint, user: int, items: list[str] | None) -> sparse.csr_matrix:
    """The user's explicit negatives as the trainer's feedback matrix: ``items`` when given, else the
    checkpoint's own row (what training drew from)."""
    shape = (len(ckpt.user_ids), len(ckpt.item_ids))
    if items is None:
        stored = ckpt.feedback if ckpt.feedback is not None else sparse.csr_matrix(shape, dtype=np.float32)
        rows = stored.indices[stored.indptr[user] : stored.indptr[user + 1]].tolist()
    else:
        rows = [ckpt.item_row[i] for i in dict.fromkeys(items) if i in ckpt.item_row]
    return sparse.csr_matrix((np.ones(len(rows), np.float32), ([user] * len(rows), rows)), shape=shape)


def _shares(counts: dict[str, int], n: int) -> dict[str, int]:
    """``n`` split in proportion to ``counts`` (largest remainder), every source at least one when n allows."""
    total = sum(counts.values())
    if not total:
        return {name: 0 for name in counts}
    exact = {name: n * c / total for name, c in counts.items()}
    shares = {name: int(v) for name, v in exact.items()}
    for name in sorted(exact, key=lambda x: exact[x] - shares[x], reverse=True)[: n - sum(shares.values())]:
        shares[name] += 1
    for name in counts:  # a rare source still shows: take one from the largest share
        if counts[name] and not shares[name] and n >= len(counts):
            shares[max(shares, key=shares.__getitem__)] -= 1
            shares[name] = 1
    return shares


def _valid(draw: Draw) -> tuple[np.ndarray, np.ndarray]:
    items, q = draw.items.reshape(-1), draw.q.reshape(-1)
    if draw.valid is None:
        return items, q
    keep = draw.valid.reshape(-1)
    return items[keep], q[keep]


def _draw(ckpt: Checkpoint, user: int, cfg: SamplerConfig, alone: bool, batch: int, n: int,
          rng: np.random.Generator, feedback: sparse.csr_matrix,
          ) -> tuple[list[tuple[str, int, float]], dict[str, dict[str, int]]]:
    """(source, item row, q) of n negatives in training's proportions, and per source its draws per
    training row and how many are shown. ``alone``: only the source named by ``cfg.strategy``."""
    pop = np.asarray(ckpt.item_popularity, dtype=np.float64)
    # Mining searches one user here: the exact index that training's approximate one (above 20k items)
    # stands in for costs milliseconds, where building an IVF index for one request took ~6 s at 50k items.
    exact = dataclasses.replace(cfg, index_type="flat")
    parts = _components(make_sampler(exact, popularity=pop, known=ckpt.seen, feedback=feedback))
    if alone:
        parts = [part for part in parts if part.name == cfg.strategy]
    for part in parts:
        if isinstance(part, HardSampler):
            part.refresh(np.asarray(ckpt.item_embeddings, dtype=np.float32))
    batches = AliasTable(pop if pop.sum() > 0 else np.ones_like(pop))
    users, uvec = np.array([user]), np.asarray(ckpt.user_embeddings[user : user + 1], dtype=np.float32)
    found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    per_row: dict[str, int] = {}
    shares: dict[str, int] | None = None
    for _ in range(MAX_ROUNDS):  # one training step per round, each with a fresh simulated batch
        positives = batches.draw(rng, batch)
        for d in (d for part in parts for d in part.sample(users, positives, rng, uvec, AFTER_WARMUP)):
            found.setdefault(d.source, []).append(_valid(d))
            per_row[d.source] = d.n
        got = {s: sum(len(i) for i, _ in parts) for s, parts in found.items()}
        if shares is None:  # sources with nothing to draw for this user (no feedback, no candidates) get none
            shares = _shares({s: per_row[s] if got[s] else 0 for s in per_row}, n)
        if all(got[s] >= shares[s] for s in shares):
            break
    assert shares is not None
    out = []
    for source, parts in found.items():
        items = np.concatenate([i for i, _ in parts])[: shares[source]]
        qs = np.concatenate([q for _, q in parts])[: shares[source]]
        out += [(source, int(i), float(q)) for i, q in zip(items.tolist(), qs.tolist(), strict=True)]
    counts = {s: {"per_training_row": per_row[s], "shown": min(shares[s], got[s])} for s in per_row}
    return out, counts


def draw_negatives(ckpt: Checkpoint, user_id: str, strategy: str = TRAINED, n: int = 20, *,
                   feedback_items: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
    """Draw ``n`` negatives for ``user_id`` (external id) with ``strategy`` (see the module docstring) and
    describe each one.

    ``n`` is split between the sources in the proportions training draws them (each at least one).
    ``feedback_items``: the user's explicit negatives for the feedback source (None: the checkpoint's).
    ``easy_share`` is the share of negatives whose score is more than EASY_MARGIN logits below the mean
    score of the user's known positives: such negatives carry almost no softmax loss.
    """
    if strategy not in CHOICES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(CHOICES)}")
    if user_id not in ckpt.user_row:
        raise KeyError(f"unknown user {user_id!r}: not in model {ckpt.version}")
    if not 1 <= n <= 10_000:
        raise ValueError(f"n must be between 1 and 10000, got {n}")
    cfg, batch, recorded = recorded_config(ckpt)
    if strategy != TRAINED:
        cfg = dataclasses.replace(cfg, strategy=strategy)
    alone = strategy not in (TRAINED, "mixed")
    user = ckpt.user_row[user_id]
    rng = np.random.default_rng(seed)
    draws, sources = _draw(ckpt, user, cfg, alone, batch, n, rng, _feedback_matrix(ckpt, user, feedback_items))

    scores = np.asarray(ckpt.item_embeddings, dtype=np.float32) @ np.asarray(ckpt.user_embeddings[user], np.float32)
    order_scores = np.sort(scores)
    seen = ckpt.seen.indices[ckpt.seen.indptr[user]:ckpt.seen.indptr[user + 1]]
    seen_set = set(seen.tolist())
    mean_pos = float(scores[seen].mean()) if seen.size else None
    negatives = [{
        "item_id": ckpt.item_ids[item], "source": source, "q": q, "score": float(scores[item]),
        "rank": int(scores.size - np.searchsorted(order_scores, scores[item], side="right") + 1),
        "popularity": int(ckpt.item_popularity[item]), "known_positive": item in seen_set,
    } for source, item, q in draws]
    got = np.array([x["score"] for x in negatives]) if negatives else np.zeros(0)
    summary: dict[str, Any] = {
        "count": len(negatives),
        "sources": sources,
        "mean_score": float(got.mean()) if got.size else None,
        "mean_positive_score": mean_pos,
        "easy_margin": EASY_MARGIN,
        "easy_share": float((got < mean_pos - EASY_MARGIN).mean()) if got.size and mean_pos is not None else None,
        "known_positive_share": float(np.mean([x["known_positive"] for x in negatives])) if negatives else None,
        # training leaves these out of its loss (TrainConfig.mask_known); older checkpoints did not
        "known_positives_masked": bool((ckpt.manifest.get("config") or {}).get("mask_known", False)),
        "median_rank": float(np.median([x["rank"] for x in negatives])) if negatives else None,
        "n_items": int(scores.size),
    }
    sampler = {**dataclasses.asdict(cfg), "mixed": list(cfg.mixed), "batch_size": batch, "recorded": recorded}
    return {"user_id": user_id, "strategy": cfg.strategy, "requested": strategy, "sampler": sampler,
            "model_version": ckpt.version, "negatives": negatives, "summary": summary}
