"""Deterministic synthetic interaction logs with structure a model can find.

Items have a Zipf-like popularity and belong to one of several taste clusters;
users have log-normal activity and a home cluster. Most of a user's events fall
in their home cluster (drawn by popularity inside it); the rest are drawn from
global popularity, and a share of those off-taste events are explicit negative
feedback (``dislike``/``skip``): the feedback sampler has something real to use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

T0 = 1_700_000_000.0  # 2023-11-14, a fixed origin keeps output identical across runs
SPAN = 365 * 86400.0
POSITIVE_TYPES = np.array(["view", "click", "like", "purchase"])
POSITIVE_P = np.array([0.55, 0.3, 0.1, 0.05])


@dataclass(frozen=True)
class SynthSpec:
    users: int = 1000
    items: int = 500
    events: int = 20_000
    seed: int = 0
    clusters: int = 0  # 0: chosen from the catalogue size
    in_cluster: float = 0.8  # share of events drawn from the user's home cluster
    zipf_s: float = 1.0  # popularity exponent: weight of rank r is r^-s
    activity_sigma: float = 1.0  # log-normal spread of user activity
    negative_share: float = 0.25  # share of off-taste events that are dislike/skip

    def n_clusters(self) -> int:
        return self.clusters or int(np.clip(self.items // 40, 2, 32))


def _counts_per_user(rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    activity = rng.lognormal(0.0, spec.activity_sigma, spec.users)
    p = activity / activity.sum()
    if spec.events >= spec.users:  # everybody shows up at least once
        return 1 + rng.multinomial(spec.events - spec.users, p)
    return rng.multinomial(spec.events, p)


def generate(spec: SynthSpec) -> pd.DataFrame:
    """Return events with columns user_id, item_id, timestamp, type, value, event_id (sorted by time)."""
    if spec.users < 1 or spec.items < 2 or spec.events < 1:
        raise ValueError("need at least 1 user, 2 items and 1 event")
    rng = np.random.default_rng(spec.seed)
    k = spec.n_clusters()

    # Items: cluster and Zipf weight (ranks shuffled so popularity is not tied to the id).
    item_cluster = rng.integers(0, k, spec.items)
    ranks = rng.permutation(spec.items) + 1
    item_w = ranks.astype(np.float64) ** -spec.zipf_s

    # Users: home cluster and number of events.
    user_cluster = rng.integers(0, k, spec.users)
    counts = _counts_per_user(rng, spec)
    users = np.repeat(np.arange(spec.users, dtype=np.int64), counts)
    n = users.size

    in_cluster = rng.random(n) < spec.in_cluster
    items = np.empty(n, dtype=np.int64)

    global_cdf = np.cumsum(item_w) / item_w.sum()
    off = ~in_cluster
    items[off] = np.minimum(np.searchsorted(global_cdf, rng.random(int(off.sum()))), spec.items - 1)

    ev_cluster = user_cluster[users]
    for c in range(k):
        members = np.flatnonzero(item_cluster == c)
        sel = np.flatnonzero(in_cluster & (ev_cluster == c))
        if sel.size == 0:
            continue
        if members.size == 0:  # an empty cluster falls back to global popularity
            items[sel] = np.minimum(np.searchsorted(global_cdf, rng.random(sel.size)), spec.items - 1)
            continue
        cdf = np.cumsum(item_w[members]) / item_w[members].sum()
        items[sel] = members[np.minimum(np.searchsorted(cdf, rng.random(sel.size)), members.size - 1)]

    types = POSITIVE_TYPES[rng.choice(len(POSITIVE_TYPES), size=n, p=POSITIVE_P)].astype(object)
    off_taste = item_cluster[items] != ev_cluster
    negative = off_taste & (rng.random(n) < spec.negative_share)
    types[negative] = np.where(rng.random(int(negative.sum())) < 0.5, "dislike", "skip")

    timestamps = np.round(T0 + rng.random(n) * SPAN, 3)
    order = np.lexsort((items, timestamps))
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(users[order]).map("u{}".format),
            "item_id": pd.Series(items[order]).map("i{}".format),
            "timestamp": timestamps[order],
            "type": types[order],
            "value": np.full(n, np.nan),
            "event_id": pd.Series(np.arange(n)).map(f"s{spec.seed}-{{}}".format),
        }
    )
    frame.attrs["item_cluster"] = item_cluster
    frame.attrs["user_cluster"] = user_cluster
    return frame
