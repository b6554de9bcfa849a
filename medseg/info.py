"""Describe the installation (package versions, compute device, bundles found) and what a run ran with."""

from __future__ import annotations

import json
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

#: Distributions whose versions ``medseg info`` reports.
PACKAGES = ("medseg", "torch", "monai", "pytorch-ignite", "mlflow", "numpy", "tifffile", "pydicom",
            "nibabel", "itk", "typer", "pillow", "scikit-image", "imagecodecs", "python-gdcm")


def _versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _source_commit() -> str | None:
    """The git commit of the medseg source in use (``+dirty`` with local changes); None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def environment(device: Any = None, amp: bool | None = None) -> dict[str, Any]:
    """What a run ran with, for its record: the command line and folder, versions, machine, threads, device
    (and on a CPU whether bfloat16 autocast is available to it), whether CUDA mixed precision (``amp``) was
    on, the medseg source's git commit."""
    import os
    import shlex
    import sys

    import torch

    try:
        cwd: str | None = os.getcwd()
    except OSError:  # the folder was removed meanwhile
        cwd = None
    # user:password@ in a URL (a tracking server's) is not for a record that is shared and logged to MLflow
    command = " ".join(shlex.quote(re.sub(r"(?<=://)[^/@\s]+@", "***@", a)) for a in sys.argv)
    env: dict[str, Any] = {
        "command": command, "cwd": cwd,
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "versions": _versions(),
    }
    if device is not None:
        env["device"] = str(device)
        if getattr(device, "type", "") == "cuda":
            env["cuda_device"] = torch.cuda.get_device_name(device)
        else:
            from medseg.inferers import cpu_bf16_supported

            env["cpu_bf16_available"] = cpu_bf16_supported()
    if amp is not None:  # whether CUDA mixed precision ran: the setting does nothing on a CPU
        env["amp"] = bool(amp) and getattr(device, "type", "") == "cuda"
    commit = _source_commit()
    if commit:
        env["medseg_commit"] = commit
    return env


def collect_info(bundles_dir: str | Path = "bundles") -> dict[str, Any]:
    """Versions, device and ``{bundle name: version, task}`` for each bundle under ``bundles_dir``."""
    import torch

    from medseg.bundle import validate_metadata
    from medseg.errors import BundleError

    versions = _versions()
    cuda = torch.cuda.is_available()
    device = {
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torch_threads": torch.get_num_threads(),
    }
    bundles = {}
    for meta in sorted(Path(bundles_dir).glob("[!.]*/configs/metadata.json")):  # not an export being made
        entry: dict = {"path": str(meta.parent.parent)}
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            entry.update(version=data.get("version"), task=data.get("task"))
        except (OSError, ValueError) as err:  # one broken bundle does not hide the others
            entry["error"] = f"{meta}: unreadable metadata ({str(err).splitlines()[0]}); fix or remove it"
        else:
            try:
                validate_metadata(meta.parent.parent)
            except BundleError as err:  # it still runs where name and version are there; say what to fix
                entry["metadata_problem"] = str(err)
        bundles[meta.parent.parent.name] = entry
    return {"python": platform.python_version(), "versions": versions, "device": device, "bundles": bundles}
