"""What the data decides: the default tower ("auto") follows its density (a free vector only where users
have the events), the default temperature its size (softer on small logs), the cap on epochs and the
patience its steps per epoch (more epochs where an epoch is a few steps)."""

from __future__ import annotations

import pytest

from trainer.config import (
    CAP_EPOCHS,
    CAP_MAX,
    CAP_STEPS,
    FREE_PART_MIN_MEDIAN,
    PATIENCE_EPOCHS,
    PATIENCE_MAX,
    PATIENCE_STEPS,
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


def test_epochs_and_patience_count_steps_on_small_logs_and_given_ones_are_kept() -> None:
    def cap_and_patience(positives: int, batch_size: int = 1024) -> tuple[int, int]:
        cfg = TrainConfig(batch_size=batch_size).for_data(5.0, positives)
        return cfg.epochs, cfg.patience

    assert TrainConfig().epochs is None and TrainConfig().patience is None
    # the four benchmark sets (78-245 steps an epoch) keep a patience of 3; ml-100k's cap is 39 epochs
    assert cap_and_patience(250_064) == cap_and_patience(10**8) == (CAP_EPOCHS, PATIENCE_EPOCHS)
    assert cap_and_patience(79_619) == (39, PATIENCE_EPOCHS)
    # 13 steps an epoch (gowalla cut to 8% of its users): as many epochs as make the steps
    assert cap_and_patience(13_364) == (-(-CAP_STEPS // 14), -(-PATIENCE_STEPS // 14)) == (215, 15)
    assert cap_and_patience(13_364, batch_size=256) == (57, 4)  # 53 steps an epoch: the batch counts too
    assert cap_and_patience(1) == cap_and_patience(5_000) == (CAP_MAX, PATIENCE_MAX)  # tiny logs: bounded
    given = TrainConfig(epochs=5, patience=1).for_data(5.0, 100)
    assert (given.epochs, given.patience) == (5, 1)
    assert TrainConfig(epochs=5, patience=1, temperature=0.2, tower="pooled").resolved()
    assert not TrainConfig(patience=1, temperature=0.2, tower="pooled").resolved()


def test_a_run_records_the_temperature_it_trained_with() -> None:
    frame = _log(4)  # 800 events: a small log, the softest temperature
    result = run(frame, TrainConfig(**FAST))
    assert result.selection.config.temperature == result.final.config.temperature == SOFTEST_TEMPERATURE
    assert result.final.model.tower.temperature == SOFTEST_TEMPERATURE


def test_a_tiny_log_trains_by_steps_and_ships_the_epochs_selection_chose() -> None:
    frame = _log(4)  # 800 events: one step an epoch, so the bounded step rule's cap and patience
    result = run(frame, TrainConfig(threads=1, progress=False))
    assert (result.selection.config.epochs, result.selection.config.patience) == (CAP_MAX, PATIENCE_MAX)
    # it stopped only after PATIENCE_MAX epochs without a better validation score (or at the cap)
    ran = len(result.selection.history)
    assert ran == CAP_MAX or ran - result.selection.best_epoch == PATIENCE_MAX, (ran, result.selection.best_epoch)
    assert result.final.config.epochs == result.selection.best_epoch == len(result.final.history)
