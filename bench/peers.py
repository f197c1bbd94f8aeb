"""The peers the quality benchmark runs beside the project, on the same split, scored the same way.

Most-popular, EASE (Steck 2019, closed form), iALS (the `implicit` package) and LightFM WARP (when
installed). Each peer's hyper-parameters are chosen on a validation split carved from the train split by
the same protocol (bench/protocol.py), then it is refit on the whole train split. Every peer returns
top-k lists of external ids with the user's train items left out, like the project's served lists.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from protocol import Split, score, split
from scipy import sparse

EASE_MAX_ITEMS = 20_000  # items² float64 for the Gram inverse: 3.2 GB at 20k; beyond, EASE is skipped
EASE_LAMBDAS = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
IALS_GRID = {"factors": (64, 128, 256), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0, 40.0)}
WARP_GRID = {"no_components": (64, 128), "learning_rate": (0.02, 0.05)}
WARP_EPOCHS = (10, 20, 40)


@dataclass
class Matrix:
    """A split's train events as a binary users x items matrix, with the id maps."""

    x: sparse.csr_matrix
    users: list[str]
    items: list[str]
    user_row: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, sp: Split) -> Matrix:
        users = sorted(sp.train_items)
        items = list(sp.catalogue)
        u_row = {u: i for i, u in enumerate(users)}
        i_row = {it: i for i, it in enumerate(items)}
        u = sp.train["user_id"].map(u_row).to_numpy()
        i = sp.train["item_id"].map(i_row).to_numpy()
        x = sparse.csr_matrix((np.ones(u.size, np.float32), (u, i)), shape=(len(users), len(items)))
        x.sum_duplicates()
        x.data[:] = 1.0
        return cls(x, users, items, u_row)


Scorer = Callable[[np.ndarray], np.ndarray]  # user rows -> (rows, items) scores


def top_lists(m: Matrix, users: list[str], scorer: Scorer, k: int = 20, batch: int = 2048) -> dict[str, list[str]]:
    """Each user's k best items by ``scorer``, their own train items left out."""
    rows = np.array([m.user_row[u] for u in users if u in m.user_row], dtype=np.int64)
    names = np.array(m.items, dtype=object)
    out: dict[str, list[str]] = {}
    for start in range(0, rows.size, batch):
        chunk = rows[start:start + batch]
        s = np.array(scorer(chunk), dtype=np.float32, copy=True)
        seen = m.x[chunk].tocoo()
        s[seen.row, seen.col] = -np.inf
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        ok = np.isfinite(np.take_along_axis(s, best, axis=1))
        for r, b, o in zip(chunk.tolist(), best, ok, strict=True):
            out[m.users[r]] = names[b[o]].tolist()
    return out


def most_popular(m: Matrix) -> Scorer:
    pop = np.asarray(m.x.sum(axis=0)).ravel().astype(np.float32)
    return lambda rows: np.broadcast_to(pop, (rows.size, pop.size))


def ease(m: Matrix, lam: float) -> Scorer:
    g = (m.x.T @ m.x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = (p / -np.diag(p)).astype(np.float32)
    b[np.diag_indices_from(b)] = 0.0
    return lambda rows: m.x[rows] @ b


def ials(m: Matrix, factors: int, regularization: float, alpha: float, seed: int = 0) -> Scorer:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                    iterations=15, random_state=seed)
    model.fit(m.x, show_progress=False)
    u, v = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda rows: u[rows] @ v.T


def warp(m: Matrix, no_components: int, learning_rate: float, epochs: int, seed: int = 0) -> Scorer:
    from lightfm import LightFM

    model = LightFM(no_components=no_components, learning_rate=learning_rate, loss="warp", random_state=seed)
    model.fit(m.x.tocoo(), epochs=epochs, num_threads=os.cpu_count() or 1)
    u, v = model.get_user_representations()[1], model.get_item_representations()[1]
    ub, vb = model.user_biases, model.item_biases
    return lambda rows: u[rows] @ v.T + vb[None, :] + ub[rows, None]


def available(module: str) -> bool:
    """Whether an optional peer's package is installed (`pip install -e '.[bench]'` brings implicit)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def lightfm_available() -> bool:
    return available("lightfm")


@dataclass
class PeerResult:
    name: str
    metrics: dict[str, float]
    params: dict
    fit_seconds: float  # the final fit on the whole train split, with the chosen parameters
    note: str = ""


def _choose(sp: Split, build: Callable[..., Scorer], grid: list[dict]) -> tuple[dict, float]:
    """The grid point with the best validation NDCG@10 (validation carved from ``sp.train``)."""
    inner = split(sp.train)
    m = Matrix.of(inner)
    best: tuple[float, dict] = (-1.0, grid[0])
    for params in grid:
        lists = top_lists(m, list(inner.test), build(m, **params), k=10)
        ndcg = score(lists, inner, ks=(10,))["ndcg@10"]
        if ndcg > best[0]:
            best = (ndcg, params)
    return best[1], best[0]


def _grid(spec: dict) -> list[dict]:
    keys = list(spec)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.values())]


def run_peer(name: str, sp: Split) -> PeerResult:
    """Choose a peer's parameters on validation, refit on the train split, score its test lists."""
    m = Matrix.of(sp)
    if name == "most-popular":
        t = time.perf_counter()
        scorer, params, val = most_popular(m), {}, None
    elif name == "EASE":
        if len(m.items) > EASE_MAX_ITEMS:
            return PeerResult(name, {}, {}, 0.0, f"skipped: {len(m.items):,} items² floats exceed the memory budget")
        params, val = _choose(sp, ease, [{"lam": lam} for lam in EASE_LAMBDAS])
        t = time.perf_counter()
        scorer = ease(m, **params)
    elif name == "iALS":
        if not available("implicit"):
            return PeerResult(name, {}, {}, 0.0, "skipped: implicit is not installed (pip install -e '.[bench]')")
        params, val = _choose(sp, ials, _grid(IALS_GRID))
        t = time.perf_counter()
        scorer = ials(m, **params)
    elif name == "LightFM WARP":
        if not lightfm_available():
            return PeerResult(name, {}, {}, 0.0, "skipped: lightfm is not installed")
        params, val = _choose(sp, warp, [{**p, "epochs": e} for p in _grid(WARP_GRID) for e in WARP_EPOCHS])
        t = time.perf_counter()
        scorer = warp(m, **params)
    else:
        raise ValueError(f"unknown peer {name!r}")
    lists = top_lists(m, list(sp.test), scorer)
    seconds = time.perf_counter() - t
    metrics = score(lists, sp)
    return PeerResult(name, metrics, {**params, **({} if val is None else {"validation_ndcg@10": round(val, 4)})},
                      round(seconds, 2))


PEERS = ("most-popular", "iALS", "EASE", "LightFM WARP")


def train_frame(sp: Split) -> pd.DataFrame:
    """The train split as the event file a user would hand to `recsys train`."""
    return sp.train[["user_id", "item_id", "timestamp"]]
