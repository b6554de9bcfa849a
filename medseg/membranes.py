"""Closed cell contours for membrane maps: watershed superpixels merged along weak boundaries.

A network's interior probability map has gaps in faint membranes (two cells merge at every threshold)
and dark organelles inside cells (one cell splits). Both cost the ISBI V_rand much more than the pixels
involved. :func:`agglomerate_cells` over-segments the map by a seeded watershed on the smoothed membrane
probability and merges neighbouring regions, weakest shared boundary first, while the mean membrane
probability along the boundary stays below ``merge_threshold`` (hierarchical region merging on a region
adjacency graph, as in the agglomeration entries of the ISBI 2012 challenge). :func:`close_contours`
writes the result back into the probability map: the 1-pixel lines between the merged cells
become 0 (membrane), and every other pixel keeps its probability but is raised to at least ``floor``.
Thresholds at or above 0.5 therefore see the network's own map with the closed contours added, and
thresholds below ``floor`` see exactly the agglomerated cells; the binary mask at 0.5 changes only on
the lines.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy
from scipy import ndimage

from medseg.bundle import config_flag
from medseg.errors import check_finite_output


def _merged_boundary(graph: Any, src: int, dst: int, n: int) -> dict[str, float]:
    # the boundary of a merged region with neighbour n: pixel-count-weighted mean of both boundaries
    empty = {"weight": 0.0, "count": 0}
    a, b = graph[dst].get(n, empty), graph[src].get(n, empty)
    count = a["count"] + b["count"]
    return {"count": count, "weight": (a["count"] * a["weight"] + b["count"] * b["weight"]) / max(count, 1)}


#: Seeds of slices larger than a tile are found tile by tile (h-minima needs about 140 bytes per pixel, the
#: rest of the closing about 20), each tile seen with this margin of context around it.
SEED_TILE, SEED_MARGIN = 1024, 128


def _seeds(membrane: np.ndarray, depth: float, tile: int, margin: int) -> np.ndarray:
    """The h-minima of ``membrane`` of at least ``depth``: of the whole map, or of ``tile``-sized pieces, each
    computed with ``margin`` pixels of context (a minimum's depth is decided at the membrane around its
    cell, well within the margin for cells up to about twice its size)."""
    from skimage.morphology import h_minima

    if tile < 0 or margin < 0:
        raise ValueError(f"seed_tile and seed_margin must be >= 0, got {tile} and {margin}")
    h, w = membrane.shape
    if tile == 0 or (h <= tile + 2 * margin and w <= tile + 2 * margin):
        return h_minima(membrane, depth).astype(bool)
    seeds = np.zeros(membrane.shape, bool)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            top, left = max(0, y - margin), max(0, x - margin)
            piece = h_minima(membrane[top:min(h, y + tile + margin), left:min(w, x + tile + margin)], depth)
            seeds[y:y + tile, x:x + tile] = piece[y - top:y - top + tile, x - left:x - left + tile]
    return seeds


def agglomerate_cells(prob: np.ndarray, merge_threshold: float = 0.65, sigma: float = 1.0,
                      seed_depth: float = 0.05, seed_tile: int = SEED_TILE,
                      seed_margin: int = SEED_MARGIN) -> np.ndarray:
    """Cells of a 2D interior probability map, separated by 1-pixel lines of label 0.

    Args:
        prob: ``(H, W)`` interior probability in [0, 1].
        merge_threshold: neighbouring regions merge while the mean membrane probability ``1 - prob``
            (smoothed) along their shared boundary is below this; 0 keeps every superpixel.
        sigma: Gaussian smoothing of the membrane map, in pixels.
        seed_depth: minimum depth of a membrane-map minimum to seed a superpixel (h-minima).
        seed_tile, seed_margin: on larger slices the seeds are found in tiles of this size with this
            context (memory: about 20 bytes per pixel of the slice instead of 140); 0 takes the whole slice.

    Returns:
        ``(H, W)`` int32 labels, 1... for cells, 0 on the lines between them (4-connected separation).
    """
    from skimage.graph import merge_hierarchical, rag_boundary
    from skimage.segmentation import watershed

    membrane = np.asarray(prob, dtype=np.float64)
    if membrane.ndim != 2:
        raise ValueError(f"agglomerate_cells takes one (H, W) map, got shape {membrane.shape}")
    membrane = ndimage.gaussian_filter(1.0 - membrane, sigma) if sigma > 0 else 1.0 - membrane
    seeds, n = ndimage.label(_seeds(membrane, seed_depth, int(seed_tile), int(seed_margin)), structure=np.ones((3, 3)))
    if n < 2:
        return np.ones(membrane.shape, np.int32)
    regions = watershed(membrane, seeds, connectivity=1)
    if merge_threshold > 0:
        graph = rag_boundary(regions, membrane)
        regions = merge_hierarchical(regions, graph, thresh=merge_threshold, rag_copy=False, in_place_merge=True,
                                     merge_func=lambda *_: None, weight_func=_merged_boundary) + 1
    return _with_lines(regions, membrane)


def _with_lines(regions: np.ndarray, membrane: np.ndarray) -> np.ndarray:
    # 1-pixel lines: of every pair of 4-neighbours with different labels, the more membrane-like pixel
    # becomes 0, so no 4-connected path crosses from one region into another
    out = np.asarray(regions, dtype=np.int32).copy()
    line = np.zeros(out.shape, bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        differ = out[tuple(a)] != out[tuple(b)]
        first = membrane[tuple(a)] >= membrane[tuple(b)]
        line[tuple(a)] |= differ & first
        line[tuple(b)] |= differ & ~first
    out[line] = 0
    return out


def close_contours(prob: np.ndarray, merge_threshold: float = 0.65, floor: float = 0.45, sigma: float = 1.0,
                   seed_depth: float = 0.05) -> np.ndarray:
    """``prob`` with the lines of :func:`agglomerate_cells` set to 0 and every other pixel at least ``floor``."""
    prob = np.asarray(prob, dtype=np.float32)
    check_finite_output(prob)
    cells = agglomerate_cells(prob, merge_threshold, sigma, seed_depth)
    out = np.maximum(prob, np.float32(floor))
    out[cells == 0] = 0.0
    return out


class CloseContoursd(MapTransform):
    """:func:`close_contours` on the interior channel of softmax outputs ``(C, H, W)`` or ``(C, Z, H, W)``.

    The interior channel ``channel`` is replaced by the closed map and, for two channels, the other
    channel by its complement, so that ``argmax`` and thresholds agree. Volumes are closed slice by slice.

    Args:
        keys: keys of the probability outputs.
        channel: the interior (cell) channel.
        merge_threshold, floor, sigma, seed_depth: see :func:`close_contours`.
        enabled: ``False`` passes the data through (one switch in a bundle config).
    """

    def __init__(self, keys: KeysCollection, channel: int = 1, merge_threshold: float = 0.65, floor: float = 0.45,
                 sigma: float = 1.0, seed_depth: float = 0.05, enabled: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channel, self.enabled = int(channel), config_flag(enabled, "close_contours")
        self.kwargs = {"merge_threshold": float(merge_threshold), "floor": float(floor), "sigma": float(sigma),
                       "seed_depth": float(seed_depth)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            prob = d[key]
            arr = convert_to_numpy(prob, wrap_sequence=True)
            if arr.ndim not in (3, 4) or not 0 <= self.channel < arr.shape[0]:
                raise ValueError(f"'{key}': expected (C, H, W) or (C, Z, H, W) probabilities with channel "
                                 f"{self.channel}, got shape {arr.shape}")
            interior = arr[self.channel]
            closed = (close_contours(interior, **self.kwargs) if interior.ndim == 2
                      else np.stack([close_contours(s, **self.kwargs) for s in interior]))
            out = arr.astype(np.float32, copy=True)
            out[self.channel] = closed
            if arr.shape[0] == 2:
                out[1 - self.channel] = 1.0 - closed
            if isinstance(prob, torch.Tensor):
                new = torch.as_tensor(out, device=prob.device)
                d[key] = prob.clone().copy_(new) if hasattr(prob, "meta") else new
            else:
                d[key] = out
        return d
