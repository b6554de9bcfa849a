"""A trained model as a bundle of its own: the bundle, its weights, and the training's settings in its configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from medseg.errors import CheckpointError, DataError, MedsegError

#: What a bundle folder holds that goes into the export (MONAI's bundle layout less ``models/``): not the data,
#: runs or evaluations a plain ``monai.bundle run`` may have put inside it
BUNDLE_PARTS = ("configs", "docs", "scripts", "LICENSE")
#: Ids of a run's record that say where it was tracked (older records also held MLflow handlers): not the
#: receiver's business, and a plain ``monai.bundle run`` of the record would log into the sender's store
_TRACKING_IDS = ("_tracking_", "tracking_uri", "tracking_store", "experiment_name", "run_name", "save_execute_config")


def export_bundle(bundle: str | os.PathLike, checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """Write ``bundle`` with ``checkpoint`` as its ``models/model.pt`` into ``output_dir``, a bundle that runs the
    model alike with ``medseg`` and with MONAI's own runner (``python -m monai.bundle run``).

    The bundle's :data:`BUNDLE_PARTS` are copied. The ids of its configs that the checkpoint's training changed
    (those ``medseg evaluate`` and ``infer`` take from the run's ``config.json``: network size, loss, classes,
    ...) are written into the config files that hold them, as MONAI reads no training record. The run's
    ``config.json`` (less where the run was tracked) and ``split.json`` go beside the weights. The folder
    appears whole or not at all.

    Returns:
        what was written: ``output_dir``, ``checkpoint``, its ``sha256`` and ``settings`` (id -> value written).

    Raises:
        MedsegError: ``output_dir`` exists or lies inside the bundle, or a file cannot be read or written.
        CheckpointError: ``checkpoint`` is missing, or another bundle's training made it.
    """
    import tempfile

    from medseg.bundle import bundle_configs
    from medseg.io import file_sha256
    from medseg.runfolder import run_file, training_settings

    bundle, checkpoint, out = Path(bundle), Path(checkpoint), Path(output_dir)
    bundle_configs(bundle, "infer")  # a bundle folder, or its one-line error
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found; give a run's model.pt")
    if out.exists() or out.is_symlink():
        raise MedsegError(f"{out}: already exists; give a new folder for the exported bundle")
    if out.absolute().resolve().is_relative_to(bundle.resolve()):
        raise MedsegError(f"{out}: inside the bundle {bundle}; give a folder outside it")
    settings = training_settings(bundle, [checkpoint], {}).values
    part = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))  # this export's own
        for name in BUNDLE_PARTS:
            source = bundle / name
            if source.is_dir():
                shutil.copytree(source, part / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.is_file():
                shutil.copyfile(source, part / name)
        for config in sorted((part / "configs").glob("*.json")):
            if config.name != "metadata.json":
                _write_settings(config, settings)
        (part / "models").mkdir()
        shutil.copyfile(checkpoint, part / "models" / "model.pt")
        split, record = run_file(checkpoint, "split.json"), run_file(checkpoint, "config.json")  # those read
        if split.is_file():
            shutil.copyfile(split, part / "models" / "split.json")
        if record.is_file():
            _write_record(record, part / "models" / "config.json")
        part.rename(out)  # fails when another export made the folder meanwhile
    except OSError as err:
        if part is not None:
            shutil.rmtree(part, ignore_errors=True)
        if out.exists():
            raise MedsegError(f"{out}: already exists (made meanwhile); give a new folder for the exported "
                              "bundle") from err
        where = err.filename if isinstance(getattr(err, "filename", None), (str, os.PathLike)) else out
        raise MedsegError(f"{where}: cannot export the bundle ({err.strerror or type(err).__name__}); check the "
                          "files and the free space") from err
    except BaseException:
        if part is not None:
            shutil.rmtree(part, ignore_errors=True)
        raise
    return {"output_dir": str(out), "checkpoint": str(checkpoint), "sha256": file_sha256(out / "models" / "model.pt"),
            "settings": settings}


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


def _write_settings(config: Path, settings: dict[str, Any]) -> None:
    """Set each id of ``settings`` (``a#b`` for a nested one) that ``config`` holds to its value, in place."""
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{config}: cannot read the bundle's config ({err}); fix or remove it") from err
    changed = False
    for key, value in settings.items():
        *parents, leaf = key.split("#")
        node = content
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and (leaf in node or parents):
            node[leaf] = value
            changed = True
    if changed:
        config.write_text(json.dumps(content, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
