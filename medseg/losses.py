"""Segmentation losses by name (U-Net weighted CE, with clDice, MONAI DiceCE, Dice + pixel-weighted CE), priors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.losses.cldice import soft_skel
from torch import nn

from medseg.errors import ConfigValueError


class WeightedCrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy weighted by a per-pixel map (the U-Net paper's energy).

    The target carries the class index in channel 0 and the weight map in channel 1, as produced by
    :class:`medseg.transforms.BorderWeightd` followed by ``ConcatItemsd(["label", "weight"])``. A
    target without the weight channel falls back to unweighted cross-entropy.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: logits ``(B, C, H, W)``; target ``(B, 1 or 2, H, W)``. Returns the mean weighted loss."""
        classes = target[:, 0].long()
        ce = F.cross_entropy(logits.float(), classes, reduction="none")
        if target.shape[1] > 1:
            ce = ce * target[:, 1].float()
        return ce.mean()


class WeightedCEclDiceLoss(WeightedCrossEntropyLoss):
    """:class:`WeightedCrossEntropyLoss` plus MONAI's soft clDice (Shit et al. 2021) on one thin-structure class.

    clDice compares soft skeletons: the predicted skeleton's fraction inside the true structure and the
    true skeleton's fraction inside the predicted one, so a gap in a membrane costs its whole
    centre line rather than the few pixels of the gap. It is computed on the softmax probability of
    ``skeleton_class`` (the membranes of ``isbi_em``: class 0) against that class's binary mask.

    Args:
        cldice_weight: weight of the clDice term (0 leaves the weighted cross-entropy alone).
        skeleton_class: the class whose skeleton is compared.
        skeleton_iters: soft-skeleton iterations (about half the thickest structure, in pixels).
    """

    def __init__(self, cldice_weight: float = 0.5, skeleton_class: int = 0, skeleton_iters: int = 3) -> None:
        super().__init__()
        if not float(cldice_weight) >= 0:
            raise ConfigValueError(f"cldice_weight={cldice_weight}: must be >= 0")
        self.cldice_weight, self.skeleton_class = float(cldice_weight), int(skeleton_class)
        self.skeleton_iters = int(skeleton_iters)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: as :meth:`WeightedCrossEntropyLoss.forward`. Returns weighted CE + ``cldice_weight`` x clDice."""
        ce = super().forward(logits, target)
        if self.cldice_weight == 0:
            return ce
        k = self.skeleton_class
        prob = torch.softmax(logits.float(), dim=1)[:, k : k + 1]
        mask = (target[:, :1].long() == k).float()
        return ce + self.cldice_weight * self.soft_cldice(prob, mask, self.skeleton_iters)

    @staticmethod
    def soft_cldice(prob: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
        """1 - clDice of one probability channel ``(B, 1, H, W)`` against its binary mask, per image, averaged:
        MONAI's ``SoftclDiceLoss`` (smoothing 1 and 1e-4) on MONAI's ``soft_skel``, written out because that
        class's handling of a single channel differs between MONAI versions (1.4 scored channels 1.. only)."""
        skel_pred, skel_true = soft_skel(prob, iters), soft_skel(mask, iters)
        dims = list(range(1, prob.dim()))
        tprec = ((skel_pred * mask).sum(dims) + 1.0) / (skel_pred.sum(dims) + 1.0)
        tsens = ((skel_true * prob).sum(dims) + 1.0) / (skel_true.sum(dims) + 1.0)
        return (1.0 - 2.0 * tprec * tsens / (tprec + tsens + 1e-4)).mean()


class DiceCEOnLabel(nn.Module):
    """MONAI ``DiceCELoss`` (softmax, one-hot label) that ignores an extra weight channel in the target.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        class_weights: optional per-class weights of the cross-entropy (one per output channel).
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 class_weights: list[float] | None = None) -> None:
        super().__init__()
        weight = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
                               weight=weight)
        # one output channel: the foreground's logit (sigmoid Dice + binary cross-entropy); a softmax over
        # one channel is 1 everywhere, and MONAI then scores the raw logits, rewarding confident errors
        self.binary = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._dice_ce(logits.float(), target[:, :1])

    def _dice_ce(self, logits: torch.Tensor, label: torch.Tensor, pixel_weight: torch.Tensor | None = None):
        """``DiceCELoss`` of ``logits`` against the class indices ``label`` (B, 1, H, W), its cross-entropy
        ``sum(w_pixel * w_class * ce) / sum(w_class)``.

        The cross-entropy is taken per pixel and summed here rather than by PyTorch's weighted mean: the
        class weights follow the logits' device (the loss module is never moved), and on CUDA a sum is
        deterministic where ``nll_loss2d``'s own mean reduction is not.
        """
        if logits.shape[1] == 1:  # one channel: the foreground's logit
            return self.binary(logits, (label > 0).to(logits.dtype))
        classes = label[:, 0].long()
        ce = F.cross_entropy(logits, classes, reduction="none")
        class_weights = self.loss.cross_entropy.weight
        norm = class_weights.to(logits.device)[classes] if class_weights is not None else torch.ones_like(ce)
        weighted = ce * norm if pixel_weight is None else ce * norm * pixel_weight.float()
        ce = weighted.sum() / norm.sum().clamp_min(1e-12)
        return self.loss.lambda_dice * self.loss.dice(logits, label) + self.loss.lambda_ce * ce


class DiceWeightedCE(DiceCEOnLabel):
    """MONAI ``DiceCELoss`` whose cross-entropy also takes a pixel weight map from the target's channel 1.

    The target carries the class index in channel 0 and, optionally, a pixel weight map in channel 1
    (e.g. :class:`medseg.transforms.TouchingWeightd` followed by ``ConcatItemsd(["label", "weight"])``).
    The cross-entropy is ``sum(w_pixel * w_class * ce) / sum(w_class)``: without a weight channel (or with
    all ones) the loss equals ``DiceCELoss``, and the pixel weights add to the loss where they exceed 1, as
    in the U-Net paper.

    With ``distance_head`` the network has one more output channel, last: its sigmoid learns the
    target's last channel (a normalised distance map, :func:`medseg.instances.instance_distance_map`) by
    binary cross-entropy, added with ``distance_weight``. Other arguments as :class:`DiceCEOnLabel`.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 class_weights: list[float] | None = None, distance_head: bool = False,
                 distance_weight: float = 1.0) -> None:
        super().__init__(lambda_dice, lambda_ce, class_weights)
        if not float(distance_weight) >= 0:
            raise ConfigValueError(f"distance_weight={distance_weight}: must be >= 0; set e.g. --set distance_weight=1")
        self.distance_head, self.distance_weight = bool(distance_head), float(distance_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.distance_head:
            if target.shape[1] < 3:
                raise ValueError(f"a distance head needs (class, weight, distance) targets, got {target.shape[1]} "
                                 "channels")
            distance = F.binary_cross_entropy_with_logits(logits[:, -1].float(), target[:, -1].float())
            return self._classes(logits[:, :-1], target[:, :-1]) + self.distance_weight * distance
        return self._classes(logits, target)

    def _classes(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._dice_ce(logits.float(), target[:, :1], target[:, 1] if target.shape[1] > 1 else None)


#: Loss name (as written in a bundle's ``loss_name``) -> class.
LOSSES: dict[str, type[nn.Module]] = {
    "weighted_ce": WeightedCrossEntropyLoss,
    "weighted_ce_cldice": WeightedCEclDiceLoss,
    "dice_ce": DiceCEOnLabel,
    "dice_weighted_ce": DiceWeightedCE,
}


def create_loss(name: str, **kwargs: object) -> nn.Module:
    """Build the loss registered under ``name`` in :data:`LOSSES`.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in LOSSES:
        raise ConfigValueError(f"unknown loss '{name}'; options are: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)


def prior_logit_shift(class_weights: Sequence[float] | None, num_classes: int) -> list[float]:
    """Logit offsets ``-log(w_c)`` that undo the prior of cross-entropy class weights ``w_c``.

    Weighted cross-entropy learns posteriors scaled by ``w_c``; adding these offsets to the logits
    before the softmax (:class:`medseg.transforms.LogitShiftd`) makes the probabilities those of the
    unweighted problem again, so a class with weight 2 no longer wins pixels that are only a third
    likely to be its own. No weights gives zeros.

    Raises:
        ValueError: a weight that is not positive, or a weight count other than ``num_classes``.
    """
    if not class_weights:
        return [0.0] * int(num_classes)
    weights = [float(w) for w in class_weights]
    if len(weights) != num_classes:
        raise ConfigValueError(f"class_weights: {len(weights)} weights for {num_classes} classes; give one per class")
    if any(not w > 0 for w in weights):
        raise ConfigValueError(f"class_weights must be positive, got {weights}")
    return [0.0 - math.log(w) for w in weights]  # 0.0 - ...: no -0.0 for weight 1
