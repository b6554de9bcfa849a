"""Handlers medseg adds to every training: per-epoch seeding, divergence and Ctrl-C stops, a last validation."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import Terminated


def epoch_seed(seed: int, epoch: int) -> int:
    """The random seed of one epoch of a training seeded with ``seed`` (a 32-bit hash of both)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "little")


def seed_each_epoch(trainer: Any, seed: Any) -> None:
    """Seed every epoch's randomness (shuffling, sampling, augmentation, in the data-loader workers too) from
    ``seed`` and the epoch's number, so that a resumed training draws what the uninterrupted one would have:
    otherwise the generators restart where ``set_determinism`` put them, and the first epoch after a resume
    repeats the crops of epoch 1. ``seed`` None (no determinism asked for) leaves them alone."""
    if seed is None:
        return
    import random

    import numpy as np
    import torch
    from ignite.engine import Events
    from monai.data.utils import set_rnd

    def reseed(engine: Any) -> None:  # before the epoch's data iterator is made
        value = epoch_seed(int(seed), engine.state.epoch)
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)
        set_rnd(engine.data_loader.dataset, value)  # the transforms run in this process (no workers)

    trainer.add_event_handler(Events.EPOCH_STARTED, reseed)


class Diverged:
    """Set (truthy) once a training's loss or weights became NaN or infinite and the trainer was stopped."""

    def __init__(self) -> None:
        self.epoch, self.iteration, self.what = 0, 0, ""

    def __bool__(self) -> bool:
        return bool(self.what)

    def words(self) -> str:
        return f"the {self.what} became NaN or infinite at epoch {self.epoch} (iteration {self.iteration})"

    def message(self, parser: Any, out: Path, summary: dict) -> str:
        rate = parser.get("learning_rate") if "learning_rate" in parser else None
        lower = (f"lower the learning rate (learning_rate is {rate}: try --set learning_rate={float(rate) / 10:g})"
                 if isinstance(rate, (int, float)) else "lower the learning rate")
        kept = (f"model.pt keeps the best weights validated before it (epoch {summary['best_metric_epoch']})"
                if summary.get("best_metric_epoch", -1) > 0 and (out / "model.pt").is_file()
                else "no weights were validated before it")
        return (f"training diverged: {self.words()}; {kept}; {lower}, or check the data for extreme values, "
                "and train again with --overwrite")


#: Iterations in a row with a NaN or infinite loss (but finite weights) that stop a training as diverged
DIVERGED_LOSSES = 10


def stop_on_divergence(trainer: Any, mlflow_handlers: Sequence[Any] = ()) -> Diverged:
    """Stop the trainer once its weights or BatchNorm statistics hold NaN or infinite values, or its loss has
    for :data:`DIVERGED_LOSSES` iterations in a row (with mixed precision a step whose gradients overflow is
    skipped, so one bad loss alone is not fatal). Ignite's ``TerminateOnNan`` stops at any NaN output;
    this one also catches weights gone NaN after a finite loss, before a validation or a checkpoint meets
    them: the weights are checked after an epoch's last step (before the epoch's handlers run) and after any
    step whose loss is not finite, so the check costs nothing per step. The MLflow run ends as FAILED."""
    import math

    import torch
    from ignite.engine import Events

    from medseg.handlers import loss_of

    flag, streak = Diverged(), [0]
    network = trainer.network
    tensors = [t for t in (*network.parameters(), *network.buffers()) if t.is_floating_point()]

    def finite() -> bool:
        with torch.no_grad():
            return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def check(engine: Any) -> None:
        loss = loss_of(engine.state.output)
        bad_loss = loss is not None and not math.isfinite(loss)
        streak[0] = streak[0] + 1 if bad_loss else 0
        length = engine.state.epoch_length
        epoch_end = bool(length) and engine.state.iteration % length == 0
        weights_ok = finite() if bad_loss or epoch_end else True
        if weights_ok and streak[0] < DIVERGED_LOSSES:
            return
        flag.epoch, flag.iteration = engine.state.epoch, engine.state.iteration
        flag.what = "loss" if weights_ok else "weights"
        for tracker in mlflow_handlers:
            tracker.run_finish_status = "FAILED"
        engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, check)
    return flag


class Interrupted(list):
    """Truthy once Ctrl-C was pressed (or SIGTERM came); ``finished`` is the last epoch that ended."""

    finished = 0
    at_once = False  # a second Ctrl-C
    ended = False  # the training is over (its last epoch, early stopping, a time limit): its last files follow
    late = False  # a Ctrl-C came then
    terminated = False  # SIGTERM: the command exits 143 rather than 130

    def stop(self, how: str = "") -> KeyboardInterrupt:
        """The exception that ends the command, saying ``how`` to go on."""
        return (Terminated if self.terminated else KeyboardInterrupt)(how)


@contextlib.contextmanager
def stop_on_ctrl_c(trainer: Any, mlflow_handlers: Sequence[Any] = ()) -> Iterator[Interrupted]:
    """The first Ctrl-C ends training after the current iteration (and any validation running), through the
    trainer's normal end: the last checkpoint and curves are written as after the last epoch, and the MLflow
    run is closed as KILLED, which ``--resume`` continues. A second Ctrl-C stops at once."""
    import signal
    import threading

    from ignite.engine import Events

    flag = Interrupted()

    def finished(engine: Any) -> None:  # at the start (a resumed epoch) and after each epoch that ends
        flag.finished = engine.state.epoch

    def ending(engine: Any) -> None:  # after the last step, before the last epoch's validation and checkpoint
        last = engine.state.max_epochs * (engine.state.epoch_length or 0)
        if not flag and (engine.should_terminate or engine.state.iteration >= last):
            flag.ended = True

    trainer.add_event_handler(Events.STARTED, finished)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, finished)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, ending)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, ending)  # early stopping ended it in a validation
    trainer.add_event_handler(Events.TERMINATE, ending)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a data-loader worker (forked with this handler): the main process decides
            return
        flag.terminated = flag.terminated or signum == signal.SIGTERM
        if flag or flag.late:  # stop at once; Ignite's and MONAI's loggers would print its traceback on its way out
            flag.at_once = True
            logging.disable(logging.CRITICAL)
            raise flag.stop()
        if flag.ended:  # nothing left to stop: the run is not marked interrupted for its last writes
            flag.late = True
            print("interrupted: the training has ended; writing its last files (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)
            return
        flag.append(True)
        print("interrupted: finishing the current step (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
        for tracker in mlflow_handlers:  # MONAI continues an unfinished run of the same name, not a FINISHED one
            tracker.run_finish_status = "KILLED"
        trainer.terminate()

    # SIGTERM (kill, timeout, a batch scheduler's end of job) as Ctrl-C: the run ends through its normal end
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    disabled = logging.root.manager.disable
    try:
        yield flag
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
        if flag.at_once:
            logging.disable(disabled)


def validate_at_end(trainer: Any, evaluator: Any, interrupted: Interrupted,
                     diverged: Diverged | None = None) -> None:
    """Validate the weights a training ends with unless they just were: after the last epoch or a time limit
    (``--epochs 32`` with validation every 5 epochs would otherwise leave epochs 31 and 32 unjudged and never
    in ``model.pt``); after Ctrl-C only when no validation ran yet, so that ``model.pt`` exists. Before the
    trainer's end, so that the MLflow run logs it and its metrics. A time limit that stops inside epoch N
    validates the weights as they are, recorded as epoch N."""
    from ignite.engine import Events

    validated_at = [-1]  # the trainer's iteration at the last validation
    started_at = [0]  # and at the start (a resumed run's): a run that trained nothing has nothing new to judge

    def note(_: Any) -> None:
        validated_at[0] = trainer.state.iteration

    def start(engine: Any) -> None:
        started_at[0] = engine.state.iteration

    def validate(engine: Any) -> None:
        ending = engine.should_terminate or engine.state.epoch >= engine.state.max_epochs
        if diverged:  # NaN weights: nothing to judge
            return
        if interrupted:
            wanted = evaluator.state.best_metric_epoch < 0 and interrupted.finished >= 1
        else:
            wanted = engine.state.epoch > 0 and engine.state.iteration not in (validated_at[0], started_at[0])
        if ending and wanted:
            evaluator.run(engine.state.epoch)

    evaluator.add_event_handler(Events.COMPLETED, note)
    trainer.add_event_handler(Events.STARTED, start)  # after a resume's checkpoint loader
    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)  # after the bundle's own ValidationHandler
    trainer.add_event_handler(Events.TERMINATE, validate)
