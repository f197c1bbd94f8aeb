"""One training run end to end: split, fit with early stopping, refit, test against most-popular, save.

The refit step retrains on train+validation for the epoch count validation chose: under a temporal
split the validation events are the most recent ones a user has, and dropping them from the final
model costs about 0.03 NDCG@10 on ml-100k (measured; see the report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer import distributed as dist
from trainer.checkpoint import new_version, write_checkpoint
from trainer.data import Dataset, build_dataset, csr
from trainer.evaluate import dot_scores, evaluate, popularity_scores
from trainer.indexes import build_index, choose_index
from trainer.train import TrainConfig, TrainResult, fit, model_state_bytes

SCORE_NOTE = "cosine/temperature: items L2-normalised, users L2-normalised and divided by temperature"


@dataclass
class RunResult:
    data: Dataset
    selection: TrainResult  # the run early-stopped on validation
    final: TrainResult  # the model that ships (the refit when refit=True)
    test: dict[str, float]
    baseline: dict[str, float]
    seconds: float
    final_phase: str = "refit"  # "all": the shipped model was fit on every event after testing

    def metrics(self) -> dict[str, Any]:
        return {"test": self.test, "most_popular": self.baseline, "best_epoch": self.selection.best_epoch,
                "validation": self.selection.best_val, "train_seconds": round(self.seconds, 2),
                "data": self.data.describe()}

    def diagnostics(self) -> list[dict[str, Any]]:
        sel = [{"phase": "selection", **h} for h in self.selection.history]
        if self.final is self.selection:
            return sel
        return sel + [{"phase": self.final_phase, **h} for h in self.final.history]


def _training_set(data: Dataset, u: np.ndarray, i: np.ndarray, w: np.ndarray | None) -> Dataset:
    """``data`` with (u, i, w) as its training pairs and no validation."""
    empty = np.zeros(0, dtype=np.int64)
    return replace(data, train_u=u, train_i=i, val_u=empty, val_i=empty, train_w=w,
                   val_w=None if w is None else np.zeros(0))


def merged_train(data: Dataset) -> Dataset:
    """Train+validation as the training set, no validation: what the final model learns from."""
    w = None if data.train_w is None else np.concatenate([data.train_w, data.val_w])
    return _training_set(data, np.concatenate([data.train_u, data.val_u]),
                         np.concatenate([data.train_i, data.val_i]), w)


def everything(data: Dataset) -> Dataset:
    """Every positive, test slice included, as training data: what a model that serves learns from."""
    return _training_set(data, data.all_u, data.all_i, data.all_w)


def run(events: pd.DataFrame | Dataset, cfg: TrainConfig, *, refit: bool = True,
        init_state: dict[str, Any] | None = None, watermark: int | None = None,
        negative_types: frozenset[str] | None = None, final_fit: bool = False) -> RunResult:
    """Split, fit, refit and test; ``final_fit`` then fits every event (the newest included) for the
    chosen epochs and ships that model, keeping the held-out metrics of the tested one."""
    t0 = time.perf_counter()
    kw: dict[str, Any] = {} if negative_types is None else {"negative_types": negative_types}
    data = (events if isinstance(events, Dataset)
            else build_dataset(events, watermark=watermark, event_weights=cfg.event_weights, **kw))
    selection = fit(data, cfg, init_state=init_state)
    final = selection
    full = merged_train(data)
    if refit and data.val_u.size:
        final = fit(full, replace(cfg, epochs=selection.best_epoch), init_state=init_state)
    test: dict[str, float] = {}
    baseline: dict[str, float] = {}
    if dist.is_main():  # rank 0 tests and saves; other ranks only help to train
        exclude = csr(full.train_u, full.train_i, data.n_users, data.n_items)
        candidates = full.candidates()
        users, items = final.model.export()
        test = evaluate(dot_scores(users, items), exclude, data.test_u, data.test_i, candidates)
        baseline = evaluate(popularity_scores(full.popularity()), exclude, data.test_u, data.test_i, candidates)
    if final_fit:
        final = fit(everything(data), replace(cfg, epochs=max(selection.best_epoch, 1)), init_state=init_state)
    return RunResult(data, selection, final, test, baseline, time.perf_counter() - t0,
                     final_phase="all" if final_fit else "refit")


def save(result: RunResult, root: str | Path, *, version: str | None = None,
         extra_config: dict[str, Any] | None = None) -> Path:
    """Write the shipped model as a checkpoint; scores of the stored vectors equal the training logits."""
    data = result.data
    users, items = result.final.model.export()
    config = {**result.final.config.to_dict(), "score": SCORE_NOTE if result.final.config.cosine else "dot",
              "refit": result.final is not result.selection, "final_fit": result.final_phase == "all",
              **(extra_config or {})}
    return write_checkpoint(
        root, version=version or new_version(), user_embeddings=users, item_embeddings=items,
        user_ids=data.user_ids, item_ids=data.item_ids, item_popularity=data.all_popularity(),
        seen=data.seen_csr(), config=config, metrics=result.metrics(), diagnostics=result.diagnostics(),
        watermark=data.watermark, index=build_index(items, choose_index(len(items), serving=True)),
        extra_files={"model.pt": model_state_bytes(result.final, data)},
        feedback=data.feedback,  # explicit negatives: serving keeps them out, inspection draws from them
    )
