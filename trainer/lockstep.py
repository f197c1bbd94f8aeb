"""Selection and the final fit side by side: the final fit runs in a second process, one thread each.

A run's two fits (pipeline.py) are independent but for one number, the epoch count selection chooses.
On a 2-core machine two one-thread fits run side by side at about the speed of each alone, while one fit
gains only 1.0-1.3x from its second thread (gowalla epochs: 3.5-4.0 s each for two one-thread fits
together, 3.6 s for one alone, 2.6-3.5 s on two threads), so a run costs about its longer fit instead of
the sum of both.

The final fit cannot know where to stop until selection has, so it keeps a copy of its weights after
every epoch selection may still choose (those since selection's best so far) and, once told the chosen
epoch, hands that copy back: at once when it holds it already, without finishing the epoch in progress
(selection tells it before its held-out report, which then has the cores to itself). It never runs more
than ``patience`` epochs ahead of selection, the furthest selection can go past its best. Same seed,
same batches: what it returns is the model a sequential one-thread fit for the chosen epochs would train.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import threading
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from trainer import prespawn
from trainer.config import TrainConfig
from trainer.data import Dataset
from trainer.train import TrainResult, fit, for_data, new_model

FINAL_LABEL = "final fit, "


@dataclass
class _Selection:
    """What the final fit knows of selection: its latest epoch, its best so far, and whether it stopped."""

    epoch: int = 0
    best: int = 0
    stopped: bool = False


class _Child:
    """The final fit's side of the pipe. A thread listens to selection; the fit's ``on_epoch`` hook keeps
    the weights selection may still choose. Whichever holds the chosen epoch first answers: the listener
    at once when selection stops on an epoch already kept (the fit is then mid-epoch, past it, and the
    process ends without finishing that epoch), else the fit when it reaches that epoch."""

    def __init__(self, conn: Connection, patience: int) -> None:
        self.conn, self.patience = conn, patience
        self.sel = _Selection()
        self.kept: dict[int, tuple[dict[str, torch.Tensor], list[dict[str, Any]]]] = {}
        self.cond = threading.Condition()
        self.answered = False

    def listen(self) -> None:
        try:
            while not self.sel.stopped:
                msg = self.conn.recv()
                with self.cond:
                    self.sel = _Selection(*msg)
                    self.cond.notify_all()
        except (EOFError, OSError):
            os._exit(0)  # the parent is gone: nobody to train for
        with self.cond:
            if self.sel.best in self.kept:
                self.answer()
        if self.answered:
            sys.stdout.flush()
            os._exit(0)  # the epoch in progress is past the chosen one

    def on_epoch(self, epoch: int, _best: int, state: dict[str, torch.Tensor],
                 history: list[dict[str, Any]]) -> bool:
        with self.cond:
            while not self.sel.stopped and epoch >= self.sel.epoch + self.patience:  # selection cannot
                self.cond.wait()  # choose beyond this
            self.kept[epoch] = (copy.deepcopy(state), list(history))
            for e in [e for e in self.kept if e < self.sel.best]:
                del self.kept[e]
            return self.sel.stopped and epoch >= self.sel.best

    def finish(self) -> None:
        """The fit returned: wait for selection's choice (the cap on epochs may come first), answer."""
        with self.cond:
            while not self.sel.stopped:
                self.cond.wait()
            if not self.answered:
                self.answer()

    def answer(self) -> None:
        """Send the chosen epoch's weights (under ``cond``)."""
        chosen = min(self.sel.best, max(self.kept))
        state, history = self.kept[chosen]
        buf = io.BytesIO()  # plain bytes: a tensor sent as itself lives on only while this process does
        torch.save(state, buf)
        self.conn.send(("done", buf.getvalue(), history[:chosen], chosen, len(self.kept[max(self.kept)][1])))
        self.answered = True


def final_worker(conn: Connection, data: Dataset, cfg: TrainConfig, init_state: dict[str, Any] | None,
                  impressions: Any) -> None:
    """The child process: fit ``data`` epoch by epoch until selection names the epoch to ship."""
    child = _Child(conn, cfg.patience)
    threading.Thread(target=child.listen, name="selection", daemon=True).start()
    try:
        fit(data, cfg, init_state=init_state, impressions=impressions, on_epoch=child.on_epoch, label=FINAL_LABEL)
        child.finish()
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone: nobody to train for
    except Exception:  # noqa: BLE001 - whatever failed, the parent falls back to a sequential fit
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        with child.cond:
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
        self._answer: tuple[Any, ...] | None = None
        self._receiver: threading.Thread | None = None
        cfg = for_data(cfg, data)  # by the data that ships (select_and_fit has resolved it already)
        self.cfg = replace(cfg, threads=cfg.threads // 2)
        self.selection_cfg = replace(cfg, threads=cfg.threads - self.cfg.threads)
        args = (data, self.cfg, init_state, impressions)
        waiting = prespawn.claim()  # started early by `recsys train`, its imports done meanwhile
        if waiting is not None:
            self.proc, self.conn = waiting
            try:
                self.conn.send(args)
                return
            except OSError:  # it died before its job came: start one here
                self.conn.close()
                self.proc.join(timeout=5)  # reap it
        ctx = mp.get_context("spawn")  # a fork would copy the parent's OpenMP and numba threads' state
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=final_worker, args=(child, *args), name="recsys-final-fit", daemon=True)
        self.proc.start()
        child.close()

    def selection_epoch(self, epoch: int, best: int, _state: dict[str, torch.Tensor],
                        _history: list[dict[str, Any]]) -> bool:
        self._send(epoch, best, False)
        return False

    def stop(self, best_epoch: int, last_epoch: int) -> None:
        """Tell the child selection's choice as soon as it is made; a thread here takes its answer while
        this process goes on (the held-out report)."""
        self._send(last_epoch, best_epoch, True)
        self._receiver = threading.Thread(target=self._receive, name="final-fit-answer", daemon=True)
        self._receiver.start()

    def answered(self, wait: float) -> bool:
        """Whether the child's answer is in, waiting at most ``wait`` seconds for it (after ``stop``)."""
        assert self._receiver is not None, "stop() first"
        self._receiver.join(wait)
        return not self._receiver.is_alive()

    def _receive(self) -> None:
        try:
            self._answer = self.conn.recv()
        except (EOFError, OSError):
            self._answer = None

    def result(self) -> TrainResult:
        """The model the child trained for the epochs ``stop`` named."""
        assert self._receiver is not None, "stop() first"
        self._receiver.join()
        msg = self._answer
        self.close()
        if msg is None:
            raise FinalFitFailed(f"its process ended without a result (exit code {self.proc.exitcode})")
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
