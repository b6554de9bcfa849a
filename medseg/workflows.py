"""Run a bundle's train, evaluate and infer workflows with medseg's run-time settings (data, device, tracking)."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from medseg import guards, runfolder
from medseg import tracking as mlflow_tracking
from medseg.bundle import check_batch_size, check_classes, literal, literal_items, load_checkpoint, load_config, written
from medseg.errors import (
    BundleError,
    CheckpointError,
    ConfigValueError,
    DataError,
    MedsegError,
    TrainingDiverged,
    describe_os_failure,
    find_user_error,
    quiet_user_error_logs,
)


def select_device(name: Any = "auto") -> Any:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]`` as a :class:`torch.device`.

    Raises:
        ConfigValueError: CUDA asked for but not available, or an unknown name.
    """
    import torch

    name = str(name).strip().lower()  # a torch.device, or "CPU", too
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ConfigValueError(f"--device {name}: no CUDA device is available here; use --device auto or cpu")
        device, count = torch.device(name), torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            which = "cuda:0 only" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise ConfigValueError(f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} "
                                   f"({which}; CUDA_VISIBLE_DEVICES, where set, numbers those it lists from 0); "
                                   "pick one of them or --device cuda")
        return device
    if name.split(":")[0] in ("mps", "xpu"):
        raise ConfigValueError(f"--device {name}: not supported (CUDA GPUs and the CPU are); use --device cpu")
    raise ConfigValueError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N")


def device_settings(device: Any) -> dict[str, Any]:
    return {"device": f"$torch.device('{device}')", "amp": device.type == "cuda"}


#: The bundles' own device choice, which a run's ``config.json`` records in place of a CUDA device
PORTABLE_DEVICE = "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')"


def portable_config(config: dict, device: Any) -> dict:
    """A run's config as it is recorded in its ``config.json``: one that runs as a bundle config on any machine.

    A CUDA run records the bundles' own device choice (CUDA when there is one, else the CPU) and mixed precision
    following it, so that a colleague without a GPU can run the file; the run's device is in
    ``train_summary.json``. A CPU run's config is recorded as it ran.
    """
    if getattr(device, "type", "cpu") != "cuda":
        return config
    amp = config.get("amp")
    return {**config, "device": PORTABLE_DEVICE, "amp": "$@device.type == 'cuda'" if amp is True else amp}


def _check_data_dir(data_dir: str) -> None:
    if Path(data_dir).is_file():
        folder = Path(data_dir).parent
        if folder.name.lower() in ("image", "images") and folder.parent.name == Path(data_dir).stem:
            raise DataError(f"{data_dir}: a file, not a folder; pass --data {folder.parent.parent}, the folder of "
                            "DSB samples that holds its sample")
        labels = [p.name for p in folder.parent.iterdir() if p.is_dir() and p.name.lower() in
                  ("label", "labels", "mask", "masks")] if folder.name.lower() in ("image", "images") else []
        if labels:  # the images of an image/ + label/ (images/ + masks/) pair
            raise DataError(f"{data_dir}: a file, not a folder; pass --data {folder.parent}, the folder that holds "
                            f"{folder.name}/ and {sorted(labels)[0]}/")
        raise DataError(f"{data_dir}: a file, not a folder; pass --data {folder}, the folder that holds it")
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data folder not found; pass --data pointing to the labelled data")


def _check_compile(parser: Any, device: Any) -> None:
    """``compile: true`` needs the compiler ``torch.compile`` builds its kernels with: C++ for a CPU, and on
    CUDA Triton, a GPU it supports (compute capability 7.0 or more) and the C compiler Triton builds its
    launcher with (found as Triton finds it: ``CC``, gcc, clang)."""
    if not parser.get_parsed_content("compile", default=False):
        return
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        try:
            from torch.utils._triton import has_triton_package
        except ImportError:  # a PyTorch that moved it: its own error at the first step then
            has_triton_package = None
        if has_triton_package is not None and not has_triton_package():
            raise ConfigValueError("compile=true: torch.compile on CUDA builds its kernels with Triton, which is not "
                                   "installed (PyTorch's CUDA wheels for Linux bring it); install triton or set "
                                   "--set compile=false")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:  # Triton's oldest
            raise ConfigValueError(f"compile=true: torch.compile on CUDA needs a GPU of compute capability 7.0 or "
                                   f"more, and {device} has {major}.{minor}; set --set compile=false")
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise ConfigValueError("compile=true: torch.compile on CUDA needs a C compiler (gcc or clang, or one "
                                   "named by CC) and none was found; install one or set --set compile=false")
        return
    if getattr(device, "type", "cpu") != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # torch raises its own error types here
        raise ConfigValueError(
            f"compile=true: torch.compile found no C++ compiler for the CPU ({_first_line(exc)}); "
            "install one (e.g. g++) or set --set compile=false") from exc


@contextlib.contextmanager
def quiet_constant_images() -> Iterator[None]:
    # MONAI warns once per constant image (a blank slice) that its intensity range is empty; the image then
    # scales to zeros, which is right, so the warning only clutters a batch's output. Threads may segment at
    # once (medseg.Segmenter): warnings.catch_warnings is not made for that (one thread's exit restores the
    # filters another's entry saw), so the filter is added by the first to enter and removed by the last to leave
    import warnings

    global _quiet_users, _quiet_filter, _quiet_at
    with _quiet_lock:
        if not _quiet_users:
            before = list(warnings.filters)
            warnings.filterwarnings("ignore", message=r"Divide by zero \(a_min == a_max\)")  # to the front
            _quiet_filter = warnings.filters[0]
            # a caller's own equal filter was moved to the front: it goes back where it was at the end, after the
            # filter it followed (the filter itself, or None: it led the list)
            at = before.index(_quiet_filter) if _quiet_filter in before else None
            _quiet_at = None if at is None else before[at - 1] if at else _quiet_filter
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if not _quiet_users:
                with contextlib.suppress(ValueError):  # a caller's resetwarnings() took it already
                    warnings.filters.remove(_quiet_filter)
                    if _quiet_at is _quiet_filter:  # it led the list
                        warnings.filters.insert(0, _quiet_filter)
                    elif _quiet_at is not None:
                        after = next((i + 1 for i, f in enumerate(warnings.filters) if f is _quiet_at), 0)
                        warnings.filters.insert(after, _quiet_filter)
                mutated = getattr(warnings, "_filters_mutated", None)  # the cache of decisions made under it
                if mutated is not None:
                    mutated()


_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_filter: Any = None
_quiet_at: Any = None


@contextlib.contextmanager
def _quiet_monai_grad_scaler() -> Iterator[None]:
    # MONAI's trainer makes its mixed-precision scaler with torch.cuda.amp.GradScaler(), which PyTorch deprecates
    # in a FutureWarning at every CUDA training: a warning about MONAI's code that the user can do nothing about
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
                                category=FutureWarning)
        yield


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """Logger ``name`` at ``level`` for the block, as it was after it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _check_training_length(parser: Any, max_minutes: float | None) -> None:
    epochs = parser.get("max_epochs")
    if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs < 1:
        raise ConfigValueError(f"max_epochs={epochs}: train at least one epoch; give --epochs 1 or more")
    if max_minutes is not None and max_minutes <= 0:
        raise ConfigValueError(f"--max-minutes {max_minutes}: give a positive time, e.g. --max-minutes 30")


def _check_batches(trainer: Any, data_dir: str, parser: Any = None) -> None:
    """A training loader that yields no batch would end the run at once, without a model: say so, naming the
    bundle's id that sets the batch (``parser``: the bundle's config) and the largest value that fills one."""
    loader = getattr(trainer, "data_loader", None)
    try:
        batches, samples = len(loader), len(loader.dataset)
    except TypeError:  # iterable loaders have no length
        return
    if batches == 0:
        size = getattr(loader, "batch_size", None)
        raw = parser.get("train#dataloader#batch_size") if parser is not None else None
        hint = "the batch size (e.g. --set batch_size=N where the bundle has that id)"
        if isinstance(raw, str) and re.fullmatch(r"@\w+", raw):
            hint = f"{raw[1:]} (--set {raw[1:]}={samples} at most)"
        elif isinstance(raw, str) and "@batch_size" in raw and "@samples_per_image" in raw:  # crops per step
            per_image = parser.get_parsed_content("samples_per_image")
            hint = (f"batch_size, which counts crops, {per_image} per image (--set batch_size={samples * per_image} "
                    "at most)")
        raise DataError(f"{data_dir}: {samples} training images fill no batch of {size}; add images or lower {hint}")


def _warn_missing_classes(trainer: Any, parser: Any) -> None:
    """A class of a bundle's ``class_map`` that no cached training mask holds cannot be learnt: said in one warning
    (binary 0/255 masks under jurkat's background / cell body / nucleus map train no cell body)."""
    import numpy as np

    if "class_map" not in parser or "num_classes" not in parser:
        return
    cache = getattr(getattr(getattr(trainer, "data_loader", None), "dataset", None), "_cache", None)
    labels = [item.get("label") for item in cache or [] if isinstance(item, dict) and item.get("label") is not None]
    if not labels:
        return
    present: set[int] = set()
    for label in labels:
        present.update(int(v) for v in np.unique(np.asarray(label)))
    missing = [k for k in range(int(parser.get_parsed_content("num_classes"))) if k not in present]
    if not missing:
        return
    names = parser.get_parsed_content("class_names", default=None) or []
    values = {int(k): v for v, k in dict(parser.get_parsed_content("class_map")).items()}
    said = ", ".join(f"{k} ({names[k] if k < len(names) else 'class'}, mask value {values.get(k, '?')})"
                     for k in missing)
    logging.getLogger(__name__).warning(
        "class %s: in none of the %d training masks held in memory, so the model cannot learn it; check that "
        "class_map matches the values of your masks (--set class_map=..., num_classes, class_names; see the "
        "bundle's docs)",
        said, len(labels))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def checkpoint_list(checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None,
                    bundle: str | os.PathLike | None = None) -> list[str]:
    """The checkpoint paths given (one, or an ensemble's); none given: the bundle's ``models/model.pt``."""
    if checkpoint is None:
        if bundle is None:
            raise CheckpointError("no checkpoint given; pass --checkpoint")
        return [str(Path(bundle) / "models" / "model.pt")]
    paths = [str(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else [str(c) for c in checkpoint]
    if not paths:  # an empty list (a glob that matched nothing) is not "the bundle's own weights"
        raise CheckpointError("an empty list of checkpoints; give at least one, or None for the bundle's "
                              "models/model.pt")
    if len(set(map(_resolved, paths))) < len(paths):
        raise CheckpointError(f"--checkpoint {' '.join(paths)}: a checkpoint is given twice; give each member once")
    return paths


def evaluation_dir(checkpoints: Sequence[str]) -> Path:
    """Where ``evaluate`` writes by default: ``eval`` (``eval_ensemble`` for several) beside the first checkpoint."""
    return Path(checkpoints[0]).parent / ("eval" if len(checkpoints) == 1 else "eval_ensemble")


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def _recorded_split(checkpoints: list[str]) -> dict | None:
    """The ``split.json`` recorded beside the checkpoints (``None``: none); an ensemble's members must agree on it."""
    records = [runfolder.run_file(c, "split.json") for c in checkpoints]
    found = [r for r in records if r.is_file()]
    if not found:
        return None
    splits, keys = {}, {}
    for r in found:
        try:
            splits[r] = json.loads(r.read_text(encoding="utf-8"))
            keys[r] = (tuple(sorted(map(str, splits[r]["val"]))), str(splits[r].get("data_dir", "")),
                       _resolved(str(splits[r]["val_dir"])) if splits[r].get("val_dir") else "")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{r}: not a readable split record ({err}); remove it or pass --set val_count=N") from err
    if len(found) < len(records) or len(set(keys.values())) > 1:
        other = next((r for r in records if r not in keys or keys[r] != keys[found[0]]), records[-1])
        raise DataError(f"{other}: this member was trained on another train/validation split than {found[0]} "
                        "(or its split is not recorded); an ensemble is scored only on images none of its "
                        "members trained on: train the members with the same split seed, or pass --split all")
    return splits[found[0]]


#: The ids by which the bundles draw their split (:mod:`medseg.data`): redrawn as the training drew it when no
#: split record went along with its weights
SPLIT_IDS = ("seed", "val_fraction", "val_count")


def _training_split_settings(checkpoints: list[str], parser: Any, given: Callable[[str], bool]) -> dict[str, Any]:
    """The values of :data:`SPLIT_IDS` that the training of ``checkpoints`` recorded in its ``config.json``,
    where the config's ``datalists`` draws with the id (isbi_em's ``seed`` is its training's only) and the
    command does not give it (``given``: by ``--set`` or an overlay); none when a record is missing, unreadable,
    or the members of an ensemble differ."""
    drawing = json.dumps(parser.get("datalists", {}), default=str)
    found = []
    for checkpoint in dict.fromkeys(map(str, checkpoints)):
        try:
            record = json.loads(runfolder.run_file(checkpoint, "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict):
            return {}
        found.append({k: record[k] for k in SPLIT_IDS if k in record and re.search(rf"@{k}\b", drawing) and not given(k)
                      and isinstance(record[k], (int, float)) and not isinstance(record[k], bool)})
    return found[0] if found and all(f == found[0] for f in found) else {}


#: The ids by which the bundles find their labelled data (:mod:`medseg.data`): read as the training read them
LAYOUT_IDS = ("layout", "image_glob", "mask_template")


class TrainingLayout(NamedTuple):
    """What :func:`_training_layout` found: the values, the record they came from, and whether the training read
    the same data folder (as its data or its validation folder)."""

    values: dict[str, str]
    source: str = ""
    same_data: bool = False


def _training_layout(checkpoints: list[str], parser: Any, given: Callable[[str], bool],
                     data_dir: str) -> TrainingLayout:
    """The values of :data:`LAYOUT_IDS` that the training of ``checkpoints`` recorded in its ``config.json`` and
    that differ from ``parser``'s, where the config's ``datalists`` reads with the id and the command does not give
    it (``given``), with the record they came from and whether its ``dataset_dir`` or ``val_dir`` is ``data_dir``;
    none when a record is missing or unreadable, or the members of an ensemble differ."""
    reading = json.dumps(parser.get("datalists", {}), default=str)
    found, where, same = [], "", True
    for checkpoint in dict.fromkeys(map(str, checkpoints)):
        path = runfolder.run_file(checkpoint, "config.json")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return TrainingLayout({})
        if not isinstance(record, dict):
            return TrainingLayout({})
        found.append({k: record[k] for k in LAYOUT_IDS if isinstance(record.get(k), str) and not given(k)
                      and re.search(rf"@{k}\b", reading) and record[k] != parser.get(k)})
        where = where or str(path)
        read = [written(record.get(k)) for k in ("dataset_dir", "val_dir")]  # its data, and validation folder
        same = same and any(isinstance(r, str) and bool(r) and _resolved(r) == _resolved(data_dir) for r in read)
    if not found or any(f != found[0] for f in found):
        return TrainingLayout({})
    return TrainingLayout(found[0], where, same)


def _validation_folder(checkpoints: list[str], data_dir: str) -> str | None:
    """The validation folder (``val_dir``) that the training of ``checkpoints`` recorded in its ``split.json`` (or,
    without one, its ``config.json``) when ``data_dir`` is the folder it trained on (said in a warning), else
    ``None``.

    Raises:
        DataError: that folder is not there any more.
    """
    record, where = _recorded_split(checkpoints), _recorded_split_path(checkpoints)
    val_dir, trained_on = (record.get("val_dir"), record.get("data_dir")) if record else (None, None)
    if record is None:  # no split.json: the training's config.json says where it validated, too
        path = runfolder.run_file(checkpoints[0], "config.json")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict):
            val_dir, trained_on, where = written(config.get("val_dir")), written(config.get("dataset_dir")), path
    if not (isinstance(val_dir, str) and isinstance(trained_on, str) and val_dir and
            _resolved(trained_on) == _resolved(data_dir)):
        return None
    if not Path(val_dir).is_dir():
        raise DataError(f"{val_dir}: the run validated on this folder ({where}), and it is not there now; pass "
                        "--data the folder of its validation images, or --split train or all to score --data")
    logging.getLogger(__name__).warning("%s: the run trained on all of %s and validated on %s (%s); scoring the "
                                        "images of %s (--split train or all scores %s)", data_dir, data_dir,
                                        val_dir, where, val_dir, data_dir)
    return val_dir


def _recorded_split_path(checkpoints: list[str]) -> Path:
    return next((p for p in (runfolder.run_file(c, "split.json") for c in checkpoints) if p.is_file()),
                Path(checkpoints[0]).parent / "split.json")


def _is_checkpoint_loader(handler: Any) -> bool:
    return isinstance(handler, dict) and str(handler.get("_target_", "")).rsplit(".", 1)[-1] == "CheckpointLoader"


def _checkpoint_scaler(parser: Any, trainer: Any) -> list[dict]:
    """With mixed precision, the trainer's grad scaler goes into the checkpoints that hold the trainer (those
    ``--resume`` reads): a resumed run would otherwise start its loss scale afresh and skip other steps.
    MONAI makes the scaler when the run starts, so it is put into the savers' dicts, and into any load dict
    appended to the returned list, by a handler of the trainer's start (attach it before a checkpoint loader)."""
    from ignite.engine import Events
    from monai.handlers import CheckpointSaver

    savers = [parser.get_parsed_content("last_checkpoint")] if "last_checkpoint" in parser else []
    savers += _bundle_handlers(parser, CheckpointSaver)
    dicts = [s.save_dict for s in savers if isinstance(s, CheckpointSaver) and "trainer" in (s.save_dict or {})]

    def add(engine: Any) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            for d in dicts:
                d["scaler"] = scaler

    trainer.add_event_handler(Events.STARTED, add)
    return dicts


def _bundle_handlers(parser: Any, kind: type) -> list:
    """The handlers of type ``kind`` in the bundle's ``train#handlers`` and ``validate#handlers``."""
    return [h for key in ("train#handlers", "validate#handlers") if key in parser
            for h in (parser.get_parsed_content(key) or []) if isinstance(h, kind)]


def _restore_best(parser: Any, out: Path, evaluator: Any) -> Any:
    # the bundle's best-model savers and early stoppers, told the best validation before the interruption
    from monai.handlers import CheckpointSaver, EarlyStopHandler

    from medseg.handlers import RestoreBest

    savers = [h for h in _bundle_handlers(parser, CheckpointSaver) if h._key_metric_checkpoint is not None]
    return RestoreBest(out, evaluator, savers, _bundle_handlers(parser, EarlyStopHandler))


def _pool_threads() -> set:
    """The thread-pool workers alive now."""
    import threading
    from multiprocessing.dummy import DummyProcess

    return {t for t in threading.enumerate() if isinstance(t, DummyProcess) and t.is_alive()}


def _let_pool_threads_finish(threads: set, timeout: float = 60.0) -> None:
    """Wait for thread-pool workers still running a task (MONAI's CacheDataset fills its cache in a pool).

    When one item fails, or Ctrl-C or SIGTERM comes while the cache is filled, the pool is torn down while
    its other workers are still inside a transform; the interpreter exiting under them aborts the process
    (exit 134, "terminate called without an active exception") after the error was printed. Each worker
    ends once its current task is done. ``threads`` are the workers started during the workflow (see
    :func:`_pool_threads`), never a caller's own pool.
    """
    import threading
    import time

    deadline = time.monotonic() + timeout
    for thread in threads - {threading.current_thread()}:
        thread.join(max(0.0, deadline - time.monotonic()))


def _finishing_pool_threads(workflow: Callable[..., Any]) -> Callable[..., Any]:
    """``workflow`` that, when it fails or is interrupted, first waits for the thread-pool workers it started
    (see :func:`_let_pool_threads_finish`), so that a script exiting on its error does not abort."""

    @functools.wraps(workflow)
    def run(*args: Any, **kwargs: Any) -> Any:
        before = _pool_threads()
        try:
            return workflow(*args, **kwargs)
        except BaseException:
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
                _let_pool_threads_finish(_pool_threads() - before)
            raise

    return run


@_finishing_pool_threads
def train(
    bundle: str,
    data_dir: str,
    output_dir: str,
    *,
    device: str = "auto",
    overlays: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    tracking: bool = True,
    tracking_uri: str | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    val_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``bundle`` on ``data_dir``; checkpoints, curves, split, config and MLflow store go to ``output_dir``.

    ``val_dir``: a folder of labelled images, laid out as ``data_dir``, that validates (chooses ``model.pt``)
    while every image of ``data_dir`` trains; without it, part of ``data_dir`` is held out (the bundle's
    ``val_dir`` id, which ``--set`` and a resumed run's record give too).

    ``say`` is given one line before the training starts: the labelled images found and how they were split
    (the CLI prints it); the summary holds the counts too.

    A folder holding another training's weights is continued with ``resume`` or, with ``overwrite``, has
    that training's checkpoints, ``model.pt``, history and curves removed once the new run has passed its
    checks (its MLflow store keeps the old run); otherwise it is refused.

    Returns:
        A summary: best validation metric and its epoch, epochs run, wall time in seconds.
    """
    from ignite.engine import Events
    from ignite.handlers import TimeLimit
    from monai.bundle import ConfigWorkflow
    from monai.handlers import CheckpointLoader

    from medseg.handlers import RichProgress
    from medseg.io import atomic_output, check_writable, remove_partial_files
    from medseg.locking import folder_lock

    if tracking_uri and not tracking:
        raise ConfigValueError(f"--tracking-uri {tracking_uri} with --no-tracking: give one of them")
    _check_data_dir(data_dir)
    from medseg.data import forget_said

    forget_said()  # what the data lacks is said by each command
    out = Path(output_dir)
    dev = select_device(device)
    settings = {"dataset_dir": str(data_dir), "output_dir": str(out), **device_settings(dev)}
    if val_dir is not None:  # as --set gives it: taken over the run's own by --resume
        _check_val_dir_id(bundle)
        overrides = {**(overrides or {}), "val_dir": os.path.expanduser(str(val_dir))}
    parser = load_config(bundle, "train", overlays, overrides, settings)
    _absolute_val_dir(parser, bundle=bundle)
    _leave_sigterm_to_main(parser, "train#dataloader", "validate#dataloader")
    _check_training_length(parser, max_minutes)
    held_out = parser.get("val_dir") if "val_dir" in parser else None  # as given (a resumed run's: when it began)
    for data, option in ((data_dir, "--data"), *(((held_out, "--val-data"),) if isinstance(held_out, str) and held_out
                                                  else ())):
        if Path(data).is_dir() and out.resolve() == Path(data).resolve():  # a folder inside it may hold runs/
            raise DataError(f"{output_dir}: the data folder itself ({option}), where the run's files would mix with "
                            "the images; give --output a folder of its own, such as runs/NAME")
    made = runfolder.folders_made_for(out.absolute())  # a folder this training makes is removed if it cannot start
    check_writable(out)
    own_store = False  # whether MLflow logs to the folder's own store
    cleanup = runfolder.FailedStartCleanup(out, made)
    with cleanup, folder_lock(out, "train"), contextlib.ExitStack() as at_end:  # one training per folder at a time
        at_end.enter_context(quiet_constant_images())  # a blank slice (air in CT) trains as zeros, unsaid
        at_end.push(cleanup.remove_files)
        remove_partial_files(out)  # what a killed training was writing (a checkpoint, the history)
        runfolder.recover_set_aside(out)
        runfolder.check_run_folder(out, resume, overwrite)
        # --overwrite, --resume: the split and config the checks below write replace the run's only if they pass
        if overwrite and tracking and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow_tracking.say_store_left(runfolder.recorded_run(out).get("config", {}))
        aside = runfolder.set_aside(out, runfolder.SET_ASIDE) if overwrite or resume else []
        tracked: dict | None = None
        kept_split: dict | None = None  # a resumed run's own split, where the data would be split otherwise now
        try:
            recorded = runfolder.recorded_run(out) if resume else {}
            if resume:
                runfolder.check_resume_bundle(bundle, recorded.get("config", {}), out)
            record = mlflow_tracking.tracking_record(recorded.get("config", {}))  # where the run is tracked
            uri_from = "--tracking-uri"
            if tracking and not tracking_uri and resume:  # the store the run was started with
                tracking_uri = mlflow_tracking.recorded_tracking_uri(recorded.get("config", {}))
                uri_from = f"{out / 'config.json'}: the run's MLflow store"
            if tracking and not tracking_uri and os.environ.get("MLFLOW_TRACKING_URI") and not (resume and record):
                # a new run, or one started untracked, logs where MLflow's tools would
                tracking_uri, uri_from = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
            if resume:
                runfolder.resume_settings(parser, recorded.get("config", {}), overrides or {}, overlays)
                _absolute_val_dir(parser, resumed=True, bundle=bundle)  # the run's own validation folder, if any
                check_batch_size(parser)  # with the run's own settings back
                check_classes(parser)
                lengthened = runfolder.resume_length(parser, recorded.get("config", {}), overrides or {})
            datalists = parser.get_parsed_content("datalists")  # fail early, with the data's own message
            if resume:
                given, before = runfolder.given_by(overrides or {}, overlays), recorded.get("config", {})
                asked = (given("datalists") or any(map(given, SPLIT_IDS))) and \
                    _split_drawing(parser.get("datalists"), parser) != _split_drawing(before.get("datalists"), before)
                # another split asked for now is refused, not overruled by the record
                kept_split = runfolder.check_same_split(out, recorded.get("split"), data_dir,
                                                        None if asked else datalists)
            if isinstance(datalists, dict) and "val" in datalists and not datalists["val"]:
                raise DataError(f"{data_dir}: no validation samples in the split, so no model.pt would be chosen; "
                                f"hold some out ({'val_count' if 'val_count' in parser else 'val_fraction'}), "
                                "or give more images")
            found = _data_found(parser, datalists, data_dir, out)
            _check_compile(parser, dev)
            if resume and isinstance(parser.get("val_at_start"), bool):
                parser["val_at_start"] = False  # it would run before the checkpoint loads, scoring fresh weights
            config_path = out / "config.json"
            # config.json: the config as it runs with plain MONAI (its own --tracking if wanted), with the data and
            # run folders absolute; where the run is tracked is on record for --resume alone
            exported = {**copy.deepcopy(parser.get()), "dataset_dir": literal(str(Path(data_dir).absolute())),
                        "output_dir": literal(str(out.absolute()))}
            if tracking:
                artifacts = [str(out / n) for n in ("model.pt", "curves.png", "history.json", "split.json")]
                recorded_experiment = written(record.get("experiment_name"))
                experiment = recorded_experiment if resume and isinstance(recorded_experiment, str) and \
                    recorded_experiment else f"medseg-{Path(bundle).resolve().name}"  # kept when the bundle moved
                tracked = mlflow_tracking.settings(parser, out, tracking_uri, experiment, artifacts, config_path,
                                                   resume, uri_from, record)
                at_end.enter_context(mlflow_tracking.uri_in_environment(tracked["configs"]["tracking_uri"]))
                at_end.callback(runfolder.remove_if_empty, tracked.pop("stray_folders", []))
                exported[mlflow_tracking.RECORD_KEY] = mlflow_tracking.record_of(tracked)
                own_store = tracked.pop("own_store", False)
                ConfigWorkflow.patch_bundle_tracking(parser, mlflow_tracking.config_settings(tracked))
                parser["save_execute_config"] = tracked["configs"]["save_execute_config"]  # as recorded before
            elif resume and record:  # where the run is tracked stays on record for a later --resume with tracking
                exported[mlflow_tracking.RECORD_KEY] = record
            with atomic_output(config_path) as tmp:
                parser.export_config_file(portable_config(exported, dev), str(tmp))
            if resume and kept_split is not None:  # the run's own split, in place of the drawing (not recorded so)
                parser["datalists"] = {key: literal_items(value) for key, value in kept_split.items()}

            parser.get_parsed_content("initialize")
            trainer = parser.get_parsed_content("train#trainer")
            evaluator = parser.get_parsed_content("validate#evaluator")
            _check_batches(trainer, data_dir, parser)
            _warn_missing_classes(trainer, parser)
            scaler_dicts = _checkpoint_scaler(parser, trainer)  # before a resume's loader: it fills its dict
            if tracked is not None and not resume:
                mlflow_tracking.retire_unfinished_runs(tracked["configs"], out, own_store)
            if overwrite:
                # the replaced training's files, once this one has passed its checks
                for path in runfolder.trained_files(out):
                    path.unlink()
            if resume:
                load_dict = {"model": parser.get_parsed_content("network"),
                             "optimizer": parser.get_parsed_content("optimizer"),
                             "lr_scheduler": parser.get_parsed_content("lr_scheduler"), "trainer": trainer}
                if "ema" in parser and getattr(parser.get_parsed_content("ema"), "enabled", False):
                    load_dict["ema_model"] = parser.get_parsed_content("eval_network")
                last = runfolder.last_checkpoint(out)
                try:  # unreadable, or another network: one line naming it, before the run starts
                    load_checkpoint(load_dict["model"], last, dev)
                except CheckpointError as err:
                    problem = str(err).rsplit("; ", 1)[0]
                    other = "weights do not fit" in problem  # another network now; else the file itself is unusable
                    raise CheckpointError(f"cannot resume: {problem}; " + (
                        "resume with the settings the run was started with, or start anew with --overwrite instead "
                        "of --resume" if other else "start anew with --overwrite instead of --resume")) from err
                saved = runfolder.checkpoint_parts(last)
                if lengthened:
                    runfolder.warn_schedule_kept(parser["max_epochs"], saved.get("lr_scheduler"))
                # a checkpoint without mixed precision, or of an earlier version, has no scaler, and one saved
                # while the scaler was off (amp on a CPU) an empty one, which an active scaler refuses
                if saved.get("scaler"):
                    scaler_dicts.append(load_dict)
                runfolder.check_resumed_state(saved, load_dict["optimizer"], _loader_length(trainer), last)
                resumed_from = runfolder.check_epochs_left(saved.get("trainer"), last, trainer.state.max_epochs)
                CheckpointLoader(load_path=str(last), load_dict=load_dict, map_location=dev).attach(trainer)
                _restore_best(parser, out, evaluator).attach(trainer)  # after the loader: it reads the resumed state
        except BaseException:
            runfolder.put_back(aside)
            if tracked is not None:
                mlflow_tracking.finish_again(tracked)  # a refused resume leaves the finished run as it was
            raise
        runfolder.put_back(aside, keep_new=True)
        cleanup.started = True  # from here on, what the run writes is kept whatever happens
        if say is not None and found:
            say(found["said"])
        if max_minutes:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(limit_sec=max(1, round(max_minutes * 60))))
        RichProgress(evaluator=evaluator, disable=not progress).attach(trainer)

        start = time.perf_counter()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        from monai.handlers import MLFlowHandler

        from medseg.info import environment

        # at the start: a checkout or folder may change during a long run
        ran_with = environment(dev, parser.get_parsed_content("amp", default=False))

        trackers = _bundle_handlers(parser, MLFlowHandler)  # the trainer's first
        mlflow_tracking.link(trackers)
        run_ids = mlflow_tracking.note_run_id(trainer, trackers, out / "config.json" if tracked is not None else None)

        guards.seed_each_epoch(trainer, parser.get_parsed_content("init_seed", default=None))
        diverged = guards.stop_on_divergence(trainer, trackers)
        with guards.stop_on_ctrl_c(trainer, trackers) as interrupted:
            guards.validate_at_end(trainer, evaluator, interrupted, diverged)
            with quiet_user_error_logs(), _quiet_monai_grad_scaler():  # a bad file: reported once, by the CLI
                try:
                    parser.get_parsed_content("run")
                except BaseException as err:  # the MLflow run ends marked as what stopped it, not left running
                    mlflow_tracking.close_runs(trackers,
                                               "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                                               at_once=isinstance(err, KeyboardInterrupt) and interrupted.at_once)
                    if isinstance(err, KeyboardInterrupt) and interrupted.at_once:
                        raise interrupted.stop(f"stopped at once; {runfolder.how_to_go_on(out)}") from None
                    # a full disk or a refused write (the history, the curves): the finished epochs are kept
                    if not find_user_error(err) and describe_os_failure(err) and any(
                            out.glob("last_checkpoint_epoch=*.pt")):
                        raise DataError(describe_os_failure(err, f"continue with --resume --output {out}")) from err
                    raise
        summary = {
            "best_metric": evaluator.state.best_metric if evaluator.state.best_metric_epoch >= 0 else None,
            "best_metric_epoch": evaluator.state.best_metric_epoch,
            "key_metric": evaluator.state.key_metric_name,
            "epochs": interrupted.finished,  # epochs that ended: a time limit or Ctrl-C may stop one midway
            "wall_seconds": round(time.perf_counter() - start, 1),
            "device": str(dev),
            "output_dir": str(out),
            **({"images": {k: v for k, v in found.items() if k != "said"}} if found else {}),
            **({"resumed_from_epoch": resumed_from} if resume else {}),
            "started": started,
            "environment": ran_with,
        }
        if (out / "model.pt").is_file():  # whose best this is, however the files are copied later (export)
            from medseg.io import file_sha256

            summary["weights_sha256"] = file_sha256(out / "model.pt")
        if resume:  # what each earlier session of the run did, oldest first
            summary["earlier_sessions"] = runfolder.earlier_sessions(out / "train_summary.json")
        if interrupted:
            summary["interrupted"] = True
        if diverged:
            summary["diverged"] = diverged.words()
        with atomic_output(out / "train_summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        runfolder.keep_newest_last_checkpoint(out)
        if tracked is not None and not any(getattr(h, "failed", None) or getattr(h, "files_failed", False)
                                           for h in trackers):
            mlflow_tracking.log_late_artifacts_or_warn(tracked["configs"], run_ids, [out / "train_summary.json"])
        if interrupted:
            raise interrupted.stop(runfolder.how_to_go_on(out))
        if diverged:
            raise TrainingDiverged(diverged.message(parser, out, summary))
        return summary


def _split_drawing(datalists: Any, values: Any) -> str:
    """The config of a split's drawing (``datalists``) as text, its references to :data:`SPLIT_IDS` replaced by
    their ``values`` (a config or its parser), so that two drawings compare by what they draw with."""
    text = json.dumps(datalists, default=str, sort_keys=True)
    for key in SPLIT_IDS:
        if key in values:
            text = text.replace(json.dumps(f"@{key}"), json.dumps(values.get(key), default=str, sort_keys=True))
    return text


def _datalists_reads(parser: Any, key: str) -> bool:
    """Whether the config's split drawing (``datalists``) refers to the id ``key``."""
    return bool(re.search(rf"@{key}\b", json.dumps(parser.get("datalists", {}), default=str)))


def _check_val_dir_id(bundle: str) -> None:
    """Raise :class:`BundleError` when the training config of ``bundle`` has no ``val_dir`` id (a bundle written
    before it existed), for which ``--val-data`` would mean nothing."""
    from medseg.bundle import default_config

    if "val_dir" in default_config(bundle, "train"):
        return
    raise BundleError(f"{Path(bundle) / 'configs' / 'train.json'}: has no val_dir id, so --val-data cannot be used "
                      "with it; add \"val_dir\": null and pass \"val_dir\": \"@val_dir\" to its datalists, or "
                      "leave --val-data out")


def _loader_length(trainer: Any) -> int | None:
    """Batches per epoch of ``trainer``'s data (its ``epoch_length`` where set), ``None`` where unknown."""
    length = getattr(trainer.state, "epoch_length", None)
    if length:
        return int(length)
    try:
        return len(trainer.data_loader)
    except TypeError:
        return None


def _absolute_val_dir(parser: Any, resumed: bool = False, bundle: str = "") -> None:
    """The config's validation folder (``val_dir``: ``--val-data``, ``--set``, an overlay, or with ``resumed`` the
    run's record) as an absolute path (``~`` expanded), so that the run's record points at it from anywhere; a
    folder that is not there fails now.

    Raises:
        DataError: the folder is not there.
        BundleError: the config's ``datalists`` does not read ``@val_dir`` (an overlay replaced it), so the
            folder would not validate.
    """
    given = parser.get("val_dir") if "val_dir" in parser else None
    if isinstance(given, str) and given and not given.startswith(("$", "@", "%")):
        given = os.path.expanduser(given)
        if not Path(given).is_dir():
            kind = "a file, not a folder" if Path(given).is_file() else "validation folder not found"
            fix = "put the run's validation folder back there, or give --val-data the folder where it is now, " \
                "to resume" if resumed else "pass --val-data (val_dir) a folder of labelled images laid out as " \
                "--data, or leave it out to hold out part of --data"
            raise DataError(f"{given}: {kind}; {fix}")
        if not _datalists_reads(parser, "val_dir"):
            raise BundleError(f"{Path(bundle) / 'configs' / 'train.json'}: its datalists does not read @val_dir, so "
                              "a validation folder would not validate; pass \"val_dir\": \"@val_dir\" to its "
                              "datalists, or leave --val-data (val_dir) out")
        parser["val_dir"] = str(Path(given).absolute())


def _data_found(parser: Any, datalists: Any, data_dir: str, out: Path) -> dict[str, Any]:
    """How many labelled images (ISBI: slices) ``datalists`` holds for training and validation, and the layout
    they were read in where the bundle reads several (nuclei), with a line saying so; empty for a config whose
    ``datalists`` is not a split."""
    if not (isinstance(datalists, dict) and isinstance(datalists.get("train"), list)
            and isinstance(datalists.get("val"), list)):
        return {}
    found: dict[str, Any] = {"train": len(datalists["train"]), "val": len(datalists["val"])}
    what = "slices" if "val_count" in parser else "images"
    layout = ""
    with contextlib.suppress(MedsegError, KeyError, TypeError, ValueError):  # the data were read: the settings are good
        globs = (str(parser.get_parsed_content("image_glob")), str(parser.get_parsed_content("mask_template")))
        layout = f" (images '{globs[0]}', masks '{globs[1]}')"
        if isinstance(parser.get("layout"), str):
            from medseg.data import instance_layout

            found["layout"] = instance_layout(data_dir, parser.get_parsed_content("layout"), *globs)
            if found["layout"] == "kaggle":
                layout = " (DSB Kaggle layout: {id}/images + {id}/masks)"
    record = f"; the split is recorded in {out / 'split.json'}" if (out / "split.json").is_file() else ""
    val_dir = parser.get("val_dir") if "val_dir" in parser else None
    if isinstance(val_dir, str) and val_dir and not val_dir.startswith(("$", "@", "%")):
        found["val_dir"] = val_dir
        found["said"] = (f"{data_dir}: {found['train']} labelled {what}{layout} for training; {val_dir}: "
                         f"{found['val']} for validation{record}")
    else:
        found["said"] = (f"{data_dir}: {found['train'] + found['val']} labelled {what}{layout}: {found['train']} "
                         f"for training, {found['val']} for validation{record}")
    return found


def _leave_sigterm_to_main(parser: Any, *loaders: str) -> None:
    """Start the workers of the data loaders ``loaders`` (config ids) with :func:`data_worker_init`."""
    for key in loaders:
        loader = parser.get(key)
        if isinstance(loader, dict) and "worker_init_fn" not in loader:  # a reference or expression: as given
            parser[f"{key}#worker_init_fn"] = {"_target_": "medseg.workflows.data_worker_init", "_mode_": "callable"}


def data_worker_init(worker_id: int) -> None:
    """Start a training data-loader worker (``num_workers`` > 0): MONAI's seeding, and SIGTERM left to the
    main process, which stops the run as on Ctrl-C and then ends its workers. ``timeout`` and batch
    schedulers signal the whole process group, and PyTorch's workers die on a SIGTERM not sent by their
    parent, which failed the training instead of stopping it."""
    import signal

    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _no_empty_output_left(workflow: Callable[..., Any]) -> Callable[..., Any]:
    """``workflow`` (with an ``output_dir`` argument) that, when it fails, removes the output folders it made
    that are still empty: a refused evaluation leaves no empty ``eval/`` behind."""
    import inspect

    signature = inspect.signature(workflow)

    @functools.wraps(workflow)
    def run(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs).arguments
        output_dir = given.get("output_dir")
        if output_dir is None:  # evaluate's default, beside the checkpoint
            with contextlib.suppress(Exception):  # a bad checkpoint argument fails in the workflow itself
                output_dir = evaluation_dir(checkpoint_list(given.get("checkpoint"), given.get("bundle")))
        made = runfolder.folders_made_for(Path(output_dir).absolute()) if output_dir else []
        try:
            return workflow(*args, **kwargs)
        except BaseException:
            runfolder.remove_if_empty(made)
            raise

    return run


@_finishing_pool_threads
@_no_empty_output_left
def evaluate(
    bundle: str,
    data_dir: str,
    checkpoint: str | Sequence[str] | None = None,
    output_dir: str | None = None,
    *,
    split: str | None = None,
    tta: bool | None = None,
    device: str = "auto",
    overlays: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    tracking: bool = True,
) -> dict[str, Any]:
    """Score ``checkpoint`` on the ``split`` slices (``val``, ``train`` or ``all``) of ``data_dir``; write CSV + JSON.

    ``checkpoint=None`` scores the bundle's ``models/model.pt``; ``output_dir=None`` writes to
    :func:`evaluation_dir` of the checkpoints.

    ``split=None`` takes the config's ``eval_split`` (an overlay's, or the bundle's ``val``); ``eval_split`` in
    ``overrides`` is the same as ``split``, and the two at odds are an error.

    Several checkpoints are scored as one ensemble (:class:`medseg.ensemble.MeanEnsemble`, outputs averaged).
    With ``split="val"`` or ``"train"``, a ``split.json`` next to the checkpoint selects the validation or
    training samples of its run (ISBI: by the number held out; other bundles: by their names, when it
    records this ``data_dir``); an ensemble's members must record the same validation samples.
    ``tta`` averages the 8 dihedral transforms of each slice (``None``: the bundle's ``tta``).

    The report replaces an earlier one in ``output_dir`` only when that is the same evaluation (same weights,
    data, split, ``tta`` and settings) or with ``overwrite`` (:func:`medseg.evaluation.check_report_folder`);
    one evaluation writes into a folder at a time.

    With ``tracking``, the report of one checkpoint is also logged to the MLflow run of its training, where that
    was tracked (:func:`medseg.tracking.log_evaluation`).

    Returns:
        The summary written to ``output_dir/summary.json``, with ``mlflow_run_id`` where it was logged.
    """
    from medseg.ensemble import load_members
    from medseg.evaluation import settings_digest
    from medseg.export import say_other_weights
    from medseg.io import check_writable
    from medseg.locking import folder_lock

    overrides = dict(overrides or {})
    given = overrides.pop("eval_split", None)  # the bundle's own id for the split
    if given is not None and split is not None and str(given) != split:
        raise MedsegError(f"--set eval_split={given} contradicts --split {split}; give one of them")
    split = str(given) if given is not None else split
    _check_data_dir(data_dir)
    from medseg.data import forget_said

    forget_said()  # what the data lacks is said by each command
    if tta is not None:  # the inferer's own key, so bundles without a top-level ``tta`` id work too
        overrides["validate#inferer#tta"] = bool(tta)
    checkpoints = checkpoint_list(checkpoint, bundle)
    output_dir = str(output_dir if output_dir is not None else evaluation_dir(checkpoints))
    dev = select_device(device)
    settings = {"dataset_dir": str(data_dir), "output_dir": str(output_dir), "ckpt_path": checkpoints[0],
                **device_settings(dev)}
    trained = runfolder.training_settings(bundle, checkpoints, overrides, overlays)
    parser = load_config(bundle, "evaluate", overlays, overrides, settings, trained=trained.values)
    layout = _training_layout(checkpoints, parser, runfolder.given_by(overrides, overlays), str(data_dir))
    said_layout = ", ".join(f"{k}={v}" for k, v in layout.values.items())
    if layout.same_data:  # the training's own data folder: looked for as the training found it
        for key, value in layout.values.items():
            parser[key] = value
        if layout.values:
            logging.getLogger(__name__).warning(
                "reading %s as the training read it: %s (from %s); give --set to read it otherwise",
                data_dir, said_layout, layout.source)
    settings_sha256 = settings_digest(parser.get())  # as given, before the split's own adjustments below
    if "num_workers" in overrides and isinstance(parser.get("validate#dataloader"), dict):
        parser["validate#dataloader#num_workers"] = parser["num_workers"]  # the loader evaluate reads from
    _leave_sigterm_to_main(parser, "validate#dataloader")
    split = split or str(parser.get("eval_split", "val"))  # else an overlay's eval_split, or the bundle's (val)
    if split not in ("val", "all", "train"):
        raise MedsegError(f"--split {split}: unknown split; use val, train or all")
    if "eval_split" in parser:
        parser["eval_split"] = split
    if "split_record" in parser:  # an exported bundle's, for MONAI's runner: the split is picked below
        parser["split_record"] = None
    if split == "all" and parser.get("val_count") is not None:
        parser["val_count"] = 0  # ISBI: nothing is held out when every slice is scored (5 of 4 could not be)
    # the model and the output folder first, so that a wrong checkpoint or folder fails before the data are read
    network, digests = load_members(parser.get_parsed_content("network_def"), checkpoints)
    say_other_weights(bundle, checkpoints, digests)
    check_writable(output_dir)
    if split == "val":
        val_dir = _validation_folder(checkpoints, str(data_dir))
        if val_dir is not None:  # the run validated on a folder of its own: that folder's images are scored
            if "val_dir" in parser and _datalists_reads(parser, "val_dir"):
                parser["val_dir"] = val_dir  # the training's own split again, with or without its record
            else:  # a bundle without the id: the folder itself, its images picked by the record's names
                parser["dataset_dir"] = val_dir
            data_dir = val_dir
    with folder_lock(output_dir, "evaluate"):  # a failed evaluation's new folder goes (_no_empty_output_left)
        try:
            summary, reported = _evaluate_in(parser, bundle, data_dir, checkpoints, output_dir, split, overrides,
                                             overlays, trained, network, digests, settings_sha256, dev, progress,
                                             overwrite)
        except Exception as err:  # data of another folder, not found as the bundle lays data out: how the run did
            found = find_user_error(err)
            if layout.same_data or not layout.values or not isinstance(found, DataError) or not re.search(
                    r"no images match|no mask matches|no DSB samples", str(found)):
                raise
            raise DataError(f"{found}; the training read its data with {said_layout} ({layout.source}): give them "
                            "by --set if this data is laid out so") from err
        # an ensemble's members are several trainings, several runs; a bundle without medseg's report has none
        if tracking and reported and len(checkpoints) == 1:
            from medseg.tracking import log_evaluation

            try:
                run_id = log_evaluation(checkpoints[0], output_dir)
            except KeyboardInterrupt as stop:  # the report stands; only its copy in MLflow is not made
                raise type(stop)(f"the report is written in {output_dir}; stopped while logging it to the "
                                 "training's MLflow run (--no-tracking leaves that out)") from None
            if run_id is not None:
                summary = {**summary, "mlflow_run_id": run_id}
    return summary


def _evaluate_in(parser: Any, bundle: str, data_dir: str, checkpoints: list[str], output_dir: str, split: str,
                 overrides: dict, overlays: tuple[str, ...], trained: Any, network: Any, digests: list[str],
                 settings_sha256: str, dev: Any, progress: bool, overwrite: bool) -> tuple[dict[str, Any], bool]:
    """:func:`evaluate` once its model is loaded and it holds its output folder: the summary, and whether it was
    written as a report (``summary.json``)."""
    from medseg.evaluation import MetricsReport, check_report_folder, keep_scored_rows
    from medseg.handlers import RichProgress
    from medseg.info import environment

    # what makes this evaluation the one it is: an earlier report in the folder is replaced only if it is the same
    same = {"checkpoints": [{"path": _resolved(c), "sha256": d} for c, d in zip(checkpoints, digests, strict=True)],
            "data_dir": _resolved(str(data_dir)), "split": split,
            "tta": bool(getattr(parser.get_parsed_content("validate#inferer"), "tta", False)),
            "settings_sha256": settings_sha256}
    check_report_folder(output_dir, same, overwrite)
    trained.say(checkpoints)
    record = _recorded_split(checkpoints) if split != "all" and "val_count" not in overrides else None
    split_from = "the settings given"
    if record is not None:
        # score the validation (or training) samples of the run that produced the checkpoint, by their names:
        # in a copy of the data at another path too, and never a sample the run trained on in their stead
        names = [str(n) for n in record.get(split, [])]
        if parser.get("val_count") is not None:  # ISBI: the last N slices are held out, the others trained on
            # the recorded names pick the slices out of all of them (a copy holding the held-out five only, too);
            # with none recorded, the run's count draws them
            parser["val_count"] = 0 if names else len(record["val"])
        if names:
            recorded_dir = str(record.get("val_dir") or "" if split == "val" else "") or \
                str(record.get("data_dir", ""))
            datalists = parser.get_parsed_content("datalists")
            listed = datalists.get("all", []) if isinstance(datalists, dict) else []
            from medseg.data import with_val_prefix

            samples = with_val_prefix({str(d.get("name")): d for d in listed}, record, split)
            present = [n for n in names if n in samples]
            where = _recorded_split_path(checkpoints)
            if not present and split == "val" and record.get("val_dir"):  # validated on a folder of its own
                raise DataError(f"{data_dir}: none of the {len(names)} val images that {where} records are here; "
                                f"the run validated on a folder of its own, {record['val_dir']}: give --data that "
                                "folder (or a copy of it)")
            if not present:
                raise DataError(f"{data_dir}: none of the {len(names)} {split} images that {where} records are "
                                f"here (the run used {recorded_dir or 'another folder'}); pass --split all to score "
                                f"every image of {data_dir}")
            changed = _changed_samples(record, [samples[n] for n in present])
            if changed and len(changed) == len(present) and recorded_dir and \
                    recorded_dir != str(Path(data_dir).resolve()):
                # another data set numbered alike, or the same data re-saved (the digests are of the files)
                logging.getLogger(__name__).warning(
                    "%s: every one of the %d %s images that %s names differs from the file of that name the run "
                    "recorded: if this is another data set numbered alike, these %d are not the run's %s images "
                    "but a few of the set; pass --split all to score every image of it", data_dir, len(present),
                    split, where, len(present), split)
                changed = []
            if len(present) < len(names):
                logging.getLogger(__name__).warning(
                    "%s: %d of its %d %s images are not in %s; scoring the %d that are",
                    where, len(names) - len(present), len(names), split, data_dir, len(present))
            elif recorded_dir and recorded_dir != str(Path(data_dir).resolve()):
                logging.getLogger(__name__).warning(
                    "%s records the split of %s; scoring the %s images of the same names in %s (for another "
                    "data set, pass --split all)", where, recorded_dir, split, data_dir)
            if changed:
                logging.getLogger(__name__).warning(
                    "%s: %d of the images scored differ from those of the same names it records (first: %s); the "
                    "scores are of the images as they are now", where, len(changed), changed[0])
            parser["validate#dataset#data"] = literal_items([samples[n] for n in present])
    elif split != "all" and "val_count" in overrides:
        _warn_if_trained_on(checkpoints, parser, split)
    elif split != "all":
        drawn = _training_split_settings(checkpoints, parser, runfolder.given_by(overrides, overlays))
        for key, value in drawn.items():
            parser[key] = value
        given = "the split settings its config.json records (" + ", ".join(
            f"{k} {v}" for k, v in drawn.items()) + ")" if drawn else "the settings given"
        logging.getLogger(__name__).warning(
            "%s: no split record beside the checkpoint, so the %s images are drawn again with %s, which give the "
            "training's split only if the data is the same; put the run's split.json beside the checkpoint, or "
            "pass --split all", _recorded_split_path(checkpoints), split, given)
        if drawn:
            split_from = f"drawn with the training's {', '.join(drawn)} (config.json)"
    # the weights loaded above are scored (a CheckpointLoader would read the file again at the start, and a
    # training still running into the folder may have replaced it by then) and their digests recorded
    parser["network_def"] = network
    parser["eval_network"] = "@network"
    parser["validate#handlers"] = [h for h in parser["validate#handlers"] if not _is_checkpoint_loader(h)]
    parser.get_parsed_content("datalists")  # a bad data folder fails here with its own message
    _check_some_to_score(parser, data_dir, split)
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("validate#evaluator")
    RichProgress(disable=not progress).attach(evaluator)
    # what produced the evaluation goes into its summary.json under "run", so a later evaluation into the same
    # folder is told apart
    reports = [h for h in parser.get_parsed_content("validate#handlers") if isinstance(h, MetricsReport)]
    run = {
        # by its metadata, as infer's run.json: a renamed or moved copy (an export) is the same bundle
        "bundle": f"{parser.get_parsed_content('_meta_#name', default='') or Path(bundle).resolve().name} "
                  f"{parser.get_parsed_content('_meta_#version', default='')}".strip(),
        "checkpoints": same["checkpoints"],
        "data_dir": same["data_dir"],
        "split": split,
        "split_from": (str(_recorded_split_path(checkpoints).absolute()) if record is not None and split != "all"
                       else "all images" if split == "all" else split_from),
        "tta": same["tta"],
        "overrides": dict(overrides),
        **({"from_training": trained.values} if trained.values else {}),
        "overlays": [_resolved(o) for o in overlays],
        "settings_sha256": same["settings_sha256"],
        "environment": environment(dev, parser.get_parsed_content("amp", default=False)),
    }
    for report in reports:
        report.run = run
    with quiet_user_error_logs(), quiet_constant_images():  # a blank slice scores as it is, without a warning
        try:
            parser.get_parsed_content("run")
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the images scored so far are kept
            try:
                total = len(parser.get_parsed_content("validate#dataset#data") or [])  # resolved already: cached
            except Exception:  # noqa: BLE001 - the count only words the message; the stop is what matters
                total = 0
            kept = keep_scored_rows(reports, total)
            if kept:
                raise type(stop)(kept) from None
            raise
    if reports:
        return reports[0].summary, True
    return {k: float(v) for k, v in evaluator.state.metrics.items()}, False


def _check_some_to_score(parser: Any, data_dir: str, split: str) -> None:
    """An evaluation with no image to score would write no report (the evaluator does not run): say so."""
    if len(parser.get_parsed_content("validate#dataset#data") or []) > 0:
        return
    datalists = parser.get_parsed_content("datalists")
    found = len(datalists.get("all", [])) if isinstance(datalists, dict) else 0
    raise DataError(f"{data_dir}: no {split} images to score among its {found} labelled image"
                    f"{'' if found == 1 else 's'}; pass --split all to score every one")


def _warn_if_trained_on(checkpoints: list[str], parser: Any, split: str) -> None:
    """``--set val_count=N`` draws the held-out slices by count instead of from the run's ``split.json``: say so
    when that puts images of the run's other part among those scored (training images scored as validation)."""
    try:
        record = _recorded_split(checkpoints)
    except DataError:
        return  # an unreadable record: val_count is the way round it
    datalists = parser.get_parsed_content("datalists")
    if not record or not isinstance(datalists, dict):
        return
    other = "train" if split == "val" else "val"
    theirs = {str(n) for n in record.get(other, [])}
    scored = [str(d.get("name")) for d in datalists.get(split, []) or []]
    mixed = [n for n in scored if n in theirs]
    if mixed:
        logging.getLogger(__name__).warning(
            "--set val_count=%s: %d of the %d %s images scored (first: %s) are %s images of the run that %s "
            "records; drop val_count to score the recorded split", parser.get("val_count"), len(mixed),
            len(scored), split, mixed[0], "training" if other == "train" else "validation",
            _recorded_split_path(checkpoints))


def _changed_samples(record: dict, samples: Sequence[dict]) -> list[str]:
    """The names of ``samples`` whose image or label differs from the one of that name the run's split recorded
    (none when it recorded no digests)."""
    from medseg.data import sample_digest

    recorded = record.get("sha256")
    if not isinstance(recorded, dict):
        return []
    files: dict[str, str] = {}
    return [s["name"] for s in samples if s["name"] in recorded and sample_digest(s, files) != recorded[s["name"]]]


def infer(
    bundle: str,
    input_path: str,
    output_dir: str,
    checkpoint: str | Sequence[str] | None = None,
    *,
    tta: bool | None = None,
    device: str = "auto",
    overlays: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    recursive: bool = True,
    overwrite: bool = False,
    output_format: str = "auto",
    save_prob: bool = True,
) -> dict[str, Any]:
    """Segment every input under ``input_path`` (PNG, TIFF, NIfTI, DICOM series) into ``output_dir``.

    Each input is segmented slice by slice and written in its own kind (see :mod:`medseg.writers`); a failing
    input is recorded and skipped, inputs whose outputs exist are skipped unless ``overwrite``, and
    ``output_dir/manifest.csv`` lists every input with its status and outputs. ``output_dir/run.json``
    records which run (bundle, checkpoint SHA-256, resolved config, settings) made each output; existing
    outputs that another run made are an error before any work unless ``overwrite``.
    ``tta`` averages the 8 dihedral transforms of each slice (``None``: the bundle's ``tta``). Several
    checkpoints segment as one ensemble (:class:`medseg.ensemble.MeanEnsemble`, outputs averaged).

    Returns:
        Counts per status, slices segmented, wall time, slices per second, the manifest path and the
        failure messages.

    Raises:
        DataError: nothing to segment, an unsupported single file, an unknown output format, an output
            folder that cannot be written, or one that holds another run's outputs.
    """
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset

    from medseg.batch import RunRecord, run_batch
    from medseg.discovery import discover, label_inputs
    from medseg.ensemble import load_members
    from medseg.export import say_other_weights
    from medseg.handlers import FileProgress
    from medseg.io import check_writable, remove_partial_files
    from medseg.locking import folder_lock
    from medseg.readers import count_slices, max_pixels
    from medseg.writers import OUTPUT_FORMATS, SaveSegmentationd

    if output_format not in ("auto", *OUTPUT_FORMATS):
        raise DataError(f"--format {output_format}: unknown output format; choose auto, {', '.join(OUTPUT_FORMATS)}")
    max_pixels()  # a bad MEDSEG_MAX_PIXELS is one error before the batch, not one per input
    inputs, ignored = discover(input_path, include, exclude, recursive, skip=output_dir)
    labels = label_inputs(inputs, input_path)
    if labels:  # a labelled data set given whole: its masks would be segmented as images, unsaid
        name = labels[0][1]
        logging.getLogger(__name__).warning(
            "%s: %d of the %d inputs lie in %s/ folders beside folders of images (a labelled data set?), and are "
            "segmented as images; leave them out with --exclude '*%s/*' (or give --include for the images)",
            input_path, len(labels), len(inputs), name, name)
    out = Path(output_dir)
    checkpoints = checkpoint_list(checkpoint, bundle)
    dev = select_device(device)
    settings = {"input_dir": str(input_path), "output_dir": str(out), "ckpt_path": checkpoints[0],
                "output_format": output_format, "save_prob": save_prob, "datalist": [], "handlers": [],
                **({} if tta is None else {"tta": bool(tta)}), **device_settings(dev)}
    trained = runfolder.training_settings(bundle, checkpoints, overrides or {}, overlays)
    parser = load_config(bundle, "infer", overlays, overrides, settings, trained=trained.values)
    trained.say(checkpoints)
    workers = parser.get("dataloader#num_workers", 0) if isinstance(parser.get("dataloader"), dict) else 0
    if workers:  # each input's slices are read in this process (run_batch), one input at a time
        raise ConfigValueError(f"dataloader#num_workers={workers}: medseg infer reads each input's slices itself "
                               "and takes no data-loader workers (the id is for python -m monai.bundle run); "
                               "drop it")
    network, digests = load_members(parser.get_parsed_content("network_def"), checkpoints)
    say_other_weights(bundle, checkpoints, digests)
    if len(checkpoints) > 1:
        parser["network_def"] = network
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")
    preprocessing = parser.get_parsed_content("preprocessing")
    writer = next((t for t in getattr(parser.get_parsed_content("postprocessing"), "transforms", ())
                   if isinstance(t, SaveSegmentationd)), None)
    if writer is None:
        raise DataError(f"{bundle}: inference postprocessing has no medseg.writers.SaveSegmentationd; add one")
    if writer.output_format == "dicom-seg" and inputs and not any(item.format == "dicom" for item in inputs):
        shown = f"--format {output_format}" if output_format != "auto" else "output_format=dicom-seg"
        raise DataError(f"{input_path}: {shown} needs DICOM inputs, and none of the {len(inputs)} found is DICOM; "
                        "use --format nifti or tiff")
    if os.path.abspath(writer.output_dir) != os.path.abspath(out):  # a --set or overlay of the writer's own id
        raise ConfigValueError(f"the bundle's writer would write to {writer.output_dir}, not to the output folder "
                               f"{out} (where the run record and manifest go); give the folder as OUTPUT_DIR and "
                               "drop the setting of the writer's output_dir")
    writes = ("mask", *(["prob"] if writer.save_prob else []), *(["table"] if writer.mask_mode == "instances" else []))
    check_writable(out, writes)  # after the checks of the model and the writer: a bad one leaves no empty folder
    with folder_lock(out, "infer"):  # one batch per output folder at a time
        remove_partial_files(out)  # what a killed batch was writing (run.json, manifest.csv, outputs)
        for kind in ("mask", "prob", "table"):
            remove_partial_files(out / kind, recursive=True)
        # what decides the masks: the weights and the bundle's config as overridden, less this run's paths
        config = {k: v for k, v in parser.get().items() if k not in (*settings, "bundle_root", "tta")}
        tta_used = parser.get_parsed_content("tta", default=False)
        config["tta"] = bool(tta_used)  # as given or as the bundle's
        version = parser.get_parsed_content("_meta_#version", default="")
        folder_named = f"{Path(bundle).resolve().name} {version}".strip()  # how earlier versions named it
        identity = {
            # by its metadata: a renamed or moved copy of the bundle is the same bundle
            "bundle": f"{parser.get_parsed_content('_meta_#name', default='') or Path(bundle).resolve().name} "
                      f"{version}".strip(),
            # SHA-256: the same weights under another path are the same run; an ensemble's, joined by '+'
            "checkpoint": "+".join(digests),
            # the config covers overlays, --set and the training's values taken alike
            "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        }
        # in words, for the message
        words = {"overrides": dict(overrides or {}), "tta": tta_used,
                 **({"from_training": trained.values} if trained.values else {})}
        # the same run as earlier versions recorded it: with the settings' words in the identity (RunRecord takes
        # those whose identity is this one less the words), and before that with the config hashed without tta
        # when --tta or --no-tta was given
        del config["tta"]
        without_tta = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        same_as = [{**identity, "config": without_tta, "settings": {"overrides": given, "tta": tta_used}}
                   for given in (dict(overrides or {}), {**trained.values, **(overrides or {})})]
        same_as += [{**same, "bundle": folder_named} for same in (identity, *same_as)]
        paths = [str(Path(c).resolve()) for c in checkpoints]
        info = {"checkpoint_path": paths[0] if len(paths) == 1 else paths, "settings": words}
        record = RunRecord(out, identity, info, same_as=same_as)
        inputs = record.keep_names(inputs)  # no input writes over the outputs another input made here
        evaluator.logger.setLevel(logging.CRITICAL)  # failures are reported per input below, not as engine logs

        def segment(items: list[dict]) -> dict | None:
            evaluator.data_loader = DataLoader(Dataset(items, transform=preprocessing), batch_size=1, num_workers=0)
            evaluator.state.epoch_length = len(items)
            evaluator._internal_run_generator = None  # Ignite keeps a dead generator after an exception; start afresh
            evaluator.run()
            if evaluator.state.iteration != len(items):
                raise RuntimeError(f"the model ran on {evaluator.state.iteration} of {len(items)} slices")
            if writer.mask_mode == "instances":
                return {"objects": writer.object_counts.pop(items[0]["name"], 0)}
            return None

        channel_dim = parser.get_parsed_content("nifti_channel_dim", default=None)

        def count(item: Any) -> int:
            return count_slices(item.source, series_uid=item.series_uid or None, nifti_channel_dim=channel_dim)

        start = time.perf_counter()
        from medseg.readers import release_files

        try:
            with FileProgress(len(inputs), disable=not progress) as bar, quiet_constant_images(), \
                    _logger_level("tifffile", logging.CRITICAL):  # a corrupt TIFF is reported once, per input
                evaluator.add_event_handler(Events.ITERATION_COMPLETED,
                                            lambda e: bar.slice_done(e.state.iteration, e.state.epoch_length))
                result = run_batch(
                    inputs, ignored, segment,
                    paths_for=lambda item, n: writer.paths_for(item.rel, item.format, n, item.source),
                    count=count, manifest=out / "manifest.csv", overwrite=overwrite, on_abort=writer.abort,
                    progress=bar, record=record,
                )
        finally:
            release_files()  # no input stays open (or locked, on Windows) after the batch
        seconds = time.perf_counter() - start
        slices = sum(r.slices for r in result.rows if r.status == "ok")
        return {
            "inputs": len(inputs),
            "ok": result.count("ok"),
            "skipped": result.count("skipped"),
            "failed": result.count("failed"),
            "ignored": result.count("ignored"),
            "slices": slices,
            "wall_seconds": round(seconds, 2),
            "slices_per_second": round(slices / seconds, 3) if seconds > 0 and slices else None,
            "output_dir": str(out),
            "manifest": str(out / "manifest.csv"),
            "failures": [r.message for r in result.failures],
        }
