"""From an event log to the arrays the trainer needs: id maps, the protocol split, seen/feedback matrices.

The split is the project's evaluation protocol (DESIGN.md): per user, sort by (timestamp, item id; ids
compare as numbers when every id is an integer); the last 20% (ceil, at least 1) is test; users with fewer than 5 events stay in train; test items
unseen in train are dropped; validation is carved from train the same way. Repeated (user, item)
pairs keep their first occurrence only: a ranking that excludes the user's train items could
never hit a repeat, so keeping it in test would only add noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

NEGATIVE_TYPES = frozenset({"dislike", "skip", "hide"})
TEST_FRACTION = 0.2
MIN_EVENTS = 5


def temporal_split(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    fraction: float = TEST_FRACTION,
    min_events: int = MIN_EVENTS,
) -> np.ndarray:
    """Boolean mask of the held-out rows: per user the last ceil(fraction*n) by (timestamp, item)."""
    if users.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((items, timestamps, users))
    u = users[order]
    counts = np.bincount(u)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(u.size) - starts[u]
    n = counts[u]
    n_held = np.maximum(
        np.ceil(n * fraction - 1e-9).astype(np.int64), 1
    )  # 1e-9: 0.2*15 is 3.0000000000000004
    held = (n >= min_events) & (rank >= n - n_held)
    out = np.empty(users.size, dtype=bool)
    out[order] = held
    return out


def code_ids(ids: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes of external ids, numbered in the protocol's order: as numbers when every id is an
    integer (so item 10 sorts after item 9 when timestamps tie), else as strings."""
    as_str = ids.astype(str)
    if as_str.str.fullmatch(r"-?\d+").all():
        numbers = as_str.astype(np.int64)
        canonical = numbers.astype(str) == as_str  # "007" and "7" stay distinct ids: order them as strings
        if canonical.all():
            codes, uniques = pd.factorize(numbers, sort=True)
            return codes, [str(u) for u in uniques]
    codes, uniques = pd.factorize(as_str, sort=True)
    return codes, [str(u) for u in uniques]


def csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sparse.csr_matrix:
    """Binary user x item matrix (duplicates collapse to 1)."""
    m = sparse.csr_matrix((np.ones(users.size, dtype=np.float32), (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


@dataclass
class Dataset:
    """Integer-coded interactions split by the protocol; rows of every matrix follow user_ids/item_ids."""

    user_ids: list[str]
    item_ids: list[str]
    train_u: np.ndarray
    train_i: np.ndarray
    val_u: np.ndarray
    val_i: np.ndarray
    test_u: np.ndarray
    test_i: np.ndarray
    all_u: np.ndarray  # every (deduplicated) positive: the checkpoint's seen matrix
    all_i: np.ndarray
    feedback: sparse.csr_matrix  # explicit negatives (dislike/skip/hide) per user
    watermark: int | None = None
    # Per-pair weights (largest event-type weight among the pair's positive events), aligned with
    # train_*/val_*/all_*; None when no weights apply (none configured, or every pair weighs 1).
    train_w: np.ndarray | None = None
    val_w: np.ndarray | None = None
    all_w: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def popularity(self) -> np.ndarray:
        """Train-positive count per item: the popularity the samplers and the baseline use."""
        return np.bincount(self.train_i, minlength=self.n_items).astype(np.int64)

    def all_popularity(self) -> np.ndarray:
        return np.bincount(self.all_i, minlength=self.n_items).astype(np.int64)

    def train_csr(self) -> sparse.csr_matrix:
        return csr(self.train_u, self.train_i, self.n_users, self.n_items)

    def median_positives(self) -> float:
        """Distinct training positives of the median user who has any (the rule of ``TrainConfig.for_data``)."""
        counts = np.diff(self.train_csr().indptr)
        counts = counts[counts > 0]
        return float(np.median(counts)) if counts.size else 0.0

    def seen_csr(self) -> sparse.csr_matrix:
        return csr(self.all_u, self.all_i, self.n_users, self.n_items)

    def candidates(self) -> np.ndarray:
        """Items a ranking may return under the protocol: those with a train positive."""
        return self.popularity() > 0

    def user_row(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    def item_row(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.item_ids)}

    def describe(self) -> dict[str, int]:
        return {
            "users": self.n_users,
            "items": self.n_items,
            "train": int(self.train_u.size),
            "validation": int(self.val_u.size),
            "test": int(self.test_u.size),
            "feedback": int(self.feedback.nnz),
        }


def _holdout(u: np.ndarray, i: np.ndarray, t: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into (kept, held) index arrays; held rows whose item is absent from kept are dropped."""
    held = temporal_split(u, i, t)
    kept_idx = np.flatnonzero(~held)
    held_idx = np.flatnonzero(held)
    in_train = np.zeros(n_items, dtype=bool)
    in_train[i[kept_idx]] = True
    return kept_idx, held_idx[in_train[i[held_idx]]]


def event_type_weights(types: pd.Series, weights: Mapping[str, float] | None) -> np.ndarray | None:
    """Weight of each event by its type (case-insensitive; types not listed weigh 1); None without weights."""
    if not weights:
        return None
    table = {str(k).lower(): float(v) for k, v in weights.items()}
    if any(not np.isfinite(v) or v <= 0 for v in table.values()):
        raise ValueError(f"event weights must be positive numbers: {table}")
    return types.astype(str).str.lower().map(table).fillna(1.0).to_numpy(dtype=np.float64)


def _standing_negatives(
    users: np.ndarray, items: np.ndarray, ts: np.ndarray, negative: np.ndarray, n_items: int
) -> np.ndarray:
    """Rows of negative events still standing: no positive event of the same pair came after them.

    A user who disliked an item and later bought it has changed their mind; the dislike no longer
    keeps the item out of their recommendations nor serves as their negative.
    """
    key = users.astype(np.int64) * n_items + items.astype(np.int64)
    neg = np.flatnonzero(negative)
    pos = np.flatnonzero(~negative)
    if neg.size == 0 or pos.size == 0:
        return neg
    last_pos = pd.Series(ts[pos]).groupby(key[pos]).max()
    later = pd.Series(key[neg]).map(last_pos).to_numpy(dtype=np.float64, na_value=-np.inf)
    return neg[ts[neg] >= later]


def _positive_pairs(user_codes: np.ndarray, item_codes: np.ndarray, ts: np.ndarray, negative: np.ndarray,
                    w_events: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Each (user, item) positive once, at its first time, sorted by user then time: users, items,
    times and the pair's weight (the largest of its events'; None when there are none or all are 1)."""
    pos = np.flatnonzero(~negative)
    if pos.size == 0:
        raise ValueError("no positive events (every event is a dislike/skip/hide)")
    pu, pi, pt = user_codes[pos].astype(np.int64), item_codes[pos].astype(np.int64), ts[pos]
    order = np.lexsort((pi, pt, pu))
    pu, pi, pt = pu[order], pi[order], pt[order]
    pairs = pd.DataFrame({"u": pu, "i": pi})
    first = ~pairs.duplicated().to_numpy()
    pw = None
    if w_events is not None:
        pairs["w"] = w_events[pos][order]
        pw = pairs.groupby(["u", "i"], sort=False)["w"].transform("max").to_numpy()[first]
        if np.all(pw == 1.0):
            pw = None  # all-1 weights: exactly the unweighted run
    return pu[first], pi[first], pt[first], pw


def build_dataset(
    events: pd.DataFrame,
    *,
    validation: bool = True,
    watermark: int | None = None,
    negative_types: frozenset[str] | set[str] = NEGATIVE_TYPES,
    event_weights: Mapping[str, float] | None = None,
) -> Dataset:
    """Code ids, drop repeats, split test (and validation) by the protocol, collect explicit negatives
    (events whose type is in ``negative_types``: never positives, they feed the feedback sampler).

    With ``event_weights`` ({type: weight}), each deduplicated positive pair weighs the largest weight
    among its positive events; negative types never become positives whatever their weight."""
    for col in ("user_id", "item_id", "timestamp", "type"):
        if col not in events.columns:
            raise ValueError(f"events lack the column {col!r}")
    if len(events) == 0:
        raise ValueError("no events to train on")
    user_codes, user_ids = code_ids(events["user_id"])
    item_codes, item_ids = code_ids(events["item_id"])
    ts = events["timestamp"].to_numpy(dtype=np.float64)
    negative = events["type"].astype(str).str.lower().isin(set(negative_types)).to_numpy()
    n_users, n_items = len(user_ids), len(item_ids)

    pu, pi, pt, pw = _positive_pairs(user_codes, item_codes, ts, negative,
                                     event_type_weights(events["type"], event_weights))

    def take(w: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
        return None if w is None else w[idx]

    kept, test = _holdout(pu, pi, pt, n_items)
    tu, ti, tt, tw = pu[kept], pi[kept], pt[kept], take(pw, kept)
    val_w = None
    if validation:
        kept2, val = _holdout(tu, ti, tt, n_items)
        val_u, val_i, val_w = tu[val], ti[val], take(tw, val)
        tu, ti, tw = tu[kept2], ti[kept2], take(tw, kept2)
    else:
        val_u = val_i = np.zeros(0, dtype=np.int64)
        val_w = None if pw is None else np.zeros(0)

    neg = _standing_negatives(user_codes, item_codes, ts, negative, n_items)
    feedback = csr(user_codes[neg].astype(np.int64), item_codes[neg].astype(np.int64), n_users, n_items)
    return Dataset(
        user_ids=user_ids,
        item_ids=item_ids,
        train_u=tu,
        train_i=ti,
        val_u=val_u,
        val_i=val_i,
        test_u=pu[test],
        test_i=pi[test],
        all_u=pu,
        all_i=pi,
        feedback=feedback,
        watermark=watermark,
        train_w=tw,
        val_w=val_w,
        all_w=pw,
    )
