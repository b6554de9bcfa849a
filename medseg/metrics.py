"""Segmentation metrics: Dice, IoU, pixel accuracy and error, and the ISBI 2012 challenge's V_rand and V_info.

All functions take numpy arrays for one 2D slice unless said otherwise. Probability maps are float
in [0, 1] with high values for the foreground (cell interior for ISBI); labels are binary.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage


def _challenge_thresholds() -> tuple[float, ...]:
    """0.0 to 1.0 in steps of 0.1, summed in double precision as the challenge's scoring loop does.

    The values are 0.30000000000000004, ..., 0.7999999999999999, 0.8999999999999999, 0.9999999999999999,
    so a probability of exactly 1.0 is foreground at the last threshold.
    """
    values, t = [], 0.0
    while t <= 1.0:
        values.append(t)
        t += 0.1
    return tuple(values)


#: The 11 thresholds of the ISBI 2012 scoring, 0.0 to 1.0 in steps of 0.1 (foreground is ``prob > t``), with
#: the rounding of the challenge's own loop; ``round(t, 1)`` gives the nominal value.
ISBI_THRESHOLDS: tuple[float, ...] = _challenge_thresholds()

#: 4-connectivity, as the ISBI 2012 scoring, the U-Net weight map and the seeded watershed use.
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_WSHED, _MASK, _INQUEUE, _FRAME = 0, -2, -3, -4  # the flooding's pixel states (labels are > 0)


def _above(prob: np.ndarray, threshold: float) -> np.ndarray:
    """``prob > threshold`` as the challenge compares: the map in float32, compared in double precision."""
    return np.asarray(prob, dtype=np.float32).astype(np.float64) > threshold


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    return tp, fp, fn, pred.size - tp - fp - fn


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|) of two binary masks; 1.0 when both are empty."""
    tp, fp, fn, _ = _counts(pred, gt)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union |P∩G| / |P∪G| of two binary masks; 1.0 when both are empty."""
    tp, fp, fn, _ = _counts(pred, gt)
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """Fraction of pixels where the binary prediction equals the label."""
    tp, _, _, tn = _counts(pred, gt)
    return (tp + tn) / np.asarray(gt).size


def _check_probabilities(prob: np.ndarray) -> None:
    """Raise ``ValueError`` for a map outside [0, 1] (an 8-bit 0-255 map): every threshold of the sweep but 0
    would see it as all foreground, and the scores would mean nothing."""
    arr = np.asarray(prob)
    if arr.size and (np.nanmin(arr) < -0.01 or np.nanmax(arr) > 1.01):  # rounding of low-precision maps aside
        raise ValueError(f"a probability map must hold values in [0, 1], not {np.nanmin(arr):g}..{np.nanmax(arr):g} "
                         "(an 8-bit map: divide it by 255)")


def pixel_error(prob: np.ndarray | Sequence[np.ndarray], gt: np.ndarray | Sequence[np.ndarray],
                thresholds: Sequence[float] = ISBI_THRESHOLDS) -> float:
    """ISBI 2012 pixel error: 1 − the best foreground F-score of ``prob > t`` over ``thresholds``.

    For a stack (sequences of slices), as the challenge scores one: the pixel counts of all slices are
    added up at each threshold, and one threshold is best for the whole stack.
    """
    probs, gts = ([prob], [gt]) if isinstance(prob, np.ndarray) else (list(prob), list(gt))
    if len(probs) != len(gts):
        raise ValueError(f"need matching lists; got {len(probs)} maps and {len(gts)} labels")
    for p in probs:
        _check_probabilities(p)
    best = 0.0
    for t in thresholds:
        tp = fp = fn = 0
        for p, g in zip(probs, gts, strict=True):
            a, b, c, _ = _counts(_above(p, t), np.asarray(g) > 0)
            tp, fp, fn = tp + a, fp + b, fn + c
        f = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)
        best = max(best, f)
    return 1.0 - best


def thinned_segments(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Proposal segmentation of the ISBI scoring at one threshold: cells, and one-pixel lines (label 0).

    As the challenge's scoring does it (Fiji's ``WatershedTransform2D`` on the binarised map, 4-connected):
    the cells are the 4-connected components of ``prob > threshold``; the boundary pixels between them are
    flooded breadth-first from the cells, in the challenge's pixel and neighbour order, so that each takes
    the cell it is reached from and the pixels where two cells meet stay 0 — lines along the middle of
    each boundary, whatever the map's values inside it. Boundary regions no cell reaches are segments of
    their own.
    """
    return _flood_boundaries(_above(prob, threshold))


def _flood_boundaries(cells: np.ndarray) -> np.ndarray:
    """Vincent–Soille flooding of a two-level image (cells low, boundaries high) with watershed lines."""
    # The challenge scans x-major (columns outer): the rows of the transpose. A frame of FRAME pixels stands
    # for the outside, so neighbours need no bounds checks.
    inside = np.pad(np.asarray(cells, dtype=bool).T, 1)
    labels, n_cells = ndimage.label(inside, structure=FOUR_CONNECTED)
    state = labels.astype(np.int64)
    boundary = ~inside
    boundary[[0, -1], :] = boundary[:, [0, -1]] = False
    touching = np.zeros_like(inside)  # boundary pixels 4-adjacent to a cell start the flooding
    touching[1:] |= inside[:-1]
    touching[:-1] |= inside[1:]
    touching[:, 1:] |= inside[:, :-1]
    touching[:, :-1] |= inside[:, 1:]
    touching &= boundary
    state[boundary] = _MASK
    state[touching] = _INQUEUE
    state[[0, -1], :] = state[:, [0, -1]] = _FRAME
    step = inside.shape[1]
    flat = state.ravel().tolist()  # a list: the loop below reads single pixels, which numpy does slowly
    queue = deque(np.flatnonzero(touching).tolist())
    flag = False
    while queue:
        p = queue.popleft()
        own = _INQUEUE
        for q in (p - step, p - 1, p + step, p + 1):  # the challenge's order: x-1, y-1, x+1, y+1
            other = flat[q]
            if other > 0:
                if own == _INQUEUE or (own == _WSHED and flag):
                    own = other
                elif own > 0 and own != other:
                    own, flag = _WSHED, False
            elif other == _WSHED:
                if own == _INQUEUE:
                    own, flag = _WSHED, True
            elif other == _MASK:
                flat[q] = _INQUEUE
                queue.append(q)
        flat[p] = own
    out = np.asarray(flat, dtype=np.int64).reshape(inside.shape)
    unreached = out == _MASK
    if unreached.any():
        extra, _ = ndimage.label(unreached, structure=FOUR_CONNECTED)
        out[unreached] = extra[unreached] + n_cells
    return out[1:-1, 1:-1].T


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def rand_and_info(gt_cells: np.ndarray, proposal: np.ndarray) -> tuple[float, float]:
    """Foreground-restricted Rand F-score (V_rand) and information-theoretic F-score (V_info) of one slice.

    Only pixels inside ground-truth cells (``gt_cells > 0``) count. Proposal pixels with label 0
    (boundary lines) are singleton segments, one each. As in the challenge's code, V_info is 0 when the
    ground truth or the proposal has zero entropy (a single cell or segment), and NaN when their mutual
    information is 0. A slice without ground-truth cells has nothing to score: both are NaN.

    Args:
        gt_cells: ``(H, W)`` ground-truth cell labels, 0 = membrane (ignored).
        proposal: ``(H, W)`` proposal labels, 0 = boundary.
    """
    mask = np.asarray(gt_cells) > 0
    a = np.asarray(gt_cells)[mask].astype(np.int64)
    b = np.asarray(proposal)[mask].astype(np.int64)
    n = a.size
    if n == 0:
        return math.nan, math.nan
    single = b == 0
    n_single = int(single.sum())
    # contingency counts of (gt cell, proposal segment) over non-singleton pixels; labels are small
    # non-negative integers, so counting by bincount over a joint key is exact and fast
    a_in, b_in = a[~single], b[~single]
    n_ij = np.bincount(a_in * (int(b.max()) + 1) + b_in)
    n_ij = n_ij[n_ij > 0]
    row = np.bincount(a)
    row = row[row > 0]
    col = np.bincount(b_in) if b_in.size else np.zeros(0, np.int64)
    col = col[col > 0]
    # Rand: sums of squared (unnormalised) counts; each singleton adds 1 to the joint and column sums
    sum_ab = float((n_ij.astype(np.float64) ** 2).sum() + n_single)
    sum_a = float((row.astype(np.float64) ** 2).sum())
    sum_b = float((col.astype(np.float64) ** 2).sum() + n_single)
    v_rand = 2.0 * sum_ab / (sum_a + sum_b)
    # information: entropies of the normalised table; singletons have probability 1/n each
    single_h = n_single / n * np.log(n)
    h_a = _entropy(row / n)
    h_b = _entropy(col / n) + single_h
    h_ab = _entropy(n_ij / n) + single_h
    mutual = h_a + h_b - h_ab
    if h_a == 0.0 or h_b == 0.0:  # the challenge's convention: one cell, or one segment, carries no information
        return v_rand, 0.0
    precision, recall = mutual / h_b, mutual / h_a
    if precision + recall == 0.0:  # 0 / 0 in the challenge's code: such a threshold never counts as the best
        return v_rand, float("nan")
    return v_rand, float(2.0 * precision * recall / (precision + recall))


class IsbiStack:
    """The ISBI 2012 scores of a stack, accumulated slice by slice (:meth:`add`).

    Holds a few numbers per slice (V_rand and V_info at each threshold, pixel counts per threshold) rather
    than the maps, so scoring a stack of any length takes the memory of one slice.

    Args:
        thresholds: the probability thresholds the scores are maximised over.
    """

    def __init__(self, thresholds: Sequence[float] = ISBI_THRESHOLDS) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self._table: list[np.ndarray] = []  # per slice: (thresholds, 2) V_rand, V_info
        self._has_cells: list[bool] = []  # per slice: whether its label has a cell to score
        self._counts = np.zeros((len(self.thresholds), 3), dtype=np.int64)  # tp, fp, fn per threshold

    def __len__(self) -> int:
        return len(self._table)

    def add(self, prob: np.ndarray, label: np.ndarray) -> None:
        """Score one slice: ``(H, W)`` interior probability in [0, 1] and binary label (non-zero = interior)."""
        gt = np.asarray(label) > 0
        if np.shape(prob) != gt.shape:
            raise ValueError(f"prediction shape {np.shape(prob)} differs from label shape {gt.shape}")
        _check_probabilities(prob)
        gt_cells = ndimage.label(gt, structure=FOUR_CONNECTED)[0]
        self._table.append(np.array([rand_and_info(gt_cells, thinned_segments(prob, t)) for t in self.thresholds]))
        self._has_cells.append(bool(gt.any()))
        for ti, t in enumerate(self.thresholds):
            self._counts[ti] += _counts(_above(prob, t), gt)[:3]

    def scores(self) -> dict:
        """V_rand and V_info as the challenge computes them (see :func:`isbi_scores`)."""
        if not self._table:
            raise ValueError("no slice scored yet")
        table = np.stack(self._table, axis=1)  # (thresholds, slices, 2)
        # a slice whose label has no cell has no score (the challenge's code divides 0 by 0 there, which makes
        # the stack's score 0): the means are over the others, and a stack of none has no score (NaN)
        scored = table[:, np.array(self._has_cells)]
        if not scored.shape[1]:
            return {**dict.fromkeys(("v_rand", "v_info", "v_rand_threshold", "v_info_threshold"), math.nan),
                    "per_slice_v_rand": [math.nan] * table.shape[1], "per_slice_v_info": [math.nan] * table.shape[1]}
        mean = scored.mean(axis=1)
        best_rand, best_info = _best(mean[:, 0]), _best(mean[:, 1])
        return {
            "v_rand": float(mean[best_rand, 0]) if mean[best_rand, 0] > 0 else 0.0,
            "v_info": float(mean[best_info, 1]) if mean[best_info, 1] > 0 else 0.0,
            "v_rand_threshold": round(float(self.thresholds[best_rand]), 6),
            "v_info_threshold": round(float(self.thresholds[best_info]), 6),
            "per_slice_v_rand": table[best_rand, :, 0].tolist(),
            "per_slice_v_info": table[best_info, :, 1].tolist(),
        }

    def pixel_error(self) -> float:
        """The stack's pixel error (see :func:`pixel_error`): counts pooled over slices, one best threshold."""
        if not self._table:
            raise ValueError("no slice scored yet")
        best = 0.0
        for tp, fp, fn in self._counts.tolist():
            best = max(best, 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn))
        return 1.0 - best


def isbi_scores(
    probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], thresholds: Sequence[float] = ISBI_THRESHOLDS
) -> dict:
    """The ISBI 2012 challenge scores of a stack, as the challenge computes them.

    For each threshold, V_rand and V_info are averaged over slices; each score is the maximum of
    that mean over ``thresholds`` (0 if none is above 0; a mean that is NaN never counts). Slices whose
    label has no cell are left out of the means (their per-slice scores are NaN); with no other slice, both
    scores are NaN. For stacks
    scored as they come, slice by slice, see :class:`IsbiStack`.

    Args:
        probs: per slice, ``(H, W)`` interior probability in [0, 1].
        labels: per slice, ``(H, W)`` binary label (non-zero = cell interior).

    Returns:
        ``v_rand``, ``v_info``, the thresholds reaching them, and ``per_slice`` lists of
        ``(v_rand, v_info)`` at those thresholds.
    """
    if len(probs) != len(labels) or not probs:
        raise ValueError(f"need matching, non-empty lists; got {len(probs)} maps and {len(labels)} labels")
    stack = IsbiStack(thresholds)
    for prob, label in zip(probs, labels, strict=True):
        stack.add(prob, label)
    return stack.scores()


def _best(scores: np.ndarray) -> int:
    """Index of the best score as the challenge picks it: the first that beats all before it and 0 (NaN never)."""
    best, index = 0.0, 0
    for i, value in enumerate(scores):
        if value > best:
            best, index = float(value), i
    return index


def binary_scores(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Dice, IoU, pixel accuracy, pixel mismatch at ``threshold`` and the ISBI pixel error of one slice."""
    pred, gt = np.asarray(prob) > threshold, np.asarray(gt) > 0
    acc = pixel_accuracy(pred, gt)
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "pixel_accuracy": acc,
        "pixel_mismatch": 1.0 - acc,
        "pixel_error": pixel_error(prob, gt),
    }


#: The 10 IoU thresholds of the Data Science Bowl 2018 nucleus scoring: 0.50, 0.55, ..., 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.5, 1.0, 0.05), 2))


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0, 1, ..., n keeping 0 as background (in increasing label order), and n."""
    values, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if values.size and values[0] == 0:
        return inverse, values.size - 1
    return inverse + 1, values.size


def instance_iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every ground-truth instance (rows) with every predicted instance (columns).

    Labels need not be consecutive: row ``i`` is the ``i``-th smallest non-zero ground-truth label,
    column ``j`` the ``j``-th smallest non-zero predicted label. 0 is background in both.

    Args:
        gt: ``(H, W)`` non-negative integer ground-truth labels.
        pred: ``(H, W)`` non-negative integer predicted labels.

    Returns:
        ``(n_gt, n_pred)`` float64 IoU matrix, from one joint histogram of the two label images.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {gt.shape}")
    g, n_gt = _consecutive(gt)
    p, n_pred = _consecutive(pred)
    joint = np.bincount((g.astype(np.int64) * (n_pred + 1) + p).ravel(), minlength=(n_gt + 1) * (n_pred + 1))
    joint = joint.reshape(n_gt + 1, n_pred + 1)
    area_gt, area_pred = joint.sum(axis=1), joint.sum(axis=0)
    inter = joint[1:, 1:].astype(np.float64)
    union = area_gt[1:, None] + area_pred[None, 1:] - inter
    return inter / np.maximum(union, 1)


def _dsb_counts(ious: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) at one threshold >= 0.5, where a pair with IoU > threshold is a match."""
    matches = ious > threshold
    tp = int(matches.sum())  # IoU > 0.5 makes matches one-to-one, so pairs are counted once
    return tp, ious.shape[1] - tp, ious.shape[0] - tp


def _dsb_precision(tp: int, fp: int, fn: int) -> float:
    return math.nan if tp + fp + fn == 0 else tp / (tp + fp + fn)  # no nucleus on either side: 0 / 0


def dsb_scores(gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS) -> dict:
    """Data Science Bowl 2018 instance score of one image.

    At each threshold ``t`` a ground-truth and a predicted nucleus match when their IoU is strictly
    greater than ``t``; since ``t >= 0.5``, matches are one-to-one. With TP matched pairs, FP
    unmatched predictions and FN unmatched ground-truth nuclei, precision(t) = TP / (TP + FP + FN).
    The score is the mean precision over ``thresholds``. An image without a nucleus on either side has no
    score (NaN, as the competition's 0 / 0; reports leave it out of their means); one empty on one side
    only scores 0.0.

    Args:
        gt: ``(H, W)`` ground-truth instance labels, 0 = background.
        pred: ``(H, W)`` predicted instance labels, 0 = background.
        thresholds: IoU thresholds, each at least 0.5.

    Returns:
        ``score``, ``ap_50`` and ``ap_75`` (precision at 0.5 and 0.75), ``per_threshold`` precisions,
        ``gt_count``, ``pred_count`` and ``tp_50``, ``fp_50``, ``fn_50`` (counts at 0.5).
    """
    if len(thresholds) == 0 or min(thresholds) < 0.5:
        raise ValueError(f"thresholds must be non-empty and at least 0.5 (one-to-one matching), got {thresholds}")
    ious = instance_iou_matrix(gt, pred)
    per_threshold = [_dsb_precision(*_dsb_counts(ious, t)) for t in thresholds]
    tp, fp, fn = _dsb_counts(ious, 0.5)
    return {
        "score": float(np.mean(per_threshold)),
        "ap_50": _dsb_precision(tp, fp, fn),
        "ap_75": _dsb_precision(*_dsb_counts(ious, 0.75)),
        "per_threshold": per_threshold,
        "gt_count": int(ious.shape[0]),
        "pred_count": int(ious.shape[1]),
        "tp_50": tp,
        "fp_50": fp,
        "fn_50": fn,
    }


def check_classes(num_classes: int, class_names: Sequence[str] | None = None,
                  regions: Mapping[str, Sequence[int]] | None = None,
                  object_classes: Sequence[int] | None = None) -> None:
    """Refuse, before any image is trained on or scored, class names, regions and object classes that do not fit
    ``num_classes``: a name per class, each once; regions of existing classes, not named like a class (their
    ``dice_``/``iou_`` columns would replace the class's); object classes among the classes but the background.

    Raises:
        ConfigValueError: naming the id, the value and the fix.
    """
    from medseg.errors import ConfigValueError

    count = int(num_classes)
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(n, str) and n for n in class_names):
            raise ConfigValueError(f"class_names={json.dumps(class_names, default=str)}: give a list of names, one "
                                   "per class, e.g. --set 'class_names=[\"background\", \"cell\"]'")
        if len(class_names) != count:
            raise ConfigValueError(f"class_names={json.dumps(list(class_names))}: {len(class_names)} names for "
                                   f"{count} classes (num_classes); give one name per class")
        twice = next((n for i, n in enumerate(class_names) if n in class_names[:i]), None)
        if twice is not None:
            raise ConfigValueError(f"class_names: {twice!r} names two classes, whose scores would share its "
                                   "columns; give each class its own name")
    if regions is not None and not isinstance(regions, Mapping):
        raise ConfigValueError(f"regions={json.dumps(regions, default=str)}: give name -> class indices, e.g. "
                               "--set 'regions={\"cell\": [1, 2]}', or {} for none")
    for region, classes in (regions or {}).items():
        if class_names is not None and region in class_names:
            raise ConfigValueError(f"regions: {region!r} is also the name of a class, whose scores it would "
                                   "replace; rename the region, or give -s 'regions={}' for none")
        if not _indices_within(classes, 0, count):
            raise ConfigValueError(f"regions: {region!r} needs class indices 0..{count - 1}, got "
                                   f"{json.dumps(classes, default=str)}; fix regions, or give -s 'regions={{}}'")
    if object_classes is not None and not _indices_within(object_classes, 1, count):
        raise ConfigValueError(f"object_classes={json.dumps(object_classes, default=str)}: give the classes an "
                               f"object is made of, among 1..{count - 1} (0 is the background)")


def _indices_within(classes: object, low: int, count: int) -> bool:
    """Whether ``classes`` is a non-empty list of whole numbers in ``low..count-1``."""
    try:
        indices = [int(c) for c in classes if float(c).is_integer()] if not isinstance(classes, str) else []
        return bool(indices) and len(indices) == len(list(classes)) and low <= min(indices) and max(indices) < count
    except (TypeError, ValueError):
        return False


def multiclass_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """Per-class and merged-region Dice and IoU of integer class maps, from one confusion matrix.

    A class (or region) absent from both maps scores 1.0.

    Args:
        pred: ``(H, W)`` predicted class indices in ``[0, num_classes)``.
        gt: ``(H, W)`` ground-truth class indices in ``[0, num_classes)``.
        num_classes: number of classes ``C`` (at least 2), class 0 being background.
        class_names: ``C`` names used in the keys; default ``class0``, ``class1``, ... .
        regions: name -> class indices scored as one merged class, e.g. ``{"cell": [1, 2]}``.

    Returns:
        ``dice_{name}`` and ``iou_{name}`` per class and region, ``pixel_accuracy``, ``macro_f1`` (mean
        Dice over all classes, background included) and ``mean_dice``/``mean_iou`` over classes 1..C-1.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {gt.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    check_classes(num_classes, class_names, regions)  # a ValueError naming what does not fit
    names = [f"class{c}" for c in range(num_classes)] if class_names is None else list(class_names)
    for what, arr in (("prediction", pred), ("label", gt)):
        if arr.size and (not np.issubdtype(arr.dtype, np.integer) and not np.all(arr == np.round(arr))):
            raise ValueError(f"{what} must hold integer class indices")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{what} values must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")
    cm = np.bincount((gt.astype(np.int64) * num_classes + pred.astype(np.int64)).ravel(),
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)  # rows gt, cols pred

    def dice_iou(members: np.ndarray) -> tuple[float, float]:
        tp = int(cm[np.ix_(members, members)].sum())
        fp = int(cm[np.ix_(~members, members)].sum())
        fn = int(cm[np.ix_(members, ~members)].sum())
        if tp + fp + fn == 0:
            return 1.0, 1.0
        return 2.0 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)

    out: dict[str, float] = {}
    dices, ious = [], []
    for c, name in enumerate(names):
        d, j = dice_iou(np.arange(num_classes) == c)
        out[f"dice_{name}"], out[f"iou_{name}"] = d, j
        dices.append(d)
        ious.append(j)
    total = int(cm.sum())
    out["pixel_accuracy"] = float(np.trace(cm) / total) if total else 1.0
    out["macro_f1"] = float(np.mean(dices))
    out["mean_dice"] = float(np.mean(dices[1:]))
    out["mean_iou"] = float(np.mean(ious[1:]))
    for region, classes in (regions or {}).items():
        d, j = dice_iou(np.isin(np.arange(num_classes), [int(c) for c in classes]))
        out[f"dice_{region}"], out[f"iou_{region}"] = d, j
    return out
