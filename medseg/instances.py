"""Nucleus instance labels: merge per-nucleus masks, 3-class and distance targets, seeded watershed, measurements."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import check_finite_output
from medseg.metrics import FOUR_CONNECTED

#: Column order of :func:`measure_instances` rows and of :func:`write_measurements_csv` files.
MEASUREMENT_FIELDS: tuple[str, ...] = (
    "label",
    "area",
    "centroid_y",
    "centroid_x",
    "bbox_min_y",
    "bbox_min_x",
    "bbox_max_y",
    "bbox_max_x",
    "mean_intensity",
    "area_um2",
    "centroid_y_um",
    "centroid_x_um",
)



class InstanceMerger:
    """Merge per-nucleus binary masks into one label image as they are read, so that only the label image and
    the mask at hand are in memory (a sample of a thousand 1024² masks would otherwise hold them all).

    Masks get labels 1, 2, ... in the order added. Where masks overlap, the pixel keeps the earlier (lower)
    label. A mask that claims no pixel (empty, or covered by earlier masks) is skipped, so the labels stay
    consecutive.

    Args:
        shape: ``(H, W)`` of the masks.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise ValueError(f"masks must be 2D (H, W), got shape {tuple(shape)}")
        self.shape = tuple(shape)
        self.labels = np.zeros(self.shape, np.int32)
        self.count = 0  # labels given
        self.added = 0  # masks added, empty ones too

    def add(self, mask: np.ndarray) -> bool:
        """Add ``mask`` (``(H, W)``, boolean or 0/255: any non-zero value is foreground); whether it gave an
        object (not when it is empty or wholly under earlier masks)."""
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise ValueError(f"mask {self.added} has shape {mask.shape}, the masks have shape {self.shape}")
        self.added += 1
        claimed = (mask != 0) & (self.labels == 0)
        if not np.any(claimed):
            return False
        self.count += 1
        self.labels[claimed] = self.count
        return True


def merge_instance_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Merge per-nucleus binary masks into one label image (see :class:`InstanceMerger`).

    Args:
        masks: ``(H, W)`` masks of one shape, boolean or 0/255 (any non-zero value is foreground).

    Returns:
        ``(H, W)`` int32 labels, 0 = background.

    Raises:
        ValueError: when there are no masks or a mask's shape differs from the first one's.
    """
    if len(masks) == 0:
        raise ValueError("need at least one mask")
    merger = InstanceMerger(np.shape(masks[0]))
    for mask in masks:
        merger.add(mask)
    return merger.labels


def instance_targets(labels: np.ndarray, boundary_width: int = 2, boundary: str = "outline") -> np.ndarray:
    """Three-class training target of a nucleus label image: 0 background, 1 interior, 2 boundary.

    A nucleus pixel is boundary when a pixel of another label (background or another nucleus) lies
    within ``boundary_width`` pixels of it (Chebyshev distance, i.e. in its ``(2w+1)²`` window), so
    touching nuclei are always separated by boundary pixels. The image border does not count as
    background (a nucleus cut by the border is not outlined there). Nuclei no wider than
    ``2 * boundary_width`` have no interior and stay all boundary.

    With ``boundary="touching"`` only the pixels within ``boundary_width`` of *another nucleus* are
    boundary: the edge against the background stays interior, so a small isolated nucleus is all interior
    (a seed of its own) and the boundary class marks just the lines that separate touching nuclei.

    Args:
        labels: ``(H, W)`` integer instance labels, 0 = background.
        boundary_width: boundary thickness in pixels, at least 1.
        boundary: ``"outline"`` (every edge of a nucleus) or ``"touching"`` (only edges shared with
            another nucleus).

    Returns:
        ``(H, W)`` uint8 target.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D (H, W), got shape {labels.shape}")
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be at least 1, got {boundary_width}")
    if boundary not in ("outline", "touching"):
        raise ValueError(f"boundary={boundary!r}: unknown; use 'outline' or 'touching'")
    size = 2 * boundary_width + 1
    # a pixel is interior when every label in its window equals its own: window min == max == label
    # ("touching": background pixels in the window do not count, as if they carried the pixel's own label)
    if boundary == "touching":
        wide = labels.astype(np.int64)  # room for max + 1 whatever the label dtype
        low = ndimage.minimum_filter(np.where(wide == 0, wide.max() + 1, wide), size=size, mode="nearest")
    else:
        low = ndimage.minimum_filter(labels, size=size, mode="nearest")
    high = ndimage.maximum_filter(labels, size=size, mode="nearest")
    fg = labels != 0
    target = np.zeros(labels.shape, np.uint8)
    target[fg] = 2
    target[fg & (low == labels) & (high == labels)] = 1
    return target


def instance_distance_map(labels: np.ndarray) -> np.ndarray:
    """Each object's Euclidean distance to its own outline, divided by its largest value.

    Every object peaks at 1 at its centre (its widest inscribed circle) and falls towards its edge, whatever
    its size; background is 0. Objects are measured alone, so two touching objects each keep their own
    peak and meet in a valley of low values. Pixels beyond the image edge count as outside.

    Args:
        labels: ``(H, W)`` instance labels, 0 = background.

    Returns:
        ``(H, W)`` float32 in ``[0, 1]``.
    """
    labels = np.asarray(labels).astype(np.int64)
    out = np.zeros(labels.shape, np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[(slice(1, -1),) * mask.ndim]
        out[box][mask] = (dist[mask] / dist.max()).astype(np.float32)
    return out


def watershed_instances(
    prob: np.ndarray,
    fg_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_seed_area: int = 4,
    min_area: int = 8,
) -> np.ndarray:
    """Nucleus instances from a 3-class probability map (and optional distance map) by seeded watershed.

    Foreground is ``1 - prob[0] > fg_threshold``. The seed map is the interior probability ``prob[1]``,
    or, when a fourth channel is given, that channel: a predicted normalised distance to the nucleus
    outline (:func:`instance_distance_map`), which peaks at each nucleus's centre even where touching
    nuclei show no gap. Seeds are the 4-connected components of ``seed map > seed_threshold`` with at
    least ``min_seed_area`` pixels; they flood the foreground over the elevation ``1 - seed map`` (high
    on boundaries and background), which splits touching nuclei along their shared boundary. Foreground
    components reached by no seed are kept as instances of their own, so no nucleus is lost. Instances
    under ``min_area`` pixels are dropped and the rest are numbered 1, 2, ... .

    Args:
        prob: ``(3, H, W)`` softmax probabilities (background, interior, boundary), optionally followed by
            a distance channel: ``(4, H, W)``.
        fg_threshold: threshold on the foreground probability ``1 - prob[0]``.
        seed_threshold: threshold on the seed map (interior probability, or distance) for seeds.
        min_seed_area: smallest seed, in pixels.
        min_area: smallest kept instance, in pixels.

    Returns:
        ``(H, W)`` int32 labels, 0 = background.
    """
    from skimage.segmentation import relabel_sequential, watershed

    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 3 or prob.shape[0] not in (3, 4):
        raise ValueError(f"prob must be (3, H, W) or (4, H, W), got shape {prob.shape}")
    foreground = (1.0 - prob[0]) > fg_threshold
    seed_map = prob[3] if prob.shape[0] == 4 else prob[1]
    seeds, n_seeds = ndimage.label((seed_map > seed_threshold) & foreground, structure=FOUR_CONNECTED)
    if n_seeds:
        sizes = np.bincount(seeds.ravel())
        keep = sizes >= min_seed_area
        keep[0] = False
        seeds = np.where(keep[seeds], seeds, 0)
    if np.any(seeds):
        labels = watershed(1.0 - seed_map, markers=seeds, mask=foreground, connectivity=1).astype(np.int64)
    else:
        labels = np.zeros(foreground.shape, np.int64)
    leftover, _ = ndimage.label(foreground & (labels == 0), structure=FOUR_CONNECTED)
    labels = np.where(leftover > 0, leftover + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_area
    small[0] = True
    labels[small[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)


class WatershedInstances:
    """Callable wrapper of :func:`watershed_instances` with fixed thresholds, for bundle configs.

    Args:
        fg_threshold: threshold on the foreground probability ``1 - prob[0]``.
        seed_threshold: threshold on the seed map (interior probability, or distance) for seeds.
        min_seed_area: smallest seed, in pixels.
        min_area: smallest kept instance, in pixels.
    """

    def __init__(
        self, fg_threshold: float = 0.5, seed_threshold: float = 0.5, min_seed_area: int = 4, min_area: int = 8
    ) -> None:
        self.fg_threshold = fg_threshold
        self.seed_threshold = seed_threshold
        self.min_seed_area = min_seed_area
        self.min_area = min_area

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        """Instance labels ``(H, W)`` int32 of a ``(3 or 4, H, W)`` probability map (torch tensors are accepted)."""
        from monai.utils import convert_to_numpy

        prob = convert_to_numpy(prob, wrap_sequence=True)
        check_finite_output(prob)
        return watershed_instances(prob, self.fg_threshold, self.seed_threshold, self.min_seed_area, self.min_area)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fg_threshold={self.fg_threshold}, seed_threshold={self.seed_threshold}, "
            f"min_seed_area={self.min_seed_area}, min_area={self.min_area})"
        )


def measure_instances(
    labels: np.ndarray, intensity: np.ndarray | None = None, spacing: Sequence[float] | None = None,
    pixel_um: Sequence[float] | None = None,
) -> list[dict]:
    """Per-nucleus measurements, one row per label in increasing label order.

    Rows have the keys of :data:`MEASUREMENT_FIELDS`. The bounding box is in pixels, with exclusive
    maxima (``labels[min_y:max_y, min_x:max_x]`` holds the nucleus). Without ``spacing``, area is a
    pixel count and centroids are pixel coordinates; with it, both are in its units (area in units²).
    ``mean_intensity`` is None without ``intensity``. ``area_um2``, ``centroid_y_um`` and ``centroid_x_um``
    are the area and centroid in micrometres (the centroid from the first pixel's centre, as in pixels) for
    a pixel of ``pixel_um``, None without it. Floats keep 3 decimals and at least 7 significant digits
    (a float image's values of 1e-4, or an area in cm², are not rounded away). Centroids count from the centre
    of the first pixel (skimage's convention: a nucleus of the one pixel ``[0, 0]`` has its centroid at 0, 0;
    ImageJ's and QuPath's, from the pixel's corner, say 0.5, 0.5).

    Args:
        labels: ``(H, W)`` integer labels, 0 = background.
        intensity: ``(H, W)`` or ``(C, H, W)`` image; channels are averaged into one gray image first.
        spacing: ``(y, x)`` pixel size.
        pixel_um: ``(y, x)`` pixel size in micrometres (the image's calibration), for the ``_um`` columns.

    Returns:
        Plain-Python dicts; ``[]`` when there is no nucleus.
    """
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D (H, W), got shape {labels.shape}")
    if not np.any(labels):
        return []
    gray = None
    if intensity is not None:
        gray = np.asarray(intensity, dtype=np.float64)
        if gray.ndim == 3:
            gray = gray.mean(axis=0)
        if gray.shape != labels.shape:
            raise ValueError(f"intensity shape {np.shape(intensity)} does not match labels shape {labels.shape}")
    props = ["label", "area", "centroid", "bbox"] + (["intensity_mean"] if gray is not None else [])
    kwargs = {} if spacing is None else {"spacing": tuple(float(s) for s in spacing)}
    table = regionprops_table(labels.astype(np.int64), intensity_image=gray, properties=props, **kwargs)
    if pixel_um is not None:
        um_y, um_x = (float(v) for v in pixel_um)
        if not (um_y > 0 and um_x > 0 and math.isfinite(um_y * um_x)):
            raise ValueError(f"pixel_um must be two positive sizes, got {tuple(pixel_um)}")
    per_px = (1.0, 1.0) if spacing is None else tuple(float(v) for v in spacing)  # the table's units per pixel
    rows = []
    for i in range(len(table["label"])):
        area = float(table["area"][i])
        calibrated = {"area_um2": None, "centroid_y_um": None, "centroid_x_um": None} if pixel_um is None else {
            "area_um2": _significant(area / (per_px[0] * per_px[1]) * um_y * um_x),
            "centroid_y_um": _significant(table["centroid-0"][i] / per_px[0] * um_y),
            "centroid_x_um": _significant(table["centroid-1"][i] / per_px[1] * um_x),
        }
        rows.append(
            {
                "label": int(table["label"][i]),
                "area": int(round(area)) if spacing is None else _significant(area),
                "centroid_y": _significant(table["centroid-0"][i]),
                "centroid_x": _significant(table["centroid-1"][i]),
                "bbox_min_y": int(table["bbox-0"][i]),
                "bbox_min_x": int(table["bbox-1"][i]),
                "bbox_max_y": int(table["bbox-2"][i]),
                "bbox_max_x": int(table["bbox-3"][i]),
                "mean_intensity": None if gray is None else _significant(table["intensity_mean"][i]),
                **calibrated,
            }
        )
    return rows


def _significant(value: Any, decimals: int = 3, digits: int = 7) -> float:
    """``value`` as a float rounded to ``decimals`` decimals, or more where it needs them to keep ``digits``
    significant digits (a centroid at 111110.333 keeps its 3 decimals, a mean of 6.2e-5 its digits)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, max(decimals, digits - 1 - math.floor(math.log10(abs(value)))))


def write_measurements_csv(path: str | os.PathLike, rows: Sequence[dict], slices: bool | None = None) -> Path:
    """Write :func:`measure_instances` rows as CSV, atomically; the header is written even with no rows.

    Missing keys and None values are written as empty cells. ``slices`` adds the ``slice`` column (``None``:
    when a row has one), so a stack's table has it even when no slice holds an object.
    """
    from medseg.io import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if slices is None:
                slices = any("slice" in r for r in rows)
            fields = (("slice",) if slices else ()) + MEASUREMENT_FIELDS
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)
