"""NRRD and MetaImage inputs (read through ITK): geometry by hand, the same voxels and world place as NIfTI,
value types, channels, bad files, and `medseg infer` writing their masks in their own kind where they lie."""

from __future__ import annotations

import csv
import gzip
import os
import re
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_NET, synthetic_em
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import DataError
from medseg.readers import count_slices, read_geometry, read_image, read_slice, separate_channels

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "isbi_em"
NRRD_TYPES = {np.uint8: "uint8", np.int8: "int8", np.uint16: "uint16", np.int16: "int16", np.int32: "int32",
              np.uint32: "uint32", np.int64: "int64", np.float32: "float", np.float64: "double"}


def _nrrd(path: Path, voxels: np.ndarray, space: str = "left-posterior-superior",
          directions: str = "(0,2,0) (1,0,0) (0,0,3)", origin: str = "(10,20,30)", kinds: str = "",
          vector: bool = False) -> Path:
    """A NRRD written by hand: ``voxels`` in (Z, Y, X[, C]) order, stored x fastest (C first for vectors)."""
    sizes = list(voxels.shape[::-1]) if not vector else [voxels.shape[-1], *voxels.shape[-2::-1]]
    dims = len(sizes)
    header = ["NRRD0004", f"type: {NRRD_TYPES[voxels.dtype.type]}", f"dimension: {dims}", f"space: {space}",
              f"sizes: {' '.join(map(str, sizes))}",
              f"space directions: {'none ' if vector else ''}{directions}", "endian: little", "encoding: raw",
              f"space origin: {origin}"]
    if kinds:
        header.append(f"kinds: {kinds}")
    path.write_bytes(("\n".join(header) + "\n\n").encode() + np.ascontiguousarray(voxels).astype(
        voxels.dtype.newbyteorder("<")).tobytes())
    return path


def test_nrrd_geometry_by_hand_lps_and_ras(tmp_path):
    voxels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # Z=2, Y=3, X=4
    lps = _nrrd(tmp_path / "lps.nrrd", voxels)
    arr, meta = read_image(lps)
    assert arr.shape == (1, 2, 3, 4) and arr.dtype == np.int16
    np.testing.assert_array_equal(arr[0], voxels)
    assert meta["format"] == "itk" and meta["spacing_unit"] == "mm"
    np.testing.assert_allclose(meta["spacing"], [3.0, 1.0, 2.0])  # (z, y, x): the directions' lengths
    # voxel x=1 lies at LPS (10, 22, 30), so RAS (-10, -22, 30); voxel y=1 at LPS (11, 20, 30); z=1 at (10, 20, 33)
    affine = meta["affine"]  # columns (z, y, x)
    np.testing.assert_allclose(affine @ [0, 0, 1, 1], [-10, -22, 30, 1])
    np.testing.assert_allclose(affine @ [0, 1, 0, 1], [-11, -20, 30, 1])
    np.testing.assert_allclose(affine @ [1, 0, 0, 1], [-10, -20, 33, 1])
    # a RAS header: ITK turns it into LPS, and the RAS affine is the header's own again
    ras = _nrrd(tmp_path / "ras.nrrd", voxels, space="right-anterior-superior",
                directions="(1.5,0,0) (0,0.5,0) (0,0,2)", origin="(-5,7,9)")
    np.testing.assert_allclose(read_geometry(ras)["affine"][:, [2, 1, 0, 3]],
                               [[1.5, 0, 0, -5], [0, 0.5, 0, 7], [0, 0, 2, 9], [0, 0, 0, 1]], atol=1e-9)
    assert count_slices(lps) == 2
    np.testing.assert_array_equal(read_slice(lps, 1)[0], voxels[1])
    with pytest.raises(IndexError):
        read_slice(lps, 2)


def test_metaimage_and_nrrd_from_nifti_read_as_the_nifti(tmp_path):
    """The same volume saved by ITK as .nrrd, .mha and .mhd + .raw reads as the NIfTI does: voxels and affine."""
    import itk

    a, b = np.radians(30), np.radians(10)  # oblique: turned about z, then about x
    turn = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]) @ \
        np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = turn @ np.diag([0.9, 0.7, 2.5]), (12.0, -7.0, 3.0)
    volume = np.random.default_rng(0).integers(0, 4000, (6, 5, 4)).astype(np.int16)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "v.nii")
    image = itk.imread(str(tmp_path / "v.nii"))
    for name in ("v.nrrd", "v.mha", "v.mhd"):
        itk.imwrite(image, str(tmp_path / name))
    assert (tmp_path / "v.raw").is_file()
    expected, want = read_image(tmp_path / "v.nii")
    for name in ("v.nrrd", "v.mha", "v.mhd"):
        arr, meta = read_image(tmp_path / name)
        np.testing.assert_array_equal(arr, expected, err_msg=name)
        np.testing.assert_allclose(meta["affine"], want["affine"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(meta["spacing"], want["spacing"], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", list(NRRD_TYPES))
def test_every_value_type_is_read_exactly(tmp_path, dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    low, high = (max(float(info.min), -2.0**52), min(float(info.max), 2.0**52))
    voxels = np.array([low, high, 0, 1, high - 1, low + 1, 7, 3], dtype=dtype).reshape(1, 2, 4)
    arr, _ = read_image(_nrrd(tmp_path / "t.nrrd", voxels))
    np.testing.assert_array_equal(arr[0].astype(np.float64), voxels.astype(np.float64))
    assert arr.dtype.kind == np.dtype(dtype).kind or dtype == np.int64  # int64: float64 (ITK's Python lacks it)


def test_2d_images_and_vector_voxels(tmp_path):
    import itk

    plane = np.random.default_rng(1).integers(0, 255, (5, 7)).astype(np.uint8)
    picture = itk.image_from_array(plane)
    picture.SetSpacing((0.5, 0.25))
    itk.imwrite(picture, str(tmp_path / "p.mha"))
    arr, meta = read_image(tmp_path / "p.mha")
    assert arr.shape == (1, 1, 5, 7) and count_slices(tmp_path / "p.mha") == 1
    np.testing.assert_array_equal(arr[0, 0], plane)
    np.testing.assert_allclose(meta["spacing"], [1.0, 0.25, 0.5])
    np.testing.assert_array_equal(read_slice(tmp_path / "p.mha", 0)[0], plane)
    # RGB colours (three 8-bit values) and a 2-vector of floats: channels first, in the file's value type
    rgb = np.random.default_rng(2).integers(0, 255, (2, 3, 4, 3)).astype(np.uint8)
    _nrrd(tmp_path / "rgb.nrrd", rgb, kinds="RGB-color domain domain domain", vector=True)
    arr, _ = read_image(tmp_path / "rgb.nrrd")
    assert arr.shape == (3, 2, 3, 4) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, rgb.transpose(3, 0, 1, 2))
    assert not separate_channels(tmp_path / "rgb.nrrd")
    rgba = np.random.default_rng(3).integers(0, 255, (1, 3, 4, 4)).astype(np.uint8)
    _nrrd(tmp_path / "rgba.nrrd", rgba, kinds="RGBA-color domain domain domain", vector=True)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.nrrd")[0], rgba[..., :3].transpose(3, 0, 1, 2))
    vec = np.random.default_rng(4).random((2, 3, 4, 2)).astype(np.float32)
    _nrrd(tmp_path / "vec.nrrd", vec, kinds="vector domain domain domain", vector=True)
    np.testing.assert_array_equal(read_image(tmp_path / "vec.nrrd")[0], vec.transpose(3, 0, 1, 2))
    assert separate_channels(tmp_path / "vec.nrrd")
    np.testing.assert_array_equal(read_slice(tmp_path / "vec.nrrd", 1), vec[1].transpose(2, 0, 1))


def test_bad_files_are_one_line_errors_naming_the_file_and_the_fix(tmp_path):
    voxels = np.zeros((2, 3, 4), np.uint8)
    whole = _nrrd(tmp_path / "whole.nrrd", voxels).read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(whole[:-10])  # voxels cut short
    (tmp_path / "header_cut.nrrd").write_bytes(whole[:40])
    (tmp_path / "four.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 4\nsizes: 2 2 2 2\nencoding: raw\n\n"
                                         + bytes(16))
    (tmp_path / "lonely.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_UCHAR\n"
                                         "ElementDataFile = lonely.raw\n")
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "text.mha")
    for name, sizes in (("negative.mha", "-4 3"), ("short.mha", "4 3")):  # ITK wraps -4 to 4294967292
        (tmp_path / name).write_bytes(f"ObjectType = Image\nNDims = {2 if name == 'negative.mha' else 3}\n"
                                      f"DimSize = {sizes}\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
                                      .encode() + bytes(12))
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "png.nrrd", format="PNG")
    expected = {"cut.nrrd": "its voxels are cut short (14 of 24 bytes); the file is truncated: copy it again",
                "header_cut.nrrd": "cannot read the header",
                "four.nrrd": "4D image (2 × 2 × 2 × 2); expected 2D or 3D: split it into 3D volumes",
                "lonely.mhd": "its data file lonely.raw (named in the header) is not there; copy the header and "
                              "its data file together",
                "text.mha": "not a NRRD or MetaImage file", "png.nrrd": "it is a PNG file: rename it to .png",
                "negative.mha": "DimSize = -4 3 in its header, not 2 sizes of 1 or more; the file is corrupt",
                "short.mha": "DimSize = 4 3 in its header, not 3 sizes of 1 or more; the file is corrupt"}
    for name, text in expected.items():
        with pytest.raises(DataError) as err:
            read_image(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name)) and text in message and "\n" not in message, message


def test_infer_writes_nrrd_and_metaimage_masks_of_them_where_they_lie(tmp_path, tiny_checkpoint):
    """A NRRD's masks are NRRD, a MetaImage's MetaImage, on the input's grid: read by ITK itself, the same voxels,
    spacing, origin and directions as the NIfTI masks of the same volume given as NIfTI."""
    import itk

    root, reference = tmp_path / "in", tmp_path / "ref"
    root.mkdir()
    reference.mkdir()
    image, _ = synthetic_em(size=32, seed=5)
    affine = np.array([[0.0, -0.8, 0.0, 4.0], [0.7, 0.0, 0.0, -3.0], [0.0, 0.0, 2.0, 1.0], [0, 0, 0, 1]])
    volume = np.stack([image.T, image[::-1].T], axis=-1)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(volume, affine), reference / "v.nii")
    itk_image = itk.imread(str(reference / "v.nii"))
    itk.imwrite(itk_image, str(root / "v.nrrd"))
    itk.imwrite(itk_image, str(root / "w.mhd"))
    runner = CliRunner()

    def infer(inputs: Path, out: Path, *extra: str):
        args = ["infer", BUNDLE, inputs, out, "--checkpoint", tiny_checkpoint, "--no-progress", "--device", "cpu"]
        args += [a for item in TINY_NET for a in ("--set", item)] + list(extra)
        return runner.invoke(app, [str(a) for a in args])

    result = infer(root, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert infer(reference, tmp_path / "out_nii").exit_code == 0
    assert nib.load(tmp_path / "out_nii" / "mask" / "v.nii.gz").shape == (32, 32, 2)
    for name, suffix in (("v", ".nrrd"), ("w", ".mha")):
        assert not (tmp_path / "out" / "mask" / f"{name}.nii.gz").exists()
        for kind, dtype in (("mask", np.uint8), ("prob", np.float32)):
            got = itk.imread(str(tmp_path / "out" / kind / f"{name}{suffix}"))
            ref = itk.imread(str(tmp_path / "out_nii" / kind / "v.nii.gz"))
            for what in (itk.spacing, itk.origin):
                np.testing.assert_allclose(np.asarray(what(got)), np.asarray(what(ref)), atol=1e-6)
            np.testing.assert_allclose(np.asarray(got.GetDirection()), np.asarray(ref.GetDirection()), atol=1e-6)
            values = itk.array_from_image(got)
            assert values.dtype == dtype and values.shape == (2, 32, 32)
            np.testing.assert_allclose(values, itk.array_from_image(ref), atol=1e-6)
        assert set(np.unique(itk.array_from_image(itk.imread(str(tmp_path / "out" / "mask" / f"{name}{suffix}"))))) \
            <= {0, 1}
    # medseg reads its own masks back where the image lies, in millimetres
    np.testing.assert_allclose(read_geometry(tmp_path / "out" / "mask" / "w.mha")["affine"],
                               read_geometry(root / "w.mhd")["affine"], atol=1e-9)
    assert read_geometry(tmp_path / "out" / "mask" / "v.nrrd")["spacing_unit"] == "mm"
    # --format nifti still gives NIfTI, the same masks
    assert infer(root, tmp_path / "out_as_nii", "--format", "nifti").exit_code == 0
    for name in ("v", "w"):
        got = nib.load(tmp_path / "out_as_nii" / "mask" / f"{name}.nii.gz")
        ref = nib.load(tmp_path / "out_nii" / "mask" / "v.nii.gz")
        np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        rows = {Path(row["input"]).name: row for row in csv.DictReader(f)}
    assert rows["v.nrrd"]["format"] == "nrrd" and rows["w.mhd"]["format"] == "metaimage"
    assert rows["v.nrrd"]["status"] == rows["w.mhd"]["status"] == "ok"
    assert rows["w.raw"]["status"] == "ignored" and rows["w.raw"]["message"] == "the data file of w.mhd, read with it"
    # a rerun skips both; voxels rewritten in the data file alone (the header as it was) are segmented again
    assert infer(root, tmp_path / "out").exit_code == 0
    assert {n: _rows(tmp_path / "out")[n]["status"] for n in ("v.nrrd", "w.mhd")} == {"v.nrrd": "skipped",
                                                                                      "w.mhd": "skipped"}
    header = (root / "w.mhd").stat()
    raw = (root / "w.raw").read_bytes()
    (root / "w.raw").write_bytes(raw[len(raw) // 2:] + raw[: len(raw) // 2])  # the slices swapped
    os.utime(root / "w.mhd", ns=(header.st_atime_ns, header.st_mtime_ns))
    assert infer(root, tmp_path / "out").exit_code == 0
    rows = _rows(tmp_path / "out")
    assert (rows["v.nrrd"]["status"], rows["w.mhd"]["status"]) == ("skipped", "ok")
    redone = itk.array_from_image(itk.imread(str(tmp_path / "out" / "mask" / "w.mha")))
    first = itk.array_from_image(itk.imread(str(tmp_path / "out" / "mask" / "v.nrrd")))
    np.testing.assert_array_equal(redone, first[::-1])


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {Path(row["input"]).name: row for row in csv.DictReader(f)}


def _mha(path: Path, voxels: np.ndarray, extra: str = "", data: str = "LOCAL", compressed: bool = False,
         channels: int = 1) -> Path:
    """A MetaImage written by hand: ``voxels`` in (Z, Y, X[, C]) order, stored x fastest."""
    types = {np.uint8: "MET_UCHAR", np.int16: "MET_SHORT", np.float32: "MET_FLOAT"}
    spatial = voxels.shape[:-1] if channels > 1 else voxels.shape
    payload = np.ascontiguousarray(voxels).astype(voxels.dtype.newbyteorder("<")).tobytes()
    if compressed:
        payload = zlib.compress(payload)
    header = (f"ObjectType = Image\nNDims = {len(spatial)}\nDimSize = {' '.join(map(str, spatial[::-1]))}\n"
              f"ElementType = {types[voxels.dtype.type]}\nElementNumberOfChannels = {channels}\n"
              f"BinaryData = True\nBinaryDataByteOrderMSB = False\n{extra}"
              + (f"CompressedData = True\nCompressedDataSize = {len(payload)}\n" if compressed else "")
              + f"ElementDataFile = {data}\n")
    if data == "LOCAL":
        path.write_bytes(header.encode() + payload)
    else:
        path.write_text(header)
        (path.parent / data).write_bytes(payload)
    return path


def test_voxels_cut_short_or_damaged_in_compression_are_refused_without_console_noise(tmp_path, capfd):
    """ITK takes damaged gzip or zlib data without checking their checksum (wrong voxels, no word) and prints
    its own complaints of short files on the console: the voxels are checked first."""
    voxels = np.random.default_rng(6).integers(0, 50, (4, 16, 16)).astype(np.int16)  # compressible
    gz = _nrrd(tmp_path / "gz.nrrd", voxels)
    body = voxels.astype("<i2").tobytes()
    head = gz.read_bytes()[: -len(body)].replace(b"encoding: raw", b"encoding: gzip")
    packed = gzip.compress(body)
    damaged = bytearray(packed)
    damaged[len(packed) // 2: len(packed) // 2 + 40] = bytes(40)
    (tmp_path / "gz.nrrd").write_bytes(head + packed)
    (tmp_path / "damaged.nrrd").write_bytes(head + bytes(damaged))
    (tmp_path / "gz_cut.nrrd").write_bytes(head + packed[: len(packed) // 2])
    _mha(tmp_path / "z.mha", voxels, compressed=True)
    whole = (tmp_path / "z.mha").read_bytes()
    at = len(whole) - len(zlib.compress(body)) + 30
    (tmp_path / "z_damaged.mha").write_bytes(whole[:at] + bytes(20) + whole[at + 20:])
    _mha(tmp_path / "short.mhd", voxels, data="short.raw")
    (tmp_path / "short.raw").write_bytes(body[:-100])
    _mha(tmp_path / "cut.mha", voxels)
    (tmp_path / "cut.mha").write_bytes((tmp_path / "cut.mha").read_bytes()[:-300])
    np.testing.assert_array_equal(read_image(tmp_path / "gz.nrrd")[0][0], voxels)
    np.testing.assert_array_equal(read_image(tmp_path / "z.mha")[0][0], voxels)
    capfd.readouterr()
    expected = {"damaged.nrrd": "its compressed voxels are damaged", "z_damaged.mha": "its compressed voxels are "
                "damaged", "gz_cut.nrrd": "its compressed voxels are cut short", "short.mhd": "its voxels are cut "
                "short (1,948 of 2,048 bytes in short.raw)", "cut.mha": "its voxels are cut short (1,748 of 2,048"}
    for name, text in expected.items():
        with pytest.raises(DataError) as err:
            read_image(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: {text}"), str(err.value)
        assert "copy it again from its source" in str(err.value)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed  # nothing of ITK's own on the console


def test_what_a_header_says_beyond_itk_pixel_size_units_colours_data_files(tmp_path):
    from medseg.batch import input_fingerprint
    from medseg.discovery import discover
    from medseg.writers import pixel_micrometres

    voxels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    # no pixel size stated: uncalibrated (ITK says 1 for each axis), so no micrometres
    bare = _nrrd(tmp_path / "bare.nrrd", voxels)
    bare.write_bytes(bare.read_bytes().replace(b"space directions: (0,2,0) (1,0,0) (0,0,3)\n", b"")
                     .replace(b"space: left-posterior-superior\n", b"").replace(b"space origin: (10,20,30)\n", b""))
    meta = read_geometry(bare)
    assert meta["spacing_unit"] == "pixel" and pixel_micrometres(meta) is None
    assert read_geometry(_mha(tmp_path / "bare.mha", voxels))["spacing_unit"] == "pixel"
    sized = read_geometry(_mha(tmp_path / "sized.mha", voxels, extra="ElementSpacing = 0.5 0.4 2\n"))
    assert sized["spacing_unit"] == "mm" and pixel_micrometres(sized) == pytest.approx((400.0, 500.0))
    # NRRD's space units
    microns = _nrrd(tmp_path / "um.nrrd", voxels)
    microns.write_bytes(microns.read_bytes().replace(b"encoding: raw\n",
                                                     b'encoding: raw\nspace units: "microns" "microns" "microns"\n'))
    meta = read_geometry(microns)
    assert meta["spacing_unit"] == "um" and pixel_micrometres(meta) == pytest.approx((1.0, 2.0))
    # four 8-bit values of a MetaImage are RGBA, alpha dropped; NRRD's kinds tell a 3-vector from colours
    rgba = np.random.default_rng(7).integers(0, 255, (1, 3, 4, 4)).astype(np.uint8)
    arr, _ = read_image(_mha(tmp_path / "rgba.mha", rgba, channels=4))
    np.testing.assert_array_equal(arr, rgba[..., :3].transpose(3, 0, 1, 2))
    stains = rgba[..., :3].copy()
    _nrrd(tmp_path / "stains.nrrd", stains, kinds="3-vector domain domain domain", vector=True)
    assert separate_channels(tmp_path / "stains.nrrd")
    np.testing.assert_array_equal(read_image(tmp_path / "stains.nrrd")[0], stains.transpose(3, 0, 1, 2))
    floats = np.random.default_rng(8).random((1, 3, 4, 2)).astype(np.float32)
    _nrrd(tmp_path / "floats.nrrd", floats, kinds="vector domain domain domain", vector=True)
    assert read_image(tmp_path / "floats.nrrd")[0].dtype == np.float32
    # data files: a name with spaces, a list, a subfolder; each part's change changes the input's fingerprint
    folder = tmp_path / "detached"
    folder.mkdir()
    _mha(folder / "spaced.mhd", voxels, data="my scan.raw")
    plane = voxels[0].tobytes()
    (folder / "parts").mkdir()
    (folder / "parts" / "a.raw").write_bytes(plane)
    (folder / "parts" / "b.raw").write_bytes(voxels[1].tobytes())
    (folder / "listed.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\nencoding: raw\n"
                                        "data file: LIST 2\nparts/a.raw\nparts/b.raw\n")
    (folder / "stray.raw").write_bytes(b"not named by any header")
    for name in ("spaced.mhd", "listed.nhdr"):
        np.testing.assert_array_equal(read_image(folder / name)[0][0], voxels, err_msg=name)
    before = input_fingerprint(folder / "listed.nhdr")
    (folder / "parts" / "b.raw").write_bytes(voxels[1][::-1].tobytes())
    assert input_fingerprint(folder / "listed.nhdr") != before
    before = input_fingerprint(folder / "spaced.mhd")
    (folder / "my scan.raw").write_bytes(voxels[::-1].tobytes())
    assert input_fingerprint(folder / "spaced.mhd") != before
    inputs, ignored = discover(folder)
    assert sorted(Path(i.source).name for i in inputs) == ["listed.nhdr", "spaced.mhd"]
    assert dict((Path(f).name, why) for f, why in ignored) == {
        "my scan.raw": "the data file of spaced.mhd, read with it", "a.raw": "the data file of listed.nhdr, read "
        "with it", "b.raw": "the data file of listed.nhdr, read with it", "stray.raw": "unsupported file type '.raw'"}


def test_encodings_and_layouts_itk_cannot_read_say_what_to_do(tmp_path):
    (tmp_path / "bz.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 2 2\nencoding: bzip2\n\n"
                                       + bytes(20))
    (tmp_path / "slice.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 2\nspace: left-posterior-superior\n"
                                          b"sizes: 2 2\nspace directions: (1,0,0) (0,1,0)\nencoding: raw\n\n"
                                          + bytes(4))
    for name, fix in (("bz.nrrd", "save it again with raw or gzip encoding"),
                      ("slice.nrrd", "save it as a 3D image of one slice")):
        with pytest.raises(DataError) as err:
            read_image(tmp_path / name)
        assert str(err.value).endswith(fix) and "\n" not in str(err.value), str(err.value)


def test_units_lists_patterns_and_gzip_members_as_the_formats_allow(tmp_path):
    voxels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    # NRRD's space units, UTF-8 µm included; cm become mm; units that cannot be told: uncalibrated
    for units, unit, scale in (('"µm" "µm" "µm"', "um", 1.0), ('"nm" "nm" "nm"', "um", 1e-3),
                               ('"cm" "cm" "cm"', "mm", 10.0), ('"mm" "mm" "s"', "pixel", 1.0)):
        path = _nrrd(tmp_path / "u.nrrd", voxels)
        path.write_bytes(path.read_bytes().replace(b"encoding: raw\n",
                                                   f"encoding: raw\nspace units: {units}\n".encode()))
        meta = read_geometry(path)
        assert meta["spacing_unit"] == unit, units
        np.testing.assert_allclose(meta["spacing"], np.array([3.0, 1.0, 2.0]) * scale, err_msg=units)
        np.testing.assert_allclose(meta["affine"] @ [0, 0, 1, 1], [-10 * scale, -22 * scale, 30 * scale, 1])
    # a list of data files longer than 64 KiB of header, one per slice
    many = np.random.default_rng(9).integers(0, 255, (3000, 2, 2)).astype(np.uint8)
    (tmp_path / "slices").mkdir()
    for k, plane in enumerate(many):
        (tmp_path / "slices" / f"slice_with_a_long_name_{k:05d}.raw").write_bytes(plane.tobytes())
    names = "\n".join(f"slices/slice_with_a_long_name_{k:05d}.raw" for k in range(len(many)))
    (tmp_path / "long.nhdr").write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 {len(many)}\n"
                                        f"encoding: raw\ndata file: LIST\n{names}\n")
    assert (tmp_path / "long.nhdr").stat().st_size > 1 << 16
    np.testing.assert_array_equal(read_image(tmp_path / "long.nhdr")[0][0], many)
    # a list or pattern naming other than one file per slice, or a pattern that names none: refused
    for named, said in (("LIST\nslices/slice_with_a_long_name_00000.raw", "names 1 data file for the image's 2 "
                         "parts"), ("s%d.raw 0 1 0", "names no data files"), ("s%d.raw 1 0 1", "names no data files"),
                        ("s%c.raw 2000000 2000001 1", "pattern s%c.raw cannot name files")):
        (tmp_path / "p.nhdr").write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                         f"data file: {named}\n")
        with pytest.raises(DataError, match=re.escape(said)):
            read_image(tmp_path / "p.nhdr")
    # gzip data in several members (bgzip, pigz --independent), as ITK reads them
    body = voxels.tobytes()
    head = _nrrd(tmp_path / "m.nrrd", voxels).read_bytes()[: -len(body)].replace(b"encoding: raw",
                                                                                 b"encoding: gzip")
    (tmp_path / "m.nrrd").write_bytes(head + gzip.compress(body[:10]) + gzip.compress(body[10:]))
    np.testing.assert_array_equal(read_image(tmp_path / "m.nrrd")[0][0], voxels)
    # zlib data in a MetaImage without CompressedDataSize: ITK misreads them
    _mha(tmp_path / "nosize.mha", voxels, compressed=True)
    (tmp_path / "nosize.mha").write_bytes(re.sub(rb"CompressedDataSize = \d+\n", b"",
                                                 (tmp_path / "nosize.mha").read_bytes()))
    with pytest.raises(DataError, match="without CompressedDataSize"):
        read_image(tmp_path / "nosize.mha")


def test_malformed_headers_are_one_line_errors(tmp_path):
    head = "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = 1 1 1\nBinaryData = True\n"
    (tmp_path / "v.raw").write_bytes(bytes(24))
    cases = {"wide.mhd": head + "ElementType = MET_UCHAR\nElementDataFile = %99999999999d 0 1 1\n",
             "untyped.mhd": head + "ElementType = \nElementDataFile = v.raw\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as err:
            read_geometry(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value), str(err.value)


def test_metaimage_and_nrrd_corners_itk_misreads_or_never_ends_on(tmp_path):
    voxels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    base = "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementSpacing = 2 0.5 0.5\nElementType = MET_UCHAR\n"
    (tmp_path / "list.raw").write_bytes(voxels.tobytes())  # a file whose name begins with "list"
    (tmp_path / "a.mhd").write_text(base + "ElementDataFile = list.raw\n")
    np.testing.assert_array_equal(read_image(tmp_path / "a.mhd")[0][0], voxels)
    (tmp_path / "a.nhdr").write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\nencoding: raw\n"
                                     "data file: list.raw\n")
    np.testing.assert_array_equal(read_image(tmp_path / "a.nhdr")[0][0], voxels)
    for k in range(2):
        (tmp_path / f"s{k}.raw").write_bytes(voxels[k].tobytes())
    (tmp_path / "LISTING.raw").write_bytes(voxels.tobytes())
    refused = {"subdim.mhd": (base + "ElementDataFile = s%d.raw 0 1 1 2\n", "a part ITK misreads"),
               "whole.mhd": (base + "ElementDataFile = LIST 3D\nLISTING.raw\n", "a part ITK misreads"),
               "listing.mhd": (base + "ElementDataFile = LISTING.raw\n", "starts with LIST"),
               "ndims.mhd": (base.replace("NDims = 3", "NDims = -3") + "ElementDataFile = list.raw\n",
                             "NDims = -3 in its header, not a number of dimensions"),
               "huge.mhd": (base + "ElementDataFile = s%d.raw 0 99999999999999999999999 1\n", "too many data files")}
    for name, (text, said) in refused.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=re.escape(said)):
            read_image(tmp_path / name)
    # MetaImage's DistanceUnits; a NRRD axis of no unit makes the units unknown
    (tmp_path / "um.mhd").write_text(base + "DistanceUnits = um\nElementDataFile = list.raw\n")
    meta = read_geometry(tmp_path / "um.mhd")
    assert meta["spacing_unit"] == "um"
    np.testing.assert_allclose(meta["spacing"], [0.5, 0.5, 2.0])  # (z, y, x) of ElementSpacing x y z
    path = _nrrd(tmp_path / "u.nrrd", voxels)
    path.write_bytes(path.read_bytes().replace(b"encoding: raw\n", b'encoding: raw\nspace units: "cm" "" "cm"\n'))
    assert read_geometry(path)["spacing_unit"] == "pixel"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_written_masks_read_back_by_itk_and_medseg(tmp_path, suffix):
    """Every value type a mask or probability map takes, 2D and 3D, an oblique grid, micrometres and no
    pixel size: ITK reads back the values and the grid written; medseg the unit; nothing partial is left."""
    import itk

    from medseg.itkfiles import Geometry, write_image

    a, b = np.radians(25), np.radians(-15)
    turn = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]) @ \
        np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rng = np.random.default_rng(3)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535), (np.uint32, 2**32 - 1), (np.float32, 1.0)):
        values = (rng.random((3, 5, 7)) * top).astype(dtype)
        values.flat[0] = top
        geometry = Geometry((0.7, 0.35, 2.5), (-10.5, 3.25, 100.0), turn, "mm")
        path = write_image(tmp_path / f"v{suffix}", values, geometry)
        image = itk.imread(str(path))
        got = itk.array_from_image(image)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, values)
        np.testing.assert_allclose(np.asarray(itk.spacing(image)), geometry.spacing, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(itk.origin(image)), geometry.origin, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(image.GetDirection()), turn, atol=1e-12)
        meta = read_geometry(path)
        assert meta["spacing_unit"] == "mm"
        np.testing.assert_allclose(meta["spacing"], [2.5, 0.35, 0.7])
    plane = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = write_image(tmp_path / f"p{suffix}", plane, Geometry((0.5, 0.25), (1.0, 2.0), np.eye(2), "um"))
    image = itk.imread(str(path))
    assert image.GetImageDimension() == 2 and list(itk.spacing(image)) == [0.5, 0.25]
    np.testing.assert_array_equal(itk.array_from_image(image), plane)
    meta = read_geometry(path)
    assert meta["spacing_unit"] == "um" and list(meta["spacing"][1:]) == [0.25, 0.5]
    path = write_image(tmp_path / f"n{suffix}", plane, None)  # a picture's pixels: no pixel size stated
    assert read_geometry(path)["spacing_unit"] == "pixel"
    np.testing.assert_array_equal(read_image(path)[0][0, 0], plane)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}{suffix}" for n in "vpn")


def test_other_inputs_written_as_nrrd_or_metaimage_lie_where_their_nifti_masks_do(tmp_path, tiny_checkpoint):
    """--format nrrd / metaimage for a DICOM series, a calibrated TIFF stack and a PNG: ITK reads the masks on
    the grid of the NIfTI masks of the same inputs (the TIFF's in mm), the PNG's without a pixel size; a time
    series is refused in one line and the others are written."""
    import itk
    import tifffile
    from conftest import write_dicom_series
    from PIL import Image

    root = tmp_path / "in"
    write_dicom_series(root / "ct", n=3, size=32)
    image, _ = synthetic_em(size=32, seed=2)
    Image.fromarray(image).save(root / "slice.png")
    tifffile.imwrite(root / "stack.tif", np.stack([image, image[::-1]]), imagej=True, resolution=(4, 2),
                     metadata={"axes": "ZYX", "unit": "micron", "spacing": 1.5})
    tifffile.imwrite(root / "lapse.tif", np.stack([image, image[:, ::-1]]), imagej=True,
                     metadata={"axes": "TYX"})
    runner = CliRunner()

    def infer(out: Path, fmt: str):
        args = ["infer", BUNDLE, root, out, "--checkpoint", tiny_checkpoint, "--no-progress", "--device", "cpu",
                "--format", fmt] + [a for item in TINY_NET for a in ("--set", item)]
        return runner.invoke(app, [str(a) for a in args])

    assert infer(tmp_path / "nii", "nifti").exit_code == 0
    for fmt, suffix in (("nrrd", ".nrrd"), ("metaimage", ".mha")):
        result = infer(tmp_path / fmt, fmt)
        assert result.exit_code == 1
        lapse = [line for line in result.output.splitlines() if "lapse.tif" in line]
        assert len(lapse) == 1 and "a time series" in lapse[0] and "--format tiff or nifti" in lapse[0], lapse
        assert not (tmp_path / fmt / "mask" / f"lapse{suffix}").exists()
        for name in ("ct", "stack", "slice"):
            for kind in ("mask", "prob"):
                got = itk.imread(str(tmp_path / fmt / kind / f"{name}{suffix}"))
                ref = itk.imread(str(tmp_path / "nii" / kind / f"{name}.nii.gz"))
                values, want = itk.array_from_image(got), itk.array_from_image(ref)
                if name == "slice":  # a 2D picture: a 2D mask, no pixel size
                    assert got.GetImageDimension() == 2 and want.shape == (32, 32)
                    assert read_geometry(tmp_path / fmt / kind / f"slice{suffix}")["spacing_unit"] == "pixel"
                    np.testing.assert_allclose(values, want, atol=1e-6)
                    continue
                np.testing.assert_allclose(values, want, atol=1e-6)
                np.testing.assert_allclose(np.asarray(itk.spacing(got)), itk.spacing(ref), rtol=1e-6)
                np.testing.assert_allclose(np.asarray(itk.origin(got)), itk.origin(ref), atol=1e-6)
                np.testing.assert_allclose(np.asarray(got.GetDirection()), np.asarray(ref.GetDirection()),
                                           atol=1e-9)
        meta = read_geometry(tmp_path / fmt / "mask" / f"stack{suffix}")  # micrometres written as mm, as ITK
        assert meta["spacing_unit"] == "mm"  # reads the NIfTI mask
        np.testing.assert_allclose(meta["spacing"], [1.5e-3, 0.5e-3, 0.25e-3])


_VOLUME = np.stack([synthetic_em(size=32, seed=s)[0] for s in (1, 2, 3)])  # (Z, Y, X)


def _tilted_series(folder: Path) -> str:
    from conftest import write_dicom_slice

    tan = np.tan(np.radians(15))
    for k in range(3):
        write_dicom_slice(folder / "tilt" / f"IM{k}.dcm", _VOLUME[k].astype(np.int16), series_uid="1.2.3.78",
                          position=(0.0, 2.0 * tan * k, 2.0 * k), instance=k + 1)
    return "tilt"


def _oblique_series(folder: Path) -> str:
    """Turned 30° about z and 20° about x, its orientation and positions written to 6 digits, as DICOM
    writers round them: ITK takes the normal as the row and column's cross product, not from the positions."""
    from conftest import write_dicom_slice

    a, b = np.radians(30), np.radians(20)
    turn = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]) @ \
        np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    row, col, normal = turn[:, 0], turn[:, 1], turn[:, 2]
    for k in range(3):
        position = np.array([-20.123456, 10.654321, 5.111111]) + 2.345678 * k * normal
        write_dicom_slice(folder / "oblique" / f"IM{k}.dcm", _VOLUME[k].astype(np.int16), series_uid="1.2.3.79",
                          position=tuple(position), orientation=(*row, *col), instance=k + 1)
    return "oblique"


def _nifti(folder: Path, name: str, affine: np.ndarray, unit: str = "mm", codes: tuple[int, int] = (1, 1),
           qform: np.ndarray | None = None) -> str:
    image = nib.Nifti1Image(_VOLUME.transpose(2, 1, 0), None)
    image.header.set_zooms(tuple(float(z) or 1.0 for z in np.linalg.norm(affine[:3, :3], axis=0)))
    image.header.set_xyzt_units(unit)
    image.set_sform(affine, code=codes[0])
    image.set_qform(None if codes[1] == 0 and qform is None else affine if qform is None else qform, code=codes[1])
    nib.save(image, folder / name)
    return name


def _turned(degrees: float, zooms: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    a = np.radians(degrees)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def _nrrd_in(folder: Path, name: str, units: str) -> str:
    header = ("NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\nsizes: 32 32 3\n"
              "space directions: (0.03,0,0) (0,0.04,0) (0,0,0.12)\nspace origin: (5,6,7)\n"
              f"space units: {units}\nendian: little\nencoding: raw\n\n")
    (folder / name).write_bytes(header.encode() + _VOLUME.tobytes())
    return name


def _nrrd_in_cm(folder: Path) -> str:
    return _nrrd_in(folder, "cm.nrrd", '"cm" "cm" "cm"')


PLACES = {  # input -> a function writing it into a folder, returning its name there
    "nifti_um": lambda d: _nifti(d, "um.nii.gz", np.diag([0.25, 0.25, 1.5, 1]), unit="micron"),
    "nifti_m": lambda d: _nifti(d, "m.nii.gz", np.diag([0.001, 0.001, 0.002, 1]), unit="meter"),
    "nifti_2d": lambda d: (nib.save(nib.Nifti1Image(_VOLUME[0].T.copy(), np.diag([0.5, 0.7, 1, 1])), d / "flat.nii"),
                           "flat.nii")[1],
    # ITK takes the qform where the sform is "aligned" and the qform "scanner", and neither where both are 0
    "nifti_qform": lambda d: _nifti(d, "q.nii.gz", _turned(30, (0.8, 0.9, 2), (4, 5, 6)), codes=(2, 1),
                                    qform=np.diag([0.8, 0.9, 2, 1])),
    "nifti_no_codes": lambda d: _nifti(d, "none.nii.gz", _turned(30, (0.8, 0.9, 2), (4, 5, 6)), codes=(0, 0)),
    "tiff_cm": lambda d: (tifffile_imwrite(d / "cm.tif", _VOLUME[0], resolution=(100, 50),
                                           resolutionunit="CENTIMETER"), "cm.tif")[1],
    "nrrd_cm": _nrrd_in_cm,
    "nrrd_micrometre_sign": lambda d: _nrrd_in(d, "mu.nrrd", '"µm" "µm" "µm"'),  # written "um": headers are ASCII
    "nrrd_mixed_units": lambda d: _nrrd_in(d, "mixed.nrrd", '"mm" "cm" "mm"'),
    "dicom_tilted": _tilted_series,
    "dicom_oblique": _oblique_series,
    "nifti_negative_pixdim": lambda d: _negative_pixdim(d),
    "nifti_scales_differ": lambda d: _nifti(d, "sd.nii.gz", _turned(20, (0.8, 0.9, 2), (4, 5, 6)), codes=(1, 1),
                                            qform=np.diag([0.5, 0.5, 1, 1])),
}


def _negative_pixdim(folder: Path) -> str:
    """No qform or sform (codes 0): ITK places the voxels by pixdim alone, here a negative one."""
    _nifti(folder, "neg.nii", np.diag([0.5, 0.6, 1.0, 1]), codes=(0, 0))
    raw = bytearray((folder / "neg.nii").read_bytes())
    raw[84:88] = np.float32(-0.6).tobytes()  # pixdim[2]
    (folder / "neg.nii").write_bytes(bytes(raw))
    return "neg.nii"


def tifffile_imwrite(*args, **kwargs):
    import tifffile

    return tifffile.imwrite(*args, **kwargs)


def _placed(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import itk

    image = itk.imread(str(path), itk.F)
    return (np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin()),
            itk.array_from_matrix(image.GetDirection()))


@pytest.mark.parametrize("kind", sorted(PLACES))
def test_nrrd_and_metaimage_masks_lie_where_itk_places_the_input(tmp_path, tiny_checkpoint, kind, capfd):
    """3D Slicer places an image as ITK reads it: a NRRD or MetaImage mask read by ITK must lie on the input as
    ITK reads it (units ITK converts or ignores, the qform ITK takes over the sform, a tilted series stacked
    straight), and where the NIfTI mask lies."""
    root = tmp_path / "in"
    root.mkdir()
    name = PLACES[kind](root)
    stem = name.split(".")[0]
    runner = CliRunner()
    for fmt in ("nrrd", "metaimage", "nifti"):
        args = ["infer", BUNDLE, root, tmp_path / fmt, "--checkpoint", tiny_checkpoint, "--no-progress", "--device",
                "cpu", "--no-tta", "--format", fmt] + [a for item in TINY_NET for a in ("--set", item)]
        capfd.readouterr()
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert "WARNING" not in capfd.readouterr().err  # ITK's own words (a sform's scales) not on the console
    references = [_placed(root / name)]
    # a NIfTI holds mm (or µm, m): ITK reads a NRRD's numbers in cm as mm, its NIfTI mask in mm, 10 times as
    # large; the NIfTI mask of a NIfTI without codes has a positive pixdim where its input's was negative
    if not kind.startswith("nrrd") and kind != "nifti_negative_pixdim":
        references.append(_placed(tmp_path / "nifti" / "mask" / f"{stem}.nii.gz"))
    for fmt, suffix in (("nrrd", ".nrrd"), ("metaimage", ".mha")):
        got = _placed(tmp_path / fmt / "mask" / f"{stem}{suffix}")
        assert (got[0] > 0).all(), (fmt, got[0])  # a pixel size, a turned axis in the direction
        for i, (spacing, origin, direction) in enumerate(references):
            assert len(got[0]) == len(spacing), (fmt, got[0], spacing)
            if (spacing < 0).any():  # ITK reads a NIfTI's negative pixdim as a negative spacing: the same axes
                spacing, direction = np.abs(spacing), direction * np.sign(spacing)
            np.testing.assert_allclose(got[0], spacing, rtol=1e-5, err_msg=f"{fmt} spacing")
            np.testing.assert_allclose(got[1], origin, atol=1e-4, err_msg=f"{fmt} origin")
            # against the series itself within ITK's own tolerance for one space (the NIfTI mask's qform takes
            # the normal from the rounded slice positions: 3e-6 off for the oblique series)
            np.testing.assert_allclose(got[2], direction, atol=1e-6 if i == 0 else 1e-5, err_msg=f"{fmt} direction")
    if kind.startswith("nrrd"):  # the header's numbers and unit kept: medseg reads the mask as it reads the input
        for fmt, suffix in (("nrrd", ".nrrd"), ("metaimage", ".mha")):
            mask, source = read_geometry(tmp_path / fmt / "mask" / f"{stem}{suffix}"), read_geometry(root / name)
            np.testing.assert_allclose(mask["affine"], source["affine"])
            assert mask["spacing_unit"] == source["spacing_unit"] == {"nrrd_cm": "mm", "nrrd_mixed_units": "pixel",
                                                                      "nrrd_micrometre_sign": "um"}[kind]


def test_an_imagej_slice_spacing_of_zero_is_none(tmp_path):
    """ImageJ's ``spacing=0`` is no slice spacing (1 in its unit), not a 0 that no NIfTI, NRRD or MetaImage
    mask can hold; a negative one is its size."""
    import tifffile

    tifffile.imwrite(tmp_path / "z.tif", _VOLUME, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 0.0})
    np.testing.assert_allclose(read_geometry(tmp_path / "z.tif")["spacing"], [1.0, 0.25, 0.25])
    tifffile.imwrite(tmp_path / "n.tif", _VOLUME, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": -2.5})  # ImageJ takes a negative depth
    np.testing.assert_allclose(read_geometry(tmp_path / "n.tif")["spacing"], [2.5, 0.25, 0.25])


def test_a_nifti_placed_nowhere_usable_is_one_line_for_nrrd_and_still_nifti(tmp_path, tiny_checkpoint):
    """A sform with an infinity (ITK reading it never returned) or an axis of size 0: a NRRD or MetaImage mask
    is refused in one line; the NIfTI mask keeps the input's sform (no qform, which a flat affine has not,
    unless the input has one of its own); a NaN in the sform is refused in one line for NIfTI too."""
    import struct

    root = tmp_path / "in"
    root.mkdir()
    flat = np.diag([0.8, 0.9, 2.0, 1.0])
    flat[:3, 2] = 0
    _nifti(root, "flat.nii", flat, codes=(1, 0))
    _nifti(root, "inf.nii", _turned(20, (0.8, 0.9, 2), (4, 5, 6)), codes=(1, 0))
    raw = bytearray((root / "inf.nii").read_bytes())
    raw[308:312] = struct.pack("<f", np.inf)  # srow_y's offset
    (root / "inf.nii").write_bytes(bytes(raw))
    runner = CliRunner()

    def infer(fmt: str):
        args = ["infer", BUNDLE, root, tmp_path / fmt, "--checkpoint", tiny_checkpoint, "--no-progress", "--device",
                "cpu", "--no-tta", "--format", fmt] + [a for item in TINY_NET for a in ("--set", item)]
        return runner.invoke(app, [str(a) for a in args])

    for fmt in ("nrrd", "metaimage"):
        result = infer(fmt)
        assert result.exit_code == 1
        for name in ("flat.nii", "inf.nii"):
            lines = [line for line in result.output.splitlines() if name in line and "failed" in line]
            assert len(lines) == 1 and "places it nowhere usable" in lines[0], result.output
    _nifti(root, "flat_q.nii", flat, codes=(1, 1), qform=np.diag([0.8, 0.9, 2.0, 1.0]))  # a qform of its own
    _nifti(root, "nan.nii", _turned(20, (0.8, 0.9, 2), (4, 5, 6)), codes=(1, 0))
    raw = bytearray((root / "nan.nii").read_bytes())
    raw[316:320] = struct.pack("<f", np.nan)  # srow_z's offset
    (root / "nan.nii").write_bytes(bytes(raw))
    result = infer("nifti")
    mask = nib.load(tmp_path / "nifti" / "mask" / "flat.nii.gz")
    np.testing.assert_allclose(mask.affine, flat)
    assert (int(mask.header["sform_code"]), int(mask.header["qform_code"])) == (1, 0)
    assert all(z > 0 for z in mask.header["pixdim"][1:4])  # no pixdim 0 for readers to complain of
    mask = nib.load(tmp_path / "nifti" / "mask" / "flat_q.nii.gz")
    assert (int(mask.header["sform_code"]), int(mask.header["qform_code"])) == (1, 1)
    np.testing.assert_allclose(mask.get_qform(), np.diag([0.8, 0.9, 2.0, 1.0]), atol=1e-6)
    assert "flat.nii" not in result.output and "flat_q.nii" not in result.output
    lines = [line for line in result.output.splitlines() if "nan.nii" in line]
    assert len(lines) == 1 and "its affine holds values that are not numbers" in lines[0], result.output


def test_nrrd_per_axis_units_are_read(tmp_path):
    """NRRD's per-axis ``units`` (with ``spacings``, no ``space``) give the unit too."""
    header = ('NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\nspacings: 0.5 0.25 2\nunits: "um" "um" "um"\n'
              "encoding: raw\n\n")
    (tmp_path / "u.nrrd").write_bytes(header.encode() + bytes(24))
    meta = read_geometry(tmp_path / "u.nrrd")
    assert meta["spacing_unit"] == "um"
    np.testing.assert_allclose(meta["spacing"], [2.0, 0.25, 0.5])
