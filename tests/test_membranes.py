"""Closed cell contours: gaps in membranes are closed, faint internal lines merged, the 0.5 mask kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.membranes import CloseContoursd, agglomerate_cells, close_contours
from medseg.metrics import isbi_scores

_FOUR = ndimage.generate_binary_structure(2, 1)


def _two_cells_with_gap() -> tuple[np.ndarray, np.ndarray]:
    """Two 64x31 cells split by a 4-px vertical membrane whose middle 8 px the network half missed.

    The left cell is crossed by a faint line (an organelle edge) as membrane-like as the gap, so no
    threshold gets both right: below 0.6 the cells merge, from 0.6 on the left cell splits.
    """
    label = np.ones((64, 66), np.uint8)
    label[:, 31:35] = 0
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random(label.shape), 2.0)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    prob = 0.8 + 0.19 * noise
    prob[label == 0] = 0.02
    prob[28:36, 31:35] = 0.6
    prob[15:17, :31] = 0.6
    return prob.astype(np.float32), label


def test_gap_in_membrane_is_closed():
    prob, label = _two_cells_with_gap()
    assert ndimage.label(prob > 0.5, structure=_FOUR)[1] == 1  # thresholding merges the two cells
    cells = agglomerate_cells(prob)
    assert cells.max() == 2
    # each ground-truth cell is one agglomerated cell
    for side in (np.s_[:, :31], np.s_[:, 35:]):
        values = np.unique(cells[side][cells[side] > 0])
        assert len(values) == 1
    closed = close_contours(prob)
    raw, fixed = isbi_scores([prob], [label]), isbi_scores([closed], [label])
    assert raw["v_rand"] < 0.95 and fixed["v_rand"] > 0.99
    assert fixed["v_info"] > raw["v_info"]


def test_faint_line_inside_a_cell_is_merged_and_zero_threshold_keeps_superpixels():
    label = np.ones((48, 48), np.uint8)
    dist = ndimage.distance_transform_edt(np.pad(label, 1)[1:-1, 1:-1] * 0 + 1)
    prob = np.full((48, 48), 0.95, np.float32)
    prob[:, 23:25] = 0.7  # an organelle edge: weakly membrane-like (membrane probability 0.3)
    prob += (dist * 0).astype(np.float32)
    assert agglomerate_cells(prob, merge_threshold=0.65).max() == 1
    assert agglomerate_cells(prob, merge_threshold=0.0).max() == 2


def test_close_contours_keeps_the_map_above_half_and_floors_the_rest():
    prob, _ = _two_cells_with_gap()
    closed = close_contours(prob, floor=0.45)
    lines = closed == 0
    assert 0 < lines.mean() < 0.1
    assert np.all(closed[~lines] >= 0.45)
    # off the lines, the mask at 0.5 is the network's own
    np.testing.assert_array_equal((closed > 0.5)[~lines], (prob > 0.5)[~lines])
    keep = ~lines & (prob > 0.45)
    np.testing.assert_array_equal(closed[keep], prob[keep])


def test_transform_on_softmax_tensors_2d_and_volumes():
    prob, _ = _two_cells_with_gap()
    two = torch.from_numpy(np.stack([1 - prob, prob]))
    out = CloseContoursd("pred", channel=1)({"pred": two})["pred"]
    assert isinstance(out, torch.Tensor) and out.shape == two.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[0] + out[1], torch.ones_like(out[0]))
    np.testing.assert_allclose(out[1].numpy(), close_contours(prob))
    volume = torch.stack([two, two], dim=1)  # (C, Z, H, W)
    out3 = CloseContoursd("pred")({"pred": volume})["pred"]
    torch.testing.assert_close(out3[:, 0], out)
    torch.testing.assert_close(out3[:, 1], out)
    assert CloseContoursd("pred", enabled=False)({"pred": two})["pred"] is two
    with pytest.raises(ValueError, match="channel"):
        CloseContoursd("pred", channel=3)({"pred": two})


def test_seeds_found_tile_by_tile_give_the_cells_of_the_whole_slice():
    # large slices find their seeds in tiles with context (h-minima needs ~140 bytes per pixel): on an EM-like
    # map of cells about 60 px across, tiles of 96 px with 48 px of context give the same cells
    from conftest import synthetic_em

    _, label = synthetic_em(size=320, n_cells=30, seed=3)
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random(label.shape), 2.0)
    prob = np.where(label > 0, 0.75 + 0.24 * (noise - noise.min()) / np.ptp(noise), 0.05).astype(np.float32)
    whole = agglomerate_cells(prob, seed_tile=0)
    tiled = agglomerate_cells(prob, seed_tile=96, seed_margin=48)
    assert whole.max() > 10
    np.testing.assert_array_equal(tiled, whole)
    # without context the tiles' borders make minima of their own: the check above can fail
    assert not np.array_equal(agglomerate_cells(prob, seed_tile=96, seed_margin=0, merge_threshold=0),
                              agglomerate_cells(prob, seed_tile=0, merge_threshold=0))


def test_the_line_between_two_regions_takes_the_more_membrane_like_pixel():
    from medseg.membranes import _with_lines

    regions = np.ones((6, 10), np.int32)
    regions[:, 5:] = 2  # the boundary runs between columns 4 and 5
    membrane = np.zeros((6, 10))
    membrane[:, 4], membrane[:, 5] = 0.9, 0.3
    lines = _with_lines(regions, membrane)
    assert (lines[:, 4] == 0).all() and (lines[:, [0, 1, 2, 3, 5, 6, 7, 8, 9]] > 0).all()  # one pixel wide
    membrane[:, 4], membrane[:, 5] = 0.3, 0.9
    lines = _with_lines(regions, membrane)
    assert (lines[:, 5] == 0).all() and np.count_nonzero(lines == 0) == 6


def test_a_merged_region_sees_its_neighbour_through_the_pixel_weighted_mean_of_both_boundaries():
    from medseg.membranes import _merged_boundary

    graph = {1: {3: {"weight": 0.2, "count": 3}}, 2: {3: {"weight": 0.8, "count": 1}}, 3: {}}
    merged = _merged_boundary(graph, 2, 1, 3)  # region 2 merged into region 1; neighbour 3
    assert merged["count"] == 4 and merged["weight"] == pytest.approx((3 * 0.2 + 0.8) / 4)
    assert _merged_boundary(graph, 1, 2, 3)["weight"] == pytest.approx(0.35)  # either way round
    graph[1] = {}
    assert _merged_boundary(graph, 2, 1, 3) == {"count": 1, "weight": 0.8}  # only one of them touches it


def test_a_basin_whose_pixels_touch_only_diagonally_is_one_seed():
    # the membrane map's minima are 8-connected regions (h-minima's own connectivity): a valley running
    # diagonally is one seed, so one cell, not a superpixel per pixel
    prob = np.full((24, 24), 0.5)
    for k in range(4, 20):
        prob[k, k] = 1.0  # interior certain along the diagonal: membrane 0 there, 0.5 around
    cells = agglomerate_cells(prob, merge_threshold=0.0, sigma=0.0)
    assert np.unique(cells).tolist() == [1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_map_is_refused_before_the_watershed(bad):
    # scikit-image's h_minima looped (or corrupted memory) on NaN: broken weights hung infer and training
    from medseg.errors import CheckpointError

    prob = np.full((32, 32), 0.9, np.float32)
    prob[4:8, 4:8] = bad
    with pytest.raises(CheckpointError, match="output holds NaN or infinite values"):
        close_contours(prob)
