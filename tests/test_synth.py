"""The synthetic generator: deterministic by seed, with the distribution shape it promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import app
from trainer.synth import SynthSpec, generate

SPEC = SynthSpec(users=2000, items=1000, events=60_000, seed=7)


def test_same_seed_same_log_other_seed_other_log() -> None:
    a, b = generate(SPEC), generate(SPEC)
    pd.testing.assert_frame_equal(a, b)
    c = generate(SynthSpec(users=2000, items=1000, events=60_000, seed=8))
    assert not a["item_id"].equals(c["item_id"])


def test_exact_size_and_columns() -> None:
    frame = generate(SPEC)
    assert len(frame) == SPEC.events
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "type", "value", "event_id"]
    assert frame["event_id"].is_unique
    assert frame["user_id"].nunique() == SPEC.users  # everybody has at least one event
    assert frame["timestamp"].is_monotonic_increasing


def test_item_popularity_is_zipf_like() -> None:
    counts = np.sort(generate(SPEC)["item_id"].value_counts().to_numpy())[::-1]
    ranks = np.arange(1, counts.size + 1)
    top = slice(0, 200)  # the head, where sampling noise is small
    slope = np.polyfit(np.log(ranks[top]), np.log(counts[top]), 1)[0]
    assert -1.5 < slope < -0.5, slope
    assert counts[:10].sum() > 0.1 * counts.sum()  # a heavy head


def test_user_activity_is_log_normal() -> None:
    per_user = generate(SPEC)["user_id"].value_counts().to_numpy()
    logs = np.log(per_user[per_user > 3])
    skew_raw = ((per_user - per_user.mean()) ** 3).mean() / per_user.std() ** 3
    skew_log = ((logs - logs.mean()) ** 3).mean() / logs.std() ** 3
    assert skew_raw > 1.5  # long right tail in raw counts
    assert abs(skew_log) < 1.0  # roughly symmetric on the log scale


def test_planted_clusters_dominate_each_users_positives() -> None:
    frame = generate(SPEC)
    item_cluster, user_cluster = frame.attrs["item_cluster"], frame.attrs["user_cluster"]
    users = frame["user_id"].str[1:].astype(int).to_numpy()
    items = frame["item_id"].str[1:].astype(int).to_numpy()
    positive = ~frame["type"].isin(["dislike", "skip"]).to_numpy()
    same = item_cluster[items] == user_cluster[users]
    assert same[positive].mean() > 0.75
    assert same[~positive].mean() < 0.05  # explicit negatives are off-taste
    assert (~positive).mean() > 0.01


@pytest.mark.parametrize("name", ["events.csv", "events.parquet"])
def test_synth_cli_writes_file(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    result = CliRunner().invoke(
        app, ["synth", "--users", "50", "--items", "40", "--events", "900", "--seed", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out) if name.endswith(".parquet") else pd.read_csv(out)
    assert len(frame) == 900 and {"user_id", "item_id", "timestamp"} <= set(frame.columns)
