"""A memory-mapped checkpoint serves the same answers as one read into memory.

The service maps the embedding tables (``read_checkpoint(path, mmap=True)``) so that its worker processes
share one copy through the page cache; that must change nothing a client sees: the same ranked ids and
scores for recommendations, filtered recommendations and similar items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

import app.serving.model as served
from trainer.checkpoint import read_checkpoint, write_checkpoint
from trainer.indexes import build_index

N_USERS, N_ITEMS, DIM = 200, 3000, 16


@pytest.fixture(scope="module", params=["flat", "hnsw"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    users = rng.standard_normal((N_USERS, DIM)).astype(np.float32)
    items = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    seen = sparse.random(N_USERS, N_ITEMS, density=0.01, random_state=1, format="csr")
    feedback = sparse.random(N_USERS, N_ITEMS, density=0.002, random_state=2, format="csr")
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt"), version=f"mm-{request.param}", user_embeddings=users,
        item_embeddings=items, user_ids=[f"u{i}" for i in range(N_USERS)],
        item_ids=[f"i{j}" for j in range(N_ITEMS)], item_popularity=rng.integers(1, 100, N_ITEMS),
        seen=seen, feedback=feedback, index=build_index(items, request.param))


def load(path: Path, mmap: bool, monkeypatch: pytest.MonkeyPatch) -> served.ServedModel:
    """The service's own loader, reading the checkpoint with or without memory-mapping."""
    with monkeypatch.context() as m:
        m.setattr(served, "read_checkpoint", lambda p, **kw: read_checkpoint(p, **{**kw, "mmap": mmap}))
        return served.load_model(path, hidden_ids=["i3", "i10"], item_categories={"i5": ["a"], "i6": ["a"]})


def test_mmap_checkpoint_serves_the_same_answers(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mapped, loaded = load(checkpoint, True, monkeypatch), load(checkpoint, False, monkeypatch)
    assert isinstance(mapped.ckpt.item_embeddings, np.memmap)
    assert isinstance(mapped.ckpt.user_embeddings, np.memmap)
    assert not isinstance(loaded.ckpt.item_embeddings, np.memmap)
    only = np.arange(0, N_ITEMS, 2)
    for row in range(0, N_USERS, 7):
        results = []
        for model in (mapped, loaded):
            vector = model.user_vector(row)
            exclude = model.seen_rows(row)
            results.append([
                model.search(vector, 20, exclude),
                model.search_filtered(vector, 20, exclude, only),
                model.search_filtered(vector, 5, exclude, model.category_rows("a")),
                model.search(model.item_vector(row), 10, [row]),
                model.popular(10, exclude),
            ])
        for a, b in zip(*results, strict=True):
            assert len(a.rows) > 0
            np.testing.assert_array_equal(a.rows, b.rows)
            np.testing.assert_array_equal(a.scores, b.scores)
    ids = mapped.item_ids[mapped.search(mapped.user_vector(0), 10, mapped.seen_rows(0)).rows]
    assert not {"i3", "i10"} & set(ids)  # hidden items stay out on both paths
