"""The approximate serving index (calibrated, cached, exact fallback) and the fast recommendation path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from api_support import embedding_checkpoint

from app.api.routes import _fast_params
from app.serving import ann, cache
from app.serving.model import load_model


def _settled(model):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + 120
    while (model.ann_pending or model.top_pending) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not model.ann_pending and not model.top_pending
    return model


def test_large_catalogue_gets_a_calibrated_cached_ivf_index(tmp_path: Path) -> None:
    path = embedding_checkpoint(tmp_path / "checkpoints", clustered=True)
    cache = tmp_path / "index-cache"
    model = load_model(path, index_cache=cache, ann_min_items=1000)
    assert model.ann is None  # exact search serves while the index builds in the background
    _settled(model)
    info = model.ann_info
    assert model.ann is not None and info.kind == "ivf" and info.recall_at_10 >= ann.RECALL_TARGET
    assert info.distances_per_query * ann.MIN_SPEEDUP <= model.n_items

    hits = 0
    for row in range(0, 600, 7):  # the served lists agree with exact search (seen items excluded)
        vector, seen = model.user_vector(row), model.seen_rows(row).tolist()
        got = model.search(vector, 10, seen)
        model_exact = model.ann
        model.ann = None
        want = model.search(vector, 10, seen)
        model.ann = model_exact
        assert not set(got.rows.tolist()) & set(seen)
        hits += len(set(got.rows.tolist()) & set(want.rows.tolist()))
    assert hits / (10 * len(range(0, 600, 7))) >= 0.9

    again = load_model(path, index_cache=cache, ann_min_items=1000)  # another worker, or a restart
    assert again.ann is not None and not again.ann_pending and again.ann_info == info


def test_every_cache_entry_counts_against_the_limit(tmp_path: Path) -> None:
    """The index and the top lists share one cache implementation: an index written with the top lists off
    prunes the directory to its newest entries as a top-list table does."""
    path = embedding_checkpoint(tmp_path / "checkpoints", clustered=True)
    cache_dir = tmp_path / "index-cache"
    cache_dir.mkdir()
    for n in range(cache.KEEP + 3):  # older entries of earlier checkpoints
        old = cache_dir / f"old{n:02d}.json"
        old.write_text("{}")
        os.utime(old, (1_000_000 + n, 1_000_000 + n))
    model = _settled(load_model(path, index_cache=cache_dir, ann_min_items=1000, top_n=0))
    assert model.ann is not None and model.top is None
    keys = {p.name.split(".", 1)[0] for p in cache_dir.iterdir()}
    assert len(keys) == cache.KEEP and ann.cache_key(model.ckpt) in keys
    assert not {f"old{n:02d}" for n in range(4)} & keys  # the oldest went


def test_structureless_embeddings_keep_exact_search(tmp_path: Path) -> None:
    path = embedding_checkpoint(
        tmp_path / "checkpoints", clustered=False, dim=64
    )  # 64 Gaussian dims: no neighbourhoods
    model = _settled(load_model(path, index_cache=tmp_path / "cache", ann_min_items=1000))
    assert model.ann is None and model.ann_info.kind == "exact" and model.ann_info.reason


def test_small_catalogue_is_searched_exactly(tmp_path: Path) -> None:
    path = embedding_checkpoint(tmp_path / "checkpoints", clustered=True)
    model = _settled(load_model(path, index_cache=tmp_path / "cache"))
    assert model.ann is None and model.ann_info is None and not list((tmp_path / "cache").glob("*.faiss"))


class _Missing:
    """An approximate index that finds nothing: the exact index must complete the list."""

    def search(self, query: np.ndarray, k: int):  # noqa: ANN201
        return np.zeros((1, k), np.float32), np.full((1, k), -1, np.int64)


def test_search_completes_a_short_approximate_answer_exactly(tmp_path: Path) -> None:
    path = embedding_checkpoint(tmp_path / "checkpoints", clustered=True)
    model = load_model(path)
    vector = model.user_vector(3)
    want = model.search(vector, 10, [1, 2, 3])
    model.ann = _Missing()
    got = model.search(vector, 10, [1, 2, 3])
    assert got.rows.tolist() == want.rows.tolist()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (10, True)),
        (b"k=25", (25, True)),
        (b"k=1000&exclude_seen=TRUE", (1000, True)),
        (b"exclude_seen=no&k=3", (3, False)),
        (b"k=5&utm_source=x", (5, True)),  # unknown parameters are ignored, as FastAPI does
        (b"k=0", None),  # out of range: the full handler answers 422
        (b"k=1001", None),
        (b"k=ten", None),
        (b"k=+5", None),
        (b"k=5&k=6", None),
        (b"exclude_seen=maybe", None),
        (b"exclude=i1", None),  # filters and explanations take the full handler
        (b"only=i1", None),
        (b"category=drama", None),
        (b"explain=true", None),
        (b"%6B=5", None),  # an encoded name may decode to a parameter
    ],
)
def test_fast_path_takes_only_plain_valid_queries(query: bytes, expected: tuple[int, bool] | None) -> None:
    assert _fast_params(query) == expected
