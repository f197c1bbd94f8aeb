"""The final fit in a second process: the same model a sequential one-thread fit trains, whatever the timing."""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import replace

import pandas as pd
import pytest
import torch

from trainer import prespawn
from trainer.config import TrainConfig
from trainer.data import build_dataset
from trainer.lockstep import FinalFit, FinalFitFailed
from trainer.pipeline import everything, holdout_as_validation, select_and_fit
from trainer.train import fit

CFG = TrainConfig(epochs=6, batch_size=256, threads=2, progress=False, patience=2, tower="pooled")


@pytest.fixture(scope="module")
def data(small_events: pd.DataFrame):  # noqa: ANN201
    return build_dataset(small_events, validation=False)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    # a failure says how far apart: last bits (a thread count or a kernel differed) or whole values (the seed)
    diff = {k: float((sa[k] - sb[k]).abs().max()) for k in sa if not torch.equal(sa[k], sb[k])}
    print(f"weights that differ (max abs difference): {diff}, threads here {torch.get_num_threads()}")
    return not diff


def test_side_by_side_ships_what_a_sequential_fit_for_the_chosen_epochs_trains(data) -> None:  # noqa: ANN001
    result = select_and_fit(holdout_as_validation(data), everything(data), CFG)
    best = result.selection.best_epoch
    assert result.final.best_epoch == best and len(result.final.history) == best
    assert result.final.config.threads == 1 and result.selection.history[-1]["threads"] == 1
    alone = fit(everything(data), replace(CFG, threads=1, epochs=best))
    assert _same_weights(result.final.model, alone.model)


def test_a_process_started_early_takes_the_final_fit_and_trains_the_same_model(data) -> None:  # noqa: ANN001
    prespawn.start()
    early = prespawn._waiting[0]  # type: ignore[index]
    result = select_and_fit(holdout_as_validation(data), everything(data), CFG)
    assert prespawn.claim() is None and not early.is_alive()  # claimed, and done
    alone = fit(everything(data), replace(CFG, threads=1, epochs=result.selection.best_epoch))
    assert _same_weights(result.final.model, alone.model)


def test_a_process_started_early_that_died_is_replaced(data) -> None:  # noqa: ANN001
    prespawn.start()
    early = prespawn._waiting[0]  # type: ignore[index]
    early.kill()
    early.join()
    result = select_and_fit(holdout_as_validation(data), everything(data), CFG)
    assert result.final.config.threads == 1  # the side-by-side fit, in a process started then
    alone = fit(everything(data), replace(CFG, threads=1, epochs=result.selection.best_epoch))
    assert _same_weights(result.final.model, alone.model)


def test_a_process_started_early_and_not_claimed_is_stopped() -> None:
    prespawn.start()
    early = prespawn._waiting[0]  # type: ignore[index]
    prespawn.discard()
    assert not early.is_alive() and prespawn.claim() is None


def _wait_for_line(capfd, text: str, timeout: float = 300.0) -> None:  # noqa: ANN001
    """Wait until the captured stderr (the child process writes there too) holds ``text``."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s; stderr: {seen[-2000:]}"
        time.sleep(0.1)
        seen += capfd.readouterr().err


def test_a_final_fit_ahead_of_selection_hands_back_the_chosen_epoch(data, capfd) -> None:  # noqa: ANN001
    final = FinalFit(everything(data), replace(CFG, progress=True), None, None)
    final.selection_epoch(1, 1, None, [])
    final.selection_epoch(2, 2, None, [])
    final.selection_epoch(3, 2, None, [])
    # the child may run up to epoch 3 + patience (2); its epoch 4 line means it kept epoch 3's weights
    _wait_for_line(capfd, "final fit, epoch 4:")
    final.stop(best_epoch=2, last_epoch=4)
    result = final.result()
    assert result.best_epoch == 2 and [h["epoch"] for h in result.history] == [1, 2]
    assert final.epochs_run > 2  # it did run ahead
    alone = fit(everything(data), replace(CFG, threads=1, epochs=2))
    assert _same_weights(result.model, alone.model)


def test_a_final_fit_whose_process_died_says_so(data) -> None:  # noqa: ANN001
    final = FinalFit(everything(data), CFG, None, None)
    final.proc.kill()
    final.proc.join()
    final.selection_epoch(1, 1, None, [])  # selection goes on; the failure surfaces with the result
    final.stop(best_epoch=1, last_epoch=1)
    with pytest.raises(FinalFitFailed, match="ended without a result"):
        final.result()


def test_a_run_whose_final_fit_process_dies_fits_every_event_itself(data, capfd) -> None:  # noqa: ANN001
    def kill_the_final_fit() -> None:
        for _ in range(600):
            found = [p for p in multiprocessing.active_children() if p.name == "recsys-final-fit"]
            if found:
                found[0].kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_final_fit)
    killer.start()
    result = select_and_fit(holdout_as_validation(data), everything(data), CFG)
    killer.join()
    assert "fitting every event here instead" in capfd.readouterr().err
    assert result.final is not result.selection and result.final.best_epoch == result.selection.best_epoch
    assert result.final.history[-1]["threads"] == 2  # the sequential fit, on every thread
