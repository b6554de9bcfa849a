"""Segment many inputs one by one: skip finished ones, isolate failures, keep a manifest and a record of the run."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from medseg.discovery import OUTPUT_FORMATS, PROB_SUFFIXES, RUN_RECORD, InputItem, name_key, slice_items
from medseg.discovery import RUN_JOURNAL as JOURNAL
from medseg.errors import (
    NO_SPACE,
    DataError,
    brief,
    causes,
    describe_memory_failure,
    find_user_error,
    out_of_memory,
)
from medseg.io import atomic_output
from medseg.readers import kind_of, suffix_of

MANIFEST_FIELDS = ("input", "format", "series_uid", "slices", "status", "mask", "prob", "table", "objects", "seconds",
                   "message")


@dataclass
class ManifestRow:
    """One input's fate: ``status`` is ``ok``, ``skipped`` (outputs exist), ``failed`` or ``ignored``."""

    input: str
    format: str = ""
    series_uid: str = ""
    slices: int = 0
    status: str = ""
    mask: str = ""
    prob: str = ""
    table: str = ""
    objects: int | str = ""
    seconds: float = 0.0
    message: str = ""


@dataclass
class BatchResult:
    rows: list[ManifestRow] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def failures(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.status == "failed"]


def _drop_others(record: RunRecord, paths: dict[str, Path]) -> list[Path]:
    """Remove the input's outputs of another kind that another run wrote, so that, redone, the input's
    outputs are this run's alone. Only files as that run wrote them go; one changed since (a corrected mask,
    a folder copied without its times, a record of an earlier version without them) stays, as a file the
    record no longer knows. Returns those kept."""
    others = record.others(paths)
    kept = []
    for path in others:
        try:
            if record.intact(path):
                path.unlink()
                continue
        except OSError:
            pass
        kept.append(path)
    if others:
        record.forget(others)
    return kept


def _file_stamp(path: Path) -> list[int] | None:
    """``[size, modification time in ns]`` of a file, None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the check itself fails (a folder it may not read, say)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _message(err: BaseException, source: str) -> str:
    """One line for a failed input: our own error's text (MONAI wraps it in RuntimeError), else type + text."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, DataError):
            text = str(cause).splitlines()[0]
            return text if source in text else f"{source}: {text}"
        cause = cause.__cause__ or cause.__context__
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    text = (str(root).splitlines() or [""])[0]
    return f"{source}: {type(root).__name__}: {text}" if text else f"{source}: {type(root).__name__}"


def _device_lost(err: BaseException) -> str:
    """CUDA's words when ``err`` is a CUDA error after which the GPU no longer works for this process (a
    device-side assert, an illegal memory access: every later CUDA call fails alike), or ``""``: not for an
    out-of-memory error, nor for one after which a small computation on the GPU still runs (an input the
    kernels cannot take, say), as later inputs may then still succeed."""
    if out_of_memory(err):
        return ""
    for cause in causes(err):
        line = (str(cause).strip().splitlines() or [""])[0]
        if "CUDA error: " in line or "CUBLAS_STATUS_" in line or "CUDNN_STATUS_" in line:
            return "" if _gpu_works() else brief(line, 160)
    return ""


def _gpu_works() -> bool:
    """Whether a small computation on the GPU still runs (and waits for it)."""
    import torch

    try:
        (torch.ones(1, device="cuda") + 1).cpu()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - any failure here says the GPU is gone for this process
        return False
    return True


def _out_of_space(err: BaseException) -> str:
    """Why ``err`` means the disk (or the quota, or the file-size limit) is full, or ``""``: such a failure
    would fail every input after it, so the batch stops at the first one."""
    for cause in causes(err):
        if isinstance(cause, OSError) and (cause.errno in NO_SPACE
                                           or re.search(r"\d+ requested and \d+ written", str(cause))):
            return cause.strerror or str(cause)  # numpy reports a short write without an errno
    return ""


def _differences(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    # "checkpoint", "settings (tta)", ...: what differs between two run identities, for the message
    changed = []
    for key in new.keys() | old.keys():
        value, before = new.get(key), old.get(key)
        if value == before:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            keys = sorted(k for k in value.keys() | before.keys() if value.get(k) != before.get(k))
            changed.append(f"{key} ({', '.join(keys)})")
        else:
            changed.append(key)
    return sorted(changed)


def _data_files(path: Path) -> list[Path]:
    """The data files of a detached MetaImage or NRRD header (:func:`medseg.itkfiles.read_header`)."""
    from medseg.itkfiles import read_header
    from medseg.readers import SUFFIXES, suffix_of

    if SUFFIXES.get(suffix_of(path)) != "itk":
        return []
    try:
        return read_header(path).data_files
    except DataError:  # one that is not there: the input fails when it is read
        return []


def input_fingerprint(source: str | os.PathLike, series_uid: str = "") -> str:
    """Size and modification time of an input file (of every file of the series, for a DICOM series folder).

    Outputs are skipped only while their input is unchanged: a different image under the same name, or a
    file edited in place, is segmented again. Size and time stamp (as ``make`` and ``rsync`` use) cost one
    ``stat`` per file, where hashing would read whole volumes.
    """
    path = Path(source)
    try:
        if path.is_dir():
            from medseg.dicom import find_series

            try:  # the series' own files: not a note, a hidden file or another series beside it
                files = [Path(f) for f in find_series(path, series_uid or None).files]
            except DataError:
                files = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")]
            entries = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        else:
            entries = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]
            for data in _data_files(path):  # a MetaImage or NRRD header's voxels in files of their own
                stat = data.stat()
                entries.append((os.path.relpath(data, path.parent), stat.st_size, stat.st_mtime_ns))
    except OSError:
        return ""
    return hashlib.sha256(json.dumps(entries).encode("utf-8", "surrogateescape")).hexdigest()[:16]


class RunRecord:
    """``run.json`` of an output folder: which run (model and settings) made each output file.

    Skipping an input whose outputs exist is only right when this run made them; otherwise the folder
    would silently mix two models' masks. Each run's ``identity`` (e.g. bundle, checkpoint SHA-256,
    resolved config) gets a key; every output written is recorded under the key of the run that wrote it,
    and the record is kept true after each input, so an interrupted or partial (``--include``) run leaves
    a true record. Outputs the record does not know (older versions, foreign files) count as
    made by another run. The record also keeps each input's :func:`input_fingerprint`, so that the outputs
    of an input changed since are not taken as finished.

    During a batch each change is appended as one JSON line to a journal beside it (:data:`JOURNAL`), so that
    keeping the record true after every input costs the same at the 10 000th input as at the first;
    :meth:`save` folds the journal into ``run.json`` (atomically) and removes it. A record whose run was
    killed is read with its journal replayed up to the last whole line.
    """

    def __init__(self, folder: Path, identity: dict[str, Any], info: dict[str, Any] | None = None,
                 same_as: Sequence[dict[str, Any]] = ()) -> None:
        """``same_as``: identities that earlier versions recorded for what is this run (their outputs are
        taken as this run's)."""
        self.folder, self.path = Path(folder), Path(folder) / RUN_RECORD
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as stored
        self.key = _identity_key(self.identity)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.runs, self.outputs = dict(data["runs"]), dict(data["outputs"])
            self.inputs, self.names = dict(data.get("inputs", {})), dict(data.get("names", {}))
            self.stamps = dict(data.get("stamps", {}))  # size and mtime of each output as written
            self.generation = str(data.get("generation", ""))  # which journal continues this record
            self.pending = dict(data.get("pending", {}))  # outputs a run began and did not finish
            self.segmenting = dict(data.get("segmenting", {}))  # inputs a run began and did not finish or fail
            self.killed = dict(data.get("killed", {}))  # inputs a run was killed while segmenting
        except FileNotFoundError:
            self.runs, self.outputs = {}, {}  # none yet: outputs count as unrecorded
            self.inputs, self.names, self.pending, self.stamps = {}, {}, {}, {}
            self.segmenting, self.killed = {}, {}
            self.generation = ""
        except OSError as err:
            raise DataError(f"{self.path}: cannot read the folder's run record ({err.strerror or err}); check its "
                            "permissions") from err
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{self.path}: the folder's run record is damaged (not the JSON medseg writes); move it "
                            "aside and run again with --overwrite, or choose another output folder") from err
        self.journal = self.folder / JOURNAL
        self._saved = self._journal_open = False  # by this object: the record written, the journal begun
        self._replay()  # what a killed run did after its last save
        # an input a run began and never finished nor failed: it was killed while segmenting it (kill -9, out of
        # memory, a power cut); remembered until a run finishes it or it fails as inputs fail
        self.killed.update(self.segmenting)
        self.segmenting = {}
        # of the outputs a run began, only those it got as far as writing need redoing
        self.pending = {k: v for k, v in self.pending.items() if (self.folder / k).exists()}
        self.runs[self.key] = {"identity": self.identity, **(info or {})}
        # earlier versions kept the settings in words inside the identity: a run that is this one less them is this
        worded = [k for k, run in self.runs.items() if isinstance(run, dict) and isinstance(run.get("identity"), dict)
                  and "settings" in run["identity"] and "settings" not in self.identity
                  and {n: v for n, v in run["identity"].items() if n != "settings"} == self.identity]
        aliases = [_identity_key(json.loads(json.dumps(other, sort_keys=True, default=str))) for other in same_as]
        for alias in [*worded, *aliases]:
            if alias != self.key and alias in self.runs:
                self.outputs = {p: self.key if k == alias else k for p, k in self.outputs.items()}
                del self.runs[alias]

    def _replay(self) -> int:
        """Apply the journal a stopped run left (each line a change of :meth:`_log`); a line cut short by the
        kill, and anything after it, is dropped. A journal that does not continue this ``run.json`` (its first
        line names another generation: the record was replaced, restored or copied since, or is gone) is
        ignored, so that it never credits this run with outputs it did not make. Returns the number of
        changes applied."""
        try:
            lines = self.journal.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise DataError(f"{self.journal}: cannot read the folder's run journal ({err.strerror or err}); check "
                            "its permissions") from err
        try:
            continues = bool(lines) and bool(self.generation) and json.loads(lines[0]) == {
                "generation": self.generation}
        except ValueError:
            continues = False
        if not continues:
            logging.getLogger(__name__).warning("%s: does not continue %s (written by another run, or the record "
                                                "was replaced since); ignored", self.journal, self.path.name)
            return 0
        applied = 0
        for line in lines[1:]:
            try:
                self._apply(**json.loads(line))
            except (ValueError, TypeError, AttributeError):
                break
            applied += 1
        return applied

    def _apply(self, outputs: dict | None = None, inputs: dict | None = None, names: dict | None = None,
               pending: dict | None = None, stamps: dict | None = None, segmenting: dict | None = None,
               killed: dict | None = None) -> None:
        """Apply one change of :meth:`_log` (key -> new value, ``None`` to remove) to the tables."""
        for table, change in ((self.outputs, outputs), (self.inputs, inputs), (self.names, names),
                              (self.pending, pending), (self.stamps, stamps), (self.segmenting, segmenting),
                              (self.killed, killed)):
            for k, v in dict(change or {}).items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v

    def _log(self, **parts: dict[str, Any]) -> None:
        """Append one change (``outputs``, ``inputs``, ``names``, ``pending``, ``stamps``, ``segmenting``,
        ``killed``: key -> new value, ``None`` to remove) to the journal, the whole line in one write. The first
        change of this object writes the record first (this run's identity; an earlier journal folded in) and
        begins a journal of its own."""
        if not self._saved:
            self.save()
        text = json.dumps({k: v for k, v in parts.items() if v}, sort_keys=True, default=str) + "\n"
        if not self._journal_open:
            text = json.dumps({"generation": self.generation}) + "\n" + text
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(text)
        self._journal_open = True

    def _rel(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()
        except ValueError:  # not under the folder: recorded by its own path
            return Path(path).resolve().as_posix()

    def made_here(self, paths: dict[str, Path]) -> bool:
        """Whether this run wrote every one of ``paths``."""
        return all(self.outputs.get(self._rel(p)) == self.key for p in paths.values())

    def unfinished(self, path: Path) -> bool:
        """Whether ``path`` is an output a run here began to write and was killed in (kill -9, a power cut)
        before it could record the input as done: whatever the file holds now (this run's new output, or an
        earlier one, perhaps another model's), the input is made again."""
        return self._rel(path) in self.pending

    def killed_making(self, item: InputItem) -> bool:
        """Whether a run here was killed while segmenting ``item`` (before its outputs were done), whether or not
        it had begun to write them."""
        return _source_key(item) in self.killed

    def stopped(self, item: InputItem, failed: bool) -> None:
        """``item`` is no longer being segmented: stopped (Ctrl-C), or ``failed`` as inputs fail (an error, not a
        kill), and then no longer one to keep for last either."""
        key = _source_key(item)
        segmenting = {key: None} if key in self.segmenting else {}
        killed = {key: None} if failed and key in self.killed else {}
        if segmenting or killed:
            self._apply(segmenting=segmenting, killed=killed)
            self._log(segmenting=segmenting, killed=killed)

    def settle(self, paths: Iterable[Path]) -> None:
        """Drop ``paths`` from what is being written (an input that failed, its partial outputs removed): the
        files left there are what the record says they are. Logged only when something changed."""
        rels = [self._rel(p) for p in paths]
        dropped = {r: None for r in rels if self.pending.pop(r, None) is not None}
        if dropped:
            self._log(pending=dropped)

    def begin(self, paths: dict[str, Path], item: InputItem | None = None) -> None:
        """Note (and log) that this run is about to segment ``item`` and write ``paths``, over whatever they hold."""
        began = {self._rel(p): self.key for p in paths.values()}
        self.pending.update(began)
        segmenting = {_source_key(item): _where(item)} if item is not None else {}
        self.segmenting.update(segmenting)
        self._log(pending=began, segmenting=segmenting)

    def knows(self, path: Path) -> bool:
        """Whether some run recorded here wrote ``path``."""
        return self._rel(path) in self.outputs

    def conflict(self, paths: dict[str, Path]) -> str:
        """What differs from the run that made ``paths`` ("an unrecorded run" when unknown)."""
        keys = {self.outputs.get(self._rel(p)) for p in paths.values()} - {self.key}
        if None in keys or not keys:
            return "an unrecorded run"
        def described(run: dict) -> dict:  # the identity, and the settings in words where kept beside it
            return {**run.get("identity", {}), **({"settings": run["settings"]} if "settings" in run else {})}

        old = described(self.runs.get(sorted(keys)[0], {}))
        return " and ".join(("other " if part.startswith("settings") else "another ") + part
                            for part in _differences(described(self.runs[self.key]), old) or ["run"])

    def input_changed(self, paths: dict[str, Path], fingerprint: str) -> bool:
        """Whether the input of ``paths`` differs from the one they were made from (False when not recorded)."""
        made_from = self.inputs.get(self._rel(paths["mask"]))
        return bool(made_from and fingerprint and made_from != fingerprint)

    def refusal(self, item: InputItem, paths: dict[str, Path], changed: bool) -> str:
        """Why the outputs ``paths`` of ``item`` must be neither replaced nor taken as its own without
        ``--overwrite``, or ``""``: they are another input's, of the same path relative to another searched
        folder and still in its place (``dayA/img1.png`` segmented, then ``dayB/img1.png`` into the same
        folder; even of the same size and time stamp); or, the input ``changed`` since they were made, one of
        them was edited since it was written (a corrected mask, whose input was only touched or copied)."""
        entry = self.names.get(_source_key(item), {})
        source, here = str(entry.get("source", "")), _where(item)
        if entry.get("rel") == item.rel and source and source != here and Path(source).exists() \
                and self._present(item.rel) and not _same_input(source, here):
            return (f"{item.source}: {paths['mask']} is the mask of {source}, another input of the same name that "
                    "is still there; segment each folder into an output folder of its own, or their common folder "
                    "(whose outputs keep the sub-folders), or pass --overwrite to replace it")
        for path in paths.values() if changed else ():
            stamp = self.stamps.get(self._rel(path))
            if stamp is not None and _is_file(path) and list(stamp) != _file_stamp(path):
                return (f"{item.source}: the input changed since its outputs were made, but {path} was edited since "
                        "it was written (a corrected mask? a copy of the folder without its file times counts too) "
                        "and is kept; move it away to segment the input again, or pass --overwrite to replace it")
        return ""

    def keep_names(self, inputs: Sequence[InputItem]) -> list[InputItem]:
        """``inputs`` named as this folder knows them, so that no input writes over another's outputs.

        An input whose outputs the record holds keeps their name (``a.png`` stays ``a`` when a later run also
        finds ``a.tif``); a name the record gives another input is not taken (``a.tif`` then becomes
        ``a_tif``; any name still taken gets ``_2``, ``_3``, ...). Names compare ignoring case and Unicode
        normalisation, as outputs may land on a disk that ignores them.
        """
        owner = {name_key(str(v["rel"])): k for k, v in self.names.items()}
        uids = Counter(item.series_uid for item in inputs if item.series_uid)
        recorded = [self._recorded(item, uids).get("rel") for item in inputs]
        used = {name_key(str(r)) for r in recorded if r}
        result = []
        for item, rel in zip(inputs, recorded, strict=True):
            key = _source_key(item)
            # a series' name recorded by its UID alone (earlier versions) is its own, also where two folders
            # hold the series: the one of the two whose name it is takes it
            own = {key, f"dicom:{item.series_uid}"} if item.series_uid else {key}
            if not rel:
                rel = item.rel
                if name_key(rel) in used or owner.get(name_key(rel), key) not in own:
                    suffix = suffix_of(item.source).lstrip(".").replace(".", "_").lower() or item.series_uid
                    base = rel if name_key(rel).endswith(f"_{suffix}") else f"{rel}_{suffix}"
                    rel, n = base, 2
                    while name_key(rel) in used or owner.get(name_key(rel), key) not in own:
                        rel, n = f"{base}_{n}", n + 1
            used.add(name_key(str(rel)))
            result.append(replace(item, rel=str(rel)))
        return result

    def _recorded(self, item: InputItem, uids: Counter) -> dict:
        """The name recorded for ``item``; a series found once may also go by the key of earlier versions,
        ``dicom:<SeriesInstanceUID>`` without its folder."""
        key = _source_key(item)
        if key not in self.names and item.series_uid and uids[item.series_uid] == 1:
            return self.names.get(f"dicom:{item.series_uid}", {})
        return self.names.get(key, {})

    def record(self, paths: dict[str, Path], made: bool, fingerprint: str = "",
               item: InputItem | None = None) -> None:
        """Record ``paths`` as written by this run (``made``) from ``item``, an input of this ``fingerprint``,
        or as unknown (a failed input's partial outputs), and log it."""
        rels = [self._rel(p) for p in paths.values()]
        mask = self._rel(paths["mask"])
        outputs: dict[str, Any] = {r: self.key if made else None for r in rels}
        stamps: dict[str, Any] = {self._rel(p): _file_stamp(p) if made else None for p in paths.values()}
        inputs: dict[str, Any] = {mask: fingerprint if made and fingerprint else None}
        names: dict[str, Any] = {}
        if made and item is not None:
            names[_source_key(item)] = {"rel": item.rel, "mask": mask, "source": _where(item)}
        pending = {r: None for r in rels if r in self.pending}
        key = _source_key(item) if item is not None else None  # done, or failed as inputs fail
        done = {key: None} if key in self.killed or key in self.segmenting else {}
        self._apply(outputs, inputs, names, pending, stamps, done, done)
        self._log(outputs=outputs, inputs=inputs, names=names, pending=pending, stamps=stamps, segmenting=done,
                  killed=done)

    def note_name(self, item: InputItem, paths: dict[str, Path]) -> None:
        """Record ``item``'s name for its outputs ``paths`` if the record lacks it (logged only then)."""
        key = _source_key(item)
        if key not in self.names and self._rel(paths["mask"]) in self.outputs:
            self.names[key] = {"rel": item.rel, "mask": self._rel(paths["mask"]), "source": _where(item)}
            self._log(names={key: self.names[key]})

    def others(self, paths: dict[str, Path]) -> list[Path]:
        """The outputs of the input of ``paths`` that another run here (another model or settings) wrote in
        another kind (``mask/a.png`` beside this run's ``mask/a.tif``, a probability map this run does not
        write), recorded and present. This run's own outputs of another kind (the same model's PNG masks
        when TIFF is asked for as well) are not among them."""
        mask = self._rel(paths["mask"])
        stem = next((mask[: -len(s)] for s in sorted(OUTPUT_FORMATS.values(), key=len, reverse=True)
                     if mask.endswith(s)), None)
        if stem is None or not stem.startswith("mask/"):
            return []
        mine = {self._rel(p) for p in paths.values()}
        return [self.folder / r for r in sorted(_outputs_named(stem[len("mask/"):]) - mine)
                if self.outputs.get(r, self.key) != self.key and (self.folder / r).is_file()]

    def _present(self, rel: str) -> bool:
        """Whether an output of the name ``rel`` (of any kind) that a run here wrote is there."""
        return any(r in self.outputs and _is_file(self.folder / r) for r in _outputs_named(rel))

    def forget(self, paths: Iterable[Path]) -> None:
        """Drop ``paths`` from the record (outputs removed) and log it."""
        gone = {self._rel(p): None for p in paths}
        for r in gone:
            self.outputs.pop(r, None)
            self.pending.pop(r, None)
            self.stamps.pop(r, None)
        self._log(outputs=gone, pending=gone, stamps=gone)

    def intact(self, path: Path) -> bool:
        """Whether ``path`` is still the file a run here wrote (its size and modification time as recorded):
        not edited, replaced or copied over since. Records of earlier versions, without stamps, say no."""
        stamp = self.stamps.get(self._rel(path))
        return stamp is not None and list(stamp) == _file_stamp(path)

    def save(self) -> None:
        """Write the record (atomically), dropping what no recorded output needs any more, and remove the
        journal it now holds."""
        self.inputs = {k: v for k, v in self.inputs.items() if k in self.outputs}
        self.names = {k: v for k, v in self.names.items() if v.get("mask") in self.outputs}
        self.stamps = {k: v for k, v in self.stamps.items() if k in self.outputs and v is not None}
        used = set(self.outputs.values()) | {self.key}
        self.runs = {k: v for k, v in self.runs.items() if k in used}
        data = {"runs": self.runs, "outputs": dict(sorted(self.outputs.items())),
                "inputs": dict(sorted(self.inputs.items())), "names": dict(sorted(self.names.items())),
                "stamps": dict(sorted(self.stamps.items()))}
        if self.pending:
            data["pending"] = dict(sorted(self.pending.items()))
        # an input no longer there is no longer one to keep for last
        self.killed = {k: v for k, v in self.killed.items() if os.path.exists(v)}
        for name in ("segmenting", "killed"):
            if getattr(self, name):
                data[name] = dict(sorted(getattr(self, name).items()))
        data["generation"] = self.generation = secrets.token_hex(8)
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
        self.journal.unlink(missing_ok=True)
        self._saved, self._journal_open = True, False


def _identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _source_key(item: InputItem) -> str:
    """An input as the record names it: its :attr:`InputItem.key` (a path relative to the searched folder, so
    a moved or copied input folder keeps its names), else its absolute path and series."""
    if item.key:
        return item.key
    path = Path(item.source).resolve().as_posix()
    return f"{path}#{item.series_uid}" if item.series_uid else path


def _outputs_named(rel: str) -> set[str]:
    """The output files an input named ``rel`` may have, of every kind (relative to the output folder)."""
    return {f"mask/{rel}{s}" for s in OUTPUT_FORMATS.values()} | {
        f"prob/{rel}{s}" for s in PROB_SUFFIXES.values()} | {f"table/{rel}.csv"}


def _file_series_uid(item: InputItem) -> str:
    """The SeriesInstanceUID of a DICOM file given on its own (a folder's series carry theirs), for the manifest."""
    if item.format != "dicom" or not Path(item.source).is_file():
        return ""
    from medseg.dicom import find_series

    try:
        return find_series(item.source).uid
    except DataError:
        return ""


def _where(item: InputItem) -> str:
    """The input's file or folder where it is now (links resolved)."""
    return Path(item.source).resolve().as_posix()


def _same_input(a: str, b: str) -> bool:
    """Whether two places of an input of one record key hold the same input, a copy: files of the same bytes;
    a DICOM series folder, keyed by its UID, always."""
    import filecmp

    try:
        return Path(b).is_dir() or (Path(a).is_file() and Path(b).is_file() and filecmp.cmp(a, b, shallow=False))
    except OSError:
        return False


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now (outputs are renamed into place, so a new one is a new inode)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    """Write the manifest CSV atomically (at the start and the end of a batch; :func:`append_manifest` adds
    each input's row as it is done, so a crash keeps what was done)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    with atomic_output(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogateescape")


def append_manifest(path: Path, row: ManifestRow) -> None:
    """Add one row to the manifest in one write (a line cut short by a kill is dropped when it is read)."""
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n").writerow(asdict(row))
    with open(path, "a", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(buffer.getvalue())


def run_batch(
    inputs: Sequence[InputItem],
    ignored: Sequence[tuple[str, str]],
    segment: Callable[[list[dict]], dict | None],
    paths_for: Callable[[InputItem, int], dict[str, Path]],
    count: Callable[[InputItem], int],
    manifest: Path,
    overwrite: bool = False,
    on_abort: Callable[[], None] | None = None,
    progress: Any = None,
    record: RunRecord | None = None,
) -> BatchResult:
    """Segment ``inputs`` one at a time (those a run here was killed while segmenting last, with a warning).

    Args:
        inputs: what to segment (from :func:`medseg.discovery.discover`).
        ignored: ``(file, reason)`` of files not taken (recorded as ``ignored``).
        segment: runs the model over one input's slice items and writes its outputs; may return
            ``{"objects": N}`` (objects found, for instance bundles).
        paths_for: the output files of an input given its slice count.
        count: the number of slices of an input (reads headers only).
        manifest: the CSV to keep up to date.
        overwrite: redo inputs whose outputs all exist (else they are ``skipped``).
        on_abort: called after a failure to drop partial outputs.
        progress: an object with ``start(name)`` and ``advance()`` (e.g. a rich progress wrapper) or None.
        record: the folder's run record; inputs are skipped only when this run made their outputs.

    Raises:
        DataError: before any work, when (without ``overwrite``) existing outputs of some input were
            made by another run; the message names the first such input and what differs.
    """
    _check_manifest(manifest)
    with _said_per_input() as said:
        counts: dict[int, int] = {}
        killed: list[int] = []  # inputs a run here was killed while segmenting
        if record is not None and (not overwrite or record.killed):
            for i, item in enumerate(inputs):
                if item.error:
                    continue
                said.current = i  # what reading it says goes into its row
                try:
                    counts[i] = count(item)
                    paths = paths_for(item, counts[i])
                except Exception:  # noqa: BLE001 - reported per input in the loop below
                    continue
                finally:
                    said.current = None
                if record.killed_making(item):
                    killed.append(i)
                if overwrite:
                    continue
                existing = {name: p for name, p in paths.items() if _is_file(p) and not record.unfinished(p)}
                # its outputs of another kind too (a PNG mask when TIFF is asked for, a map no longer asked for)
                existing.update({f"other {k}": p for k, p in enumerate(record.others(paths))})
                if existing and not record.made_here(existing):  # one file of another's is enough to refuse
                    unknown = [p for p in existing.values() if not record.knows(p)]
                    if unknown:
                        raise DataError(f"{unknown[0]}: not written by a run recorded in {record.path} (an older "
                                        "version's output, or a file of your own); pass --overwrite to replace it, or "
                                        "choose another output folder")
                    raise DataError(f"{record.folder}: the outputs of '{item.rel}' were made with "
                                    f"{record.conflict(existing)} (see {RUN_RECORD}); pass --overwrite to redo them, "
                                    "or choose another output folder")
        if killed and len(killed) < len(inputs):
            # the same input may kill the next run too: the others are done first, so that none waits behind it
            for i in killed:
                logging.getLogger(__name__).warning(
                    "%s: an earlier run was killed while segmenting it (out of memory, or stopped by force); "
                    "segmenting it after the other inputs", inputs[i].source)
            later = set(killed)
            order = [i for i in range(len(inputs)) if i not in later] + killed
            inputs = [inputs[i] for i in order]
            counts = {new: counts[old] for new, old in enumerate(order) if old in counts}
            said.lines = {new: said.lines[old] for new, old in enumerate(order) if old in said.lines}
        result = BatchResult(rows=[ManifestRow(input=os.path.abspath(f), status="ignored", message=why)
                                   for f, why in ignored])
        taken = {_row_key(source, uid) for source, uid in
                 [(i.source, i.series_uid or _file_series_uid(i)) for i in inputs]}
        listed = _earlier_rows(manifest, [(f, "") for f, _ in ignored])
        earlier = [r for r in listed if _row_key(r.input, r.series_uid) not in taken]
        write_manifest(manifest, earlier + result.rows)
        if record is not None:
            record.save()  # this run's identity, and what a killed run's journal holds, before any change is logged
        try:
            _run_inputs(inputs, counts, segment, paths_for, count, manifest, overwrite, on_abort, progress, record,
                        result, said)
        except BaseException:
            # stopped (Ctrl-C, a full disk): the inputs it did not reach keep their earlier rows, as their outputs
            # stay; the next run lists them again
            done = {_row_key(r.input, r.series_uid) for r in result.rows}
            waiting = [r for r in listed if _row_key(r.input, r.series_uid) in taken - done]
            with contextlib.suppress(OSError):
                write_manifest(manifest, earlier + result.rows + waiting)
            raise
        finally:
            if record is not None:
                with contextlib.suppress(OSError):  # a disk still full: the journal keeps what the record would
                    record.save()
        write_manifest(manifest, earlier + result.rows)
        return result


class _SaidPerInput(logging.Handler):
    """The warnings medseg logs while an input is read and segmented (pages of a TIFF left out, say), kept by
    the input's index for its manifest row: the console shows them once, the manifest keeps them.

    A warning that no other handler takes (the command line configures none) is also printed to standard error,
    as Python prints one that no handler takes: this handler being there, Python no longer would."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.current: int | None = None
        self.lines: dict[int, list[str]] = {}

    def _taken_elsewhere(self, record: logging.LogRecord) -> bool:
        """Whether a handler other than this one is on the way of ``record`` (as Python looks for one)."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None and not self._taken_elsewhere(record):
            logging.lastResort.handle(record)
        if self.current is None:
            return
        text = (record.getMessage().strip().splitlines() or [""])[0]
        kept = self.lines.setdefault(self.current, [])
        if text and text not in kept:
            kept.append(text)


@contextlib.contextmanager
def _said_per_input() -> Iterator[_SaidPerInput]:
    said, logger = _SaidPerInput(), logging.getLogger("medseg")
    logger.addHandler(said)
    try:
        yield said
    finally:
        logger.removeHandler(said)


def _row_key(source: str, series_uid: str | None) -> tuple[str, str]:
    """An input as the manifest tells it apart: its absolute path and series."""
    return os.path.abspath(source), series_uid or ""


def _run_inputs(inputs: Sequence[InputItem], counts: dict[int, int], segment: Callable[[list[dict]], dict | None],
                paths_for: Callable[[InputItem, int], dict[str, Path]], count: Callable[[InputItem], int],
                manifest: Path, overwrite: bool, on_abort: Callable[[], None] | None, progress: Any,
                record: RunRecord | None, result: BatchResult, said: _SaidPerInput) -> None:
    """The loop of :func:`run_batch`: each input segmented, skipped or failed, its row added to ``result``
    and to the manifest (with the warnings said of it, for an input done)."""
    for i, item in enumerate(inputs):
        said.current = i
        row = ManifestRow(input=os.path.abspath(item.source), format=kind_of(item.source, item.format),
                          series_uid=item.series_uid)
        start = time.perf_counter()
        if progress is not None:
            progress.start(item.rel)
        paths: dict[str, Path] = {}
        written, fingerprint, before, full, broken = False, "", {}, "", ""
        try:
            if item.error:
                raise DataError(item.error)
            row.slices = counts[i] if i in counts else count(item)
            row.series_uid = row.series_uid or _file_series_uid(item)
            paths = paths_for(item, row.slices)
            row.mask, row.prob, row.table = (os.path.abspath(paths[k]) if k in paths else ""
                                             for k in ("mask", "prob", "table"))
            fingerprint = input_fingerprint(item.source, item.series_uid) if record is not None else ""
            changed = record is not None and record.input_changed(paths, fingerprint)
            unfinished = record is not None and any(record.unfinished(p) for p in paths.values())
            refusal = record.refusal(item, paths, changed) if record is not None and not overwrite \
                and not unfinished else ""
            if refusal:  # nothing is written: the outputs there stay as they are
                row.status, row.message = "failed", refusal
                row.mask = row.prob = row.table = ""
            elif not overwrite and not changed and not unfinished and all(p.is_file() for p in paths.values()):
                row.status, row.message = "skipped", "outputs exist (use --overwrite to redo)"
                row.objects = _table_rows(paths.get("table"))  # the count the skipped run found
                if record is not None:
                    record.note_name(item, paths)  # a folder written before names were recorded
            else:
                before = {name: _stamp(p) for name, p in paths.items()}
                if record is not None:
                    record.begin(paths, item)
                extra = segment(slice_items(item, row.slices)) or {}
                written = True  # every output of this input is in place (each written atomically)
                row.objects = extra.get("objects", "")
                row.status = "ok"
                if changed:
                    row.message = "the input changed since its outputs were made: segmented again"
                elif record is not None and record.killed_making(item):
                    row.message = ("an earlier run was killed while segmenting it (out of memory, or stopped by "
                                   "force): segmented again")
                elif unfinished:
                    row.message = "an earlier run was stopped while writing its outputs: segmented again"
                if record is not None:
                    left = _drop_others(record, paths)  # before the input counts as done: a kill here redoes it
                    if left:
                        row.message = "; ".join(filter(None, [row.message, (
                            f"kept {', '.join(p.relative_to(record.folder).as_posix() for p in left)}: another "
                            "run's output, changed or copied since it was written, so left as a file of yours")]))
                    record.record(paths, made=True, fingerprint=fingerprint, item=item)
        except BaseException as err:  # the per-input boundary: one bad file never stops the batch
            if on_abort is not None:
                on_abort()
            kept = ""
            if written and record is not None:
                # outputs written in full before a Ctrl-C are this run's, so a rerun skips them; after an
                # error (saving the record itself, say) they are no longer known to be this run's
                with contextlib.suppress(OSError):
                    record.record(paths, made=not isinstance(err, Exception), fingerprint=fingerprint, item=item)
            elif paths:
                # this attempt's partial outputs go; the outputs an earlier version of the input gave stay, as
                # recorded, so that a later run segments the input again instead of taking them for another's
                partial = {name: p for name, p in paths.items() if name in before and _stamp(p) != before[name]}
                for p in partial.values():
                    with contextlib.suppress(OSError):  # one that cannot go is left; the record forgets it
                        p.unlink(missing_ok=True)
                if record is not None:
                    with contextlib.suppress(OSError):
                        if partial:
                            record.forget(partial.values())
                        record.settle(paths.values())
                if record is not None and all(_is_file(p) for p in paths.values()) and record.made_here(paths):
                    kept = "; the outputs of an earlier version of this input are kept"
            if record is not None:
                with contextlib.suppress(OSError):
                    record.stopped(item, failed=isinstance(err, Exception))
            if not isinstance(err, Exception):
                raise  # Ctrl-C: this input's partial outputs are dropped, the finished ones kept; stop
            full, broken = _out_of_space(err), _device_lost(err)
            row.status, row.message = "failed", _message(err, item.source) + kept
            if full:
                row.message = f"{item.source}: its outputs could not be written ({full}){kept}"
            elif out_of_memory(err) and find_user_error(err) is None:  # a smaller input may still fit: go on
                row.message = f"{item.source}: {describe_memory_failure(err, 'infer')}{kept}"
            row.mask = row.prob = row.table = ""  # a failed input has no outputs of this run to point to
        finally:
            said.current = None
        if row.status in ("ok", "skipped"):
            row.message = "; ".join(filter(None, [row.message, *said.lines.get(i, [])]))
        row.seconds = round(time.perf_counter() - start, 3)
        result.rows.append(row)
        append_manifest(manifest, row)
        if progress is not None:
            progress.advance()
        if row.status == "failed" and full:
            done = sum(r.status in ("ok", "skipped") for r in result.rows)
            raise DataError(f"{manifest.parent}: cannot write the outputs ({full}); stopped after {done} of "
                            f"{len(inputs)} inputs; free disk space (or raise the quota or file-size limit) and "
                            "run the same command again to do the rest")
        if row.status == "failed" and broken:
            done = sum(r.status in ("ok", "skipped") for r in result.rows)
            raise DataError(f"{item.source}: the GPU failed ({broken}), and every later input would fail alike; "
                            f"stopped after {done} of {len(inputs)} inputs; run the same command again to do the "
                            "rest (with --device cpu if it fails again)")


def _table_rows(table: Path | None) -> int | str:
    """The objects an input's measurement table lists (one row each), or ``""`` without a readable table."""
    if table is None:
        return ""
    try:
        with open(table, newline="", encoding="utf-8") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return ""


def _check_manifest(manifest: Path) -> None:
    """Refuse to replace a ``manifest.csv`` that is not a batch's own (a data set's list of its images, say)."""
    try:
        with open(manifest, encoding="utf-8", errors="replace", newline="") as f:
            line = f.readline()
        if not line:
            return  # empty: nothing to lose
        header = next(csv.reader([line]), [])
    except FileNotFoundError:
        return
    except (OSError, csv.Error):
        header = []
    if not {"input", "status"} <= set(header):
        raise DataError(f"{manifest}: not a list of segmented inputs this command wrote (a data set's own "
                        "manifest?), and the batch would replace it; choose another output folder")


def _earlier_rows(manifest: Path, taken: Iterable[tuple[str, str]]) -> list[ManifestRow]:
    """The rows an earlier manifest holds for inputs this run does not take (another ``--include``, say), whose
    outputs are still there: a run into the folder adds to what the manifest lists instead of dropping it.

    Inputs are told apart by path and series (a folder may hold several); manifests list absolute paths (a
    relative path, from earlier versions, is read from the current folder)."""
    try:
        text = manifest.read_text(encoding="utf-8", errors="surrogateescape")
    except (OSError, UnicodeDecodeError):
        return []
    if not text.endswith("\n"):  # a row cut short by a kill: every row is written whole, with its line end
        text = text[: text.rfind("\n") + 1]
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error:
        return []
    taken = {_row_key(source, uid) for source, uid in taken}
    kept = []
    for row in rows:
        if not row.get("input") or _row_key(row["input"], row.get("series_uid")) in taken:
            continue
        if row.get("mask") and not Path(row["mask"]).is_file():
            continue  # its outputs are gone
        if not row.get("mask") and not os.path.lexists(row["input"]):
            continue  # a failure of an input deleted since: nothing to try again, nothing written
        values = {k: row.get(k, "") or "" for k in MANIFEST_FIELDS}
        try:
            values["slices"] = int(values["slices"] or 0)
            values["seconds"] = float(values["seconds"] or 0.0)
        except ValueError:
            continue
        kept.append(ManifestRow(**values))
    return kept
