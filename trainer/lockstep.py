"""Selection and the final fit side by side: the final fit runs in a second process, one thread each.

A run's two fits (pipeline.py) are independent but for one number, the epoch count selection chooses.
On a 2-core machine two one-thread fits run side by side at about the speed of each alone, while one fit
gains only 1.0-1.3x from its second thread (gowalla epochs: 3.5-4.0 s each for two one-thread fits
together, 3.6 s for one alone, 2.6-3.5 s on two threads), so a run costs about its longer fit instead of
the sum of both.

The final fit cannot know where to stop until selection has, so it keeps a copy of its weights after
every epoch selection may still choose (those since selection's best so far) and, once told the chosen
epoch, ends there and hands that copy back. It never runs more than ``patience`` epochs ahead of
selection, the furthest selection can go past its best. Same seed, same batches: what it returns is the
model a sequential one-thread fit for the chosen epochs would train.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from trainer.config import TrainConfig
from trainer.data import Dataset
from trainer.model import TowerModel
from trainer.train import TrainResult, fit, new_model

FINAL_LABEL = "final fit, "


@dataclass
class _Selection:
    """What the final fit knows of selection: its latest epoch, its best so far, and whether it stopped."""

    epoch: int = 0
    best: int = 0
    stopped: bool = False

    def read(self, conn: Connection, block: bool) -> None:
        while block or conn.poll():
            self.epoch, self.best, self.stopped = conn.recv()
            block = False


def _final_worker(conn: Connection, data: Dataset, cfg: TrainConfig, init_state: dict[str, Any] | None,
                  impressions: Any) -> None:
    """The child process: fit ``data`` epoch by epoch until selection names the epoch to ship."""
    sel = _Selection()
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch(epoch: int, _best: int, model: TowerModel) -> bool:
        sel.read(conn, block=False)
        while not sel.stopped and epoch >= sel.epoch + cfg.patience:  # selection cannot choose beyond this
            sel.read(conn, block=True)
        kept[epoch] = copy.deepcopy(model.state_dict())
        for e in [e for e in kept if e < sel.best]:
            del kept[e]
        return sel.stopped and epoch >= sel.best

    try:
        result = fit(data, cfg, init_state=init_state, impressions=impressions, on_epoch=on_epoch,
                     label=FINAL_LABEL)
        while not sel.stopped:  # the cap on epochs came first: wait for selection's choice
            sel.read(conn, block=True)
        chosen = min(sel.best, max(kept))
        buf = io.BytesIO()  # plain bytes: a tensor sent as itself lives on only while this process does
        torch.save(kept[chosen], buf)
        conn.send(("done", buf.getvalue(), result.history[:chosen], chosen, len(result.history)))
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone: nobody to train for
    except Exception:  # noqa: BLE001 - whatever failed, the parent falls back to a sequential fit
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        conn.send(("error", trace.strip().splitlines()[-1]))
    finally:
        conn.close()


class FinalFitFailed(RuntimeError):
    """The final fit's process failed or died; the caller fits sequentially instead."""


class FinalFit:
    """The final fit in a child process with half of ``cfg.threads``; selection runs here with the rest
    (``selection_cfg``) and reports each epoch through ``selection_epoch``, its ``on_epoch`` hook."""

    def __init__(self, data: Dataset, cfg: TrainConfig, init_state: dict[str, Any] | None,
                 impressions: Any) -> None:
        self.data, self.threads = data, cfg.threads
        self.epochs_run = 0  # how far the child trained (it may pass the epoch selection chooses)
        self.cfg = replace(cfg, threads=cfg.threads // 2)
        self.selection_cfg = replace(cfg, threads=cfg.threads - self.cfg.threads)
        ctx = mp.get_context("spawn")  # a fork would copy the parent's OpenMP and numba threads' state
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_final_worker, args=(child, data, self.cfg, init_state, impressions),
                                name="recsys-final-fit", daemon=True)
        self.proc.start()
        child.close()

    def selection_epoch(self, epoch: int, best: int, _model: TowerModel) -> bool:
        self._send(epoch, best, False)
        return False

    def result(self, best_epoch: int, last_epoch: int) -> TrainResult:
        """Tell the child selection's choice; wait for the model it trained for that many epochs."""
        self._send(last_epoch, best_epoch, True)
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.close()
            raise FinalFitFailed(f"its process ended without a result (exit code {self.proc.exitcode})") from None
        self.close()
        if msg[0] == "error":
            raise FinalFitFailed(msg[1])
        _, state, history, chosen, self.epochs_run = msg
        model = new_model(self.data, self.cfg)
        model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        model.eval()
        seconds = sum(h["train_seconds"] for h in history)
        return TrainResult(model, replace(self.cfg, epochs=chosen), history, chosen, {}, seconds)

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        torch.set_num_threads(self.threads)  # this process has the cores to itself again

    def _send(self, epoch: int, best: int, stopped: bool) -> None:
        with contextlib.suppress(OSError):  # the child is gone: result() says so once selection ends
            self.conn.send((epoch, best, stopped))
