"""`medseg infer` on folders of mixed formats: outputs in each input's kind, skips, manifest, per-file failures."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from conftest import BUNDLE, TINY_NET, synthetic_em, write_dicom_series, write_dicom_slice
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io import write_tiff

runner = CliRunner()


def _infer(inputs: Path, out: Path, ckpt: Path, *extra: str, bundle: Path = BUNDLE):
    args = ["infer", bundle, inputs, out, "--checkpoint", ckpt, "--no-progress", "--device", "cpu", *extra]
    args += [a for item in TINY_NET for a in ("--set", item)]
    return runner.invoke(app, [str(a) for a in args])


def _em_png(path: Path, seed: int) -> Path:
    """A 32x32 synthetic EM slice saved as PNG at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_em(size=32, seed=seed)[0]).save(path)
    return path


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {Path(row["input"]).name: row for row in csv.DictReader(f)}


def _summary(output: str) -> dict:
    return json.loads(output[output.index("{") : output.rindex("}") + 1])


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A folder mixing a PNG, a TIFF stack of the same slice, a NIfTI volume, a DICOM series and a text file."""
    root = tmp_path / "in"
    (root / "em").mkdir(parents=True)
    image, _ = synthetic_em(size=48, seed=3)
    Image.fromarray(image).save(root / "em" / "slice.png")
    tifffile.imwrite(root / "em" / "stack.tif", np.stack([image, image[::-1], image]), photometric="minisblack")
    affine = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -40], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    volume = np.stack([image[:40, :44].T.astype(np.int16)] * 3, axis=-1)  # (X=44, Y=40, Z=3)
    nib.save(nib.Nifti1Image(volume, affine), root / "vol.nii.gz")
    write_dicom_series(root / "ct", n=3, size=24)
    (root / "notes.txt").write_text("not an image")
    return root


def test_mixed_folder_outputs_in_each_inputs_kind(mixed, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = _infer(mixed, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert (summary["inputs"], summary["ok"], summary["failed"], summary["ignored"]) == (4, 4, 0, 1)
    assert summary["slices"] == 1 + 3 + 3 + 3
    rows = _manifest(out)
    assert rows["notes.txt"]["status"] == "ignored" and "unsupported file type '.txt'" in rows["notes.txt"]["message"]
    assert {rows[n]["status"] for n in ("slice.png", "stack.tif", "vol.nii.gz", "ct")} == {"ok"}

    # PNG -> 8-bit PNG mask (255 = interior) + float32 probability TIFF; the stack holds the same slice
    mask = np.asarray(Image.open(out / "mask" / "em" / "slice.png"))
    prob = tifffile.imread(out / "prob" / "em" / "slice.tif")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, prob > 0.5)
    stack = tifffile.imread(out / "mask" / "em" / "stack.tif")
    assert stack.shape == (3, 48, 48) and stack.dtype == np.uint8
    np.testing.assert_array_equal(stack[0], mask)  # slice by slice = the same as the single image
    np.testing.assert_array_equal(stack[2], mask)

    # NIfTI -> NIfTI in the input's voxel order and affine, 1 = interior
    src = nib.load(mixed / "vol.nii.gz")
    seg = nib.load(out / "mask" / "vol.nii.gz")
    assert seg.shape == src.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, src.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    prob_nii = nib.load(out / "prob" / "vol.nii.gz")
    np.testing.assert_array_equal(np.asarray(seg.dataobj) == 1, np.asarray(prob_nii.dataobj) > 0.5)

    # DICOM series -> DICOM SEG on the source instances, agreeing with the probability map
    import highdicom as hd

    from medseg.readers import read_geometry

    meta = read_geometry(mixed / "ct")
    dcm_seg = hd.seg.segread(out / "mask" / "ct.seg.dcm")
    frames = dcm_seg.get_pixels_by_source_instance(source_sop_instance_uids=meta["sop_uids"], segment_numbers=[1])
    prob_ct = np.asarray(nib.load(out / "prob" / "ct.nii.gz").dataobj).transpose(2, 1, 0)  # back to (Z, Y, X)
    np.testing.assert_array_equal(frames[..., 0] > 0, prob_ct > 0.5)
    assert dcm_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == meta["series_uid"]
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left


def test_rerun_skips_finished_inputs_unless_overwrite(mixed, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert _infer(mixed, out, tiny_checkpoint, "--include", "*.png").exit_code == 0
    before = (out / "mask" / "em" / "slice.png").stat().st_mtime_ns
    result = _infer(mixed, out, tiny_checkpoint, "--include", "*.png")
    assert result.exit_code == 0 and _summary(result.output)["skipped"] == 1
    assert _manifest(out)["slice.png"]["status"] == "skipped"
    assert (out / "mask" / "em" / "slice.png").stat().st_mtime_ns == before
    result = _infer(mixed, out, tiny_checkpoint, "--include", "*.png", "--overwrite")
    assert _summary(result.output)["ok"] == 1 and (out / "mask" / "em" / "slice.png").stat().st_mtime_ns != before


def test_an_input_changed_since_its_outputs_is_segmented_again(mixed, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert _infer(mixed, out, tiny_checkpoint, "--include", "*.png").exit_code == 0
    prob_before = tifffile.imread(out / "prob" / "em" / "slice.tif")
    image, _ = synthetic_em(size=48, seed=11)  # another image under the same name
    Image.fromarray(image).save(mixed / "em" / "slice.png")
    result = _infer(mixed, out, tiny_checkpoint, "--include", "*.png")
    assert result.exit_code == 0 and _summary(result.output)["ok"] == 1, result.output
    row = _manifest(out)["slice.png"]
    assert row["status"] == "ok" and "input changed" in row["message"]
    assert not np.array_equal(tifffile.imread(out / "prob" / "em" / "slice.tif"), prob_before)
    assert _summary(_infer(mixed, out, tiny_checkpoint, "--include", "*.png").output)["skipped"] == 1  # now current


def test_input_fingerprint_follows_every_file_of_a_series_folder(tmp_path):
    import os

    from medseg.batch import input_fingerprint

    series = write_dicom_series(tmp_path / "ct", n=3)
    first = input_fingerprint(series)
    assert first and input_fingerprint(series) == first
    slice_file = sorted(series.iterdir())[1]
    os.utime(slice_file, ns=(slice_file.stat().st_atime_ns, slice_file.stat().st_mtime_ns + 10**9))
    assert input_fingerprint(series) != first
    assert input_fingerprint(tmp_path / "missing.png") == ""


def test_resuming_with_another_model_or_settings_is_refused(mixed, tmp_path, tiny_checkpoint):
    """Inputs are skipped only when this run made their outputs; another checkpoint or tta is a one-line error."""
    import torch

    out = tmp_path / "out"
    assert _infer(mixed, out, tiny_checkpoint, "--include", "*.png").exit_code == 0
    record = json.loads((out / "run.json").read_text())
    assert set(record["outputs"]) == {"mask/em/slice.png", "prob/em/slice.tif"}
    (run,) = record["runs"].values()
    assert run["identity"]["bundle"].startswith("ISBI 2012 EM membrane segmentation ")  # its metadata's name
    assert run["checkpoint_path"] == str(tiny_checkpoint.resolve())
    mask = out / "mask" / "em" / "slice.png"
    before = mask.stat().st_mtime_ns
    # the same weights under another name are the same run: resumed
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_checkpoint, copy)
    assert _summary(_infer(mixed, out, copy, "--include", "*.png").output)["skipped"] == 1
    # the bundle's own tta given explicitly is the same setting: resumed
    assert _summary(_infer(mixed, out, tiny_checkpoint, "--include", "*.png", "--no-tta").output)["skipped"] == 1
    # other weights: refused before any work, nothing touched
    state = torch.load(tiny_checkpoint)
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] + 1.0
    other = tmp_path / "other.pt"
    torch.save(state, other)
    result = _infer(mixed, out, other)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"{out}: the outputs of 'em/slice' were made with another checkpoint" in line and "--overwrite" in line
    assert not (out / "mask" / "vol.nii.gz").exists()  # nothing else was segmented either
    # other settings: refused, naming the setting
    result = _infer(mixed, out, tiny_checkpoint, "--include", "*.png", "--tta")
    assert result.exit_code == 1 and "settings (tta)" in result.output
    assert mask.stat().st_mtime_ns == before
    # another input of the first model, then --overwrite of only the PNG with the new one
    assert _infer(mixed, out, tiny_checkpoint, "--include", "*.nii.gz").exit_code == 0
    assert _summary(_infer(mixed, out, other, "--include", "*.png", "--overwrite").output)["ok"] == 1
    assert mask.stat().st_mtime_ns != before
    assert _summary(_infer(mixed, out, other, "--include", "*.png").output)["skipped"] == 1  # resumes
    # the NIfTI is still the first model's: the new model may not skip it as its own
    result = _infer(mixed, out, other, "--include", "*.png", "--include", "*.nii.gz")
    assert result.exit_code == 1 and "the outputs of 'vol' were made with another checkpoint" in result.output
    # outputs the record does not know (an older version, foreign files) are not taken as this run's
    (out / "run.json").unlink()
    result = _infer(mixed, out, other, "--include", "*.png")
    assert result.exit_code == 1 and "slice.png: not written by a run recorded in" in result.output
    assert "pass --overwrite to replace it" in result.output


def test_a_folder_recorded_with_the_settings_in_the_identity_is_continued(mixed, tmp_path, tiny_checkpoint):
    # earlier versions keyed a run by its identity with the settings in words (the --set given, tta) inside it
    from medseg.batch import _identity_key

    out = tmp_path / "out"
    assert _infer(mixed, out, tiny_checkpoint, "--include", "*.png").exit_code == 0
    record = json.loads((out / "run.json").read_text())
    ((key, run),) = record["runs"].items()
    assert set(run["identity"]) == {"bundle", "checkpoint", "config"}
    assert run["settings"]["tta"] is False and run["settings"]["overrides"]["mirror_border"] == 8
    old = {**run["identity"], "settings": run.pop("settings")}
    old_key = _identity_key(json.loads(json.dumps(old, sort_keys=True)))
    record["runs"] = {old_key: {**run, "identity": old}}
    record["outputs"] = {path: old_key for path in record["outputs"]}
    (out / "run.json").write_text(json.dumps(record))
    result = _infer(mixed, out, tiny_checkpoint, "--include", "*.png", "--tta")
    assert result.exit_code == 1 and "made with another config and other settings (tta)" in result.output
    assert _summary(_infer(mixed, out, tiny_checkpoint, "--include", "*.png").output)["skipped"] == 1
    assert list(json.loads((out / "run.json").read_text())["runs"]) == [key]


def test_a_renamed_copy_of_the_bundle_continues_its_runs(mixed, tmp_path, tiny_checkpoint):
    # a run was keyed by the bundle's folder name: a colleague's copy named otherwise was 'another bundle'
    from medseg.batch import _identity_key

    out = tmp_path / "out"
    assert _infer(mixed, out, tiny_checkpoint, "--include", "*.png").exit_code == 0
    renamed = shutil.copytree(BUNDLE, tmp_path / "em_copy")
    result = _infer(mixed, out, tiny_checkpoint, "--include", "*.png", bundle=renamed)
    assert result.exit_code == 0, result.output
    assert _summary(result.output)["skipped"] == 1
    # a folder recorded by earlier versions, which named the bundle by its folder, is continued too
    record = json.loads((out / "run.json").read_text())
    ((key, run),) = record["runs"].items()
    old = {**run["identity"], "bundle": run["identity"]["bundle"].replace("ISBI 2012 EM membrane segmentation",
                                                                          "isbi_em")}
    old_key = _identity_key(json.loads(json.dumps(old, sort_keys=True)))
    record["runs"] = {old_key: {**run, "identity": old}}
    record["outputs"] = {path: old_key for path in record["outputs"]}
    (out / "run.json").write_text(json.dumps(record))
    assert _summary(_infer(mixed, out, tiny_checkpoint, "--include", "*.png").output)["skipped"] == 1
    assert list(json.loads((out / "run.json").read_text())["runs"]) == [key]


def test_run_record_forgets_outputs_of_a_failed_input(tmp_path):
    """A failed input's outputs are no longer this run's: a later resume must not skip them."""
    from medseg.batch import RunRecord

    paths = {"mask": tmp_path / "mask" / "a.png", "prob": tmp_path / "prob" / "a.tif"}
    record = RunRecord(tmp_path, {"checkpoint": "x"})
    record.record(paths, made=True)
    assert RunRecord(tmp_path, {"checkpoint": "x"}).made_here(paths)
    assert RunRecord(tmp_path, {"checkpoint": "y"}).conflict(paths) == "another checkpoint"
    record.record(paths, made=False)
    again = RunRecord(tmp_path, {"checkpoint": "x"})
    assert not again.made_here(paths) and again.conflict(paths) == "an unrecorded run"


def test_run_record_takes_an_identity_recorded_by_an_earlier_version_as_its_own(tmp_path):
    from medseg.batch import RunRecord

    # with the settings in words inside the identity: the same run when the rest is this run's identity
    paths = {"mask": tmp_path / "worded" / "a.png"}
    RunRecord(tmp_path / "worded", {"config": "c", "settings": {"overrides": {"a": 1}}}).record(paths, made=True)
    assert RunRecord(tmp_path / "worded", {"config": "c"}).made_here(paths)
    assert not RunRecord(tmp_path / "worded", {"config": "d"}).made_here(paths)

    paths = {"mask": tmp_path / "mask" / "a.png"}
    RunRecord(tmp_path, {"config": "hashed the old way"}).record(paths, made=True)
    assert not RunRecord(tmp_path, {"config": "hashed the new way"}).made_here(paths)
    record = RunRecord(tmp_path, {"config": "hashed the new way"}, same_as=[{"config": "hashed the old way"}])
    assert record.made_here(paths) and len(record.runs) == 1
    assert not RunRecord(tmp_path, {"config": "other"}, same_as=[{"config": "and other"}]).made_here(paths)


def test_ctrl_c_in_a_batch_drops_the_current_inputs_outputs_and_stops(tmp_path):
    from medseg.batch import RunRecord, run_batch
    from medseg.discovery import InputItem

    done = tmp_path / "out" / "mask" / "a.png"
    items = [InputItem(str(tmp_path / "a.png"), "png", "a"), InputItem(str(tmp_path / "b.png"), "png", "b")]
    record = RunRecord(tmp_path / "out", {"checkpoint": "x"})
    aborted = []

    def segment(slices):
        if slices[0]["name"] == "b":
            raise KeyboardInterrupt
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_bytes(b"mask")

    with pytest.raises(KeyboardInterrupt):
        run_batch(items, [], segment, paths_for=lambda item, n: {"mask": tmp_path / "out" / "mask" / f"{item.rel}.png"},
                  count=lambda item: 1, manifest=tmp_path / "out" / "manifest.csv", on_abort=lambda: aborted.append(1),
                  record=record)
    assert aborted == [1]  # the interrupted input's partial outputs are dropped
    rows = _manifest(tmp_path / "out")
    assert rows["a.png"]["status"] == "ok" and "b.png" not in rows  # the finished input is kept and recorded
    assert RunRecord(tmp_path / "out", {"checkpoint": "x"}).made_here({"mask": done})


def test_ctrl_c_after_an_inputs_outputs_are_written_keeps_them_as_this_runs(tmp_path):
    # the interrupt lands between the last output's rename and the record's update: a rerun must skip it,
    # not refuse the folder as holding an unrecorded run's outputs
    from medseg.batch import RunRecord, run_batch
    from medseg.discovery import InputItem

    class InterruptedRecord(RunRecord):
        def record(self, paths, made, fingerprint="", item=None):
            if made and not getattr(self, "interrupted", False):
                self.interrupted = True
                raise KeyboardInterrupt
            super().record(paths, made, fingerprint, item)

    (tmp_path / "a.png").write_bytes(b"x")
    mask = tmp_path / "out" / "mask" / "a.png"

    def segment(slices):
        mask.parent.mkdir(parents=True, exist_ok=True)
        mask.write_bytes(b"mask")

    with pytest.raises(KeyboardInterrupt):
        run_batch([InputItem(str(tmp_path / "a.png"), "png", "a")], [], segment,
                  paths_for=lambda item, n: {"mask": mask}, count=lambda item: 1,
                  manifest=tmp_path / "out" / "manifest.csv", record=InterruptedRecord(tmp_path / "out", {"c": 1}))
    from medseg.batch import input_fingerprint

    again = RunRecord(tmp_path / "out", {"c": 1})
    assert again.made_here({"mask": mask})
    assert not again.input_changed({"mask": mask}, input_fingerprint(tmp_path / "a.png"))
    assert again.input_changed({"mask": mask}, "another input")  # its input was recorded too


def test_a_blank_image_segments_without_warnings(tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "in" / "blank.png")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "Divide by zero" in str(w.message)]


def test_include_exclude_recursive_and_format_override(mixed, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = _infer(mixed, out, tiny_checkpoint, "--exclude", "em/*", "--exclude", "ct/*", "--format", "tiff",
                    "--no-prob")
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "manifest.csv", "mask/vol.tif", "run.json"]
    assert tifffile.imread(out / "mask" / "vol.tif").shape == (3, 40, 44)  # (Z, Y, X)
    with tifffile.TiffFile(out / "mask" / "vol.tif") as tif:  # a classic TIFF, which ImageJ's own opener reads
        assert not tif.is_bigtiff
    result = _infer(mixed, tmp_path / "flat", tiny_checkpoint, "--no-recursive")
    assert _summary(result.output)["inputs"] == 1  # only vol.nii.gz sits at the top
    result = _infer(mixed / "em" / "slice.png", tmp_path / "one", tiny_checkpoint, "--format", "nifti")
    assert result.exit_code == 0
    assert nib.load(tmp_path / "one" / "mask" / "slice.nii.gz").shape == (48, 48)


def test_pictures_written_as_nifti_overlay_them_in_itk(tmp_path, tiny_checkpoint):
    # ITK (and so SimpleITK, 3D Slicer, ITK-SNAP) puts pixel (x, y[, z]) of a PNG or TIFF at (x·sx, y·sy[, z·sz]);
    # the NIfTI mask of it must put the same pixel at the same point, with the same values
    import itk

    rng = np.random.default_rng(5)
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray((rng.random((30, 50)) * 255).astype(np.uint8)).save(root / "wide.png")
    tifffile.imwrite(root / "stack.tif", (rng.random((4, 30, 50)) * 255).astype(np.uint8), photometric="minisblack",
                     metadata={"axes": "ZYX"})  # no calibration: ITK does not read ImageJ's
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint, "--format", "nifti").exit_code == 0
    for name, index in (("wide", (10, 20)), ("stack", (10, 20, 2))):
        picture = itk.imread(str(root / ("wide.png" if name == "wide" else "stack.tif")))
        mask = itk.imread(str(out / "mask" / f"{name}.nii.gz"))
        assert itk.array_from_image(mask).shape == itk.array_from_image(picture).shape
        for i in (index, tuple(v + 1 for v in index)):
            np.testing.assert_allclose(mask.TransformIndexToPhysicalPoint(i),
                                       picture.TransformIndexToPhysicalPoint(i), atol=1e-6)
        np.testing.assert_allclose(np.asarray(mask.GetDirection()), np.asarray(picture.GetDirection()), atol=1e-6)


def test_bad_files_fail_alone_and_the_rest_finish(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=40, seed=1)
    Image.fromarray(image).save(root / "good.png")
    (root / "trunc.png").write_bytes((root / "good.png").read_bytes()[:60])
    tifffile.imwrite(root / "ok.tif", np.stack([image] * 2), photometric="minisblack")
    (root / "corrupt.tif").write_bytes((root / "ok.tif").read_bytes()[:900])
    write_dicom_slice(root / "dcm" / "nopix.dcm", np.zeros((16, 16), np.int16), series_uid="1.2.77",
                      position=(0, 0, 0), with_pixels=False)
    gap = write_dicom_series(root / "gap", n=4, size=16)
    (gap / "IM001.dcm").unlink()
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 4, 2), np.int16), np.eye(4)), root / "four_d.nii.gz")  # x, y, z, t
    one_volume = np.diag([0.5, 0.7, 2.0, 1.0])  # x, y, z, t of one time point: read as 3D, as the README says
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 2, 1), np.int16), one_volume), root / "one_volume.nii.gz")
    # two series in one folder: split into two inputs, both fine
    write_dicom_series(root / "two", n=2, size=16, series_uid="1.2.3.1", series_number=4)
    write_dicom_series(root / "two", n=2, size=16, series_uid="1.2.3.2", series_number=5, prefix="B")
    out = tmp_path / "out"
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 1
    rows = _manifest(out)
    failed = {name for name, row in rows.items() if row["status"] == "failed"}
    assert failed == {"trunc.png", "corrupt.tif", "nopix.dcm", "gap", "four_d.nii.gz"}, rows
    assert {rows[n]["status"] for n in ("good.png", "ok.tif", "one_volume.nii.gz")} == {"ok"}
    mask = nib.load(rows["one_volume.nii.gz"]["mask"])
    assert mask.shape == (24, 20, 2) and np.allclose(mask.affine, one_volume)
    messages = {name: rows[name]["message"] for name in failed}
    assert "truncated or corrupt" in messages["trunc.png"]
    assert "no pixel data" in messages["nopix.dcm"]
    assert "inconsistent slice spacing" in messages["gap"]
    assert "4D NIfTI" in messages["four_d.nii.gz"]
    assert all("\n" not in m and m.startswith(str(root)) for m in messages.values()), messages
    assert all(rows[n]["mask"] == rows[n]["prob"] == "" for n in failed)  # no outputs to point to
    assert all(Path(rows[n]["mask"]).is_file() for n in ("good.png", "ok.tif"))
    seg_two = sorted(p.name for p in (out / "mask" / "two").iterdir())
    assert seg_two == ["S4.seg.dcm", "S5.seg.dcm"]  # one SEG per series, never a mixed volume
    assert not (out / "mask" / "corrupt.tif").exists() and not list(out.rglob(".*.tif"))
    assert "error: 5 of 10 inputs failed; the others are done" in result.output
    assert "Traceback" not in result.output


def test_folder_level_errors_are_one_line(tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    result = _infer(tmp_path / "empty", tmp_path / "o", tiny_checkpoint)
    assert result.exit_code == 1 and "no images to segment" in result.output
    assert "supported: .bmp, .dcm" in result.output
    (tmp_path / "scan.gif").write_bytes(b"GIF89a")
    result = _infer(tmp_path / "scan.gif", tmp_path / "o", tiny_checkpoint)
    assert result.exit_code == 1 and "scan.gif: unsupported file type '.gif'; supported:" in result.output
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # a medium's index: its folder is the input
    result = _infer(tmp_path / "DICOMDIR", tmp_path / "o", tiny_checkpoint)
    assert result.exit_code == 1 and "DICOMDIR: a DICOMDIR is the index of a DICOM medium, not an image; give the " \
        "folder that holds it" in result.output, result.output
    image, _ = synthetic_em(size=32, seed=1)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(image).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(image).save(tmp_path / "imgs" / "b.bmp")
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    result = _infer(tmp_path / "imgs", tmp_path / "blocker" / "out", tiny_checkpoint)
    assert result.exit_code == 1 and "output folder is not writable" in result.output
    (tmp_path / "parts" / "mask").mkdir(parents=True)  # a part of an earlier run the user may not write:
    (tmp_path / "parts" / "prob").write_text("")  # refused before any work, not input by input
    result = _infer(tmp_path / "imgs", tmp_path / "parts", tiny_checkpoint)
    assert result.exit_code == 1 and f"{tmp_path / 'parts' / 'prob'}: a file, not a folder" in result.output
    assert _infer(tmp_path / "imgs", tmp_path / "parts", tiny_checkpoint, "--no-prob").exit_code == 0  # unused
    (tmp_path / "parts" / "prob").unlink()
    (tmp_path / "parts" / "mask").chmod(0o500)
    try:
        result = _infer(tmp_path / "imgs", tmp_path / "parts", tiny_checkpoint)
    finally:
        (tmp_path / "parts" / "mask").chmod(0o700)
    if os.geteuid() != 0:  # root writes regardless of permissions
        assert result.exit_code == 1 and f"{tmp_path / 'parts' / 'mask'}: output folder is not writable" \
            in result.output, result.output
        assert not (tmp_path / "parts" / "manifest.csv").exists()
    # no DICOM input at all: one line before any work, not a failure per input (a manifest of nothing done)
    result = _infer(tmp_path / "imgs", tmp_path / "o3", tiny_checkpoint, "--format", "dicom-seg")
    assert result.exit_code == 1 and [line for line in result.output.splitlines() if line.strip()] == [
        f"error: {tmp_path / 'imgs'}: --format dicom-seg needs DICOM inputs, and none of the 2 found is DICOM; use "
        "--format nifti or tiff"]
    assert not (tmp_path / "o3").exists()
    # beside a DICOM series, each other input fails alone (a BMP, read by the PNG reader, was said to be "png")
    write_dicom_series(tmp_path / "imgs" / "ct", n=2, size=24)
    result = _infer(tmp_path / "imgs", tmp_path / "o3", tiny_checkpoint, "--format", "dicom-seg")
    assert result.exit_code == 1 and (tmp_path / "o3" / "mask" / "ct.seg.dcm").is_file()
    assert f"failed: {tmp_path / 'imgs' / 'a.png'}: --format dicom-seg needs DICOM inputs" in result.output
    assert f"failed: {tmp_path / 'imgs' / 'b.bmp'}: --format dicom-seg needs DICOM inputs, and this one is not " \
        "DICOM; use nifti or tiff" in result.output
    shutil.rmtree(tmp_path / "imgs" / "ct")
    result = _infer(tmp_path / "imgs", tmp_path / "o2", tiny_checkpoint, "--format", "jpeg")
    assert result.exit_code == 1 and "unknown output format" in result.output
    result = _infer(tmp_path / "imgs", tmp_path / "o4", tiny_checkpoint, "--set", "output_format=jpeg")
    assert result.exit_code == 1 and "unknown output format 'jpeg'" in result.output  # once, not per input
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "o4").exists()
    for res in (result,):
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_real_dicom_and_nifti_files(tmp_path, tiny_checkpoint, shared_dicom, shared_nifti):
    root = tmp_path / "in"
    shutil.copytree(shared_dicom / "series_mr_4slice", root / "mr")
    shutil.copy(shared_nifti / "anatomical.nii", root / "anat.nii")
    shutil.copytree(shared_dicom / "single", root / "single")  # two series, one file each
    out = tmp_path / "out"
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "mask" / "single").iterdir()) == ["CT_small.seg.dcm", "MR_small.seg.dcm"]
    src = nib.load(root / "anat.nii")
    seg = nib.load(out / "mask" / "anat.nii.gz")
    assert seg.shape == src.shape == (33, 41, 25)
    np.testing.assert_allclose(seg.affine, src.affine)
    assert (out / "mask" / "mr.seg.dcm").is_file() and (out / "prob" / "mr.nii.gz").is_file()
    # the probability volume of the DICOM series lands where the reference NIfTI of that series is
    reference = nib.as_closest_canonical(nib.load(shared_dicom / "series_mr_4slice_reference.nii.gz"))
    prob = nib.as_closest_canonical(nib.load(out / "prob" / "mr.nii.gz"))
    assert prob.shape == reference.shape
    np.testing.assert_allclose(prob.affine, reference.affine, atol=1e-3)


def test_corrupt_gzip_nifti_and_stray_files_in_a_series_folder(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=2)
    Image.fromarray(image).save(root / "a_good.png")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 2), np.int16), np.eye(4)), root / "m_bad.nii.gz")
    data = bytearray((root / "m_bad.nii.gz").read_bytes())
    data[40:60] = bytes(20)  # corrupt the deflate stream
    (root / "m_bad.nii.gz").write_bytes(bytes(data))
    Image.fromarray(image).save(root / "z_good.png")
    series = write_dicom_series(root / "ct", n=3, size=16)
    (series / "readme.dcm").write_text("not DICOM at all")
    shutil.copy(series / "IM000.dcm", series / ".hidden_copy.dcm")  # hidden: never part of the series
    out = tmp_path / "out"
    result = _infer(root, out, tiny_checkpoint)
    rows = _manifest(out)
    assert result.exit_code == 1 and "internal error" not in result.output
    assert rows["m_bad.nii.gz"]["status"] == "failed" and "m_bad.nii.gz" in rows["m_bad.nii.gz"]["message"]
    assert rows["readme.dcm"]["status"] == "failed"
    assert rows["a_good.png"]["status"] == rows["z_good.png"]["status"] == rows["ct"]["status"] == "ok"
    assert rows["ct"]["slices"] == "3"


def test_output_stems_never_collide_and_output_inside_input_is_skipped(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=4)
    for name in ("a.png", "a.PNG", "b.png", "b_png.tif"):
        if name.endswith(".tif"):
            tifffile.imwrite(root / name, image)
        else:
            Image.fromarray(image).save(root / name)
    out = root / "out"  # inside the input folder
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    masks = [r["mask"].lower() for r in rows]
    probs = [r["prob"].lower() for r in rows]
    assert len(rows) == 4 and len(set(masks)) == 4 and len(set(probs)) == 4, rows
    assert all(r["status"] == "ok" for r in rows)
    result = _infer(root, out, tiny_checkpoint, "--overwrite")
    assert _summary(result.output)["inputs"] == 4  # its own outputs are not taken as inputs

    # x.PNG's mask/x.png would be the folder of x.png/y.png's mask/x.png/y.png (a raw "File exists" error)
    (tmp_path / "two" / "x.png").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "two" / "x.PNG")
    Image.fromarray(image).save(tmp_path / "two" / "x.png" / "y.png")
    result = _infer(tmp_path / "two", tmp_path / "two_out", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "two_out" / "mask" / "x_png.png").is_file()
    assert (tmp_path / "two_out" / "mask" / "x.png" / "y.png").is_file()


def test_inputs_of_one_stem_in_separate_runs_never_write_over_each_other(tmp_path, tiny_checkpoint):
    """a.tif then a.png (e.g. two --include runs): both write prob/a.tif unless the folder's record keeps
    the first one's name; a later run of the whole folder keeps both names instead of renaming both."""
    root = tmp_path / "in"
    root.mkdir()
    big, _ = synthetic_em(size=48, seed=1)
    small, _ = synthetic_em(size=32, seed=2)
    tifffile.imwrite(root / "a.tif", small)
    Image.fromarray(big).save(root / "a.png")
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint, "--include", "*.tif").exit_code == 0
    first = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.parent != out}
    assert sorted(first) == ["mask/a.tif", "prob/a.tif"]
    result = _infer(root, out, tiny_checkpoint, "--include", "*.png")
    assert result.exit_code == 0, result.output
    assert {k: (out / k).read_bytes() for k in first} == first  # a.tif's outputs untouched
    assert tifffile.imread(out / "prob" / "a_png.tif").shape == (48, 48)
    result = _infer(root, out, tiny_checkpoint)  # the whole folder: both skipped under their names
    assert _summary(result.output)["skipped"] == 2, result.output
    # a record written before names were kept learns them from the inputs it skips
    record = json.loads((out / "run.json").read_text())
    del record["names"]
    (out / "run.json").write_text(json.dumps(record))
    assert _summary(_infer(root, out, tiny_checkpoint, "--include", "*.tif").output)["skipped"] == 1
    assert json.loads((out / "run.json").read_text())["names"]["a.tif"]["rel"] == "a"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.parent != out) == [
        "mask/a.tif", "mask/a_png.png", "prob/a.tif", "prob/a_png.tif"]


def test_a_failed_input_keeps_its_earlier_outputs_and_does_not_block_the_folder(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    for k in range(2):
        _em_png(root / f"{k}.png", k)
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint).exit_code == 0
    earlier = (out / "mask" / "1.png").read_bytes()
    (root / "1.png").write_bytes(b"no longer an image")
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 1
    row = _manifest(out)["1.png"]
    assert row["status"] == "failed" and row["mask"] == ""
    assert row["message"].endswith("the outputs of an earlier version of this input are kept")
    assert (out / "mask" / "1.png").read_bytes() == earlier
    result = _infer(root, out, tiny_checkpoint)  # tried again, not refused as another run's outputs
    assert result.exit_code == 1 and _manifest(out)["1.png"]["status"] == "failed", result.output
    assert _manifest(out)["0.png"]["status"] == "skipped"


def test_outputs_in_the_input_folder_itself_are_never_taken_as_inputs(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    _em_png(root / "a.png", 1)
    _em_png(root / "sub" / "b.png", 2)
    result = _infer(root, root, tiny_checkpoint)  # the output folder is the input folder
    assert result.exit_code == 0, result.output
    assert _summary(result.output)["inputs"] == 2 and (root / "mask" / "sub" / "b.png").is_file()
    result = _infer(root, root, tiny_checkpoint)
    assert _summary(result.output)["skipped"] == 2 and _summary(result.output)["ignored"] == 0, result.output
    result = _infer(root / "sub", root, tiny_checkpoint)  # the output folder holds the input folder
    assert result.exit_code == 0 and _summary(result.output)["inputs"] == 1, result.output
    result = _infer(root, tmp_path / "elsewhere", tiny_checkpoint)  # nor are an earlier run's outputs
    assert _summary(result.output)["inputs"] == 2, result.output
    # an input folder with masks of its own is not written into
    own = tmp_path / "own"
    (own / "mask").mkdir(parents=True)
    _em_png(own / "a.png", 1)
    (own / "mask" / "a.png").write_bytes(b"my own mask")
    result = _infer(own, own, tiny_checkpoint)
    assert result.exit_code == 1 and "the output folder is the input folder, and its mask/ folder was not " \
        "written by medseg infer" in result.output, result.output
    assert (own / "mask" / "a.png").read_bytes() == b"my own mask"
    # an output folder inside the input is left out whole, files of its own included
    _em_png(root / "out" / "curves.png", 3)
    result = _infer(root, root / "out", tiny_checkpoint)
    assert _summary(result.output)["inputs"] == 2, result.output


def test_a_file_of_ones_own_at_one_output_path_is_never_replaced(tmp_path, tiny_checkpoint):
    _em_png(tmp_path / "in" / "a.png", 1)
    (tmp_path / "out" / "mask").mkdir(parents=True)
    (tmp_path / "out" / "mask" / "a.png").write_bytes(b"mine")  # the mask path only; no prob yet
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1 and "a.png: not written by a run recorded in" in result.output, result.output
    assert (tmp_path / "out" / "mask" / "a.png").read_bytes() == b"mine"


def test_a_moved_input_folder_keeps_its_outputs_names(tmp_path, tiny_checkpoint):
    first = tmp_path / "first"
    for k in range(2):
        _em_png(first / f"{k}.png", k)
    out = tmp_path / "out"
    assert _infer(first, out, tiny_checkpoint).exit_code == 0
    first.rename(tmp_path / "moved")
    result = _infer(tmp_path / "moved", out, tiny_checkpoint)
    assert _summary(result.output)["skipped"] == 2, result.output
    assert sorted(p.name for p in (out / "mask").iterdir()) == ["0.png", "1.png"]


def test_another_folders_input_of_the_same_name_never_replaces_an_inputs_outputs(tmp_path, tiny_checkpoint):
    # dayA/img1.tif segmented, then dayB/img1.tif (another image) into the same folder: its mask replaced
    # dayA's, whose manifest row then pointed at dayB's mask, without a word
    import os
    import shutil

    for day, seed in (("dayA", 1), ("dayB", 2)):  # uncompressed: one size
        (tmp_path / day).mkdir()
        tifffile.imwrite(tmp_path / day / "img1.tif", synthetic_em(size=32, seed=seed)[0])
    out = tmp_path / "out"
    assert _infer(tmp_path / "dayA", out, tiny_checkpoint).exit_code == 0
    first = (out / "prob" / "img1.tif").read_bytes()  # (the untrained network's masks are alike)
    tifffile.imwrite(tmp_path / "dayB" / "zzz.tif", synthetic_em(size=32, seed=3)[0])  # segmented after it
    for same_stamp in (False, True):  # the same size and time stamp as well: was even skipped as done
        if same_stamp:
            stamp = (tmp_path / "dayA" / "img1.tif").stat()
            os.utime(tmp_path / "dayB" / "img1.tif", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        result = _infer(tmp_path / "dayB", out, tiny_checkpoint)
        assert result.exit_code == 1 and "internal error" not in result.output, result.output
        assert _summary(result.output)["failed"] == 1  # reported as the one input refused, not a crash
        assert (out / "prob" / "zzz.tif").is_file()  # and the input after it segmented
        row = _manifest(out)["img1.tif"]  # dayB's row, the last
        assert row["status"] == "failed" and row["mask"] == "", row
        assert f"is the mask of {(tmp_path / 'dayA' / 'img1.tif').as_posix()}, another input of the same name" \
            in row["message"]
        assert (out / "prob" / "img1.tif").read_bytes() == first
    result = _infer(tmp_path / "dayB", out, tiny_checkpoint, "--format", "tiff")  # other mask kind, same map
    assert result.exit_code == 1 and (out / "prob" / "img1.tif").read_bytes() == first
    (tmp_path / "dayC").mkdir()  # a copy, with new times: the same input
    shutil.copy(tmp_path / "dayA" / "img1.tif", tmp_path / "dayC" / "img1.tif")
    os.utime(tmp_path / "dayC" / "img1.tif", ns=(1, 1))
    assert _infer(tmp_path / "dayC", out, tiny_checkpoint).exit_code == 0
    assert _infer(tmp_path / "dayB", out, tiny_checkpoint, "--overwrite").exit_code == 0  # asked for
    assert (out / "prob" / "img1.tif").read_bytes() != first
    shutil.rmtree(out / "mask")  # dayB's outputs gone: dayA's input, still there, has nothing to lose
    shutil.rmtree(out / "prob")
    assert _infer(tmp_path / "dayA", out, tiny_checkpoint).exit_code == 0


def test_an_edited_mask_is_kept_when_its_input_is_only_touched(tmp_path, tiny_checkpoint):
    # a corrected mask was replaced because the input's time stamp changed (touch, a copy, a sync tool)
    import os

    image = _em_png(tmp_path / "in" / "1.png", 1)
    out = tmp_path / "out"
    assert _infer(tmp_path / "in", out, tiny_checkpoint).exit_code == 0
    mask = np.asarray(Image.open(out / "mask" / "1.png")).copy()
    mask[:8, :8] = 0
    Image.fromarray(mask).save(out / "mask" / "1.png")
    corrected = (out / "mask" / "1.png").read_bytes()
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    assert result.exit_code == 1
    row = _manifest(out)["1.png"]
    assert row["status"] == "failed" and "mask/1.png was edited since it was written (a corrected mask? a copy of " \
        "the folder without its file times counts too) and is kept; move it away to segment the input again, or " \
        "pass --overwrite" in row["message"], row
    assert (out / "mask" / "1.png").read_bytes() == corrected
    assert _infer(tmp_path / "in", out, tiny_checkpoint, "--overwrite").exit_code == 0
    assert (out / "mask" / "1.png").read_bytes() != corrected


def test_a_dicom_file_given_alone_has_its_series_uid_in_the_manifest(tmp_path, tiny_checkpoint):
    path = write_dicom_slice(tmp_path / "one.dcm", np.full((24, 24), 40, np.int16), series_uid="1.2.8.7",
                             position=(0, 0, 0))
    assert _infer(path, tmp_path / "out", tiny_checkpoint).exit_code == 0
    assert _manifest(tmp_path / "out")["one.dcm"]["series_uid"] == "1.2.8.7"  # was empty
    assert _infer(path, tmp_path / "out", tiny_checkpoint).exit_code == 0  # its earlier row replaced, not kept
    rows = list(csv.DictReader(open(tmp_path / "out" / "manifest.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == ["skipped"]


def test_single_slice_volume_as_png(tmp_path, tiny_checkpoint):
    write_dicom_slice(tmp_path / "in" / "one.dcm", np.full((24, 24), 40, np.int16), series_uid="1.2.8",
                      position=(0, 0, 0))
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint, "--format", "png")
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "out" / "mask" / "in.png"))
    assert mask.shape == (24, 24) and tifffile.imread(tmp_path / "out" / "prob" / "in.tif").shape == (24, 24)


def test_nifti_outputs_keep_the_inputs_unit_and_codes(tmp_path, tiny_checkpoint):
    """A micrometre NIfTI stays micrometres with its own sform/qform codes; a calibrated TIFF gives micrometres."""
    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=4)
    volume = np.stack([image.T] * 2, axis=-1).astype(np.uint8)
    src = nib.Nifti1Image(volume, np.diag([0.25, 0.25, 0.5, 1.0]))
    src.header.set_xyzt_units("micron")
    src.set_sform(src.affine, code=2)
    src.set_qform(src.affine, code=0)
    nib.save(src, root / "um.nii.gz")
    plain = nib.Nifti1Image(volume, np.eye(4))  # no unit given: stays so
    plain.header.set_xyzt_units("unknown")
    nib.save(plain, root / "nounit.nii.gz")
    write_tiff(root / "cal.tif", np.stack([image, image]), spacing=(0.5, 0.2, 0.2), unit="um")
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint, "--include", "*.nii.gz").exit_code == 0
    for kind in ("mask", "prob"):
        header = nib.load(out / kind / "um.nii.gz").header
        assert header.get_xyzt_units()[0] == "micron"
        assert (int(header["sform_code"]), int(header["qform_code"])) == (2, 0)
        np.testing.assert_allclose(nib.load(out / kind / "um.nii.gz").affine, src.affine)
        assert nib.load(out / kind / "nounit.nii.gz").header.get_xyzt_units()[0] == "unknown"
    assert _infer(root, tmp_path / "tif", tiny_checkpoint, "--include", "*.tif", "--format", "nifti").exit_code == 0
    cal = nib.load(tmp_path / "tif" / "mask" / "cal.nii.gz")
    assert cal.header.get_xyzt_units()[0] == "micron"
    np.testing.assert_allclose(cal.header.get_zooms()[:2], [0.2, 0.2], rtol=1e-5)


def test_nifti_outputs_keep_a_qform_that_differs_from_the_sform(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=5)
    src = nib.Nifti1Image(np.stack([image.T] * 2, axis=-1), np.diag([0.5, 0.5, 2.0, 1.0]))
    qform = np.diag([0.5, 0.5, 2.0, 1.0])
    qform[:3, 3] = [-8.0, 4.0, 12.0]  # the scanner frame; the sform an aligned one
    src.set_qform(qform, code=1)
    src.set_sform(np.diag([0.5, 0.5, 2.0, 1.0]), code=2)
    nib.save(src, root / "two.nii.gz")
    assert _infer(root, tmp_path / "out", tiny_checkpoint).exit_code == 0
    for kind in ("mask", "prob"):
        header = nib.load(tmp_path / "out" / kind / "two.nii.gz").header
        np.testing.assert_allclose(header.get_qform(), qform)
        np.testing.assert_allclose(header.get_sform(), src.get_sform())
        assert (int(header["sform_code"]), int(header["qform_code"])) == (2, 1)


def test_tiff_outputs_keep_the_inputs_calibration(tmp_path, tiny_checkpoint):
    """A calibrated stack's outputs keep pixel size and slice spacing; a 2D image's mask and probability map too."""
    from medseg.readers import read_geometry

    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=4)
    write_tiff(root / "stack.tif", np.stack([image, image, image]), spacing=(2.5, 0.5, 0.25), unit="um")
    write_tiff(root / "plane.tif", image, spacing=(0.004, 0.004), unit="um")
    um = nib.Nifti1Image(np.stack([image.T] * 2, axis=-1), np.diag([0.25, 0.25, 0.5, 1.0]))
    um.header.set_xyzt_units("micron")
    nib.save(um, root / "um.nii.gz")
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint, "--format", "tiff").exit_code == 0
    for kind, suffix in (("mask", ".tif"), ("prob", ".tif")):
        stack = read_geometry(out / kind / f"stack{suffix}")
        assert stack["spacing_unit"] == "um" and stack["slice_count"] == 3, kind
        np.testing.assert_allclose(stack["spacing"], [2.5, 0.5, 0.25], rtol=1e-6)
        plane = read_geometry(out / kind / f"plane{suffix}")
        assert plane["spacing_unit"] == "um", kind
        np.testing.assert_allclose(plane["spacing"], [0.004, 0.004], rtol=1e-6)
        nifti = read_geometry(out / kind / f"um{suffix}")  # a micrometre NIfTI written as TIFF
        assert nifti["spacing_unit"] == "um", kind
        np.testing.assert_allclose(nifti["spacing"], [0.5, 0.25, 0.25], rtol=1e-6)


def test_manifest_is_utf8_whatever_the_locale(tmp_path):
    # a non-UTF-8 locale (C on POSIX, cp1252 on Windows) must not stop a batch at its manifest
    import os
    import subprocess
    import sys

    name = "名前 é.png"
    (tmp_path / name).write_bytes(b"")
    code = ("import os, sys; from pathlib import Path; from medseg.batch import ManifestRow, write_manifest; "
            "d = Path(sys.argv[1]); files = [f for f in os.listdir(d) if f.endswith('.png')]; "
            "write_manifest(d / 'manifest.csv', [ManifestRow(input=str(d / f), status='ok') for f in files])")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path).encode()], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    rows = list(csv.DictReader((tmp_path / "manifest.csv").open(encoding="utf-8")))
    assert [Path(r["input"]).name for r in rows] == [name]


def test_fingerprint_of_a_series_ignores_other_files_in_its_folder(tmp_path):
    from medseg.batch import input_fingerprint

    series = write_dicom_series(tmp_path / "ct", n=3)
    first = input_fingerprint(series)
    (series / ".DS_Store").write_bytes(b"finder")
    (series / "README.txt").write_text("notes")
    write_dicom_slice(series / "other.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.77",
                      position=(0.0, 0.0, 0.0))  # another series beside it
    uid = "1.2.826.0.1.3680043.8.498.10"
    assert input_fingerprint(series, uid) == first


def test_a_nifti_without_a_unit_gives_an_uncalibrated_tiff(tmp_path, tiny_checkpoint):
    from medseg.readers import read_geometry

    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=6)
    plain = nib.Nifti1Image(np.stack([image.T] * 2, axis=-1), np.diag([0.7, 0.7, 3.0, 1.0]))
    plain.header.set_xyzt_units("unknown")
    nib.save(plain, root / "nounit.nii.gz")
    assert _infer(root, tmp_path / "out", tiny_checkpoint, "--format", "tiff").exit_code == 0
    assert read_geometry(tmp_path / "out" / "mask" / "nounit.tif")["spacing_unit"] == "pixel"


def test_one_series_in_two_folders_keeps_two_names(tmp_path, tiny_checkpoint):
    # a series copied (or split) into two folders: two inputs with one SeriesInstanceUID; each keeps its own
    # name and outputs on every run, instead of the second taking the first's name and writing over it
    from conftest import write_dicom_series

    root = tmp_path / "in"
    write_dicom_series(root / "part1", n=3, size=48)
    write_dicom_series(root / "part2", n=2, size=48)
    out = tmp_path / "out"
    for attempt in range(2):
        result = _infer(root, out, tiny_checkpoint, "--format", "nifti")
        assert result.exit_code == 0, result.output
        rows = _manifest(out)
        assert sorted(r["mask"] for r in rows.values()) == [str(out / "mask" / "part1.nii.gz"),
                                                            str(out / "mask" / "part2.nii.gz")], rows
        assert nib.load(out / "mask" / "part1.nii.gz").shape[2] == 3
        assert nib.load(out / "mask" / "part2.nii.gz").shape[2] == 2
        if attempt:  # the second run finds both done
            assert {r["status"] for r in rows.values()} == {"skipped"}, rows
    # a folder written by earlier versions, which keyed both by the UID alone: the second had taken the
    # name over (and written part1's mask into part2); each series takes its own name back
    record = json.loads((out / "run.json").read_text())
    (uid,) = {k.rsplit("/", 1)[1] for k in record["names"]}
    record["names"] = {f"dicom:{uid}": record["names"][f"dicom:part2/{uid}"]}
    (out / "run.json").write_text(json.dumps(record))
    result = _infer(root, out, tiny_checkpoint, "--format", "nifti")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "mask").iterdir()) == ["part1.nii.gz", "part2.nii.gz"]


def test_a_series_recorded_by_its_uid_alone_keeps_its_name(tmp_path, tiny_checkpoint):
    # run.json of earlier versions keyed a series by its UID alone: a series found once still goes by it
    from conftest import write_dicom_series

    root = tmp_path / "in"
    write_dicom_series(root / "sub" / "ct", n=2, size=48)
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint).exit_code == 0
    record = json.loads((out / "run.json").read_text())
    (key, name), = record["names"].items()
    assert key.startswith("dicom:sub/ct/")
    record["names"] = {"dicom:" + key.rsplit("/", 1)[1]: name}
    (out / "run.json").write_text(json.dumps(record))
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in _manifest(out).values()] == ["skipped"]


def test_a_series_of_images_without_positions_is_segmented_image_by_image(tmp_path, tiny_checkpoint):
    # secondary captures, ultrasound frames: one series, no ImagePositionPatient to order them into a volume
    from conftest import write_dicom_slice

    root = tmp_path / "in" / "sc"
    for k in range(3):
        write_dicom_slice(root / f"img{k}.dcm", np.full((48, 48), 50 * k, np.int16), series_uid="1.2.3.4.5",
                          position=None, instance=k + 1)
    out = tmp_path / "out"
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    rows = _manifest(out)
    assert sorted(rows) == ["img0.dcm", "img1.dcm", "img2.dcm"]
    assert {r["status"] for r in rows.values()} == {"ok"} and {r["slices"] for r in rows.values()} == {"1"}
    assert sorted(p.name for p in (out / "mask" / "sc").iterdir()) == [
        "img0.seg.dcm", "img1.seg.dcm", "img2.seg.dcm"]
    # --exclude leaves such a file out; one file without a position in a positioned series is an error
    result = _infer(tmp_path / "in", tmp_path / "some", tiny_checkpoint, "--exclude", "sc/img1.dcm")
    assert sorted(_manifest(tmp_path / "some")) == ["img0.dcm", "img2.dcm"]
    ct = tmp_path / "ct"
    for k in range(3):
        write_dicom_slice(ct / "s" / f"img{k}.dcm", np.full((48, 48), 50 * k, np.int16), series_uid="1.2.3.4.6",
                          position=None if k == 1 else (0.0, 0.0, 2.0 * k), instance=k + 1)
    result = _infer(ct, tmp_path / "ct_out", tiny_checkpoint)
    assert result.exit_code == 1
    (row,) = _manifest(tmp_path / "ct_out").values()
    assert row["status"] == "failed" and "img1.dcm: no ImagePositionPatient" in row["message"]


def test_an_excluded_file_of_a_dicom_series_is_said_to_be_read_with_it(tmp_path, caplog):
    # a series is read whole from its folder: an --exclude of one of its files was silently not applied, and
    # the file it named could then be the one a failure blamed
    from medseg.discovery import discover

    folder = write_dicom_series(tmp_path / "in" / "ct", n=3)
    inputs, _ = discover(str(tmp_path / "in"), (), ("IM001.dcm",), True)
    assert [i.rel for i in inputs] == ["ct"]
    said = [r.getMessage() for r in caplog.records if "left out by --include/--exclude" in r.getMessage()]
    assert said == [f"{folder / 'IM001.dcm'}: left out by --include/--exclude, but a DICOM series is read whole "
                    "from its folder, so it is read with its series; move it out of the folder to leave it out"]
    caplog.clear()
    discover(str(tmp_path / "in"), (), (), True)
    assert "left out" not in caplog.text


def test_a_run_with_another_include_adds_to_the_manifest(tmp_path, tiny_checkpoint):
    # the manifest lists what the folder holds: a later run over other inputs keeps the earlier rows
    root = tmp_path / "in"
    root.mkdir()
    for k, name in enumerate(("a", "b")):
        _em_png(root / f"{name}.png", k)
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint, "--include", "a.png").exit_code == 0
    result = _infer(root, out, tiny_checkpoint, "--include", "b.png")
    assert result.exit_code == 0, result.output
    assert _summary(result.output)["inputs"] == 1  # this run's count
    rows = _manifest(out)
    assert sorted(rows) == ["a.png", "b.png"] and {r["status"] for r in rows.values()} == {"ok"}
    (out / "mask" / "a.png").unlink()  # an earlier row whose outputs are gone is dropped
    assert _infer(root, out, tiny_checkpoint, "--include", "b.png").exit_code == 0
    assert sorted(_manifest(out)) == ["b.png"]


def test_the_failure_of_an_input_deleted_since_leaves_the_manifest(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    _em_png(root / "good.png", 0)
    (root / "bad.png").write_bytes(b"not an image")
    (root / "other.png").write_bytes(b"not an image either")
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint).exit_code == 1
    assert _manifest(out)["bad.png"]["status"] == "failed"
    (root / "bad.png").unlink()  # the user removes the bad file
    result = _infer(root, out, tiny_checkpoint, "--include", "good.png")
    assert result.exit_code == 0, result.output
    rows = _manifest(out)
    assert sorted(rows) == ["good.png", "other.png"]  # nothing to try again for bad.png; other.png still fails
    assert rows["other.png"]["status"] == "failed"


def test_the_manifest_tells_series_of_one_folder_apart(tmp_path, tiny_checkpoint, monkeypatch):
    # two series in one folder are two inputs of one path: a run over one keeps the other's row; paths are
    # absolute, so a run from another folder matches them too
    from conftest import write_dicom_series

    study = tmp_path / "in" / "study"
    write_dicom_series(study, n=2, size=48, series_uid="1.2.3.1", series_number=1, prefix="A")
    write_dicom_series(study, n=2, size=48, series_uid="1.2.3.2", series_number=2, prefix="B")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert _infer(Path("in"), Path("out"), tiny_checkpoint, "--format", "nifti").exit_code == 0
    monkeypatch.chdir(study)
    result = _infer(tmp_path / "in", out, tiny_checkpoint, "--format", "nifti", "--include", "study/A*")
    assert result.exit_code == 0, result.output
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["series_uid"] for r in rows) == ["1.2.3.1", "1.2.3.2"]
    assert all(Path(r["input"]).is_absolute() and Path(r["mask"]).is_absolute() for r in rows)


def test_jpeg_pictures_are_segmented_upright_under_their_own_names(tmp_path, tiny_checkpoint):
    """A phone or camera JPEG stored sideways with an EXIF orientation: the mask is the picture as shown."""
    image, _ = synthetic_em(size=40, seed=2)
    (tmp_path / "in").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image[:, :30]).save(tmp_path / "in" / "phone.jpg", quality=95, exif=exif)
    Image.fromarray(image).save(tmp_path / "in" / "scan.JPEG", quality=95)
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "out" / "mask" / "phone.png")).shape == (30, 40)  # 40 × 30 stored
    assert tifffile.imread(tmp_path / "out" / "prob" / "phone.tif").shape == (30, 40)
    assert np.asarray(Image.open(tmp_path / "out" / "mask" / "scan.png")).shape == (40, 40)
    rows = _manifest(tmp_path / "out")
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert {r["format"] for r in rows.values()} == {"jpeg"}  # the input's kind, not the reader's


def _killed_while_writing(args: list, prob_name: str) -> None:
    """Run ``medseg`` with ``args`` in a process that dies (as by kill -9) when it begins the probability map
    ``prob_name``, that input's mask written; a temporary file of the write is left behind."""
    import subprocess
    import sys

    killer = ("import os, sys\n"
              "import medseg.writers as w\n"
              "real = w.write_tiff\n"
              "def dying(path, *a, **k):\n"
              f"    if os.path.basename(str(path)) == {prob_name!r}:\n"
              "        open(os.path.join(os.path.dirname(str(path)), '.1.abcd1234.part.tif'), 'wb').close()\n"
              "        os._exit(9)\n"
              "    return real(path, *a, **k)\n"
              "w.write_tiff = dying\n"
              "from medseg.cli import app\n"
              "app(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", killer, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr


def test_a_batch_killed_between_an_inputs_mask_and_prob_is_finished_by_running_it_again(tmp_path, tiny_checkpoint):
    """A kill -9 (or a power cut) after one input's mask and before its probability map: the rerun redoes that
    input and the rest, instead of refusing the mask as a file of unknown origin; the temporary file the
    killed write left is removed."""
    for k in range(3):
        _em_png(tmp_path / "in" / f"{k}.png", seed=k)
    out = tmp_path / "out"
    args = ["infer", BUNDLE, tmp_path / "in", out, "--checkpoint", tiny_checkpoint, "--no-progress", "--device",
            "cpu", *[a for item in TINY_NET for a in ("--set", item)]]
    _killed_while_writing(args, "1.tif")
    assert (out / "mask" / "1.png").is_file() and not (out / "prob" / "1.tif").exists()
    (out / ".run.k2j4x9a0.part.json").write_text("{")  # the record's own write, killed
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = _manifest(out)
    assert rows["0.png"]["status"] == "skipped"
    assert rows["1.png"]["status"] == "ok" and "killed while segmenting it" in rows["1.png"]["message"]
    assert rows["2.png"]["status"] == "ok"
    assert (out / "prob" / "1.tif").is_file() and not list(out.rglob(".*.part.*"))
    assert "pending" not in json.loads((out / "run.json").read_text())
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    assert {r["status"] for r in _manifest(out).values()} == {"skipped"}


def test_a_killed_overwrite_by_another_model_never_leaves_mixed_outputs_skipped(tmp_path, tiny_checkpoint):
    # run A segments it; run B (other settings) --overwrite is killed after its mask: mask/1.png is
    # B's, prob/1.tif still A's, both recorded as A's; a rerun of A must redo input 1, not skip it
    _em_png(tmp_path / "in" / "1.png", seed=1)
    out = tmp_path / "out"
    args = ["infer", BUNDLE, tmp_path / "in", out, "--checkpoint", tiny_checkpoint, "--no-progress", "--device",
            "cpu", *[a for item in TINY_NET for a in ("--set", item)]]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    _killed_while_writing([*args, "--overwrite", "--tta"], "1.tif")
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = _manifest(out)
    assert rows["1.png"]["status"] == "ok" and "killed while segmenting it" in rows["1.png"]["message"]


def test_a_failed_overwrite_leaves_files_of_unknown_origin_refused(tmp_path, tiny_checkpoint):
    _em_png(tmp_path / "in" / "0.png", seed=0)
    out = tmp_path / "out"
    for kind, name in (("mask", "0.png"), ("prob", "0.tif")):
        (out / kind).mkdir(parents=True)
        (out / kind / name).write_bytes(b"a file of the user's own")
    assert "not written by a run recorded" in _infer(tmp_path / "in", out, tiny_checkpoint).output
    (tmp_path / "in" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the --overwrite run fails on it
    assert _infer(tmp_path / "in", out, tiny_checkpoint, "--overwrite").exit_code == 1
    _em_png(tmp_path / "in" / "0.png", seed=0)
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    assert result.exit_code == 1 and "not written by a run recorded" in result.output
    assert (out / "mask" / "0.png").read_bytes() == b"a file of the user's own"


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_input_folder_inside_the_outputs_mask_folder_is_refused_and_untouched(tmp_path, tiny_checkpoint,
                                                                                  overwrite):
    # `infer d/mask d` would write each mask/N.png over the image it is made from
    for k in range(2):
        _em_png(tmp_path / "d" / "mask" / f"{k}.png", seed=k)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d" / "mask").iterdir()}
    for inputs in (tmp_path / "d" / "mask", tmp_path / "d" / "mask" / "1.png"):
        result = _infer(inputs, tmp_path / "d", tiny_checkpoint, *(["--overwrite"] if overwrite else []))
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "lies in the output folder's mask/, where the outputs are written" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "d" / "mask").iterdir()} == before


def test_linked_unreadable_and_broken_entries_are_followed_or_reported(tmp_path, tiny_checkpoint):
    import os

    _em_png(tmp_path / "in" / "0.png", seed=0)
    _em_png(tmp_path / "elsewhere" / "1.png", seed=1)
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "linked")  # a folder of images linked in: followed
    os.symlink(tmp_path / "in", tmp_path / "in" / "linked" / "up")  # a link back up: entered once, no loop
    os.symlink(tmp_path / "gone.png", tmp_path / "in" / "broken.png")
    os.symlink(tmp_path / "gone.md", tmp_path / "in" / "README.md")  # a dataset manager's absent file: not ours
    _em_png(tmp_path / "in" / "zz_data" / "2.png", seed=2)
    os.symlink("zz_data", tmp_path / "in" / "alias")  # a folder under INPUT and a link to it: its own name wins
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    rows = _manifest(tmp_path / "out")
    assert rows["0.png"]["status"] == rows["1.png"]["status"] == rows["2.png"]["status"] == "ok"
    assert (tmp_path / "out" / "mask" / "linked" / "1.png").is_file()
    assert (tmp_path / "out" / "mask" / "zz_data" / "2.png").is_file()
    assert not (tmp_path / "out" / "mask" / "alias").exists()
    assert rows["broken.png"]["status"] == "failed" and "link whose target does not exist" in rows["broken.png"][
        "message"]
    assert rows["README.md"]["status"] == "ignored"
    assert len(rows) == 5


def test_an_unreadable_sub_folder_is_a_failed_input_not_silence(tmp_path, tiny_checkpoint, monkeypatch):
    _em_png(tmp_path / "in" / "0.png", seed=0)
    _em_png(tmp_path / "in" / "sub" / "1.png", seed=1)
    real_scandir = os.scandir

    def scandir(path="."):  # as for a folder without read permission (root reads any, so chmod cannot show it)
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1, result.output
    rows = _manifest(tmp_path / "out")
    assert rows["0.png"]["status"] == "ok" and rows["sub"]["status"] == "failed"
    assert "sub: cannot list the folder (Permission denied); check its permissions" in rows["sub"]["message"]
    result = _infer(tmp_path / "in" / "sub", tmp_path / "out2", tiny_checkpoint)  # the input folder itself
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: {tmp_path / 'in' / 'sub'}: cannot list the folder (Permission denied); check its permissions"]


def test_a_full_disk_stops_the_batch_at_once_with_one_line(tmp_path, tiny_checkpoint, monkeypatch):
    # every input after it would be segmented in full and then fail the same way
    import medseg.writers

    for k in range(3):
        _em_png(tmp_path / "in" / f"{k}.png", seed=k)
    out = tmp_path / "out"
    assert _infer(tmp_path / "in" / "0.png", out, tiny_checkpoint).exit_code == 0
    real, calls = medseg.writers.write_tiff, []

    def full(path, *args, **kwargs):
        calls.append(path)
        raise OSError("262144 requested and 127932 written")  # numpy's short write, as on a full disk

    monkeypatch.setattr(medseg.writers, "write_tiff", full)
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("failed:", " "))]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert lines[-1] == (f"error: {out}: cannot write the outputs (262144 requested and 127932 written); stopped "
                         "after 1 of 3 inputs; free disk space (or raise the quota or file-size limit) and run the "
                         "same command again to do the rest")
    assert len(calls) == 1  # 2.png was not tried
    rows = _manifest(out)
    assert rows["0.png"]["status"] == "skipped" and rows["1.png"]["status"] == "failed"
    assert "its outputs could not be written" in rows["1.png"]["message"] and "2.png" not in rows
    monkeypatch.setattr(medseg.writers, "write_tiff", real)
    assert _infer(tmp_path / "in", out, tiny_checkpoint).exit_code == 0
    assert {r["status"] for r in _manifest(out).values()} == {"ok", "skipped"}


@pytest.mark.parametrize("failure", ["memory", "cuda memory", "device", "kernel"])
def test_a_gpu_out_of_memory_fails_its_input_and_a_lost_gpu_stops_the_batch(tmp_path, tiny_checkpoint, monkeypatch,
                                                                            failure):
    # a CUDA out-of-memory input was reported in torch's words alone; after a device-side failure every later
    # input was segmented and failed alike, one by one; a CUDA error after which the GPU still works (checked
    # by a small computation on it) fails its input alone
    import torch

    import medseg.batch
    import medseg.writers

    monkeypatch.setattr(medseg.batch, "_gpu_works", lambda: failure == "kernel")

    for k in range(3):
        _em_png(tmp_path / "in" / f"{k}.png", seed=k)
    real, calls = medseg.writers.SaveSegmentationd.mask_of, []

    def second_fails(self, pred, fmt):
        calls.append(fmt)
        if len(calls) == 2:
            if failure == "memory":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")
            if failure == "cuda memory":
                raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
            if failure == "kernel":
                raise RuntimeError("CUDA error: invalid configuration argument\nCUDA kernel errors might be "
                                   "asynchronously reported")
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                               "asynchronously reported")
        return real(self, pred, fmt)

    monkeypatch.setattr(medseg.writers.SaveSegmentationd, "mask_of", second_fails)
    out = tmp_path / "out"
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    rows = _manifest(out)
    assert rows["0.png"]["status"] == "ok" and rows["1.png"]["status"] == "failed"
    if failure in ("memory", "cuda memory"):
        said = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)" if failure == "memory" \
            else "CUDA error: out of memory"
        assert rows["1.png"]["message"] == (
            f"{tmp_path / 'in' / '1.png'}: out of GPU memory ({said}); lower --set whole_max_pixels (larger images "
            "then go window by window) or sw_batch_size (for isbi_em, -s close_contours=false saves the most on a "
            "large slice), or use --device cpu")
        assert rows["2.png"]["status"] == "ok"
    elif failure == "kernel":
        assert "CUDA error: invalid configuration argument" in rows["1.png"]["message"]
        assert rows["2.png"]["status"] == "ok"
    else:
        assert "2.png" not in rows and len(calls) == 2
        assert result.output.strip().splitlines()[-1] == (
            f"error: {tmp_path / 'in' / '1.png'}: the GPU failed (CUDA error: an illegal memory access was "
            "encountered), and every later input would fail alike; stopped after 1 of 3 inputs; run the same "
            "command again to do the rest (with --device cpu if it fails again)")


def test_an_unreadable_or_damaged_run_record_is_named_as_such(tmp_path, tiny_checkpoint, monkeypatch):
    _em_png(tmp_path / "in" / "0.png", seed=0)
    out = tmp_path / "out"
    assert _infer(tmp_path / "in", out, tiny_checkpoint).exit_code == 0
    real = Path.read_text

    def locked(self, *args, **kwargs):
        if self.name == "run.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked)
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{out / 'run.json'}: cannot read the folder's run record (Permission denied)" in result.output
    monkeypatch.setattr(Path, "read_text", real)
    (out / "run.json").write_text('{"runs": {}, "outp')
    result = _infer(tmp_path / "in", out, tiny_checkpoint)
    assert result.exit_code == 1 and f"{out / 'run.json'}: the folder's run record is damaged" in result.output


def test_sigterm_stops_a_batch_as_ctrl_c_does_keeping_the_finished_inputs(tmp_path, tiny_checkpoint, monkeypatch):
    import signal

    import medseg.writers

    for k in range(3):
        _em_png(tmp_path / "in" / f"{k}.png", seed=k)
    real = medseg.writers.write_tiff

    def terminated_in_the_second(path, *args, **kwargs):
        if Path(path).name == "1.tif":  # its mask written, its probability map not yet
            os.kill(os.getpid(), signal.SIGTERM)
        real(path, *args, **kwargs)

    monkeypatch.setattr(medseg.writers, "write_tiff", terminated_in_the_second)
    previous = signal.getsignal(signal.SIGTERM)
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    # 143 (128 + SIGTERM), as for a job the signal killed, so that a scheduler reports it as terminated
    assert result.exit_code == 143 and "Traceback" not in result.output, result.output
    assert signal.getsignal(signal.SIGTERM) is previous  # given back as it was
    assert _manifest(tmp_path / "out")["0.png"]["status"] == "ok"
    assert not (tmp_path / "out" / "mask" / "1.png").exists() and not list((tmp_path / "out").rglob(".*.part.*"))
    monkeypatch.setattr(medseg.writers, "write_tiff", real)
    assert _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint).exit_code == 0
    assert [r["status"] for r in _manifest(tmp_path / "out").values()] == ["skipped", "ok", "ok"]


def test_a_series_uid_never_brings_a_path_into_the_output_names(tmp_path, tiny_checkpoint, caplog):
    # the UID comes from the file: '../..' or '/abs' in it must not place outputs outside the output folder,
    # nor give two series one name (two series of one number are named by their UIDs)
    import warnings

    root = tmp_path / "work" / "in"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UI values
        for uid, z in (("../../../ESCAPED", 0.0), ("/medseg_uid_test_ABS", 50.0)):
            for k in range(2):
                write_dicom_slice(root / f"{'a' if z == 0 else 'b'}{k}.dcm", np.full((48, 48), 10 * k, np.int16),
                                  series_uid=uid, position=(0.0, 0.0, z + 2.0 * k), instance=k + 1)
    out = tmp_path / "work" / "out"
    caplog.clear()  # what writing them said
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = _infer(root, out, tiny_checkpoint, "--format", "tiff")
    assert result.exit_code == 0, result.output
    # pydicom's check of each value (here the UIDs, renamed below) is not said, twice per file, to the user
    assert not [w for w in said if "Invalid value for VR" in str(w.message)]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".tif", ".csv", ".json"))
    assert all(p.is_relative_to(out) for p in written), written
    assert not Path("/medseg_uid_test_ABS.tif").exists()
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}, rows
    masks = sorted(Path(r["mask"]).name for r in rows)
    assert len(set(masks)) == 2 and all(m.startswith("series_") for m in masks), masks
    shutil.copytree(root, tmp_path / "again")  # files not read before in this process
    with warnings.catch_warnings(record=True) as said:  # --debug keeps them
        warnings.simplefilter("always")
        result = runner.invoke(app, ["--debug", "infer", str(BUNDLE), str(tmp_path / "again"), str(tmp_path / "o2"),
                                     "--checkpoint", str(tiny_checkpoint), "--no-progress", "--format", "tiff",
                                     *[a for item in TINY_NET for a in ("--set", item)]])
    assert result.exit_code == 0, result.output
    assert [w for w in said if "Invalid value for VR UI" in str(w.message)]


def test_a_bad_series_number_is_no_number_and_stops_nothing(tmp_path, tiny_checkpoint):
    import pydicom

    from medseg.dicom import series_number

    series = write_dicom_series(tmp_path / "in" / "ct", n=2, size=48)
    for f in series.iterdir():  # SeriesNumber (0020,0011) 'x1': pydicom reads it, with a warning
        data, tag = f.read_bytes(), b"\x20\x00\x11\x00IS\x02\x00"
        assert data.count(tag + b"1 ") == 1
        f.write_bytes(data.replace(tag + b"1 ", tag + b"x1"))
    _em_png(tmp_path / "in" / "good.png", seed=1)
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):
        assert series_number(pydicom.dcmread(next(series.iterdir()))) is None
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in _manifest(tmp_path / "out").values()} == {"ok"}


def test_an_output_name_too_long_for_a_file_fails_that_input_alone(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    long = "X" * 251
    _em_png(root / f"{long}.png", seed=1)
    tifffile.imwrite(root / f"{long}.tif", synthetic_em(size=32, seed=1)[0])  # both want mask/XXX.png: '_png'
    # and '_tif' make the names 259 bytes
    _em_png(root / "good.png", seed=2)
    result = _infer(root, tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1, result.output
    rows = _manifest(tmp_path / "out")
    assert rows["good.png"]["status"] == "ok"
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("rename the input to a shorter name" in r["message"] for r in failed), failed


def test_an_output_mask_folder_linked_to_the_input_is_refused(tmp_path, tiny_checkpoint):
    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    before = (root / "a.png").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "mask").symlink_to(root)
    result = _infer(root, out, tiny_checkpoint, "--overwrite")
    assert result.exit_code == 1 and "output folder's mask/ is a link to" in result.output, result.output
    assert (root / "a.png").read_bytes() == before
    # a link to a folder inside the input: its images would be replaced by the masks of those above
    _em_png(root / "sub" / "a.png", seed=2)
    inner = (root / "sub" / "a.png").read_bytes()
    (out / "mask").unlink()
    (out / "mask").symlink_to(root / "sub")
    result = _infer(root, out, tiny_checkpoint, "--overwrite")
    assert result.exit_code == 1 and "which holds or lies in the input" in result.output, result.output
    assert (root / "sub" / "a.png").read_bytes() == inner


def test_an_input_redone_in_another_kind_keeps_no_outputs_of_the_earlier_run(tmp_path, tiny_checkpoint):
    # --overwrite with --no-prob or another --format left the earlier run's map or mask beside the new ones
    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint).exit_code == 0
    (out / "mine.tif").write_bytes(b"a file of the user's")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*") if p.parent != out) == [
        "mask/a.png", "prob/a.tif"]
    # the same model and settings in another kind as well: both kept
    assert _infer(root, out, tiny_checkpoint, "--format", "tiff").exit_code == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*") if p.parent != out) == [
        "mask/a.png", "mask/a.tif", "prob/a.tif"]
    result = _infer(root, out, tiny_checkpoint, "--format", "nifti", "--tta")  # the others are another run's
    assert result.exit_code == 1 and "the outputs of 'a' were made with" in result.output, result.output
    result = _infer(root, out, tiny_checkpoint, "--format", "nifti", "--tta", "--no-prob", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*") if p.parent != out) == [
        "mask/a.nii.gz"]
    record = json.loads((out / "run.json").read_text())
    assert sorted(record["outputs"]) == ["mask/a.nii.gz"]
    assert (out / "mine.tif").read_bytes() == b"a file of the user's"
    result = _infer(root, out, tiny_checkpoint, "--format", "nifti", "--tta", "--no-prob")  # all done: skipped
    assert result.exit_code == 0 and _manifest(out)["a.png"]["status"] == "skipped", result.output


def test_infer_leaves_the_tifffile_logger_as_it_found_it(tmp_path, tiny_checkpoint):
    # tifffile's own log of a corrupt file is quiet during the batch (the manifest names the file), not after
    import logging

    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    (root / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    logger = logging.getLogger("tifffile")
    before = logger.level
    result = _infer(root, tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1 and _manifest(tmp_path / "out")["a.png"]["status"] == "ok"
    assert logger.level == before


def test_a_corrected_mask_of_another_kind_is_kept_when_another_run_redoes_its_input(tmp_path, tiny_checkpoint):
    # an output edited since it was written (a hand-corrected mask) is the user's: --overwrite in another kind
    # leaves it in place, no longer recorded as the earlier run's
    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    _em_png(root / "b.png", seed=2)
    out = tmp_path / "out"
    assert _infer(root, out, tiny_checkpoint).exit_code == 0
    corrected = np.zeros((32, 32), np.uint8)
    Image.fromarray(corrected).save(out / "mask" / "a.png")
    result = _infer(root, out, tiny_checkpoint, "--format", "nifti", "--tta", "--overwrite")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(Image.open(out / "mask" / "a.png")), corrected)
    assert not (out / "mask" / "b.png").exists()  # b's, as written, went
    record = json.loads((out / "run.json").read_text())
    assert "mask/a.png" not in record["outputs"] and sorted(record["stamps"]) == sorted(record["outputs"])
    assert "kept mask/a.png: another run's output, changed or copied since" in _manifest(out)["a.png"]["message"]


def test_a_setting_that_sends_the_writers_outputs_elsewhere_is_refused(tmp_path, tiny_checkpoint):
    # a nested id of the writer got past the check of the command's own ids: masks went to B, the record to A
    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "--set",
                    f"postprocessing#transforms#3#output_dir={tmp_path / 'elsewhere'}")
    assert result.exit_code == 1 and "where the command reads and writes follows its arguments" in result.output
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "out").exists()
    overlay = tmp_path / "elsewhere.json"  # an overlay file's setting of it, read as MONAI reads overlays
    overlay.write_text(json.dumps({"postprocessing#transforms#3#output_dir": str(tmp_path / "elsewhere")}))
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "-c", overlay)
    assert result.exit_code == 1 and "elsewhere.json: sets postprocessing#transforms#3#output_dir" in result.output
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "out").exists()
    # the writer given whole, its folder inside: a literal path named in the overlay, one worked out from the
    # command's folder found on the writer itself
    writer = json.loads((BUNDLE / "configs" / "inference.json").read_text())["postprocessing"]["transforms"][3]
    writer["output_dir"] = str(tmp_path / "elsewhere")
    overlay.write_text(json.dumps({"postprocessing#transforms#3": writer}))
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "-c", overlay)
    assert result.exit_code == 1 and "elsewhere.json: sets postprocessing#transforms#3#output_dir; where the " \
        "command reads and writes follows" in result.output, result.output
    writer["output_dir"] = "$@output_dir + '/../elsewhere'"
    overlay.write_text(json.dumps({"postprocessing#transforms#3": writer}))
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "-c", overlay)
    assert result.exit_code == 1 and "the bundle's writer would write to" in result.output, result.output
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "out").exists()


def test_a_long_name_in_a_script_of_several_bytes_per_letter_is_written(tmp_path, tiny_checkpoint):
    # 80 CJK letters are 240 bytes: a legal name, whose temporary twin must be cut in bytes, not letters
    root = tmp_path / "in"
    name = "細" * 80
    _em_png(root / f"{name}.png", seed=1)
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "--no-prob")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "mask" / f"{name}.png").is_file()


def test_a_bad_pixel_limit_is_one_error_before_the_batch(tmp_path, tiny_checkpoint, monkeypatch):
    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    _em_png(root / "b.png", seed=2)
    monkeypatch.setenv("MEDSEG_MAX_PIXELS", "abc")
    result = _infer(root, tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 1
    assert result.output.strip() == "error: MEDSEG_MAX_PIXELS='abc': give a whole number of pixels, e.g. 400000000"
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_is_not_a_batchs_own_is_never_replaced(tmp_path, tiny_checkpoint):
    # OUTPUT_DIR at a DSB data root replaced the data set's manifest.csv (its image categories) with infer's
    root = tmp_path / "in"
    _em_png(root / "a.png", seed=1)
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.csv").write_text("image_id,category\na1,fluorescence\n")
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 1 and "manifest.csv: not a list of segmented inputs" in result.output, result.output
    assert (out / "manifest.csv").read_text() == "image_id,category\na1,fluorescence\n"
    assert not (out / "mask").exists()


def test_probability_stacks_are_written_as_imagej_reads_them(tmp_path, tiny_checkpoint):
    # ImageJ reads an uncompressed stack with its description (images=N) as one block from the first page's
    # data, not page by page: the float pages, each written with its own directory between them, opened
    # from slice 2 on as directory bytes (2e29)
    import tifffile

    root = tmp_path / "in"
    root.mkdir()
    planes = (np.random.default_rng(3).random((4, 32, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(root / "z.tif", planes, imagej=True, resolution=(5, 5),
                     metadata={"axes": "ZYX", "unit": "micron", "spacing": 2.0})
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "--no-tta")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(tmp_path / "out" / "prob" / "z.tif") as tif:
        assert tif.imagej_metadata["images"] == 4 and len(tif.pages) == 4
        offsets = [page.dataoffsets[0] for page in tif.pages]
        assert offsets == [offsets[0] + k * 32 * 40 * 4 for k in range(4)]  # one block of float32 pages
        # read the way ImageJ does: the block from the first offset
        block = np.fromfile(tmp_path / "out" / "prob" / "z.tif", dtype=tif.pages[0].dtype.newbyteorder(
            tif.byteorder), count=4 * 32 * 40, offset=offsets[0]).reshape(4, 32, 40)
        np.testing.assert_array_equal(block, tif.asarray())
    with tifffile.TiffFile(tmp_path / "out" / "mask" / "z.tif") as tif:  # compressed: ImageJ reads page by page
        assert len(tif.pages) == 4 and all(page.compression != 1 for page in tif.pages)


def test_a_time_series_written_as_nifti_has_time_as_its_fourth_axis(tmp_path, tiny_checkpoint):
    # with --format nifti, the frames of a TYX or TZYX TIFF were more slices in space (6 slices 2.5 µm apart
    # for 2 time points of 3 slices); now x, y, z, t with the frame interval in seconds
    import tifffile

    root = tmp_path / "in"
    root.mkdir()
    planes = (np.random.default_rng(4).random((6, 32, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(root / "tz.tif", planes.reshape(2, 3, 32, 40), imagej=True, resolution=(5, 5),
                     metadata={"axes": "TZYX", "unit": "micron", "spacing": 2.5, "finterval": 1.5, "tunit": "min"})
    tifffile.imwrite(root / "t.tif", planes[:4], imagej=True, resolution=(5, 5),
                     metadata={"axes": "TYX", "unit": "micron"})
    # a unit that is not ASCII (as some writers store it, in UTF-8): written back as "us", since a TIFF
    # description is ASCII (writing it failed the input)
    tifffile.imwrite(root / "t_us.tif", planes[:4], imagej=True, resolution=(5, 5),
                     metadata={"axes": "TYX", "unit": "micron", "finterval": 250.0, "tunit": "XXs"})
    (root / "t_us.tif").write_bytes((root / "t_us.tif").read_bytes().replace(b"tunit=XXs", "tunit=µs".encode()))
    for fmt in ("nifti", "tiff"):
        result = _infer(root, tmp_path / fmt, tiny_checkpoint, "--no-tta", "--format", fmt)
        assert result.exit_code == 0, result.output
    for name, shape, zooms, units in (("tz", (40, 32, 3, 2), (0.2, 0.2, 2.5, 90.0), ("micron", "sec")),
                                      ("t", (40, 32, 1, 4), (0.2, 0.2, 1.0, 1.0), ("micron", "unknown")),
                                      ("t_us", (40, 32, 1, 4), (0.2, 0.2, 1.0, 2.5e-4), ("micron", "sec"))):
        for kind in ("mask", "prob"):
            image = nib.load(tmp_path / "nifti" / kind / f"{name}.nii.gz")
            assert image.shape == shape and image.header.get_xyzt_units() == units, (name, kind)
            np.testing.assert_allclose(image.header.get_zooms(), zooms, rtol=1e-6)
            pages = tifffile.imread(tmp_path / "tiff" / kind / f"{name}.tif").reshape(shape[3], shape[2], 32, 40)
            got = np.asanyarray(image.dataobj).transpose(3, 2, 1, 0)
            np.testing.assert_array_equal(got > 0, pages > 0) if kind == "mask" else \
                np.testing.assert_allclose(got, pages, atol=1e-6)
    with tifffile.TiffFile(tmp_path / "tiff" / "mask" / "t_us.tif") as tif:
        assert (tif.imagej_metadata["finterval"], tif.imagej_metadata["tunit"]) == (250.0, "us")


def test_a_time_series_and_a_hyperstack_keep_their_frames_and_slices_in_their_masks(tmp_path, tiny_checkpoint):
    # a TYX time-lapse became a Z stack with a made-up 1 µm slice spacing, and a TZYX hyperstack a flat Z
    # stack of 6, so Fiji showed the masks with other axes than their images; the frame interval (and its
    # unit, when not seconds) was dropped
    import tifffile

    root = tmp_path / "in"
    root.mkdir()
    planes = (np.random.default_rng(2).random((6, 32, 32)) * 255).astype(np.uint8)
    layouts = {"tl": ("TYX", planes[:4], {"finterval": 30.0}),
               "tz": ("TZYX", planes.reshape(2, 3, 32, 32), {"spacing": 2.5, "finterval": 1.5, "tunit": "min"}),
               "z": ("ZYX", planes[:4], {"spacing": 2.0})}
    for name, (axes, data, extra) in layouts.items():
        tifffile.imwrite(root / f"{name}.tif", data, imagej=True, resolution=(5, 5),
                         metadata={"axes": axes, "unit": "micron", **extra})
    # uncalibrated, the axes were dropped with the pixel size (Fiji showed 6 slices)
    layouts["tz_uncalibrated"] = ("TZYX", planes.reshape(2, 3, 32, 32), {"finterval": 5.0})
    tifffile.imwrite(root / "tz_uncalibrated.tif", layouts["tz_uncalibrated"][1], imagej=True,
                     metadata={"axes": "TZYX", "finterval": 5.0})
    # OME's Z then T, which an ImageJ description cannot state, claimed 6 slices 2 µm apart: now plain pages
    tifffile.imwrite(root / "zt.ome.tif", planes.reshape(3, 2, 32, 32),
                     metadata={"axes": "ZTYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 2.0})
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "--no-prob", "--no-tta")
    assert result.exit_code == 0, result.output
    for name, (axes, data, extra) in layouts.items():
        with tifffile.TiffFile(tmp_path / "out" / "mask" / f"{name}.tif") as tif:
            assert tif.series[0].axes == axes and tif.series[0].shape == data.shape, name
            assert tif.imagej_metadata.get("spacing") == extra.get("spacing"), name  # none for a time series
            for key in ("finterval", "tunit"):
                assert tif.imagej_metadata.get(key) == extra.get(key), (name, key)
    with tifffile.TiffFile(tmp_path / "out" / "mask" / "zt.ome.tif") as tif:  # an OME-TIFF states the order
        assert tif.is_ome and tif.series[0].axes == "ZTYX" and tif.series[0].shape == (3, 2, 32, 32)


def test_an_ome_tiff_gives_ome_tiffs_of_its_axes_pixel_size_and_time_step(tmp_path, tiny_checkpoint):
    # masks of an OME-TIFF were named X.ome.tif but held no OME-XML (an ImageJ description at best), so OME
    # readers (Bio-Formats, QuPath) took them for plain TIFFs; OME's time step was not read at all
    import tifffile

    from medseg.readers import read_geometry

    root = tmp_path / "in"
    root.mkdir()
    planes = (np.random.default_rng(3).random((6, 32, 40)) * 255).astype(np.uint8)
    size = {"PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 5.0, "PhysicalSizeYUnit": "nm"}
    layouts = {"one": ("YX", planes[0], {}),
               "z": ("ZYX", planes[:3], {"PhysicalSizeZ": 50.0, "PhysicalSizeZUnit": "nm"}),
               "zt": ("ZTYX", planes.reshape(3, 2, 32, 40), {"TimeIncrement": 2.5, "TimeIncrementUnit": "min"}),
               "tz": ("TZYX", planes.reshape(2, 3, 32, 40), {"TimeIncrement": 0.5})}  # seconds, OME's default
    for name, (axes, data, extra) in layouts.items():
        tifffile.imwrite(root / f"{name}.ome.tif", data, ome=True, metadata={"axes": axes, **size, **extra})
    tifffile.imwrite(root / "plain.tif", planes, photometric="minisblack")  # the same planes, no metadata
    result = _infer(root, tmp_path / "out", tiny_checkpoint, "--no-tta")
    assert result.exit_code == 0, result.output
    plain = {kind: tifffile.imread(tmp_path / "out" / kind / "plain.tif") for kind in ("mask", "prob")}
    for name, (axes, data, _) in layouts.items():
        source = read_geometry(root / f"{name}.ome.tif")
        for kind in ("mask", "prob"):
            out = tmp_path / "out" / kind / f"{name}.ome.tif"
            with tifffile.TiffFile(out) as tif:
                assert tif.is_ome and tif.series[0].axes == axes and tif.series[0].shape == data.shape, (name, kind)
                pages = tif.asarray().reshape(-1, 32, 40)
            np.testing.assert_array_equal(pages, plain[kind][: len(pages)])  # the pages in the input's order
            written = read_geometry(out)
            np.testing.assert_allclose(written["spacing"], source["spacing"])
            assert written["spacing"][-1] == pytest.approx(0.004) and written["spacing"][-2] == pytest.approx(0.005)
            assert written.get("lead_sizes") == source.get("lead_sizes")
            assert written.get("frame_interval") == source.get("frame_interval")
    assert source["frame_interval"] == (0.5, "s")
    assert read_geometry(root / "zt.ome.tif")["frame_interval"] == (2.5, "min")
    assert read_geometry(root / "z.ome.tif")["spacing"][0] == pytest.approx(0.05)


def test_what_is_said_of_an_input_stays_in_its_manifest_row(tmp_path, tiny_checkpoint):
    # a TIFF with pages of other sizes: the pages left out were said on the console only; a manifest read
    # after a batch showed the input "ok" with no word of them
    root = tmp_path / "in"
    _em_png(root / "plain.png", seed=1)
    with tifffile.TiffWriter(root / "mixed.tif") as tif:
        tif.write(synthetic_em(size=48, seed=2)[0])
        tif.write(synthetic_em(size=32, seed=3)[0])
    out = tmp_path / "out"
    result = _infer(root, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    rows = _manifest(out)
    assert rows["mixed.tif"]["status"] == "ok"
    assert "only the first (48×48 uint8) is read" in rows["mixed.tif"]["message"]
    assert rows["plain.png"]["message"] == ""
    from medseg import readers

    readers._SERIES_SAID.clear()  # said once per process, and each command is one
    result = _infer(root, out, tiny_checkpoint)  # skipped now, and still said
    assert _summary(result.output)["skipped"] == 2
    assert "only the first" in _manifest(out)["mixed.tif"]["message"]


def test_the_progress_bar_counts_the_slices_of_a_stack(tmp_path, tiny_checkpoint, monkeypatch):
    # a stack of hundreds of slices is one input: the bar shows how far into it the batch is
    import medseg.handlers

    shown: list[tuple] = []

    class Recording(medseg.handlers.FileProgress):
        def start(self, name):
            shown.append(("start", name))

        def slice_done(self, done, total):
            shown.append((done, total))

    monkeypatch.setattr(medseg.handlers, "FileProgress", Recording)
    root = tmp_path / "in"
    root.mkdir()
    image, _ = synthetic_em(size=32, seed=1)
    tifffile.imwrite(root / "stack.tif", np.stack([image, image[::-1], image]), photometric="minisblack")
    Image.fromarray(image).save(root / "z.png")
    result = _infer(root, tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert shown == [("start", "stack"), (1, 3), (2, 3), (3, 3), ("start", "z"), (1, 1)]


def test_the_bar_names_the_slice_it_has_reached_of_a_stack_only():
    from medseg.handlers import FileProgress

    with FileProgress(2) as bar:
        bar.start("a/stack.tif")
        bar.slice_done(2, 30)
        stack = bar._progress.tasks[0].fields["name"]
        bar.start("b.png")
        bar.slice_done(1, 1)
        single = bar._progress.tasks[0].fields["name"]
    assert (stack, single) == ("a/stack.tif (2/30 slices)", "b.png")
    with FileProgress(1) as bar:
        bar.start("x" * 30 + "/volume_of_a_long_name.nii.gz")
        bar.slice_done(12, 300)
        shown = bar._progress.tasks[0].fields["name"]
    assert len(shown) == 40 and shown.startswith("…") and shown.endswith("name.nii.gz (12/300 slices)")


def test_an_input_a_run_was_killed_in_is_segmented_after_the_others(tmp_path, tiny_checkpoint):
    # an input too large for the machine's memory gets the process killed (no error to catch): later runs
    # must not die on it again before the inputs behind it are done
    import subprocess
    import sys

    root = tmp_path / "in"
    for seed, name in enumerate("abcd"):
        _em_png(root / f"{name}.png", seed)
    out = tmp_path / "out"
    args = ["infer", str(BUNDLE), str(root), str(out), "--checkpoint", str(tiny_checkpoint), "--no-progress",
            "--device", "cpu", *[a for item in TINY_NET for a in ("--set", item)]]
    code = ("import os, signal, sys\n"
            "import medseg.writers\n"
            "real = medseg.writers.SaveSegmentationd.__call__\n"
            "def dies_at_b(self, data):\n"
            "    if str(data.get('name')) == 'b':\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(self, data)\n"
            "medseg.writers.SaveSegmentationd.__call__ = dies_at_b\n"
            "from medseg.cli import app\n"
            "app(sys.argv[1:])\n")

    def killed_run():  # in a process of its own, killed at b as the system kills a process out of memory
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=300)

    def order():
        return [(Path(r["input"]).name, r["status"], r["message"]) for r in csv.DictReader(open(out / "manifest.csv"))]

    killed = killed_run()
    assert killed.returncode == -9, killed.stderr.decode(errors="replace")
    assert (out / "mask" / "a.png").is_file() and not (out / "mask" / "b.png").exists()
    assert _infer(root, out, tiny_checkpoint, "--include", "c.png").exit_code == 0  # b stays one to keep for last
    (out / "mask" / "a.png").unlink()  # a, done before, is to be made again too: b still comes after it
    killed = killed_run()
    assert killed.returncode == -9  # b killed the run again, last: a and d are done
    said = [line for line in killed.stderr.decode().splitlines() if "killed while segmenting" in line]
    assert said == [f"{root / 'b.png'}: an earlier run was killed while segmenting it (out of memory, or stopped "
                    "by force); segmenting it after the other inputs"]
    assert all((out / "mask" / f"{n}.png").is_file() for n in "acd") and not (out / "mask" / "b.png").exists()
    done = _infer(root, out, tiny_checkpoint)
    assert done.exit_code == 0, done.output
    rows = order()
    assert [(n, status) for n, status, _ in rows] == [("a.png", "skipped"), ("c.png", "skipped"),
                                                      ("d.png", "skipped"), ("b.png", "ok")]
    assert rows[3][2] == "an earlier run was killed while segmenting it (out of memory, or stopped by force): " \
        "segmented again"
    # that run finished it: a later run knows nothing of the kill
    assert _infer(root, out, tiny_checkpoint, "--overwrite").exit_code == 0
    assert [(n, m) for n, _, m in order()] == [("a.png", ""), ("b.png", ""), ("c.png", ""), ("d.png", "")]
    assert "killed" not in json.loads((out / "run.json").read_text())


def test_a_series_no_seg_can_be_built_for_is_refused_at_its_first_slice(tmp_path, tiny_checkpoint, monkeypatch):
    import pydicom

    import medseg.writers

    root = tmp_path / "in"
    write_dicom_series(root / "good", n=3, size=24)
    write_dicom_series(root / "nostudy", n=3, size=24, series_uid="1.2.826.0.1.3680043.8.498.11")
    for path in (root / "nostudy").iterdir():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ""
        ds.save_as(path)
    made = []
    real = medseg.writers.SaveSegmentationd.mask_of

    def counted(self, pred, fmt):
        made.append(fmt)
        return real(self, pred, fmt)

    monkeypatch.setattr(medseg.writers.SaveSegmentationd, "mask_of", counted)
    out = tmp_path / "out"
    result = _infer(root, out, tiny_checkpoint, "--format", "dicom-seg")
    assert result.exit_code == 1, result.output
    rows = _manifest(out)
    assert rows["good"]["status"] == "ok" and (out / "mask" / "good.seg.dcm").is_file()
    assert rows["nostudy"]["status"] == "failed"
    assert "nostudy" in rows["nostudy"]["message"] and "no StudyInstanceUID, which a SEG must share with its " \
        "source; use --format nifti" in rows["nostudy"]["message"]
    assert made == ["dicom-seg"] * 4  # the good series' three slices and the first of the other: no more
    assert not (out / "mask" / "nostudy.seg.dcm").exists() and not (out / "prob" / "nostudy.nii.gz").exists()


def test_a_tilted_series_gives_a_nifti_whose_sform_is_exact_and_qform_straight(tmp_path, tiny_checkpoint):
    tan = np.tan(np.radians(15))
    for k in range(4):
        write_dicom_slice(tmp_path / "in" / "tilt" / f"IM{k}.dcm", np.full((24, 24), 100 * k, np.int16),
                          series_uid="1.2.3.78", position=(0.0, 2.0 * tan * k, 2.0 * k), instance=k + 1)
    out = tmp_path / "out"
    result = _infer(tmp_path / "in", out, tiny_checkpoint, "--format", "nifti")
    assert result.exit_code == 0, result.output
    assert "stacked at a tilt of 15.0°" in _manifest(out)["tilt"]["message"]
    for kind in ("mask", "prob"):
        image = nib.load(out / kind / "tilt.nii.gz")
        assert (int(image.header["sform_code"]), int(image.header["qform_code"])) == (1, 1)
        step = 2.0 / np.cos(np.radians(15))
        for k in range(4):  # voxel (0, 0, k): each slice's own position in the sform, the stack straight in the qform
            np.testing.assert_allclose(image.affine @ [0, 0, k, 1], [0, -2.0 * tan * k, 2.0 * k, 1], atol=1e-4)
            np.testing.assert_allclose(image.get_qform() @ [0, 0, k, 1], [0, 0, step * k, 1], atol=1e-4)


def test_a_labelled_data_set_given_whole_says_its_masks_are_segmented_as_images(tmp_path, tiny_checkpoint, caplog):
    # a DSB folder gave 134 inputs for 2 samples, 132 of them masks/*.png, without a word
    for sample in ("a", "b"):
        _em_png(tmp_path / "in" / sample / "images" / f"{sample}.png", seed=1)
        for k in range(2):
            _em_png(tmp_path / "in" / sample / "masks" / f"{sample}{k}.png", seed=2 + k)
    result = _infer(tmp_path / "in", tmp_path / "out", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "beside folders of images" in r.getMessage()]
    assert said == [f"{tmp_path / 'in'}: 4 of the 6 inputs lie in masks/ folders beside folders of images (a "
                    "labelled data set?), and are segmented as images; leave them out with --exclude '*masks/*' "
                    "(or give --include for the images)"]
    caplog.clear()
    result = _infer(tmp_path / "in", tmp_path / "out2", tiny_checkpoint, "--exclude", "*masks/*")
    assert result.exit_code == 0 and _summary(result.output)["inputs"] == 2
    assert not [r for r in caplog.records if "beside folders of images" in r.getMessage()]
    # a masks folder given itself is the user's choice: nothing said
    result = _infer(tmp_path / "in" / "a" / "masks", tmp_path / "out3", tiny_checkpoint)
    assert result.exit_code == 0 and _summary(result.output)["inputs"] == 2
    assert not [r for r in caplog.records if "beside folders of images" in r.getMessage()]
