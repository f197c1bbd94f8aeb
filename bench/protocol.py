"""The evaluation protocol of DESIGN.md, written independently of the trainer, for the benchmarks.

The split and the scorer here share no code with ``trainer/``: a figure the benchmark reports is the
project's output scored by someone else's reading of the protocol. Per user, events sort by
(timestamp, item id), ids comparing as numbers when every id is an integer; the last 20% (ceil, at least
1) is test, the rest train; users with fewer than 5 events stay in train; repeated (user, item) pairs
keep their first occurrence; test items absent from train are dropped. Scoring is full ranking over the
train items minus the user's own train items: Recall@K = hits / min(K, |test|), NDCG@K with binary
gains and the ideal over min(K, |test|), HitRate@K, catalogue coverage@10; mean over test users.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

TEST_FRACTION = 0.2
MIN_EVENTS = 5
KS = (10, 20)


@dataclass
class Split:
    train: pd.DataFrame  # the events a user would train on: user_id, item_id, timestamp (+ the file's columns)
    test: dict[str, set[str]]  # user -> held-out items (each in the train catalogue, none in their train)
    train_items: dict[str, set[str]]  # user -> their train items (excluded from their ranking)
    catalogue: list[str]  # items with a train event: what a ranking may return


def _sort_key(ids: pd.Series) -> pd.Series:
    """Numbers when every id is an integer (so 10 sorts after 9), else the strings themselves."""
    as_str = ids.astype(str)
    if as_str.str.fullmatch(r"-?\d+").all():
        return as_str.astype(np.int64)
    return as_str


def split(events: pd.DataFrame, fraction: float = TEST_FRACTION, min_events: int = MIN_EVENTS) -> Split:
    ev = events.assign(user_id=events["user_id"].astype(str), item_id=events["item_id"].astype(str))
    ev = ev.assign(_item_key=_sort_key(ev["item_id"]), _user_key=_sort_key(ev["user_id"]))
    ev = ev.sort_values(["_user_key", "timestamp", "_item_key"], kind="stable")
    ev = ev[~ev.duplicated(["user_id", "item_id"])]  # a repeat can never be a hit once train items are excluded
    n = ev.groupby("user_id")["item_id"].transform("size").to_numpy()
    rank = ev.groupby("user_id").cumcount().to_numpy()
    held = np.maximum(np.ceil(n * fraction - 1e-9), 1)
    is_test = (n >= min_events) & (rank >= n - held)
    train = ev[~is_test].drop(columns=["_item_key", "_user_key"])
    test_rows = ev[is_test]
    catalogue = set(train["item_id"])
    test_rows = test_rows[test_rows["item_id"].isin(catalogue)]
    test = {u: set(g) for u, g in test_rows.groupby("user_id")["item_id"]}
    train_items = {u: set(g) for u, g in train.groupby("user_id")["item_id"]}
    return Split(train.reset_index(drop=True), test, train_items, sorted(catalogue))


def score(recommended: Mapping[str, Sequence[str]], sp: Split, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Metrics of per-user ranked lists (best first). Items a ranking may not return (a train item of the
    user, an item outside the catalogue) are dropped from the list before scoring, so a scorer cannot gain
    from them; a user with no list scores zero."""
    catalogue = set(sp.catalogue)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hitrate")}
    covered: set[str] = set()
    for user, truth in sp.test.items():
        own = sp.train_items.get(user, set())
        ranked = [i for i in recommended.get(user, ()) if i in catalogue and i not in own]
        ranked = list(dict.fromkeys(ranked))  # a repeated item counts once
        covered.update(ranked[:10])
        for k in ks:
            top = ranked[:k]
            hits = [1.0 if i in truth else 0.0 for i in top]
            m = min(k, len(truth))
            sums[f"recall@{k}"] += sum(hits) / m
            sums[f"hitrate@{k}"] += 1.0 if any(hits) else 0.0
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            sums[f"ndcg@{k}"] += dcg / sum(1.0 / math.log2(r + 2) for r in range(m))
    n = max(len(sp.test), 1)
    out = {name: v / n for name, v in sums.items()}
    out["coverage@10"] = len(covered) / max(len(catalogue), 1)
    out["users"] = len(sp.test)
    return out
