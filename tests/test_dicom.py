"""DICOM: series grouping and spatial ordering, rescale to HU, geometry against a reference NIfTI, DICOM SEG."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series, write_dicom_slice

from medseg import dicom
from medseg.errors import DataError
from medseg.readers import count_slices, read_geometry, read_image, read_slice


def _as_nifti(arr: np.ndarray, meta: dict) -> nib.Nifti1Image:
    """Our (Z, Y, X) volume as a NIfTI image in (X, Y, Z) order with the matching affine."""
    return nib.Nifti1Image(arr.transpose(2, 1, 0), meta["affine"][:, [2, 1, 0, 3]])


def test_mr_series_matches_the_reference_nifti_voxel_for_voxel(shared_dicom):
    arr, meta = read_image(shared_dicom / "series_mr_4slice")
    assert arr.shape == (1, 4, 256, 256) and meta["format"] == "dicom" and len(meta["sop_uids"]) == 4
    reference = nib.as_closest_canonical(nib.load(shared_dicom / "series_mr_4slice_reference.nii.gz"))
    ours = nib.as_closest_canonical(_as_nifti(arr[0], meta))
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)  # same place in the scanner (oblique)
    np.testing.assert_allclose(meta["spacing"], [1.0, 1.0, 1.0], atol=1e-4)


def test_ct_series_in_hounsfield_units(shared_dicom):
    import pydicom

    folder = shared_dicom / "series_ct_3slice"
    arr, meta = read_image(folder)
    assert arr.shape == (1, 3, 512, 512) and arr.dtype == np.float32
    raw = {str(ds.SOPInstanceUID): ds.pixel_array for ds in (pydicom.dcmread(p) for p in folder.iterdir())}
    for k, uid in enumerate(meta["sop_uids"]):
        np.testing.assert_array_equal(arr[0, k], raw[uid].astype(np.float32) - 1024)  # slope 1, intercept -1024
    inside = arr[arr > -2000]  # -3024 pads the area outside the scanner's field of view
    assert np.mean(np.abs(inside + 1000) < 50) > 0.15  # air, about -1000 HU
    assert np.mean(np.abs(inside) < 100) > 0.3  # soft tissue and water, about 0 HU
    np.testing.assert_allclose(meta["spacing"], [1.0, 0.810547, 0.810547], atol=1e-5)
    np.testing.assert_array_equal(read_slice(folder, 1), arr[:, 1])


def test_slices_ordered_by_position_not_name_or_instance_number(tmp_path):
    folder = write_dicom_series(tmp_path / "s", n=5, step=2.5)  # names and InstanceNumbers run against position
    arr, meta = read_image(folder)
    np.testing.assert_array_equal(arr[0, :, 0, 0], [-1024, -924, -824, -724, -624])  # 100 * k - 1024
    np.testing.assert_allclose(meta["spacing"], [2.5, 0.5, 0.5])
    # index (z, y, x) -> RAS: z runs along +S (2.5 mm), x along -R... i.e. LPS x flipped
    np.testing.assert_allclose(meta["affine"] @ [2, 0, 3, 1], [-1.5, 0.0, 15.0, 1.0])


def test_monochrome1_is_inverted_alike_in_every_slice(tmp_path):
    # stored value 100 everywhere, one brighter pixel that differs per slice (a per-slice maximum would show)
    for k in range(3):
        pixels = np.full((4, 4), 100, np.int16)
        pixels[0, 0] = 200 + 100 * k
        write_dicom_slice(tmp_path / f"{k}.dcm", pixels, series_uid="1.2.3.5", position=(0.0, 0.0, float(k)),
                          photometric="MONOCHROME1", slope=2.0, intercept=10.0)
    arr, _ = read_image(tmp_path)
    # signed 16-bit: stored v -> -1 - v, then slope and intercept
    np.testing.assert_array_equal(arr[0, :, 2, 2], [2 * (-1 - 100) + 10] * 3)
    np.testing.assert_array_equal(arr[0, :, 0, 0], [2 * (-1 - v) + 10 for v in (200, 300, 400)])
    np.testing.assert_array_equal(read_slice(tmp_path, 1), arr[:, 1])


def test_oblique_sorting_uses_the_slice_normal(tmp_path):
    # rows along +y, columns along +z: the normal is +x, positions move along x only
    for k, x in enumerate([3.0, 1.0, 2.0]):
        write_dicom_slice(tmp_path / f"{k}.dcm", np.full((4, 4), int(x), np.int16), series_uid="1.2.3.4",
                          position=(x, 0.0, 0.0), orientation=(0, 1, 0, 0, 0, 1), intercept=0)
    arr, _ = read_image(tmp_path)
    np.testing.assert_array_equal(arr[0, :, 0, 0], [1, 2, 3])


def test_folder_with_two_series_is_an_error_when_read_as_one_volume(tmp_path):
    write_dicom_series(tmp_path, n=2, series_uid="1.2.3.1", series_number=1)
    write_dicom_slice(tmp_path / "other.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.2",
                      position=(0, 0, 0), series_number=2)
    with pytest.raises(DataError, match=r"folder mixes 2 DICOM series .* SeriesInstanceUID"):
        read_image(tmp_path)
    assert count_slices(tmp_path, series_uid="1.2.3.1") == 2  # picking one series works
    # two series of one number and no description were listed as "1 '', 1 ''": their files tell them apart
    (tmp_path / "other.dcm").unlink()
    write_dicom_slice(tmp_path / "other.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.2",
                      position=(0, 0, 0), series_number=1)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != "other.dcm")
    with pytest.raises(DataError, match=rf"folder mixes 2 DICOM series \((number 1 in {files[0]} and 1 more, number 1 "
                                        rf"in other\.dcm|number 1 in other\.dcm, number 1 in {files[0]} and 1 more)\)"):
        read_image(tmp_path)


def test_inconsistent_spacing_duplicates_and_no_pixels(tmp_path):
    gap = write_dicom_series(tmp_path / "gap", n=4, step=2.0)
    (gap / "IM001.dcm").unlink()  # a missing slice in the middle
    with pytest.raises(DataError, match=r"inconsistent slice spacing .* missing slices\?"):
        read_image(gap)
    dup = write_dicom_series(tmp_path / "dup", n=2)
    write_dicom_slice(dup / "copy.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.826.0.1.3680043.8.498.10",
                      position=(0.0, 0.0, 10.0))
    with pytest.raises(DataError, match="same slice position.*move the extra files out of its folder"):
        read_image(dup)
    empty = write_dicom_slice(tmp_path / "nopix.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.9",
                              position=(0, 0, 0), with_pixels=False)
    with pytest.raises(DataError, match=r"nopix\.dcm: DICOM file has no pixel data"):
        read_image(empty)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 50)
    with pytest.raises(DataError, match=r"junk\.dcm: "):
        read_image(tmp_path / "junk.dcm")


def test_multi_frame_file(tmp_path):
    frames = np.stack([np.full((6, 6), v, np.int16) for v in (5, 6, 7)])
    path = write_dicom_slice(tmp_path / "mf.dcm", frames, series_uid="1.2.5", position=(0, 0, 0), frames=3,
                             intercept=0)
    arr, meta = read_image(path)
    assert arr.shape == (1, 3, 6, 6) and meta["slice_count"] == 3
    np.testing.assert_array_equal(arr[0, :, 0, 0], [5, 6, 7])
    np.testing.assert_array_equal(read_slice(path, 2)[0], frames[2])


def test_single_files(shared_dicom):
    for name, shape in (("CT_small.dcm", (1, 1, 128, 128)), ("MR_small.dcm", (1, 1, 64, 64))):
        arr, meta = read_image(shared_dicom / "single" / name)
        assert arr.shape == shape and meta["slice_count"] == 1


def test_seg_round_trip_references_the_source(shared_dicom, tmp_path):
    import highdicom as hd

    folder = shared_dicom / "series_mr_4slice"
    arr, meta = read_image(folder)
    mask = arr[0] > np.percentile(arr, 70)
    geometry = dicom.series_geometry(dicom.find_series(folder))
    out = dicom.write_seg(tmp_path / "seg.dcm", mask, geometry, segment_label="cell interior", algorithm="isbi_em")
    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "cell interior"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == meta["series_uid"]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(meta["sop_uids"]), segment_numbers=[1])
    np.testing.assert_array_equal(back[..., 0] > 0, mask)  # each frame sits on its own source slice
    assert read_geometry(folder)["files"] == list(geometry.files)


def _seg_of_three_frames(path: Path, out: Path):
    """The SEG of a 3-frame file ``path`` whose mask differs per frame (k + 1 rows), read back; asserts that each
    SEG frame names the source frame it segments (a file without per-frame positions got none from highdicom)
    and holds that frame's mask."""
    import highdicom as hd

    geometry = dicom.series_geometry(dicom.find_series(path))
    mask = np.zeros((3, 6, 6), bool)
    for k in range(3):
        mask[k, : k + 1] = True
    seg = hd.seg.segread(dicom.write_seg(out, mask, geometry))
    source_uid = pydicom.dcmread(path).SOPInstanceUID
    back = seg.get_pixels_by_source_frame(source_uid, source_frame_numbers=[1, 2, 3], segment_numbers=[1])
    for k, frame in enumerate(geometry.frames):
        np.testing.assert_array_equal(back[frame, ..., 0] > 0, mask[k])
    return seg


@pytest.mark.parametrize("step", [None, "0.0006"], ids=["1mm", "0.6um"])
def test_seg_for_a_multi_frame_source(tmp_path, step):
    frames = np.stack([np.full((6, 6), v, np.int16) for v in (5, 6, 7)])
    path = write_dicom_slice(tmp_path / "mf.dcm", frames, series_uid="1.2.6", position=(0, 0, 0), frames=3)
    if step:  # frames under a micrometre apart are told apart too (a match to 0.001 mm named one frame twice)
        ds = pydicom.dcmread(path)
        ds.SliceThickness = ds.SpacingBetweenSlices = step
        ds.save_as(path)
    seg = _seg_of_three_frames(path, tmp_path / "seg.dcm")
    assert int(seg.NumberOfFrames) == 3 and seg.SegmentSequence[0].SegmentLabel == "foreground"


@pytest.mark.parametrize("sop_class,thickness", [("1.2.840.10008.5.1.4.1.1.7.2", True),
                                                   ("1.2.840.10008.5.1.4.1.1.7", False),
                                                   ("1.2.840.10008.5.1.4.1.1.3.1", True)],
                         ids=["secondary-capture", "single-frame-class-no-thickness", "ultrasound"])
def test_seg_for_a_multi_frame_source_with_no_place_in_space(tmp_path, sop_class, thickness):
    # a multi-frame secondary capture or ultrasound clip: no position, orientation or frame of reference.
    # highdicom builds a SEG of several frames only in a patient coordinate system, so these failed after
    # the whole inference ("Only a single frame is supported ..."); a (single-frame) Secondary Capture class
    # with frames and no SliceThickness (pydicom's own SC_rgb_rle_2frame.dcm) failed on the thickness
    frames = np.stack([np.full((6, 6), v, np.int16) for v in (5, 6, 7)])
    path = write_dicom_slice(tmp_path / "mf.dcm", frames, series_uid="1.2.7", position=None, frames=3)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    del ds.FrameOfReferenceUID
    if not thickness:
        del ds.SliceThickness
    ds.save_as(path)
    seg = _seg_of_three_frames(path, tmp_path / "seg.dcm")
    assert int(seg.NumberOfFrames) == 3 and seg.StudyInstanceUID == ds.StudyInstanceUID
    assert "ImagePositionPatient" not in pydicom.dcmread(path)  # the source file is left as it was


def test_a_seg_is_written_for_a_source_whose_dates_are_not_dates(tmp_path, caplog):
    # highdicom parses the study's dates it copies: 'notadate' stopped the SEG ("invalid literal for int()"),
    # and so did a PatientSex of 'Male' ("not a valid PatientSexValues")
    import highdicom as hd

    folder = write_dicom_series(tmp_path / "s", n=3)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyDate, ds.StudyTime, ds.PatientBirthDate, ds.PatientSex = "notadate", "2561", "1970.01.01", "Male"
        ds.save_as(path)
    geometry = dicom.series_geometry(dicom.find_series(folder))
    mask = np.zeros(geometry.shape, bool)
    mask[1, 2:5, 2:5] = True
    seg = hd.seg.segread(dicom.write_seg(tmp_path / "seg.dcm", mask, geometry))
    assert seg.StudyDate == seg.StudyTime == seg.PatientSex == "" and seg.PatientBirthDate == "19700101"  # ACR-NEMA
    folder = _edited_series(tmp_path / "old", StudyDate="2024.02.29", StudyTime="10:15:30", PatientSex="f")
    seg = _seg_of(folder, tmp_path / "old.dcm")
    assert (seg.StudyDate, seg.StudyTime, seg.PatientSex) == ("20240229", "101530", "F")  # today's forms, kept
    assert seg.StudyInstanceUID == pydicom.dcmread(sorted(folder.iterdir())[0]).StudyInstanceUID
    said = [r.getMessage() for r in caplog.records if "not a valid DICOM value" in r.getMessage()]
    assert len(said) == 1 and "PatientSex 'Male', StudyDate 'notadate', StudyTime '2561' are not" in said[0], said
    for keyword, value, valid in (("StudyDate", "20240229", True), ("StudyDate", "20230229", False),
                                  ("StudyTime", "235959.123456", True), ("StudyTime", "1230", True),
                                  ("StudyTime", "12.5", False), ("StudyDate", "2024.01.01", False),
                                  ("PatientSex", "O", True), ("PatientSex", "f", False)):
        assert dicom._valid_copied(keyword, value) is valid, (keyword, value)


def _edited_series(folder: Path, n: int = 3, **values) -> Path:
    """A series of ``n`` slices whose every file has the attributes ``values`` set (odd ones included)."""
    from pydicom import config

    write_dicom_series(folder, n=n)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        before = config.settings.writing_validation_mode
        config.settings.writing_validation_mode = config.IGNORE  # the odd values real files carry
        try:
            for keyword, value in values.items():
                if isinstance(value, bytes):  # stored as given, unparsed (what pydicom would refuse to set)
                    from pydicom.datadict import dictionary_VR, tag_for_keyword
                    from pydicom.dataelem import RawDataElement

                    tag = tag_for_keyword(keyword)
                    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
                else:
                    setattr(ds, keyword, value)
            ds.save_as(path)
        finally:
            config.settings.writing_validation_mode = before
    return folder


def _seg_of(folder: Path, out: Path):
    import highdicom as hd

    geometry = dicom.series_geometry(dicom.find_series(folder))
    mask = np.zeros(geometry.shape, bool)
    mask[0, 2:5, 2:5] = True
    return hd.seg.segread(dicom.write_seg(out, mask, geometry))


def test_a_seg_is_written_readably_for_sources_with_empty_or_odd_attributes(tmp_path):
    # an empty SliceThickness gave a SEG highdicom itself could not read back; an empty FrameOfReferenceUID
    # (type 1 in a SEG) was copied empty; a SeriesNumber near the top of its range overflowed
    seg = _seg_of(_edited_series(tmp_path / "a", SliceThickness="", FrameOfReferenceUID="", SeriesNumber=2147483000),
                  tmp_path / "a.dcm")
    assert seg.FrameOfReferenceUID and seg.SeriesNumber == 1000
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 2.0
    with pytest.raises(DataError, match=r"IM\d+\.dcm: no StudyInstanceUID, which a SEG must share"):
        _seg_of(_edited_series(tmp_path / "b", StudyInstanceUID=""), tmp_path / "b.dcm")
    # no PixelSpacing (1 mm as read) and no Modality failed with raw attribute errors
    for keyword in ("PixelSpacing", "Modality"):
        folder = write_dicom_series(tmp_path / keyword, n=2)
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(path)
            delattr(ds, keyword)
            ds.save_as(path)
        seg = _seg_of(folder, tmp_path / f"{keyword}.dcm")
        assert seg.Modality == "SEG" and len(seg.PerFrameFunctionalGroupsSequence) == 2


def test_a_slice_of_another_study_or_frame_of_reference_is_named(tmp_path):
    # highdicom said "Source images must all be part of the same series and must have the same image dimensions"
    folder = write_dicom_series(tmp_path / "s", n=3)
    path = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = "1.2.3.4.5"
    ds.save_as(path)
    with pytest.raises(DataError, match=r"its FrameOfReferenceUID differs from .*'s, so the series' slices are not"):
        _seg_of(folder, tmp_path / "seg.dcm")


def test_a_copied_file_and_a_localizer_are_named_for_what_they_are(tmp_path):
    import shutil

    folder = write_dicom_series(tmp_path / "s", n=3)
    first = sorted(folder.iterdir())[0]
    shutil.copy2(first, folder / "copy.dcm")
    with pytest.raises(DataError, match=r"the same SOPInstanceUID as .*, so a copy of that file"):
        dicom.series_geometry(dicom.find_series(folder))
    (folder / "copy.dcm").unlink()
    ds = pydicom.dcmread(first)
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]  # a sagittal plane in an axial series
    ds.save_as(first)
    with pytest.raises(DataError, match=r"mixes orientations \(a localizer\?\): give its files one by one"):
        dicom.series_geometry(dicom.find_series(folder))


def test_a_slice_of_another_pixel_size_is_refused(tmp_path):
    # one affine serves the whole series, so a slice at 0.9 mm among 0.5 mm ones was placed at the wrong scale
    folder = write_dicom_series(tmp_path / "s", n=3)
    middle = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(middle)
    ds.PixelSpacing = ["0.9", "0.9"]
    ds.save_as(middle)
    with pytest.raises(DataError, match=r"IM001\.dcm: PixelSpacing 0\.9/0\.9 differs from .*IM000\.dcm's 0\.5/0\.5; "
                                        r"the series mixes pixel sizes"):
        dicom.series_geometry(dicom.find_series(folder))
    ds.PixelSpacing = ["0.50001", "0.5"]  # rounding in the header: the same size
    ds.save_as(middle)
    assert dicom.series_geometry(dicom.find_series(folder)).spacing[1:] == (0.5, 0.5)


@pytest.mark.parametrize("charset, name, written", [
    (["", "ISO 2022 IR 87"], "ヤマダ^タロウ=山田^太郎", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),  # Japanese, as sent
    ("ISO_IR 6", "Doe^John", None),  # the default, named
    ("iso_ir 100", "Müller^Jörg", "ISO_IR 100"),
    ("ISO 2022 IR 100", "Müller^Jörg", "ISO_IR 100"),  # a single set in its code-extension form
    ("ISO_IR 192", "Müller^Jörg", "ISO_IR 192"),
])
def test_a_seg_carries_the_sources_names_whatever_its_character_set_is_called(tmp_path, charset, name, written):
    # '' first, 'ISO_IR 6', lower case and the code-extension form of one set stopped the SEG ("'' is not a valid
    # SpecificCharacterSetValues")
    folder = write_dicom_series(tmp_path / "s", n=2)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(path)
    seg = _seg_of(folder, tmp_path / "seg.dcm")
    assert str(seg.PatientName) == name
    assert (list(seg.SpecificCharacterSet) if seg.get("SpecificCharacterSet") is not None and
            not isinstance(seg.SpecificCharacterSet, str) else seg.get("SpecificCharacterSet")) == written


def test_a_character_set_highdicom_refuses_becomes_utf8_with_the_names_kept(tmp_path):
    folder = write_dicom_series(tmp_path / "s", n=2)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jörg"
        ds.save_as(path)
        raw = path.read_bytes().replace(b"ISO_IR 100", b"LATIN1_XX ")  # a term of no standard
        path.write_bytes(raw)
    seg = _seg_of(folder, tmp_path / "seg.dcm")
    assert seg.SpecificCharacterSet == "ISO_IR 192" and str(seg.PatientName) == "Müller^Jörg"


def test_malformed_geometry_is_named_by_file_and_tag(tmp_path, caplog):
    # raw TypeError/ValueError/LinAlgError ("SVD did not converge") before, naming no file
    cases = {"PixelSpacing": ("0.5", r"PixelSpacing '0.5' is not 2 numbers"),
             "ImagePositionPatient": (b"0\\0\\abc ", r"ImagePositionPatient .*abc.* is not 3 numbers"),
             "ImageOrientationPatient": (["0"] * 6, "ImageOrientationPatient '0.*' is not two perpendicular"),
             }
    for keyword, (value, message) in cases.items():
        folder = _edited_series(tmp_path / keyword, **{keyword: value})
        with pytest.raises(DataError, match=rf"IM\d+\.dcm: {message}"):
            dicom.series_geometry(dicom.find_series(folder))
    parallel = _edited_series(tmp_path / "parallel", ImageOrientationPatient=["1", "0", "0", "1", "0", "0"])
    with pytest.raises(DataError, match="is not two perpendicular directions"):
        dicom.series_geometry(dicom.find_series(parallel))
    # a zero spacing is unknown: 1 mm, said once for the series
    folder = _edited_series(tmp_path / "zero", n=4, PixelSpacing=["0", "0"])
    geometry = dicom.series_geometry(dicom.find_series(folder))
    assert geometry.spacing[1:] == (1.0, 1.0)
    said = [r for r in caplog.records if "is not a spacing; 1 mm is used" in r.getMessage()]
    assert len(said) == 1
    assert not [r for r in caplog.records if "no PixelSpacing" in r.getMessage()]  # said once, as not a spacing
    # none at all: 1 mm, as ITK takes it, but said (it was taken without a word)
    folder = write_dicom_series(tmp_path / "none", n=3)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    assert dicom.series_geometry(dicom.find_series(folder)).spacing[1:] == (1.0, 1.0)
    said = [r.getMessage() for r in caplog.records if "no PixelSpacing" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("no PixelSpacing, so pixels are taken as 1 mm and sizes in mm are not "
                                               "the image's (a secondary capture?)")


def test_pixels_that_do_not_decode_get_advice_for_their_transfer_syntax(tmp_path):
    # pydicom's list of the packages that would decode HTJ2K (on its later lines) was cut off, and uncompressed
    # pixels cut short were told to want a decoder
    from pydicom.encaps import encapsulate

    compressed = write_dicom_series(tmp_path / "htj2k", n=1, size=16)
    path = next(compressed.iterdir())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K lossless, which gdcm does not decode
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(20)])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError) as caught:
        read_slice(compressed, 0)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot decode DICOM pixels (") and "\n" not in message
    assert "pylibjpeg" in message and "High-Throughput JPEG 2000" in message
    assert "install the packages named, or convert the file to an uncompressed transfer syntax" in message

    native = write_dicom_series(tmp_path / "cut", n=1, size=16)
    path = next(native.iterdir())
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path)
    with pytest.raises(DataError, match=r"its pixels are uncompressed \(Explicit VR Little Endian\), so the file is "
                                        r"truncated or damaged; export it again$"):
        read_slice(native, 0)
    private = write_dicom_series(tmp_path / "private", n=1, size=16)
    path = next(private.iterdir())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    ds.save_as(path)
    with pytest.raises(DataError, match=r"its transfer syntax \(1\.2\.3\.4\.5\.6\) is not one DICOM defines \(a "
                                        r"private one\?\); convert the file"):
        read_slice(private, 0)


def test_a_file_without_file_meta_is_decoded_in_its_own_encoding(tmp_path):
    # no preamble, no file meta (older systems): "cannot decode DICOM pixels (... no Transfer Syntax UID)"
    from pydicom.filewriter import dcmwrite

    folder = write_dicom_series(tmp_path / "s", n=2, size=16)
    expected = [read_slice(folder, k) for k in range(2)]
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    for k in range(2):
        np.testing.assert_array_equal(read_slice(folder, k), expected[k])


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_files_without_preamble_or_suffix_are_found_as_a_series(tmp_path, implicit):
    # archives of older systems hold data sets without the Part 10 preamble, named IM0, IM1, ...: they were
    # "unsupported file type '(none)'"; text or other binary files without a suffix stay ignored
    from pydicom.filewriter import dcmwrite

    from medseg.discovery import discover

    folder = write_dicom_series(tmp_path / "s", n=3, size=16)
    expected = read_image(folder)[0]
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        dcmwrite(folder / f"IM{k}", ds, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        path.unlink()
    (folder / "README").write_text("scanned on the 3rd\n")
    (folder / "LOG").write_bytes(b"\x08\x00\x10\x00\x03\x00\x00\x00abc")  # group 0008, but an odd length
    # a raw dump whose first bytes pass for an element: not a readable image, so ignored as before, not failed
    (folder / "DUMP").write_bytes(np.array([8, 16, 4, 7, 9], "<i4").tobytes())
    assert dicom.is_dicom_file(folder / "IM0") and not dicom.is_dicom_file(folder / "README")
    assert not dicom.is_dicom_file(folder / "LOG") and dicom.is_dicom_file(folder / "DUMP")
    (item,), ignored = discover(tmp_path)
    assert item.format == "dicom" and sorted(Path(p).name for p, _ in ignored) == ["DUMP", "LOG", "README"]
    np.testing.assert_array_equal(read_image(folder)[0], expected)


def test_rt_dose_is_not_an_image_to_segment():
    ds = pydicom.Dataset()
    ds.Modality = "RTDOSE"
    assert dicom.non_image_kind(ds) == "RTDOSE"


def test_a_file_rewritten_in_place_is_read_again(tmp_path):
    folder = write_dicom_series(tmp_path / "s", n=3)
    assert read_image(folder)[0].shape == (1, 3, 8, 8)
    write_dicom_slice(folder / "IM000.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.99",
                      position=(0, 0, 50), series_number=9)
    with pytest.raises(DataError, match="folder mixes 2 DICOM series"):
        read_image(folder)


def test_multi_frame_duplicate_positions_are_refused(tmp_path):
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frames = np.zeros((3, 6, 6), np.int16)
    path = write_dicom_slice(tmp_path / "cine.dcm", frames, series_uid="1.2.7", position=(0, 0, 0), frames=3)
    ds = dcmread(path)
    groups = []
    for _ in range(3):  # three time points at one position
        pos = Dataset()
        pos.ImagePositionPatient = ["0", "0", "0"]
        item = Dataset()
        item.PlanePositionSequence = Sequence([pos])
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.save_as(path)
    with pytest.raises(DataError, match="same slice position"):
        read_image(path)


def _per_frame_file(path, orientations, spacings, slopes, positions):
    """A multi-frame file whose orientation, pixel spacing and rescale sit only in the per-frame groups."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frames = np.stack([np.full((4, 6), 10 * (k + 1), np.int16) for k in range(len(positions))])
    path = write_dicom_slice(path, frames, series_uid="1.2.8", position=(0, 0, 0), frames=len(positions))
    ds = dcmread(path)
    for name in ("ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
                 "ImagePositionPatient"):
        delattr(ds, name)
    groups = []
    for orient, spacing, slope, pos in zip(orientations, spacings, slopes, positions, strict=True):
        item = Dataset()
        for seq_name, attrs in (("PlanePositionSequence", {"ImagePositionPatient": pos}),
                                ("PlaneOrientationSequence", {"ImageOrientationPatient": orient}),
                                ("PixelMeasuresSequence", {"PixelSpacing": spacing}),
                                ("PixelValueTransformationSequence", {"RescaleSlope": slope, "RescaleIntercept": 0})):
            inner = Dataset()
            for key, value in attrs.items():
                setattr(inner, key, [f"{v:g}" for v in value] if isinstance(value, (list, tuple)) else f"{value:g}")
            setattr(item, seq_name, Sequence([inner]))
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.save_as(path)
    return path


def test_a_multi_frame_segs_frames_sit_where_their_source_frames_do(tmp_path):
    # frames 2 mm apart give or take 0.01 mm (within the spacing tolerance): the SEG's frames stated the even
    # grid's positions, up to 0.01 mm away from the source frames they reference
    import highdicom as hd
    from pydicom.dataset import Dataset

    z = [0.0, 2.01, 4.0, 6.005]
    path = write_dicom_slice(tmp_path / "ax.dcm", np.zeros((4, 6, 6), np.int16), series_uid="1.2.9",
                             position=(0, 0, 0), frames=4)
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence = []
    for v in z:
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = ["0", "0", f"{v:g}"]
        item.PlanePositionSequence = [position]
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.save_as(path)
    geometry = dicom.series_geometry(dicom.find_series(path))
    mask = np.zeros(geometry.shape, bool)
    mask[:, :2] = True
    seg = hd.seg.segread(dicom.write_seg(tmp_path / "seg.dcm", mask, geometry))
    written = sorted(float(item.PlanePositionSequence[0].ImagePositionPatient[2])
                     for item in seg.PerFrameFunctionalGroupsSequence)
    assert written == z
    for item in seg.PerFrameFunctionalGroupsSequence:  # and each names the source frame at its position
        number = int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        assert float(item.PlanePositionSequence[0].ImagePositionPatient[2]) == z[number - 1]


def test_multi_frame_geometry_and_rescale_stored_per_frame(tmp_path):
    # sagittal frames (rows along y, columns down z), 0.5 x 0.25 mm pixels, 2 mm apart in x, listed out of
    # order, each with its own rescale slope
    sagittal = (0, 1, 0, 0, 0, -1)
    path = _per_frame_file(tmp_path / "sag.dcm", [sagittal] * 3, [(0.5, 0.25)] * 3, [1, 2, 3],
                           [(4, 0, 0), (0, 0, 0), (2, 0, 0)])
    meta = read_geometry(path)
    np.testing.assert_allclose(meta["spacing"], [2.0, 0.5, 0.25])
    # slices run along the normal row x column = -x (LPS): x = 4, 2, 0, i.e. stored frames 1, 3, 2
    affine = np.asarray(meta["affine"])  # RAS; columns: (z, y, x) index steps in mm, then the origin
    np.testing.assert_allclose(affine[:3, 0], [2, 0, 0])  # along the slices: LPS -x = RAS +x
    np.testing.assert_allclose(affine[:3, 1], [0, 0, -0.5])  # down the rows: -z
    np.testing.assert_allclose(affine[:3, 2], [0, -0.25, 0])  # along a row: LPS +y = RAS -y
    np.testing.assert_allclose(affine[:3, 3], [-4, 0, 0])  # LPS (4, 0, 0)
    arr, _ = read_image(path)
    # raw values 10, 30, 20 of those frames times their own slopes 1, 3, 2
    np.testing.assert_array_equal(arr[0, :, 0, 0], [10, 90, 40])


def test_multi_frame_with_frames_of_different_orientation_is_refused(tmp_path):
    path = _per_frame_file(tmp_path / "mixed.dcm", [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)],
                           [(0.5, 0.5)] * 2, [1, 1], [(0, 0, 0), (0, 0, 2)])
    with pytest.raises(DataError, match=r"mixed\.dcm: frame 2 has another orientation or pixel spacing"):
        read_geometry(path)


def test_a_series_folder_given_as_dot_is_named_after_the_folder(tmp_path, monkeypatch):
    from medseg.discovery import discover

    write_dicom_series(tmp_path / "ct_scan", n=3)
    monkeypatch.chdir(tmp_path / "ct_scan")
    inputs, failed = discover(".")
    assert not failed and [item.rel for item in inputs] == ["ct_scan"]


def test_a_segmentation_beside_its_series_is_ignored_not_segmented(tmp_path):
    import pydicom

    from medseg.discovery import discover

    write_dicom_series(tmp_path / "ct", n=3)
    seg = write_dicom_slice(tmp_path / "ct" / "seg.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.99",
                            position=(0.0, 0.0, 0.0))
    ds = pydicom.dcmread(seg)
    ds.Modality = "SEG"
    ds.save_as(seg)
    inputs, ignored = discover(tmp_path)
    assert [(item.rel, item.error) for item in inputs] == [("ct", "")]  # named as before, one series
    assert ignored == [(str(seg), "DICOM SEG object, not an image")]


def test_a_linked_series_folder_keeps_the_links_name(tmp_path, monkeypatch):
    from medseg.discovery import discover

    write_dicom_series(tmp_path / "dcm", n=3)
    (tmp_path / "scan_link").symlink_to(tmp_path / "dcm", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert [item.rel for item in discover("scan_link")[0]] == ["scan_link"]


def _palette_colour_file(path, indices, lut=None):
    import pydicom

    write_dicom_slice(path, indices.astype(np.int16), series_uid="1.2.3.9", position=(0.0, 0.0, 0.0),
                      photometric="PALETTE COLOR")
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = 0
    del ds.RescaleSlope, ds.RescaleIntercept
    for colour, values in (lut or {}).items():
        ds[f"{colour}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableDescriptor", "US", [len(values), 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.asarray(values, "<u2").tobytes())
    ds.save_as(path)
    return path


def test_palette_colour_dicom_is_read_by_its_colours(tmp_path):
    # indices 0, 1, 2 = black, red, green: their colours as RGB, not the indices themselves
    indices = np.array([[0, 1], [2, 1]])
    lut = {"Red": [0, 65535, 0], "Green": [0, 0, 65535], "Blue": [0, 0, 0]}
    arr, _ = read_image(_palette_colour_file(tmp_path / "p.dcm", indices, lut))
    assert arr.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(arr[:, 0], [[[0, 65535], [0, 65535]], [[0, 0], [65535, 0]], np.zeros((2, 2))])
    with pytest.raises(DataError, match=r"q\.dcm: PALETTE COLOR image with an unusable colour table"):
        read_image(_palette_colour_file(tmp_path / "q.dcm", indices))


def _rgb_file(path, rgb, position=(0.0, 0.0, 0.0), series_uid="1.2.3.10"):
    """An RGB DICOM (8-bit, samples interleaved): ``rgb`` is ``(Y, X, 3)`` or ``(F, Y, X, 3)`` uint8."""
    import pydicom

    frames = rgb.shape[0] if rgb.ndim == 4 else 1
    write_dicom_slice(path, np.zeros(rgb.shape[-3:-1], np.int16), series_uid=series_uid, position=position,
                      frames=frames, with_pixels=False)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def test_colour_dicom_keeps_its_channels_and_each_bundle_takes_what_it_needs(tmp_path):
    from medseg.transforms import LoadSliced

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)  # two slices of a series, one file each
    for k in range(2):
        _rgb_file(tmp_path / "s" / f"{k}.dcm", rgb[k], position=(0.0, 0.0, float(k)))
    arr, meta = read_image(tmp_path / "s")
    assert arr.shape == (3, 2, 4, 5) and tuple(meta["spatial_shape"]) == (2, 4, 5)
    np.testing.assert_array_equal(arr, np.moveaxis(rgb, -1, 0))
    np.testing.assert_array_equal(read_slice(tmp_path / "s", 1), np.moveaxis(rgb[1], -1, 0))
    # an RGB bundle (jurkat) gets the colours; a gray one (isbi_em) their luma
    as_rgb = LoadSliced("image", channels=3)({"image": str(tmp_path / "s"), "page": 1})["image"]
    np.testing.assert_array_equal(np.asarray(as_rgb), np.moveaxis(rgb[1], -1, 0))
    as_gray = LoadSliced("image")({"image": str(tmp_path / "s"), "page": 1})["image"]
    np.testing.assert_allclose(np.asarray(as_gray)[0], rgb[1].astype(np.float32) @ [0.299, 0.587, 0.114], rtol=1e-5)
    # a multi-frame colour file: frames first, channels kept
    arr, _ = read_image(_rgb_file(tmp_path / "mf.dcm", rgb))
    assert arr.shape == (3, 2, 4, 5)
    np.testing.assert_array_equal(arr, np.moveaxis(rgb, -1, 0))


def test_a_series_mixing_colour_and_gray_slices_is_named(tmp_path):
    _rgb_file(tmp_path / "s" / "0.dcm", np.zeros((4, 5, 3), np.uint8), series_uid="1.2.3.11")
    write_dicom_slice(tmp_path / "s" / "1.dcm", np.zeros((4, 5), np.int16), series_uid="1.2.3.11",
                      position=(0.0, 0.0, 1.0))
    with pytest.raises(DataError, match=r"1\.dcm: gray slice in a colour series .*0\.dcm"):
        read_image(tmp_path / "s")


def test_a_multi_frame_file_among_single_slices_is_named(tmp_path):
    write_dicom_slice(tmp_path / "s" / "0.dcm", np.zeros((4, 5), np.int16), series_uid="1.2.3.12",
                      position=(0.0, 0.0, 0.0))
    write_dicom_slice(tmp_path / "s" / "1.dcm", np.zeros((2, 4, 5), np.int16), series_uid="1.2.3.12",
                      position=(0.0, 0.0, 1.0), frames=2)
    with pytest.raises(DataError, match=r"1\.dcm: multi-frame file \(2 frames\) inside a series of single slices"):
        read_image(tmp_path / "s")


def _gdcm_transcode(source, target, syntax: str) -> None:
    """Write ``source`` again as ``target`` in GDCM's transfer syntax ``syntax`` (e.g. ``RLELossless``)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


@pytest.mark.parametrize("syntax, uid", [
    ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),  # how most PACS exports compress CT and MR
    ("RLELossless", "1.2.840.10008.1.2.5"),
    ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90"),
])
def test_compressed_dicom_is_decoded(tmp_path, syntax, uid):
    # compressed with GDCM's own encoders; read back through python-gdcm, bit for bit
    import pydicom

    pixels = (np.arange(48 * 40).reshape(48, 40) % 1000).astype(np.int16)
    write_dicom_slice(tmp_path / "raw.dcm", pixels, series_uid="1.2.3.9", position=(0.0, 0.0, 0.0), intercept=0.0)
    _gdcm_transcode(tmp_path / "raw.dcm", tmp_path / "c.dcm", syntax)
    assert pydicom.dcmread(tmp_path / "c.dcm").file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(read_slice(tmp_path / "c.dcm", 0)[0], pixels)


def test_jpeg_baseline_dicom_is_decoded(tmp_path):
    # lossy 8-bit JPEG (ultrasound, endoscopy, secondary captures): decoded within JPEG's own error
    import pydicom

    yy, xx = np.mgrid[:48, :40]
    pixels = (yy * 4 + xx * 2).astype(np.uint8)  # smooth, so JPEG keeps it closely
    write_dicom_slice(tmp_path / "raw16.dcm", pixels.astype(np.int16), series_uid="1.2.3.8",
                      position=(0.0, 0.0, 0.0), intercept=0.0)
    ds = pydicom.dcmread(tmp_path / "raw16.dcm")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "raw.dcm", enforce_file_format=True)
    _gdcm_transcode(tmp_path / "raw.dcm", tmp_path / "jpeg.dcm", "JPEGBaselineProcess1")
    assert pydicom.dcmread(tmp_path / "jpeg.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    decoded = read_slice(tmp_path / "jpeg.dcm", 0)[0]
    assert decoded.shape == pixels.shape
    assert np.abs(decoded.astype(np.float64) - pixels).mean() < 2.0


@pytest.mark.parametrize("layout", ["each frame", "not the first frame", "shared thickness alone"])
def test_a_seg_is_written_for_frames_that_state_their_orientation_and_pixel_size_each(tmp_path, layout):
    # some enhanced images keep orientation and pixel spacing only in each frame's groups, none shared: the
    # SEG was refused ("'Dataset' object has no attribute 'PixelMeasuresSequence'") and the input lost. Also
    # when the first frame states none (the top level, which agrees, stands for it), and when shared pixel
    # measures hold a thickness alone
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import EnhancedCTImageStorage

    sagittal = (0, 1, 0, 0, 0, -1)
    path = _per_frame_file(tmp_path / "sag.dcm", [sagittal] * 3, [(0.5, 0.25)] * 3, [1, 1, 1],
                           [(4, 0, 0), (0, 0, 0), (2, 0, 0)])
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    if layout == "not the first frame":
        first = ds.PerFrameFunctionalGroupsSequence[0]
        del first.PlaneOrientationSequence, first.PixelMeasuresSequence
        ds.ImageOrientationPatient, ds.PixelSpacing = [f"{v:g}" for v in sagittal], ["0.5", "0.25"]
    elif layout == "shared thickness alone":
        shared, measures = Dataset(), Dataset()
        measures.SliceThickness = "2"
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(path)
    geometry = dicom.series_geometry(dicom.find_series(path))
    mask = np.zeros(geometry.shape, bool)
    mask[0, 1:3, 1:4] = True  # the slice at x = 4 (stored frame 1)
    seg = hd.seg.segread(dicom.write_seg(tmp_path / "seg.dcm", mask, geometry))
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               sagittal)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [0.5, 0.25])
    x_of_source_frame = {1: 4.0, 2: 0.0, 3: 2.0}
    pixels = seg.pixel_array.reshape(len(seg.PerFrameFunctionalGroupsSequence), *mask.shape[1:])
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [x_of_source_frame[source], 0, 0])
        assert frame.sum() == (6 if source == 1 else 0)  # the mask on the frame it was drawn on
    assert pydicom.dcmread(path) == ds  # the source file is left as it was


@pytest.mark.parametrize("where", ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"])
def test_a_single_frame_enhanced_image_is_placed_by_its_functional_groups(tmp_path, where):
    # one frame whose orientation, pixel spacing and thickness sit only in the shared (or the frame's) groups
    # and its position in the frame's: its NIfTI outputs were axial, 1 mm pixels and 1 mm thick, while its SEG
    # was sagittal
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom_slice(tmp_path / "one.dcm", np.zeros((4, 6), np.int16), series_uid="1.2.11",
                             position=(0, 0, 0))
    ds = pydicom.dcmread(path)
    for name in ("ImageOrientationPatient", "PixelSpacing", "ImagePositionPatient", "SliceThickness"):
        delattr(ds, name)
    ds.NumberOfFrames = 1
    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = ["0.5", "0.75"], "3"
    orientation.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    frame, position = Dataset(), Dataset()
    position.ImagePositionPatient = ["5", "-20", "40"]
    frame.PlanePositionSequence = Sequence([position])
    plane = shared if where == "SharedFunctionalGroupsSequence" else frame
    plane.PixelMeasuresSequence, plane.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    if where == "SharedFunctionalGroupsSequence":
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.save_as(path)
    meta = read_geometry(path)
    np.testing.assert_allclose(meta["spacing"], [3.0, 0.5, 0.75])
    affine = np.asarray(meta["affine"])  # RAS; columns: (z, y, x) index steps, then the origin
    np.testing.assert_allclose(affine[:3, 0], [3, 0, 0])  # the normal, LPS -x, is RAS +x
    np.testing.assert_allclose(affine[:3, 1], [0, 0, -0.5])  # down the rows: -z
    np.testing.assert_allclose(affine[:3, 2], [0, -0.75, 0])  # along a row: LPS +y = RAS -y
    np.testing.assert_allclose(affine[:3, 3], [-5, 20, 40])


def test_a_seg_is_written_for_a_series_whose_orientations_differ_by_rounding(tmp_path):
    # the reader takes orientations equal to 1e-4; highdicom compares them as written and refused the SEG
    import highdicom as hd

    write_dicom_series(tmp_path / "s", n=4)
    files = sorted((tmp_path / "s").iterdir())
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0.99999999", "0"]
    ds.save_as(files[1])
    seg = _seg_of(tmp_path / "s", tmp_path / "seg.dcm")
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [1, 0, 0, 0, 1, 0])
    assert hd.seg.segread(tmp_path / "seg.dcm").SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert pydicom.dcmread(files[1]).ImageOrientationPatient[4] == 0.99999999  # the source is left as it was


def _tilted_series(folder: Path, shift: float, n: int = 5, moved: dict[int, float] | None = None) -> Path:
    """``n`` axial slices 2 mm apart, each shifted ``shift`` mm along y from the one before (a gantry tilt);
    ``moved``: slice -> extra shift along x."""
    for k in range(n):
        x = (moved or {}).get(k, 0.0)
        write_dicom_slice(folder / f"IM{k:03d}.dcm", np.full((8, 8), 100 * k, np.int16), series_uid="1.2.3.77",
                          position=(x, shift * k, 10.0 + 2.0 * k), instance=k + 1)
    return folder


def test_a_tilted_stack_keeps_each_slice_where_it_was_acquired_and_is_said(tmp_path, caplog):
    tan = np.tan(np.radians(20))
    geometry = dicom.series_geometry(dicom.find_series(_tilted_series(tmp_path / "t", 2.0 * tan)))
    step = geometry.spacing[0]
    assert step == pytest.approx(2.0 / np.cos(np.radians(20)), abs=1e-4)
    for k in range(5):  # pixel (0, 0) of each slice at its ImagePositionPatient (LPS -> RAS)
        np.testing.assert_allclose((geometry.affine @ [k, 0, 0, 1])[:3], [0, -2.0 * tan * k, 10.0 + 2.0 * k],
                                   atol=1e-4)
        # the same stack straight, as ITK reads the series: the origin and axes of the first slice, the distance
        # between positions as the slice step
        np.testing.assert_allclose((geometry.straight @ [k, 0, 0, 1])[:3], [0, 0, 10.0 + step * k], atol=1e-4)
    np.testing.assert_allclose(geometry.straight[:3, 1:3], geometry.affine[:3, 1:3])  # the same pixel axes
    said = [r.getMessage() for r in caplog.records if "gantry tilt" in r.getMessage()]
    assert len(said) == 1 and "stacked at a tilt of 20.0°" in said[0] and "volumes 6.4% large" in said[0]
    dicom._series_geometry.cache_clear()  # worked out again (a batch of over 16 series): said once all the same
    assert dicom.series_geometry(dicom.find_series(tmp_path / "t")).straight is not None
    assert len([r for r in caplog.records if "gantry tilt" in r.getMessage()]) == 1
    caplog.clear()
    # positions written to a few decimals (a rounding of 0.01 mm) are a straight stack, said nothing of
    straight = dicom.series_geometry(dicom.find_series(_tilted_series(tmp_path / "s", 0.002, moved={2: 0.01})))
    assert straight.straight is None and not caplog.records


def test_steps_along_the_normal_that_drift_within_the_tolerance_are_one_line(tmp_path):
    # 30 steps of 2.5 mm, then 30 of 2.52 (within 1 % each): the middle slice lay 0.3 mm from the line through the
    # first and last along the normal, and was refused as "off the line"
    z = np.concatenate([[0.0], np.cumsum([2.5] * 30 + [2.52] * 30)])
    for k, position in enumerate(z):
        write_dicom_slice(tmp_path / "d" / f"IM{k:03d}.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.79",
                          position=(0.0, 0.0, float(position)), instance=k + 1)
    geometry = dicom.series_geometry(dicom.find_series(tmp_path / "d"))
    assert geometry.shape[0] == 61 and geometry.straight is None


def test_a_slice_off_the_line_of_the_others_is_named(tmp_path):
    # it was put on the line between the first and last slices without a word: 5 mm from where it was acquired
    folder = _tilted_series(tmp_path / "j", 0.0, moved={2: 5.0})
    with pytest.raises(DataError, match=r"IM002\.dcm: its ImagePositionPatient lies 5 mm off the line through the "
                                        r"positions of .*IM000\.dcm and .*IM004\.dcm, so the series' slices do not "
                                        r"stack into one volume"):
        dicom.series_geometry(dicom.find_series(folder))


def test_a_seg_of_one_slice_states_the_slice_step_its_nifti_outputs_have(shared_dicom, tmp_path):
    # highdicom wrote 1 mm between slices where the NIfTI outputs of the same slice have its thickness (0.8)
    geometry = dicom.series_geometry(dicom.find_series(shared_dicom / "single" / "MR_small.dcm"))
    assert geometry.shape[0] == 1 and geometry.spacing[0] == pytest.approx(0.8)
    out = dicom.write_seg(tmp_path / "seg.dcm", np.ones(geometry.shape, bool), geometry)
    measures = pydicom.dcmread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(0.8) == float(measures.SliceThickness)
