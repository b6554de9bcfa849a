"""A training's run folder: what a new or resumed training may do with it, and which of its settings reruns use."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from medseg.bundle import worked_out, written
from medseg.errors import BundleError, CheckpointError, ConfigValueError, DataError


def folders_made_for(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would create, deepest first."""
    made = []
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    return made


def remove_if_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


#: Files of a finished or stopped training that a new training in the same folder would mix with its own.
_TRAINED_FILES = ("model.pt", "last_checkpoint_epoch=*.pt", "history.json", "curves.png", "train_summary.json")


def trained_files(out: Path) -> list[Path]:
    return sorted(p for pattern in _TRAINED_FILES for p in out.glob(pattern) if p.is_file())


def last_checkpoint(output_dir: Path) -> Path:
    existing = [p for p in output_dir.glob("last_checkpoint_epoch=*.pt") if p.is_file()]
    if not existing:
        how = "--overwrite instead of --resume" if trained_files(output_dir) else "without --resume"
        raise CheckpointError(f"{output_dir}: no last checkpoint to resume from; start anew {how}")
    return max(existing, key=lambda p: p.stat().st_mtime)


_UNREADABLE = object()


def run_file(checkpoint: str | os.PathLike, name: str) -> Path:
    """The file ``name`` (``config.json``, ``split.json``) of the run a checkpoint belongs to: beside it, or, for a
    link to a run's ``model.pt``, beside the file it links to (``name`` beside the link when neither exists)."""
    here = Path(checkpoint).parent / name
    if here.is_file():
        return here
    there = Path(checkpoint).resolve().parent / name
    return there if there.is_file() else here


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return _UNREADABLE


def _has(value: Any, *keys: str) -> bool:
    return isinstance(value, dict) and all(k in value for k in keys)


#: The records a training writes, each with how to tell one a training wrote (``curves.png`` goes with them):
#: all the keys it always holds, so that a data set's own split or another tool's history is not taken for one.
_RECORDS = {
    "config.json": lambda v: _has(v, "_meta_", "dataset_dir", "output_dir", "network_def"),
    "split.json": lambda v: _has(v, "train", "val", "data_dir"),
    "history.json": lambda v: _has(v, "epoch", "train_loss", "val_epoch", "val"),
    "train_summary.json": lambda v: _has(v, "best_metric", "best_metric_epoch", "key_metric", "epochs"),
}


def foreign_files(out: Path, weights: bool = False) -> list[str]:
    """Files in ``out`` with the names a training writes that no training wrote (a folder's own ``config.json``,
    a data set's split, another tool's history): a training would replace them. An empty file counts as a
    training's whose writing was cut short, and so, beside trained ``weights``, does one that cannot be read
    (a damaged record of the run); ``curves.png`` counts as a training's beside one of its records or weights."""
    foreign, ours = [], weights
    for name, is_record in _RECORDS.items():
        path = out / name
        if not os.path.lexists(path):
            continue
        if path.is_file() and path.stat().st_size == 0:
            ours = True
            continue
        value = _read_json(path) if path.is_file() else None
        if is_record(value) or (value is _UNREADABLE and weights):
            ours = True
        else:
            foreign.append(name)
    if os.path.lexists(out / "curves.png") and not (ours and (out / "curves.png").is_file()):
        foreign.append("curves.png")
    return foreign


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """A folder holding trained weights is continued (``resume``) or replaced (``overwrite``), never mixed; files
    of the names a training writes that no training wrote are never replaced."""
    if resume and overwrite:
        raise ConfigValueError("--resume continues the run in --output and --overwrite replaces it: give one")
    if resume:
        last_checkpoint(out)  # nothing to resume is said before the data, split or settings are checked
    weights = [p.name for p in trained_files(out) if p.suffix == ".pt"]
    foreign = foreign_files(out, weights=bool(weights))
    if foreign:
        which = "them" if len(foreign) > 1 else "it"
        raise DataError(f"{out}: holds {', '.join(foreign)}, not written by a medseg training, which a training "
                        f"would replace; move {which}, or choose another --output")
    if weights and not (resume or overwrite):
        raise DataError(f"{out}: holds a trained run ({', '.join(weights)}); continue it with --resume, replace it "
                        "with --overwrite, or choose another --output")


#: What a new training's checks write into the run folder before it starts.
SET_ASIDE = ("split.json", "config.json")


def recover_set_aside(out: Path) -> None:
    """Put back files an ``--overwrite`` or ``--resume`` set aside and could not restore (the process was
    killed during its checks): they belong to the weights still in the folder."""
    for spare in out.glob(".*.replaced"):
        name = spare.name[1:-len(".replaced")]
        if name in SET_ASIDE and spare.is_file():
            os.replace(spare, out / name)


def set_aside(out: Path, names: Sequence[str]) -> list[tuple[Path, Path]]:
    """Copy the files ``names`` of ``out`` aside, for :func:`put_back`."""
    import shutil

    aside = []
    for name in names:
        path = out / name
        if path.is_file():
            spare = path.with_name(f".{name}.replaced")
            shutil.copy2(path, spare)
            aside.append((path, spare))
    return aside


def recorded_run(out: Path) -> dict[str, dict]:
    """The ``config.json`` and ``split.json`` of the run in ``out`` (``{}`` for a file missing or unreadable)."""
    found = {}
    for key, name in (("config", "config.json"), ("split", "split.json")):
        try:
            found[key] = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found[key] = {}
    return found


#: Ids medseg sets for each call (data, run folder, device, the resumed run's own start), never taken from a
#: run's record.
_CALL_SETTINGS = ("dataset_dir", "output_dir", "bundle_root", "device", "amp", "max_epochs", "val_at_start")


def given_by(overrides: dict, overlays: Sequence[Any], parts_of_set: bool = True) -> Callable[[str], bool]:
    """Whether this call's ``--set`` or overlays give an id: the id itself, what holds it, or (with
    ``parts_of_set``) a part of it; without, a part given is applied over the id's value (see
    :func:`medseg.bundle.load_config`). MONAI's ``::`` separator counts as ``#``; an overlay's ``+id`` mapping
    (merged into the id) gives its keys only. An overlay that cannot be read gives nothing here (loading the
    config names it)."""
    from monai.bundle import ConfigParser

    given = {str(k) for k in overrides}
    for overlay in overlays:
        try:
            content = ConfigParser.load_config_file(str(overlay))
        except Exception:  # noqa: BLE001 - json and yaml raise their own kinds; load_config reports the file
            continue
        for key, value in (content or {}).items() if isinstance(content, dict) else ():
            key = str(key)
            if key.startswith("+") and isinstance(value, dict):
                given |= {f"{key[1:]}#{part}" for part in value}
            else:
                given.add(key.lstrip("+"))
    given = {g.replace("::", "#") for g in given}

    def given_now(key: str) -> bool:
        key = key.replace("::", "#")
        return any(g == key or key.startswith(g + "#") or (parts_of_set and g.startswith(key + "#"))
                   for g in given)

    return given_now


def check_resume_bundle(bundle: str | os.PathLike, config: dict, out: Path) -> None:
    """A run is resumed with the bundle that started it (the name in its ``config.json``'s ``_meta_``), else its
    settings, data layout and classes would be another bundle's."""
    own = _bundle_name(Path(bundle) / "configs" / "metadata.json")
    meta = config.get("_meta_") if isinstance(config, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if own and name and name != own:
        where = _bundle_place(config.get("bundle_root"), out / "model.pt")
        raise ConfigValueError(f"{out / 'config.json'}: the run was started with the bundle '{name}'{where}, not "
                               f"this one, '{own}'; resume it with that bundle, or train this one into another "
                               "--output")


def resume_settings(parser: Any, config: dict, overrides: dict, overlays: Sequence[str]) -> None:
    """A resumed run keeps the values it was trained with (from its overlays and ``--set``) where this call does
    not give them: a value of the run's ``config.json`` that differs from the bundle's is put back, and said."""
    given_now = given_by(overrides, overlays)
    changed = {k: v for k, v in _plain_differences(config, parser.get()).items()
               if not given_now(k) and k.split("#")[0] not in _CALL_SETTINGS}
    for key, value in changed.items():
        parser[key] = value
    if changed:
        logging.getLogger(__name__).warning(
            "--resume: continuing with the run's own %s (from its config.json); give --set to change them",
            ", ".join(f"{k}={_as_set(v)}" for k, v in changed.items()))


#: Ids of a training's record that ``evaluate`` and ``infer`` never take: the call's own data, folders and device,
#: whether to average rotations (``--tta``), and the workflow's own mechanics.
_NOT_TAKEN = (*_CALL_SETTINGS, "val_dir", "tta", "imports", "initialize", "run", "network")


class TrainedSettings(NamedTuple):
    """What :func:`training_settings` found: the values to use (config ids -> config content) and the records
    they came from."""

    values: dict[str, Any]
    sources: tuple[str, ...] = ()

    def say(self, checkpoints: Sequence[str | os.PathLike] = ()) -> None:
        """One warning line naming the values taken and their records (nothing when none was taken, or when one
        of ``checkpoints`` is missing: its own error comes first and alone)."""
        if self.values and all(Path(c).is_file() for c in checkpoints):
            logging.getLogger(__name__).warning(
                "using the training's %s (from %s); give --set (overrides) to change them",
                ", ".join(f"{k}={_as_set(v)}" for k, v in self.values.items()), ", ".join(self.sources))


def _bundle_place(root: Any, checkpoint: str | os.PathLike) -> str:
    """`` at FOLDER``: where a training's record says its bundle was (``bundle_root``, absolute; a relative one
    from the folder the training ran in, as its ``train_summary.json`` records it), or nothing where unknown."""
    if not isinstance(root, str) or not root or worked_out(root):
        return ""
    if not Path(root).is_absolute():
        try:
            summary = json.loads(run_file(checkpoint, "train_summary.json").read_text(encoding="utf-8"))
            ran_in = summary["environment"]["cwd"]
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        if not isinstance(ran_in, str):
            return ""
        root = os.path.normpath(os.path.join(ran_in, root))
    return f" at {root}"


def training_settings(bundle: str | os.PathLike, checkpoints: Sequence[str | os.PathLike], overrides: dict,
                      overlays: Sequence[Any] = ()) -> TrainedSettings:
    """The values the training of ``checkpoints`` gave the bundle's inference settings, for ``evaluate``, ``infer``
    and :class:`medseg.Segmenter` to use too (say them with :meth:`TrainedSettings.say`).

    A checkpoint's training records its config in ``config.json`` beside it. Where a value there differs from the
    bundle's ``train`` config (an overlay or ``--set`` of the training: ``target_diameter``, the loss the prior
    correction follows, ``network_def#channels``, a part added to a component, a whole component of another
    class, an expression) and the id is one of the bundle's inference config, it is taken, unless this call's
    ``--set`` or overlays give it. The call's own data, folders, device and ``tta`` are never taken. A link to a
    checkpoint finds the record beside its target. A checkpoint without a record runs with the bundle's values,
    said in a warning unless it is the bundle's ``models/model.pt``; a record that cannot be read, or of no
    bundle, is said and left out.

    Raises:
        CheckpointError: a record of another bundle's training (its ``_meta_`` name differs): weights of one
            shape can mean other classes.
        ConfigValueError: an ensemble's checkpoints were trained with different values of an id taken (a
            checkpoint without a record counts as trained with the bundle's value).
    """
    from medseg.bundle import default_config

    log = logging.getLogger(__name__)
    own = _bundle_name(Path(bundle) / "configs" / "metadata.json")
    members: list[tuple[str, Path, dict | None]] = []  # checkpoint, its record's path, the record (None: none)
    for checkpoint in dict.fromkeys(str(c) for c in checkpoints):
        path = run_file(checkpoint, "config.json")  # a link to a run's model.pt: the run's record
        record = None
        if not path.is_file() and Path(checkpoint).is_file() and \
                Path(checkpoint).resolve() != (Path(bundle) / "models" / "model.pt").resolve():
            log.warning("%s: no config.json of its training beside it, so it runs with the bundle's settings; keep "
                        "the run's config.json with its model.pt (a model trained with other settings, such as "
                        "another loss or network size, segments otherwise)", checkpoint)
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                problem = None if isinstance(record, dict) else "not a config"
            except OSError as err:
                problem = f"cannot be read ({err.strerror or type(err).__name__})"
            except ValueError as err:
                problem = f"not JSON ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            if problem is None:
                meta = record.get("_meta_")
                name = meta.get("name") if isinstance(meta, dict) else None
                if own and name and name != own:  # weights of the same shape can mean other classes
                    where = _bundle_place(record.get("bundle_root"), checkpoint)
                    raise CheckpointError(f"{checkpoint}: trained with the bundle '{name}'{where} (its {path.name}), "
                                          f"not this one, '{own}'; give that bundle (its weights mean its own "
                                          "classes and settings)")
                if own and name != own:
                    problem = "recorded by a training of no bundle"
            if problem is not None:
                log.warning("%s: %s, so the training's settings are not taken from it", path, problem)
                record = None
        members.append((checkpoint, path, record))
    if all(record is None for *_, record in members):
        return TrainedSettings({})
    try:
        shipped = default_config(bundle, "train")
    except BundleError:  # a bundle that only infers: its inference config is what a training would change
        shipped = default_config(bundle, "infer")
    inference = default_config(bundle, "infer")
    given_now = given_by(overrides, overlays, parts_of_set=False)
    changes = [{key: value for key, value in _recorded_changes(record, shipped).items()
                if key.split("#")[0] in inference and key.split("#")[0] not in _NOT_TAKEN and not given_now(key)}
               if record is not None else {} for *_, record in members]
    values: dict[str, Any] = {}
    for key in dict.fromkeys(k for change in changes for k in change):
        seen = [(change[key] if key in change else _at(shipped, key), checkpoint, path, record is not None)
                for change, (checkpoint, path, record) in zip(changes, members, strict=True)]
        if any(_normal(v) != _normal(seen[0][0]) for v, *_ in seen):
            where = ", ".join(f"{_as_set(v)} in {p}" if has else f"the bundle's {_as_set(v)} for {c} (no record)"
                              for v, c, p, has in seen)
            raise ConfigValueError(f"{key}: the checkpoints were trained with different values ({where}), so they "
                                   f"cannot run as one; give --set {key}=VALUE or checkpoints trained alike")
        values[key] = seen[0][0]
    values = _unless_worked_out_alike(bundle, values, overrides, overlays, inference)
    sources = tuple(str(path) for change, (_, path, _) in zip(changes, members, strict=True)
                    if any(key in values for key in change))
    return TrainedSettings(values, sources)


#: Ids of a training's record that are not how its weights were made: where and on what it ran (data and its
#: layout, folders, device, mixed precision, the CPU's bfloat16, compilation, loader workers, caching, the size
#: validated whole), the workflow's own mechanics (the engines, as the record resolves them), and where it was
#: tracked
_NOT_RECIPE = (*(k for k in _CALL_SETTINGS if k != "max_epochs"), "cpu_bf16", "compile", "num_workers",
               "cache_rate", "whole_max_pixels", "layout", "image_glob", "mask_template", "val_dir", "tta", "imports",
               "initialize", "run", "network", "train", "validate", "tracking_uri", "tracking_store",
               "experiment_name", "run_name", "save_execute_config")


def recipe_changes(bundle: str | os.PathLike, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The training-only ids that the training of ``checkpoint`` (its run's ``config.json``) changed from
    ``bundle``'s training config and that say how its weights were made: epochs, learning rate, weight averaging,
    how labels were drawn (not the data, folders, device, precision or loading, see :data:`_NOT_RECIPE`; not
    the ids ``bundle``'s inference config holds either, which :func:`training_settings` weighs). Empty without
    a readable record of this bundle's training."""
    from medseg.bundle import default_config

    path = run_file(checkpoint, "config.json")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        shipped = default_config(bundle, "train")
        inference = default_config(bundle, "infer")
    except (OSError, ValueError, BundleError):
        return {}
    if not isinstance(record, dict):
        return {}
    own = _bundle_name(Path(bundle) / "configs" / "metadata.json")
    meta = record.get("_meta_")
    if own and (meta.get("name") if isinstance(meta, dict) else None) != own:
        return {}
    return {key: value for key, value in _recorded_changes(record, shipped).items()
            if key.split("#")[0] not in _NOT_RECIPE and key.split("#")[0] not in inference}


def _as_set(value: Any) -> str:
    """A config value as ``--set`` takes it (JSON: ``true``, ``null``, ``[1, 2]``; a text as written)."""
    value = written(value)
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _unless_worked_out_alike(bundle: str | os.PathLike, values: dict[str, Any], overrides: dict,
                             overlays: Sequence[Any], inference: dict[str, Any]) -> dict[str, Any]:
    """``values`` less the expressions that work out as the bundle's own do, with the other values taken and this
    call's ``--set`` and overlays (a record of an earlier bundle version, whose expression was written
    otherwise): not the training's settings. An expression that fails to work out here is kept.
    ``inference``: the bundle's inference config, whose ids the ``--set`` given must name here."""
    from medseg.bundle import load_config

    given = {k: v for k, v in overrides.items() if str(k).replace("::", "#").split("#")[0] in inference}

    def worked_out_value(trained: dict[str, Any], key: str) -> Any:
        parser = load_config(bundle, "infer", tuple(overlays), given, trained=trained)
        return parser.get_parsed_content(key.replace("#", "::"))

    kept = dict(values)
    for key, value in values.items():
        if not (isinstance(value, str) and worked_out(value)):
            continue
        others = {k: v for k, v in kept.items() if k != key}
        try:
            alike = _equal(worked_out_value(others, key), worked_out_value({**others, key: value}, key))
        except Exception:  # noqa: BLE001 - an expression that fails here is the training's own: take it as such
            alike = False
        if alike:
            del kept[key]
    return kept


def _equal(a: Any, b: Any) -> bool:
    """Whether two worked-out config values are the same (numbers, texts, lists, arrays, tensors)."""
    import numpy as np

    try:
        return bool(np.array_equal(np.asarray(a, dtype=object if isinstance(a, (list, tuple)) else None),
                                   np.asarray(b, dtype=object if isinstance(b, (list, tuple)) else None))) \
            and type(a) is type(b)
    except Exception:  # noqa: BLE001 - values numpy cannot hold: compare as they are
        return a == b


_ABSENT = "(absent)"


def _at(config: dict, key: str) -> Any:
    """The value of id ``key`` (``a#b``) in ``config``; :data:`_ABSENT` where it has none."""
    node: Any = config
    for part in key.split("#"):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _normal(value: Any) -> Any:
    """``value`` with MONAI's id separators written alike: a saved config has ``::`` where a bundle has ``#``."""
    if isinstance(value, str):
        return value.replace("#", "::")
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _recorded_changes(recorded: dict, shipped: dict, prefix: str = "") -> dict[str, Any]:
    """Ids (``a#b``) whose value in a training's record differs from the bundle's, expressions included.

    Components (dicts with ``_target_``) of one class are compared part by part, and a part the training added
    to one is a change; one of another class is one value, as is a plain mapping or list.
    """
    found: dict[str, Any] = {}
    for key, value in recorded.items():
        if str(key).startswith("_"):
            continue
        if key not in shipped:
            if prefix:  # a part added to a component (a '+' overlay, a whole one given with more parts)
                found[f"{prefix}{key}"] = value
            continue
        now = shipped[key]
        if isinstance(value, dict) and isinstance(now, dict) and ("_target_" in value or "_target_" in now):
            if value.get("_target_") != now.get("_target_") or set(now) - set(value):
                found[f"{prefix}{key}"] = value  # another class, or one given whole with fewer parts
            else:
                found.update(_recorded_changes(value, now, f"{prefix}{key}#"))
        elif _normal(value) != _normal(now):
            found[f"{prefix}{key}"] = value
    return found


def _bundle_name(metadata: Path) -> str | None:
    try:
        name = json.loads(metadata.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return str(name) if name else None


def _plain(value: Any) -> bool:
    """A value written out in full: a number, word, flag, or a list or mapping of them (no expression, no
    reference, no component), which a saved config holds as it was given."""
    if isinstance(value, str):  # expressions and references are rewritten when a config is saved
        return not worked_out(value) and "::" not in value
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return "_target_" not in value and all(_plain(v) for v in value.values())
    return value is None or isinstance(value, (bool, int, float))


def _plain_differences(recorded: dict, current: dict, prefix: str = "") -> dict[str, Any]:
    """Ids (``a#b``) whose recorded value is plain (see :func:`_plain`) and differs from the current config's.

    Components (dicts with ``_target_``) of one class are compared part by part, and a plain part the run added
    to one is a difference; one of another class is one value (such as a whole ``network_def`` given by
    ``--set``); a plain mapping or list is one value. (Parts of the current config the record lacks are left
    as they are: the current config holds this call's own overlay parts too.)
    """
    found: dict[str, Any] = {}
    for key, value in recorded.items():
        if str(key).startswith("_"):
            continue
        if key not in current:
            if prefix and _plain(value):  # a '+' overlay's part, or a whole component given with more parts
                found[f"{prefix}{key}"] = value
            continue
        now = current[key]
        if isinstance(value, dict) and isinstance(now, dict) and ("_target_" in value or "_target_" in now):
            if value.get("_target_") != now.get("_target_"):
                found[f"{prefix}{key}"] = value  # another class: whole
            else:
                found.update(_plain_differences(value, now, f"{prefix}{key}#"))
        elif _plain(value) and value != now:
            found[f"{prefix}{key}"] = value
    return found


def resume_length(parser: Any, config: dict, overrides: dict) -> bool:
    """A resumed run keeps its own ``max_epochs`` unless ``--epochs`` says otherwise (the bundle's default
    would restart the whole schedule). Returns whether ``--epochs`` changed the run's length (see
    :func:`warn_schedule_kept`)."""
    own = config.get("max_epochs")
    if not isinstance(own, int) or isinstance(own, bool):
        return False
    if "max_epochs" not in overrides:
        parser["max_epochs"] = own
        return False
    return parser["max_epochs"] != own


def warn_schedule_kept(max_epochs: Any, scheduler_state: Any) -> None:
    """Say that a resumed run given another length keeps the learning-rate schedule its checkpoint holds,
    with the schedule's own period where it has one (a cosine schedule's ``T_max``, the length the run
    started with)."""
    period = scheduler_state.get("T_max") if isinstance(scheduler_state, dict) else None
    kept = (f"keeps its period of {period} epoch{'' if period == 1 else 's'} (a cosine schedule rises again "
            "after it)" if isinstance(period, int) else "keeps the schedule it was set with")
    logging.getLogger(__name__).warning(
        "--epochs %s: the learning-rate schedule restored from the checkpoint %s; to anneal over the new length, "
        "train anew with --overwrite", max_epochs, kept)


def check_same_split(out: Path, recorded: dict | None, data_dir: str, datalists: Any = None) -> dict | None:
    """A resumed run trains on the split it started with: the split drawn again must be the recorded one, or,
    given ``datalists`` (the config's parsed split; leave it out where the call gives a split setting of its own),
    the same samples split otherwise (a medseg version that draws the split otherwise), whose split as recorded is
    returned (``train``, ``val``, ``all``: put it in the config in place of the drawing), with a warning, and
    written back to ``split.json``."""
    if not recorded:
        logging.getLogger(__name__).warning(
            "--resume: the run's split.json was missing or unreadable, so the split drawn now from %s could not "
            "be checked against the one the run trained on", data_dir)
        return
    try:
        drawn = json.loads((out / "split.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    kept = None
    if any(recorded.get(k) != drawn.get(k) for k in ("train", "val")) and \
            (kept := _split_as_recorded(out, recorded, drawn, datalists)) is None:  # by name: the folder may move
        raise DataError(f"{out / 'split.json'}: the run was trained on another train/validation split than the one "
                        f"drawn now from {data_dir} (another data or validation folder, images added or removed, or "
                        "another seed or val_fraction, or a medseg version that splits otherwise); resume with the "
                        "run's data and settings, or start anew with --overwrite instead of --resume")
    before, now = recorded.get("sha256"), drawn.get("sha256")
    if isinstance(before, dict) and isinstance(now, dict):  # runs of earlier versions recorded names only
        changed = [name for name, digest in before.items() if now.get(name) != digest]
        if changed:
            folder = recorded.get("val_dir") if changed[0] in recorded.get("val", []) and recorded.get("val_dir") \
                else data_dir  # a validation folder's image is named with its folder
            raise DataError(f"{folder}: {len(changed)} of the run's images or labels differ from those it was "
                            f"trained on (first: {changed[0]}); resume with the run's data, or start anew with "
                            "--overwrite instead of --resume")
    return kept


def _split_as_recorded(out: Path, recorded: dict, drawn: dict, datalists: Any) -> dict | None:
    """The recorded split of the samples of ``datalists`` (written back to ``split.json``) where the split drawn
    now holds the same samples split otherwise; else ``None``."""
    from medseg.io import atomic_output

    names = [recorded.get(k) for k in ("train", "val")]
    if not (isinstance(datalists, dict) and all(isinstance(datalists.get(k), list) for k in ("train", "val"))
            and all(isinstance(n, list) for n in names)):
        return None
    now = {str(d.get("name")): d for k in ("train", "val") for d in datalists[k]}
    if sorted(map(str, names[0] + names[1])) != sorted(now) or len(now) != len(names[0]) + len(names[1]):
        return None
    kept = {key: [now[str(n)] for n in listed] for key, listed in zip(("train", "val"), names, strict=True)}
    with atomic_output(out / "split.json") as tmp:
        tmp.write_text(json.dumps({**drawn, "train": names[0], "val": names[1]}, indent=2) + "\n", encoding="utf-8")
    moved = set(map(str, names[1])) ^ set(map(str, drawn.get("val", [])))
    logging.getLogger(__name__).warning(
        "--resume: the data would be split otherwise now (%d of its %d images in the other set: a medseg version "
        "that draws the split otherwise); the run goes on with its own split, from its split.json",
        len(moved), len(now))
    return {**kept, "all": list(datalists.get("all") or kept["train"] + kept["val"])}


def checkpoint_parts(checkpoint: Path) -> dict:
    """What a resume checkpoint holds (``model``, ``trainer``, ``scaler``, ...); empty for an unusual one."""
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by its loader
        return {}
    return saved if isinstance(saved, dict) else {}


def check_epochs_left(state: Any, last: Path, max_epochs: int) -> int | None:
    """``--resume`` needs epochs left to train (Ignite refuses a checkpoint past ``max_epochs`` with a
    traceback), or a run to finish: one that trained its ``max_epochs`` and was stopped before it wrote its
    ``train_summary.json`` (killed in its last seconds) ends again without training, its curves, summary and
    tracking written. ``state`` is the trainer's state saved in ``last``. Returns the epochs it has trained
    (None for an unusual checkpoint)."""
    try:
        done = int(state["iteration"]) // max(int(state["epoch_length"]), 1)
    except Exception:  # noqa: BLE001 - an unusual checkpoint: Ignite's own checks follow
        return None
    summary = last.parent / "train_summary.json"
    unwritten = not summary.is_file() or summary.stat().st_mtime_ns < last.stat().st_mtime_ns
    if done == max_epochs and unwritten:
        logging.getLogger(__name__).warning(
            "--resume: %s has trained all %d epochs, and the run was stopped before its end was written; "
            "finishing it without training (pass --epochs above %d to train on)", last.name, done, done)
    elif done >= max_epochs:
        raise ConfigValueError(f"--resume: {last.name} has trained {done} epochs and the run is set to "
                               f"{max_epochs}; pass --epochs above {done} to train on")
    return done


#: optimizer settings a resume compares with its checkpoint's: the initial learning rate (a schedule moves
#: ``lr``), weight decay and the like; momenta only without a schedule (one-cycle schedules move them too);
#: never how it computes (``foreach``, ``fused``, ``capturable``: another device may choose otherwise)
_OPTIMIZER_SETTINGS = ("initial_lr", "weight_decay", "eps", "amsgrad", "nesterov", "dampening", "maximize",
                       "decoupled_weight_decay")
_UNSCHEDULED_SETTINGS = ("lr", "momentum", "betas")


def check_resumed_state(saved: dict, optimizer: Any, batches: int | None, last: Path) -> None:
    """Refuse a resume whose settings the checkpoint would overrule without a word: its optimizer's settings
    (the initial learning rate, weight decay, momenta: Ignite loads the saved ones) and its epoch length in
    batches (Ignite keeps the saved one, so another ``images_per_batch`` would train part epochs or more than
    one pass each). ``saved`` is :func:`checkpoint_parts` of ``last``; ``batches`` the new data loader's length."""
    fix = "resume with the run's own value, or start anew with --overwrite instead of --resume"
    groups = (saved.get("optimizer") or {}).get("param_groups") if isinstance(saved.get("optimizer"), dict) else None
    now = getattr(optimizer, "param_groups", None)
    if isinstance(groups, list) and isinstance(now, list) and len(groups) == len(now):
        for before, after in zip(groups, now, strict=True):
            if not isinstance(before, dict):
                continue
            # a schedule moves lr and keeps the initial rate in initial_lr; without one, lr is the setting
            compared = _OPTIMIZER_SETTINGS + (() if saved.get("lr_scheduler") else _UNSCHEDULED_SETTINGS)
            keys = [k for k in compared if k in before and k in after]
            for key in keys:
                old, new = before[key], after[key]
                if _differs(old, new):
                    name = {"initial_lr": "learning rate", "lr": "learning rate"}.get(key, key)
                    raise ConfigValueError(f"--resume: the optimizer's {name} is {_number(new)} now and "
                                           f"{_number(old)} in {last.name}, whose own would be used; {fix}")
    state = saved.get("trainer")
    try:
        length = int(state["epoch_length"]) if isinstance(state, dict) and state.get("epoch_length") else None
    except (TypeError, ValueError):
        length = None
    if length is not None and batches is not None and batches != length:
        raise ConfigValueError(f"--resume: an epoch is {batches} batches now and {length} in {last.name}, whose "
                               "count would be kept (so each epoch would not be one pass over the training images: "
                               f"images_per_batch or a setting of the sampling differs); {fix}")


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) != len(new) or any(_differs(a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return not math.isclose(float(old), float(new), rel_tol=1e-9, abs_tol=0.0)
    return old != new


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


#: What train_summary.json keeps of each earlier session of a resumed run
_SESSION_KEYS = ("started", "resumed_from_epoch", "epochs", "wall_seconds", "interrupted", "diverged", "best_metric",
                 "best_metric_epoch", "environment")


def earlier_sessions(path: Path) -> list[dict]:
    """The sessions an existing ``train_summary.json`` records (its earlier ones, then its own)."""
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(before, dict):
        return []
    earlier = [s for s in before.get("earlier_sessions", []) if isinstance(s, dict)]
    return [*earlier, {k: before[k] for k in _SESSION_KEYS if k in before}]


def put_back(aside: Sequence[tuple[Path, Path]], keep_new: bool = False) -> None:
    """Restore the files :func:`set_aside` copied (or, with ``keep_new``, drop the copies)."""
    for path, spare in aside:
        if keep_new:
            spare.unlink(missing_ok=True)
        else:
            os.replace(spare, path)


def keep_newest_last_checkpoint(out: Path) -> None:
    # each (resumed) run's saver keeps its own newest file; an earlier run's stays behind unless removed here
    existing = [p for p in out.glob("last_checkpoint_epoch=*.pt") if p.is_file()]
    if len(existing) > 1:
        newest = last_checkpoint(out)
        for path in existing:
            if path != newest:
                path.unlink(missing_ok=True)


#: What a training writes into its folder before its first step: the record of the run and the MLflow store
_START_FILES = ("config.json", "split.json", "mlflow.db", "mlflow.db-journal")


class FailedStartCleanup:
    """A training that fails its checks in a folder it made leaves no folder behind (nor the split, config and
    empty MLflow store the checks wrote), so the fixed command starts clean. Only a training that holds the
    folder's lock removes anything: its files while it holds the lock (:meth:`remove_files`, registered
    once the lock is taken), the folders it made after the lock is released (:meth:`__exit__`; a folder
    someone else has begun to use by then is not empty, and stays). Once :attr:`started` is set, or in a
    folder that was there before, everything stays."""

    def __init__(self, out: Path, made: Sequence[Path]) -> None:
        self.out, self.made, self.started, self.removed = out, list(made), False, False

    def __enter__(self) -> FailedStartCleanup:
        return self

    def remove_files(self, kind: Any, *_: Any) -> None:
        """Exit callback (``ExitStack.push``) to register once the lock is held: removes the files."""
        import shutil

        if kind is None or self.started or not self.made:
            return
        for name in _START_FILES:
            with contextlib.suppress(OSError):
                (self.out / name).unlink()
        mlruns = self.out / "mlruns"
        if mlruns.is_dir() and not any(p.is_file() for p in mlruns.rglob("*")):
            shutil.rmtree(mlruns, ignore_errors=True)
        self.removed = True

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None and self.removed:
            remove_if_empty(self.made)


def how_to_go_on(out: Path) -> str:
    """What an interrupted training in ``out`` leaves to continue from."""
    if any(out.glob("last_checkpoint_epoch=*.pt")):
        return f"{last_checkpoint(out).name} holds the last finished epoch; continue with --resume --output {out}"
    return f"no epoch finished, so {out} holds nothing to resume; start the training again"
