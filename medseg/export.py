"""A trained model as a bundle of its own: the bundle, its weights, and the training's settings in its configs."""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from medseg.errors import NO_SPACE, CheckpointError, DataError, MedsegError, brief

#: What a bundle folder holds that goes into the export (MONAI's bundle layout less ``models/``): not the data,
#: runs or evaluations a plain ``monai.bundle run`` may have put inside it
BUNDLE_PARTS = ("configs", "docs", "scripts", "LICENSE")
#: The file that lists the weights' download addresses, as the MONAI model zoo and ``monai.bundle
#: download_large_files`` read it
LARGE_FILES = "large_files.yml"
#: Ids of a run's record that say where it was tracked (older records also held MLflow handlers): not the
#: receiver's business, and a plain ``monai.bundle run`` of the record would log into the sender's store
_TRACKING_IDS = ("_tracking_", "tracking_uri", "tracking_store", "experiment_name", "run_name", "save_execute_config")


def export_bundle(bundle: str | os.PathLike, checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                  torchscript: bool = True, weights_url: str | None = None) -> dict:
    """Write ``bundle`` with ``checkpoint`` as its ``models/model.pt`` into ``output_dir``, a bundle that runs the
    model alike with ``medseg`` and with MONAI's own runner (``python -m monai.bundle run``).

    The bundle's :data:`BUNDLE_PARTS` are copied. The ids of its configs that the checkpoint's training changed
    (those ``medseg evaluate`` and ``infer`` take from the run's ``config.json``: network size, loss, classes,
    ...) are written into the config files that hold them, as MONAI reads no training record; the training-only
    ids that say how the weights were made (epochs, weight averaging, how labels were drawn:
    :func:`medseg.runfolder.recipe_changes`) into ``train.json``. The run's
    ``config.json`` (less where the run was tracked) and ``split.json`` go beside the weights, and
    ``evaluate.json`` scores the validation images that ``split.json`` names. ``metadata.json`` and the docs
    are made true of these weights (channels, scores, settings). The folder appears whole or not at all,
    readable as the umask allows; what an export to the same folder that was killed had copied is removed.

    With ``torchscript``, ``models/model.ts`` holds the network with these weights as TorchScript, for a
    receiver without medseg or MONAI (see :func:`_write_torchscript`).

    With ``weights_url``, the address of a folder the weight files will be uploaded to (as the MONAI model zoo
    keeps weights out of its repository), ``large_files.yml`` lists each of them there with its SHA-256, so that
    ``python -m monai.bundle download_large_files`` fetches and checks them into a copy of the bundle without
    them (see :func:`_write_large_files`).

    Returns:
        what was written: ``output_dir``, ``checkpoint``, its ``sha256``, ``settings`` (id -> value written) and
        ``torchscript`` (the ``model.ts`` path; ``None`` when not asked for, or when this PyTorch cannot script
        the network), ``large_files`` (the ``large_files.yml`` path, or ``None``).

    Raises:
        MedsegError: ``output_dir`` exists or lies inside the bundle, a file cannot be read or written, or
            ``weights_url`` is not an address.
        CheckpointError: ``checkpoint`` is missing, a training's last checkpoint, another bundle's training
            made it, or its weights do not fit the network the export describes.
    """
    from medseg.bundle import bundle_configs, load_checkpoint, load_config
    from medseg.io import copy_tree, file_sha256, held_partial_folder, remove_abandoned_folders, remove_tree
    from medseg.locking import holder_of
    from medseg.runfolder import recipe_changes, run_file, training_settings

    bundle, checkpoint, out = Path(bundle), Path(checkpoint), Path(output_dir)
    if weights_url is not None:
        weights_url = _check_url(weights_url)
    bundle_configs(bundle, "infer")  # a bundle folder, or its one-line error
    for config in sorted((bundle / "configs").glob("*.json")):  # named here, not as the copy that is let go
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{config}: cannot read the bundle's config ({brief(str(err))}); fix it") from err
    if checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: a folder, not a checkpoint; give the weights in it, such as a run's "
                              f"{checkpoint / 'model.pt'}")
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found; give a run's model.pt")
    if out.exists() or out.is_symlink():
        raise MedsegError(f"{out}: already exists; give a new folder for the exported bundle")
    if out.absolute().resolve().is_relative_to(bundle.resolve()):
        raise MedsegError(f"{out}: inside the bundle {bundle}; give a folder outside it")
    made = [p for p in out.absolute().parents if not p.exists()]  # folders this export would create
    above = out.absolute().parents[len(made)] if len(made) < len(out.absolute().parents) else None
    if above is not None and not above.is_dir():
        raise MedsegError(f"{above}: a file, not a folder, so {out} cannot be made in it; give another output "
                          "folder")
    # the ids evaluate and infer take, written into every config that holds them; then the training-only ones
    # that say how the weights were made (epochs, weight averaging, labels drawn), into train.json alone
    settings = training_settings(bundle, [checkpoint], {}).values
    recipe = recipe_changes(bundle, checkpoint)
    writer = holder_of(checkpoint.resolve().parent)
    if writer is not None:
        logging.getLogger(__name__).warning(
            "%s: %s is still writing into its run; exporting the weights it holds now (the best so far), which "
            "a later validation may replace there", checkpoint, writer)
    for left in remove_abandoned_folders(out):
        logging.getLogger(__name__).warning("%s: removed what an export to %s that was stopped had copied", left,
                                            out)
    part, held = None, None
    try:
        part, held = held_partial_folder(out)  # this export's own, locked: another export to out leaves it alone
        for name in BUNDLE_PARTS:
            source = bundle / name
            if source.is_dir():
                copy_tree(source, part / name)
            elif source.is_file():
                shutil.copyfile(source, part / name)
        placed: set[str] = set()
        for config in sorted((part / "configs").glob("*.json")):
            if config.name != "metadata.json":
                placed |= _write_settings(config, settings)
        if recipe and (part / "configs" / "train.json").is_file():
            placed |= _write_settings(part / "configs" / "train.json", recipe)
        settings = {**settings, **recipe}
        parser = load_config(part, "infer")
        # the weights must fit the network the export describes: checked now, not by the receiver
        network = parser.get_parsed_content("network_def")
        digest = load_checkpoint(network, checkpoint, training_state=False)
        (part / "models").mkdir()
        shutil.copyfile(checkpoint, part / "models" / "model.pt")
        if file_sha256(part / "models" / "model.pt") != digest:  # a training still running replaced it
            raise CheckpointError(f"{checkpoint}: replaced while it was exported (a training still running?); "
                                  "export it again")
        split, record = run_file(checkpoint, "split.json"), run_file(checkpoint, "config.json")  # those read
        if split.is_file():
            shutil.copyfile(split, part / "models" / "split.json")
            _end_with_newline(part / "models" / "split.json")  # as earlier versions did not write it
        _score_recorded_split(part / "configs" / "evaluate.json", split if split.is_file() else None)
        if record.is_file():
            _write_record(record, part / "models" / "config.json")
        # an exported bundle's configs hold its training's settings already: its words about them carry over
        earlier = _earlier_export(bundle, digest)
        best = _best_validation(checkpoint, digest) or earlier.best
        picked = parser.get_parsed_content("input_channels") if "input_channels" in settings else None
        course = _training_course(checkpoint, digest, writer)
        course = course if course or writer is not None else earlier.course  # an export's, carried over
        if course.get("interrupted"):
            logging.getLogger(__name__).warning(
                "%s: its training was stopped before its end (after epoch %s); the export says so", checkpoint,
                course.get("epochs"))
        recorded = record.is_file() or bool(earlier.settings) or (bundle / "models" / "config.json").is_file()
        about = _Export(bundle, digest, _merged_settings(earlier.settings, settings), best, split.is_file(),
                        picked if isinstance(picked, list) else None, "input_channels" in earlier.settings,
                        _bundle_title(bundle), tuple(k for k in settings if k not in placed), recorded, course,
                        _val_folder(split))
        described = _write_metadata(bundle / "configs" / "metadata.json", part / "configs" / "metadata.json",
                                    parser, about)
        scripted = torchscript and _write_torchscript(network, part, out)
        hosted = weights_url is not None
        if hosted:
            _write_large_files(part, weights_url, scripted)
        _write_docs_header(part / "docs" / "README.md", about, described, scripted, hosted)
        part.rename(out)  # fails when another export made the folder meanwhile
    except OSError as err:
        if part is not None:
            remove_tree(part)
        _remove_empty(made)
        if out.exists():
            raise MedsegError(f"{out}: already exists (made meanwhile); give a new folder for the exported "
                              "bundle") from err
        # a full disk is the target's, though the copy names its source; so is a failure in the hidden folder
        # the export is made in (.NAME.*.part beside it)
        named = err.filename if isinstance(getattr(err, "filename", None), (str, os.PathLike)) else None
        at_target = named is None or err.errno in NO_SPACE or _in_partial(Path(named), out) or \
            Path(named) in (out, *out.parents)  # the folders made to hold it
        where = out if at_target else named
        fix = ("give the export a folder you can write to, or fix the permissions of its parent" if at_target and
               err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "check the files and the free space")
        raise MedsegError(f"{where}: cannot export the bundle ({err.strerror or type(err).__name__}); {fix}") from err
    except BaseException:
        if part is not None:
            remove_tree(part)
        _remove_empty(made)
        raise
    finally:
        if held is not None:
            os.close(held)
    return {"output_dir": str(out), "checkpoint": str(checkpoint), "sha256": digest, "settings": settings,
            "torchscript": str(out / "models" / "model.ts") if scripted else None,
            "large_files": str(out / LARGE_FILES) if hosted else None}


def say_other_weights(bundle: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
                      digests: Sequence[str]) -> None:
    """Warn when the weights loaded from an exported bundle's own ``models/model.pt`` (SHA-256 ``digests`` of
    ``checkpoints``) are not those it was exported with (``metadata.json``'s ``exported_from``), as its docs,
    scores and ``model.ts`` describe those."""
    own = Path(bundle, "models", "model.pt").resolve()
    for path, digest in zip(checkpoints, digests, strict=False):
        if Path(path).resolve() != own:  # the same file by any path: links, "..", relative
            continue
        try:
            meta = json.loads(Path(bundle, "configs", "metadata.json").read_text(encoding="utf-8"))
            exported = meta["exported_from"]["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # no export, or a metadata that says nothing of its weights
        if exported != digest:
            scripted = Path(bundle, "models", "model.ts").is_file()
            logging.getLogger(__name__).warning(
                "%s: not the weights this bundle was exported with (configs/metadata.json names SHA-256 %s…); its "
                "docs and scores describe those%s", path, str(exported)[:12],
                ", and models/model.ts holds them" if scripted else "")


class _Export(NamedTuple):
    """What the export's metadata and docs say of it: its source bundle, the weights' digest, the settings the
    training changed from the bundle's (id -> value; from an exported bundle's, those its export had changed
    too), its best validation (``(metric, value, epoch)``, or ``None``), whether its split went along, the
    image channels the network takes where this training picked them (``input_channels``), and whether the
    source's metadata names an earlier training's picks rather than the image's channels."""

    bundle: Path
    sha256: str
    settings: dict[str, Any]
    best: tuple[str, float, Any] | None
    has_split: bool
    picked: list | None = None
    repicked: bool = False
    name: str = ""  # the source bundle's name, as its metadata gives it
    unplaced: tuple[str, ...] = ()  # ids of this training's settings that no config of the bundle holds
    recorded: bool = True  # whether the training's record (its config.json) told the settings
    course: dict[str, Any] = {}  # how the training went (:func:`_training_course`)
    val_folder: str = ""  # the name of the folder of its own the training validated on (``--val-data``), if any


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders an export created above its own (deepest first) where they stayed empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _bundle_title(bundle: Path) -> str:
    """The bundle's name as its metadata gives it (an export's is the bundle it came from); else its folder's."""
    from medseg.runfolder import _bundle_name

    return _bundle_name(bundle / "configs" / "metadata.json") or bundle.resolve().name


def _merged_settings(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The settings an export of an exported bundle describes: the earlier export's (``earlier``), less those this
    training changed whole or in part, with ``now``'s; a part of a component the earlier export changed whole
    (another network class, say) is set inside it, so that the component is still described whole."""
    import copy

    merged: dict[str, Any] = {}
    taken: set[str] = set()  # parts of ``now`` set inside an earlier component
    for key, value in earlier.items():
        if any(key == n or key.startswith(f"{n}#") for n in now):
            continue  # changed again, whole
        parts = {n: v for n, v in now.items() if n.startswith(f"{key}#")}
        if parts:
            value = copy.deepcopy(value)
            if not all(_set_part(value, name[len(key) + 1:], part) for name, part in parts.items()):
                continue  # no component to hold them: the parts stand alone
            taken.update(parts)
        merged[key] = value
    return {**merged, **{k: v for k, v in now.items() if k not in taken}}


def _set_part(component: Any, path: str, value: Any) -> bool:
    """Set the part ``path`` (``a#b``) of ``component`` to ``value``; ``False`` where it is no mapping."""
    *steps, leaf = path.split("#")
    node = component
    for step in steps:
        node = node.setdefault(step, {}) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return False
    node[leaf] = value
    return True


class _Earlier(NamedTuple):
    settings: dict[str, Any]
    best: tuple[str, float, Any] | None
    course: dict[str, Any] = {}  # how the training of the same weights went (:func:`_training_course`)


def _earlier_export(bundle: Path, digest: str) -> _Earlier:
    """What ``bundle``'s metadata says of the export that made it (nothing for a bundle that is no export):
    the settings that export's training changed from the bundle it came from, and, when ``digest`` names the
    same weights, their best validation score."""
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
        earlier = meta["exported_from"]
        settings = dict(earlier.get("settings") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return _Earlier({}, None)
    if earlier.get("weights_sha256") != digest:
        return _Earlier(settings, None)
    course = {k: earlier[k] for k in ("epochs", "interrupted") if k in earlier}
    scores = meta.get("eval_metrics")
    if not isinstance(scores, dict) or len(scores) != 1:
        return _Earlier(settings, None, course)
    ((metric, value),) = scores.items()
    valid = isinstance(value, (int, float)) and math.isfinite(value)
    return _Earlier(settings, (str(metric), float(value), earlier.get("best_epoch")) if valid else None, course)


#: How an earlier export's words begin, in the description and the docs (an export of an export replaces them)
_SETTINGS_NOTE = " These weights were trained with settings changed from the bundle's:"
_DOCS_HEADER = "# Exported model: "
_DOCS_RULE = "\n\n---\n\n"
#: The end of the header's last sentence when the source bundle had no docs (no rule follows it).
_HEADER_END = "are for training new weights and using those."
#: The end of the header's last sentence when the source's docs follow it, below the rule.
_BELOW_END = "and these weights are part of this bundle."


def _best_validation(checkpoint: Path, digest: str) -> tuple[str, float, Any] | None:
    """The best validation score the training's ``train_summary.json`` records, when it is of these weights (of
    SHA-256 ``digest``): ``None`` when none is recorded, or when the summary names other weights (a training
    still running, or resumed and stopped, whose best the summary does not know). A summary of an earlier
    version, which names no weights, counts when ``checkpoint`` is not newer than it."""
    from medseg.runfolder import run_file

    summary = run_file(checkpoint, "train_summary.json")
    try:
        record = json.loads(summary.read_text(encoding="utf-8"))
        metric, value = str(record["key_metric"]), float(record["best_metric"])
        if "weights_sha256" in record:
            if record["weights_sha256"] != digest:
                return None
        elif summary.stat().st_mtime_ns < Path(checkpoint).resolve().stat().st_mtime_ns:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (metric.removeprefix("val_"), value, record.get("best_metric_epoch")) if math.isfinite(value) else None


def _training_course(checkpoint: Path, digest: str, writer: str | None) -> dict[str, Any]:
    """How the training of these weights (SHA-256 ``digest``) went, as its run's ``train_summary.json`` says
    where it names them: the epochs it ran, and whether it was stopped before its end (Ctrl-C, a signal);
    ``still_training`` where a command (``writer``) was still writing into its run at the export."""
    from medseg.runfolder import run_file

    if writer is not None:  # its summary, if any, is of an earlier session of the run (resumed since)
        return {"still_training": True}
    course: dict[str, Any] = {}
    try:
        record = json.loads(run_file(checkpoint, "train_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return course
    if not isinstance(record, dict) or record.get("weights_sha256") != digest:
        return course
    if isinstance(record.get("epochs"), int):
        course["epochs"] = record["epochs"]
    if record.get("interrupted"):
        course["interrupted"] = True
    return course


def _course_text(course: dict[str, Any]) -> str:
    """The docs' words on :func:`_training_course` (empty where nothing is known)."""
    words = f" It trained {course['epochs']} epoch{'s' * (course['epochs'] != 1)}" if "epochs" in course else ""
    if course.get("interrupted"):
        words = ((words + ", and was") if words else " It was") + (
            " stopped before its end (by Ctrl-C or a signal), so it did not train as long as its settings say")
    if course.get("still_training"):
        words = (words + "." if words else "") + (
            " It was exported while its training was still running: these are its best weights at that moment")
    return words + "." if words else ""


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v, ensure_ascii=False, default=str)}" for k, v in settings.items())


def _write_metadata(source: Path, path: Path, parser: Any, about: _Export) -> bool:
    """The bundle's ``metadata.json`` (``source``) made true of the export, written to ``path``: the network's
    input and output channels as its configs build it, this training's best validation score as
    ``eval_metrics`` (none when unrecorded, as the source's figures are of another training), the settings it
    changed in the description, and where the export came from. Returns whether it states the channels."""
    try:
        meta = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{source}: cannot read the bundle's metadata ({err}); fix it") from err
    formats = meta.get("network_data_format") if isinstance(meta.get("network_data_format"), dict) else {}
    names = about.settings.get("class_names")
    described = False
    for side, key in (("inputs", "in_channels"), ("outputs", "out_channels")):
        entries = formats.get(side) if isinstance(formats.get(side), dict) else {}
        count = parser.get_parsed_content(f"network_def#{key}") if f"network_def#{key}" in parser else None
        for entry in list(entries.values())[:1]:  # the network's one input and output
            if isinstance(entry, dict) and isinstance(count, int):
                labels = _picked_names(entry, about.picked, about.repicked) if side == "inputs" else names
                if side == "inputs" and isinstance(labels, list) and len(labels) == 1 and count == 3:
                    labels = [labels[0], *[f"{labels[0]} (repeated)"] * 2]  # one channel picked, given as gray
                _describe_channels(entry, count, labels if isinstance(labels, list) else None,
                                   "input {}" if side == "inputs" else None)
                described = True
    meta["eval_metrics"] = {about.best[0]: round(about.best[1], 4)} if about.best else {}
    description = str(meta.get("description", "")).split(_SETTINGS_NOTE)[0]  # an earlier export's note replaced
    meta["description"] = (f"{description}{_SETTINGS_NOTE} {_settings_text(about.settings)}; where the text above "
                           "says otherwise, these hold.") if about.settings else description
    meta["exported_from"] = {"bundle": meta.get("name", about.bundle.name), "version": meta.get("version"),
                             "weights_sha256": about.sha256,
                             # null: no training record went with the weights, so their settings are not known
                             "settings": about.settings if about.recorded else None,
                             **{k: v for k, v in about.course.items() if k in ("epochs", "interrupted",
                                                                                "still_training")},
                             **({"best_epoch": about.best[2]} if about.best and about.best[2] is not None else {}),
                             "eval_metrics": "this training's best validation score, on its own validation split"
                                             + (" (models/split.json)" if about.has_split else "")
                                             if about.best else "none recorded"}
    path.write_text(json.dumps(meta, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return described


def _picked_names(entry: dict, picked: list | None, repicked: bool) -> list | None:
    """The names of the image channels ``picked`` (``input_channels``) by the bundle's input ``entry``: of its
    ``channel_def``, unless it names the picks of an earlier export's training (``repicked``) rather than the
    image's channels; ``channel N of the image`` where it has none."""
    if picked is None:
        return None
    own = entry.get("channel_def") if isinstance(entry.get("channel_def"), dict) and not repicked else {}
    return [own.get(str(i), f"channel {i} of the image") for i in picked]


def _describe_channels(entry: dict, count: int, names: list | None, unnamed: str | None = None) -> None:
    """Set ``entry``'s ``num_channels`` to ``count`` and its ``channel_def`` to ``names`` where given, else keep
    its own where the count is unchanged; a channel past the names is ``unnamed`` (with its number), or, for an
    output, said to be no class."""
    if names is None and entry.get("num_channels") == count:
        return
    own = entry.get("channel_def") if isinstance(entry.get("channel_def"), dict) else {}
    labels = [str(n).replace("_", " ") for n in names] if names is not None else \
        [own[str(i)] for i in range(min(count, len(own))) if str(i) in own]
    entry["num_channels"] = count
    entry["channel_def"] = {str(i): labels[i] if i < len(labels) else unnamed.format(i) if unnamed else
                            f"output {i}, not a class (added by the training's settings)" for i in range(count)}


def _end_with_newline(path: Path) -> None:
    """Add the final newline a text file lacks, as the model zoo's file checks ask."""
    with path.open("rb+") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return
        file.seek(-1, os.SEEK_END)
        if file.read(1) != b"\n":
            file.write(b"\n")


def _check_url(url: str) -> str:
    """Refuse a ``weights_url`` that is not the address of a folder the weight files' names can be appended to
    and that MONAI's ``download_url`` can fetch from; return it as written into ``large_files.yml`` (characters
    of the path beyond ASCII percent-encoded, as UTF-8, so the file reads alike under any locale)."""
    from urllib.parse import quote, urlsplit

    def refuse(why: str) -> MedsegError:
        return MedsegError(f"{url!r}: {why}" if not url.isprintable() else f"{url}: {why}")

    try:
        url.encode("utf-8")
    except UnicodeEncodeError as err:
        raise refuse("not text (bytes of another encoding); give the folder's address") from err
    if not url.isprintable() or any(c.isspace() for c in url):
        raise refuse("holds spaces or control characters; write a space as %20 and leave control characters out")
    if "?" in url or "#" in url or "\\" in url:
        raise refuse("cannot hold ?, # or \\, as the weights' addresses are it followed by /model.pt; give the "
                     "folder's address, writing such characters of its name as %3F, %23 and %5C")
    if re.search(r"%(?![0-9A-Fa-f]{2})", url):
        raise refuse("holds a % that is not followed by two hexadecimal digits; write a % as %25")
    try:
        parts = urlsplit(url)
        port = parts.port  # a port out of range or not a number raises here
    except ValueError as err:
        raise refuse(f"not an address ({err}); give the http(s):// address the weight files will be uploaded "
                     "to") from err
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in ("http", "https", "ftp", "file") or scheme != "file" and not host:
        raise refuse("not an address of a folder; give the http(s):// address the weight files will be uploaded "
                     "to, such as https://example.org/models/em1")
    if scheme == "file" and (host not in ("", "localhost") or not parts.path.startswith("/")):
        raise refuse("a file:// address names a folder on this machine by its whole path, as file:///srv/models/em1 "
                     "(three slashes)")
    if parts.username is not None or parts.password is not None:
        raise refuse("holds a user name or password, which large_files.yml would publish; give the address "
                     "without them")
    if not parts.netloc.isascii():
        raise refuse("a host name beyond ASCII; give it in its ASCII form (xn--...), as DNS knows it")
    if port == 0:
        raise refuse("port 0 is no server's; give the port the weight files are served on")
    written = parts.netloc.rsplit(":", 1)[0] if port is not None or parts.netloc.endswith(":") else parts.netloc
    if written.lower() not in (host, f"[{host}]"):  # what follows an IPv6 host's ] goes unchecked
        raise refuse(f"not an address (host {parts.netloc!r}); give the http(s):// address the weight files will "
                     "be uploaded to")
    if host in ("drive.google.com", "docs.google.com"):
        raise refuse("a Google Drive folder's address does not lead to its files by their names; host the weight "
                     "files where a folder's address followed by /model.pt is the file's")
    if parts.path.rstrip("/").rsplit("/", 1)[-1].lower() in ("model.pt", "model.ts"):
        raise refuse("the address of a file; give the address of the folder that holds model.pt")
    return quote(url, safe="".join(chr(c) for c in range(33, 127)))


def _write_large_files(part: Path, url: str, scripted: bool) -> None:
    """Write ``part/large_files.yml``: each weight file (``models/model.pt``, ``models/model.ts`` where written)
    at ``url``/its name, with its SHA-256, in the layout MONAI's ``download_large_files`` and the model zoo read
    (path, url, hash_val, hash_type)."""
    from medseg.io import file_sha256

    names = ["model.pt", "model.ts"] if scripted else ["model.pt"]
    lines = ["# Where this bundle's weight files are kept, with their SHA-256; a copy of the bundle without them",
             "# gets them with: python -m monai.bundle download_large_files --bundle_path THIS_FOLDER",
             "large_files:"]
    for name in names:
        lines += [f"  - path: {json.dumps('models/' + name)}",
                  f"    url: {json.dumps(url.rstrip('/') + '/' + name)}",
                  f"    hash_val: {json.dumps(file_sha256(part / 'models' / name))}",
                  '    hash_type: "sha256"']
    (part / LARGE_FILES).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_torchscript(network: Any, part: Path, out: Path) -> bool:
    """Write ``network`` (its weights loaded) into ``part/models/model.ts`` as MONAI's ``ckpt_export`` does:
    TorchScript with ``metadata.json`` and the configs inside as extra files (``monai.data.load_net_with_metadata``
    reads them back), which runs with ``torch.jit.load`` alone and is what MONAI Deploy and the model zoo take.
    The network only: logits for an input already scaled as the bundle's transforms scale it. Returns whether it
    was written; when this PyTorch cannot script the network (a custom one, say), one warning names ``out``, as
    the bundle still runs from ``model.pt``."""
    import torch
    from monai.data import save_net_with_metadata

    try:
        with warnings.catch_warnings():  # deprecated in favour of torch.export, which MONAI's tools do not read
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
            scripted = torch.jit.script(network.eval())
    except Exception as err:  # noqa: BLE001 - TorchScript raises many types for code it cannot compile
        logging.getLogger(__name__).warning(
            "%s: no models/model.ts, as this PyTorch cannot script the network (%s); the bundle runs from "
            "models/model.pt", out, brief(f"{type(err).__name__}: {err}"))
        return False
    configs = part / "configs"
    extra = {f"{path.stem}.json": json.dumps(json.loads(path.read_text(encoding="utf-8"))).encode()
             for path in sorted(configs.glob("*.json")) if path.name != "metadata.json"}
    meta = json.loads((configs / "metadata.json").read_text(encoding="utf-8"))
    # serialised in memory, then written by Python: libtorch's own file writer aborts the process on a full disk
    buffer = io.BytesIO()
    save_net_with_metadata(scripted, buffer, include_config_vals=False, meta_values=meta, more_extra_files=extra)
    (part / "models" / "model.ts").write_bytes(buffer.getvalue())
    return True


def _write_docs_header(path: Path, about: _Export, described: bool, scripted: bool, hosted: bool = False) -> None:
    """Put, before the source bundle's documentation (an earlier export's header replaced), what this export
    holds and how it differs."""
    body = path.read_text(encoding="utf-8") if path.is_file() else ""
    if body.startswith(_DOCS_HEADER):  # an earlier export's header, and below its rule the source's docs if any
        ends = (_BELOW_END + _DOCS_RULE, _HEADER_END + _DOCS_RULE, _HEADER_END)  # the header's own last words
        end = next((e for e in ends if e in body), None)
        body = body.split(end, 1)[1].lstrip("\n") if end else ""
    changed = f"`{_settings_text(about.settings)}`" if about.settings else "none (the bundle's defaults)" \
        if about.recorded else ("not known, as no record of the training (its run's `config.json`) was beside "
                                "the weights: `configs/` holds the bundle's own settings, which run these weights "
                                "as trained only if the training used them")
    if about.unplaced:
        changed += (f" (`{'`, `'.join(about.unplaced)}` not in `configs/`, as none of its files holds them: "
                    "`models/config.json`, the training's own record, has them)")
    best = (f"{about.best[0]} {about.best[1]:.4f}" + (f" at epoch {about.best[2]}" if about.best[2] else "")
            + (" on its own validation split (`models/split.json`)" if about.has_split else "")) if about.best \
        else "not recorded"
    header = (f"{_DOCS_HEADER}trained weights of the bundle {about.name or about.bundle.resolve().name}\n\n"
              f"This folder holds one training's weights (`models/model.pt`, SHA-256 `{about.sha256}`) with "
              "the bundle it was trained with. Settings the training changed from the bundle's, written into "
              f"`configs/`: {changed}. Its best validation score in training: {best}"
              + (" (as the training validates: `medseg evaluate` scores with the evaluation's own settings, such "
                 "as test-time augmentation, so its figure may differ)" if about.best else "")
              + f".{_course_text(about.course)}"
              + (" `configs/metadata.json` states the network's channels as these weights have them." if described
                 else "")
              + (" `models/model.ts` holds the network with these weights as TorchScript (`torch.jit.load`; "
                 "`monai.data.load_net_with_metadata` also returns the metadata and configs stored in it): it "
                 "gives the logits of an image already scaled as the configs' transforms scale it (its sides a "
                 "multiple of the network's total downsampling), without the sliding window, the resampling to "
                 "the trained object size where the configs set one (`target_diameter`), the logit shift and "
                 "the post-processing that `medseg infer` and `python -m monai.bundle run` add." if scripted
                 else "")
              + (f" `{LARGE_FILES}` lists where the weight files are kept, with their SHA-256: a copy of this "
                 "folder without them (as the MONAI model zoo keeps bundles) gets them with `python -m "
                 "monai.bundle download_large_files --bundle_path MODEL`." if hosted else ""))
    header += ("\n\nTo run these weights, with this folder as `MODEL` (`models/model.pt` is its default "
               "checkpoint, so no `--checkpoint` is needed):\n\n"
               "```\n"
               "medseg infer MODEL IN_DIR OUT_DIR\n"
               + ("medseg evaluate MODEL --data VAL_DIR                  # scores the validation images of "
                  "models/split.json\n" if about.val_folder else "medseg evaluate MODEL --data DATA_DIR" + (
                      "                 # scores the validation images of models/split.json\n" if about.has_split
                      else "\n")) +
               "python -m monai.bundle run inferring --bundle_root MODEL \\\n"
               "    --config_file MODEL/configs/inference.json --dataset_dir IN_DIR --output_dir OUT_DIR\n"
               "python -m monai.bundle run evaluating --bundle_root MODEL \\\n"
               "    --config_file \"['MODEL/configs/train.json','MODEL/configs/evaluate.json']\" \\\n"
               + ("    --dataset_dir DATA_DIR --val_dir VAL_DIR --output_dir EVAL_DIR\n" if about.val_folder else
                  "    --dataset_dir DATA_DIR --output_dir EVAL_DIR\n") +
               "```\n\n"
               + (f"`VAL_DIR` is the folder of labelled images it was validated on (`{about.val_folder}` in "
                  "training), `DATA_DIR` the one it was trained on.\n\n" if about.val_folder else "") +
               "The commands in the documentation below, which name the bundle's own folder and a run's "
               "`--checkpoint`, " + _HEADER_END)
    if body.strip():
        header += ("\n\nEverything below is the documentation of the bundle it came from: its results describe "
                   "the bundle's reference training, not these weights, " + _BELOW_END)
    path.parent.mkdir(exist_ok=True)
    path.write_text(header + _DOCS_RULE + body if body.strip() else header + "\n", encoding="utf-8")


def _score_recorded_split(config: Path, split: Path | None) -> None:
    """Make ``evaluate.json`` score the samples the run's ``split.json`` names (see
    :func:`medseg.data.recorded_samples`): MONAI's runner reads no split record, and a split drawn from the
    bundle's settings can hold images the model trained on. An ISBI-style ``val_count`` follows the record.
    ``split`` ``None`` (no record went along): a record an exported bundle's ``evaluate.json`` named is off."""
    if not config.is_file():
        return
    content = json.loads(config.read_text(encoding="utf-8"))
    if split is None:
        if "split_record" in content:  # the export of an export: the earlier record is not these weights'
            content["split_record"] = None
            config.write_text(json.dumps(content, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    train = config.with_name("train.json")
    trained = json.loads(train.read_text(encoding="utf-8")) if train.is_file() else {}
    imports = content.get("imports", trained.get("imports", []))  # a file's imports replace those before it
    needed = "$from medseg.data import recorded_samples"
    content["imports"] = imports if needed in imports else [*imports, needed]
    content["split_record"] = "$@bundle_root + '/models/split.json'"
    content["validate#dataset#data"] = "$recorded_samples(@datalists, @split_record, @eval_split)"
    if "val_count" in trained:
        try:
            content["val_count"] = len(json.loads(split.read_text(encoding="utf-8"))["val"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{split}: not a readable split record ({err}); fix it, or move it away to export "
                            "the weights without it") from err
    config.write_text(json.dumps(content, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _val_folder(split: Path) -> str:
    """The name of the folder of its own a training validated on (``val_dir`` in its ``split.json``), else ``""``."""
    try:
        folder = json.loads(split.read_text(encoding="utf-8")).get("val_dir")
    except (OSError, ValueError, AttributeError):
        return ""
    return Path(folder).name if isinstance(folder, str) and folder else ""


def _in_partial(path: Path, out: Path) -> bool:
    """Whether ``path`` is the hidden folder an export to ``out`` is made in (``.NAME.*.part`` beside it), or in it."""
    for place in (path, *path.parents):
        if place.parent == out.parent and place.name.startswith(f".{out.name}.") and place.name.endswith(".part"):
            return True
    return False


def _write_record(source: Path, target: Path) -> None:
    """The run's ``config.json`` as the receiver gets it: without where the run was tracked (ids and, in records
    of earlier versions, the MLflow handlers), so that running it never logs into the sender's store."""
    try:
        record = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{source}: cannot read the run's record ({err}); fix it, or move it away to export the "
                        "weights with the bundle's settings") from err
    if isinstance(record, dict):
        record = {k: v for k, v in record.items() if k not in _TRACKING_IDS}
        for engine in ("train", "validate"):
            handlers = record.get(engine, {}).get("handlers") if isinstance(record.get(engine), dict) else None
            if isinstance(handlers, list):
                record[engine]["handlers"] = [h for h in handlers if not (
                    isinstance(h, dict) and "MLFlowHandler" in str(h.get("_target_", "")))]
    target.write_text(json.dumps(record, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_settings(config: Path, settings: dict[str, Any]) -> set[str]:
    """Set each id of ``settings`` (``a#b`` for a nested one) that ``config`` holds to its value, in place;
    return the ids set."""
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{config}: cannot read the bundle's config ({err}); fix or remove it") from err
    placed: set[str] = set()
    for key, value in settings.items():
        *parents, leaf = key.split("#")
        node = content
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and (leaf in node or parents):
            node[leaf] = value
            placed.add(key)
    if placed:
        config.write_text(json.dumps(content, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return placed
