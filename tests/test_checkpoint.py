"""Checkpoint format: atomic writes, verified reads, refusal of partial and corrupt directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from trainer.checkpoint import (
    ITEM_EMB,
    MANIFEST,
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)


def _write(root: Path, version: str = "v1", **overrides):  # noqa: ANN202
    rng = np.random.default_rng(0)
    n_users, n_items, dim = 30, 20, 8
    seen = sparse.random(n_users, n_items, density=0.2, format="csr", random_state=1)
    kwargs = dict(
        version=version,
        user_embeddings=rng.normal(size=(n_users, dim)),
        item_embeddings=rng.normal(size=(n_items, dim)),
        user_ids=[f"u{i}" for i in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        item_popularity=rng.integers(0, 100, n_items),
        seen=seen,
        feedback=sparse.random(n_users, n_items, density=0.05, format="csr", random_state=2),
        config={"dim": dim},
        metrics={"ndcg@10": 0.2},
        diagnostics=[{"epoch": 1, "mean_neg_score": 0.1}],
        watermark=1234,
        extra_files={"model.pt": b"torch state bytes"},
    )
    kwargs.update(overrides)
    return write_checkpoint(root, **kwargs), kwargs


def test_round_trip(tmp_path: Path) -> None:
    path, kw = _write(tmp_path)
    ckpt = read_checkpoint(path)
    assert ckpt.version == "v1" and ckpt.dim == 8 and ckpt.watermark == 1234
    np.testing.assert_array_equal(ckpt.item_embeddings, kw["item_embeddings"].astype(np.float32))
    np.testing.assert_array_equal(ckpt.user_embeddings, kw["user_embeddings"].astype(np.float32))
    assert ckpt.item_row["i7"] == 7 and ckpt.user_ids[3] == "u3"
    assert (ckpt.seen != kw["seen"].astype(bool)).nnz == 0
    assert (ckpt.feedback != kw["feedback"].astype(bool)).nnz == 0
    assert ckpt.manifest["metrics"] == {"ndcg@10": 0.2}
    assert ckpt.extra_file("model.pt").read_bytes() == b"torch state bytes"
    index = ckpt.load_index()
    scores, ids = index.search(ckpt.user_embeddings[:1], 5)
    expected = np.argsort(-(ckpt.item_embeddings @ ckpt.user_embeddings[0]))[:5]
    np.testing.assert_array_equal(ids[0], expected)


def test_tower_tables_round_trip_and_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    from trainer.towers import UserTower

    tower = UserTower(temperature=0.2, free=True, pooled=True, bias=True)
    rng = np.random.default_rng(3)
    history, free = rng.normal(size=(20, 7)), rng.normal(size=(30, 7))
    path, _ = _write(tmp_path, tower=tower, history_embeddings=history, user_free_embeddings=free)
    ckpt = read_checkpoint(path, mmap=True)
    assert ckpt.tower == tower
    np.testing.assert_allclose(ckpt.history_embeddings, history.astype(np.float32))
    np.testing.assert_allclose(ckpt.user_free_embeddings, free.astype(np.float32))
    plain = read_checkpoint(_write(tmp_path, version="v2")[0])
    assert plain.history_embeddings is None and plain.tower == UserTower.from_manifest({})
    with pytest.raises(CheckpointError, match="history_embeddings.npy must have 20 rows"):
        _write(tmp_path, version="v3", history_embeddings=history[:5])


def test_memory_mapped_read_gives_the_same_arrays(tmp_path: Path) -> None:
    path, _ = _write(tmp_path)
    loaded, mapped = read_checkpoint(path), read_checkpoint(path, mmap=True)
    assert isinstance(mapped.item_embeddings, np.memmap)
    np.testing.assert_array_equal(loaded.item_embeddings, mapped.item_embeddings)


@pytest.mark.parametrize(
    "damage",
    ["flip-byte", "truncate", "delete-file", "delete-manifest", "garbage-manifest", "future-format"],
)
def test_damaged_checkpoint_is_refused_with_a_reason(tmp_path: Path, damage: str) -> None:
    path, _ = _write(tmp_path)
    target = path / ITEM_EMB
    if damage == "flip-byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        match = "checksum"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
        match = "bytes, expected"
    elif damage == "delete-file":
        target.unlink()
        match = "missing"
    elif damage == "delete-manifest":
        (path / MANIFEST).unlink()
        match = "partial"
    elif damage == "garbage-manifest":
        (path / MANIFEST).write_text("{not json")
        match = "unreadable manifest"
    else:
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["format_version"] = 99
        (path / MANIFEST).write_text(json.dumps(manifest))
        match = "format_version 99"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_inconsistent_inputs_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="id maps"):
        _write(tmp_path, user_ids=["only-one"])
    with pytest.raises(CheckpointError, match="invalid model version"):
        _write(tmp_path, version="../escape")
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind
    _write(tmp_path, "v1")
    with pytest.raises(CheckpointError, match="already exists"):
        _write(tmp_path, "v1")


def test_killed_writer_leaves_nothing_visible(tmp_path: Path) -> None:
    """A writer killed mid-way leaves only a hidden temporary directory that listing ignores."""
    script = f"""
import os, signal, numpy as np
import trainer.checkpoint as c
real = c._save_npy
calls = []
def slow(path, arr):
    real(path, arr)
    calls.append(path)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
c._save_npy = slow
from scipy import sparse
c.write_checkpoint({str(tmp_path)!r}, version="v9", user_embeddings=np.ones((3, 2)), item_embeddings=np.ones((4, 2)),
    user_ids=["a", "b", "c"], item_ids=["w", "x", "y", "z"], item_popularity=np.ones(4, dtype=int),
    seen=sparse.csr_matrix((3, 4)))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert done.returncode == -9
    leftovers = os.listdir(tmp_path)
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)
    assert list_checkpoints(tmp_path) == []
    path, _ = _write(tmp_path, "v9")  # the next writer succeeds
    assert list_checkpoints(tmp_path) == [path]
