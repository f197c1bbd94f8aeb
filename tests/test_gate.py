"""The retrain gate in-process: the candidate and the current model scored on the same users."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainer.evaluate
from app.jobs.retrain import RetrainOptions, _gate
from trainer.checkpoint import read_checkpoint
from trainer.config import TrainConfig
from trainer.pipeline import run, save
from trainer.synth import SynthSpec, generate


def test_a_large_catalogue_gates_on_one_fixed_sample_of_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REPORT_CELLS scores (users × items) both models are scored on the same sample of the slice's
    users; within it, on every one of them."""
    events = generate(SynthSpec(users=300, items=200, events=8000, seed=1))
    result = run(events, TrainConfig(epochs=2, batch_size=256, threads=1, progress=False))
    current = read_checkpoint(save(result, tmp_path))
    whole = _gate(result, current, events, frozenset(), RetrainOptions(), None)
    assert whole["users"] == whole["current"]["users"] == len(set(result.data.val_u.tolist()))
    monkeypatch.setattr(trainer.evaluate, "REPORT_CELLS", 1)
    monkeypatch.setattr(trainer.evaluate, "REPORT_MIN_USERS", 40)
    sampled = _gate(result, current, events, frozenset(), RetrainOptions(), None)
    assert sampled["users"] == sampled["candidate"]["users"] == sampled["current"]["users"] == 40
    assert sampled["held_out_pairs"] == whole["held_out_pairs"]  # the same slice; fewer of its users scored
