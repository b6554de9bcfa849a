"""Describe the installation: package versions, compute device and the bundles found in a folder."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

#: Distributions whose versions ``medseg info`` reports.
PACKAGES = ("medseg", "torch", "monai", "pytorch-ignite", "mlflow", "numpy", "tifffile", "pydicom",
            "nibabel", "itk", "typer", "pillow", "scikit-image", "imagecodecs", "python-gdcm")


def collect_info(bundles_dir: str | Path = "bundles") -> dict[str, Any]:
    """Versions, device and ``{bundle name: version, task}`` for each bundle under ``bundles_dir``."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    device = {
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torch_threads": torch.get_num_threads(),
    }
    bundles = {}
    for meta in sorted(Path(bundles_dir).glob("*/configs/metadata.json")):
        entry: dict = {"path": str(meta.parent.parent)}
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            entry.update(version=data.get("version"), task=data.get("task"))
        except (OSError, ValueError) as err:  # one broken bundle does not hide the others
            entry["error"] = f"{meta}: unreadable metadata ({str(err).splitlines()[0]}); fix or remove it"
        bundles[meta.parent.parent.name] = entry
    return {"python": platform.python_version(), "versions": versions, "device": device, "bundles": bundles}
