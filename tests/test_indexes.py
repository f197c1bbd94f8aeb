"""Index types by catalogue size: the approximate indexes find what exact search finds, the chooser picks
exact search for small catalogues, and the settings travel with the checkpoint."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from scipy import sparse

from trainer import indexes
from trainer.checkpoint import read_checkpoint, write_checkpoint
from trainer.indexes import IndexSettings, build_index, choose_index, settings_of

# 20k clustered items, the chooser's own settings for that size: measured recall@10 1.000 for both kinds,
# recall@100 0.991 (IVF, mining's nprobe 8 of 512) and 0.997 (HNSW, efSearch 128); below these bounds the settings
# (or FAISS) changed for the worse.
MIN_RECALL_AT_10 = 0.98
MIN_RECALL_AT_100 = 0.95


def clustered(n: int, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20k unit vectors in 200 taste clusters, 200 queries from the same clusters, exact top 100."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 32))
    items, queries = clustered(20_000, centers, rng), clustered(200, centers, rng)
    _, exact = build_index(items, "flat").search(queries, 100)
    return items, queries, exact


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], e[:k])) / k for f, e in zip(found, exact, strict=True)]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_finds_the_exact_top_items(kind: str, catalogue: tuple) -> None:
    items, queries, exact = catalogue
    settings = choose_index(len(items), kind)
    index = build_index(items, settings)
    _, found = index.search(queries, 100)
    assert recall(found, exact, 10) >= MIN_RECALL_AT_10
    assert recall(found, exact, 100) >= MIN_RECALL_AT_100
    assert settings_of(index) == settings


def test_chooser_picks_exact_search_up_to_the_threshold() -> None:
    assert choose_index(1).kind == "flat"
    assert choose_index(indexes.MINING_EXACT_MAX).kind == "flat"
    assert choose_index(indexes.MINING_EXACT_MAX + 1).kind == indexes.MINING_APPROXIMATE
    assert choose_index(indexes.SERVING_EXACT_MAX, serving=True).kind == "flat"
    assert choose_index(indexes.SERVING_EXACT_MAX + 1, serving=True).kind == indexes.SERVING_APPROXIMATE
    assert choose_index(10, exact_max=5).kind == indexes.MINING_APPROXIMATE
    assert choose_index(500_000, "flat") == IndexSettings("flat")  # a forced kind wins over the size
    ivf = choose_index(1_000_000, "ivf")
    assert ivf.nlist == 4000 and 8 <= ivf.nprobe <= ivf.nlist
    with pytest.raises(ValueError, match="unknown index type"):
        choose_index(10, "lsh")


def test_auto_builds_flat_for_a_small_catalogue_and_samplers_reexport_it() -> None:
    from trainer.samplers import build_index as from_samplers

    assert from_samplers is build_index
    index = build_index(np.eye(8, dtype=np.float32), "auto")
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlatIP)


def _write(root, items: np.ndarray, index, version: str):  # noqa: ANN001, ANN202
    n_users = 3
    users = np.ones((n_users, items.shape[1]), dtype=np.float32)
    return write_checkpoint(
        root, version=version, user_embeddings=users, item_embeddings=items, user_ids=["a", "b", "c"],
        item_ids=[f"i{j}" for j in range(len(items))], item_popularity=np.ones(len(items), dtype=np.int64),
        seen=sparse.csr_matrix((n_users, len(items))), index=index)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_settings_round_trip_through_a_checkpoint(kind: str, tmp_path, catalogue: tuple) -> None:  # noqa: ANN001
    items = catalogue[0][:4000]
    settings = choose_index(len(items), kind)
    path = _write(tmp_path, items, build_index(items, settings), f"v-{kind}")
    ckpt = read_checkpoint(path)
    assert ckpt.index_settings == settings.to_dict()
    assert IndexSettings.from_dict(ckpt.index_settings) == settings
    assert settings_of(ckpt.load_index()) == settings  # nprobe / efSearch survive faiss' own file


def test_old_manifest_without_settings_still_reads(tmp_path, catalogue: tuple) -> None:  # noqa: ANN001
    path = _write(tmp_path, catalogue[0][:500], None, "old")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["index_settings"]["kind"] == "flat"  # derived from the index when not given
    del manifest["index_settings"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert read_checkpoint(path).index_settings is None


def test_pipeline_saves_the_serving_index_the_chooser_picks(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from trainer.config import SamplerConfig, TrainConfig
    from trainer.pipeline import run, save
    from trainer.synth import SynthSpec, generate

    events = generate(SynthSpec(users=100, items=60, events=1000, seed=3))
    result = run(events, TrainConfig(epochs=1, progress=False, threads=1, sampler=SamplerConfig("uniform")),
                 ship="tested")
    monkeypatch.setattr(indexes, "SERVING_EXACT_MAX", 10)  # a "large" catalogue: past the threshold
    ckpt = read_checkpoint(save(result, tmp_path, version="served"))
    assert ckpt.index_settings == choose_index(ckpt.manifest["n_items"], "hnsw").to_dict()
    assert settings_of(ckpt.load_index()).kind == "hnsw"
