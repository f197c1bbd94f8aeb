"""FAISS index types chosen by catalogue size, for serving and for hard-negative mining. Torch-free.

Exact inner product (``IndexFlatIP``) is perfect and cheap while the catalogue is small, but every query
scans every item, so its cost grows linearly with the catalogue; past a threshold an approximate index
takes over. Mining and serving search differently and get different thresholds and kinds (choose_index).
The settings are a small dataclass so that they can be written into the checkpoint manifest next to the
index file and read back by anyone (the service, the report) without faiss.
The defaults come from ``bench/scale.py --part index``; the figures are in docs/scaling.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

KINDS = ("flat", "ivf", "hnsw")
# Exact search up to these sizes (bench/scale.py --part index, docs/scaling.md). Mining searches a batch of
# users every training step, so the flat index's linear cost shows early and IVF takes over at 20k (the
# threshold the sampler always had); serving searches one user per request, where exact search stays
# under a millisecond up to ~100k items.
MINING_EXACT_MAX = 20_000
SERVING_EXACT_MAX = 100_000
MINING_APPROXIMATE = "ivf"  # rebuilt every refresh: IVF re-adds fresh vectors to a trained quantiser
SERVING_APPROXIMATE = "hnsw"  # built once per checkpoint; see choose_index
# Mining needs hard negatives, not exactly the top 100. On the item vectors of a model trained one epoch
# on the 5M-event synthetic log (50k items, nlist 894), batches of 256 users, k=100, one thread:
# nprobe 8 returned 0.907 of the exact top 100 in 5.2 ms, nprobe 30 (√nlist) 0.962 in 9.0 ms, exact 80 ms.
MINING_NPROBE = 8


@dataclass(frozen=True)
class IndexSettings:
    """Everything needed to rebuild (or describe) an index; unused fields stay None."""

    kind: str
    nlist: int | None = None  # IVF: coarse cells
    nprobe: int | None = None  # IVF: cells visited per query
    M: int | None = None  # HNSW: links per node
    efSearch: int | None = None  # HNSW: candidate list size at query time
    efConstruction: int | None = None  # HNSW: candidate list size at build time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSettings:
        if d.get("kind") not in KINDS:
            raise ValueError(f"unknown index kind {d.get('kind')!r}; choose one of {', '.join(KINDS)}")
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


def ivf_settings(n: int, *, nprobe: int | None = None) -> IndexSettings:
    """IVF-Flat with about 4·√n cells (FAISS's guideline, at least 39 training points per cell).

    nprobe grows with √nlist: the cells holding a query's top 100 spread over more of them as the
    partition gets finer. √nlist returned 80–86% of the exact top 100 (92–94% of the top 10) at 50k and
    1M items in bench/scale.py, in a quarter (50k) to a fiftieth (1M) of exact search's time: enough for
    mining, which needs hard negatives, not exactly the top 100; 2√nlist reaches ~0.93–0.95."""
    nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
    if nprobe is None:
        nprobe = int(min(nlist, max(8, round(math.sqrt(nlist)))))
    return IndexSettings("ivf", nlist=nlist, nprobe=int(min(nprobe, nlist)))


def hnsw_settings(n: int, *, ef_search: int | None = None) -> IndexSettings:
    """HNSW with 32 links per node; efSearch 128 covers the 100 results mining asks for and found 99% of
    the exact top 10 (95% of the top 100) at 1M items in bench/scale.py, in under half a millisecond."""
    return IndexSettings("hnsw", M=32, efSearch=int(ef_search or 128), efConstruction=64)


def choose_index(n_items: int, kind: str = "auto", *, serving: bool = False,
                 exact_max: int | None = None) -> IndexSettings:
    """The index for a catalogue of ``n_items``: exact up to a threshold, approximate beyond.

    ``serving=False`` (hard-negative mining, batched searches every step): exact up to
    MINING_EXACT_MAX, then IVF-Flat, whose trained quantiser survives refreshes. ``serving=True`` (one
    query per request, one build per checkpoint): exact up to SERVING_EXACT_MAX, then HNSW, whose build
    cost is paid once and which the service's filtered search (a generic ``SearchParameters`` with an ID
    selector) accepts as is; FAISS refuses those parameters for IVF. ``kind`` forces "flat", "ivf" or
    "hnsw"; "auto" chooses.
    """
    if kind == "auto":
        limit = exact_max if exact_max is not None else (SERVING_EXACT_MAX if serving else MINING_EXACT_MAX)
        kind = "flat" if n_items <= limit else (SERVING_APPROXIMATE if serving else MINING_APPROXIMATE)
    if kind == "flat":
        return IndexSettings("flat")
    if kind == "ivf":
        return ivf_settings(n_items, nprobe=None if serving else MINING_NPROBE)
    if kind == "hnsw":
        return hnsw_settings(n_items)
    raise ValueError(f"unknown index type {kind!r}; choose flat, ivf, hnsw or auto")


def build_index(vectors: np.ndarray, kind: str | IndexSettings = "flat", *, nprobe: int | None = None,
                train_sample: int | None = None, seed: int = 0) -> Any:
    """A FAISS inner-product index over ``vectors``: "flat", "ivf", "hnsw", "auto" or explicit settings.

    IVF's k-means trains on at most ``train_sample`` rows (default 64 per cell): more costs time and
    buys no recall measurable at nprobe ≥ 8.
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    settings = kind if isinstance(kind, IndexSettings) else choose_index(n, kind)
    if nprobe is not None and settings.kind == "ivf":
        settings = replace(settings, nprobe=int(min(nprobe, settings.nlist or nprobe)))
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif settings.kind == "ivf":
        nlist = int(settings.nlist or ivf_settings(n).nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.max_points_per_centroid = 256
        limit = train_sample or 64 * nlist
        sample = x if n <= limit else x[np.random.default_rng(seed).choice(n, limit, replace=False)]
        index.train(sample)
        index.nprobe = int(min(settings.nprobe or 8, nlist))
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(settings.M or 32), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(settings.efConstruction or 64)
        index.hnsw.efSearch = int(settings.efSearch or 128)
    else:
        raise ValueError(f"unknown index type {settings.kind!r}; choose flat, ivf, hnsw or auto")
    index.add(x)
    return index


def settings_of(index: Any) -> IndexSettings:
    """Read the settings back from a built (or loaded) FAISS index, for the manifest."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        return IndexSettings("ivf", nlist=int(index.nlist), nprobe=int(index.nprobe))
    if isinstance(index, faiss.IndexHNSW):
        return IndexSettings("hnsw", M=int(index.hnsw.nb_neighbors(1)), efSearch=int(index.hnsw.efSearch),
                             efConstruction=int(index.hnsw.efConstruction))
    if isinstance(index, faiss.IndexFlat):
        return IndexSettings("flat")
    raise ValueError(f"unsupported FAISS index {type(index).__name__}")
