"""Which checkpoint to serve, loading it beside the current one, and swapping a single reference.

Requests read ``holder.current`` once and keep that object, so a swap never disturbs a request
in flight. A checkpoint that fails to load is logged and remembered as refused; serving goes on
with the old model. Resolution order: a version promoted after start-up, else the pinned
``--checkpoint``, else the promoted version, else the newest valid directory under checkpoints_path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from app.db import registry
from app.db.items import categories_of, item_categories
from app.db.userdata import hidden_items
from app.serving import metrics
from app.serving.checkpoints import newest_first
from app.serving.model import ServedModel, load_model
from trainer.checkpoint import CheckpointError, read_manifest

log = logging.getLogger("recsys.model")


@dataclass(frozen=True)
class Target:
    path: Path
    version: str | None  # registry version, when the target came from the registry


@dataclass(frozen=True)
class RefreshResult:
    changed: bool
    model: ServedModel | None
    error: str | None = None


class ModelHolder:
    def __init__(
        self,
        engine: Engine,
        checkpoints_root: Path,
        pinned: Path | None = None,
        index_cache: Path | None = None,
        top_n: int = 100,
    ) -> None:
        self.engine = engine
        self.index_cache = index_cache  # where built indexes and top lists are shared (app.serving.cache)
        self.top_n = top_n  # items precomputed per model user (see app.serving.toplists)
        self.root = checkpoints_root
        self.pinned = pinned
        self.current: ServedModel | None = None
        self.refused: dict[str, str] = {}  # checkpoint path → reason
        self._lock = threading.RLock()  # swap() is also called from admin promote
        self._baseline_promoted: str | None = None
        self._baseline_read = False
        self.on_swap: list[Callable[[ServedModel], None]] = []

    # --- resolution -------------------------------------------------------------------------
    def registry_path(self, row: dict) -> Path:
        """A registered version's directory; falls back to checkpoints/<version> if the stored path moved."""
        path = Path(row["path"])
        if not path.is_dir() and (self.root / row["version"]).is_dir():
            return self.root / row["version"]
        return path

    def _newest_on_disk(self) -> Target | None:
        for path in newest_first(self.root):
            if str(path) in self.refused:
                continue
            try:
                read_manifest(path)
            except CheckpointError as exc:
                self._refuse(path, str(exc))
                continue
            return Target(path.resolve(), None)
        return None

    def resolve(self) -> Target | None:
        with self.engine.connect() as conn:
            promoted = registry.current_promoted(conn)
        version = promoted["version"] if promoted else None
        if not self._baseline_read:
            self._baseline_promoted, self._baseline_read = version, True
        if promoted and (self.pinned is None or version != self._baseline_promoted):
            return Target(self.registry_path(promoted).resolve(), version)
        if self.pinned is not None:
            return Target(self.pinned.resolve(), None)
        return self._newest_on_disk()

    # --- loading ----------------------------------------------------------------------------
    def _refuse(self, path: Path, reason: str) -> None:
        if self.refused.get(str(path)) != reason:
            log.error("checkpoint refused", extra={"checkpoint": str(path), "reason": reason})
        self.refused[str(path)] = reason
        metrics.MODEL_LOADS.labels("refused").inc()

    def load(self, path: Path) -> ServedModel:
        """Load a checkpoint without serving it (raises CheckpointError)."""
        try:
            return load_served(
                path, self.engine, self.index_cache, self.top_n, on_ready=self._index_ready
            )
        except CheckpointError as exc:
            self._refuse(path, str(exc))
            raise

    def swap(self, model: ServedModel) -> None:
        with self._lock:
            old = self.current
            self.current = model  # one reference assignment: requests in flight keep the old object
            self.refused.pop(str(model.ckpt.path), None)
            for callback in self.on_swap:
                callback(model)
        metrics.MODEL_LOADS.labels("loaded").inc()
        metrics.set_model_version(old.version if old else None, model.version)
        self._index_ready(model)
        log.info(
            "model loaded",
            extra={
                "model_version": model.version,
                "previous": old.version if old else None,
                "checkpoint": str(model.ckpt.path),
                "load_seconds": round(model.load_seconds, 3),
                "n_items": model.n_items,
            },
        )

    def _index_ready(self, model: ServedModel) -> None:
        """Publish the served model's index state (called at swap and when a background build ends)."""
        if self.current is model:
            approximate = model.ann is not None or (
                model.ann_info is not None and model.ann_info.kind != "exact"
            )
            recall = model.ann_info.recall_at_10 if model.ann_info else 1.0
            metrics.set_serving_index(model.ann_pending or model.top_pending, approximate, recall, model.top is not None)

    def refresh(self, force: bool = False) -> RefreshResult:
        """Serve the resolved target if it differs from the current model (blocking; run in a thread).

        ``force`` retries a previously refused checkpoint. When the target is already served, only the
        hidden-items mask and the category index are refreshed.
        """
        with self._lock:
            target = self.resolve()
            current = self.current
            if target is None:
                return RefreshResult(False, current, None if current else "no checkpoint available")
            if current is not None and Path(current.ckpt.path) == target.path:
                with self.engine.connect() as conn:
                    hidden, categories = hidden_items(conn), item_categories(conn)
                current.set_hidden(hidden)
                current.set_categories(categories)
                return RefreshResult(False, current)
            if not force and str(target.path) in self.refused:
                return RefreshResult(False, current, self.refused[str(target.path)])
            try:
                model = self.load(target.path)
            except CheckpointError as exc:
                if current is None and target.version is None and self.pinned is None:
                    return self._fallback_on_disk()
                return RefreshResult(False, current, str(exc))
            self.swap(model)
            return RefreshResult(True, model)

    def apply_item(self, item_id: str, hidden: bool | None, attributes: dict | None) -> None:
        """A PUT of an item committed on this worker: update the served model's hidden mask and category
        index at once. Under the refresh lock, so a concurrent refresh that read the database before the
        commit cannot undo it."""
        categories = None if attributes is None else categories_of(attributes)
        with self._lock:
            if self.current is not None:
                self.current.update_item(item_id, hidden, categories)

    def _fallback_on_disk(self) -> RefreshResult:
        """At start-up with nothing promoted: try older checkpoints until one loads."""
        while (target := self._newest_on_disk()) is not None:
            try:
                model = self.load(target.path)
            except CheckpointError:
                continue
            self.swap(model)
            return RefreshResult(True, model)
        return RefreshResult(False, None, "no valid checkpoint under " + str(self.root))


def load_served(
    path: Path,
    engine: Engine | None,
    index_cache: Path | None,
    top_n: int,
    *,
    wait: bool = False,
    on_ready: Callable[[ServedModel], None] | None = None,
    similar: bool = True,
) -> ServedModel:
    """Load a checkpoint with the database's hidden items and categories (none without an engine), as the
    service serves it; any failure is a CheckpointError. ``wait``: build the top lists before returning."""
    hidden: list[str] = []
    categories: dict[str, list[str]] = {}
    if engine is not None:
        with engine.connect() as conn:
            hidden, categories = hidden_items(conn), item_categories(conn)
    try:
        return load_model(path, hidden, categories, index_cache, on_ann_ready=on_ready, top_n=top_n, wait=wait,
                          similar=similar)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
