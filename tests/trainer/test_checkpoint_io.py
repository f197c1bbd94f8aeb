"""The trainer's checkpoint: what it writes reads back, warm-starts a model, and is refused when damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer.checkpoint import CheckpointError, read_checkpoint
from trainer.config import TrainConfig
from trainer.inspect_negatives import draw_negatives
from trainer.pipeline import run, save
from trainer.train import fit, load_model_state

FAST = dict(epochs=3, batch_size=256, threads=1, progress=False)


@pytest.fixture(scope="module")
def trained(small_events: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    result = run(small_events, TrainConfig(**FAST))
    path = save(result, tmp_path_factory.mktemp("ckpt"), version="v1")
    return result, path


def test_round_trip(trained) -> None:  # noqa: ANN001
    result, path = trained
    ckpt = read_checkpoint(path)
    users, items = result.final.model.export()
    assert np.array_equal(ckpt.user_embeddings, users) and np.array_equal(ckpt.item_embeddings, items)
    assert ckpt.user_ids == result.data.user_ids and ckpt.item_ids == result.data.item_ids
    assert ckpt.seen.nnz == result.data.all_u.size  # every positive of train, validation and test
    assert ckpt.item_popularity.sum() == result.data.all_u.size
    assert ckpt.feedback.nnz == result.data.feedback.nnz > 0  # dislike/skip events, kept for serving
    m = ckpt.manifest
    assert m["metrics"]["held_out"]["ndcg@10"] == result.held_out["ndcg@10"]
    tau = result.final.config.temperature  # resolved by the log's size (TrainConfig.for_data)
    assert m["config"]["temperature"] == tau and ckpt.tower.temperature == tau and m["config"]["shipped"] == "all"
    assert {d["phase"] for d in m["diagnostics"]} == {"selection", "all"}
    # stored scores are the training logits: [cosine / temperature, 1] . [unit item vector, item bias]
    assert ckpt.tower.bias and ckpt.tower == result.final.model.tower
    assert np.allclose(np.linalg.norm(ckpt.item_embeddings[:, :-1], axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(ckpt.user_embeddings[:, :-1], axis=1), 1 / tau, atol=1e-4)
    assert np.all(ckpt.user_embeddings[:, -1] == 1)
    index = ckpt.load_index()
    _, top = index.search(ckpt.user_embeddings[:3], 5)
    assert np.array_equal(top, np.argsort(-(ckpt.user_embeddings[:3] @ ckpt.item_embeddings.T), axis=1)[:, :5])


def test_warm_start_from_model_pt(trained) -> None:  # noqa: ANN001
    result, path = trained
    state = load_model_state(read_checkpoint(path).extra_file("model.pt").read_bytes())
    warm = fit(result.data, TrainConfig(**{**FAST, "epochs": 1, "lr": 1e-9}), init_state=state)
    assert np.allclose(warm.model.export()[1], result.final.model.export()[1], atol=1e-4)


def test_corrupted_checkpoint_is_refused(trained, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    _, path = trained
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    raw = bytearray((bad / "item_embeddings.npy").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "item_embeddings.npy").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(bad)


def test_draw_negatives_report(trained) -> None:  # noqa: ANN001
    _, path = trained
    ckpt = read_checkpoint(path)
    user = ckpt.user_ids[0]
    known = set(ckpt.seen[0].indices.tolist())
    for strategy in ("uniform", "popularity", "in-batch", "hard", "mixed"):
        out = draw_negatives(ckpt, user, strategy, 20, seed=0)
        assert out["model_version"] == "v1" and out["summary"]["count"] == len(out["negatives"]) > 0
        for neg in out["negatives"]:
            assert set(neg) == {"item_id", "source", "q", "score", "rank", "popularity", "known_positive"}
            assert 1 <= neg["rank"] <= len(ckpt.item_ids) and 0 < neg["q"] <= 1
            assert neg["known_positive"] == (ckpt.item_row[neg["item_id"]] in known)
        if strategy == "hard":
            assert not any(n["known_positive"] for n in out["negatives"])
            assert min(n["rank"] for n in out["negatives"]) > 5  # skipped top ranks (and positives) never drawn
        assert 0 <= out["summary"]["easy_share"] <= 1
        assert out["summary"]["known_positives_masked"] is True  # trained with the default mask_known
    hard = draw_negatives(ckpt, user, "hard", 50, seed=0)["summary"]["mean_score"]
    uniform = draw_negatives(ckpt, user, "uniform", 50, seed=0)["summary"]["mean_score"]
    assert hard > uniform
    fb = draw_negatives(ckpt, user, "feedback", 5, feedback_items=[ckpt.item_ids[3]], seed=0)
    assert {n["item_id"] for n in fb["negatives"]} == {ckpt.item_ids[3]}
    row = int(np.flatnonzero(np.diff(ckpt.feedback.indptr))[0])  # a user with stored explicit negatives
    stored = {ckpt.item_ids[i] for i in ckpt.feedback[row].indices}
    got = draw_negatives(ckpt, ckpt.user_ids[row], "feedback", 10, seed=0)["negatives"]
    assert got and {n["item_id"] for n in got} <= stored
    with pytest.raises(KeyError, match="unknown user"):
        draw_negatives(ckpt, "nobody", "hard", 5)
    with pytest.raises(ValueError, match="unknown strategy"):
        draw_negatives(ckpt, user, "nope", 5)
