"""The default tower ("auto") follows the data's density: a free vector only where users have the events."""

from __future__ import annotations

import pytest

from trainer.config import FREE_PART_MIN_MEDIAN, TrainConfig
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
    assert TrainConfig(tower="free").for_data(1000.0).tower == "free"
    assert TrainConfig(tower="pooled").for_data(1000.0).tower == "pooled"
    assert TrainConfig().for_data(FREE_PART_MIN_MEDIAN).tower == "both"
    assert TrainConfig().for_data(FREE_PART_MIN_MEDIAN - 1).tower == "pooled"
    with pytest.raises(ValueError, match="resolved for the data"):
        TrainConfig().user_tower()
