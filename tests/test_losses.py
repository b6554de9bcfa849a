"""Loss functions: weighted cross-entropy against PyTorch's, DiceCE and its pixel-weighted form, the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.errors import ConfigValueError
from medseg.losses import LOSSES, create_loss, prior_logit_shift


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    label = torch.randint(0, 2, (2, 1, 8, 8)).float()
    return logits, label


def test_weighted_ce_with_unit_weights_is_cross_entropy():
    logits, label = _batch()
    target = torch.cat([label, torch.ones_like(label)], dim=1)
    expected = F.cross_entropy(logits, label[:, 0].long())
    torch.testing.assert_close(create_loss("weighted_ce")(logits, target), expected)
    torch.testing.assert_close(create_loss("weighted_ce")(logits, label), expected)  # no weight channel


def test_weighted_ce_scales_with_weights():
    logits, label = _batch()
    weight = torch.zeros_like(label)
    weight[..., 0, 0] = 4.0
    target = torch.cat([label, weight], dim=1)
    per_pixel = F.cross_entropy(logits, label[:, 0].long(), reduction="none")
    expected = (per_pixel[:, 0, 0] * 4.0).sum() / per_pixel.numel()
    torch.testing.assert_close(create_loss("weighted_ce")(logits, target), expected)


def _membrane(gap_rows: slice | None = None):
    """A 4-px vertical membrane (class 0) in a 64 x 64 interior (class 1), and confident logits for it."""
    label = torch.ones(1, 1, 64, 64)
    label[..., 30:34] = 0
    predicted = label.clone()
    if gap_rows is not None:
        predicted[..., gap_rows, :] = 1  # the membrane broken over these rows
    logits = torch.cat([(1 - predicted) * 20 - 10, predicted * 20 - 10], dim=1)
    return logits, torch.cat([label, torch.ones_like(label)], dim=1)


def test_cldice_term_charges_a_membrane_gap_by_the_share_of_centre_line_lost():
    loss, ce = create_loss("weighted_ce_cldice", cldice_weight=1.0), create_loss("weighted_ce")
    whole, target = _membrane()
    assert float(loss(whole, target) - ce(whole, target)) == pytest.approx(0.0, abs=1e-3)
    broken, _ = _membrane(slice(20, 36))  # 16 of 64 rows: a quarter of the centre line is lost
    sens = 48 / 64  # the true skeleton's share inside the prediction; the prediction stays inside the truth
    expected = 1 - 2 * sens / (1 + sens)
    assert float(loss(broken, target) - ce(broken, target)) == pytest.approx(expected, abs=0.01)
    # the gap's 64 pixels are a sixteenth of the membrane, but clDice charges the whole quarter of its line
    assert float(create_loss("weighted_ce_cldice", cldice_weight=0.0)(broken, target)) == float(ce(broken, target))


def test_cldice_weight_must_not_be_negative():
    with pytest.raises(ConfigValueError, match="cldice_weight"):
        create_loss("weighted_ce_cldice", cldice_weight=-0.5)


def test_dice_ce_ignores_weight_channel():
    logits, label = _batch()
    loss = create_loss("dice_ce")
    with_weight = torch.cat([label, torch.full_like(label, 9.0)], dim=1)
    torch.testing.assert_close(loss(logits, with_weight), loss(logits, label))


@pytest.mark.parametrize("class_weights", [None, [1.0, 1.0, 2.0]])
def test_dice_weighted_ce_with_unit_pixel_weights_is_monai_dice_ce(class_weights):
    """No weight channel, or all ones, gives exactly MONAI's DiceCELoss (class weights in both terms)."""
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    from monai.losses import DiceCELoss

    weight = torch.tensor(class_weights) if class_weights else None
    expected = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)(logits, label)
    torch.testing.assert_close(create_loss("dice_ce", class_weights=class_weights)(logits, label), expected)
    loss = create_loss("dice_weighted_ce", class_weights=class_weights)
    torch.testing.assert_close(loss(logits, label), expected)
    torch.testing.assert_close(loss(logits, torch.cat([label, torch.ones_like(label)], 1)), expected)


@pytest.mark.parametrize("name", ["dice_ce", "dice_weighted_ce"])
def test_class_weighted_dice_ce_follows_the_logits_device(name):
    """The class weights are a CPU buffer of a loss module nothing moves; on a GPU they met CUDA logits
    (emulated here with PyTorch's shape-only 'meta' device)."""
    loss = create_loss(name, class_weights=[1.0, 1.0, 2.0])
    logits = torch.randn(2, 3, 8, 8, device="meta")
    assert loss(logits, torch.zeros(2, 1, 8, 8, device="meta")).device.type == "meta"


def test_dice_weighted_ce_adds_the_pixel_weights_to_the_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 4, 4)
    label = torch.randint(0, 3, (1, 1, 4, 4)).float()
    weight = torch.ones_like(label)
    weight[..., 1, 2] = 5.0
    ce_only = create_loss("dice_weighted_ce", lambda_dice=0.0, class_weights=[1.0, 2.0, 3.0])
    per_pixel = F.cross_entropy(logits, label[:, 0].long(), reduction="none")
    class_w = torch.tensor([1.0, 2.0, 3.0])[label[:, 0].long()]
    expected = (per_pixel * class_w * weight[:, 0]).sum() / class_w.sum()
    torch.testing.assert_close(ce_only(logits, torch.cat([label, weight], 1)), expected)


def test_dice_weighted_ce_with_a_distance_head_adds_its_cross_entropy_on_the_last_channel():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    weight = torch.rand(2, 1, 8, 8) + 0.5
    distance = torch.rand(2, 1, 8, 8)
    target = torch.cat([label, weight, distance], 1)
    classes = create_loss("dice_weighted_ce", class_weights=[1.0, 1.0, 2.0])(logits[:, :3], target[:, :2])
    head = create_loss("dice_weighted_ce", class_weights=[1.0, 1.0, 2.0], distance_head=True, distance_weight=0.5)
    expected = classes + 0.5 * F.binary_cross_entropy_with_logits(logits[:, 3], distance[:, 0])
    torch.testing.assert_close(head(logits, target), expected)
    # without the head the distance channel is ignored
    torch.testing.assert_close(create_loss("dice_weighted_ce", class_weights=[1.0, 1.0, 2.0])(logits[:, :3], target),
                               classes)
    with pytest.raises(ValueError, match="distance head needs"):
        head(logits, target[:, :2])
    with pytest.raises(ConfigValueError, match="distance_weight=-1.0: must be >= 0; set e.g. --set distance_weight=1"):
        create_loss("dice_weighted_ce", distance_head=True, distance_weight=-1.0)


def test_dice_weighted_ce_dice_term_is_monai_class_weighted_dice_whatever_the_pixel_weights():
    from monai.losses import DiceLoss

    torch.manual_seed(3)
    logits = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    weight = torch.rand_like(label) * 10.0
    dice_only = create_loss("dice_weighted_ce", lambda_ce=0.0, class_weights=[1.0, 2.0, 3.0])
    expected = DiceLoss(to_onehot_y=True, softmax=True, weight=torch.tensor([1.0, 2.0, 3.0]))(logits, label)
    torch.testing.assert_close(dice_only(logits, torch.cat([label, weight], 1)), expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_backpropagates(name):
    logits, label = _batch()
    logits.requires_grad_(True)
    create_loss(name)(logits, label).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_unknown_loss_lists_options():
    options = "weighted_ce, weighted_ce_cldice, dice_ce, dice_weighted_ce"
    with pytest.raises(ValueError, match=f"unknown loss 'dice'; options are: {options}"):
        create_loss("dice")


def test_prior_logit_shift_undoes_class_weights():
    """softmax(logits - log w) is the weighted posterior p_c * w_c renormalised back to p_c."""
    import math

    assert prior_logit_shift(None, 3) == [0.0, 0.0, 0.0]
    shift = prior_logit_shift([1.0, 1.0, 2.0], 3)
    assert shift == pytest.approx([0.0, 0.0, -math.log(2.0)])
    assert all(math.copysign(1.0, v) > 0 for v in shift[:2])  # no -0.0 in written configs
    p = torch.tensor([0.5, 0.2, 0.3])
    weighted = p * torch.tensor([1.0, 1.0, 2.0])
    weighted_logits = torch.log(weighted / weighted.sum())
    torch.testing.assert_close(torch.softmax(weighted_logits + torch.tensor(shift), 0), p)
    with pytest.raises(ValueError, match="class_weights: 2 weights for 3 classes"):
        prior_logit_shift([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="positive"):
        prior_logit_shift([1.0, 0.0, 2.0], 3)


def test_cldice_term_matches_monai_soft_cldice_on_uncertain_maps():
    """Unsaturated probabilities: our single-channel clDice gives MONAI's ``SoftclDiceLoss`` (MONAI >= 1.5 scores a
    single channel; our own formula exists for 1.4)."""
    from monai.losses import SoftclDiceLoss

    from medseg.losses import WeightedCEclDiceLoss

    torch.manual_seed(3)
    prob = torch.rand(2, 1, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.6).float()
    ours = WeightedCEclDiceLoss.soft_cldice(prob, mask, 3)
    reference = SoftclDiceLoss(iter_=3, smooth_nr=1.0, smooth_dr=1.0, smooth=1e-4)(prob, mask)
    torch.testing.assert_close(ours, reference)
    assert 0.05 < float(ours) < 0.95  # an uncertain map: neither end of the scale


def test_dice_ce_on_one_output_channel_is_monais_sigmoid_form():
    # one channel is the foreground's logit; a softmax over it (as before) scored the raw logits, so that
    # confidently wrong logits gave a lower (negative) loss than right ones
    from monai.losses import DiceCELoss

    torch.manual_seed(4)
    logits, label = torch.randn(2, 1, 8, 8), torch.randint(0, 2, (2, 1, 8, 8)).float()
    expected = DiceCELoss(sigmoid=True)(logits, label)
    loss = create_loss("dice_ce")
    torch.testing.assert_close(loss(logits, label), expected)
    right, wrong = (label * 2 - 1) * 20, (1 - label * 2) * 20
    assert 0 <= float(loss(right, label)) < 0.01 < 1 < float(loss(wrong, label))
