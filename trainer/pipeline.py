"""One training run end to end: choose the epochs on a held-out slice, then fit what ships, and save.

Two fits, never more. The *selection* fit trains on all but each user's newest 20% (the protocol's
split) and early-stops on that held-out slice; its metrics there, against most-popular on the same
slice, are the run's report. The *final* fit then trains on every event for the epochs selection chose,
so the shipped model has seen each user's newest events (a model that never saw them lost a fifth of
its NDCG@10 on ml-100k). ``ship="tested"`` ships the selection model instead, for experiments.
With two or more threads the final fit runs in a second process beside selection, each fit on half the
threads, and stops at the epoch selection chooses (trainer/lockstep.py): a run then costs about its
longer fit rather than the sum of both.

``evaluate`` is the protocol's test: it holds out each user's newest 20% first, runs the same two fits
on the rest (exactly what `recsys train` does with that file) and scores the shipped model on the test.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer import distributed as dist
from trainer import prespawn
from trainer.checkpoint import new_version, write_checkpoint
from trainer.config import TrainConfig
from trainer.data import Dataset, build_dataset
from trainer.evaluate import blas_threads, dot_scores, evaluate, popularity_scores, report_users
from trainer.indexes import build_index, choose_index
from trainer.lockstep import FinalFit, FinalFitFailed
from trainer.train import TrainResult, fit, for_data, model_state_bytes

SHIP = ("all", "tested")
# how long the held-out report waits for the final fit's answer before it scores beside the still-running
# fit on this process's share of the threads (an answer from a kept epoch takes a fraction of this)
ANSWER_WAIT = 0.25
EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class RunResult:
    data: Dataset  # the split selection trained and early-stopped on (val_* is the held-out slice)
    selection: TrainResult  # early-stopped on the held-out slice
    final: TrainResult  # the model that ships
    held_out: dict[str, float]  # the selection model on the held-out slice (all its users)
    baseline: dict[str, float]  # most-popular on the same slice
    seconds: float
    shipped: str = "all"  # "all": fit on every event; "tested": the selection model
    test: dict[str, float] = field(default_factory=dict)  # evaluate() only: the protocol's test

    def metrics(self) -> dict[str, Any]:
        return {"held_out": self.held_out, "most_popular": self.baseline, "best_epoch": self.selection.best_epoch,
                "shipped": self.shipped, "train_seconds": round(self.seconds, 2), "data": self.data.describe(),
                **({"test": self.test} if self.test else {})}

    def diagnostics(self) -> list[dict[str, Any]]:
        sel = [{"phase": "selection", **h} for h in self.selection.history]
        if self.final is self.selection:
            return sel
        return sel + [{"phase": "all", **h} for h in self.final.history]


def _training_set(data: Dataset, u: np.ndarray, i: np.ndarray, w: np.ndarray | None) -> Dataset:
    """``data`` with (u, i, w) as its training pairs and no validation."""
    return replace(data, train_u=u, train_i=i, val_u=EMPTY, val_i=EMPTY, train_w=w,
                   val_w=None if w is None else np.zeros(0))


def merged_train(data: Dataset) -> Dataset:
    """Train+validation as the training set, no validation."""
    w = None if data.train_w is None else np.concatenate([data.train_w, data.val_w])
    return _training_set(data, np.concatenate([data.train_u, data.val_u]),
                         np.concatenate([data.train_i, data.val_i]), w)


def everything(data: Dataset) -> Dataset:
    """Every positive, the held-out slice included, as training data: what a model that serves learns from."""
    return _training_set(data, data.all_u, data.all_i, data.all_w)


def holdout_as_validation(data: Dataset) -> Dataset:
    """A split without validation (train + newest 20%) with its newest 20% as the validation slice."""
    return replace(data, val_u=data.test_u, val_i=data.test_i, test_u=EMPTY, test_i=EMPTY,
                   val_w=None if data.train_w is None else np.ones(data.test_u.size))


def score_held_out(data: Dataset, scores: Callable[[np.ndarray], np.ndarray], held_u: np.ndarray,
                   held_i: np.ndarray, sample: bool = False) -> dict[str, float]:
    """Protocol metrics on held-out pairs: full ranking over items with a training positive, the user's
    training items excluded. ``sample``: on a large catalogue, a fixed random sample of the users
    (``report_users``; the same users for every scorer of the same pairs)."""
    candidates = data.candidates()
    max_users = report_users(np.unique(held_u).size, int(candidates.sum())) if sample else None
    return evaluate(scores, data.train_csr(), held_u, held_i, candidates, max_users=max_users)


def select_and_fit(selection_set: Dataset, final_set: Dataset, cfg: TrainConfig, *, ship: str = "all",
                   init_state: dict[str, Any] | None = None, impressions: Any = None) -> RunResult:
    """Early-stop on ``selection_set``'s validation slice, then fit ``final_set`` for the chosen epochs."""
    if ship not in SHIP:
        raise ValueError(f"unknown ship {ship!r}; choose one of {', '.join(SHIP)}")
    t0 = time.perf_counter()
    # one tower, temperature, cap on epochs and patience for both fits, by the data that ships
    cfg = for_data(cfg, final_set)
    if cfg.progress and dist.is_main():  # what the run trains, and what the data decided, before the epochs
        print(f"training on {final_set.train_u.size:,} positives of {final_set.n_users:,} users × "
              f"{final_set.n_items:,} items: tower {cfg.tower}, temperature {cfg.temperature:g}, "
              f"batch {cfg.batch_size}, dim {cfg.dim}, negatives {cfg.sampler.strategy}, at most {cfg.epochs} "
              f"epochs, patience {cfg.patience}", file=sys.stderr, flush=True)
    side = _side_by_side(final_set, cfg, init_state, impressions) if ship == "all" else None
    try:
        selection = fit(selection_set, cfg if side is None else side.selection_cfg, init_state=init_state,
                        impressions=impressions, on_epoch=None if side is None else side.selection_epoch)
    except BaseException:
        if side is not None:
            side.close()
        raise
    if side is not None:
        side.stop(selection.best_epoch, len(selection.history))
    held_out: dict[str, float] = {}
    baseline: dict[str, float] = {}
    if dist.is_main() and selection_set.val_u.size:  # rank 0 reports; other ranks only help to train
        users, items = selection.model.export()
        # every thread once the final fit has answered (it hands a kept epoch back at once, and when
        # selection is the longer fit this report is all that is left: ~2.5 s on one thread for gowalla),
        # else this process's share beside it
        alone = side is None or side.answered(wait=ANSWER_WAIT)
        # every held-out user, or the same fixed sample of them for both on a large catalogue
        with blas_threads(cfg.threads if alone else side.selection_cfg.threads):
            held_out = score_held_out(selection_set, dot_scores(users, items), selection_set.val_u,
                                      selection_set.val_i, sample=True)
            baseline = score_held_out(selection_set, popularity_scores(selection_set.popularity()),
                                      selection_set.val_u, selection_set.val_i, sample=True)
    final = selection
    if side is not None:
        try:
            final = side.result()
        except FinalFitFailed as exc:
            print(f"the final fit's second process failed ({exc}); fitting every event here instead",
                  file=sys.stderr, flush=True)
            side = None
    if ship == "all" and side is None:
        final = fit(final_set, replace(cfg, epochs=max(selection.best_epoch, 1)), init_state=init_state,
                    impressions=impressions)
    return RunResult(selection_set, selection, final, held_out, baseline, time.perf_counter() - t0, shipped=ship)


def _side_by_side(final_set: Dataset, cfg: TrainConfig, init_state: dict[str, Any] | None,
                  impressions: Any) -> FinalFit | None:
    """Start the final fit in a second process when there are threads to split between the fits, in one
    process on the CPU (trainer/lockstep.py); None: the fits run one after the other."""
    if not prespawn.side_by_side(cfg.threads, dist.world_size(), cfg.device):
        return None
    return FinalFit(final_set, cfg, init_state, impressions)


def _dataset(events: pd.DataFrame, cfg: TrainConfig, validation: bool, watermark: int | None,
             negative_types: frozenset[str] | None) -> Dataset:
    kw: dict[str, Any] = {} if negative_types is None else {"negative_types": negative_types}
    return build_dataset(events, validation=validation, watermark=watermark, event_weights=cfg.event_weights, **kw)


def run(events: pd.DataFrame | Dataset, cfg: TrainConfig, *, ship: str = "all",
        init_state: dict[str, Any] | None = None, watermark: int | None = None,
        negative_types: frozenset[str] | None = None, impressions: Any = None) -> RunResult:
    """`recsys train`: choose the epochs on each user's newest 20%, then fit every event (see module doc).

    A Dataset given instead of events must have been built without validation (its test slice is the
    held-out one)."""
    data = events if isinstance(events, Dataset) else _dataset(events, cfg, False, watermark, negative_types)
    return select_and_fit(holdout_as_validation(data), everything(data), cfg, ship=ship,
                          init_state=init_state, impressions=impressions)


def evaluate_run(events: pd.DataFrame | Dataset, cfg: TrainConfig, *,
                 negative_types: frozenset[str] | None = None) -> RunResult:
    """The protocol's test of `recsys train`: hold out each user's newest 20%, train on the rest exactly as
    `recsys train` would on that file, score the shipped model on the held-out test."""
    data = events if isinstance(events, Dataset) else _dataset(events, cfg, True, None, negative_types)
    result = select_and_fit(data, merged_train(data), cfg)
    if dist.is_main():
        train = merged_train(data)
        users, items = result.final.model.export()
        result.test = score_held_out(train, dot_scores(users, items), data.test_u, data.test_i)
    return result


def save(result: RunResult, root: str | Path, *, version: str | None = None,
         extra_config: dict[str, Any] | None = None) -> Path:
    """Write the shipped model as a checkpoint: query vectors of every user over all their positives, the
    tower's tables for the service's fresh vectors, and the item vectors (one inner product)."""
    data = result.data
    seen = data.seen_csr()
    model = result.final.model
    users, items = model.export(seen)
    tables = model.tables()
    tower = model.tower
    config = {**result.final.config.to_dict(), "score": "inner product of the stored query and item vectors",
              "shipped": result.shipped, **(extra_config or {})}
    return write_checkpoint(
        root, version=version or new_version(), user_embeddings=users, item_embeddings=items,
        user_ids=data.user_ids, item_ids=data.item_ids, item_popularity=data.all_popularity(),
        seen=seen, config=config, metrics=result.metrics(), diagnostics=result.diagnostics(),
        watermark=data.watermark, index=build_index(items, choose_index(len(items), serving=True)),
        extra_files={"model.pt": model_state_bytes(result.final, data)},
        feedback=data.feedback,  # explicit negatives: serving keeps them out, inspection draws from them
        tower=tower, history_embeddings=tables["history"],
        user_free_embeddings=tables["free"] if tower.pooled else None,
    )
