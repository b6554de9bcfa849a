"""MLflow bookkeeping of a training: its store, run name and params; reopening, retiring, closing runs; evaluations."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.bundle import literal, worked_out, written
from medseg.errors import MedsegError, brief, causes, describe_os_failure
from medseg.runfolder import folders_made_for


def _params_beside(params: dict, logged: dict) -> dict:
    """``params`` to log to a run that holds ``logged``: a value changed since is logged as ``KEY.resumeN``."""
    out = {}
    for key, value in params.items():
        if key == "output_dir" and key in logged:
            continue  # the same folder, perhaps logged as a relative path by an earlier version
        if key in logged and logged[key] != str(value):
            n = 1
            while f"{key}.resume{n}" in logged and logged[f"{key}.resume{n}"] != str(value):
                n += 1
            key = f"{key}.resume{n}"
        out[key] = value
    return out


def _run_to_continue(tracking_uri: str, experiment: str, record: dict, output_dir: Path, own_store: bool) -> Any:
    """The MLflow run a resumed training in ``output_dir`` continues, from its ``config.json``'s tracking
    ``record``: the run of its recorded id when it is this folder's (:func:`_is_this_folders`), or for a run
    recorded before ids were (its name alone) the newest run of that name logged from this folder; either
    only when it is in ``experiment`` and not deleted. ``None``: the training starts a run of its own (a run
    folder copied beside its original, another store given now, a run deleted, a run started untracked)."""
    import mlflow

    run_id, run_name = written(record.get("run_id")), written(record.get("run_name"))
    by_id = isinstance(run_id, str) and bool(run_id)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        if by_id:
            candidates = [client.get_run(run_id)]
        elif isinstance(run_name, str) and run_name:
            candidates = sorted(_runs_named(tracking_uri, experiment, run_name),
                                key=lambda r: r.info.start_time or 0, reverse=True)
        else:
            return None
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for a run it does not hold
        if _store_unwell(err):  # not "no such run": a new run now would split the training's record in two
            raise MedsegError(f"{tracking_uri}: the MLflow store failed while looking up the run to continue "
                              f"({brief(str(err).splitlines()[0]) if str(err) else type(err).__name__}); resume "
                              "again once it answers, or with --no-tracking") from err
        return None
    for run in candidates:  # a name is no one folder's: without an id, only a run logged from this folder
        if run.info.experiment_id == found.experiment_id and run.info.lifecycle_stage == "active" and \
                (_is_this_folders(run, output_dir, own_store) if by_id else _same_folder(run, output_dir, own_store)):
            return run  # tagged with this folder once it is open (note_run_id)
    return None


def _store_unwell(err: BaseException) -> bool:
    """Whether ``err``, raised looking a run up, is the store failing (unreachable, erring inside, overloaded)
    rather than answering that it holds no such run."""
    from mlflow.exceptions import MlflowException

    from medseg.handlers import store_failure

    answer = next((c for c in causes(err) if isinstance(c, MlflowException)), None)
    if answer is not None:  # the store's own answer: only these say it is not well
        return answer.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
    return store_failure(err)  # unreachable, a network or database error


def _is_this_folders(run: Any, output_dir: Path, own_store: bool) -> bool:
    """Whether ``run`` is the run of the training folder ``output_dir``: in the folder's own store, or logged
    from it (:data:`FOLDER_TAG`, else the ``output_dir`` param), or from a folder that is gone or that now
    records another run (this folder, moved since). A folder that still records the run is the original of
    a copy, which starts a run of its own."""
    if _same_folder(run, output_dir, own_store):
        return True
    logged = run.data.tags.get(FOLDER_TAG) or run.data.params.get("output_dir")
    if logged is None:
        return False
    if not Path(logged).exists():
        return True
    try:
        there = written(tracking_record(json.loads((Path(logged) / "config.json").read_text(encoding="utf-8")))
                        .get("run_id"))
    except (OSError, ValueError, AttributeError):
        there = None
    return there is not None and there != run.info.run_id


#: The MLflow tag of the folder a run's training now writes into (its ``output_dir`` param is where it started:
#: params cannot change), so that a copy of a moved run folder is told from the folder itself
FOLDER_TAG = "medseg.output_dir"


def _tag_folder(client: Any, run_id: str, output_dir: Path) -> None:
    try:
        client.set_tag(run_id, FOLDER_TAG, str(output_dir.resolve()))
    except Exception as err:  # noqa: BLE001 - tracking is a record of the training, not a reason to stop it
        logging.getLogger(__name__).warning("could not tag the MLflow run with its folder: %s", err)


def _reopen(tracking_uri: str, run: Any) -> tuple[str, int | None] | None:
    """Before a resumed training: when the run it continues finished (``--resume --epochs`` more after a run
    that completed), mark it unfinished (KILLED), so that it is continued (one run, one curve per metric).

    Returns the reopened run's id and end time, for :func:`finish_again` should the resume be refused."""
    import mlflow

    status = mlflow.entities.RunStatus
    if run.info.status != status.to_string(status.FINISHED):
        return None
    try:
        mlflow.MlflowClient(tracking_uri=tracking_uri).set_terminated(run.info.run_id, status.to_string(status.KILLED))
    except Exception as err:  # noqa: BLE001 - tracking is a record of the training, not a reason to stop it
        logging.getLogger(__name__).warning("could not reopen the folder's MLflow run: %s", err)
        return None
    return run.info.run_id, run.info.end_time


def finish_again(settings: dict) -> None:
    """A resume refused before it started: the run :func:`settings` reopened is marked finished again, with its
    own end time (it was left KILLED). Never raises."""
    reopened = settings.get("reopened")
    if not reopened:
        return
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri=settings["configs"]["tracking_uri"]).set_terminated(
            reopened[0], "FINISHED", end_time=reopened[1])
    except Exception as err:  # noqa: BLE001 - the refusal is what the user must see
        logging.getLogger(__name__).warning("could not mark the folder's MLflow run finished again: %s", err)


def _runs_named(tracking_uri: str, experiment: str, name: str | None, unfinished: bool = False) -> list:
    """The runs named ``name``, or all with ``None`` (``unfinished``: those not marked finished)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    finished = mlflow.entities.RunStatus.to_string(mlflow.entities.RunStatus.FINISHED)
    # a server need not list every run
    query = f"attributes.run_name = '{name}'" if name is not None and "'" not in name else ""
    return [r for r in client.search_runs([found.experiment_id], filter_string=query)
            if name in (None, r.info.run_name) and not (unfinished and r.info.status == finished)]


def _same_folder(run: Any, output_dir: Path, own_store: bool = False) -> bool:
    """Whether an MLflow run was logged by a training in ``output_dir`` (by its :data:`FOLDER_TAG`, else its
    ``output_dir`` param, which medseg logs as an absolute path; a run without one is another tool's). In the
    folder's own store (``own_store``) every medseg run is the folder's, wherever the folder was when logged."""
    logged = run.data.tags.get(FOLDER_TAG) or run.data.params.get("output_dir")
    return logged is not None and (own_store or Path(logged).resolve() == output_dir.resolve())


def _run_name(tracking_uri: str, experiment: str, output_dir: Path, own_store: bool = False) -> str:
    """The MLflow run name of a new run of a training in ``output_dir``: the folder's name; when that already
    names a run of another folder (a shared tracking server), with a hash of its path, so that neither
    training takes the other's run."""
    name = _folder_name(output_dir)
    try:
        named = _runs_named(tracking_uri, experiment, name)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for an unreachable store
        full = describe_os_failure(err)  # a full disk or a refused write, not a server to check
        if full:
            raise MedsegError(f"MLflow store {tracking_uri}: {full}") from err
        reason = brief(str(err).splitlines()[0]) if str(err) else type(err).__name__
        raise MedsegError(f"MLflow store {tracking_uri}: cannot be read ({reason}); check that the server runs "
                          "and --tracking-uri, or train with --no-tracking") from err
    if any(not _same_folder(r, output_dir, own_store) for r in named):
        name = f"{name}-{hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:8]}"
    return name


def _folder_name(folder: Path) -> str:
    """The name of ``folder`` as a run name, also for ``.`` or ``..`` (the folder they stand for)."""
    return Path(os.path.abspath(folder)).name or "run"


def retire_unfinished_runs(configs: dict, output_dir: Path, own_store: bool = False) -> None:
    """Before a new (not resumed) training: the runs this folder left unfinished (stopped by Ctrl-C or an
    error) are renamed ``NAME (replaced)``, so that its current run is told apart; one still marked running
    is closed as failed. In the folder's own store that is every unfinished run, also one logged
    under an earlier name of the folder (moved since)."""
    import mlflow

    status = mlflow.entities.RunStatus
    try:
        client = mlflow.MlflowClient(tracking_uri=configs["tracking_uri"])
        for run in _runs_named(configs["tracking_uri"], configs["experiment_name"],
                               None if own_store else configs["run_name"], unfinished=True):
            if not _same_folder(run, output_dir, own_store) or run.info.run_name.endswith(" (replaced)"):
                continue
            if run.info.status == status.to_string(status.RUNNING):
                client.set_terminated(run.info.run_id, status.to_string(status.FAILED))
            client.update_run(run.info.run_id, name=f"{run.info.run_name} (replaced)")
    except Exception as err:  # noqa: BLE001 - tracking is a record of the training, not a reason to stop it
        logging.getLogger(__name__).warning("could not retire the folder's unfinished MLflow runs: %s", err)


def settings(parser: Any, output_dir: Path, tracking_uri: str | None, experiment: str,
                       artifacts: list[str], config_path: Path, resume: bool = False,
                       uri_from: str = "--tracking-uri", record: dict | None = None) -> dict:
    """MONAI's MLflow settings for a training in ``output_dir``: the store (``tracking_uri``, which ``uri_from``
    names in errors; the folder's own SQLite store when ``None``), the run's name and params, the artifacts.
    A resume continues the run its ``config.json``'s tracking ``record`` names (:func:`_run_to_continue`), by
    its id: MONAI's handler would look a run up by its name, which a busy server, a moved folder or the same
    path on another machine makes ambiguous; a new run is opened as one (``new_run``)."""
    from urllib.parse import unquote

    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS
    from monai.utils import path_to_uri

    # a local store: its path unescaped in the URI (MLflow makes the store's folder from the URI undecoded) and
    # its artifacts in mlruns/ beside it, given explicitly (MONAI derives that folder from the URI undecoded, so
    # an escaped space became %2520, a folder of its own)
    store = (output_dir / "mlflow.db" if not tracking_uri else
             Path(unquote(tracking_uri[len("sqlite:///"):])) if tracking_uri.startswith("sqlite:///") else None)
    uri = _local_store_uri(store) if store is not None else str(tracking_uri)
    stray = folders_made_for(Path(uri[len("sqlite:///"):]).parent) if uri.startswith("sqlite:///") else []
    if tracking_uri:
        _check_tracking_uri(uri, uri_from)
    else:
        _follow_moved_store(store)
    settings = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    configs = settings["configs"]
    configs["tracking_uri"] = uri
    if store is not None:
        for handler in ("trainer", "validator"):
            configs[handler]["artifact_location"] = path_to_uri(store.resolve().parent / "mlruns")
    configs["experiment_name"] = experiment
    own_store = store is not None and store.absolute() == (output_dir / "mlflow.db").absolute()
    settings["own_store"] = own_store
    continued = _run_to_continue(uri, experiment, record or {}, output_dir, own_store) if resume else None
    configs["run_name"] = continued.info.run_name if continued is not None else \
        _run_name(configs["tracking_uri"], experiment, output_dir, own_store)
    configs["save_execute_config"] = str(config_path)
    params = _plain_params(parser.get())
    if "output_dir" in params:
        params["output_dir"] = str(output_dir.resolve())  # which folder a run belongs to, from any directory
    if isinstance(params.get("dataset_dir"), str):  # which data, as config.json records it: not as typed
        params["dataset_dir"] = str(Path(params["dataset_dir"]).absolute())
    if continued is not None:
        settings["run_id"] = continued.info.run_id
        for handler in ("trainer", "validator"):
            configs[handler]["run_id"] = continued.info.run_id
        settings["reopened"] = _reopen(uri, continued)
        params = _params_beside(params, continued.data.params)
    else:
        configs["trainer"]["new_run"] = True
    configs["trainer"]["opens_run"] = True
    for handler in ("trainer", "validator"):  # a store that stops answering mid-run does not end the training
        configs[handler]["_target_"] = "medseg.handlers.SteadyMLFlowHandler"
    configs["trainer"]["artifacts"] = [str(config_path), *artifacts]
    configs["trainer"]["experiment_param"] = params
    configs["trainer"]["iteration_log"] = False
    if store is not None and Path(uri[len("sqlite:///"):]) != store.absolute():
        settings["stray_folders"] = stray  # MLflow makes the store's folder from the escaped URI as well
    return settings


def config_settings(settings: dict) -> dict:
    """:func:`settings` as they go into the bundle's config: the texts made of paths and names (the store's URI,
    the run's name, artifacts, params) as :func:`medseg.bundle.literal` values, which MONAI parses back as
    written (a run folder named ``$out`` was run as Python, a param value with ``#`` rewritten)."""
    patched = copy.deepcopy(settings)
    configs = patched["configs"]
    configs["save_execute_config"] = False  # medseg writes config.json itself, atomically, once patched
    for key in ("tracking_uri", "experiment_name", "run_name"):
        if isinstance(configs.get(key), str):
            configs[key] = literal(configs[key])
    for handler in ("trainer", "validator"):
        for key in ("artifact_location", "run_id"):
            if isinstance(configs[handler].get(key), str):
                configs[handler][key] = literal(configs[handler][key])
    trainer = configs["trainer"]
    trainer["artifacts"] = [literal(str(a)) for a in trainer.get("artifacts") or []]
    trainer["experiment_param"] = {k: literal(v) if isinstance(v, str) else v
                                   for k, v in (trainer.get("experiment_param") or {}).items()}
    return patched


#: Config ids whose nested values are the workflow's wiring (engines, data, handlers), not settings to compare
_WIRING = {"_meta_", "imports", "train", "validate", "datalists", "run", "training", "initialize", "load",
           "preprocessing", "postprocessing", "inferer", "loss", "optimizer", "lr_scheduler", "network", "ema",
           "early_stop", "last_checkpoint"}


#: The names MLflow accepts for a param
_MLFLOW_NAME = re.compile(r"[\w./\- ]+")


#: the settings that draw a validation split from the data, which a validation folder (``val_dir``) replaces
_HOLD_OUT = ("val_fraction", "val_count")


def _plain_params(config: dict, limit: int = 100) -> dict[str, Any]:
    """The settings an MLflow run logs as params: the config's plain top-level values, then (up to ``limit``
    params in all, MLflow's batch size) plain lists such as ``patch_size`` and the plain values one level
    inside settings such as ``network_def`` (``network_def.channels``), so that runs differing only there
    can be told apart and compared. With a validation folder (``val_dir``), the share held out of the data
    (``val_fraction``, ``val_count``) is not logged: it was not used."""
    def scalar(value: Any) -> bool:  # a number, flag or word, not an expression or reference
        return isinstance(value, (int, float, str, bool)) and not worked_out(value)

    def plain(value: Any) -> bool:
        return all(map(scalar, value)) if isinstance(value, list) else scalar(value)

    params = {k: written(v) for k, v in config.items() if scalar(v)}
    if config.get("val_dir"):  # a validation folder of its own (or an expression giving one): nothing is held out
        for key in _HOLD_OUT:
            params.pop(key, None)
    nested: dict[str, Any] = {}
    for key, value in config.items():
        if key in _WIRING or str(key).startswith("_"):
            continue
        if isinstance(value, list) and plain(value):
            nested[key] = str(value)
        elif isinstance(value, dict):
            children = {f"{key}.{child}": str(inner) if isinstance(inner, list) else inner
                        for child, inner in value.items()
                        if plain(inner) and (child == "_target_" or not str(child).startswith("_"))}
            if all(_MLFLOW_NAME.fullmatch(name) for name in children):
                nested.update(children)
            else:  # keys MLflow cannot name (colours: "#000000"): the plain part as one param
                kept = {str(k): v for k, v in value.items() if plain(v)}
                if kept:
                    nested[key] = json.dumps(kept, sort_keys=True)
    for key, value in nested.items():
        if len(params) >= limit:
            break
        params[key] = value
    return params


def _local_store_uri(db: Path) -> str:
    """The SQLite URI of a run folder's MLflow store. MLflow creates the store's folder from the URI's path
    without decoding it, so the path goes in as it is unless it holds a character a URL must escape."""
    from monai.utils import path_to_sqlite_uri

    path = str(db.absolute())
    return path_to_sqlite_uri(path) if set(path) & set("%#?") else f"sqlite:///{path}"


def _follow_moved_store(db: Path) -> None:
    """Point a run folder's own MLflow store at the ``mlruns/`` beside it again after the folder was moved or
    copied: the store records its artifact folder as an absolute path, so a run logged in the moved folder
    would write its artifacts into the old one (recreating it), and its earlier runs' artifacts, which
    moved with it, would not be found. Only experiments whose artifacts are an ``mlruns/`` folder (as
    medseg's training creates them) are re-pointed."""
    import sqlite3

    from monai.utils import path_to_uri

    if not db.is_file():
        return
    root = path_to_uri(db.resolve().parent / "mlruns")
    try:
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone():
                return  # an empty store: MLflow sets it up
            for experiment_id, location in con.execute("SELECT experiment_id, artifact_location FROM experiments"):
                if not (location or "").startswith("file:") or not location.endswith("/mlruns") or location == root:
                    continue
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                            (root, experiment_id))
                con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                            "AND substr(artifact_uri, 1, ?) = ?",
                            (root, len(location) + 1, experiment_id, len(location) + 1, location + "/"))
    except sqlite3.Error as err:
        raise MedsegError(f"{db}: cannot update the run folder's MLflow store ({err}); train with --no-tracking, "
                          "or move the store aside") from err


def _check_tracking_uri(uri: str, uri_from: str = "--tracking-uri") -> None:
    """Open a local ``--tracking-uri`` store once before training; a server must accept a connection within
    a few seconds (MLflow's own retries would take minutes to give up)."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "databricks":
        return
    if scheme in ("http", "https"):
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            with socket.create_connection((parts.hostname or "", port), timeout=5):
                pass
        except (OSError, ValueError) as err:
            raise MedsegError(f"{uri_from} {uri}: no MLflow server answers there ({err}); start it, fix the "
                              "address, or train with --no-tracking") from err
        _check_server_answers(uri, uri_from)
        return
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):  # HOST:PORT, the scheme left out
        raise MedsegError(f"{uri_from} {uri}: a server address without its scheme, which MLflow would take for a "
                          f"folder; give http://{uri}")
    from mlflow import MlflowClient

    try:
        with _first_open(uri):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for a bad store
        full = describe_os_failure(err)
        if full:
            raise MedsegError(f"{uri_from} {uri}: {full}") from err
        reason = brief(str(err).splitlines()[0]) if str(err) else type(err).__name__
        raise MedsegError(f"{uri_from} {uri}: not a usable MLflow store ({reason}); give a server URL "
                          "(http://HOST:5000) or a database such as sqlite:///PATH/mlflow.db") from err


@contextlib.contextmanager
def _first_open(uri: str):
    """Hold an exclusive ``flock`` on a local SQLite store's file while it is opened: MLflow creates a new
    store's tables on first use, and trainings started together on one new store (an ensemble's seeds) raced
    there, all but one failing. SQLite's own locks are POSIX locks, which ``flock`` leaves alone on local
    filesystems (on NFS, Linux emulates ``flock`` with POSIX locks, which SQLite's own closing may release:
    there the lock narrows the race without closing it). Nothing is held for other stores, an in-memory
    database, a store in a folder that does not exist, where ``fcntl`` is missing, or where the filesystem
    refuses the lock."""
    try:
        import fcntl

        from sqlalchemy.engine import make_url

        database = make_url(uri).database if uri.startswith("sqlite:") else None
    except Exception:  # noqa: BLE001 - no fcntl (Windows), or a URI that MLflow will judge
        database = None
    path = Path(database) if database and database != ":memory:" and not database.startswith("file:") else None
    fd = None
    if path is not None and path.parent.is_dir():
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # an empty file is an empty SQLite database
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a read-only folder (MLflow says so), a filesystem without locks: go on unlocked
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # frees the lock


#: Seconds a tracking server that accepted the connection has to answer a first request
SERVER_ANSWER_SECONDS = 10.0


def _check_server_answers(uri: str, uri_from: str = "--tracking-uri") -> None:
    """A server that accepts connections must also answer a request (any HTTP status will do) within
    :data:`SERVER_ANSWER_SECONDS`: a hung one would stall the training at its first MLflow call for minutes."""
    import socket
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                    timeout=SERVER_ANSWER_SECONDS):
            return
    except urllib.error.HTTPError:
        return  # an answer: what it means (404, 401, ...) is MLflow's to report
    except OSError as err:  # URLError included
        stalled = isinstance(err, socket.timeout) or isinstance(getattr(err, "reason", None), socket.timeout)
        if not stalled:
            return  # anything else (TLS, a proxy, a reset): MLflow reports it in its own words
        raise MedsegError(f"{uri_from} {uri}: the server accepted the connection but sent no answer within "
                          f"{SERVER_ANSWER_SECONDS:g} s; check that it is an MLflow server that runs, or train "
                          "with --no-tracking") from err


def _store_elsewhere(config: dict) -> str | None:
    """The MLflow store the run of ``config`` (its ``config.json``) logged to, when it was not its folder's own
    (a server, a shared database); ``None``: the folder's own store (also for a folder moved since), or a run
    trained without tracking."""
    from urllib.parse import quote

    record = tracking_record(config)
    uri, folder = written(record.get("tracking_uri")), written(config.get("output_dir"))
    if not isinstance(uri, str) or not uri or worked_out(uri) or record.get("tracking_store") == "folder":
        return None
    if record.get("tracking_store") != "given" and isinstance(folder, str) and uri.startswith("sqlite:") and (
            uri == _local_store_uri(Path(folder) / "mlflow.db")
            or uri.endswith((f"/{Path(folder).name}/mlflow.db", f"/{quote(Path(folder).name)}/mlflow.db"))):
        return None  # the folder's own, for a run recorded without tracking_store (path relative, or moved)
    return uri


def say_store_left(config: dict) -> None:
    """For ``--overwrite`` without ``--tracking-uri``: a warning when the training replaced (its ``config``) was
    tracked in a store other than its folder's own, where this one does not log (a new training takes the default
    store) and where the replaced run, if unfinished, is not marked replaced."""
    uri = _store_elsewhere(config)
    if uri is not None:
        logging.getLogger(__name__).warning(
            "--overwrite: the training replaced was tracked in %s; this one logs to the folder's own store (give "
            "--tracking-uri %s to log where it did)", uri, uri)


def recorded_tracking_uri(config: dict) -> str | None:
    """The MLflow store a run to be resumed logged to, when it was not its folder's own (a server, a shared
    database): the resumed training continues its run there. ``None``: the folder's own store (also for a
    folder moved since), or a run trained without tracking."""
    uri = _store_elsewhere(config)
    if uri is not None:
        logging.getLogger(__name__).info("--resume: logging to the run's own MLflow store %s (from its config.json); "
                                         "give --tracking-uri to log elsewhere", uri)
    return uri


def _training_run(checkpoint: str | os.PathLike) -> tuple[str, str, Path] | None:
    """The MLflow store and run id of the tracked training that wrote ``checkpoint``, and its run folder, from the
    ``config.json`` beside it; ``None`` for weights without one, a training run with ``--no-tracking``, or a
    folder copied without its store."""
    from medseg.runfolder import run_file

    path = run_file(checkpoint, "config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    run_id = written(tracking_record(config).get("run_id")) if isinstance(config, dict) else None
    if not isinstance(run_id, str) or not run_id:
        return None
    uri = _store_elsewhere(config)
    if uri is None:
        db = path.parent / "mlflow.db"
        if not db.is_file():
            return None
        _follow_moved_store(db)
        uri = _local_store_uri(db)
    return uri, run_id, path.parent


def _metric_word(text: str) -> str:
    """``text`` as one part of an MLflow metric's or tag's name: what MLflow refuses replaced by ``_`` (also a
    part that reads as a path's ``.`` or ``..``, such as the group of images at the top of a data folder)."""
    word = re.sub(r"[^\w.\- ]", "_", text)
    return "_" if word.strip(".") == "" else word


def _metrics_of(summary: dict, prefix: str) -> dict[str, float]:
    """The numbers of an evaluation's summary as MLflow metrics named ``PREFIX/KEY`` (a group's
    ``PREFIX/GROUP/KEY``); a score the images did not give (``None``, NaN) is logged as NaN, so that an
    earlier evaluation's value does not stand for it."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, dict) and key == "groups":
            for group, values in value.items():
                out.update(_metrics_of(values, f"{prefix}/{_metric_word(str(group))}"))
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            out[f"{prefix}/{_metric_word(key)}"] = math.nan if value is None else float(value)
    return out


#: MLflow's HTTP settings where a server is asked once (an evaluation logged, a run closed after a second
#: Ctrl-C): one try, a short wait, where its defaults retry a server that fails for minutes
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _check_store_there(uri: str) -> None:
    """A SQLite store that is not there (moved, deleted) is not made anew, empty, by logging to it."""
    from urllib.parse import unquote

    if uri.lower().startswith("sqlite:///"):
        path = Path(unquote(uri[len("sqlite:///"):]))
        if not path.is_file():
            raise MedsegError(f"its store {path} is not there (moved or deleted since the training)")
    elif uri.split(":", 1)[0].lower() in ("http", "https"):
        _check_tracking_uri(uri, "the training's MLflow server")


def _report_place(report: Path, run_folder: Path) -> str:
    """Where an evaluation's report lies, as logged: relative to the run folder when inside it (so that it stays
    the same place when the folder moves), else its absolute path."""
    report, run_folder = report.resolve(), run_folder.resolve()
    return report.relative_to(run_folder).as_posix() if report.is_relative_to(run_folder) else report.as_posix()


def _same_report(logged: str, place: str) -> bool:
    """Whether a report logged from ``logged`` (:func:`_report_place`) is the one now at ``place``: the same place,
    or a folder outside the run folder that holds no report any more (moved with the run folder, say)."""
    return logged == place or (Path(logged).is_absolute() and not (Path(logged) / "summary.json").is_file())


def log_evaluation(checkpoint: str | os.PathLike, report_dir: str | os.PathLike) -> str | None:
    """Log the evaluation of ``checkpoint`` reported in ``report_dir`` to the MLflow run of the training that
    wrote it, where that training was tracked: ``metrics.csv`` and ``summary.json`` as artifacts under
    ``FOLDER/`` (FOLDER: the name of the report's folder, ``eval`` by default), the summary's means as metrics
    named ``FOLDER/KEY`` (a group's as ``FOLDER/GROUP/KEY``), and the report's folder (relative to the run
    folder when inside it), checkpoint digest, data, split and TTA as tags ``FOLDER/output_dir`` etc.

    Another report already logged under the same FOLDER from another folder that is still there is not
    replaced: a warning asks for another folder name. Returns the run's id, or ``None`` where nothing was
    logged. A store that cannot be reached or written is one warning: the report on disk is the evaluation's
    result."""
    folder = Path(report_dir)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # a bundle without medseg's report: nothing to log
    prefix = _metric_word(folder.resolve().name)
    run = summary.get("run") if isinstance(summary, dict) and isinstance(summary.get("run"), dict) else {}
    checkpoints = run.get("checkpoints") if isinstance(run.get("checkpoints"), list) else []
    tags = {"checkpoint": " ".join(str(c.get("sha256", "")) for c in checkpoints if isinstance(c, dict)),
            **{key: str(run[key]) for key in ("data_dir", "split", "tta") if key in run}}
    uri, run_id = "", ""
    log = logging.getLogger(__name__)
    try:
        found = _training_run(checkpoint)  # a store that cannot be set up again after a move fails in here
        if found is None or not isinstance(summary, dict):
            return None
        uri, run_id, run_folder = found
        tags["output_dir"] = _report_place(folder, run_folder)
        import mlflow
        from mlflow.entities import Metric, RunTag
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        with _environment(**_QUICK_HTTP):
            _check_store_there(uri)
            client = mlflow.MlflowClient(tracking_uri=uri)
            logged = client.get_run(run_id)
            if logged.info.lifecycle_stage != "active":
                raise MedsegError("the run was deleted")
            other = logged.data.tags.get(f"{prefix}/output_dir")
            if other is not None and not _same_report(other, tags["output_dir"]):
                log.warning("%s: not logged to the training's MLflow run %s, whose '%s' metrics and files are the "
                            "report in %s; give --output a folder of another name to log this one beside it",
                            folder, run_id, prefix, run_folder / other)
                return None
            # the run's artifact folder as the store says now (MLflow's client keeps the one it first saw, per run
            # id and process: the old place of a run folder moved since a training in the same process); with
            # the store's URI, for a server that keeps the files itself (mlflow-artifacts:)
            repository = get_artifact_repository(logged.info.artifact_uri, tracking_uri=uri)
            for name in ("metrics.csv", "summary.json"):
                repository.log_artifact(str(folder / name), prefix)
            now = int(time.time() * 1000)
            metrics = _metrics_of({k: v for k, v in summary.items() if k != "run"}, prefix)
            # an earlier report of this folder's scores that this one does not give (fewer groups, other
            # classes): NaN, as a score the images did not give, rather than the old value beside the new ones
            metrics.update({k: math.nan for k in logged.data.metrics
                            if k.startswith(f"{prefix}/") and k not in metrics})
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                             tags=[RunTag(f"{prefix}/{key}", value[:5000]) for key, value in tags.items()])
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; the report is written
        reason = brief(str(err).splitlines()[0]) if str(err) else type(err).__name__
        if isinstance(err, MedsegError):  # what happened, without the advice a training is given
            reason = reason.split("; ")[0]
        log.warning("the report is in %s, but logging it to the training's MLflow run%s failed: %s; pass "
                    "--no-tracking to leave MLflow out", folder, f" {run_id} ({uri})" if run_id else "", reason)
        return None
    return run_id


def uri_in_environment(uri: str) -> Any:
    """``MLFLOW_TRACKING_URI`` set to ``uri`` for the block, as it was after it: MONAI's MLflow handler prefers the
    variable to the URI it is given, so a variable set for another store would split a run between two."""
    return _environment(MLFLOW_TRACKING_URI=uri)


#: What a run's config.json says of where the run is tracked, under :data:`RECORD_KEY` (kept by a resume with
#: --no-tracking): read by ``--resume`` alone. Not as top-level ids, which MONAI's ``--tracking`` would take up
#: (a plain ``monai.bundle run`` of the file then logged into the recorded run's store).
TRACKING_RECORD = ("tracking_uri", "tracking_store", "experiment_name", "run_name", "run_id")
RECORD_KEY = "_tracking_"


def tracking_record(config: dict) -> dict:
    """Where the run of ``config`` (its ``config.json``) is tracked: :data:`TRACKING_RECORD`'s values (as written,
    also from a record of earlier versions, which held them as top-level ids and the MLflow handlers)."""
    record = config.get(RECORD_KEY)
    if isinstance(record, dict):
        return {k: record[k] for k in TRACKING_RECORD if k in record}
    return {k: config[k] for k in TRACKING_RECORD if k in config}


def record_of(settings: dict) -> dict:
    """The tracking record of a training tracked with :func:`settings`, for its config.json."""
    configs = settings["configs"]
    return {"tracking_uri": literal(configs["tracking_uri"]),
            "tracking_store": "folder" if settings["own_store"] else "given",
            "experiment_name": literal(configs["experiment_name"]), "run_name": literal(configs["run_name"]),
            **({"run_id": literal(settings["run_id"])} if settings.get("run_id") else {})}


def remember_run_id(config_path: Path, run_id: str) -> None:
    """Write the id of the MLflow run a training logs to into its ``config.json``'s record (once the run is
    open), so that ``--resume`` continues that run by its id. Never raises."""
    from medseg.io import atomic_output

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        record = config.get(RECORD_KEY)
        if not isinstance(record, dict) or written(record.get("run_id")) == run_id:
            return
        record["run_id"] = literal(run_id)
        with atomic_output(config_path) as tmp:
            tmp.write_text(json.dumps(config), encoding="utf-8")  # as MONAI's export_config_file writes it
    except (OSError, ValueError) as err:  # a resume then finds the run by its name and folder
        logging.getLogger(__name__).warning("%s: could not record the MLflow run's id (%s)", config_path, err)


def link(handlers: Sequence[Any]) -> None:
    """Join the MLflow handlers of one training (the trainer's and the evaluator's, one store): a failure of
    one silences all, so a store gone away costs one stall of MLflow's retries, not one per handler and call."""
    shared: list = []
    for handler in handlers:
        if hasattr(handler, "failed"):
            handler.failed = shared


def close_runs(handlers: Sequence[Any], status: str, at_once: bool = False) -> None:
    """End the MLflow runs ``handlers`` hold open as ``status`` (``FAILED``, ``KILLED``); never raises.
    ``at_once`` (a second Ctrl-C): a server is asked once, without MLflow's minutes of retries."""
    closed = set()  # the evaluator's handler logs to the trainer's run: one request for both
    with _environment(**(_QUICK_HTTP if at_once else {})):
        for handler in handlers:
            run = getattr(handler, "cur_run", None)
            if run is None or getattr(handler, "failed", None):
                continue
            if run.info.run_id in closed:
                handler.cur_run = None
                continue
            closed.add(run.info.run_id)
            handler.run_finish_status = status
            try:
                handler.close()
            except Exception as err:  # noqa: BLE001 - the training's own error matters more than the tracking's
                logging.getLogger(__name__).warning("could not close the MLflow run: %s", err)


@contextlib.contextmanager
def _environment(**values: str) -> Any:
    """The environment variables ``values`` set for the block, each as it was after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def note_run_id(trainer: Any, handlers: Sequence[Any], config_path: Path | None = None) -> list[str]:
    """The id of the MLflow run the trainer's handler (``handlers[0]``) opens, once it has opened it (a list
    filled at start): the run the other handlers (the evaluator's) log to, rather than one they look up by
    name, and written into ``config_path`` (:func:`remember_run_id`)."""
    from ignite.engine import Events

    ids: list[str] = []

    def note(_: Any) -> None:
        run = getattr(handlers[0], "cur_run", None) if handlers else None
        if run is not None:
            ids.append(run.info.run_id)
            for other in handlers[1:]:
                if hasattr(other, "run_id") and getattr(other, "cur_run", None) is None:
                    other.run_id = run.info.run_id
            if config_path is not None:
                remember_run_id(config_path, run.info.run_id)
                if not getattr(handlers[0], "failed", None):
                    _tag_folder(handlers[0].client, run.info.run_id, config_path.parent)

    trainer.add_event_handler(Events.STARTED, note)  # after the handler's own start, attached with the trainer
    return ids


def _log_late_artifacts(configs: dict, run_ids: Sequence[str], paths: Sequence[Path]) -> None:
    """Log ``paths`` to this training's MLflow run (its handler has closed the run by now): the run noted at
    the start, else the newest run of this training's name."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=configs["tracking_uri"])
    run_id = run_ids[-1] if run_ids else None
    if run_id is None:
        runs = _runs_named(configs["tracking_uri"], configs["experiment_name"], configs["run_name"])
        run_id = max(runs, key=lambda r: r.info.start_time).info.run_id if runs else None
    if run_id is not None:
        for path in paths:
            client.log_artifact(run_id, str(path))


def log_late_artifacts_or_warn(configs: dict, run_ids: Sequence[str], paths: Sequence[Path]) -> None:
    """:func:`_log_late_artifacts`; a tracking failure at the end of a training is a warning, not its end."""
    try:
        _log_late_artifacts(configs, run_ids, paths)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; the training itself is done
        logging.getLogger(__name__).warning("could not log %s to MLflow: %s", ", ".join(map(str, paths)), err)
