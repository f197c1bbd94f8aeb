"""Fixtures for the trainer tests: small synthetic logs with planted clusters, written to real files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from trainer.synth import SynthSpec, generate


@pytest.fixture(scope="session")
def small_events() -> pd.DataFrame:
    """300 users, 200 items, 8k events in planted taste clusters (with dislike/skip feedback)."""
    return generate(SynthSpec(users=300, items=200, events=8000, seed=1))


@pytest.fixture(scope="session")
def small_file(small_events: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.csv"
    small_events.to_csv(path, index=False)
    return path
