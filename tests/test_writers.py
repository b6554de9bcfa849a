"""What SaveSegmentationd and the atomic writers put on disk: slice order, threshold and channel, no partial
files; checked with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.errors import DataError
from medseg.writers import SaveSegmentationd


def _nifti(tmp_path, z=3):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 6, z), np.int16), np.diag([0.5, 0.7, 2.0, 1.0])), tmp_path / "v.nii.gz")
    return tmp_path / "v.nii.gz"


def _feed(w, src, values, fmt):
    for z, v in enumerate(values):
        p1 = np.full((6, 8), v, np.float32)
        w({"pred": np.stack([1 - p1, p1]), "name": "v", "page": z, "pages": len(values), "image": str(src),
           "format": fmt})


def test_volume_slices_keep_their_order(tmp_path):
    # the fixtures' volumes were symmetric, so masks written in reverse slice order went unnoticed
    import nibabel as nib

    src = _nifti(tmp_path)
    _feed(SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out")), src, [0.1, 0.6, 0.9], "nifti")
    prob = np.asarray(nib.load(tmp_path / "out" / "prob" / "v.nii.gz").dataobj)
    np.testing.assert_allclose(prob[0, 0, :], [0.1, 0.6, 0.9], atol=1e-6)
    mask = np.asarray(nib.load(tmp_path / "out" / "mask" / "v.nii.gz").dataobj)
    assert mask[0, 0, :].tolist() == [0, 1, 1]


def test_threshold_and_channel_are_used(tmp_path):
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "a.png")
    pred = np.stack([np.full((6, 8), 0.4, np.float32), np.full((6, 8), 0.6, np.float32)])
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o1"), threshold=0.7, save_prob=False)
    w({"pred": pred, "name": "a", "image": str(tmp_path / "a.png"), "format": "png"})
    assert np.asarray(Image.open(tmp_path / "o1" / "mask" / "a.png")).max() == 0
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o2"), channel=0, save_prob=False)
    w({"pred": pred[::-1].copy(), "name": "a", "image": str(tmp_path / "a.png"), "format": "png"})
    assert np.asarray(Image.open(tmp_path / "o2" / "mask" / "a.png")).min() == 255


def test_a_sample_without_a_name_is_written_under_its_file_stem(tmp_path):
    # MONAI users apply a bundle's postprocessing to {"image": path, ...}; only medseg's slice list names samples
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "Cells.01.PNG")
    p1 = np.full((6, 8), 0.9, np.float32)
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"), save_prob=False)
    w({"pred": np.stack([1 - p1, p1]), "image": str(tmp_path / "Cells.01.PNG")})
    assert np.asarray(Image.open(tmp_path / "o" / "mask" / "Cells.01.png")).min() == 255
    # another file of the same stem would write over it: refused, not silently
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "b" / "Cells.01.PNG")
    with pytest.raises(DataError, match=r"Cells\.01\.PNG: its outputs would replace those of .*Cells\.01\.PNG"):
        w({"pred": np.stack([p1, 1 - p1]), "image": str(tmp_path / "b" / "Cells.01.PNG")})
    assert np.asarray(Image.open(tmp_path / "o" / "mask" / "Cells.01.png")).min() == 255


def test_binary_threshold_is_strict(tmp_path):
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "a.png")
    p1 = np.full((6, 8), 0.5, np.float32)
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"), save_prob=False)
    w({"pred": np.stack([1 - p1, p1]), "name": "a", "image": str(tmp_path / "a.png"), "format": "png"})
    assert np.asarray(Image.open(tmp_path / "o" / "mask" / "a.png")).max() == 0


def test_aborted_tiff_stack_leaves_no_temporary_file(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 6, 8), np.uint8), photometric="minisblack")
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"))
    p1 = np.full((6, 8), 0.6, np.float32)
    w({"pred": np.stack([1 - p1, p1]), "name": "s", "page": 0, "pages": 3, "image": str(tmp_path / "s.tif"),
       "format": "tiff"})
    w.abort()
    assert [p for p in (tmp_path / "o").rglob("*") if p.is_file()] == []


def test_a_stack_aborted_after_a_failed_write_leaves_no_file_and_raises_nothing(tmp_path, monkeypatch):
    # the probability pages are written contiguously, their directories on closing: after a full disk that
    # write fails again, and the abort raised it, leaving the partial file and the other outputs unclosed
    import errno

    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 6, 8), np.uint8), photometric="minisblack")
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"))
    p1 = np.full((6, 8), 0.6, np.float32)
    w({"pred": np.stack([1 - p1, p1]), "name": "s", "page": 0, "pages": 3, "image": str(tmp_path / "s.tif"),
       "format": "tiff"})

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "close", full)
    w.abort()
    assert [p for p in (tmp_path / "o").rglob("*") if p.is_file()] == []


def test_single_dicom_slice_to_nifti_keeps_its_pixel_spacing(tmp_path):
    import nibabel as nib
    from conftest import write_dicom_slice

    src = write_dicom_slice(tmp_path / "one.dcm", np.zeros((6, 8), np.int16), series_uid="1.2.9",
                            position=(0, 0, 0), spacing=(0.5, 0.8))  # rows 0.5 apart, columns 0.8 apart
    p1 = np.full((6, 8), 0.6, np.float32)
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"), output_format="nifti", save_prob=False)
    w({"pred": np.stack([1 - p1, p1]), "name": "one", "image": str(src), "format": "dicom"})
    img = nib.load(tmp_path / "o" / "mask" / "one.nii.gz")
    assert img.shape[:2] == (8, 6)
    np.testing.assert_allclose(img.header.get_zooms()[:2], (0.8, 0.5))


@pytest.mark.parametrize("writer", ["png", "tiff"])
def test_writers_are_atomic_when_the_encoder_fails(tmp_path, monkeypatch, writer):
    import tifffile
    from PIL import Image as PILImage

    from medseg import io

    def broken(*a, **k):
        target = a[1] if writer == "png" else a[0]
        Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    if writer == "png":
        monkeypatch.setattr(PILImage.Image, "save", broken)
    else:
        monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError):
        getattr(io, f"write_{writer}")(tmp_path / f"m.{writer}", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    from medseg import batch

    rows = [batch.ManifestRow(input="/x/a.png", status="ok")]
    batch.write_manifest(tmp_path / "manifest.csv", rows)
    before = (tmp_path / "manifest.csv").read_bytes()
    real = Path.write_text

    def broken(self, data, *a, **k):
        real(self, data[:10], *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError):
        batch.write_manifest(tmp_path / "manifest.csv", rows * 2)
    assert (tmp_path / "manifest.csv").read_bytes() == before


def test_a_volume_asked_for_as_png_becomes_a_calibrated_tiff_stack(tmp_path):
    """A PNG holds one slice: a 3-slice NIfTI written with ``output_format="png"`` gives one TIFF stack of 3
    pages per output; the ImageJ description (unit, slice spacing) is on the first page only."""
    import nibabel as nib
    import tifffile

    img = nib.Nifti1Image(np.zeros((8, 6, 3), np.int16), np.diag([0.5, 0.7, 2.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp_path / "v.nii.gz")
    src = tmp_path / "v.nii.gz"
    w = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), output_format="png")
    assert set(w.paths_for("v", "nifti", 3).values()) == {tmp_path / "out" / "mask" / "v.tif",
                                                         tmp_path / "out" / "prob" / "v.tif"}
    assert w.paths_for("v", "nifti", 1)["mask"].name == "v.png"  # one slice stays a PNG
    _feed(w, src, [0.1, 0.6, 0.9], "nifti")
    assert not list((tmp_path / "out").rglob("*.png"))
    with tifffile.TiffFile(tmp_path / "out" / "mask" / "v.tif") as tif:
        assert len(tif.pages) == 3 and tif.imagej_metadata["spacing"] == pytest.approx(2000)  # µm
        assert [int(p.asarray().max()) for p in tif.pages] == [0, 255, 255]
        assert all("ImageDescription" not in p.tags for p in tif.pages[1:])
    prob = tifffile.imread(tmp_path / "out" / "prob" / "v.tif")
    assert prob.shape == (3, 6, 8) and prob.dtype == np.float32
    np.testing.assert_allclose(prob[:, 0, 0], [0.1, 0.6, 0.9], atol=1e-6)


def test_writer_settings_are_checked_when_it_is_built(tmp_path):
    from medseg.errors import DataError

    assert SaveSegmentationd(keys="pred", output_dir=str(tmp_path), save_prob="false").save_prob is False
    with pytest.raises(DataError, match="unknown output format 'jpeg'; choose auto, png"):
        SaveSegmentationd(keys="pred", output_dir=str(tmp_path), output_format="jpeg")


def test_ome_xml_states_only_what_it_is_given(tmp_path):
    import tifffile

    from medseg.io import ome_description, write_tiff

    # uncalibrated: the axes, no pixel size; an axis OME has no name for: no OME-XML rather than a wrong one
    write_tiff(tmp_path / "a.ome.tif", np.zeros((4, 5), np.uint16), (1.0, 1.0), "pixel", ome=True)
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "YX" and "PhysicalSize" not in tif.ome_metadata
    assert ome_description(np.uint8, (4, 5), (2.0, 1.0, 1.0), "um", lead=(("I", 2),)) is None
    # positions (Q: several series of one file) would be held as time points or channels by OME: not stated
    assert ome_description(np.uint8, (4, 5), (2.0, 1.0, 1.0), "um", lead=(("T", 3), ("Q", 2))) is None
    # a time step in a unit OME does not know is left out; the pixel size in mm is written in µm
    xml = ome_description(np.uint8, (4, 5), (2.0, 0.5, 0.25), "mm", lead=(("T", 3),), frame_interval=(2.0, "fortnight"))
    assert 'PhysicalSizeX="250.0"' in xml.decode() and "TimeIncrement" not in xml.decode()
    assert "PhysicalSizeZ" not in xml.decode()  # no Z axis
