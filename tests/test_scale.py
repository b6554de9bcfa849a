"""Object-size normalisation: known diameters, zooms, label-safe training resampling, two-pass inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import ConfigValueError
from medseg.inferers import TiledInferer
from medseg.scale import (
    RescaleToDiameterd,
    ScaledTiledInferer,
    equivalent_diameters,
    object_diameter,
    zoom_for,
)


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_diameters_of_known_areas():
    mask = np.zeros((100, 100), bool)
    mask[10:50, 10:50] = True  # area 1600
    mask[60:70, 60:70] = True  # area 100
    big, small = np.sqrt(4 * 1600 / np.pi), np.sqrt(4 * 100 / np.pi)
    assert object_diameter(mask, "largest") == pytest.approx(big)
    assert object_diameter(mask, "median") == pytest.approx((big + small) / 2)
    labels = np.zeros((10, 10), int)
    labels[0, :4], labels[5:, 5:] = 3, 7  # instance values need not be consecutive
    assert sorted(equivalent_diameters(labels)) == pytest.approx(sorted(np.sqrt(4 * np.array([4, 25]) / np.pi)))
    assert object_diameter(np.zeros((5, 5)), "median") is None
    with pytest.raises(ConfigValueError, match="statistic"):
        object_diameter(mask, "mean")


def test_zoom_is_clipped_and_left_at_one_within_tolerance():
    assert zoom_for(40.0, 20.0) == pytest.approx(0.5)
    assert zoom_for(400.0, 20.0, limits=(0.25, 4.0)) == pytest.approx(0.25)
    assert zoom_for(1.0, 20.0, limits=(0.25, 4.0)) == pytest.approx(4.0)
    assert zoom_for(22.0, 20.0, tolerance=0.2) == 1.0 and zoom_for(18.0, 20.0, tolerance=0.2) == 1.0
    assert zoom_for(26.0, 20.0, tolerance=0.2) == pytest.approx(20 / 26)
    assert zoom_for(None, 20.0) == 1.0 and zoom_for(0.0, 20.0) == 1.0


def test_training_rescale_brings_the_object_to_the_target_without_new_label_values():
    label = np.zeros((1, 120, 120), np.float32)
    cell = _disc((120, 120), (60, 60), 40)
    label[0][cell] = 1
    label[0][_disc((120, 120), (60, 60), 15)] = 2  # nucleus inside the cell
    image = np.random.default_rng(0).random((3, 120, 120)).astype(np.float32)
    t = RescaleToDiameterd(["image", "label"], "label", target_diameter=40, nearest_keys="label",
                           foreground=[1, 2], statistic="largest")
    out = t({"image": image, "label": label})
    assert out["zoom"] == pytest.approx(40 / object_diameter(cell, "largest"))
    assert out["image"].shape == (3, 60, 60) and out["label"].shape == (1, 60, 60)
    assert set(np.unique(out["label"])) == {0.0, 1.0, 2.0}
    assert t.measure(out["label"]) == pytest.approx(40, rel=0.05)
    assert 0 <= out["image"].min() and out["image"].max() <= 1  # bilinear + antialias stays in range

    same = RescaleToDiameterd(["image", "label"], "label", target_diameter=70, nearest_keys="label",
                              foreground=[1, 2], statistic="largest", tolerance=0.25)({"image": image, "label": label})
    assert same["zoom"] == 1.0 and same["image"] is image  # within tolerance: untouched
    off = RescaleToDiameterd(["image"], "label", None, foreground=[1])({"image": image, "label": label})
    assert off["image"] is image and "zoom" not in off


def test_training_rescale_measures_instances_and_upsamples():
    instances = np.zeros((1, 64, 64), np.float32)
    for i, (y, x) in enumerate([(10, 10), (10, 40), (40, 20), (45, 50)], start=1):
        instances[0][_disc((64, 64), (y, x), 4)] = i
    t = RescaleToDiameterd(["image", "instances"], "instances", target_diameter=18, nearest_keys="instances")
    out = t({"image": np.ones((1, 64, 64), np.float32), "instances": instances})
    assert out["zoom"] > 1.8 and out["instances"].shape[-1] == round(64 * out["zoom"])
    assert set(np.unique(out["instances"])) == {0, 1, 2, 3, 4}
    assert object_diameter(out["instances"][0], "median", instances=True) == pytest.approx(18, rel=0.1)


@pytest.mark.parametrize("bad", [{"target_diameter": 0}, {"target_diameter": 20, "limits": [2, 4]},
                                 {"target_diameter": 20, "tolerance": -1}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigValueError):
        RescaleToDiameterd(["image"], "label", **bad)
    with pytest.raises(ConfigValueError):
        ScaledTiledInferer(roi_size=32, **bad)


class _Threshold(torch.nn.Module):
    """A per-pixel "network": class 1 where the image is bright; records the sizes it is run on."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        fg = (x[:, :1] - 0.5) * 20
        return torch.cat([-fg, fg], dim=1)


def _disc_case(shape, centre, radius, target_diameter, tolerance):
    """A one-disc image, a thresholding network and a whole-image inferer that sizes the disc as ``largest``."""
    image = torch.as_tensor(_disc(shape, centre, radius)[None, None].astype(np.float32))
    inferer = ScaledTiledInferer(roi_size=64, target_diameter=target_diameter, foreground=[1], statistic="largest",
                                 tolerance=tolerance, border=0, whole_max_pixels=10**6, divisor=1)
    return image, _Threshold(), inferer


def test_inferer_runs_again_at_the_standard_size_and_returns_the_input_grid():
    image, net, inferer = _disc_case((96, 128), (48, 64), 30, target_diameter=30, tolerance=0.05)
    out = inferer(image, net)
    assert out.shape == (1, 2, 96, 128)
    assert inferer.last_zooms == [pytest.approx(30 / object_diameter(image[0, 0].numpy(), "largest"))]
    # first pass at the input's scale, second at the standard one, where the size is confirmed
    assert net.sizes == [(96, 128), (48, 64)]
    agree = (out.argmax(1)[0].numpy() == image[0, 0].numpy()).mean()
    assert agree > 0.99  # resampled back onto the input's pixels


def test_inferer_keeps_scale_when_close_or_empty_and_uses_tta_only_on_the_final_pass():
    image, net, inferer = _disc_case((64, 64), (32, 32), 15, target_diameter=31, tolerance=0.2)
    out = inferer(image, net)
    assert net.sizes == [(64, 64)] and inferer.last_zooms == [1.0]  # one pass only
    torch.testing.assert_close(out, net(image))
    net.sizes.clear()
    inferer.tta = True
    inferer(image, net)
    assert len(net.sizes) == 1 + 8 and inferer.tta is True
    net.sizes.clear()
    inferer.tta = False
    inferer(torch.zeros(2, 1, 64, 64), net)  # no object found: the image's own scale, batch kept
    assert inferer.last_zooms == [1.0, 1.0] and len(net.sizes) == 2


class _SeesLargeObjectsInPieces(torch.nn.Module):
    """Class 1 on bright pixels, but objects wider than 45 px come out as their inner half (as a network
    trained on small objects breaks large ones up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from scipy import ndimage

        fg = x[0, 0].numpy() > 0.5
        if object_diameter(fg, "inscribed") > 45:
            fg = ndimage.distance_transform_edt(fg) > object_diameter(fg, "inscribed") / 4
        score = torch.as_tensor(fg, dtype=torch.float32)[None, None] * 20 - 10
        return torch.cat([-score, score], dim=1)


def test_inferer_iterates_to_correct_a_first_estimate_made_on_broken_up_objects():
    image = torch.as_tensor(_disc((160, 160), (80, 80), 30)[None, None].astype(np.float32))  # 60 px wide
    kwargs = dict(roi_size=64, target_diameter=20, foreground=[1], statistic="inscribed", tolerance=0.1,
                  border=0, whole_max_pixels=10**6, divisor=1)
    once = ScaledTiledInferer(iterations=1, **kwargs)
    once(image, _SeesLargeObjectsInPieces())
    assert once.last_zooms[0] == pytest.approx(20 / 30, rel=0.1)  # fooled by the pieces: 30 px seen
    settled = ScaledTiledInferer(iterations=3, **kwargs)
    out = settled(image, _SeesLargeObjectsInPieces())
    assert settled.last_zooms[0] == pytest.approx(20 / 60, rel=0.1)
    assert (out.argmax(1)[0].numpy() == image[0, 0].numpy()).mean() > 0.98


def test_a_known_diameter_skips_the_estimate():
    image = torch.as_tensor(_disc((96, 128), (48, 64), 30)[None, None].astype(np.float32))
    net = _Threshold()
    inferer = ScaledTiledInferer(roi_size=64, target_diameter=30, foreground=[1], diameter=15, border=0,
                                 whole_max_pixels=10**6, divisor=1)
    assert inferer(image, net).shape == (1, 2, 96, 128)
    assert net.sizes == [(192, 256)] and inferer.last_zooms == [2.0]  # one pass, at 30 / 15
    with pytest.raises(ConfigValueError, match="diameter"):
        ScaledTiledInferer(roi_size=64, target_diameter=30, diameter=0)
    with pytest.raises(ConfigValueError, match="target_diameter too"):
        ScaledTiledInferer(roi_size=64, diameter=15)  # a model trained at the images' own scale


class _HalvesAtItsInputSize(_Threshold):
    """Sees objects at half their size, but only at one input size (a first estimate that is far off)."""

    def __init__(self, fooled_at: tuple[int, int]) -> None:
        super().__init__()
        self.fooled_at = fooled_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if tuple(x.shape[-2:]) == self.fooled_at:
            from scipy import ndimage

            fg = x[0, 0].numpy() > 0.5
            inner = torch.as_tensor(ndimage.distance_transform_edt(fg) > object_diameter(fg, "inscribed") / 4)
            out[0, 1][~inner], out[0, 0][~inner] = -10.0, 10.0
        return out


def test_an_estimate_that_settles_near_one_runs_at_the_images_own_scale():
    image = torch.as_tensor(_disc((160, 160), (80, 80), 30)[None, None].astype(np.float32))  # 60 px wide
    net = _HalvesAtItsInputSize(fooled_at=(160, 160))
    inferer = ScaledTiledInferer(roi_size=64, target_diameter=62, foreground=[1], statistic="inscribed",
                                 tolerance=0.1, iterations=3, border=0, whole_max_pixels=10**6, divisor=1)
    inferer(image, net)
    # 30 px seen at first (zoom ~2), 60 px at that zoom (zoom ~1.03, within 10 % of 1): the last pass is native
    assert inferer.last_zooms == [1.0] and net.sizes[-1] == (160, 160) and len(net.sizes) == 4


def test_inscribed_diameter_ignores_specks_and_touching_neighbours():
    mask = _disc((100, 100), (30, 30), 10) | _disc((100, 100), (30, 49), 10)  # two touching 20 px discs
    mask[80:82, 80:82] = mask[90, 10] = True  # specks
    assert object_diameter(mask, "inscribed") == pytest.approx(20, abs=1.5)
    assert object_diameter(mask, "median") < 5  # the plain median is pulled down by the specks


def test_inferer_zooms_each_image_of_a_batch_on_its_own():
    small = _disc((64, 64), (32, 32), 8)  # 16 px wide: enlarged to 32
    large = _disc((64, 64), (32, 32), 30)  # 60 px wide: shrunk to 32
    batch = torch.as_tensor(np.stack([small, large])[:, None].astype(np.float32))
    net = _Threshold()
    inferer = ScaledTiledInferer(roi_size=64, target_diameter=32, foreground=[1], statistic="inscribed",
                                 tolerance=0.1, border=0, whole_max_pixels=10**6, divisor=1)
    out = inferer(batch, net)
    assert out.shape == (2, 2, 64, 64)
    assert inferer.last_zooms[0] > 1.7 and inferer.last_zooms[1] < 0.6
    for i, mask in enumerate((small, large)):
        assert (out[i].argmax(0).numpy() == mask).mean() > 0.98


def test_inscribed_diameter_of_a_mask_without_background_is_unknown():
    assert object_diameter(np.ones((50, 50), bool), "inscribed") is None


def test_without_target_it_is_a_plain_tiled_inferer():
    x = torch.rand(1, 1, 40, 50)
    net = _Threshold()
    plain = TiledInferer(roi_size=32, border=4)(x, net)
    torch.testing.assert_close(ScaledTiledInferer(roi_size=32, border=4)(x, net), plain)


def test_a_distance_channel_past_the_logit_shifts_takes_no_part_in_the_measurement():
    inferer = ScaledTiledInferer(roi_size=64, target_diameter=20, foreground=[1], statistic="largest",
                                 logit_shift=[0.0, 0.0])
    disc = torch.as_tensor(_disc((64, 64), (32, 32), 10).astype(np.float32))
    logits = torch.stack([-disc, disc, torch.full_like(disc, 50.0)])  # a distance logit larger than both classes
    assert inferer.measure(logits) == pytest.approx(object_diameter(disc.numpy() > 0, "largest"))
