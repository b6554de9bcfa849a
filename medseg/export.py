"""A trained model as a bundle of its own: the bundle, its weights, and the training's settings in its configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from medseg.errors import CheckpointError, DataError, MedsegError

#: What a run leaves beside its model.pt that goes with the weights: the training's record and its split
RUN_RECORDS = ("config.json", "split.json")
#: Folders of a bundle that are not part of a copy: the weights it had, evaluations and outputs made inside it
_LEFT_OUT = ("models", "eval", "eval_ensemble", "__pycache__", ".ipynb_checkpoints")


def export_bundle(bundle: str | os.PathLike, checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """Write ``bundle`` with ``checkpoint`` as its ``models/model.pt`` into ``output_dir``, a bundle that runs the
    model alike with ``medseg`` and with MONAI's own runner (``python -m monai.bundle run``).

    The ids of the bundle's configs that the checkpoint's training changed (those ``medseg evaluate`` and
    ``infer`` take from the run's ``config.json``: network size, loss, classes, ...) are written into the
    config files that hold them, as MONAI reads no training record. The run's ``config.json`` and
    ``split.json`` go beside the weights. The folder appears whole or not at all.

    Returns:
        what was written: ``output_dir``, ``checkpoint``, and ``settings`` (id -> value written).

    Raises:
        MedsegError: ``output_dir`` exists, or a file cannot be read or written.
        CheckpointError: ``checkpoint`` is missing, or another bundle's training made it.
    """
    from medseg.bundle import bundle_configs
    from medseg.io import file_sha256
    from medseg.runfolder import training_settings

    bundle, checkpoint, out = Path(bundle), Path(checkpoint), Path(output_dir)
    bundle_configs(bundle, "infer")  # a bundle folder, or its one-line error
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found; give a run's model.pt")
    if out.exists() or out.is_symlink():
        raise MedsegError(f"{out}: already exists; give a new folder for the exported bundle")
    settings = training_settings(bundle, [checkpoint], {}).values
    run = checkpoint.resolve().parent
    part = out.with_name(f".{out.name}.part")
    if part.exists():
        shutil.rmtree(part)  # what an export killed midway left
    try:
        shutil.copytree(bundle, part, ignore=shutil.ignore_patterns(*_LEFT_OUT))
        for config in sorted((part / "configs").glob("*.json")):
            if config.name != "metadata.json":
                _write_settings(config, settings)
        (part / "models").mkdir()
        shutil.copyfile(checkpoint, part / "models" / "model.pt")
        for name in RUN_RECORDS:
            if (run / name).is_file():
                shutil.copyfile(run / name, part / "models" / name)
        part.rename(out)
    except OSError as err:
        shutil.rmtree(part, ignore_errors=True)
        raise MedsegError(f"{getattr(err, 'filename', None) or out}: cannot export the bundle "
                          f"({err.strerror or err}); check the folder and free space") from err
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return {"output_dir": str(out), "checkpoint": str(checkpoint), "sha256": file_sha256(out / "models" / "model.pt"),
            "settings": settings}


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
