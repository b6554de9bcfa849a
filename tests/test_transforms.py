"""Transforms: slice loading, binary labels, the U-Net border weight map and the coarse elastic warp."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.errors import ConfigValueError, DataError
from medseg.transforms import (
    BinaryLabeld,
    BorderWeightd,
    LoadSliced,
    RandElasticGridd,
    TouchingWeightd,
    border_weight_map,
    touching_weight_map,
)


def test_load_sliced_png_and_tiff_page(tmp_path, isbi_stacks):
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(tmp_path / "a.png")
    d = LoadSliced(keys="image")({"image": str(tmp_path / "a.png")})
    assert d["image"].shape == (1, 5, 7) and d["image"].dtype == np.float32 and d["image"].max() == 9
    assert d["image_file"] == str(tmp_path / "a.png")
    import tifffile

    stack = tifffile.imread(isbi_stacks / "train-volume.tif")
    page = LoadSliced(keys="image")({"image": str(isbi_stacks / "train-volume.tif"), "page": 2})["image"]
    np.testing.assert_array_equal(page[0], stack[2])


def test_load_sliced_size_mismatch_names_the_label(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "lab.png")
    with pytest.raises(DataError, match=r"lab\.png: size .* must have the same size"):
        LoadSliced(keys=["image", "label"])({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "lab.png")})


def test_binary_label_accepts_0_255_and_0_1_and_rejects_others():
    out = BinaryLabeld(keys="label")({"label": np.array([[[0, 255]]], np.float32)})
    np.testing.assert_array_equal(out["label"], [[[0, 1]]])
    out = BinaryLabeld(keys="label")({"label": np.array([[[0, 1]]], np.float32)})
    np.testing.assert_array_equal(out["label"], [[[0, 1]]])
    with pytest.raises(DataError, match=r"x\.png: label values 128 are not binary"):
        BinaryLabeld(keys="label")({"label": np.array([[[0, 128, 255]]], np.float32), "label_file": "x.png"})


def test_a_colour_binary_label_is_named_as_such(tmp_path):
    from PIL import Image

    from medseg.transforms import LoadSliced

    path = tmp_path / "red.png"
    label = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    label.putpalette([0, 0, 0, 255, 0, 0])  # membrane black, interior red
    label.save(path)
    d = LoadSliced(keys="label")({"label": str(path)})
    with pytest.raises(DataError, match=r"red\.png: label values 76\.245 are not binary \(a colour label, its "
                                        r"colours read as their luma\); expected 0 = membrane and 255"):
        BinaryLabeld(keys="label")(d)


def test_border_weight_between_two_cells_matches_formula():
    interior = np.zeros((20, 30), bool)
    interior[:, :10] = True  # cell 1: columns 0..9
    interior[:, 14:] = True  # cell 2: columns 14..29; gap columns 10..13
    w = border_weight_map(interior, w0=10.0, sigma=5.0, class_balance=False)
    # pixel in column 11: 2 px from cell 1 (col 9), 3 px from cell 2 (col 14)
    assert w[10, 11] == pytest.approx(1.0 + 10.0 * math.exp(-(2 + 3) ** 2 / 50.0), rel=1e-5)
    assert np.all(w[interior] == 1.0)  # the border term only weights membrane pixels
    balanced = border_weight_map(interior, class_balance=True)
    frac = interior.mean()
    assert balanced[0, 0] == pytest.approx(0.5 / frac)


def test_border_weight_single_cell_has_no_border_term():
    interior = np.zeros((16, 16), bool)
    interior[4:12, 4:12] = True
    w = border_weight_map(interior, class_balance=False)
    np.testing.assert_allclose(w, 1.0)  # d2 is infinite everywhere


def test_border_weightd_adds_key():
    label = np.zeros((1, 10, 10), np.float32)
    label[0, :, :4] = 1
    label[0, :, 6:] = 1
    d = BorderWeightd(keys="label")({"label": label})
    assert d["weight"].shape == (1, 10, 10) and d["weight"][0, 0, 5] > d["weight"][0, 0, 0]


def test_touching_weight_peaks_where_two_instances_meet_and_keeps_touching_nuclei_apart():
    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 3:13] = 1
    labels[5:15, 13:23] = 2  # touches nucleus 1 along column 12/13: one binary component
    labels[5:15, 30:38] = 3  # isolated, 7 px from nucleus 2
    w = touching_weight_map(labels, w0=10.0, sigma=3.0)
    # column 12 is in nucleus 1 (d1 = 0) and 1 px from nucleus 2
    assert w[10, 12] == pytest.approx(1.0 + 10.0 * math.exp(-1 / 18.0), rel=1e-5)
    # column 8: inside nucleus 1, 5 px from nucleus 2
    assert w[10, 8] == pytest.approx(1.0 + 10.0 * math.exp(-25 / 18.0), rel=1e-5)
    assert w[10, 30] == pytest.approx(1.0 + 10.0 * math.exp(-(8 ** 2) / 18.0), rel=1e-4)  # 8 px from nucleus 2
    assert w[0, 0] == pytest.approx(1.0, abs=1e-3) and w.min() >= 1.0
    np.testing.assert_array_equal(touching_weight_map(labels, w0=0.0), np.ones((20, 40), np.float32))
    single = np.zeros((16, 16), np.int32)
    single[4:12, 4:12] = 1
    np.testing.assert_allclose(touching_weight_map(single), 1.0)  # no second nucleus, no extra weight
    d = TouchingWeightd(keys="instances", w0=10.0)({"instances": labels[None].astype(np.float32)})
    np.testing.assert_allclose(d["weight"][0], touching_weight_map(labels, 10.0, 3.0))
    with pytest.raises(ValueError, match="sigma > 0"):
        touching_weight_map(labels, sigma=0.0)
    with pytest.raises(ConfigValueError, match="touch_weight=-1.*--set touch_weight=10"):
        TouchingWeightd(keys="instances", w0=-1.0)


def test_elastic_zero_sigma_is_identity_and_labels_stay_binary():
    img = torch.rand(1, 32, 40)
    lab = (torch.rand(1, 32, 40) > 0.5).float()
    same = RandElasticGridd(keys=["image", "label"], sigma=0.0, prob=1.0, mode=["bilinear", "nearest"])
    out = same({"image": img, "label": lab})
    torch.testing.assert_close(out["image"], img, atol=1e-5, rtol=0)
    warp = RandElasticGridd(keys=["image", "label"], sigma=10.0, prob=1.0, mode=["bilinear", "nearest"])
    warp.set_random_state(3)
    out = warp({"image": img, "label": lab})
    assert out["image"].shape == img.shape and not torch.allclose(out["image"], img)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}


def test_elastic_borders_are_mirrored_not_filled_with_zeros():
    # a constant picture stays constant wherever the field pulls from outside it
    img, lab = torch.full((1, 24, 28), 5.0), torch.ones(1, 24, 28)
    warp = RandElasticGridd(keys=["image", "label"], sigma=10.0, prob=1.0, mode=["bilinear", "nearest"])
    warp.set_random_state(3)
    out = warp({"image": img, "label": lab})
    torch.testing.assert_close(out["image"], img)
    assert bool((out["label"] == 1).all())


def test_elastic_is_reproducible_with_seed():
    img = torch.rand(1, 24, 24)
    a, b = (RandElasticGridd(keys="image", prob=1.0).set_random_state(7) for _ in range(2))
    torch.testing.assert_close(a({"image": img})["image"], b({"image": img})["image"])


def test_logit_shift_undoes_a_class_weighted_prior():
    import torch

    from medseg.transforms import LogitShiftd

    # class weights w = (3, 1) scale the learned posterior odds of class 0 by 3; the shift log(3) undoes it
    true_p1 = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1)
    weighted_odds = (true_p1 / (1 - true_p1)) / 3.0
    logits = torch.cat([torch.zeros_like(true_p1), weighted_odds.log()])
    out = LogitShiftd(keys="pred", shift=[0.0, math.log(3.0)])({"pred": logits})["pred"]
    torch.testing.assert_close(torch.softmax(out, 0)[1], true_p1[0])
    arr = LogitShiftd(keys="pred", shift=[1.0, -1.0])({"pred": np.zeros((2, 4, 4), np.float32)})["pred"]
    assert arr.dtype == np.float32 and arr[0].min() == 1.0 and arr[1].max() == -1.0
    with pytest.raises(ValueError, match="2 logit shifts and 0 extra channels for 3 channels"):
        LogitShiftd(keys="pred", shift=[0.0, 1.0])({"pred": np.zeros((3, 2, 2))})
    # a trailing distance channel is no class: it is left as it is
    logits = torch.zeros(3, 2, 2)
    out = LogitShiftd(keys="pred", shift=[1.0, -1.0], extra_channels=1)({"pred": logits})["pred"]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -1.0, 0.0]))


def test_class_activations_softmax_the_classes_and_sigmoid_the_distance_channel():
    import torch

    from medseg.transforms import ClassActivationsd, KeepChannelsd

    torch.manual_seed(0)
    logits = torch.randn(4, 5, 5)
    out = ClassActivationsd(keys="pred", num_classes=3)({"pred": logits})["pred"]
    torch.testing.assert_close(out[:3], torch.softmax(logits[:3], 0))
    torch.testing.assert_close(out[3], torch.sigmoid(logits[3]))
    plain = ClassActivationsd(keys="pred", num_classes=3)({"pred": logits[:3]})["pred"]
    torch.testing.assert_close(plain, torch.softmax(logits[:3], 0))  # no extra channel: MONAI's softmax
    assert KeepChannelsd(keys="pred", count=3)({"pred": out})["pred"].shape == (3, 5, 5)
    with pytest.raises(ValueError, match="fewer than 3 classes"):
        ClassActivationsd(keys="pred", num_classes=3)({"pred": logits[:2]})


def test_keep_largest_object_removes_stray_blobs_in_probabilities():
    from medseg.transforms import KeepLargestObjectd

    prob = np.zeros((3, 20, 20), np.float32)
    prob[0] = 1.0
    prob[:, 2:12, 2:12] = np.array([0.1, 0.6, 0.3])[:, None, None]  # the cell: body ...
    prob[:, 5:8, 5:8] = np.array([0.1, 0.2, 0.7])[:, None, None]  # ... with its nucleus
    prob[:, 15:18, 15:18] = np.array([0.2, 0.7, 0.1])[:, None, None]  # a stray blob
    out = KeepLargestObjectd("pred", foreground=[1, 2])({"pred": torch.from_numpy(prob)})["pred"]
    assert isinstance(out, torch.Tensor)
    winner = out.argmax(0).numpy()
    assert (winner[15:18, 15:18] == 0).all() and out[0, 15:18, 15:18].eq(1).all()
    np.testing.assert_array_equal(out[:, :14, :14].numpy(), prob[:, :14, :14])  # the cell is untouched
    # volumes slice by slice, numpy in and out, and the switch
    vol = KeepLargestObjectd("pred", foreground=[1, 2])({"pred": np.stack([prob, prob], axis=1)})["pred"]
    np.testing.assert_array_equal(vol[:, 1], out.numpy())
    assert KeepLargestObjectd("pred", foreground=[1, 2], enabled=False)({"pred": prob})["pred"] is prob
    empty = np.stack([np.ones((4, 4)), np.zeros((4, 4)), np.zeros((4, 4))]).astype(np.float32)
    assert KeepLargestObjectd("pred", foreground=[1, 2])({"pred": empty})["pred"] is empty


def test_keep_largest_object_keeps_a_part_joined_at_a_corner():
    # 8-connected: a lobe of the cell that meets the rest only diagonally is part of it, not a stray
    from medseg.transforms import KeepLargestObjectd

    prob = np.zeros((3, 20, 20), np.float32)
    prob[0] = 1.0
    prob[:, 2:10, 2:10] = np.array([0.1, 0.8, 0.1])[:, None, None]
    prob[:, 10:14, 10:14] = np.array([0.1, 0.1, 0.8])[:, None, None]  # meets (9, 9) at its corner (10, 10)
    out = KeepLargestObjectd("pred", foreground=[1, 2])({"pred": prob.copy()})["pred"]
    np.testing.assert_array_equal(out, prob)


def test_an_image_smaller_than_the_mirror_padding_is_named(tmp_path):
    # isbi_em's training mirrors 16 pixels at the borders: an 8 × 8 slice failed inside MONAI's padding,
    # naming no file
    from medseg.transforms import LoadSliced

    Image.fromarray(np.zeros((8, 20), np.uint8)).save(tmp_path / "small.png")
    sample = {"image": str(tmp_path / "small.png"), "label": str(tmp_path / "small.png")}
    assert LoadSliced(["image", "label"], min_size=8)(sample)["image"].shape == (1, 8, 20)
    with pytest.raises(DataError, match=r"small\.png: 8 × 20 pixels, smaller than the 17 × 17 this training takes"):
        LoadSliced(["image", "label"], min_size=17)(sample)


def test_border_weightd_passes_sigma_and_class_balance_on():
    label = np.zeros((1, 20, 30), np.float32)
    label[0, :, :10] = 1
    label[0, :, 14:] = 1
    d = BorderWeightd(keys="label", w0=10.0, sigma=2.0, class_balance=False)({"label": label})
    np.testing.assert_allclose(d["weight"][0], border_weight_map(label[0], 10.0, 2.0, False))
    assert d["weight"][0, 10, 11] == pytest.approx(1 + 10 * math.exp(-25 / 8), rel=1e-5)


def test_border_weights_default_to_the_papers_sigma_of_5_pixels():
    interior = np.zeros((20, 30), bool)
    interior[:, :10] = True
    interior[:, 14:] = True  # a 4-px gap: d1 + d2 = 5 at column 11
    w = border_weight_map(interior, class_balance=False)
    assert w[10, 11] == pytest.approx(1 + 10 * math.exp(-25 / 50), rel=1e-5)


def test_cells_touching_at_a_corner_are_two_cells_for_the_border_weights():
    cells = np.zeros((10, 10), bool)
    cells[:5, :5] = True
    cells[5:, 5:] = True
    w = border_weight_map(cells, class_balance=False)
    assert w[4, 5] == pytest.approx(1 + 10 * math.exp(-4 / 50), rel=1e-5)


def test_elastic_warp_moves_every_key_alike():
    torch.manual_seed(0)
    img = torch.randint(0, 5, (1, 32, 40)).float()
    warp = RandElasticGridd(keys=["image", "label"], sigma=10.0, prob=1.0, mode="nearest")
    warp.set_random_state(3)
    out = warp({"image": img, "label": img.clone()})
    assert not torch.equal(out["image"], img)
    torch.testing.assert_close(out["image"], out["label"])


def test_input_channels_pick_the_image_channels_before_the_rest(tmp_path):
    import tifffile

    from medseg.errors import ConfigValueError, DataError
    from medseg.transforms import LoadSliced

    stains = np.stack([np.full((12, 10), 5, np.uint8), np.arange(120, dtype=np.uint8).reshape(12, 10)])
    tifffile.imwrite(tmp_path / "two.tif", stains, photometric="minisblack", planarconfig="separate")
    with pytest.raises(DataError, match=r"two\.tif: 2 channels; .* pick channels with --set input_channels=\[N\]"):
        LoadSliced(keys="image")({"image": str(tmp_path / "two.tif")})
    d = LoadSliced(keys="image", select=[1])({"image": str(tmp_path / "two.tif")})
    np.testing.assert_array_equal(d["image"][0], stains[1])
    with pytest.raises(DataError, match=r"two\.tif: 2 channels, and input_channels=\[2\] asks for channel 2"):
        LoadSliced(keys="image", select=[2])({"image": str(tmp_path / "two.tif")})
    with pytest.raises(ConfigValueError, match=r"input_channels=1: give channel numbers from 0"):
        LoadSliced(keys="image", select=1)


@pytest.mark.parametrize("values, expected", [
    ([-1e300, 1e300], "holds NaN or infinite values (or values beyond the range of float32"),
    ([-3e38, 3e38], "its values span -3e+38 to 3e+38, more than float32"),
], ids=["float64 beyond float32", "float32 span overflowing"])
def test_values_float32_cannot_compute_with_are_refused_by_name(tmp_path, values, expected):
    # they used to become NaN in the normalisation (blamed on the checkpoint) or infinity (a garbage mask)
    import tifffile

    path = tmp_path / "extreme.tif"
    arr = np.zeros((16, 16), np.float64 if abs(values[1]) > 1e38 * 4 else np.float32)
    arr[0, 0], arr[-1, -1] = values
    tifffile.imwrite(path, arr)
    with pytest.raises(DataError) as info:
        LoadSliced(keys="image")({"image": str(path), "page": 0})
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)
