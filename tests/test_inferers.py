"""Tiled inference: mirrored borders crop back exactly, Gaussian blending of an equivariant net is exact, TTA."""

from __future__ import annotations

import pytest
import torch

from medseg.inferers import DIHEDRAL, TiledInferer


def test_pointwise_network_is_reproduced_exactly_with_odd_sizes():
    x = torch.rand(1, 1, 70, 93)
    net = lambda t: torch.cat([t * 2.0, -t], dim=1)  # noqa: E731 - a per-pixel "network"
    out = TiledInferer(roi_size=32, border=8, overlap=0.25)(x, net)
    assert out.shape == (1, 2, 70, 93)
    torch.testing.assert_close(out, net(x), atol=1e-5, rtol=1e-5)


def test_the_border_the_network_sees_is_the_image_mirrored():
    # a 3x3 mean filter (zero-padded by its own convolution) sees, at the image's edge, the mirrored border
    # the inferer adds, not zeros: its output is the filter of the image mirrored by one pixel (one pass:
    # windows would add their own seams)
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.rand(1, 1, 40, 52) + 1.0
    box = torch.full((1, 1, 3, 3), 1 / 9)
    net = lambda t: F.conv2d(t, box, padding=1)  # noqa: E731
    out = TiledInferer(roi_size=32, border=8, whole_max_pixels=10**6)(x, net)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), box)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_tta_of_pointwise_network_is_identity_and_input_smaller_than_window():
    x = torch.rand(1, 1, 20, 24)
    net = lambda t: t + 1.0  # noqa: E731
    out = TiledInferer(roi_size=64, border=4, tta=True)(x, net)
    torch.testing.assert_close(out, x + 1.0, atol=1e-5, rtol=1e-5)
    assert len(DIHEDRAL) == 8 and len(set(DIHEDRAL)) == 8


def test_long_narrow_image_far_below_the_window_on_one_side():
    # 12 x 600 with a 256 window: MONAI's reflect padding up to the window cannot pad 12 rows by 244
    x = torch.rand(1, 1, 12, 600)
    net = lambda t: torch.cat([t * 2.0, -t], dim=1)  # noqa: E731
    for whole_max_pixels in (0, 4096, 10**6):
        out = TiledInferer(roi_size=256, border=16, whole_max_pixels=whole_max_pixels)(x, net)
        assert out.shape == (1, 2, 12, 600)
        torch.testing.assert_close(out, net(x), atol=1e-5, rtol=1e-5)


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


def test_cpu_bf16_inferer_matches_float32_and_returns_float32():
    from medseg.inferers import CpuBf16Inferer, cpu_bf16_supported

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    wrapped = CpuBf16Inferer(TiledInferer(roi_size=32, border=4), enabled=True)
    assert wrapped.tta is False and wrapped.border == 4  # the wrapped inferer's settings stay reachable
    out = wrapped(x, net)
    ref = TiledInferer(roi_size=32, border=4)(x, net)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # bfloat16 keeps 8 bits of mantissa: close to float32, and exactly it where bf16 is not native
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.02)
    if not cpu_bf16_supported():
        torch.testing.assert_close(out, ref)
    out.sum().backward()  # training goes through it
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


def test_cpu_bf16_inferer_disabled_is_the_plain_inferer():
    from medseg.inferers import CpuBf16Inferer

    seen = []

    def net(t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return t * 2.0

    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(CpuBf16Inferer(enabled=False)(x, net), x * 2.0)
    CpuBf16Inferer(enabled=True)(x, net)
    from medseg.inferers import cpu_bf16_supported

    assert seen == [False, cpu_bf16_supported()]


def test_cpu_bf16_inferer_returns_float32_around_the_default_inferer(monkeypatch):
    """The training and validation default (MONAI's ``SimpleInferer`` inside) gives bfloat16 under autocast;
    the wrapper hands float32 on, on any CPU (autocast forced on here where bfloat16 is not native)."""
    import medseg.inferers
    from medseg.inferers import CpuBf16Inferer

    monkeypatch.setattr(medseg.inferers, "cpu_bf16_supported", lambda: True)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16  # what the wrapper has to undo
        out = CpuBf16Inferer()(x, net)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x).float(), atol=0.05, rtol=0.02)


def test_padding_to_the_divisor_mirrors_the_far_borders():
    """A whole-image pass pads the far sides up to the divisor by mirroring (as the tiles do), so a network
    with a footprint sees the image continued near its edge, not zeros."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 5, padding=2, bias=False)
    x = torch.rand(1, 1, 30, 29)
    with torch.no_grad():
        out = TiledInferer(roi_size=64, border=0, whole_max_pixels=10**6, divisor=16)(x, net)
        expected = net(torch.nn.functional.pad(x, (0, 3, 0, 2), mode="reflect"))[..., :30, :29]
        zeros = net(torch.nn.functional.pad(x, (0, 3, 0, 2)))[..., :30, :29]
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, zeros)


def test_yes_no_settings_given_as_words_are_read_as_meant():
    # `python -m monai.bundle run ... --tta false` hands over the string 'false', which bool() takes as true
    import pytest

    from medseg.errors import ConfigValueError
    from medseg.membranes import CloseContoursd

    assert TiledInferer(roi_size=32, tta="false").tta is False
    assert TiledInferer(roi_size=32, tta="True").tta is True
    assert CloseContoursd(keys="pred", enabled="off").enabled is False
    with pytest.raises(ConfigValueError, match="tta='maybe': give true or false"):
        TiledInferer(roi_size=32, tta="maybe")


def test_a_square_window_given_as_one_number_caches_its_blending_weights(recwarn):
    inferer = TiledInferer(roi_size=32, border=0)
    assert inferer.roi_size == (32, 32) and inferer.roi_weight_map is not None
    assert not [w for w in recwarn if "cache_roi_weight_map" in str(w.message)]


@pytest.mark.parametrize("whole_max_pixels", [0, 10**6], ids=["windows", "whole"])
def test_logits_are_float32_whether_or_not_the_image_fits_in_one_pass(whole_max_pixels):
    # under CUDA autocast the network answers in float16 (emulated here); the windows' blend gave float32,
    # the single pass float16, so an image's probabilities depended on its size
    x = torch.rand(1, 1, 48, 40)
    out = TiledInferer(roi_size=32, border=4, whole_max_pixels=whole_max_pixels, tta=True)(x, lambda t: t.half())
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-3, rtol=0)
