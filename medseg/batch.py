"""Segment many inputs one by one: skip finished ones, isolate failures, keep a manifest and a record of the run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medseg.discovery import InputItem, slice_items
from medseg.errors import DataError
from medseg.io import atomic_output

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


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure files can be written there.

    Raises:
        DataError: the folder cannot be created or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".medseg-write-test.", dir=folder):
            pass
    except OSError as err:
        raise DataError(f"{folder}: output folder is not writable ({err.strerror or err}); choose another "
                        "output folder or fix its permissions") from err
    return folder


#: The file in an output folder that records which model and settings made its outputs.
RUN_RECORD = "run.json"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_run(folder: Path, identity: dict[str, Any], info: dict[str, Any] | None = None,
                   overwrite: bool = False) -> None:
    """Refuse to resume into a folder whose outputs another model or other settings made; record this run.

    Skipping inputs whose outputs exist is only right when the same model with the same settings made
    them: otherwise the folder would silently mix two models' masks. ``identity`` (e.g. bundle, checkpoint
    hash, settings) is compared with the folder's ``run.json``; ``info`` (e.g. the checkpoint's path) is
    recorded but not compared. A folder without a record (new, or written by an older version) is taken
    as it is. ``overwrite`` redoes the inputs anyway, so it replaces the record.

    Raises:
        DataError: the recorded run differs; the message names what differs and the two ways out.
    """
    path = folder / RUN_RECORD
    identity = json.loads(json.dumps(identity, default=str))  # compare as the record stores it
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text()).get("identity")
        except (OSError, ValueError, AttributeError):
            old = None  # unreadable: our own file, rewritten below
        if isinstance(old, dict) and old != identity:
            changed = []
            for key, value in identity.items():
                before = old.get(key)
                if before == value:
                    continue
                if isinstance(value, dict) and isinstance(before, dict):  # name the settings that differ
                    keys = sorted(k for k in value.keys() | before.keys() if value.get(k) != before.get(k))
                    changed.append(f"{key} ({', '.join(keys)})")
                else:
                    changed.append(key)
            raise DataError(f"{folder}: holds outputs made with another {' and '.join(changed) or 'run'} "
                            f"(see {RUN_RECORD}); pass --overwrite to redo them, or choose another output folder")
    record = {"identity": identity, **(info or {})}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    """Write the manifest CSV atomically (rewritten after every input, so a crash keeps what was done)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    with atomic_output(path) as tmp:
        tmp.write_text(buffer.getvalue())


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
) -> BatchResult:
    """Segment ``inputs`` one at a time.

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
    """
    result = BatchResult(rows=[ManifestRow(input=f, status="ignored", message=why) for f, why in ignored])
    for item in inputs:
        row = ManifestRow(input=item.source, format=item.format, series_uid=item.series_uid)
        start = time.perf_counter()
        if progress is not None:
            progress.start(item.rel)
        try:
            if item.error:
                raise DataError(item.error)
            row.slices = count(item)
            paths = paths_for(item, row.slices)
            row.mask, row.prob, row.table = (str(paths["mask"]), str(paths.get("prob", "")),
                                             str(paths.get("table", "")))
            if not overwrite and all(p.is_file() for p in paths.values()):
                row.status, row.message = "skipped", "outputs exist (use --overwrite to redo)"
            else:
                extra = segment(slice_items(item, row.slices)) or {}
                row.objects = extra.get("objects", "")
                row.status = "ok"
        except Exception as err:  # noqa: BLE001 - the per-input boundary: one bad file never stops the batch
            if on_abort is not None:
                on_abort()
            row.status, row.message = "failed", _message(err, item.source)
        row.seconds = round(time.perf_counter() - start, 3)
        result.rows.append(row)
        write_manifest(manifest, result.rows)
        if progress is not None:
            progress.advance()
    write_manifest(manifest, result.rows)
    return result
