"""The image contract: PNG, TIFF, NIfTI readers (channel first, metadata), lazy slices, MONAI LoadImage, bad files."""

from __future__ import annotations

import os
import re
import struct
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import tifffile
from conftest import write_dicom_slice
from PIL import Image

from medseg.errors import DataError
from medseg.io import write_png, write_tiff
from medseg.readers import (
    NiftiReader,
    PngReader,
    TiffReader,
    count_slices,
    format_of,
    kind_of,
    read_geometry,
    read_image,
    read_slice,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_gray_round_trip(tmp_path, dtype):
    arr = (np.arange(12 * 9).reshape(12, 9) * 500 % np.iinfo(dtype).max).astype(dtype)
    write_png(tmp_path / "a.png", arr)
    back, meta = read_image(tmp_path / "a.png")
    assert back.shape == (1, 12, 9) and back.dtype == dtype and meta["format"] == "png"
    np.testing.assert_array_equal(back[0], arr)
    assert tuple(meta["spatial_shape"]) == (12, 9) and meta["slice_count"] == 1


def test_png_rgb_rgba_palette_and_gray_alpha(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 255, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    back, _ = read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(back, rgba[..., :3].transpose(2, 0, 1))  # alpha dropped, channel first
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png")[0], rgba[..., :3].transpose(2, 0, 1))
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    back, _ = read_image(tmp_path / "pal.png")
    assert back.shape == (3, 2, 2)
    np.testing.assert_array_equal(back[:, 0, 1], [255, 0, 0])  # palette entries resolved to colours
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[0], rgba[None, ..., 0])


def test_a_picture_whose_alpha_alone_varies_is_refused_not_read_blank(tmp_path):
    # a mask exported from an overlay keeps its labels in alpha, its colour 0 everywhere: with alpha dropped it
    # read as a mask without objects, and a nuclei training on such masks validated at a DSB score of 1.0
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:5, 2:5, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "overlay.png")
    Image.fromarray(rgba[..., 2:], "LA").save(tmp_path / "overlay_la.png")
    tifffile.imwrite(tmp_path / "overlay.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    for name in ("overlay.png", "overlay_la.png", "overlay.tif"):
        with pytest.raises(DataError, match=rf"{re.escape(name)}: only its alpha .* every pixel 0; save the alpha "):
            read_image(tmp_path / name)
    rgba[..., 0] = 7  # colour that varies nowhere either: still a blank picture
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")  # an alpha that does not vary is only dropped
    np.testing.assert_array_equal(read_image(tmp_path / "opaque.png")[0], rgba[..., :3].transpose(2, 0, 1))


def test_one_bit_tiff_and_png_read_alike(tmp_path):
    # a 1-bit PNG read as 0/255 and a 1-bit TIFF as False/True, so a mask's class_map {"0": 0, "255": 1} took
    # the one and refused the other ("label values 1 are not in the class map")
    bits = np.zeros((6, 8), bool)
    bits[1:3, 2:7] = True
    tifffile.imwrite(tmp_path / "bits.tif", bits)
    Image.fromarray(bits).save(tmp_path / "pil.tif")
    Image.fromarray(bits).save(tmp_path / "bits.png")
    for name in ("bits.tif", "pil.tif", "bits.png"):
        for arr in (read_image(tmp_path / name)[0], read_slice(str(tmp_path / name), 0)):
            assert arr.dtype == np.uint8, name
            np.testing.assert_array_equal(arr[0], bits * 255)
    # a class map written for the earlier 0/1 reading says what changed
    from medseg.transforms import ClassMapd, LoadSliced

    loaded = LoadSliced(keys="label")({"label": str(tmp_path / "bits.tif")})
    with pytest.raises(DataError, match=r"bits\.tif: label values 255 .*earlier versions read a 1-bit TIFF as 0 "
                                        r"and 1\): give 255 in class_map where 1 stands"):
        ClassMapd(keys="label", class_map={"0": 0, "1": 1})(loaded)


def test_palette_tiff_keeps_its_values_its_colour_table_is_a_display_lut(tmp_path):
    # ImageJ saves an 8-bit image shown with a colour LUT (Green, Fire) as a palette TIFF: the values are the data
    values = np.array([[0, 10, 200], [255, 10, 0]], np.uint8)
    green = np.zeros((3, 256), np.uint16)
    green[1] = np.arange(256) * 257
    tifffile.imwrite(tmp_path / "green.tif", values, photometric="palette", colormap=green)
    np.testing.assert_array_equal(read_slice(tmp_path / "green.tif", 0), values[None])
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([values, values[::-1]]), photometric="palette", colormap=green)
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif")[0], np.stack([values, values[::-1]])[None])


def test_miniswhite_tiff_keeps_its_values_as_imagej_measures_them(tmp_path):
    # ImageJ saves an image shown with an inverting LUT (a binary mask with black objects) as MinIsWhite: the
    # values are the data, as for a palette; the README says so
    values = np.array([[0, 255, 255], [255, 0, 7]], np.uint8)
    tifffile.imwrite(tmp_path / "inverted.tif", values, photometric="miniswhite")
    assert tifffile.TiffFile(tmp_path / "inverted.tif").pages[0].photometric == 0
    np.testing.assert_array_equal(read_slice(tmp_path / "inverted.tif", 0), values[None])
    np.testing.assert_array_equal(read_image(tmp_path / "inverted.tif")[0], values[None])


def test_cmyk_tiff_is_converted_to_rgb(tmp_path):
    cmyk = np.zeros((2, 2, 4), np.uint8)
    cmyk[0, 0] = [0, 255, 255, 0]      # red
    cmyk[0, 1] = [0, 0, 0, 255]        # black
    cmyk[1, 0] = [0, 0, 0, 0]          # white
    cmyk[1, 1] = [255, 0, 255, 128]    # dark green
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk, photometric="separated")
    rgb = read_slice(tmp_path / "cmyk.tif", 0)
    np.testing.assert_array_equal(rgb[:, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgb[:, 0, 1], [0, 0, 0])
    np.testing.assert_array_equal(rgb[:, 1, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[:, 1, 1], [0, 127, 0])
    tifffile.imwrite(tmp_path / "cmyk16.tif", cmyk.astype(np.uint16) * 257, photometric="separated")
    rgb16 = read_slice(tmp_path / "cmyk16.tif", 0)
    assert rgb16.dtype == np.uint16 and rgb16.shape == (3, 2, 2)
    np.testing.assert_array_equal(rgb16[:, 0, 0], [65535, 0, 0])
    tifffile.imwrite(tmp_path / "cmykf.tif", cmyk.astype(np.float32), photometric="separated")
    with pytest.raises(DataError, match="cmykf.tif: TIFF with 4 ink separations \\(float32\\).*convert it to RGB"):
        read_slice(tmp_path / "cmykf.tif", 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_stack_round_trip_and_slices(tmp_path, dtype):
    stack = (np.random.default_rng(1).random((4, 10, 12)) * 200).astype(dtype)
    write_tiff(tmp_path / "s.tif", stack)
    arr, meta = read_image(tmp_path / "s.tif")
    assert arr.shape == (1, 4, 10, 12) and arr.dtype == dtype and meta["slice_count"] == 4
    np.testing.assert_array_equal(arr[0], stack)
    assert count_slices(tmp_path / "s.tif") == 4
    np.testing.assert_array_equal(read_slice(tmp_path / "s.tif", 2), stack[None, 2])


def test_compressed_tiffs_are_read(tmp_path):
    # LZW is the most common TIFF compression (Pillow, ImageJ, scanners); it and zstd need imagecodecs
    stack = (np.random.default_rng(4).random((4, 10, 12)) * 200).astype(np.uint8)
    for compression in ("lzw", "zstd", "deflate"):
        tifffile.imwrite(tmp_path / f"{compression}.tif", stack, compression=compression, photometric="minisblack")
        np.testing.assert_array_equal(read_image(tmp_path / f"{compression}.tif")[0][0], stack)
    Image.fromarray(stack[0]).save(tmp_path / "pil.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(read_slice(tmp_path / "pil.tif", 0)[0], stack[0])


def test_truncated_imagej_stack_is_an_error_not_its_first_page(tmp_path):
    # cut inside the second page: tifffile only warns and offers the first page as a 2D image
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.ones((3, 40, 50), np.uint16), imagej=True)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with pytest.raises(DataError, match="cut.tif: the TIFF's pages cannot all be read .* truncated or corrupt"):
        count_slices(path)


@pytest.mark.parametrize("shape", [(1, 30, 40), (30, 1, 40)])
def test_a_nifti_plane_across_the_slice_axis_is_refused_not_cut_into_strips(tmp_path, shape):
    # read as 40 slices of 1 x 30 voxels, each segmented alone: a wrong mask, said nowhere
    nib.save(nib.Nifti1Image(np.ones(shape, np.int16), np.eye(4)), str(tmp_path / "p.nii.gz"))
    with pytest.raises(DataError, match=r"p\.nii\.gz: one plane stored across the slice axis .*store it as X×Y×1"):
        count_slices(tmp_path / "p.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((30, 40, 1), np.int16), np.eye(4)), str(tmp_path / "ok.nii.gz"))
    assert count_slices(tmp_path / "ok.nii.gz") == 1


@pytest.mark.parametrize("shape", [(10, 10, 0), (0, 10, 3)])
def test_a_nifti_without_voxels_is_refused(tmp_path, shape):
    # it was counted as 0 slices and reported "ok" by infer, with outputs listed that were never written
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(tmp_path / "z.nii"))
    with pytest.raises(DataError, match=r"z\.nii: NIfTI of shape .* holds no voxels; the file was written empty"):
        count_slices(tmp_path / "z.nii")


def test_a_damaged_compressed_tiff_page_names_its_slice(tmp_path):
    # the codec's own error (DeflateError: ... LIBDEFLATE_BAD_DATA) came out bare: no slice, no hint
    path = tmp_path / "s.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), compression="zlib",
                     photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[1].dataoffsets[0], tif.pages[1].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset + 2:offset + count] = bytes(count - 2)  # the zlib header kept, its stream zeroed
    path.write_bytes(bytes(data))
    assert read_slice(path, 0).shape[-2:] == (64, 64)
    with pytest.raises(DataError, match=r"s\.tif: cannot read slice 1 \(\w+Error: .*\); the file may be truncated "
                                        r"or damaged"):
        read_slice(path, 1)


def test_a_tiff_feature_the_reader_lacks_is_not_called_damage(tmp_path, monkeypatch):
    path = tmp_path / "sub.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))

    def unsupported(*args, **kwargs):
        raise NotImplementedError("chroma subsampling not supported")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", unsupported)
    with pytest.raises(DataError, match=r"sub\.tif: cannot read slice 0 \(chroma subsampling not supported\); the "
                                        r"file uses a TIFF feature this reader lacks: save it again"):
        read_slice(path, 0)


def test_complex_values_are_refused_by_name(tmp_path):
    from medseg.transforms import LoadSliced

    tifffile.imwrite(tmp_path / "k.tif", (np.ones((20, 30)) * (1 + 2j)).astype(np.complex64))
    with pytest.raises(DataError, match=r"k\.tif: complex values \(complex64\); save the image's magnitude"):
        LoadSliced("image")({"image": str(tmp_path / "k.tif")})


def test_tiff_single_page_is_2d_and_rgb_is_channel_first(tmp_path):
    write_tiff(tmp_path / "one.tif", np.ones((5, 6), np.uint16))
    assert read_image(tmp_path / "one.tif")[0].shape == (1, 5, 6)
    rgb = np.random.default_rng(2).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    for name in ("rgb.tif", "planar.tif"):
        arr, meta = read_image(tmp_path / name)
        np.testing.assert_array_equal(arr, rgb.transpose(2, 0, 1))
        assert meta["slice_count"] == 1


def test_ome_tiff_axes_channels_and_physical_size(tmp_path):
    data = np.random.default_rng(3).random((2, 3, 8, 9)).astype(np.float32)  # C, Z, Y, X
    tifffile.imwrite(tmp_path / "x.ome.tif", data,
                     metadata={"axes": "CZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 2.0})
    arr, meta = read_image(tmp_path / "x.ome.tif")
    np.testing.assert_array_equal(arr, data)
    assert meta["axes"] == "CZYX" and meta["spacing_unit"] == "um"
    np.testing.assert_allclose(meta["spacing"], [2.0, 0.25, 0.5])
    np.testing.assert_array_equal(read_slice(tmp_path / "x.ome.tif", 1), data[:, 1])
    tz = np.random.default_rng(4).random((2, 3, 8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "tz.ome.tif", tz, metadata={"axes": "TZYX"})
    assert count_slices(tmp_path / "tz.ome.tif") == 6  # time and depth flattened into the slice axis, in order
    np.testing.assert_array_equal(read_slice(tmp_path / "tz.ome.tif", 4)[0], tz[1, 1])


def test_imagej_calibration(tmp_path):
    tifffile.imwrite(tmp_path / "ij.tif", np.zeros((3, 8, 8), np.uint8), imagej=True, resolution=(4.0, 4.0),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"})
    meta = read_geometry(tmp_path / "ij.tif")
    np.testing.assert_allclose(meta["spacing"], [1.5, 0.25, 0.25])
    assert meta["spacing_unit"] == "um"


def test_calibration_in_other_units_is_read_in_micrometres(tmp_path):
    # OME: PhysicalSize*Unit per axis (the schema's default is µm)
    tifffile.imwrite(tmp_path / "nm.ome.tif", np.zeros((2, 8, 8), np.uint8),
                     metadata={"axes": "ZYX", "PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 5.0,
                               "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.05, "PhysicalSizeZUnit": "µm"})
    meta = read_geometry(tmp_path / "nm.ome.tif")
    assert meta["spacing_unit"] == "um"
    np.testing.assert_allclose(meta["spacing"], [0.05, 0.005, 0.004])
    # ImageJ: resolution in pixels per unit, spacing in the same unit
    for unit, factor in (("nm", 1e-3), ("mm", 1e3), ("micron", 1.0)):
        tifffile.imwrite(tmp_path / f"ij_{unit}.tif", np.zeros((3, 8, 8), np.uint8), imagej=True,
                         resolution=(0.25, 0.5), metadata={"spacing": 40.0, "unit": unit, "axes": "ZYX"})
        meta = read_geometry(tmp_path / f"ij_{unit}.tif")
        assert meta["spacing_unit"] == "um", unit
        np.testing.assert_allclose(meta["spacing"], np.array([40.0, 2.0, 4.0]) * factor, err_msg=unit)
    tifffile.imwrite(tmp_path / "ij_px.tif", np.zeros((3, 8, 8), np.uint8), imagej=True, resolution=(0.25, 0.5),
                     metadata={"unit": "pixel", "axes": "ZYX"})
    assert read_geometry(tmp_path / "ij_px.tif")["spacing_unit"] == "pixel"


def test_resolution_without_a_unit_tag_is_in_inches_as_tiff_says(tmp_path):
    """TIFF 6.0: ResolutionUnit defaults to inch; ImageJ's own unit still wins over an absent or 'none' tag."""
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), resolution=(100, 100))  # 100 pixels per inch
    with tifffile.TiffFile(path) as tif:
        offset, order = tif.pages[0].tags["ResolutionUnit"].offset, tif.byteorder
    with open(path, "r+b") as handle:  # the tag's code becomes a private one: no ResolutionUnit left
        handle.seek(offset)
        handle.write(struct.pack(order + "H", 65000))
    with tifffile.TiffFile(path) as tif:
        assert "ResolutionUnit" not in tif.pages[0].tags
    meta = read_geometry(path)
    assert meta["spacing_unit"] == "um"
    np.testing.assert_allclose(meta["spacing"], [254.0, 254.0])
    tifffile.imwrite(tmp_path / "ij.tif", np.zeros((4, 4), np.uint8), imagej=True, resolution=(2.0, 2.0),
                     metadata={"unit": "nm"})
    np.testing.assert_allclose(read_geometry(tmp_path / "ij.tif")["spacing"], [0.0005, 0.0005])


def test_nifti_in_micrometres_reports_um(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.diag([0.5, 0.5, 2.0, 1.0]))
    image.header.set_xyzt_units("micron")
    nib.save(image, str(tmp_path / "um.nii.gz"))
    meta = read_geometry(tmp_path / "um.nii.gz")
    assert meta["spacing_unit"] == "um" and meta["nifti_unit"] == "micron"


def test_tiff_slices_are_read_lazily(tmp_path):
    """Reading one slice of a 40-page stack allocates about one page, not the stack (stacks larger than RAM)."""
    stack = np.random.default_rng(5).integers(0, 255, (40, 256, 256), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", stack, photometric="minisblack")
    tracemalloc.start()
    page = read_slice(tmp_path / "big.tif", 37)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(page[0], stack[37])
    assert peak < 4 * stack[0].nbytes, f"peak {peak} bytes for a {stack[0].nbytes}-byte page"


def test_nifti_contract_on_real_file(shared_nifti):
    path = shared_nifti / "anatomical.nii"
    img = nib.load(path)
    arr, meta = read_image(path)
    assert arr.shape == (1, 25, 41, 33) and arr.dtype.isnative  # (C, Z=k, Y=j, X=i), big-endian made native
    np.testing.assert_array_equal(arr[0], np.asarray(img.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(meta["nifti_affine"], img.affine)
    # the affine follows the array's (z, y, x) index order: the same voxel maps to the same world point
    z, y, x = 3, 7, 11
    np.testing.assert_allclose(meta["affine"] @ [z, y, x, 1], img.affine @ [x, y, z, 1])
    np.testing.assert_allclose(meta["spacing"], [2, 2, 2])
    np.testing.assert_array_equal(read_slice(path, 3), arr[:, 3])


def test_nifti_2d_and_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.arange(20, dtype=np.int16).reshape(4, 5), np.eye(4)), tmp_path / "flat.nii.gz")
    arr, meta = read_image(tmp_path / "flat.nii.gz")
    assert arr.shape == (1, 1, 5, 4) and meta["slice_count"] == 1
    volumes = np.arange(8 * 6 * 4 * 2, dtype=np.int16).reshape(8, 6, 4, 2)  # x, y, z, t
    nib.save(nib.Nifti1Image(volumes, np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(DataError, match=r"four\.nii\.gz: 4D NIfTI .* split it .* nifti_channel_dim=3"):
        read_image(tmp_path / "four.nii.gz")
    arr, _ = NiftiReader(channel_dim=3).read_source(str(tmp_path / "four.nii.gz"))
    assert arr.shape == (2, 4, 6, 8)  # (C, Z, Y, X)
    np.testing.assert_array_equal(arr[1], volumes[..., 1].transpose(2, 1, 0))


def test_nifti_4d_real_file(shared_nifti):
    with pytest.raises(DataError, match=r"example4d\.nii\.gz: 4D NIfTI .* split it .* nifti_channel_dim=3"):
        read_image(shared_nifti / "example4d.nii.gz")
    arr, _ = NiftiReader(channel_dim=3).read_source(str(shared_nifti / "example4d.nii.gz"))
    assert arr.shape == (2, 24, 96, 128)


def test_readers_plug_into_monai_load_image(tmp_path, shared_nifti):
    from monai.transforms import LoadImage, LoadImaged

    data = np.random.default_rng(6).random((2, 3, 8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "x.ome.tif", data, metadata={"axes": "CZYX", "PhysicalSizeX": 0.5,
                                                               "PhysicalSizeY": 0.5})
    img = LoadImage(reader=TiffReader, image_only=True)(tmp_path / "x.ome.tif")
    assert tuple(img.shape) == (2, 3, 8, 9) and img.meta["format"] == "tiff"
    img = LoadImaged("image", reader="medseg.readers.NiftiReader")({"image": shared_nifti / "anatomical.nii"})["image"]
    assert tuple(img.shape) == (1, 25, 41, 33)
    np.testing.assert_allclose(img.affine.numpy()[:, [2, 1, 0, 3]], nib.load(shared_nifti / "anatomical.nii").affine)


def test_bad_files(tmp_path):
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"x\.gif: unsupported file type '\.gif'; supported: .*\.nii\.gz.*\.png"):
        format_of(tmp_path / "x.gif")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DataError, match=r"x\.jpg: cannot read the image .* truncated or corrupt"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    write_png(tmp_path / "ok.png", np.zeros((64, 64), np.uint8))
    (tmp_path / "trunc.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(DataError, match=r"trunc\.png: cannot read the image .* truncated or corrupt"):
        read_image(tmp_path / "trunc.png")
    write_tiff(tmp_path / "ok.tif", np.random.default_rng(0).random((2, 64, 64)).astype(np.float32))
    (tmp_path / "trunc.tif").write_bytes((tmp_path / "ok.tif").read_bytes()[:5000])
    with pytest.raises(DataError, match=r"trunc\.tif: the TIFF's pages cannot all be read .* truncated or corrupt"):
        read_image(tmp_path / "trunc.tif")
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot read NIfTI"):
        read_image(tmp_path / "bad.nii.gz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path):
    write_png(tmp_path / "locked.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "locked.png").chmod(0)
    with pytest.raises(DataError, match=r"locked\.png: cannot open the file \(permission denied\)"):
        read_image(tmp_path / "locked.png")


def test_unreadable_file_reported_even_as_root(tmp_path, monkeypatch):
    import PIL.Image

    write_png(tmp_path / "locked.png", np.zeros((4, 4), np.uint8))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(PIL.Image, "open", denied)
    with pytest.raises(DataError, match=r"locked\.png: cannot open the file \(permission denied\)"):
        read_image(tmp_path / "locked.png")


@pytest.mark.parametrize("size", [9, 20, 25])
def test_png_cut_inside_its_header_is_a_data_error(tmp_path, size):
    path = tmp_path / "cut.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(DataError, match="cut.png"):
        read_image(path)


def _png(width: int, height: int, depth: int, colour: int, rows: bytes, exif: bytes = b"") -> bytes:
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if exif:
        png += chunk(b"eXIf", exif)
    return png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _exif_block(orientation: int) -> bytes:

    return b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16_bit_colour_png_keeps_every_bit_and_turns_as_its_8_bit_twin(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    values = rng.integers(0, 255, (3, 5, 3), dtype=np.uint16)  # H, W, RGB (not square, so a swap shows)
    wide = values * 257 + rng.integers(0, 2, values.shape, dtype=np.uint16)  # the low byte carries bits too
    rows16 = b"".join(b"\0" + wide[y].astype(">u2").tobytes() for y in range(3))
    rows8 = b"".join(b"\0" + values[y].astype(np.uint8).tobytes() for y in range(3))
    (tmp_path / "rgb16.png").write_bytes(_png(5, 3, 16, 2, rows16, _exif_block(orientation)))
    (tmp_path / "rgb8.png").write_bytes(_png(5, 3, 8, 2, rows8, _exif_block(orientation)))
    arr16, arr8 = np.asarray(read_image(tmp_path / "rgb16.png")[0]), np.asarray(read_image(tmp_path / "rgb8.png")[0])
    assert arr16.dtype == np.uint16 and arr16.shape == arr8.shape == ((3, 3, 5) if orientation < 5 else (3, 5, 3))
    np.testing.assert_array_equal(arr16 // 257, arr8)  # turned as Pillow turns the 8-bit one
    if orientation == 1:
        np.testing.assert_array_equal(arr16, np.moveaxis(wide, -1, 0))  # bit for bit


def test_16_bit_colour_png_with_significant_bits_keeps_its_stored_values_and_the_size_is_checked_first(
        tmp_path, monkeypatch):
    import zlib

    import itk

    rgb = np.array([[[65359, 4096, 17], [1, 2, 65535]]], dtype=np.uint16)
    png = _png(2, 1, 16, 2, b"\0" + rgb[0].astype(">u2").tobytes())
    sbit = struct.pack(">I", 3) + b"sBIT" + bytes([12, 12, 12])
    sbit += struct.pack(">I", zlib.crc32(b"sBIT" + bytes([12, 12, 12])))
    (tmp_path / "sbit.png").write_bytes(png[:33] + sbit + png[33:])  # after IHDR, as encoders put it
    # libpng shifts such values down to their 12 significant bits (65359 read as 4084); Pillow keeps a 16-bit gray
    # PNG's stored values, and so must colour
    np.testing.assert_array_equal(read_image(tmp_path / "sbit.png")[0], np.moveaxis(rgb, -1, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sbit.png"]
    # the copy read without the chunk cannot be written: named as the temporary folder's failure, and not left
    import errno
    import os
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real = os.fdopen

    class Full:
        def __init__(self, handle, mode):
            self.file = real(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", Full)
    with pytest.raises(DataError, match=r"sbit\.png: cannot write the copy of it that is read without its sBIT chunk "
                                        r"in .*scratch \(No space left on device\); free space there, or set TMPDIR"):
        read_image(tmp_path / "sbit.png")
    assert list(scratch.iterdir()) == []
    monkeypatch.setattr(os, "fdopen", real)
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "1")

    def decoded(*args, **kwargs):
        raise AssertionError("decoded before the size was checked")

    monkeypatch.setattr(itk, "imread", decoded)
    with pytest.raises(DataError, match=r"sbit\.png: .*MEDSEG_MAX_PIXELS"):
        read_image(tmp_path / "sbit.png")


def test_16_bit_png_with_alpha_drops_it_and_a_broken_one_is_named(tmp_path):
    rgba = np.array([[[1000, 2000, 65535, 7], [3, 4, 5, 65535]]], dtype=np.uint16)
    (tmp_path / "rgba16.png").write_bytes(_png(2, 1, 16, 6, b"\0" + rgba[0].astype(">u2").tobytes()))
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rgba16.png")[0]),
                                  np.moveaxis(rgba[..., :3], -1, 0))
    la = np.array([[[40000, 1], [2, 65535]]], dtype=np.uint16)
    (tmp_path / "la16.png").write_bytes(_png(2, 1, 16, 4, b"\0" + la[0].astype(">u2").tobytes()))
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "la16.png")[0]), [[[40000, 2]]])
    good = _png(2, 1, 16, 2, b"\0" + np.arange(6, dtype=">u2").tobytes())
    (tmp_path / "cut16.png").write_bytes(good[:-30])
    with pytest.raises(DataError, match=r"cut16\.png: cannot read the 16-bit PNG") as refused:
        read_image(tmp_path / "cut16.png")
    assert str(refused.value).count("cut16.png") == 1, refused.value  # named once, in front


def test_a_stack_read_slice_by_slice_is_opened_once_and_rewritten_files_are_read_afresh(tmp_path, monkeypatch):
    from medseg.readers import TiffReader

    opened = []
    original = TiffReader._open
    monkeypatch.setattr(TiffReader, "_open", staticmethod(lambda path: opened.append(path) or original(path)))
    stack = np.arange(60 * 4 * 5, dtype=np.uint16).reshape(60, 4, 5)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    for k in range(60):
        np.testing.assert_array_equal(read_slice(path, k)[0], stack[k])
    assert len(opened) == 1  # not once per slice (each open parses the page headers: quadratic)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    tifffile.imwrite(path, stack[::-1], photometric="minisblack")  # rewritten: same name and size
    np.testing.assert_array_equal(read_slice(path, 0)[0], stack[-1])


def test_slices_read_from_many_threads_are_right(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    stack = np.random.default_rng(8).integers(0, 65535, (40, 32, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack", compression="zlib")
    with ThreadPoolExecutor(4) as pool:
        pages = list(pool.map(lambda k: read_slice(tmp_path / "s.tif", k)[0], list(range(40)) * 3))
    for k, page in enumerate(pages):
        np.testing.assert_array_equal(page, stack[k % 40])


def test_gzipped_nifti_is_decompressed_once_for_all_its_slices(tmp_path, monkeypatch):
    from medseg.readers import NiftiReader

    volume = np.random.default_rng(9).integers(-1000, 1000, (6, 5, 30), dtype=np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    whole = []
    original = NiftiReader._voxels
    def counted(self, img, shape, index):
        whole.append(index is None)
        return original(self, img, shape, index)

    monkeypatch.setattr(NiftiReader, "_voxels", counted)
    for k in range(30):
        np.testing.assert_array_equal(read_slice(tmp_path / "v.nii.gz", k)[0], volume[:, :, k].T)
    assert sum(whole) == 1


def test_one_threads_reads_never_close_a_file_another_thread_is_reading(tmp_path):
    import threading

    from medseg.readers import TiffReader

    for k in range(12):
        tifffile.imwrite(tmp_path / f"{k}.tif", np.full((3, 4, 4), k, np.uint8), photometric="minisblack")
    reader = TiffReader()
    held = reader._open_kept(str(tmp_path / "0.tif"))  # this thread's handle
    other = threading.Thread(target=lambda: [read_slice(tmp_path / f"{k}.tif", 0) for k in range(1, 12)])
    other.start()
    other.join()
    assert not held.filehandle.closed
    np.testing.assert_array_equal(read_slice(tmp_path / "0.tif", 2)[0], np.zeros((4, 4), np.uint8))
    for k in range(1, 12):  # this thread keeps at most 8 open
        read_slice(tmp_path / f"{k}.tif", 0)
    assert held.filehandle.closed


def test_a_threads_kept_files_are_closed_when_it_ends(tmp_path):
    # a loader's worker thread keeps its TIFFs open while it reads; when it ends they are closed, not left
    # to the garbage collector (which warned of each unclosed file)
    import gc
    import threading
    import warnings

    from medseg.readers import TiffReader

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 4, 4), np.uint8), photometric="minisblack")
    kept = []

    def work():
        read_slice(tmp_path / "s.tif", 1)
        kept.extend(TiffReader._recent._items().values())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        del thread
        gc.collect()
    assert len(kept) == 1 and kept[0].filehandle.closed
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_gzipped_nifti_slice_is_the_callers_own_array(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    first = read_slice(tmp_path / "v.nii.gz", 1)
    first += 100
    assert read_slice(tmp_path / "v.nii.gz", 1).max() == 0


def test_release_files_closes_what_the_readers_keep(tmp_path):
    from medseg.readers import TiffReader, release_files

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 4, 4), np.uint8), photometric="minisblack")
    held = TiffReader()._open_kept(str(tmp_path / "s.tif"))
    release_files()
    assert held.filehandle.closed
    np.testing.assert_array_equal(read_slice(tmp_path / "s.tif", 1)[0], np.zeros((4, 4), np.uint8))  # reopens


def test_rgb24_nifti_is_read_as_three_channels(tmp_path):
    rgb = np.random.default_rng(6).integers(0, 255, (7, 5, 2, 3), dtype=np.uint8)  # (X, Y, Z, RGB)
    records = np.zeros(rgb.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for k, name in enumerate("RGB"):
        records[name] = rgb[..., k]
    nib.save(nib.Nifti1Image(records, np.eye(4)), tmp_path / "rgb.nii.gz")
    arr, meta = read_image(tmp_path / "rgb.nii.gz")
    np.testing.assert_array_equal(arr, rgb.transpose(3, 2, 1, 0))  # (C, Z, Y, X)
    np.testing.assert_array_equal(read_slice(tmp_path / "rgb.nii.gz", 1), rgb[:, :, 1].transpose(2, 1, 0))
    # RGBA32: the colours, without the alpha (4 channels were refused, as no model takes them)
    rgba = np.zeros(rgb.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    for k, name in enumerate("RGB"):
        rgba[name] = rgb[..., k]
    rgba["A"] = 255
    nib.save(nib.Nifti1Image(rgba, np.eye(4)), tmp_path / "rgba.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.nii.gz")[0], rgb.transpose(3, 2, 1, 0))


def test_a_slice_of_an_unscaled_nifti_is_an_array_of_its_own(tmp_path):
    # nibabel gave an array over the bytes it read, which PyTorch warned of ("not writable") when it took it
    volume = np.random.default_rng(8).random((6, 5, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "f.nii")
    for k in range(3):
        arr = read_slice(tmp_path / "f.nii", k)
        assert arr.flags.writeable and arr.flags.c_contiguous
        np.testing.assert_array_equal(arr[0], volume[:, :, k].T)


def test_a_vector_nifti_as_itk_writes_colour_is_read_as_its_channels(tmp_path):
    # ITK (SimpleITK, ITK-SNAP) writes a colour or vector image as (X, Y, Z, 1, C) with the vector intent; it was
    # refused as "5 dimensions; expected 2D or 3D"
    rgb = np.random.default_rng(7).integers(0, 255, (7, 5, 2, 3), dtype=np.uint8)  # (X, Y, Z, RGB)
    for suffix in (".nii", ".nii.gz"):  # read slice by slice, and whole
        image = nib.Nifti1Image(rgb[:, :, :, None, :], np.diag([0.5, 0.5, 2.0, 1.0]))
        image.header.set_intent("vector")
        nib.save(image, tmp_path / f"v{suffix}")
        arr, meta = read_image(tmp_path / f"v{suffix}")
        np.testing.assert_array_equal(arr, rgb.transpose(3, 2, 1, 0))  # (C, Z, Y, X)
        np.testing.assert_array_equal(read_slice(tmp_path / f"v{suffix}", 1), rgb[:, :, 1].transpose(2, 1, 0))
        assert list(meta["spacing"]) == [2.0, 0.5, 0.5] and count_slices(tmp_path / f"v{suffix}") == 2
    # RGBA: the colours, without the alpha
    rgba = np.concatenate([rgb, np.full((7, 5, 2, 1), 255, np.uint8)], axis=-1)[:, :, :, None, :]
    image = nib.Nifti1Image(rgba, np.eye(4))
    image.header.set_intent("rgba vector")
    nib.save(image, tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "a.nii.gz")[0], rgb.transpose(3, 2, 1, 0))
    # the same layout without the intent is named for what it holds
    nib.save(nib.Nifti1Image(rgb[:, :, :, None, :], np.eye(4)), tmp_path / "plain.nii.gz")
    with pytest.raises(DataError, match=r"plain\.nii\.gz: NIfTI with 5 dimensions .*\(several values per voxel on "
                                        r"the fifth axis, but not marked as vectors"):
        read_image(tmp_path / "plain.nii.gz")


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(("orientation", "displayed"), [
    (1, lambda a: a),
    (3, lambda a: a[::-1, ::-1]),  # upside down
    (6, lambda a: np.rot90(a, -1)),  # stored sideways, shown turned 90° clockwise (a phone held upright)
    (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation_is_applied_as_viewers_apply_it(tmp_path, orientation, displayed):
    stored = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(stored).save(tmp_path / "a.png", exif=_exif(orientation))
    back, meta = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(back[0], displayed(stored))
    assert tuple(meta["spatial_shape"]) == displayed(stored).shape
    assert tuple(PngReader().read_meta(str(tmp_path / "a.png"))["spatial_shape"]) == displayed(stored).shape
    np.testing.assert_array_equal(read_slice(tmp_path / "a.png", 0)[0], displayed(stored))


def test_a_mask_drawn_on_the_unturned_picture_is_told_of_the_exif_orientation(tmp_path):
    # the image is read turned (as viewers show it), a mask saved without the tag is not: the size error
    # says why, for a class mask and for an instance label image; sizes that differ otherwise say nothing of it
    from medseg.transforms import LoadInstanceMasksd, LoadSliced

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "cell.png", exif=_exif(6))
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "cell_mask.png")
    Image.fromarray(np.zeros((20, 31), np.uint8)).save(tmp_path / "other_mask.png")
    turned = r"cell\.png is turned by its EXIF orientation, as viewers show it: save the other file turned the same way"
    sample = {"image": str(tmp_path / "cell.png"), "label": str(tmp_path / "cell_mask.png")}
    with pytest.raises(DataError, match=r"cell_mask\.png: size \(20, 30\) differs from .*cell\.png \(30, 20\); the "
                                        r"image and its label must have the same size; " + turned):
        LoadSliced(["image", "label"])(sample)
    with pytest.raises(DataError, match=r"must have the image's size; " + turned):
        LoadInstanceMasksd("label")(LoadSliced("image")(sample))
    with pytest.raises(DataError, match=r"must have the same size$"):
        LoadSliced(["image", "label"])({**sample, "label": str(tmp_path / "other_mask.png")})


def test_jpeg_images_are_read_gray_rgb_and_cmyk_and_turned_upright(tmp_path):
    y, x = np.mgrid[0:32, 0:48]
    gray = (x * 4 + y * 2).astype(np.uint8)  # smooth (0-250), so JPEG keeps it within a few levels
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    back, meta = read_image(tmp_path / "g.jpg")
    assert back.shape == (1, 32, 48) and back.dtype == np.uint8 and meta["format"] == "png"
    assert np.abs(back[0].astype(int) - gray).max() <= 4
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 90)], -1)
    Image.fromarray(rgb).save(tmp_path / "c.jpeg", quality=95)
    back, _ = read_image(tmp_path / "c.jpeg")
    assert back.shape == (3, 32, 48) and np.abs(back.astype(int) - rgb.transpose(2, 0, 1)).mean() < 3
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    back, _ = read_image(tmp_path / "print.jpg")
    assert back.shape == (3, 32, 48) and np.abs(back.astype(int) - rgb.transpose(2, 0, 1)).mean() < 3
    Image.fromarray(gray).save(tmp_path / "phone.jpg", quality=95, exif=_exif(6))
    back, _ = read_image(tmp_path / "phone.jpg")
    assert back.shape == (1, 48, 32) and np.abs(back[0].astype(int) - np.rot90(gray, -1)).max() <= 4


def test_a_damaged_exif_block_never_stops_a_picture_from_being_read(tmp_path):
    # Pillow's exif_transpose rewrites the EXIF block and raised struct.error, TypeError or AttributeError on
    # one with damaged tags whose orientation still read; the picture itself decodes
    import io
    import random

    stored = (np.arange(12 * 20).reshape(12, 20) % 256).astype(np.uint8)
    exif = _exif(6)
    exif[0x010F], exif[0x0110], exif[0x0131] = "Canon", "Model X", "fw 1.0"
    exif.get_ifd(0x8769)[0x9003] = "2020:01:01 00:00:00"
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif, quality=95)
    base, block = buffer.getvalue(), exif.tobytes()
    start = base.find(block[:8])
    read = 0
    for n in (28, 124, 368, 1615, *range(40)):  # the first four broke exif_transpose in three different ways
        rng, damaged = random.Random(n), bytearray(base)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(start + 8, start + len(block))] = rng.randrange(256)
        path = tmp_path / f"{n}.jpg"
        path.write_bytes(bytes(damaged))
        try:
            with Image.open(path) as im:
                im.load()
        except Exception:  # noqa: BLE001 - not a picture Pillow decodes: not this test's case
            continue
        arr, meta = read_image(path)
        assert arr.shape[1:] == tuple(meta["spatial_shape"]) == tuple(
            PngReader().read_meta(str(path))["spatial_shape"])
        read += 1
    assert read > 35


def test_kind_of_names_the_pictures_the_png_reader_takes():
    assert [kind_of(f"a{s}", format_of(f"a{s}")) for s in (".JPG", ".jpeg", ".BMP", ".png", ".tif", ".nii.gz")] == [
        "jpeg", "jpeg", "bmp", "png", "tiff", "nifti"]


def test_a_gray_tiff_with_an_unspecified_extra_sample_keeps_both_channels(tmp_path):
    # two stains interleaved (ImageJ/Fiji "YXS", extra sample unspecified): the second is data, not alpha
    import tifffile

    two = np.zeros((16, 16, 2), np.uint8)
    two[..., 1] = 7
    tifffile.imwrite(tmp_path / "two.tif", two, photometric="minisblack", planarconfig="contig",
                     extrasamples=["unspecified"])
    tifffile.imwrite(tmp_path / "alpha.tif", two, photometric="minisblack", planarconfig="contig",
                     extrasamples=["unassalpha"])
    assert read_slice(str(tmp_path / "two.tif"), 0).shape == (2, 16, 16)
    assert read_slice(str(tmp_path / "two.tif"), 0)[1].max() == 7
    assert read_slice(str(tmp_path / "alpha.tif"), 0).shape == (1, 16, 16)


def test_a_slice_over_the_pixel_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    # a small file whose header claims a huge image (a decompression bomb) must not take all memory:
    # each reader checks the slice's size from the header against MEDSEG_MAX_PIXELS (default: Pillow's limit)
    from medseg.readers import DEFAULT_MAX_PIXELS, max_pixels

    assert max_pixels() == DEFAULT_MAX_PIXELS
    arr = np.zeros((40, 30), np.uint8)
    paths = [write_png(tmp_path / "a.png", arr), write_tiff(tmp_path / "a.tif", arr[None]),
             tmp_path / "a.nii.gz"]
    nib.save(nib.Nifti1Image(arr.T[..., None], np.eye(4)), paths[2])
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "1199")
    for path in paths:
        with pytest.raises(DataError, match=f"{path}: .*over the 1,199 read at once.*set MEDSEG_MAX_PIXELS|"
                                            f"{path}: more than the 1,199 pixels read at once"):
            read_slice(path, 0)
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "1200")
    for path in paths:
        assert read_slice(path, 0).shape[-2:] == (40, 30)
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="MEDSEG_MAX_PIXELS='lots': give a whole number"):
        read_slice(paths[0], 0)


def test_a_png_over_pillows_own_limit_is_a_one_line_error(tmp_path, monkeypatch):
    # Pillow refuses such files from the header (DecompressionBombError): the message says what to do
    import zlib

    path = tmp_path / "bomb.png"
    width = height = 20_000  # 400 M pixels, the data a few hundred bytes: rows of zeros
    raw = zlib.compress(b"\x00" * (width + 1) * 64)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=f"{path}: one slice of 20000 × 20000 = 400,000,000 pixels, over the "
                                        "178,956,970 read at once"):
        read_slice(path, 0)


def test_a_tiff_whose_chain_of_pages_breaks_is_refused_not_read_short(tmp_path):
    # tifffile stops at a next-page offset past the end of the file with a log line only: a 4-slice stack
    # read as 2 slices, the other 2 silently lost

    from medseg.readers import count_slices

    stack = (np.arange(4 * 24 * 24) % 251).astype(np.uint8).reshape(4, 24, 24)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack", metadata=None, contiguous=False)
    assert count_slices(tmp_path / "s.tif") == 4
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        second = tif.pages[1].offset
    raw = bytearray((tmp_path / "s.tif").read_bytes())
    link = second + 2 + 12 * struct.unpack("<H", raw[second:second + 2])[0]
    for target in (len(raw) + 1000, second):  # past the end; back to itself (a loop)
        raw[link:link + 4] = struct.pack("<I", target)
        (tmp_path / "bad.tif").write_bytes(raw)
        for read in (lambda: read_slice(tmp_path / "bad.tif", 0), lambda: count_slices(tmp_path / "bad.tif")):
            with pytest.raises(DataError, match=r"bad.tif: the TIFF's pages cannot all be read \(the link after "
                                                r"page 2 is broken\); the file is truncated or corrupt"):
                read()


def test_a_tiff_without_pages_is_named_as_empty(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"II*\x00\x00\x00\x00\x00")  # a header whose first page offset is 0
    with pytest.raises(DataError, match="empty.tif: TIFF holds no images"):
        read_slice(path, 0)


def test_a_volume_read_whole_larger_than_memory_is_refused_from_its_header(tmp_path, monkeypatch):
    # a compressed NIfTI or a TIFF volume in one page is decompressed whole: a header claiming more than the
    # machine's memory (corrupt, or a file to save otherwise) is refused before it is read
    import medseg.readers

    volume = np.zeros((5, 20, 20), np.float32)
    nib.save(nib.Nifti1Image(volume.T, np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(volume.T, np.eye(4)), tmp_path / "v.nii")
    tifffile.imwrite(tmp_path / "v.tif", volume, tile=(5, 16, 16), photometric="minisblack", compression="zlib")
    for _ in range(2):  # two such volumes as two series of one file: read whole together
        tifffile.imwrite(tmp_path / "q.tif", volume[:2], tile=(2, 16, 16), photometric="minisblack",
                         compression="zlib", append=True)
    memory = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1}  # 4 KiB; each volume is 7.8 KiB
    monkeypatch.setattr(medseg.readers.os, "sysconf", lambda name: memory[name])
    with pytest.raises(DataError, match=r"v.nii.gz: 20 × 20 × 5 values .* more than this machine's memory .* "
                                        r"save it uncompressed"):
        read_slice(tmp_path / "v.nii.gz", 0)
    with pytest.raises(DataError, match="v.tif: .* save it with one page per slice"):
        read_slice(tmp_path / "v.tif", 0)
    with pytest.raises(DataError, match=r"q.tif: 2 × 2 × 20 × 20 values .* save each series as its own file"):
        read_slice(tmp_path / "q.tif", 0)
    assert read_slice(tmp_path / "v.nii", 2).shape == (1, 20, 20)  # read slice by slice: no whole volume
    for pages in (10**6, -1):  # enough memory; memory unknown (-1): read
        memory["SC_PHYS_PAGES"] = pages
        assert read_slice(tmp_path / "v.nii.gz", 2).shape == read_slice(tmp_path / "v.tif", 2).shape == (1, 20, 20)
        assert read_slice(tmp_path / "q.tif", 3).shape == (1, 20, 20)


def test_a_raised_pixel_limit_reads_larger_pictures_and_leaves_pillows_own(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    from medseg.readers import open_picture

    path = write_png(tmp_path / "a.png", np.zeros((40, 30), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow alone warns above 500, refuses above 1000
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "5000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_picture(path) as im:  # ours decides, without Pillow's warning
            assert im.size == (30, 40)
    assert Image.MAX_IMAGE_PIXELS == 500  # and Pillow's stays as it was for the rest of the process
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "1000")
    with pytest.raises(DataError, match="a.png: .*the 1,000 .*MEDSEG_MAX_PIXELS"):
        open_picture(path)


def test_three_separate_channels_are_not_blended_as_the_colours_of_a_picture(tmp_path):
    # an ImageJ or OME CYX stack of 3 stains, or 3 NIfTI volumes, went through RGB's luma weights into one
    # gray image without a word, while 2 or 4 channels were refused; RGB samples (chunky or planar) are colour
    from medseg.readers import separate_channels
    from medseg.transforms import LoadSliced

    stains = (np.random.default_rng(3).random((3, 24, 20)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", stains, imagej=True, metadata={"axes": "CYX", "mode": "composite"})
    tifffile.imwrite(tmp_path / "ome.ome.tif", stains, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(stains, 0, -1), photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", stains, photometric="rgb", planarconfig="separate")
    volumes = np.zeros((20, 24, 1, 3), np.float32)  # (X, Y, Z, C): three volumes of one slice
    for c in range(3):
        volumes[:, :, 0, c] = stains[c].T
    nib.save(nib.Nifti1Image(volumes, np.eye(4)), tmp_path / "v.nii.gz")
    for name, separate in (("ij.tif", True), ("ome.ome.tif", True), ("rgb.tif", False), ("planar.tif", False)):
        assert separate_channels(tmp_path / name) is separate, name
    assert separate_channels(tmp_path / "v.nii.gz", nifti_channel_dim=3)
    load = LoadSliced(keys="image")
    for name in ("ij.tif", "ome.ome.tif"):
        with pytest.raises(DataError, match=rf"{name}: 3 separate channels, not the colours of an RGB picture.*"
                                            r"input_channels=\[N\]"):
            load({"image": str(tmp_path / name)})
        picked = LoadSliced(keys="image", select=[1])({"image": str(tmp_path / name)})["image"]
        np.testing.assert_array_equal(picked[0], stains[1].astype(np.float32))
    with pytest.raises(DataError, match="v.nii.gz: 3 separate channels"):
        LoadSliced(keys="image", nifti_channel_dim=3)({"image": str(tmp_path / "v.nii.gz")})
    for name in ("rgb.tif", "planar.tif"):
        assert load({"image": str(tmp_path / name)})["image"].shape == (1, 24, 20)
    from medseg.transforms import BrightObjectsd  # nuclei's stain normalisation blends to gray too

    for name in ("ij.tif", "ome.ome.tif"):
        loaded = LoadSliced(keys="image", gray=False)({"image": str(tmp_path / name)})
        with pytest.raises(DataError, match=rf"{name}: 3 separate channels"):
            BrightObjectsd(keys="image")(loaded)
    # a 3-channel network takes them as its 3 channels, blending nothing (as before)
    three = LoadSliced(keys="image", channels=3)({"image": str(tmp_path / "ij.tif")})["image"]
    np.testing.assert_array_equal(three, stains.astype(np.float32))


def test_pages_of_other_sizes_left_out_of_a_tiff_are_said(tmp_path, caplog):
    # a stack whose middle page has another size was read as its other two pages, silently
    from medseg import readers

    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        for size in ((32, 24), (20, 20), (32, 24)):
            tif.write(np.zeros(size, np.uint8), metadata=None)
    readers._SERIES_SAID.discard(str(tmp_path / "mixed.tif"))
    assert count_slices(tmp_path / "mixed.tif") == 2
    read_slice(tmp_path / "mixed.tif", 1)
    said = [r.getMessage() for r in caplog.records if "series of different shapes" in r.getMessage()]
    assert len(said) == 1 and "only the first (2×32×24 uint8) is read, the others (20×20 uint8) are left out" \
        in said[0], said


def test_a_suffix_that_does_not_fit_the_content_is_named(tmp_path):
    # "not a TIFF file: header=b'\x89PNG'; the file may be truncated or corrupt" for a PNG named .tif; a browser
    # that unpacks a .nii.gz but keeps its name, or the reverse, gave "is not a gzip file" / "Cannot work out"
    import shutil

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "p.tif", format="PNG")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / "u.nii")
    shutil.copy(tmp_path / "u.nii", tmp_path / "u.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / "g.nii.gz")
    shutil.copy(tmp_path / "g.nii.gz", tmp_path / "g.nii")
    import gzip

    (tmp_path / "z.tif").write_bytes(gzip.compress((tmp_path / "u.nii").read_bytes()))
    (tmp_path / "t.tif").write_bytes(gzip.compress(b"not an image"))
    # a DICOM file whose preamble starts as a TIFF's header does (real ones do), under three other suffixes, was
    # told to be renamed .tif, or nothing; a big-endian NIfTI named .nii.gz got "not a gzip file" alone
    dicom = write_dicom_slice(tmp_path / "d.dcm", np.zeros((4, 4), np.int16), series_uid="1.2.5", position=(0, 0, 0))
    for name in ("d.nii.gz", "d.nii", "d.png", "d.tif"):
        (tmp_path / name).write_bytes(b"II*\x00" + dicom.read_bytes()[4:])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4), nib.Nifti1Header(endianness=">")),
             tmp_path / "b.nii")
    shutil.copy(tmp_path / "b.nii", tmp_path / "b.nii.gz")
    shutil.copy(tmp_path / "u.nii", tmp_path / "n.png")
    for name, says in (("p.tif", "it is a PNG file: rename it to .png"),
                       ("z.tif", "it is a gzip-compressed NIfTI: rename it to .nii.gz"),
                       ("t.tif", "it is gzip-compressed: decompress it"),
                       ("u.nii.gz", "it is an uncompressed NIfTI named .nii.gz: rename it to .nii"),
                       ("b.nii.gz", "it is an uncompressed NIfTI named .nii.gz: rename it to .nii"),
                       ("g.nii", "it is gzip-compressed: rename it to .nii.gz"),
                       ("n.png", "it is a NIfTI file: rename it to .nii"),
                       *((name, "it is a DICOM file: rename it to .dcm") for name in ("d.nii.gz", "d.nii", "d.png",
                                                                                   "d.tif"))):
        with pytest.raises(DataError, match=rf"{re.escape(name)}: (cannot read|TIFF holds) .*; {says}$"):
            read_slice(tmp_path / name, 0)
    (tmp_path / "dcm").mkdir()  # and another format under a DICOM suffix was "not a DICOM image" alone
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "dcm" / "p.dcm", format="PNG")
    shutil.copy(tmp_path / "u.nii", tmp_path / "dcm" / "n.dcm")
    from medseg.discovery import discover

    found = {os.path.basename(i.source): i.error for i in discover(tmp_path / "dcm")[0]}
    assert found == {"n.dcm": f"{tmp_path / 'dcm' / 'n.dcm'}: not a DICOM file; it is a NIfTI file: rename it to .nii",
                     "p.dcm": f"{tmp_path / 'dcm' / 'p.dcm'}: not a DICOM file; it is a PNG file: rename it to .png"}
    import pydicom

    ds = pydicom.dcmread(dicom)  # a DICOM file that names no series, its preamble TIFF-like: not told it is a TIFF
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "dcm" / "d.dcm")
    (tmp_path / "dcm" / "d.dcm").write_bytes(b"II*\x00" + (tmp_path / "dcm" / "d.dcm").read_bytes()[4:])
    found = {os.path.basename(i.source): i.error for i in discover(tmp_path / "dcm")[0]}
    assert found["d.dcm"].endswith("d.dcm: not a DICOM image (no SeriesInstanceUID); remove it or --exclude it")
