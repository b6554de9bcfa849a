"""Tiled inference: mirrored borders crop back exactly, Gaussian blending of an equivariant net is exact, TTA."""

from __future__ import annotations

import torch

from medseg.inferers import DIHEDRAL, TiledInferer


def test_pointwise_network_is_reproduced_exactly_with_odd_sizes():
    x = torch.rand(1, 1, 70, 93)
    net = lambda t: torch.cat([t * 2.0, -t], dim=1)  # noqa: E731 - a per-pixel "network"
    out = TiledInferer(roi_size=32, border=8, overlap=0.25)(x, net)
    assert out.shape == (1, 2, 70, 93)
    torch.testing.assert_close(out, net(x), atol=1e-5, rtol=1e-5)


def test_tta_of_pointwise_network_is_identity_and_input_smaller_than_window():
    x = torch.rand(1, 1, 20, 24)
    net = lambda t: t + 1.0  # noqa: E731
    out = TiledInferer(roi_size=64, border=4, tta=True)(x, net)
    torch.testing.assert_close(out, x + 1.0, atol=1e-5, rtol=1e-5)
    assert len(DIHEDRAL) == 8 and len(set(DIHEDRAL)) == 8


def test_tta_averages_transformed_predictions():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 0, 0] = 1.0
    # a network that shifts content one pixel right is not rotation-equivariant: TTA spreads its output
    net = lambda t: torch.roll(t, 1, dims=-1)  # noqa: E731
    plain = TiledInferer(roi_size=16, border=0)(x, net)
    tta = TiledInferer(roi_size=16, border=0, tta=True)(x, net)
    assert plain.sum() == tta.sum().round() and (tta > 0).sum() > (plain > 0).sum()


def test_whole_image_pass_matches_windows_and_checks_divisor():
    x = torch.rand(1, 1, 70, 93)
    seen = []

    def net(t):
        seen.append(tuple(t.shape[-2:]))
        return torch.cat([t * 2.0, -t], dim=1)

    whole = TiledInferer(roi_size=32, border=8, whole_max_pixels=200 * 200, divisor=16)(x, net)
    assert seen == [(96, 112)]  # (70 + 16, 93 + 16) padded up to multiples of 16, one pass
    torch.testing.assert_close(whole, net(x), atol=1e-6, rtol=1e-6)
    seen.clear()
    TiledInferer(roi_size=32, border=8, whole_max_pixels=50 * 50)(x, net)  # too big: windows
    assert set(seen) == {(32, 32)}


def test_whole_image_pass_of_a_real_unet_is_close_to_windows():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    x = torch.rand(1, 1, 120, 100)
    with torch.no_grad():
        tiles = TiledInferer(roi_size=64, border=8, overlap=0.5)(x, net)
        whole = TiledInferer(roi_size=64, border=8, whole_max_pixels=10**6, divisor=4)(x, net)
    assert whole.shape == tiles.shape == (1, 2, 120, 100)
    # the same fully convolutional net: only the context near window edges differs
    diff = (whole - tiles)[..., 16:-16, 16:-16].abs().mean() / tiles.abs().mean()
    assert diff < 0.15  # a misplaced crop or padding gives differences of the order of 1
