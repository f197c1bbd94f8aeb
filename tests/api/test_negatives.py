"""The admin view of negatives draws with the trainer's own sampler, as the served model was trained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import (
    Deployment,
    Server,
    assert_error,
    cluster_checkpoint,
    deploy,
    synthetic,
    train_checkpoint,
)

from app.db import registry
from app.db.engine import make_engine
from trainer.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from trainer.inspect_negatives import draw_negatives

# What make_sampler blends for each strategy ("hard" and "feedback" ride on uniform negatives).
SOURCES = {
    "uniform": {"uniform"},
    "popularity": {"popularity"},
    "in-batch": {"in-batch"},
    "hard": {"uniform", "hard"},
    "feedback": {"uniform", "feedback"},
    "mixed": {"in-batch", "uniform"},
}


def _sources(body: dict) -> set[str]:
    return {n["source"] for n in body["negatives"]}


def _disliker(dep: Deployment) -> tuple[str, set[str]]:
    """The user with the most explicit negatives, and those items."""
    frame = dep.frame
    negative = frame[frame.type.isin(["dislike", "skip"])]
    user = str(negative.user_id.value_counts().index[0])
    return user, set(negative.loc[negative.user_id == user, "item_id"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Server]]:
    """A model trained (one epoch) with each strategy, registered; a server to promote them in turn."""
    data_dir = tmp_path_factory.mktemp("negatives")
    dep = deploy(f"sqlite:///{data_dir / 'recsys.db'}", data_dir)
    engine = make_engine(dep.url)
    try:
        for strategy in SOURCES:
            path, watermark = train_checkpoint(dep.url, dep.checkpoints, strategy, strategy=strategy, epochs=1)
            with engine.begin() as conn:
                registry.register(conn, strategy, str(path), watermark=watermark)
    finally:
        engine.dispose()
    server = Server(dep)
    try:
        server.wait_ready()
        yield dep, server
    finally:
        server.stop()


@pytest.mark.parametrize("strategy", list(SOURCES))
def test_the_trained_strategy_is_drawn(trained: tuple[Deployment, Server], strategy: str) -> None:
    dep, server = trained
    user, disliked = _disliker(dep)
    with server.admin() as a:
        assert a.post(f"/admin/models/{strategy}/promote").json()["model_version"] == strategy
        body = a.get(f"/admin/users/{user}/negatives", params={"n": 40, "seed": 1}).json()
    assert body["model_version"] == strategy and body["requested"] == "trained"
    assert body["strategy"] == strategy and body["sampler"]["strategy"] == strategy and body["sampler"]["recorded"]
    assert _sources(body) == SOURCES[strategy]
    assert len(body["negatives"]) == body["summary"]["count"] == 40
    shown = {s: v["shown"] for s, v in body["summary"]["sources"].items()}
    assert shown == {s: sum(n["source"] == s for n in body["negatives"]) for s in SOURCES[strategy]}
    if strategy == "feedback":  # the user's own explicit negatives, from the database
        assert {n["item_id"] for n in body["negatives"] if n["source"] == "feedback"} <= disliked
    if strategy == "mixed":  # in proportion to training's draws per row: a batch of 1024, 512 uniform
        assert body["summary"]["sources"]["in-batch"]["per_training_row"] == 1024
        assert body["summary"]["sources"]["uniform"]["per_training_row"] == 512
        assert (shown["in-batch"], shown["uniform"]) == (27, 13)


def test_named_strategies_seeds_and_errors(trained: tuple[Deployment, Server]) -> None:
    """A source's name draws that source alone, with the model's recorded settings; `mixed` the blend."""
    dep, server = trained
    user, _ = _disliker(dep)
    with server.admin() as a:
        assert a.post("/admin/models/hard/promote").status_code == 200
        for source in ("uniform", "popularity", "in-batch", "hard", "feedback"):
            alone = a.get(f"/admin/users/{user}/negatives", params={"strategy": source, "n": 8}).json()
            assert alone["strategy"] == source and _sources(alone) == {source} and len(alone["negatives"]) == 8
            assert alone["sampler"]["pool"] == 100  # the rest of the recorded configuration is kept
        params = {"strategy": "mixed", "n": 12, "seed": 3}
        mixed = a.get(f"/admin/users/{user}/negatives", params=params).json()
        assert mixed["strategy"] == "mixed" and mixed["requested"] == "mixed" and _sources(mixed) == SOURCES["mixed"]
        first = mixed["negatives"][0]
        assert set(first) >= {"item_id", "source", "q", "score", "rank", "popularity", "known_positive"}
        again = a.get(f"/admin/users/{user}/negatives", params=params).json()
        assert again["negatives"] == mixed["negatives"]  # a seed makes the draw repeatable
        assert_error(a.get("/admin/users/nobody-here/negatives"), 404, "unknown_user")
        assert_error(a.get(f"/admin/users/{user}/negatives", params={"strategy": "bogus"}), 422, "bad_strategy")


def test_a_checkpoint_without_a_recorded_sampler_uses_the_defaults(tmp_path: Path) -> None:
    """Older or hand-made checkpoints: the trainer's default configuration stands in, and says so; keys a
    newer trainer records are ignored."""
    bare = read_checkpoint(cluster_checkpoint(tmp_path, synthetic(), "bare", watermark=None))
    body = draw_negatives(bare, "u1", n=10, seed=0)
    assert body["strategy"] == "mixed" and not body["sampler"]["recorded"] and _sources(body) == SOURCES["mixed"]
    newer = read_checkpoint(_with_config(bare, {"sampler": {"strategy": "hard", "future_knob": 3}}, tmp_path))
    body = draw_negatives(newer, "u1", n=10, seed=0)
    assert body["strategy"] == "hard" and body["sampler"]["recorded"] and _sources(body) == SOURCES["hard"]


def _with_config(ckpt: Checkpoint, config: dict, root: Path) -> Path:
    return write_checkpoint(
        root, version="configured", user_embeddings=ckpt.user_embeddings, item_embeddings=ckpt.item_embeddings,
        user_ids=ckpt.user_ids, item_ids=ckpt.item_ids, item_popularity=ckpt.item_popularity, seen=ckpt.seen,
        feedback=ckpt.feedback, config=config,
    )
