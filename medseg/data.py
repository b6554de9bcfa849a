"""Find image/label pairs in the ISBI 2012 layouts and split them deterministically into train/validation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from medseg.errors import DataError
from medseg.readers import count_slices

#: Image types accepted as training data (2D slices and TIFF stacks).
SUPPORTED_SUFFIXES = (".png", ".tif", ".tiff")

#: Challenge file names of the original ISBI 2012 release (multi-page TIFF stacks).
ISBI_STACKS = ("train-volume.tif", "train-labels.tif")


def _natural_key(path: Path) -> tuple:
    """Sort ``2.png`` before ``10.png``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES),
        key=_natural_key,
    )


def find_pairs(root: str | os.PathLike) -> list[dict]:
    """List the labelled slices under ``root`` as ``{"image", "label", "page", "name"}`` dicts.

    Two layouts are recognised (``root`` may also be their ``train`` sub-folder):

    * PNG/TIFF pairs: ``[train/]image/NAME`` with ``[train/]label/NAME`` (same stem, any supported suffix);
    * the challenge stacks ``train-volume.tif`` + ``train-labels.tif``: one entry per page.

    Raises:
        DataError: the folder does not exist, has neither layout, or an image has no label.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data pointing to the ISBI 2012 folder")
    for base in (root, root / "train"):
        volume, labels = (base / n for n in ISBI_STACKS)
        if volume.is_file():
            return _stack_pairs(volume, labels)
        if (base / "image").is_dir():
            return _folder_pairs(base / "image", base / "label")
    raise DataError(
        f"{root}: no training data found; expected image/ + label/ folders or "
        f"{ISBI_STACKS[0]} + {ISBI_STACKS[1]}"
    )


def _folder_pairs(image_dir: Path, label_dir: Path) -> list[dict]:
    if not label_dir.is_dir():
        raise DataError(f"{label_dir}: label folder not found; put one label per image there")
    labels = {p.stem: p for p in _images_in(label_dir)}
    pairs = []
    for image in _images_in(image_dir):
        label = labels.get(image.stem)
        if label is None:
            raise DataError(f"{image}: no label found; add {label_dir / image.name} or remove the image")
        pairs.append({"image": str(image), "label": str(label), "page": 0, "name": image.stem})
    if not pairs:
        raise DataError(f"{image_dir}: no images (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})")
    return pairs


def _stack_pairs(volume: Path, labels: Path) -> list[dict]:
    if not labels.is_file():
        raise DataError(f"{volume}: no label stack; add {labels} next to it")
    n_img, n_lab = count_slices(volume), count_slices(labels)
    if n_img != n_lab:
        raise DataError(f"{labels}: {n_lab} label slices for {n_img} image slices; the stacks must match")
    return [
        {"image": str(volume), "label": str(labels), "page": k, "name": f"{volume.stem}_{k:03d}"}
        for k in range(n_img)
    ]


def split_pairs(pairs: list[dict], val_count: int) -> dict[str, list[dict]]:
    """Split ordered slices into train and validation: the last ``val_count`` slices validate.

    A contiguous block (not a random draw) keeps neighbouring, near-identical EM sections from
    leaking between the two sets, so validation scores stay honest.

    Raises:
        DataError: fewer than ``val_count + 1`` slices.
    """
    if val_count < 0 or val_count >= len(pairs):
        raise DataError(f"cannot hold out {val_count} validation slices from {len(pairs)}; lower val_count")
    if val_count == 0:
        return {"train": list(pairs), "val": []}
    return {"train": pairs[:-val_count], "val": pairs[-val_count:]}


def isbi_split(data_dir: str | os.PathLike, val_count: int = 5, save_to: str | None = None) -> dict:
    """Find pairs under ``data_dir`` and split them into ``train``, ``val`` (and ``all``, both together).

    If ``save_to`` is a folder, the split is recorded there as ``split.json``.
    """
    pairs = find_pairs(data_dir)
    split = split_pairs(pairs, val_count)
    if save_to:
        out = Path(save_to)
        out.mkdir(parents=True, exist_ok=True)
        record = {k: [d["name"] for d in v] for k, v in split.items()}
        record["data_dir"] = str(Path(data_dir).resolve())
        (out / "split.json").write_text(json.dumps(record, indent=2))
    return {**split, "all": pairs}
