"""Precomputed top lists: the answers a search gives, recent and hidden items skipped, fallbacks, cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from api_support import embedding_checkpoint
from scipy import sparse

from app.serving import cache, toplists
from app.serving.model import Ranked, ServedModel, load_model
from app.serving.recommender import NO_FILTERS, Recommender, UserVector

N_USERS, N_ITEMS, HEAVY = 600, 3000, 7  # user row HEAVY has seen all but 10 items


def _seen() -> sparse.csr_matrix:
    seen = sparse.random(N_USERS, N_ITEMS, density=0.002, format="lil", random_state=0, dtype=np.float32)
    seen[HEAVY, : N_ITEMS - 10] = 1.0
    seen = seen.tocsr()
    seen.data[:] = 1.0
    return seen


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return embedding_checkpoint(tmp_path / "checkpoints", clustered=True, seen=_seen())


def _settled(model: ServedModel) -> ServedModel:
    deadline = time.monotonic() + 120
    while (model.ann_pending or model.top_pending) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not model.ann_pending and not model.top_pending
    return model


CORE = Recommender(None, ())


def _recommend(model: ServedModel, row: int, k: int, recent: list[int]) -> Ranked:
    """What the serving core ranks for a model user with these items touched since training."""
    vector = UserVector(model.user_vector(row), "model", listed=True)
    ranked = CORE.rank(model, vector, row, k, list(recent), NO_FILTERS, True)
    assert ranked is not None
    return ranked


def _similar(model: ServedModel, row: int, k: int) -> Ranked:
    answer = CORE.similar(model, str(model.item_ids[row]), k)
    assert answer is not None
    return answer.ranked


def _same(got, want) -> None:  # noqa: ANN001
    assert got.rows.tolist() == want.rows.tolist()
    assert np.allclose(got.scores, want.scores, atol=1e-5)


@pytest.mark.parametrize("ann_min_items", [None, 1000], ids=["exact", "ivf"])
def test_top_lists_give_what_a_search_gives(
    checkpoint: Path, tmp_path: Path, ann_min_items: int | None
) -> None:
    model = _settled(
        load_model(checkpoint, index_cache=tmp_path / "cache", ann_min_items=ann_min_items, top_n=50)
    )
    assert model.top is not None and model.top.n == 50 and model.top.rows.shape == (N_USERS, 50)
    assert (model.ann is not None) == (ann_min_items is not None)
    answered = 0
    for row in range(N_USERS):
        vector, seen = model.user_vector(row), model.seen_rows(row).tolist()
        for k in (1, 10, 50):
            want = model.search(vector, k, seen)
            got = model.from_top_list(row, k, [])
            # None: the list ran out (the heavy user has ten unseen items; IVF may find fewer than k)
            if got is not None:
                _same(got, want)
                answered += 1
            elif row != HEAVY:
                assert ann_min_items is not None and (model.top.rows[row] < 0).any(), (row, k)
            _same(_recommend(model, row, k, []), want)
    assert model.from_top_list(HEAVY, 11, []) is None
    assert answered >= (3 * N_USERS - 3 if ann_min_items is None else 0.95 * 3 * N_USERS)

    assert model.top_similar is not None and model.top_similar.rows.shape == (N_ITEMS, 50)
    answered = 0
    for row in range(0, N_ITEMS, 3):
        for k in (1, 10, 50):
            want = model.search(model.item_vector(row), k, [row])
            got = model.similar_from_list(row, k)
            if got is not None:
                _same(got, want)
                answered += 1
            _same(_similar(model, row, k), want)
    assert answered >= (3 * N_ITEMS // 3 if ann_min_items is None else 0.95 * 3 * N_ITEMS // 3)


def test_recent_and_hidden_items_are_skipped(checkpoint: Path) -> None:
    model = _settled(load_model(checkpoint, top_n=30))
    row = 3
    full = model.from_top_list(row, 20, [])
    recent = full.rows[:3].tolist()
    hidden = int(full.rows[5])
    model.set_hidden([str(model.item_ids[hidden])])
    got = model.from_top_list(row, 10, recent)
    assert got is not None and not set(got.rows.tolist()) & {*recent, hidden}
    _same(got, model.search(model.user_vector(row), 10, recent + model.seen_rows(row).tolist()))
    assert got.rows.tolist() == [r for r in full.rows.tolist() if r not in {*recent, hidden}][:10]
    item = int(model.top_similar.rows[hidden, 0])  # the hidden item's nearest neighbour
    similar = model.similar_from_list(item, 10)
    assert similar is not None and hidden not in similar.rows.tolist() and item not in similar.rows.tolist()
    _same(similar, model.search(model.item_vector(item), 10, [item]))


def test_lists_that_run_out_fall_back_to_search(checkpoint: Path) -> None:
    model = _settled(load_model(checkpoint, top_n=20))
    row = 1
    vector, seen = model.user_vector(row), model.seen_rows(row).tolist()
    recent = model.from_top_list(row, 15, []).rows.tolist()  # only 5 of the 20 are left after these
    assert model.from_top_list(row, 10, recent) is None
    got = _recommend(model, row, 10, recent)
    _same(got, model.search(vector, 10, recent + seen))
    assert len(got.rows) == 10 and not set(got.rows.tolist()) & set(recent)
    assert model.from_top_list(row, 21, []) is None  # k beyond the list's length
    _same(_recommend(model, row, 21, []), model.search(vector, 21, seen))
    heavy = _recommend(model, HEAVY, 11, [])  # only 10 items exist that this user has not seen
    assert sorted(heavy.rows.tolist()) == list(range(N_ITEMS - 10, N_ITEMS))


def test_small_batches_build_the_same_table(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build splits users into batches by their exclusions; tiny batches must not change the table."""
    model = load_model(checkpoint, top_n=0)
    emb = np.asarray(model.ckpt.user_embeddings, dtype=np.float32)
    whole = toplists.build(emb, model.excluded, model.index, 40)
    monkeypatch.setattr(toplists, "MAX_RESULTS", 500)  # the heavy user alone needs 3000 hits: a batch of 1
    split = toplists.build(emb, model.excluded, model.index, 40)
    assert np.array_equal(whole.rows, split.rows) and np.allclose(whole.scores, split.scores)
    assert (whole.rows[HEAVY] >= 0).sum() == 10 and (whole.rows[HEAVY, 10:] == -1).all()


def test_top_lists_are_cached_and_a_broken_cache_is_rebuilt(checkpoint: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = _settled(load_model(checkpoint, index_cache=cache_dir, top_n=25))
    tables = {np.load(f, mmap_mode="r").shape[0]: f for f in cache_dir.glob("*.top-rows.npy")}
    assert sorted(tables) == [N_USERS, N_ITEMS]  # one per kind: users and similar items
    rows_file = tables[N_USERS]
    again = load_model(checkpoint, index_cache=cache_dir, top_n=25)  # another worker, or a restart
    assert again.top is not None and again.top_similar is not None and not again.top_pending  # no rebuild
    assert np.array_equal(again.top.rows, first.top.rows)
    other_length = load_model(checkpoint, index_cache=cache_dir, top_n=26)  # a different table, its own entry
    assert other_length.top is None and other_length.top_pending
    _settled(other_length)

    expected = np.array(first.top.rows)  # a copy: the other models map the file replaced below
    rows_file.unlink()  # a new file, never a rewrite in place: live models map the old one
    rows_file.write_bytes(b"\x93NUMPY broken")
    rebuilt = load_model(checkpoint, index_cache=cache_dir, top_n=25)
    assert rebuilt.top is None and rebuilt.top_pending  # the broken file is ignored, the table rebuilt
    _settled(rebuilt)
    assert np.array_equal(rebuilt.top.rows, expected) and np.array_equal(first.top.rows, expected)
    assert np.array_equal(np.load(rows_file), expected)


def test_top_lists_can_be_turned_off(checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(checkpoint, index_cache=tmp_path / "cache", top_n=0)
    assert model.top is None and not model.top_pending and not (tmp_path / "cache").exists()
    got = _recommend(model, 2, 10, [])
    _same(got, model.search(model.user_vector(2), 10, model.seen_rows(2).tolist()))


def test_the_cache_keeps_only_the_newest_entries(tmp_path: Path) -> None:
    """Each retrained checkpoint adds entries; the oldest go, all of their files together."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    for n in range(15):
        for suffix in (".faiss", ".json", ".top-rows.npy", ".top.lock"):
            path = cache_dir / f"key{n:02d}{suffix}"
            path.write_bytes(b"x")
            os.utime(path, (1_000_000 + n, 1_000_000 + n))
    removed = cache.prune(cache_dir, keep=12)
    assert sorted(removed) == ["key00", "key01", "key02"]
    left = {p.name.split(".", 1)[0] for p in cache_dir.iterdir()}
    assert left == {f"key{n:02d}" for n in range(3, 15)} and len(list(cache_dir.iterdir())) == 12 * 4
    assert cache.prune(cache_dir, keep=12) == []
