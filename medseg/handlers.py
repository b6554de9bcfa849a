"""Ignite handlers of medseg: progress, training curves, weight averaging, resumed bests, safe checkpoints,
steady tracking."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import monai.handlers
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from ignite.handlers.checkpoint import BaseSaveHandler
from torch import nn

from medseg.errors import ConfigValueError, DataError, brief, causes, describe_os_failure
from medseg.io import atomic_output


def _log_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers]


def start_bars(progress: Any) -> list[tuple[logging.StreamHandler, Any]]:
    """Start rich ``progress`` with the log lines meant for the terminal printed above its bars.

    On a terminal rich takes over ``sys.stdout`` so that what is printed goes above the live bars, but a
    logging handler (MONAI's engine logs) keeps the stream it was made with, and its lines were drawn over by
    the bars or glued to their end. Handlers writing to that standard output are given rich's stream until
    :func:`stop_bars`; those on standard error are left alone (rich would print them to standard output, out
    of a ``2>log``), and nothing moves when rich took nothing over. Returns what to put back.
    """
    before = sys.stdout
    progress.start()
    if sys.stdout is before:
        return []
    return [(handler, handler.setStream(sys.stdout)) for handler in _log_handlers()
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and handler.stream is before]


def stop_bars(progress: Any, moved: list[tuple[logging.StreamHandler, Any]]) -> None:
    """Stop the bars :func:`start_bars` started; the log handlers get their own streams back."""
    for handler, stream in moved:
        handler.setStream(stream)
    moved.clear()
    progress.stop()


class RichProgress:
    """Rich progress bars: one over epochs and one over the iterations of the current epoch.

    Attach to a trainer; pass ``evaluator`` to show its metrics in the epoch bar after each validation.

    Example:
        >>> RichProgress(evaluator=validator).attach(trainer)
    """

    def __init__(self, evaluator: Engine | None = None, disable: bool = False) -> None:
        self.evaluator = evaluator
        self.disable = disable
        self._progress: Any = None
        self._epochs: Any = None
        self._iters: Any = None
        self._moved: list = []

    def attach(self, engine: Engine) -> None:
        if self.disable:
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_end)
        engine.add_event_handler(Events.COMPLETED | Events.EXCEPTION_RAISED, self._stop)

    def _start(self, engine: Engine) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Column

        # the metrics are cut to the terminal's width rather than squeezing the bars out (at 80 columns)
        info = Column(no_wrap=True, overflow="ellipsis")
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}", table_column=info),
        )
        info.max_width = max(16, self._progress.console.width - 56)
        self._moved = start_bars(self._progress)
        self._epochs = self._progress.add_task(
            "epochs", total=engine.state.max_epochs, completed=engine.state.epoch, info=""
        )
        self._iters = self._progress.add_task("iterations", total=engine.state.epoch_length, info="")

    def _epoch_start(self, engine: Engine) -> None:
        self._progress.reset(self._iters, total=engine.state.epoch_length, info="")

    def _iteration(self, engine: Engine) -> None:
        loss = loss_of(engine.state.output)
        info = f"loss {loss:.4f}" if loss is not None else ""
        self._progress.update(self._iters, advance=1, info=info)

    def _epoch_end(self, engine: Engine) -> None:
        info = ""
        if self.evaluator is not None and self.evaluator.state.metrics:
            info = " ".join(f"{k} {v:.4f}" for k, v in self.evaluator.state.metrics.items() if _is_number(v))
        self._progress.update(self._epochs, completed=engine.state.epoch, info=info)

    def _stop(self, engine: Engine, *args: Any) -> None:
        if self._progress is not None:
            stop_bars(self._progress, self._moved)
            self._progress = None


class TrainingCurves:
    """Record the mean training loss per epoch and each validation's metrics; write JSON and a PNG plot.

    ``history.json`` is rewritten after every epoch (and reloaded on resume); ``curves.png`` is drawn
    when training ends. Attach to the trainer, before any MLflow handler that logs the PNG.
    """

    def __init__(self, output_dir: str, evaluator: Engine | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.history: dict[str, list] = {"epoch": [], "train_loss": [], "val_epoch": [], "val": []}
        self._sum, self._count = 0.0, 0
        self._loaded = False

    @property
    def json_path(self) -> Path:
        return self.output_dir / "history.json"

    @property
    def png_path(self) -> Path:
        return self.output_dir / "curves.png"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_STARTED, self._load)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_end)
        engine.add_event_handler(Events.COMPLETED, self._load, True)  # no epoch ran: the run's history as it is
        engine.add_event_handler(Events.COMPLETED, self.plot)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validated, engine)

    def _reset(self, engine: Engine) -> None:
        self._loaded = False

    def _load(self, engine: Engine, finished: bool = False) -> None:
        # at the first epoch, after any checkpoint loader has restored the trainer's state: the epochs before
        # it; or at the end of a resumed run that trained no epoch (finished, or stopped early, before its
        # resume): all the epochs the checkpoint holds
        if self._loaded:
            return
        self._loaded = True
        upto = engine.state.epoch + (1 if finished else 0)
        if upto > 1 and self.json_path.is_file():  # resumed run: keep the earlier epochs
            old = json.loads(self.json_path.read_text(encoding="utf-8"))
            keep = [i for i, e in enumerate(old["epoch"]) if e < upto]
            self.history["epoch"] = [old["epoch"][i] for i in keep]
            self.history["train_loss"] = [old["train_loss"][i] for i in keep]
            vkeep = [i for i, e in enumerate(old["val_epoch"]) if e < upto]
            self.history["val_epoch"] = [old["val_epoch"][i] for i in vkeep]
            self.history["val"] = [old["val"][i] for i in vkeep]

    def _iteration(self, engine: Engine) -> None:
        loss = loss_of(engine.state.output)
        if loss is not None and math.isfinite(loss):
            self._sum += loss
            self._count += 1

    def _epoch_end(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        self.history["epoch"].append(epoch)
        mean_loss = self._sum / max(self._count, 1)
        self.history["train_loss"].append(mean_loss)
        engine.state.metrics["train_loss_epoch"] = mean_loss  # picked up by epoch-level loggers (MLflow)
        self._sum, self._count = 0.0, 0
        self._save()

    def _validated(self, evaluator: Engine, trainer: Engine) -> None:
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if _is_number(v)}
        self.history["val_epoch"].append(trainer.state.epoch)
        self.history["val"].append(metrics)
        self._save()

    def _save(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.json_path) as tmp:
            tmp.write_text(json.dumps(self.history, indent=1), encoding="utf-8")

    def plot(self, engine: Engine | None = None) -> Path:
        """Draw ``curves.png`` (loss left, validation metrics right) and return its path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(self.history["epoch"], self.history["train_loss"], color="tab:blue")
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
        names = sorted({k for m in self.history["val"] for k in m})
        for name in names:
            ax_val.plot(self.history["val_epoch"], [m.get(name, float("nan")) for m in self.history["val"]],
                        marker="o", label=name)
        ax_val.set(xlabel="epoch", ylabel="score", title="validation")
        if names:
            ax_val.legend()
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_output(self.png_path) as tmp:  # a kill mid-write leaves the earlier curves, not an empty file
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)
        return self.png_path


class RestoreBest:
    """On ``--resume``, carry the best validation so far over from ``history.json``.

    A resumed run builds a fresh evaluator, key-metric checkpoint saver and early stopper, which know
    nothing of the validations before the interruption: the first validation after it would overwrite
    ``model.pt`` even when worse, and patience would start again. At the trainer's start (attach after the
    checkpoint loader) this restores the evaluator's ``best_metric`` and ``best_metric_epoch``, the
    savers' record of the score ``model.pt`` holds, and the stoppers' best and count of validations since it
    (of the epochs the resumed checkpoint has finished).
    Nothing changes when no earlier validation is recorded or ``model.pt`` is missing.

    Args:
        output_dir: the run's folder (``history.json``, ``model.pt``).
        evaluator: the validation engine, whose ``key_metric_name`` and ``metric_cmp_fn`` are used.
        savers: MONAI ``CheckpointSaver`` handlers of the evaluator that keep the best model.
        stoppers: MONAI ``EarlyStopHandler`` handlers.
    """

    def __init__(self, output_dir: str | Path, evaluator: Engine, savers: Any = (), stoppers: Any = (),
                 model_name: str = "model.pt") -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.savers, self.stoppers = list(savers), list(stoppers)
        self.model_name = model_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def recorded_best(self, up_to: int | None = None, scheduled: bool = False) -> tuple[int, float, int] | None:
        """``(epoch, score, validations since)`` of the best recorded validation, or ``None``. With ``up_to``
        (the resumed checkpoint's epoch), the validations since count only those of epochs up to it: a time
        limit's validation inside the next epoch, on the way out, is of weights the resumed run trains anew
        (it counts for the best, which ``model.pt`` may hold). ``scheduled`` leaves that validation out of the
        best too, for early stopping to decide as the uninterrupted run would."""
        path = self.output_dir / "history.json"
        name = getattr(self.evaluator.state, "key_metric_name", None)
        if not name or not path.is_file():
            return None
        history = json.loads(path.read_text(encoding="utf-8"))
        pairs = zip(history.get("val_epoch", []), history.get("val", []), strict=False)
        scores = [(int(e), float(m[name])) for e, m in pairs
                  if name in m and _is_number(m[name]) and math.isfinite(m[name])
                  and not (scheduled and up_to is not None and int(e) > up_to)]
        if not scores:
            return None
        better = getattr(self.evaluator, "metric_cmp_fn", lambda current, prev: current > prev)
        best = 0
        for i, (_, score) in enumerate(scores):
            if i and better(score, scores[best][1]):
                best = i
        since = sum(1 for epoch, _ in scores[best + 1:] if up_to is None or epoch <= up_to)
        return scores[best][0], scores[best][1], since

    def __call__(self, engine: Engine) -> None:
        from types import SimpleNamespace

        found = self.recorded_best(up_to=engine.state.epoch)
        if found is None or not (self.output_dir / self.model_name).is_file():
            return
        epoch, score, since = found
        self.evaluator.state.best_metric = score
        self.evaluator.state.best_metric_epoch = epoch
        name = self.evaluator.state.key_metric_name
        # an engine as the score functions see it, so scores come back in each handler's own terms
        probe = SimpleNamespace(state=SimpleNamespace(metrics={name: score}, key_metric_name=name))
        for saver in self.savers:
            checkpoint = getattr(saver, "_key_metric_checkpoint", None)
            if checkpoint is not None:
                saver.load_state_dict({"_saved": [(checkpoint.score_function(probe), self.model_name)]})
        # early stopping counts from the best of the validations the resumed checkpoint has seen: a way-out
        # validation of part-trained weights that the resumed run ties or misses would use up patience the
        # uninterrupted run kept
        scheduled = self.recorded_best(up_to=engine.state.epoch, scheduled=True)
        if scheduled is None:
            return
        epoch, score, since = scheduled
        probe = SimpleNamespace(state=SimpleNamespace(metrics={name: score}, key_metric_name=name))
        for stopper in self.stoppers:
            inner = getattr(stopper, "_handler", None)  # ignite's EarlyStopping, made when the trainer is set
            if inner is not None and hasattr(inner, "state_dict"):
                best = inner.score_function(probe)  # e.g. a lower-is-better score negated
                inner.load_state_dict({**inner.state_dict(), "counter": since, "best_score": best})
                if since >= inner.patience:  # the run had stopped there: it ends again, untrained further
                    logging.getLogger(__name__).warning(
                        "--resume: early stopping ended this run (no better %s in the %d validations since epoch "
                        "%d); finishing it without training; give --set early_stop_patience above %d to train on",
                        name, since, epoch, since)
                    engine.terminate()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def loss_of(output: Any) -> float | None:
    """The loss value from a MONAI trainer's output (a dict, or a list of dicts with ``num_samples``)."""
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, dict) and "loss" in output:
        value = output["loss"]
        return float(value.item() if hasattr(value, "item") else value)
    return None


class FileProgress:
    """A rich progress bar over the inputs of a batch (``start(name)`` then ``advance()`` per input, and
    ``slice_done`` as the slices of a stack or volume are segmented).

    Use as a context manager; with ``disable`` it does nothing.
    """

    def __init__(self, total: int, disable: bool = False) -> None:
        self.total, self.disable = total, disable
        self._progress: Any = None
        self._task: Any = None
        self._moved: list = []
        self._name = ""

    def __enter__(self) -> FileProgress:
        if not self.disable:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            # a long relative path (DSB's ID/images/ID.png) is cut at its start, not squeezing out the bar
            self._progress = Progress(TextColumn("files"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.fields[name]}", table_column=Column(no_wrap=True,
                                                                                          overflow="ellipsis")))
            self._moved = start_bars(self._progress)
            self._task = self._progress.add_task("files", total=self.total, name="")
        return self

    @staticmethod
    def _shown(name: str, suffix: str = "", width: int = 40) -> str:
        # a long relative path (DSB's ID/images/ID.png) is cut at its start, so that its end and the suffix show
        room = width - len(suffix)
        return (name if len(name) <= room else "…" + name[-(room - 1):]) + suffix

    def start(self, name: str) -> None:
        self._name = name
        if self._progress is not None:
            self._progress.update(self._task, name=self._shown(name))

    def slice_done(self, done: int, total: int) -> None:
        """Show how far the current input is: ``done`` of its ``total`` slices (nothing for a single image)."""
        if self._progress is not None and total > 1:
            self._progress.update(self._task, name=self._shown(self._name, f" ({done}/{total} slices)"))

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            stop_bars(self._progress, self._moved)


class WeightEMA(EMAHandler):
    """An exponential moving average of the network's weights (Ignite's ``EMAHandler``), or none.

    The bundles validate, checkpoint and ship ``ema_model``. Parameters and BatchNorm statistics are
    both averaged (``handle_buffers="update"``); the momentum ramps linearly from ``warmup_momentum`` to
    ``momentum`` over ``warmup_iters`` iterations so that early validations do not see the initial
    weights. ``momentum=None`` turns averaging off: ``ema_model`` is then the network itself and
    ``attach`` does nothing, so a config can switch it with one value.

    Args:
        model: the network being trained.
        momentum: weight of the current weights at each update after the warm-up (e.g. 0.005 averages
            over about 200 iterations), or ``None`` for no averaging.
        warmup_momentum: the momentum at the first iteration.
        warmup_iters: iterations of the linear ramp.
    """

    def __init__(self, model: nn.Module, momentum: float | None = None, warmup_momentum: float = 0.5,
                 warmup_iters: int = 100) -> None:
        self.enabled = momentum is not None
        if not self.enabled:
            self.model = self.ema_model = model
            return
        if not 0.0 < momentum < 1.0:
            raise ConfigValueError(f"ema_momentum={momentum}: must lie in (0, 1), e.g. --set ema_momentum=0.01, "
                                   "or be null for no averaging")
        super().__init__(model, momentum=momentum, momentum_warmup=max(warmup_momentum, momentum),
                         warmup_iters=warmup_iters, handle_buffers="update")

    def attach(self, engine: Engine, name: str = "ema_momentum", event: Any = Events.ITERATION_COMPLETED) -> None:
        if not self.enabled:
            return
        super().attach(engine, name=name, event=event)
        scheduler = getattr(self, "momentum_scheduler", None)
        if scheduler is None or event != Events.ITERATION_COMPLETED:
            return
        started: list[bool] = []

        def resume_warmup(engine: Engine) -> None:
            # the warm-up counts its own steps, which no checkpoint holds: a resumed run would start it again
            # and pull the average back to the current weights; count from the run's iteration instead
            if not started:
                scheduler.event_index = engine.state.iteration - 1
                started.append(True)

        engine.add_event_handler(Events.ITERATION_STARTED, resume_warmup)


class _AtomicSaver(BaseSaveHandler):
    """Ignite's save handler for MONAI's checkpoint savers, made safe to interrupt: each file is written to
    a temporary name and renamed into place, and the file a new checkpoint replaces is removed only once
    the new one is in place (Ignite asks for the removal first, so a kill or a full disk in between lost
    both). ``filename`` fixes the name, as MONAI's own saver does for ``model.pt``."""

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename
        self.pending: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        import torch

        name = self.filename or filename
        path = self.dirname / name
        checkpoint = _on_cpu(checkpoint)  # a GPU's weights too load on a machine without one, weights_only or not
        try:
            # through a file object: given a path, torch names the archive inside after the (random) temporary
            # file, so the same weights saved twice would differ in bytes and in SHA-256
            with atomic_output(path) as tmp, open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
        except (OSError, RuntimeError) as err:
            # torch reports a write cut short as RuntimeError, in its archive writer's own words
            why = (err.strerror or type(err).__name__) if isinstance(err, OSError) else \
                f"the write was cut short: a full disk, or a quota or file-size limit ({brief(str(err))})"
            go_on = "continue with --resume" if any(self.dirname.glob("last_checkpoint_epoch=*.pt")) else \
                "train again"
            raise DataError(f"{path}: cannot write the checkpoint ({why}); free disk space or check the "
                            f"folder's permissions and quota, then {go_on}") from err
        for old in self.pending:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self.pending.clear()

    def remove(self, filename: str) -> None:
        self.pending.append(self.filename or filename)


def _on_cpu(obj: Any) -> Any:
    """``obj`` (a checkpoint: nested dicts, lists and tuples of tensors and plain values) with every tensor on
    the CPU. Tensors already there are kept as they are, and a state dict keeps its ``_metadata`` (the
    module versions ``load_state_dict`` reads)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        moved = type(obj)((k, _on_cpu(v)) for k, v in obj.items()) if type(obj) in (dict, OrderedDict) else obj
        if moved is not obj and hasattr(obj, "_metadata"):
            moved._metadata = obj._metadata
        return moved
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


class CheckpointSaver(monai.handlers.CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing its files atomically, and removing the
    checkpoint a newer one replaces only after the newer one is written: a training killed, or out of disk,
    while saving keeps its previous ``model.pt`` and last checkpoint intact."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicSaver(self.save_dir, getattr(checkpoint.save_handler, "filename",
                                                                              None))


#: MLflow error codes of a request the store understood and refused: the caller's mistake, not the store's failure
_REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                      "INVALID_STATE", "MALFORMED_REQUEST"})


def store_failure(err: BaseException, opening: bool = False) -> bool:
    """Whether ``err``, raised by an MLflow call of a training, is its tracking store failing (unreachable,
    timing out, full, erring inside, or no longer holding the run: deleted in the UI, a server restarted on
    a new database) rather than a bug: an MLflow error, or an OS, network or database error in its causes.
    While the run is ``opening`` (params logged, the run looked up), an MLflow error of a :data:`_REFUSED`
    code is the caller's mistake (a param changed), not a failure."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return not (opening and err.error_code in _REFUSED)
    return any(isinstance(cause, OSError) or type(cause).__module__.split(".")[0] in
               ("requests", "urllib3", "sqlalchemy", "sqlite3") for cause in causes(err))


class SteadyMLFlowHandler(monai.handlers.MLFlowHandler):
    """MONAI's MLFlowHandler that continues the run ``run_id`` when given (MONAI's looks a run up by its name),
    and which a tracking store that stops answering does not stop: the first failed call is said in one
    warning, and this handler and those :func:`medseg.tracking.link` joined to it log nothing more, so the
    training goes on (its run folder keeps history, curves and checkpoints) instead of stalling for minutes
    of MLflow's retries at each call and then ending."""

    def __init__(self, *args: Any, run_id: str | None = None, new_run: bool = False, opens_run: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_id = run_id  # the run to continue, by its id (MONAI's handler looks one up by its name)
        self.new_run = new_run  # open a run of its own, even where an unfinished run has its name
        self.opens_run = opens_run  # the trainer's: the run is opened by its first start, the others' log to it
        self.failed: list = []  # shared with the linked handlers: one store, one failure
        self.files_failed = False  # the run's files could not be stored, its params and metrics were

    def _steady(self, call: Any, *args: Any, opening: bool = False) -> None:
        if self.failed:
            return
        try:
            call(*args)
        except Exception as err:
            if not store_failure(err, opening):  # a bug, or a param changed: the caller's mistake
                raise
            self.failed.append(err)
            reason = describe_os_failure(err) or \
                (f"{type(err).__name__}: {brief(str(err).splitlines()[0])}" if str(err) else type(err).__name__)
            logging.getLogger(__name__).warning(
                "MLflow store %s failed (%s): tracking stops here; the run folder keeps every epoch (history.json, "
                "curves.png, checkpoints), and the MLflow run is left as it was",
                getattr(self.client, "tracking_uri", ""), reason)

    def start(self, engine: Engine) -> None:
        opening = self.opens_run and self.cur_run is None  # the evaluator's handler starts at each validation
        if self.cur_run is None and (self.run_id or self.new_run):
            self._steady(self._open_run, opening=opening)
        self._steady(super().start, engine, opening=opening)

    def _open_run(self) -> None:
        if self.run_id:
            self.cur_run = self.client.get_run(self.run_id)
            return
        self._set_experiment()
        self.cur_run = self.client.create_run(experiment_id=self.experiment.experiment_id, run_name=self.run_name)

    def iteration_completed(self, engine: Engine) -> None:
        self._steady(super().iteration_completed, engine)

    def epoch_completed(self, engine: Engine) -> None:
        self._steady(super().epoch_completed, engine)

    def complete(self) -> None:
        if self.failed:
            return
        try:
            super().complete()  # the run's files (artifacts), at the end
        except Exception as err:  # noqa: BLE001 - sorted below: the files, or the server as any call
            if not isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("requests", "urllib3"):
                self._steady(self._raise, err)  # the server, or a bug: as any failed call
                return
            # a local artifact folder this machine cannot write (a server's own path, a full disk): the run's files
            # are not stored there, but the store itself answers, so the run is still ended (close) as it ends
            self.files_failed = True  # the late files (train_summary.json) are not tried again
            where = getattr(getattr(self.cur_run, "info", None), "artifact_uri", "") or "its artifact location"
            logging.getLogger(__name__).warning(
                "MLflow could not store the run's files at %s (%s); its parameters and metrics are logged, and the "
                "run folder keeps the files", where, describe_os_failure(err) or f"{type(err).__name__}: {err}")

    @staticmethod
    def _raise(err: Exception) -> None:
        raise err

    def close(self) -> None:
        self._steady(super().close)
