"""Nucleus instance labels, watershed, measurements and instance/multiclass metrics against hand-computed answers."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest

from medseg.errors import ConfigValueError
from medseg.instances import (
    MEASUREMENT_FIELDS,
    WatershedInstances,
    instance_distance_map,
    instance_targets,
    measure_instances,
    merge_instance_masks,
    watershed_instances,
    write_measurements_csv,
)
from medseg.metrics import DSB_THRESHOLDS, dsb_scores, instance_iou_matrix, multiclass_scores
from medseg.transforms import InstanceTargetd


def _square(shape, y0, x0, size, value=True):
    m = np.zeros(shape, type(value))
    m[y0 : y0 + size, x0 : x0 + size] = value
    return m


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _prob_from_labels(labels, boundary_width=2):
    """A clean (3, H, W) softmax: one-hot of the instance target."""
    target = instance_targets(labels, boundary_width)
    return np.stack([target == k for k in range(3)]).astype(np.float32)


# --- merge_instance_masks -------------------------------------------------------------------------


def test_merge_overlap_goes_to_first_and_labels_consecutive():
    a = _square((10, 10), 0, 0, 4)
    b = _square((10, 10), 2, 2, 4, np.uint8(255))  # 0/255 mask overlapping a on [2:4, 2:4]
    empty = np.zeros((10, 10), bool)
    c = _square((10, 10), 7, 7, 2)
    labels = merge_instance_masks([a, empty, b, a, c])  # empty and fully covered masks are skipped
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.all(labels[2:4, 2:4] == 1)
    assert np.count_nonzero(labels == 1) == 16
    assert np.count_nonzero(labels == 2) == 16 - 4
    assert np.count_nonzero(labels == 3) == 4


def test_merge_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"mask 1 has shape \(5, 6\).*\(5, 5\)"):
        merge_instance_masks([np.ones((5, 5), bool), np.ones((5, 6), bool)])
    with pytest.raises(ValueError, match=r"mask 2 has shape \(5, 6\)"):  # counted with the empty one before it
        merge_instance_masks([np.zeros((5, 5), bool), np.ones((5, 5), bool), np.ones((5, 6), bool)])


# --- instance_targets -----------------------------------------------------------------------------


def test_targets_isolated_square_interior_count():
    labels = _square((20, 20), 5, 5, 10, 7)
    target = instance_targets(labels, boundary_width=2)
    assert target.dtype == np.uint8
    assert np.count_nonzero(target == 1) == 36  # 6 x 6
    assert np.count_nonzero(target == 2) == 100 - 36
    assert np.all(target[7:13, 7:13] == 1)
    assert np.count_nonzero(instance_targets(labels, 1) == 1) == 64  # 8 x 8
    tiny = _square((20, 20), 5, 5, 3, 1)
    assert set(np.unique(instance_targets(tiny, 2))) == {0, 2}  # too small for an interior


def test_targets_touching_squares_are_separated():
    labels = _square((20, 30), 5, 3, 10, 1) + _square((20, 30), 5, 13, 10, 2)  # share the edge x=12|13
    target = instance_targets(labels, boundary_width=1)
    interior_a = (target == 1) & (labels == 1)
    interior_b = (target == 1) & (labels == 2)
    assert interior_a.any() and interior_b.any()
    grown_a = interior_a.copy()
    grown_a[1:] |= interior_a[:-1]
    grown_a[:-1] |= interior_a[1:]
    grown_a[:, 1:] |= interior_a[:, :-1]
    grown_a[:, :-1] |= interior_a[:, 1:]
    assert not np.any(grown_a & interior_b)
    assert np.all(target[5:15, 12] == 2) and np.all(target[5:15, 13] == 2)


def test_touching_targets_mark_only_the_edges_shared_with_another_nucleus():
    pair = _square((20, 40), 5, 3, 10, 1) + _square((20, 40), 5, 13, 10, 2)  # share the edge x=12|13
    labels = pair + _square((20, 40), 5, 28, 3, 3)  # and a 3x3 nucleus 6 px away
    target = instance_targets(labels, boundary_width=2, boundary="touching")
    np.testing.assert_array_equal(target == 0, labels == 0)
    boundary = np.zeros_like(target, bool)
    boundary[5:15, 11:15] = True  # 2 px on each side of the shared edge
    np.testing.assert_array_equal(target == 2, boundary)
    assert np.all(target[5:8, 28:31] == 1)  # the small isolated nucleus is all interior: a seed of its own
    as_bytes = labels.astype(np.uint8)
    as_bytes[labels == 3] = 255  # the largest uint8 label: no wrap-around of "max + 1"
    np.testing.assert_array_equal(instance_targets(as_bytes, boundary_width=2, boundary="touching"), target)
    gap = _square((20, 40), 5, 3, 10, 1) + _square((20, 40), 5, 14, 10, 2)  # 1 px of background between
    near = instance_targets(gap, boundary_width=2, boundary="touching")
    assert np.all(near[5:15, 12] == 2) and np.all(near[5:15, 14] == 2)  # still separated
    with pytest.raises(ValueError, match="boundary='ring'"):
        instance_targets(labels, 2, boundary="ring")
    with pytest.raises(ConfigValueError, match="--set boundary=outline or boundary=touching"):
        InstanceTargetd(keys="label", boundary="ring")


def test_targets_fast_on_many_nuclei():
    rng = np.random.default_rng(0)
    labels = np.zeros((1024, 1024), np.int32)
    for k, (y, x) in enumerate(rng.integers(0, 1000, size=(500, 2)), start=1):
        labels[y : y + 20, x : x + 20] = k
    start = time.perf_counter()
    instance_targets(labels, 2)
    assert time.perf_counter() - start < 1.0


# --- watershed_instances --------------------------------------------------------------------------


def test_watershed_recovers_touching_discs():
    shape = (64, 96)
    discs = [_disc(shape, 32, 25, 14), _disc(shape, 32, 50, 12), _disc(shape, 32, 73, 12)]  # touching
    gt = merge_instance_masks(discs)
    prob = _prob_from_labels(gt)
    labels = watershed_instances(prob)
    assert labels.dtype == np.int32
    assert labels.max() == 3
    ious = instance_iou_matrix(gt, labels)
    assert np.all(ious.max(axis=1) > 0.8)
    assert dsb_scores(gt, labels)["ap_75"] == 1.0
    assert repr(WatershedInstances())  # callable wrapper gives the same answer
    np.testing.assert_array_equal(WatershedInstances()(prob), labels)


def test_distance_map_peaks_at_each_nucleus_centre_whatever_its_size():
    labels = np.zeros((20, 30), np.int32)
    labels[2:7, 2:7] = 3  # 5x5: edge pixels 1 px from outside, centre 3 px
    labels[2:7, 7:10] = 5  # touches it: measured alone, so its own 3-px width counts
    labels[10:19, 10:29] = 1  # 9 px high: centre row 5 px from outside
    dist = instance_distance_map(labels)
    assert dist.dtype == np.float32 and dist.shape == labels.shape
    assert np.all(dist[labels == 0] == 0) and np.all(dist[labels > 0] > 0)
    for value in (1, 3, 5):
        assert dist[labels == value].max() == pytest.approx(1.0)
    assert dist[4, 4] == 1.0 and dist[2, 4] == pytest.approx(1 / 3)
    assert dist[4, 6] == pytest.approx(1 / 3) and dist[4, 7] == pytest.approx(1 / 2)  # a valley where they touch
    assert dist[14, 19] == 1.0 and dist[10, 19] == pytest.approx(1 / 5)
    assert not instance_distance_map(np.zeros((4, 4), np.int32)).any()


def test_watershed_seeds_from_the_distance_channel_split_what_the_interior_joins():
    """Two touching discs whose predicted interior runs across their shared edge: the interior gives one seed,
    the distance channel's two peaks give two nuclei."""
    shape = (40, 64)
    gt = merge_instance_masks([_disc(shape, 20, 20, 11), _disc(shape, 20, 42, 11)])
    prob = _prob_from_labels(gt)
    fg = gt > 0
    prob[1][fg], prob[2][fg] = 1.0, 0.0  # no boundary predicted between them
    assert watershed_instances(prob).max() == 1
    with_distance = np.concatenate([prob, instance_distance_map(gt)[None]])
    labels = watershed_instances(with_distance)
    assert labels.max() == 2 and dsb_scores(gt, labels)["ap_75"] == 1.0
    np.testing.assert_array_equal(WatershedInstances()(with_distance), labels)
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(4, H, W\)"):
        watershed_instances(np.zeros((2, 4, 4), np.float32))


def test_watershed_keeps_unseeded_blob_and_drops_tiny_ones():
    shape = (40, 40)
    prob = np.zeros((3, *shape), np.float32)
    prob[0] = 1.0
    blob = _square(shape, 5, 5, 6)  # all boundary: foreground but no seed
    tiny = _square(shape, 30, 30, 2)  # 4 px < min_area
    disc = _disc(shape, 25, 12, 5)
    for mask, channel in ((blob, 2), (tiny, 1), (disc, 1)):
        prob[:, mask] = 0.0
        prob[channel, mask] = 1.0
    labels = watershed_instances(prob, min_area=8)
    assert labels.max() == 2
    assert np.all(labels[tiny] == 0)
    assert len(np.unique(labels[blob])) == 1 and labels[blob][0] > 0
    assert len(np.unique(labels[disc])) == 1 and labels[disc][0] > 0
    assert np.count_nonzero(labels) == blob.sum() + disc.sum()
    assert watershed_instances(np.stack([np.ones(shape), np.zeros(shape), np.zeros(shape)])).max() == 0


def test_nuclei_touching_only_at_a_corner_stay_two_whether_seeded_or_not():
    # 4-connectivity, as the DSB labels count objects: a diagonal contact is no bridge
    shape = (20, 20)
    for channel in (1, 2):  # interior (seeded) / boundary only (kept as unseeded leftovers)
        prob = np.zeros((3, *shape), np.float32)
        prob[0] = 1.0
        for y, x in ((2, 2), (8, 8)):  # 6 x 6 squares meeting at one corner, (7, 7) and (8, 8)
            prob[:, y:y + 6, x:x + 6] = 0.0
            prob[channel, y:y + 6, x:x + 6] = 1.0
        labels = watershed_instances(prob, min_seed_area=4, min_area=8)
        assert labels.max() == 2, channel
        assert len(np.unique(labels[2:8, 2:8])) == 1 and len(np.unique(labels[8:14, 8:14])) == 1
        assert labels[7, 7] != labels[8, 8]


def test_a_seeded_nucleus_does_not_flood_into_an_unseeded_one_across_a_corner():
    # the mixed case: the seeded nucleus's watershed is 4-connected too, so the boundary-only one stays apart
    prob = np.zeros((3, 20, 20), np.float32)
    prob[0] = 1.0
    prob[:, 2:8, 2:8] = 0.0
    prob[1, 2:8, 2:8] = 1.0  # seeded
    prob[:, 8:14, 8:14] = 0.0
    prob[2, 8:14, 8:14] = 1.0  # boundary only: kept as a leftover
    labels = watershed_instances(prob, min_seed_area=4, min_area=8)
    assert labels.max() == 2 and labels[7, 7] != labels[8, 8]
    assert np.count_nonzero(labels == labels[7, 7]) == np.count_nonzero(labels == labels[8, 8]) == 36


def test_watershed_instances_wrapper_passes_each_setting_to_its_own_parameter():
    # two touching nuclei (one 10 x 26 blob) with seeds of 16 and 25 px; seeds sure (interior 0.8), the rest
    # foreground 0.85 (boundary 0.8), so each setting changes the answer in its own way
    fg = np.zeros((16, 30), bool)
    fg[3:13, 2:28] = True
    seed = np.zeros_like(fg)
    seed[6:10, 5:9] = True  # 16 px
    seed[5:10, 19:24] = True  # 25 px
    prob = np.zeros((3, *fg.shape), np.float32)
    prob[0] = 1.0
    prob[:, fg & ~seed] = np.array([0.15, 0.05, 0.8], np.float32)[:, None]
    prob[:, seed] = np.array([0.0, 0.8, 0.2], np.float32)[:, None]
    assert WatershedInstances(min_seed_area=16, min_area=20)(prob).max() == 2
    assert WatershedInstances(min_seed_area=20, min_area=16)(prob).max() == 1  # the 16-px seed is dropped
    assert WatershedInstances(min_seed_area=16, min_area=300)(prob).max() == 0  # each nucleus is under 300 px
    assert WatershedInstances(seed_threshold=0.9)(prob).max() == 1  # no seed: the blob is one leftover
    only_seeds = WatershedInstances(fg_threshold=0.9)(prob)  # foreground 0.85 is not foreground now
    assert sorted(np.bincount(only_seeds.ravel())[1:]) == [16, 25]


# --- instance metrics -----------------------------------------------------------------------------


def test_dsb_thresholds():
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_instance_iou_matrix_non_consecutive_labels():
    gt = np.array([[0, 5, 5, 9, 9, 9]])
    pred = np.array([[3, 3, 3, 0, 8, 8]])
    ious = instance_iou_matrix(gt, pred)  # rows gt 5, 9; cols pred 3, 8
    np.testing.assert_allclose(ious, [[2 / 3, 0.0], [0.0, 2 / 3]])
    assert instance_iou_matrix(np.zeros((2, 2), int), np.full((2, 2), 3)).shape == (0, 1)


def test_dsb_perfect_and_empty():
    gt = merge_instance_masks([_disc((30, 30), 8, 8, 5), _disc((30, 30), 20, 20, 5)])
    perfect = dsb_scores(gt, gt * 3)  # relabelled prediction
    assert perfect["score"] == 1.0 and perfect["per_threshold"] == [1.0] * 10
    assert perfect["tp_50"] == 2 and perfect["fp_50"] == 0 and perfect["fn_50"] == 0
    empty = np.zeros_like(gt)
    nothing = dsb_scores(empty, empty)  # no nucleus on either side: 0 / 0, no score (the Kaggle kernel's NaN)
    assert np.isnan(nothing["score"]) and np.isnan(nothing["ap_50"]) and nothing["gt_count"] == 0
    missed = dsb_scores(gt, empty)
    assert missed["score"] == 0.0 and missed["fn_50"] == 2 and missed["gt_count"] == 2
    assert dsb_scores(empty, gt)["score"] == 0.0


def test_dsb_merge_and_split():
    gt = np.zeros((10, 20), int)
    gt[:, :10], gt[:, 10:] = 1, 2
    merged = dsb_scores(gt, np.ones_like(gt))  # IoU 0.5 with each: no match anywhere
    assert merged["score"] == 0.0 and (merged["tp_50"], merged["fp_50"], merged["fn_50"]) == (0, 1, 2)
    gt2 = np.zeros((10, 20), int)
    gt2[:, :12], gt2[:, 12:] = 1, 2  # pred covers both: IoU 0.6 with gt 1, 0.4 with gt 2
    merged2 = dsb_scores(gt2, np.ones_like(gt2))
    # matched at 0.5, 0.55 (TP 1, FP 0, FN 1 -> 1/2), nothing above 0.6 (TP 0, FP 1, FN 2 -> 0)
    assert merged2["per_threshold"] == [0.5, 0.5] + [0.0] * 8
    assert merged2["score"] == pytest.approx(0.1)
    split_gt = np.ones((10, 10), int)
    pred = np.ones((10, 10), int)
    pred[:, 7:] = 2  # one part has IoU 0.7, the other 0.3
    split = dsb_scores(split_gt, pred)
    # t < 0.7: TP 1, FP 1, FN 0 -> 1/2 (4 thresholds); t >= 0.7: TP 0, FP 2, FN 1 -> 0
    assert split["per_threshold"] == [0.5] * 4 + [0.0] * 6
    assert split["score"] == pytest.approx(0.2)
    assert (split["tp_50"], split["fp_50"], split["fn_50"]) == (1, 1, 0)


def test_dsb_strict_threshold_and_single_pair():
    gt = np.zeros((10, 10), int)
    gt[:, :10] = 1
    half = np.zeros_like(gt)
    half[:, :5] = 1  # IoU exactly 0.5: not a match at t = 0.5
    assert dsb_scores(gt, half)["ap_50"] == 0.0
    seven = np.zeros_like(gt)
    seven[:, :7] = 1  # IoU 0.7: matched at 0.5, 0.55, 0.6, 0.65
    result = dsb_scores(gt, seven)
    assert result["per_threshold"] == [1.0] * 4 + [0.0] * 6
    assert result["score"] == pytest.approx(0.4)
    assert result["ap_50"] == 1.0 and result["ap_75"] == 0.0
    with pytest.raises(ValueError, match="at least 0.5"):
        dsb_scores(gt, seven, thresholds=(0.3,))


# --- multiclass_scores ----------------------------------------------------------------------------


def test_multiclass_known_confusion():
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    # confusion (rows gt, cols pred): gt0 -> [2, 1, 0]; gt1 -> [0, 1, 1]; gt2 -> [1, 0, 2]
    s = multiclass_scores(pred, gt, 3, class_names=["bg", "interior", "boundary"], regions={"cell": [1, 2]})
    assert s["pixel_accuracy"] == pytest.approx(5 / 8)
    assert s["dice_bg"] == pytest.approx(4 / 6) and s["iou_bg"] == pytest.approx(2 / 4)  # tp2 fp1 fn1
    assert s["dice_interior"] == pytest.approx(2 / 4) and s["iou_interior"] == pytest.approx(1 / 3)  # tp1 fp1 fn1
    assert s["dice_boundary"] == pytest.approx(4 / 6) and s["iou_boundary"] == pytest.approx(2 / 4)  # tp2 fp1 fn1
    assert s["macro_f1"] == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)
    assert s["mean_dice"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert s["mean_iou"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    # cell = {1, 2}: tp 4 (1->1, 1->2, 2->2 twice), fp 1 (gt0 -> 1), fn 1 (gt2 -> 0)
    assert s["dice_cell"] == pytest.approx(8 / 10) and s["iou_cell"] == pytest.approx(4 / 6)


def test_multiclass_absent_class_and_errors():
    gt = np.zeros((2, 2), int)
    s = multiclass_scores(gt, gt, 3)
    assert s["dice_class2"] == 1.0 and s["iou_class1"] == 1.0 and s["pixel_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        multiclass_scores(np.full((2, 2), 3), gt, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        multiclass_scores(gt, np.full((2, 2), -1), 3)
    with pytest.raises(ValueError, match="shape"):
        multiclass_scores(gt, np.zeros((2, 3), int), 3)


# --- measure_instances ----------------------------------------------------------------------------


def test_measure_two_rectangles(tmp_path):
    labels = np.zeros((10, 12), np.int32)
    labels[1:3, 2:6] = 4  # 2 x 4
    labels[5:10, 8:11] = 9  # 5 x 3
    rgb = np.zeros((3, 10, 12))
    rgb[:, 1:3, 2:6] = [[[3.0]], [[6.0]], [[9.0]]]  # gray 6
    rgb[0, 5:10, 8:11] = 3.0  # gray 1
    rows = measure_instances(labels, rgb)
    uncalibrated = {"area_um2": None, "centroid_y_um": None, "centroid_x_um": None}
    assert rows == [
        {"label": 4, "area": 8, "centroid_y": 1.5, "centroid_x": 3.5, "bbox_min_y": 1, "bbox_min_x": 2,
         "bbox_max_y": 3, "bbox_max_x": 6, "mean_intensity": 6.0, **uncalibrated},
        {"label": 9, "area": 15, "centroid_y": 7.0, "centroid_x": 9.0, "bbox_min_y": 5, "bbox_min_x": 8,
         "bbox_max_y": 10, "bbox_max_x": 11, "mean_intensity": 1.0, **uncalibrated},
    ]
    assert all(type(v) in (int, float) for row in rows for k, v in row.items() if k not in uncalibrated)
    assert tuple(rows[0]) == MEASUREMENT_FIELDS
    # a calibrated image: 0.5 µm rows, 0.25 µm columns (the pixel counts and positions stay)
    calibrated = measure_instances(labels, rgb, pixel_um=(0.5, 0.25))
    assert calibrated[0] == {**rows[0], "area_um2": 1.0, "centroid_y_um": 0.75, "centroid_x_um": 0.875}
    assert calibrated[1] == {**rows[1], "area_um2": 1.875, "centroid_y_um": 3.5, "centroid_x_um": 2.25}
    both = measure_instances(labels, spacing=(0.5, 2.0), pixel_um=(0.5, 0.25))[1]  # spacing: its own columns
    assert both["area"] == pytest.approx(15.0) and both["centroid_x"] == pytest.approx(18.0)
    assert (both["area_um2"], both["centroid_y_um"], both["centroid_x_um"]) == (1.875, 3.5, 2.25)
    assert measure_instances(labels, pixel_um=(2e-4, 2e-4))[0]["area_um2"] == pytest.approx(3.2e-7)  # digits kept
    for bad in ((0.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (float("inf"), 1.0)):
        with pytest.raises(ValueError, match="pixel_um must be two positive sizes"):
            measure_instances(labels, pixel_um=bad)
    plain = measure_instances(labels)
    assert plain[0]["mean_intensity"] is None and plain[1]["area"] == 15
    scaled = measure_instances(labels, spacing=(0.5, 2.0))
    assert scaled[0]["area"] == pytest.approx(8.0) and scaled[0]["centroid_x"] == pytest.approx(7.0)
    assert measure_instances(np.zeros((4, 4), int)) == []
    # small values keep their digits: a float image's intensities and an area in cm² were rounded to 0
    tiny = measure_instances(labels, rgb * 1e-5, spacing=(5e-5, 5e-5))
    assert tiny[0]["mean_intensity"] == pytest.approx(6e-5, rel=1e-6) and tiny[0]["area"] == pytest.approx(2e-8)
    assert tiny[0]["centroid_x"] == pytest.approx(1.75e-4)
    assert measure_instances(labels, rgb + 1234.56789)[0]["mean_intensity"] == 1240.568
    far = measure_instances(np.pad(labels, ((0, 0), (111100, 0))))[0]  # a whole-slide image's columns
    assert far["centroid_x"] == 111103.5 and far["centroid_y"] == 1.5
    assert measure_instances(labels, spacing=(1 / 3, 1 / 3))[0]["centroid_x"] == 1.166667  # 7 digits
    out = write_measurements_csv(tmp_path / "nuclei.csv", rows)
    with open(out, newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["label"] for r in read] == ["4", "9"] and read[1]["mean_intensity"] == "1.0"


def test_measurements_csv_header_when_empty(tmp_path):
    path = write_measurements_csv(tmp_path / "sub" / "empty.csv", [])
    assert path.read_text().strip() == ",".join(MEASUREMENT_FIELDS)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    # a stack with no object on any slice still has the slice column of a stack's table
    stack = write_measurements_csv(tmp_path / "stack.csv", [], slices=True)
    assert stack.read_text().strip() == ",".join(("slice", *MEASUREMENT_FIELDS))


def _three_class_prob(fg, seed):
    p = np.zeros((3, *fg.shape), np.float32)
    p[0] = ~fg
    p[2] = fg & ~seed
    p[1] = seed
    return p


def test_an_object_of_exactly_min_area_is_kept_and_a_seed_of_exactly_min_seed_area_used():
    from medseg.instances import watershed_instances

    fg = np.zeros((12, 12), bool)
    fg[2:4, 2:6] = True  # 8 px
    assert watershed_instances(_three_class_prob(fg, fg), min_area=8).max() == 1
    fg = np.zeros((12, 16), bool)
    fg[2:6, 2:14] = True
    seed = np.zeros_like(fg)
    seed[3:5, 3:5] = True  # 4 px
    seed[3:5, 11:13] = True  # 4 px
    assert watershed_instances(_three_class_prob(fg, seed), min_seed_area=4).max() == 2


def test_the_image_border_is_not_a_nucleus_boundary():
    from medseg.instances import instance_targets

    labels = np.zeros((12, 12), np.int32)
    labels[0:6, 0:6] = 1
    t = instance_targets(labels, 1)
    assert t[0, 2] == 1 and t[2, 0] == 1 and t[5, 2] == 2


def test_watershed_refuses_nan_scores():
    from medseg.errors import CheckpointError

    prob = np.zeros((3, 16, 16), np.float32)
    prob[0] = 1.0
    prob[1, 3, 3] = np.nan
    with pytest.raises(CheckpointError, match="output holds NaN or infinite values"):
        WatershedInstances()(prob)
