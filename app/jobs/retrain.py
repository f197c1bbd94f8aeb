"""The batch retraining job: new events in, a candidate model out, promoted only if it is not worse.

Safe to run from cron: a job lock keeps two runs from overlapping; the checkpoint is written
atomically and registered only when complete, so a run killed half-way leaves the promoted model
and the registry untouched.

The gate compares candidate and current model on the protocol's held-out slice, restricted to
(user, item) pairs the current model has never seen (their first event is newer than its
watermark): on older pairs the current model would be scored on its own training data.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.db import registry
from app.db.events import max_event_id, read_events, read_ignored_impressions
from app.db.lock import job_lock
from app.db.migrate import checked_engine
from app.settings import Settings
from trainer.checkpoint import (
    MANIFEST,
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    new_version,
    read_checkpoint,
)
from trainer.config import TrainConfig
from trainer.data import Dataset, build_dataset, csr
from trainer.evaluate import ScoreFn, dot_scores
from trainer.pipeline import RunResult, run, save, score_held_out
from trainer.towers import finish, pool_all
from trainer.train import load_model_state

STALE_TMP_SECONDS = 3600.0


class RetrainError(RuntimeError):
    """A run that could not finish; the promoted model is untouched."""


@dataclass
class RetrainOptions:
    config: TrainConfig = field(default_factory=TrainConfig)
    warm_start: bool = True
    metric: str = "ndcg@10"
    tolerance: float = 0.005  # absolute: the candidate may be this much worse and still ship
    force: bool = False
    keep: int = 5
    min_new_events: int = 1


@dataclass
class RetrainOutcome:
    status: str  # promoted | rejected | skipped
    version: str | None
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


def checkpoint_scores(ckpt: Checkpoint, data: Dataset) -> ScoreFn:
    """Score data's users x items with an older model as the service would: a pooled tower pools each
    user's training items (those the older model knows), a free one uses its stored vectors; unknown
    users get its popularity, items it does not know rank last."""
    user_map = np.array([ckpt.user_row.get(u, -1) for u in data.user_ids], dtype=np.int64)
    item_map = np.array([ckpt.item_row.get(i, -1) for i in data.item_ids], dtype=np.int64)
    known_item = item_map >= 0
    items = np.zeros((data.n_items, ckpt.dim), dtype=np.float32)
    items[known_item] = ckpt.item_embeddings[item_map[known_item]]
    pop = np.full(data.n_items, -np.inf, dtype=np.float32)
    pop[known_item] = ckpt.item_popularity[item_map[known_item]]
    tower = ckpt.tower
    queries = None
    if tower.pooled and ckpt.history_embeddings is not None:
        history = np.zeros((data.n_items, ckpt.history_embeddings.shape[1]), dtype=np.float32)
        history[known_item] = ckpt.history_embeddings[item_map[known_item]]
        train = csr(data.train_u, data.train_i, data.n_users, data.n_items)
        train = train[:, np.flatnonzero(known_item)]  # its history is what it knows of each user
        parts = [pool_all(history[known_item], train, tower.pool_exponent)]
        if tower.free and ckpt.user_free_embeddings is not None:
            free = np.zeros_like(parts[0])
            known_user = user_map >= 0
            free[known_user] = ckpt.user_free_embeddings[user_map[known_user]]
            parts.append(free)
        if tower.normalize_parts:
            parts = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts]
        queries = finish(tower, np.sum(parts, axis=0))

    def score(rows: np.ndarray) -> np.ndarray:
        mapped = user_map[rows]
        out = np.empty((rows.size, data.n_items), dtype=np.float32)
        known = mapped >= 0 if queries is None else np.ones(rows.size, dtype=bool)
        out[known] = (np.asarray(ckpt.user_embeddings)[mapped[known]] if queries is None else queries[rows]) @ items.T
        out[~known] = pop
        out[:, ~known_item] = -np.inf
        return out

    return score


def _new_pairs_mask(
    events: Any, data: Dataset, negative_types: frozenset[str], watermark: int | None
) -> np.ndarray:
    """For each held-out pair of ``data``: True if no positive event of that pair is at or below ``watermark``."""
    if watermark is None:
        return np.ones(data.val_u.size, dtype=bool)
    positive = ~events["type"].astype(str).str.lower().isin(negative_types).to_numpy()
    old = positive & (events["id"].to_numpy() <= watermark)
    user_row, item_row = data.user_row(), data.item_row()
    u = events["user_id"][old].map(user_row).to_numpy(dtype=np.int64)
    i = events["item_id"][old].map(item_row).to_numpy(dtype=np.int64)
    old_keys = np.unique(u * data.n_items + i)
    return ~np.isin(data.val_u * data.n_items + data.val_i, old_keys)


def ignored_impressions(engine: Any, data: Dataset) -> Any:
    """Served-but-ignored (user, item) pairs as a users x items matrix in data's rows (unknown ids dropped)."""
    pairs = read_ignored_impressions(engine)
    u = pairs["user_id"].map(data.user_row()).to_numpy(dtype=float, na_value=np.nan)
    i = pairs["item_id"].map(data.item_row()).to_numpy(dtype=float, na_value=np.nan)
    keep = ~(np.isnan(u) | np.isnan(i))
    return csr(u[keep].astype(np.int64), i[keep].astype(np.int64), data.n_users, data.n_items)


def prune_checkpoints(root: Path, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (never a protected version) and stale temporaries."""

    def created(p: Path) -> str:
        try:
            return str(json.loads((p / MANIFEST).read_text()).get("created_at", "")) + p.name
        except (OSError, ValueError):
            return p.name

    removed = []
    ordered = sorted(list_checkpoints(root), key=created, reverse=True)
    for path in ordered[keep:]:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)
    return removed


def retrain(
    settings: Settings, options: RetrainOptions, log: Callable[[str], None] = print
) -> RetrainOutcome:
    """Run the whole job under the lock; raise LockHeld, SchemaError or RetrainError on failure."""
    engine = checked_engine(settings.sqlalchemy_url)
    try:
        with job_lock(engine, "retrain"):
            return _retrain_locked(engine, settings, options, log)
    finally:
        engine.dispose()


def _current_model(
    engine: Any, log: Callable[[str], None]
) -> tuple[dict[str, Any] | None, Checkpoint | None, str | None]:
    """The promoted version, the checkpoint the run compares against, and a note when that is not the
    promoted one's.

    An unreadable promoted checkpoint must not make the run a "first model" (no new-events check, no gate):
    the newest readable version promoted before it stands in, and the run says so; when none is readable
    the run refuses (RetrainError), since there is nothing to hold a candidate against.
    """
    with engine.connect() as conn:
        history = registry.promoted_history(conn)
    if not history or history[0]["status"] != "promoted":
        return None, None, None
    current, problems = history[0], []
    for row in history:
        try:
            ckpt = read_checkpoint(row["path"])
        except CheckpointError as exc:
            problems.append(f"{row['version']}: {exc}")
            continue
        if row is current:
            return current, ckpt, None
        note = (
            f"the promoted model {current['version']} cannot be read ({problems[0]}); compared against "
            f"{row['version']}, the newest readable model promoted before it"
        )
        log(f"warning: {note}")
        return current, ckpt, note
    raise RetrainError(
        f"the promoted model {current['version']} cannot be read, nor can any model promoted before it "
        f"({'; '.join(problems)}): repair its checkpoint or promote a readable version "
        "(`recsys models promote`) so the candidate can be compared against it"
    )


def _gate(result: RunResult, current: Checkpoint | None, events: Any, negative_types: frozenset[str],
          options: RetrainOptions, old_watermark: int | None) -> dict[str, Any]:
    """Candidate (the selection model) against the current model on the held-out pairs newer than the
    current model: promoted unless worse by more than the tolerance."""
    gate: dict[str, Any] = {"metric": options.metric, "tolerance": options.tolerance, "against": None,
                            "decision": "promoted", "reason": "first model"}
    if current is None:
        return gate
    data = result.data
    mask = _new_pairs_mask(events, data, negative_types, old_watermark)
    slice_note = "pairs newer than the current model"
    if not mask.any():
        mask[:] = True
        slice_note = "whole held-out slice (no held-out pair is newer than the current model)"
    held_u, held_i = data.val_u[mask], data.val_i[mask]
    users, items = result.selection.model.export()
    # both models on every user of the slice, or on the same fixed sample of them for a large catalogue
    cand = score_held_out(data, dot_scores(users, items), held_u, held_i, sample=True)
    cur = score_held_out(data, checkpoint_scores(current, data), held_u, held_i, sample=True)
    c_val, p_val = cand[options.metric], cur[options.metric]
    gate.update(against=current.version, slice=slice_note, held_out_pairs=int(held_u.size), users=cand["users"],
                candidate=cand, current=cur)
    if c_val >= p_val - options.tolerance:
        gate["reason"] = f"{options.metric} {c_val:.4f} vs current {p_val:.4f} (tolerance {options.tolerance})"
    elif options.force:
        gate["reason"] = f"forced: {options.metric} {c_val:.4f} vs current {p_val:.4f}"
    else:
        gate["decision"] = "rejected"
        gate["reason"] = (f"{options.metric} {c_val:.4f} is worse than the current model's {p_val:.4f} "
                          f"by more than the tolerance {options.tolerance}")
    return gate


def _warm_state(current: Checkpoint | None, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The promoted model's weights to start from, or None (none promoted, or unreadable: from scratch)."""
    if current is None:
        return None
    try:
        state = load_model_state(current.extra_file("model.pt").read_bytes())
    except (CheckpointError, OSError, ValueError) as exc:
        log(f"warning: cannot warm-start from {current.version} ({exc}); training from scratch")
        return None
    log(f"warm start from {current.version}")
    return state


def _training_set(engine: Any, events: Any, watermark: int, settings: Settings, config: TrainConfig,
                  log: Callable[[str], None]) -> tuple[Dataset, TrainConfig, Any]:
    """The dataset, the config with the service's settings applied, and the ignored impressions."""
    if config.event_weights is None and settings.event_weights:
        # Per-event-type weights (RECSYS_EVENT_WEIGHTS); recorded in the checkpoint config.
        config = replace(config, event_weights=dict(settings.event_weights))
    try:
        data = build_dataset(
            events,
            validation=False,  # the pipeline holds each user's newest 20% out to choose the epochs
            watermark=watermark,
            negative_types=settings.negative_types,
            event_weights=config.event_weights,
        )
    except ValueError as exc:
        raise RetrainError(f"cannot build a training set: {exc}") from exc
    ignored = ignored_impressions(engine, data)
    log(f"{ignored.nnz:,} served-but-ignored impressions join the feedback negatives")
    mix = config.sampler.mixed
    if config.sampler.strategy == "mixed" and "feedback" not in mix and (data.feedback.nnz or ignored.nnz):
        # Users' own negatives are the point of a feedback loop: blend them in when there are any.
        config = replace(config, sampler=replace(config.sampler, mixed=(*mix, "feedback")))
        log(f"negatives: {' + '.join(config.sampler.mixed)}")
    return data, config, ignored


def _retrain_locked(
    engine: Any, settings: Settings, options: RetrainOptions, log: Callable[[str], None]
) -> RetrainOutcome:
    t0 = time.perf_counter()
    with engine.connect() as conn:
        watermark = max_event_id(conn)
    current, current_ckpt, note = _current_model(engine, log)
    old_watermark = current_ckpt.watermark if current_ckpt is not None else None
    new_events = watermark - (old_watermark or 0)
    if current_ckpt is not None and new_events < options.min_new_events and not options.force:
        return RetrainOutcome(
            "skipped", None, f"no new events since the promoted model's watermark {old_watermark}"
        )

    settings.checkpoints_path.mkdir(parents=True, exist_ok=True)  # a folder it cannot make fails now, not after the fit
    events = read_events(engine, until_id=watermark)
    if events.empty:
        raise RetrainError("the database holds no events: import some first (`recsys import`)")
    log(f"read {len(events):,} events up to id {watermark:,} ({new_events:,} new since the current model)")
    t_read = time.perf_counter()

    init_state = _warm_state(current_ckpt, log) if options.warm_start else None
    data, config, ignored = _training_set(engine, events, watermark, settings, options.config, log)
    # The pipeline `recsys train` runs: selection on the held-out newest 20%, then the fit of every event.
    result = run(data, config, init_state=init_state, impressions=ignored)
    t_train = time.perf_counter()
    gate = _gate(result, current_ckpt, events, settings.negative_types, options, old_watermark)
    status, reason = gate["decision"], gate["reason"]
    if note:
        gate["note"], reason = note, f"{reason} ({note})"
        gate["reason"] = reason
    t_gate = time.perf_counter()

    timing = {"read_s": round(t_read - t0, 2), "train_s": round(t_train - t_read, 2),
              "gate_s": round(t_gate - t_train, 2)}
    version, metrics = _save_and_register(engine, settings, result, gate, timing, t0, watermark,
                                          warm_start=init_state is not None)
    protect = {version} | ({current["version"]} if current else set())
    removed = prune_checkpoints(settings.checkpoints_path, options.keep, protect)
    if removed:
        log(f"pruned {len(removed)} old checkpoint(s): {', '.join(removed)}")
    return RetrainOutcome(status, version, reason, metrics)


def _save_and_register(engine: Any, settings: Settings, result: RunResult, gate: dict[str, Any],
                       timing: dict[str, float], t0: float, watermark: int, *, warm_start: bool
                       ) -> tuple[str, dict[str, Any]]:
    """Write the shipped model's checkpoint, then register it: promoted, a candidate, or rejected."""
    version = new_version()
    path = save(result, settings.checkpoints_path, version=version, extra_config={"retrain": {
        "gate": {k: v for k, v in gate.items() if k not in ("candidate", "current")}, "warm_start": warm_start}})
    metrics = {
        **result.metrics(),
        "gate": gate,
        "timing": {**timing, "total_s": round(time.perf_counter() - t0, 2)},
        "diagnostics": result.diagnostics()[-1:] if result.diagnostics() else [],
    }
    with engine.begin() as conn:
        registry.register(conn, version, str(path.resolve()), watermark=watermark, metrics=metrics,
                          status="rejected" if gate["decision"] == "rejected" else "candidate")
        if gate["decision"] == "promoted":
            registry.promote(conn, version)
    return version, metrics
