"""What the data decides: the default tower ("auto") follows its density (a free vector only where users
have the events), the default temperature its size (softer on small logs)."""

from __future__ import annotations

import pytest

from trainer.config import (
    FREE_PART_MIN_MEDIAN,
    SHARP_MIN_POSITIVES,
    SHARP_TEMPERATURE,
    SOFTEST_TEMPERATURE,
    TrainConfig,
)
from trainer.data import build_dataset
from trainer.pipeline import run
from trainer.synth import SynthSpec, generate

FAST = dict(epochs=2, batch_size=256, threads=1, progress=False, patience=1)


def _log(events_per_user: int):  # noqa: ANN202
    return generate(SynthSpec(users=200, items=300, events=200 * events_per_user, seed=3, activity_sigma=0.2))


@pytest.mark.parametrize(("per_user", "tower"), [(4, "pooled"), (120, "both")])
def test_auto_resolves_by_the_median_user_and_the_checkpoint_config_says_which(per_user: int, tower: str) -> None:
    frame = _log(per_user)
    median = build_dataset(frame).median_positives()
    assert (median >= FREE_PART_MIN_MEDIAN) == (tower == "both"), median
    result = run(frame, TrainConfig(**FAST))
    assert TrainConfig().tower == "auto"
    assert result.selection.config.tower == result.final.config.tower == tower
    assert result.final.model.tower.free == (tower == "both") and result.final.model.tower.pooled


def test_an_explicit_tower_is_kept_and_auto_is_never_built_unresolved() -> None:
    assert TrainConfig(tower="free").for_data(1000.0, 10**6).tower == "free"
    assert TrainConfig(tower="pooled").for_data(1000.0, 10**6).tower == "pooled"
    assert TrainConfig().for_data(FREE_PART_MIN_MEDIAN, 10**6).tower == "both"
    assert TrainConfig().for_data(FREE_PART_MIN_MEDIAN - 1, 10**6).tower == "pooled"
    with pytest.raises(ValueError, match="resolved for the data"):
        TrainConfig().user_tower()


def test_the_temperature_is_sharp_on_large_logs_softer_on_small_ones_and_a_given_one_is_kept() -> None:
    def tau(positives: int) -> float:
        return TrainConfig().for_data(5.0, positives).temperature

    assert TrainConfig().temperature is None
    assert tau(10**7) == tau(SHARP_MIN_POSITIVES) == SHARP_TEMPERATURE
    assert tau(SHARP_MIN_POSITIVES // 2) == round(SHARP_TEMPERATURE * 2**0.5, 3)
    assert SHARP_TEMPERATURE < tau(25_000) < tau(12_000) < SOFTEST_TEMPERATURE == tau(100) == tau(0)
    assert TrainConfig(temperature=0.07).for_data(5.0, 100).temperature == 0.07
    with pytest.raises(ValueError, match="resolved for the data"):
        TrainConfig(tower="pooled").user_tower()


def test_a_run_records_the_temperature_it_trained_with() -> None:
    frame = _log(4)  # 800 events: a small log, the softest temperature
    result = run(frame, TrainConfig(**FAST))
    assert result.selection.config.temperature == result.final.config.temperature == SOFTEST_TEMPERATURE
    assert result.final.model.tower.temperature == SOFTEST_TEMPERATURE
