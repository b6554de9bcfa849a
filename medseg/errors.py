"""Typed errors for bad user input: each message names the file or key and the fix."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterator


def brief(text: object, limit: int = 160) -> str:
    """``text`` on one line, whitespace collapsed, cut at a word to at most ``limit`` characters (``...`` added)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3].rsplit(" ", 1)[0] + " ..."

class MedsegError(Exception):
    """Base class for errors caused by user input; the CLI prints them as one line and exits 1."""


class DataError(MedsegError):
    """A data folder, image or label is missing or malformed."""


class BundleError(MedsegError):
    """A bundle path, config file or config override is invalid."""


class CheckpointError(MedsegError):
    """A checkpoint is missing or does not fit the bundle's network."""


class TrainingDiverged(MedsegError):
    """The loss or the weights of a training became NaN or infinite."""


def check_finite_output(values: object) -> None:
    """Raise :class:`CheckpointError` when a network's output holds NaN or infinite values (broken weights),
    before a watershed meets them: scikit-image's loops, or corrupts memory, on NaN."""
    import numpy as np

    if not np.isfinite(np.asarray(values)).all():
        raise CheckpointError("the network's output holds NaN or infinite values: its weights are broken (a "
                              "diverged training), or the input's values are too large to compute with; use another "
                              "checkpoint (or train again with a lower learning rate), or rescale the input")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler ending the job): handled as Ctrl-C, but the CLI exits
    with 143 (128 + 15), the code a job killed by SIGTERM has, not Ctrl-C's 130."""


class ConfigValueError(BundleError, ValueError):
    """A bundle config value is out of its range (also a ``ValueError`` for library callers)."""


def causes(err: BaseException | None) -> list[BaseException]:
    """``err`` and what caused it, outermost first (each once: chains may loop)."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def find_user_error(err: BaseException | None) -> MedsegError | None:
    """The first MedsegError in ``err``'s cause chain (MONAI and Ignite wrap errors raised inside them)."""
    return next((e for e in causes(err) if isinstance(e, MedsegError)), None)


#: The errno values of a write refused for want of space: a full disk, a quota, a file-size limit.
NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})


def describe_os_failure(err: BaseException | None, go_on: str = "run again") -> str | None:
    """One line for a file the command could not write or read for want of space or permission (a full
    disk, a quota, a file-size limit, a read-only or locked folder), wherever in a workflow it happened:
    the file and the fix, then ``go_on`` (how to carry on once it is fixed); ``None`` for other failures."""
    access = {errno.EACCES, errno.EPERM, errno.EROFS}
    chain = causes(err)
    if any(_database_full(e) for e in chain):  # MLflow's SQLite store: no errno, no file name
        return ("the tracking database cannot write (database or disk is full); free disk space, or raise the "
                f"quota, and {go_on} (or turn tracking off with --no-tracking)")
    found = next((e for e in chain if isinstance(e, OSError) and e.errno in NO_SPACE | access), None)
    if found is None:
        return None
    where = f"{found.filename}: " if found.filename else ""
    if found.errno in NO_SPACE:
        return (f"{where}cannot write ({found.strerror}); free disk space, or raise the quota or file-size limit, "
                f"and {go_on}")
    return f"{where}{found.strerror}; check the permissions of the file and its folder" + \
        ("" if go_on == "run again" else f", then {go_on}")


def _database_full(err: BaseException) -> bool:
    """An SQLite write refused for want of space (``SQLITE_FULL``), as MLflow's default store meets it."""
    try:
        import sqlite3
    except ImportError:  # a Python built without it has no SQLite store either
        return False
    err = getattr(err, "orig", None) or err  # SQLAlchemy keeps the driver's error there
    return isinstance(err, sqlite3.Error) and (getattr(err, "sqlite_errorcode", None) == 13  # SQLITE_FULL
                                               or "database or disk is full" in str(err))


#: What lowers the memory a command needs, by command (the CLI's names), for :func:`describe_memory_failure`
MEMORY_ADVICE = {
    "train": "make the batch or the crops smaller with --set (batch_size, or images_per_batch and "
             "samples_per_image for isbi_em; patch_size), or validate large images window by window (a lower "
             "whole_max_pixels)",
    "evaluate": "lower --set whole_max_pixels (larger images then go window by window) or "
                "validate#inferer#sw_batch_size",
    "infer": "lower --set whole_max_pixels (larger images then go window by window) or sw_batch_size (for "
             "isbi_em, -s close_contours=false saves the most on a large slice)",
}

#: How CUDA libraries say their memory ran out where torch raises no ``OutOfMemoryError`` of its own
_GPU_MEMORY_WORDS = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(err: BaseException | None) -> tuple[str, BaseException] | None:
    """``("gpu" | "cpu", the error)`` when ``err`` or an error it was raised from says memory ran out: torch's
    ``OutOfMemoryError`` (CUDA's) or a CUDA library's words for it, a ``MemoryError`` (numpy's too) or the CPU
    allocator's refusal; else ``None``. Only explicit causes count (MONAI wraps with ``from``): an error raised
    while another was handled is not that error."""
    while err is not None:
        text = str(err)
        if type(err).__name__ == "OutOfMemoryError" or any(w in text for w in _GPU_MEMORY_WORDS):
            return "gpu", err  # torch.OutOfMemoryError, without importing torch
        if isinstance(err, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text:
            return "cpu", err
        err = err.__cause__
    return None


def describe_memory_failure(err: BaseException | None, command: str | None = None) -> str | None:
    """One line for a run that ran out of memory (see :func:`out_of_memory`): which memory, torch's or numpy's
    words, and what lowers the need (:data:`MEMORY_ADVICE` of ``command``); ``None`` for other failures."""
    found = out_of_memory(err)
    if found is None:
        return None
    kind, cause = found
    detail = brief(str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__, 140)
    advice = MEMORY_ADVICE.get(command or "", "give it less to hold at once")
    other = "or use --device cpu" if kind == "gpu" else "or free memory on the machine"
    return f"out of {'GPU ' if kind == 'gpu' else ''}memory ({detail}); {advice}, {other}"


_CONFIG_FAILURES = ("Failed to instantiate component", "Failed to evaluate ConfigExpression")


def describe_config_failure(err: BaseException | None,
                            where: str = "with --set and in overlays (--debug shows the traceback)") -> str | None:
    """One line for a failure MONAI reports while building a config item (a value no component takes, such
    as ``batch_size=0``): the innermost error and what was being built; ``None`` for other failures.
    ``where`` says where the values to check were given (the CLI's options by default)."""
    chain = causes(err)
    building = next((e for e in chain if str(e).startswith(_CONFIG_FAILURES)), None)
    if building is None:
        return None
    inner = chain[-1]
    what = str(building).splitlines()[0]
    what = what.split(" with keywords")[0].replace("Failed to instantiate component", "building").replace(
        "Failed to evaluate ConfigExpression", "evaluating").strip(": ")
    reason = brief(inner, 200) if inner is not building else ""
    found = f"{type(inner).__name__}: {reason}" if reason else type(inner).__name__
    return f"a config value does not work ({found}; {what}); check the values given {where}"


#: What Ignite's engines and MONAI's ``StatsHandler`` log (the latter with the traceback) of an exception they
#: are about to re-raise; the CLI reports that exception once, in one line (``--debug`` keeps these logs)
_RERAISE_LOGS = ("Current run is terminating due to exception", "Engine run is terminating due to exception")


class _UserErrorLogFilter(logging.Filter):
    """Drops log records about a user error or a write refused for space or permission, and the engines' logs
    of an exception on its way out: engines (and MLflow's store) log each exception they re-raise, with its
    traceback, and the CLI reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_RERAISE_LOGS) or (record.exc_info and message.startswith("Exception: ")):
            return False
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        logged = record.exc_info[1] if record.exc_info else None  # a warning logged while handling one stays
        return find_user_error(exc) is None and describe_os_failure(logged) is None


_LOG_FILTER = _UserErrorLogFilter()
_show_user_error_logs = False


def show_user_error_logs(show: bool = True) -> None:
    """Keep engines' logs of user errors (the CLI's ``--debug``)."""
    global _show_user_error_logs
    _show_user_error_logs = bool(show)


@contextlib.contextmanager
def quiet_user_error_logs() -> Iterator[None]:
    """While a workflow runs, filter user errors out of the logs of the loggers that exist when it starts
    (enter once the engines are built); the filters are removed again at the end."""
    if _show_user_error_logs:
        yield
        return
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger) and _LOG_FILTER not in lg.filters]
    for logger in loggers:
        logger.addFilter(_LOG_FILTER)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_LOG_FILTER)
