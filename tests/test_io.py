"""2D image I/O: PNG and TIFF reading, page access, gray conversion, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.errors import DataError
from medseg.io import atomic_output, count_pages, iter_pages, read_image, to_gray, write_png, write_tiff


def test_png_round_trip_8_and_16_bit(tmp_path):
    for dtype in (np.uint8, np.uint16):
        arr = (np.arange(12 * 9).reshape(12, 9) * 7).astype(dtype)
        write_png(tmp_path / f"a_{dtype.__name__}.png", arr)
        back = read_image(tmp_path / f"a_{dtype.__name__}.png")
        np.testing.assert_array_equal(back, arr)


def test_png_rgba_drops_alpha_and_palette_expands(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").shape == (4, 4, 3)
    Image.fromarray(np.zeros((4, 4), np.uint8)).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (4, 4, 3)


def test_tiff_stack_pages_and_float(tmp_path):
    stack = np.random.default_rng(0).random((3, 8, 10)).astype(np.float32)
    write_tiff(tmp_path / "s.tif", stack)
    assert count_pages(tmp_path / "s.tif") == 3
    np.testing.assert_array_equal(read_image(tmp_path / "s.tif", page=1), stack[1])
    np.testing.assert_array_equal(np.stack(list(iter_pages(tmp_path / "s.tif"))), stack)


def test_rgb_tiff_is_one_page(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((6, 5, 3), np.uint8), photometric="rgb")
    assert count_pages(tmp_path / "rgb.tif") == 1
    assert read_image(tmp_path / "rgb.tif").shape == (6, 5, 3)


def test_to_gray():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 100
    np.testing.assert_allclose(to_gray(rgb), 58.7, rtol=1e-5)
    assert to_gray(np.ones((2, 2), np.uint16)).dtype == np.float32


def test_bad_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.jpg'"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "missing.png")
    good = tmp_path / "t.png"
    write_png(good, np.zeros((64, 64), np.uint8))
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match=r"trunc\.png: cannot read image"):
        read_image(tmp_path / "trunc.png")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and len(list(tmp_path.iterdir())) == 1


def test_atomic_output_gives_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "shared.png") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(umask)
    # mkstemp alone would leave 0600, unreadable to colleagues; the module read the umask at import
    expected = 0o666 & ~umask
    assert (tmp_path / "shared.png").stat().st_mode & 0o777 == expected


def test_tiff_compresses_integer_masks_but_not_float_maps(tmp_path):
    write_tiff(tmp_path / "mask.tif", np.zeros((64, 64), np.uint8))
    write_tiff(tmp_path / "prob.tif", np.random.default_rng(0).random((64, 64), np.float32))
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    with tifffile.TiffFile(tmp_path / "prob.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
