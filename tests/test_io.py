"""Writing result files: atomic outputs, permissions, TIFF compression and calibration, NIfTI."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from medseg.io import atomic_output, remove_partial_files, write_nifti, write_png, write_tiff
from medseg.readers import read_geometry, read_image


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_atomic_write_names_the_file_meant(tmp_path):
    # a full disk raised without a file name, or with the temporary one: the error named no file the user knows
    import errno

    target = tmp_path / "history.json"
    with pytest.raises(OSError) as caught, atomic_output(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{target}'"
    with pytest.raises(OSError) as caught, atomic_output(target):
        raise OSError("cannot write mode F as PNG")  # no errno: its words are kept as they are
    assert str(caught.value) == "cannot write mode F as PNG"
    (tmp_path / "taken.png").mkdir()  # os.replace onto a folder names both ends, the same path once here
    with pytest.raises(OSError) as caught, atomic_output(tmp_path / "taken.png") as tmp:
        tmp.write_bytes(b"x")
    assert caught.value.filename == str(tmp_path / "taken.png")
    assert caught.value.filename2 in (None, str(tmp)) and not list(tmp_path.glob(".*"))
    assert str(caught.value) == f"[Errno {errno.EISDIR}] Is a directory: '{tmp_path / 'taken.png'}'"  # no "-> None"
    assert isinstance(caught.value, IsADirectoryError)


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


def test_tiff_keeps_micrometre_calibration(tmp_path):
    write_tiff(tmp_path / "cal.tif", np.zeros((2, 8, 8), np.uint8), spacing=(1.0, 0.25, 0.5), unit="um")
    meta = read_geometry(tmp_path / "cal.tif")
    assert meta["spacing_unit"] == "um"
    np.testing.assert_allclose(meta["spacing"][1:], [0.25, 0.5])


def test_tiff_stack_keeps_its_slice_spacing_and_millimetres_become_micrometres(tmp_path):
    write_tiff(tmp_path / "stack.tif", np.zeros((3, 8, 8), np.uint8), spacing=(2.5, 0.5, 0.25), unit="um")
    meta = read_geometry(tmp_path / "stack.tif")
    assert meta["spacing_unit"] == "um" and meta["slice_count"] == 3
    np.testing.assert_allclose(meta["spacing"], [2.5, 0.5, 0.25])
    with tifffile.TiffFile(tmp_path / "stack.tif") as tif:  # as ImageJ writes a calibrated stack
        assert tif.imagej_metadata["unit"] == "micron" and tif.imagej_metadata["spacing"] == 2.5
    write_tiff(tmp_path / "ct.tif", np.zeros((8, 8), np.uint8), spacing=(0.8, 0.7), unit="mm")
    np.testing.assert_allclose(read_geometry(tmp_path / "ct.tif")["spacing"], [800.0, 700.0])
    write_tiff(tmp_path / "px.tif", np.zeros((8, 8), np.uint8), spacing=(2.0, 2.0), unit="pixel")
    assert read_geometry(tmp_path / "px.tif")["spacing_unit"] == "pixel"


def test_nifti_gz_written_atomically_with_affine(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_nifti(tmp_path / "v.nii.gz", data, affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]  # no temporary file left
    arr, meta = read_image(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(arr[0], data.transpose(2, 1, 0))
    np.testing.assert_allclose(meta["nifti_affine"], affine)


def test_a_pixel_size_in_metres_or_nanometres_reaches_a_tiff(tmp_path):
    # a NIfTI in metres lost its pixel size when its mask was written as TIFF (only um and mm were known)
    from medseg.io import tiff_calibration

    assert tiff_calibration((1e-4, 2e-4), "meter") == tiff_calibration((100.0, 200.0), "um")
    assert tiff_calibration((5.0, 5.0), "nm") == tiff_calibration((0.005, 0.005), "um")
    write_tiff(tmp_path / "m.tif", np.zeros((4, 4), np.uint8), spacing=(1e-4, 1e-4), unit="meter")
    np.testing.assert_allclose(read_geometry(tmp_path / "m.tif")["spacing"], [100.0, 100.0])


def test_a_nifti_longer_than_nifti1_allows_is_written_as_nifti2(tmp_path):
    # a 35,000-pixel line scan failed after its inference: "shape ... does not fit in dim datatype"
    import nibabel as nib

    data = np.zeros((35000, 2, 1), np.uint8)
    data[34999, 1, 0] = 7
    write_nifti(tmp_path / "wide.nii.gz", data, np.eye(4))
    back = nib.load(tmp_path / "wide.nii.gz")
    assert isinstance(back, nib.Nifti2Image) and back.shape == (35000, 2, 1) and back.get_fdata()[34999, 1, 0] == 7
    write_nifti(tmp_path / "small.nii.gz", data[:10], np.eye(4))
    assert type(nib.load(tmp_path / "small.nii.gz")) is nib.Nifti1Image


def test_the_longest_legal_name_is_written(tmp_path):
    # the temporary name once added 10 characters to the final one, so names of 246-255 characters failed
    path = tmp_path / ("L" * 251 + ".png")
    write_png(path, np.zeros((3, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with atomic_output(tmp_path / ("n" * 248 + ".nii.gz")) as tmp:
        assert len(tmp.name) <= 255 and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert len(list(tmp_path.iterdir())) == 2


def test_partial_files_of_a_killed_write_are_recognised_and_nothing_else(tmp_path):
    (tmp_path / "sub").mkdir()
    with atomic_output(tmp_path / "sub" / "a.tif") as tmp:  # the name a write in progress has
        partial = tmp.read_bytes(), tmp.name
    (tmp_path / "sub" / "a.tif").unlink()
    kept = [".hidden.png", "a.png", ".a.png.part", ".notes.abcdefgh.txt", "x.abcd1234.part.png"]
    for name in kept:
        (tmp_path / name).write_bytes(b"mine")
    for name in (partial[1], ".b.k2j_9x0a.part.nii.gz", ".c.zzzzzzzz.part.seg.dcm"):
        (tmp_path / "sub" / name).write_bytes(b"half")
    assert remove_partial_files(tmp_path) == 0  # not recursive: sub/ untouched
    assert remove_partial_files(tmp_path, recursive=True) == 3
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
