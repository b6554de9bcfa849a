"""Metrics against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.metrics import (
    ISBI_THRESHOLDS,
    IsbiStack,
    binary_scores,
    dice,
    iou,
    isbi_scores,
    multiclass_scores,
    pixel_accuracy,
    pixel_error,
    rand_and_info,
    thinned_segments,
)


def test_dice_iou_accuracy_known_values():
    pred = np.array([[1, 1, 0, 0]], bool)
    gt = np.array([[1, 0, 1, 0]], bool)
    assert dice(pred, gt) == pytest.approx(0.5)  # 2*1 / (2 + 2)
    assert iou(pred, gt) == pytest.approx(1 / 3)
    assert pixel_accuracy(pred, gt) == pytest.approx(0.5)
    empty = np.zeros((2, 2), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_pixel_error_takes_best_threshold():
    gt = np.array([[0, 1, 1, 1]], bool)
    prob = np.array([[0.35, 0.38, 0.8, 0.9]])
    # t <= 0.3: all foreground, tp=3 fp=1 -> F = 6/7; t = 0.4..0.8: tp<=2 fn>=1 -> F <= 4/5;
    # no 0.1 step separates 0.35 from 0.38, so the best F is 6/7
    assert pixel_error(prob, gt) == pytest.approx(1 - 6 / 7)
    assert pixel_error(gt.astype(float), gt) == pytest.approx(0.0)
    assert pixel_error(1.0 - gt.astype(float), gt) == pytest.approx(1.0)  # no threshold finds a true pixel


def test_pixel_error_compares_as_the_challenge():
    # the map is read as float32 and compared in double precision: float32(0.4) = 0.40000000596 is above the
    # threshold 0.4, and 1.0 is above the last threshold, 0.9999999999999999 (0.1 summed ten times)
    gt = np.array([[0, 1, 1, 1]], bool)
    assert pixel_error(np.array([[0.35, 0.4, 0.8, 0.9]]), gt) == 0.0
    assert ISBI_THRESHOLDS[-1] < 1.0 and pixel_error(np.array([[0.95, 1.0, 1.0, 1.0]]), gt) == 0.0


def test_pixel_error_of_a_stack_pools_the_slices():
    # slice 1 is perfect at t = 0.2 only, slice 2 at t = 0.7 only: each slice alone has error 0, but the
    # stack has one threshold for both, as in the challenge
    gt = np.array([[0, 1, 1, 1]], bool)
    first, second = np.array([[0.15, 0.25, 0.25, 0.25]]), np.array([[0.65, 0.75, 0.75, 0.75]])
    assert pixel_error(first, gt) == 0.0 and pixel_error(second, gt) == 0.0
    # at t = 0.2: slice 2 has one false positive (tp 6, fp 1); at t = 0.7: slice 1 has 3 false negatives
    assert pixel_error([first, second], [gt, gt]) == pytest.approx(1 - 12 / 13)


def test_rand_info_perfect_is_one():
    gt = np.array([[1, 1, 0, 2, 2]])
    assert rand_and_info(gt, gt) == (pytest.approx(1.0), pytest.approx(1.0))
    # relabelled proposal is still perfect; gt membrane pixels (0) are ignored whatever the proposal says
    assert rand_and_info(gt, np.array([[7, 7, 9, 5, 5]])) == (pytest.approx(1.0), pytest.approx(1.0))


def test_rand_info_merge_hand_computed():
    gt = np.array([[1, 1, 2, 2]])
    merged = np.array([[1, 1, 1, 1]])
    v_rand, v_info = rand_and_info(gt, merged)
    # n_ij = [2, 2]: sum_ab = 8, sum_a = 8, sum_b = 16 -> 2*8/24
    assert v_rand == pytest.approx(2 / 3)
    assert v_info == pytest.approx(0.0)  # a single proposal segment carries no information


def test_rand_info_boundary_pixel_is_singleton():
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    prop = np.array([[1, 1, 1, 0, 2, 2, 2, 2]])  # one proposal boundary pixel inside gt cell 1
    v_rand, v_info = rand_and_info(gt, prop)
    # sum_ab = 3^2 + 4^2 + 1 (singleton); sum_a = 4^2 + 4^2; sum_b = 3^2 + 4^2 + 1
    assert v_rand == pytest.approx(2 * 26 / (32 + 26))
    n = 8
    h_a = math.log(2)
    h_b = -(3 / n * math.log(3 / n) + 4 / n * math.log(4 / n)) + 1 / n * math.log(n)
    mutual = h_a  # every proposal segment lies inside one gt cell: H(AB) = H(B)
    precision, recall = mutual / h_b, mutual / h_a
    assert v_info == pytest.approx(2 * precision * recall / (precision + recall))


def test_rand_info_follows_the_challenges_conventions_at_zero_entropy():
    # one ground-truth cell matched by one segment: V_rand 1, but the challenge's code gives V_info 0
    # (zero entropy); with two cells and one segment per row, mutual information 0 gives 0 / 0 = NaN there
    one = np.ones((2, 3), int)
    assert rand_and_info(one, one) == (1.0, 0.0)
    gt, rows = np.array([[1, 1], [2, 2]]), np.array([[1, 2], [1, 2]])
    assert math.isnan(rand_and_info(gt, rows)[1])


def test_the_best_threshold_is_picked_as_the_challenge_does():
    # the first strictly best score; a NaN mean (0 / 0 in a slice) never counts; none above 0 gives index 0
    from medseg.metrics import _best

    assert _best(np.array([np.nan, 0.5, 0.7, np.nan, 0.7])) == 2
    assert _best(np.array([np.nan, 0.0])) == 0


def test_thinning_leaves_one_pixel_lines():
    prob = np.ones((10, 11))
    prob[:, 4:7] = 0.0  # a 3-px membrane band between two cells
    seg = thinned_segments(prob, 0.5)
    assert set(np.unique(seg)) == {0, 1, 2}
    assert (seg == 0).sum() == 10  # one line pixel per row
    # nothing above the threshold: no cell to flood from, so the challenge makes the boundary one segment
    assert (thinned_segments(prob, 1.0) == 1).all()


def test_thinning_puts_lines_midway_whatever_the_map_inside_the_boundary():
    # a 7-px boundary band whose darkest column is off-centre: the challenge floods the thresholded map
    # breadth-first, so the line is the band's middle column, not its darkest one
    prob = np.ones((6, 15))
    prob[:, 4:11] = [0.3, 0.2, 0.1, 0.2, 0.3, 0.4, 0.0]  # darkest at column 10, middle at column 7
    seg = thinned_segments(prob, 0.5)
    assert (seg[:, 7] == 0).all() and (seg != 0).sum() == 6 * 14
    assert (seg[:, :7] == seg[0, 0]).all() and (seg[:, 8:] == seg[0, -1]).all() and seg[0, 0] != seg[0, -1]


def test_thinning_matches_the_challenges_flooding_on_hand_cases():
    # an even-width band: the two middle pixels are equally far from both cells; the challenge's scan and
    # neighbour order give the left one to the left cell and make the right one the line
    prob = np.ones((3, 8))
    prob[:, 3:5] = 0.0
    seg = thinned_segments(prob, 0.5)
    assert (seg[:, 3] == seg[:, 0]).all() and (seg[:, 4] == 0).all() and (seg[:, 5] != seg[:, 0]).all()
    # a boundary region touching no cell (a closed ring's inside is a cell; this band touches none) is a segment
    prob = np.zeros((5, 5))
    seg = thinned_segments(prob, 0.5)
    assert (seg == 1).all()


def test_isbi_scores_perfect_and_merged():
    gt = np.ones((12, 12), bool)
    gt[:, 5:7] = False
    perfect = isbi_scores([gt.astype(float)], [gt])
    assert perfect["v_rand"] == pytest.approx(1.0) and perfect["v_info"] == pytest.approx(1.0)
    merged_prob = np.ones((12, 12))  # membranes missed: the two cells merge at every threshold < 1
    merged = isbi_scores([merged_prob], [gt])
    assert merged["v_rand"] < 0.7
    assert len(merged["per_slice_v_rand"]) == 1
    assert [round(t, 1) for t in ISBI_THRESHOLDS] == [k / 10 for k in range(11)]


def test_isbi_scores_average_over_slices_before_max():
    gt = np.ones((12, 12), bool)
    gt[:, 5:7] = False
    good, bad = gt.astype(float), np.ones((12, 12))
    scores = isbi_scores([good, bad], [gt, gt])
    single_bad = isbi_scores([bad], [gt])
    assert scores["v_rand"] == pytest.approx((1.0 + single_bad["v_rand"]) / 2)


def test_a_slice_without_cells_has_no_score_and_is_left_out_of_the_means():
    # an all-membrane label (a crop or tile of user data) scored 1.0 / 1.0, lifting the stack's means; the
    # challenge's code divides 0 by 0 there, which makes the stack's V_rand 0. Now it is left out, and a
    # stack of only such slices has no score
    gt = np.ones((12, 12), bool)
    gt[:, 5:7] = False
    empty = np.zeros((12, 12), bool)
    bad = np.ones((12, 12))
    assert all(math.isnan(v) for v in rand_and_info(np.zeros((3, 3), int), np.ones((3, 3), int)))
    with_empty = isbi_scores([bad, bad], [gt, empty])
    alone = isbi_scores([bad], [gt])
    assert with_empty["v_rand"] == alone["v_rand"] < 0.7 and with_empty["v_info"] == alone["v_info"]
    assert math.isnan(with_empty["per_slice_v_rand"][1])
    nothing = isbi_scores([bad], [empty])
    assert math.isnan(nothing["v_rand"]) and math.isnan(nothing["v_info"])


def test_binary_scores_keys():
    gt = np.array([[0, 1], [1, 1]])
    scores = binary_scores(gt.astype(float), gt)
    assert scores == {"dice": 1.0, "iou": 1.0, "pixel_accuracy": 1.0, "pixel_mismatch": 0.0,
                      "pixel_error": 0.0}


def _noisy_cross_slices():
    """Three 32×32 slices of four cells (a membrane row and column) and noisy maps of them."""
    rng = np.random.default_rng(3)
    labels = [np.ones((32, 32), bool) for _ in range(3)]
    for g in labels:
        g[rng.integers(4, 28), :] = False
        g[:, rng.integers(4, 28)] = False
    probs = [np.clip(g + rng.normal(0, 0.3, g.shape), 0, 1).astype(np.float32) for g in labels]
    return probs, labels


def test_isbi_stack_scored_slice_by_slice_equals_the_whole_stack_and_keeps_no_maps():
    from scipy import ndimage

    probs, labels = _noisy_cross_slices()
    stack = IsbiStack()
    for prob, label in zip(probs, labels, strict=True):
        stack.add(prob, label)
    four = ndimage.generate_binary_structure(2, 1)
    cells = [ndimage.label(g, structure=four)[0] for g in labels]
    means = [np.mean([rand_and_info(c, thinned_segments(p, t)) for p, c in zip(probs, cells, strict=True)], axis=0)
             for t in ISBI_THRESHOLDS]
    scores = stack.scores()
    assert scores["v_rand"] == pytest.approx(max(m[0] for m in means))
    assert scores["v_info"] == pytest.approx(max(m[1] for m in means))
    assert len(scores["per_slice_v_rand"]) == len(probs) == len(stack)
    assert stack.pixel_error() == pytest.approx(pixel_error(probs, labels))  # counts pooled over the slices
    assert all(np.asarray(row).size == 2 * len(ISBI_THRESHOLDS) for row in stack._table)  # numbers, not maps
    with pytest.raises(ValueError, match="differs from label shape"):
        stack.add(probs[0][:-1], labels[0])


def test_isbi_score_metric_matches_isbi_scores_over_batches():
    import torch

    from medseg.evaluation import IsbiScore

    probs, labels = _noisy_cross_slices()
    expected = isbi_scores(probs, labels)
    metric = IsbiScore("v_rand")
    for batch in ([0, 1], [2]):  # softmax (B, 2, H, W) and one-hot labels, in two batches
        prob = torch.stack([torch.from_numpy(np.stack([1 - probs[i], probs[i]])) for i in batch])
        onehot = torch.stack([torch.from_numpy(np.stack([~labels[i], labels[i]]).astype(np.float32)) for i in batch])
        metric.update((prob, onehot))
    assert metric.compute() == pytest.approx(expected["v_rand"])
    metric.reset()
    metric.update(([torch.from_numpy(np.stack([1 - probs[0], probs[0]]))],
                   [torch.from_numpy(labels[0][None].astype(np.float32))]))
    assert metric.compute() == pytest.approx(isbi_scores(probs[:1], labels[:1])["v_rand"])
    with pytest.raises(ValueError, match="v_rand' or 'v_info"):
        IsbiScore("dice")


def test_challenge_report_summarises_the_pixel_error_of_the_stack(tmp_path):
    # per row: each slice's own best threshold; in the summary: one threshold for the stack, as the challenge
    import torch

    from medseg.evaluation import ChallengeMetrics

    gt = np.array([[0, 1, 1, 1]], bool)
    report = ChallengeMetrics(str(tmp_path))
    for prob in (np.array([[0.15, 0.25, 0.25, 0.25]]), np.array([[0.65, 0.75, 0.75, 0.75]])):
        output = {"prob": torch.from_numpy(np.stack([1 - prob, prob])), "label": torch.from_numpy(gt[None] * 1.0)}
        report.rows.append(report.score(output, {}))
    summary = report.summarise()
    assert [r["pixel_error"] for r in report.rows] == [0.0, 0.0]
    assert summary["pixel_error"] == pytest.approx(1 - 12 / 13)


def _diagonal_cells():
    """Two square cells touching only at a corner: 4-connected, they are two cells."""
    cells = np.zeros((10, 10), bool)
    cells[:5, :5] = True
    cells[5:, 5:] = True
    return cells


def test_cells_touching_at_a_corner_stay_apart_in_the_thinning_and_the_truth():
    seg = thinned_segments(_diagonal_cells().astype(float), 0.5)
    assert seg[0, 0] != seg[9, 9] and seg[0, 0] > 0 and seg[9, 9] > 0
    gt = _diagonal_cells()
    assert isbi_scores([gt.astype(float)], [gt])["v_rand"] == pytest.approx(1.0)


def test_pixel_error_uses_the_thresholds_given():
    gt = np.array([[0, 1, 1, 1]], bool)
    prob = np.array([[0.35, 0.38, 0.8, 0.9]])
    assert pixel_error(prob, gt, thresholds=(0.5,)) == pytest.approx(1 - 4 / 5)


def test_each_score_is_reported_at_its_own_best_threshold_and_per_slice():
    probs, labels = _noisy_cross_slices()
    s = isbi_scores(probs, labels)
    assert (s["v_rand_threshold"], s["v_info_threshold"]) == (0.8, 0.6)
    assert np.mean(s["per_slice_v_info"]) == pytest.approx(s["v_info"])
    assert np.mean(s["per_slice_v_rand"]) == pytest.approx(s["v_rand"])


def test_binary_scores_count_only_probabilities_above_the_threshold():
    assert binary_scores(np.array([[0.5, 1.0]]), np.array([[0, 1]]))["dice"] == 1.0


def test_a_region_naming_a_class_out_of_range_is_refused():
    g = np.zeros((2, 2), int)
    with pytest.raises(ValueError, match="region"):
        multiclass_scores(g, g, 3, regions={"cell": [1, 5]})


def test_evaluate_rows_carry_each_slices_own_v_rand_and_v_info(tmp_path):
    import torch

    from medseg.evaluation import ChallengeMetrics

    probs, labels = _noisy_cross_slices()
    report = ChallengeMetrics(str(tmp_path))
    for p, g in zip(probs, labels, strict=True):
        report.rows.append(report.score({"prob": torch.from_numpy(np.stack([1 - p, p])),
                                         "label": torch.from_numpy(g[None] * 1.0)}, {}))
    report.summarise()
    expected = isbi_scores(probs, labels)
    assert [r["v_rand"] for r in report.rows] == pytest.approx(expected["per_slice_v_rand"])
    assert [r["v_info"] for r in report.rows] == pytest.approx(expected["per_slice_v_info"])


def test_a_validation_without_cells_says_it_has_no_score(caplog):
    # the training's key metric was NaN at every validation, silently: no best model, no early stop
    from medseg.evaluation import IsbiScore

    metric = IsbiScore()
    p = np.full((1, 1, 6, 6), 0.3, np.float32)
    metric.update((np.concatenate([1 - p, p], axis=1), np.zeros((1, 1, 6, 6))))
    assert math.isnan(metric.compute())
    metric.reset()  # the next validation of the same training: no score again, said once only
    metric.update((np.concatenate([1 - p, p], axis=1), np.zeros((1, 1, 6, 6))))
    assert math.isnan(metric.compute())
    said = [r.getMessage() for r in caplog.records if "none of the 1 labels scored holds a cell" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("(said once)")


def test_an_evaluation_of_labels_without_cells_has_no_stack_score(tmp_path):
    # summary.json holds null rather than NaN, which JSON cannot hold, or a made-up 1.0
    import json

    import torch

    from medseg.evaluation import ChallengeMetrics

    report = ChallengeMetrics(str(tmp_path))
    p = np.full((6, 6), 0.3, np.float32)
    report.rows.append(report.score({"prob": torch.from_numpy(np.stack([1 - p, p])),
                                     "label": torch.zeros((1, 6, 6))}, {}))
    summary = report.summarise()
    assert summary["v_rand"] is None and summary["v_info"] is None
    assert summary["v_rand_threshold"] is None and summary["v_info_threshold"] is None
    assert json.loads(json.dumps(summary, allow_nan=False))["v_rand"] is None


def test_evaluate_scores_at_its_threshold_and_channel(tmp_path):
    import torch

    from medseg.evaluation import ChallengeMetrics

    gt = np.array([[0, 1]], bool)
    p = np.array([[0.6, 0.9]], np.float32)
    out = {"prob": torch.from_numpy(np.stack([1 - p, p])), "label": torch.from_numpy(gt[None] * 1.0)}
    assert ChallengeMetrics(str(tmp_path), threshold=0.7).score(out, {})["dice"] == 1.0
    flipped = {"prob": torch.from_numpy(np.stack([p, 1 - p])), "label": torch.from_numpy(gt[None] * 1.0)}
    assert ChallengeMetrics(str(tmp_path), channel=0, threshold=0.7).score(flipped, {})["dice"] == 1.0


def test_a_map_outside_zero_to_one_is_refused_not_scored():
    # an 8-bit map scored V_rand 0.05 where the same map divided by 255 scored 0.995
    label = np.zeros((8, 8), np.uint8)
    label[1:7, 1:7] = 255
    with pytest.raises(ValueError, match=r"values in \[0, 1\], not 0\.\.255 \(an 8-bit map: divide it by 255\)"):
        isbi_scores([label.astype(np.float32)], [label])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        pixel_error(label.astype(np.float32), label)
    assert isbi_scores([label / 255.0], [label])["v_rand"] == 1.0
