"""Finding ISBI pairs in both layouts, deterministic splits, and errors that name the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data import find_image_mask_pairs, find_pairs, isbi_split, split_pairs
from medseg.errors import DataError


def test_png_layout_natural_order(tmp_path):
    for sub in ("image", "label"):
        (tmp_path / "train" / sub).mkdir(parents=True)
        for k in (0, 2, 10, 1):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / sub / f"{k}.png")
    pairs = find_pairs(tmp_path)
    assert [p["name"] for p in pairs] == ["0", "1", "2", "10"]
    assert find_pairs(tmp_path / "train") == pairs  # the train/ folder itself works too


def test_names_that_sort_alike_keep_one_order_whatever_the_listing(tmp_path, monkeypatch):
    # "4" and "04" are the same number: the order (so the split) followed the folder's listing order
    from pathlib import Path

    from medseg.discovery import discover

    for sub in ("image", "label"):
        (tmp_path / "train" / sub).mkdir(parents=True)
        for k in ("04", "4", "3"):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / sub / f"{k}.png")
    forward = [p["name"] for p in find_pairs(tmp_path)]
    found = [i.rel for i in discover(str(tmp_path / "train" / "image"))[0]]
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(listing(self))))
    assert [p["name"] for p in find_pairs(tmp_path)] == forward == ["3", "04", "4"]
    assert [i.rel for i in discover(str(tmp_path / "train" / "image"))[0]] == found == ["3", "04", "4"]


def test_challenge_stack_layout(isbi_stacks):
    pairs = find_pairs(isbi_stacks)
    assert [p["page"] for p in pairs] == [0, 1, 2]
    assert all(p["image"].endswith("train-volume.tif") and p["label"].endswith("train-labels.tif") for p in pairs)


def test_tiff_stacks_in_the_image_and_label_folders_give_one_sample_per_page(tmp_path):
    # only the first page of each was read, silently
    import tifffile

    from medseg.transforms import LoadSliced

    for sub in ("image", "label"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (3, 16, 16), dtype=np.uint8)
    labels = np.where(rng.random((3, 16, 16)) > 0.3, 255, 0).astype(np.uint8)
    tifffile.imwrite(tmp_path / "image" / "a.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "label" / "a.tif", labels, photometric="minisblack")
    Image.fromarray(volume[0]).save(tmp_path / "image" / "b.png")
    Image.fromarray(labels[0]).save(tmp_path / "label" / "b.png")
    pairs = find_pairs(tmp_path)
    assert [(p["name"], p["page"]) for p in pairs] == [("a_000", 0), ("a_001", 1), ("a_002", 2), ("b", 0)]
    loaded = LoadSliced(["image", "label"])(pairs[1])
    assert np.array_equal(np.asarray(loaded["image"])[0], volume[1])
    assert np.array_equal(np.asarray(loaded["label"])[0], labels[1])
    Image.fromarray(volume[0]).save(tmp_path / "image" / "a_001.png")  # the name of the stack's second page
    Image.fromarray(labels[0]).save(tmp_path / "label" / "a_001.png")
    with pytest.raises(DataError, match=r"a_001.png: its sample name 'a_001' is also one of .*a.tif"):
        find_pairs(tmp_path)
    for sub in ("image", "label"):
        (tmp_path / sub / "a_001.png").unlink()
    tifffile.imwrite(tmp_path / "label" / "a.tif", labels[:2], photometric="minisblack")
    with pytest.raises(DataError, match=r"label/a.tif: 2 label pages for the 3 of a.tif; give each image page"):
        find_pairs(tmp_path)


def test_a_changed_page_of_a_stack_marks_that_slice_only(isbi_stacks):
    import tifffile

    from medseg.data import sample_digest

    before = [sample_digest(p) for p in find_pairs(isbi_stacks)]
    volume = tifffile.imread(isbi_stacks / "train-volume.tif")
    volume[1] = 255 - volume[1]
    tifffile.imwrite(isbi_stacks / "train-volume.tif", volume, photometric="minisblack")
    after = [sample_digest(p) for p in find_pairs(isbi_stacks)]
    assert [a == b for a, b in zip(before, after, strict=True)] == [True, False, True]


@pytest.mark.parametrize("layout", [{"imagej": True, "truncate": True, "metadata": {"axes": "ZYX"}},
                                    {"tile": (3, 16, 16), "photometric": "minisblack"}],
                         ids=["imagej-one-page", "volume-tiles"])
def test_stacks_not_stored_page_by_page_are_split_and_fingerprinted_by_slice(isbi_stacks, tmp_path, layout):
    # the fingerprint read page N for slice N: "cannot read TIFF page 1" for stacks the loader reads fine
    import hashlib

    import tifffile

    from medseg.data import isbi_split, sample_digest

    volume = tifffile.imread(isbi_stacks / "train-volume.tif")
    plain = [sample_digest(p) for p in find_pairs(isbi_stacks)]
    assert sample_digest(find_pairs(isbi_stacks)[0], known := {}) and hashlib.sha256(
        f"{volume[0].dtype}{volume[0].shape}".encode() + volume[0].tobytes()).hexdigest() in known.values()
    labels = tifffile.imread(isbi_stacks / "train-labels.tif")
    for name, stack in (("train-volume.tif", volume), ("train-labels.tif", labels)):
        tifffile.imwrite(isbi_stacks / name, stack, **layout)
    assert len(tifffile.TiffFile(isbi_stacks / "train-volume.tif").pages) != 3
    split = isbi_split(isbi_stacks, val_count=1, save_to=str(tmp_path / "run"))
    assert len(split["train"]) == 2 and (tmp_path / "run" / "split.json").is_file()
    assert [sample_digest(p) for p in find_pairs(isbi_stacks)] == plain  # the same pixels: the same digests
    volume[1] = 255 - volume[1]
    tifffile.imwrite(isbi_stacks / "train-volume.tif", volume, **layout)
    after = [sample_digest(p) for p in find_pairs(isbi_stacks)]
    assert [a == b for a, b in zip(plain, after, strict=True)] == [True, False, True]


def test_missing_folder_and_missing_label(tmp_path, isbi_folder):
    with pytest.raises(DataError, match="data folder not found; pass --data"):
        find_pairs(tmp_path / "nope")
    (isbi_folder / "train" / "label" / "2.png").unlink()
    with pytest.raises(DataError, match=r"2\.png: no label found"):
        find_pairs(isbi_folder)
    import os

    os.mkfifo(isbi_folder / "train" / "label" / "2.png")  # a pipe of the label's name is named as what it is
    with pytest.raises(DataError, match=r"label/2\.png: the label of 2\.png is not a regular file"):
        find_pairs(isbi_folder)
    os.unlink(isbi_folder / "train" / "label" / "2.png")
    os.symlink(isbi_folder / "gone.png", isbi_folder / "train" / "label" / "2.png")
    with pytest.raises(DataError, match=r"label/2\.png: the label of 2\.png is a link to a missing file"):
        find_pairs(isbi_folder)
    os.unlink(isbi_folder / "train" / "image" / "2.png")  # an image's link without a target: was left out
    os.symlink(isbi_folder / "gone.png", isbi_folder / "train" / "image" / "2.png")
    with pytest.raises(DataError, match=r"image/2\.png: a link to a missing file; restore its target"):
        find_pairs(isbi_folder)
    with pytest.raises(DataError, match="no labelled data found"):
        find_pairs(tmp_path / "isbi" / "train" / "label")


def test_two_labels_for_one_image_are_refused(isbi_folder):
    label_dir = isbi_folder / "train" / "label"
    first = sorted(label_dir.iterdir())[0]
    Image.open(first).save(label_dir / f"{first.stem}.tif")
    with pytest.raises(DataError, match=rf"a second label for '{first.stem}' beside {first.name}"):
        find_pairs(isbi_folder)


def test_split_is_contiguous_and_recorded(tmp_path, isbi_folder):
    split = isbi_split(isbi_folder, val_count=1, save_to=str(tmp_path / "run"))
    assert [p["name"] for p in split["train"]] == ["0", "1", "2"]
    assert [p["name"] for p in split["val"]] == ["3"]
    assert len(split["all"]) == 4
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["val"] == ["3"] and record["train"] == ["0", "1", "2"]
    assert isbi_split(isbi_folder, val_count=1) == split  # deterministic


def test_an_interrupted_split_record_leaves_the_last_one_whole(tmp_path, isbi_folder, monkeypatch):
    isbi_split(isbi_folder, val_count=1, save_to=str(tmp_path / "run"))
    recorded = (tmp_path / "run" / "split.json").read_bytes()
    real_write = Path.write_text

    def write_half_then_stop(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        isbi_split(isbi_folder, val_count=2, save_to=str(tmp_path / "run"))
    assert (tmp_path / "run" / "split.json").read_bytes() == recorded
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["split.json"]


def test_split_needs_training_slices():
    with pytest.raises(DataError, match="cannot hold out 3 validation slices from 3"):
        split_pairs([{}, {}, {}], 3)


def test_group_sampler_balances_groups_and_plain_shuffle_at_zero():
    import torch

    from medseg.data import group_sampler

    samples = [{"group": "big"}] * 90 + [{"group": "small"}] * 10
    plain = list(group_sampler(samples, 0.0))
    assert sorted(plain) == list(range(100))  # a permutation: every sample once
    torch.manual_seed(0)
    draws = torch.tensor(list(group_sampler(samples, 1.0, num_samples=20000)))
    assert abs((draws >= 90).float().mean().item() - 0.5) < 0.02  # both groups equally often
    torch.manual_seed(0)
    draws = torch.tensor(list(group_sampler(samples, 0.5, num_samples=20000)))
    assert abs((draws >= 90).float().mean().item() - 10 ** 0.5 / (90 ** 0.5 + 10 ** 0.5)) < 0.02
    torch.manual_seed(1)
    first = list(group_sampler(samples, 0.5))
    torch.manual_seed(1)
    assert list(group_sampler(samples, 0.5)) == first  # reproducible from the global seed
    with pytest.raises(ValueError, match="group_balance"):
        group_sampler(samples, 1.5)


def test_natural_order_of_names():
    from medseg.discovery import natural_key

    names = ["img10.png", "img2.png", "img02.png", "b", "a1²", "a1", "x/9/y", "x/10/y"]
    assert sorted(names, key=natural_key) == ["a1", "a1²", "b", "img02.png", "img2.png", "img10.png", "x/9/y",
                                              "x/10/y"]


def test_a_truncated_tiff_is_named_when_the_split_is_recorded(tmp_path, isbi_folder):
    # its digest was read without the reader's error handling: "a config value does not work", no file named
    import tifffile

    image = next((isbi_folder / "train" / "image").iterdir())
    tifffile.imwrite(image.with_suffix(".tif"), np.asarray(Image.open(image)))
    data = image.with_suffix(".tif").read_bytes()
    image.unlink()
    image.with_suffix(".tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{image.stem}\.tif: cannot read (TIFF )?slice 0 .*truncated"):
        isbi_split(isbi_folder, val_count=1, save_to=str(tmp_path / "run"))


def test_masks_are_found_through_a_linked_image_folder(tmp_path):
    # "raw/../labels" through a link to another place is not "labels" beside the link
    import os

    from medseg.data import find_image_mask_pairs

    (tmp_path / "archive" / "raw").mkdir(parents=True)
    (tmp_path / "archive" / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "archive" / "raw" / "x0.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "archive" / "labels" / "x0.png")
    (tmp_path / "ws" / "exp1").mkdir(parents=True)
    os.symlink(tmp_path / "archive" / "raw", tmp_path / "ws" / "exp1" / "raw")
    (pair,) = find_image_mask_pairs(tmp_path / "ws", "*/raw/*.png", "../labels/{stem}.png")
    assert Path(pair["label"]).resolve() == (tmp_path / "archive" / "labels" / "x0.png").resolve()


def test_a_full_disk_while_recording_the_split_names_split_json(tmp_path, isbi_folder, monkeypatch):
    import errno

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write raises it: no file named

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as err:
        isbi_split(isbi_folder, val_count=1, save_to=str(tmp_path / "run"))
    assert err.value.filename == str(tmp_path / "run" / "split.json")


def test_image_folder_layout_reads_bmp_and_jpeg_images_and_names_a_jpeg_label(isbi_folder):
    # BMP and JPEG images were left out without a word (half the slices, and another held-out slice)
    image_dir, label_dir = isbi_folder / "train" / "image", isbi_folder / "train" / "label"
    Image.open(image_dir / "2.png").save(image_dir / "2.bmp")
    (image_dir / "2.png").unlink()
    Image.open(image_dir / "3.png").save(image_dir / "3.jpg", quality=95)
    (image_dir / "3.png").unlink()
    (image_dir / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS companion file: not an image
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in find_pairs(isbi_folder)] == [
        ("0.png", "0.png"), ("1.png", "1.png"), ("2.bmp", "2.png"), ("3.jpg", "3.png")]
    Image.open(label_dir / "1.png").save(label_dir / "1.jpg")
    (label_dir / "1.png").unlink()
    with pytest.raises(DataError, match=r"label/1\.jpg: a \.jpg label; JPEG compression changes the values"):
        find_pairs(isbi_folder)


def test_image_globs_match_suffixes_in_any_case_and_names_in_either_unicode_form(tmp_path):
    # cameras and Windows write 003.BMP: '**/*.bmp' left them out without a word; macOS writes names
    # decomposed (NFD), so a mask named in composed form (NFC) was "not found"
    import unicodedata

    root = tmp_path / "data"
    root.mkdir()
    image, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    names = {"001.bmp": "001.png", "002.BMP": "002.png", "003.Bmp": "003.PNG",
             unicodedata.normalize("NFD", "zelle_é.bmp"): unicodedata.normalize("NFC", "zelle_é.png")}
    for image_name, mask_name in names.items():
        Image.fromarray(image).save(root / image_name, format="BMP")
        Image.fromarray(mask).save(root / mask_name, format="PNG")
    pairs = find_image_mask_pairs(root, image_glob="**/*.bmp", mask_template="{stem}.png")
    assert sorted((Path(p["image"]).name, Path(p["label"]).name) for p in pairs) == sorted(names.items())
    Image.fromarray(mask).save(root / "001.PNG", format="PNG")  # beside 001.png: the name as written wins
    pairs = find_image_mask_pairs(root, image_glob="**/*.bmp", mask_template="{stem}.png")
    assert [Path(p["label"]).name for p in pairs if Path(p["image"]).name == "001.bmp"] == ["001.png"]


def test_a_folder_name_with_glob_characters_pairs_each_image_with_its_own_mask(tmp_path):
    # "p[12]/001.bmp" took its mask from "p1/" (the folder read as a pattern), and "plate [1]/001.bmp" was
    # told that no mask matches "plate [1]/001.png", which was there
    image = np.zeros((8, 8, 3), np.uint8)
    for folder, value in (("p[12]", 1), ("p1", 2), ("plate [1]", 3), ("a*b?", 4)):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "001.bmp", format="BMP")
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / folder / "001.png")
    pairs = find_image_mask_pairs(tmp_path, image_glob="**/*.bmp", mask_template="{stem}.png")
    assert sorted((Path(p["image"]).parent.name, Path(p["label"]).parent.name) for p in pairs) == [
        ("a*b?", "a*b?"), ("p1", "p1"), ("p[12]", "p[12]"), ("plate [1]", "plate [1]")]
    (tmp_path / "plate [1]" / "001.png").unlink()
    with pytest.raises(DataError, match=re.escape(f"no mask matches {tmp_path / 'plate [1]' / '001.png'};")):
        find_image_mask_pairs(tmp_path, image_glob="**/*.bmp", mask_template="{stem}.png")


def test_hidden_files_are_read_only_when_an_include_names_them(tmp_path):
    # '.scan.png' was skipped even with --include '.scan.png', which then said the patterns left out all files
    from medseg.discovery import discover

    for name in ("a.png", ".scan.png", "._a.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name, format="PNG")
    assert [i.rel for i in discover(tmp_path)[0]] == ["a"]
    assert [i.rel for i in discover(tmp_path, include=[".scan.png"])[0]] == [".scan"]
    assert [i.rel for i in discover(tmp_path, include=["*.png"])[0]] == ["a"]  # '*' does not name hidden files


def test_include_and_exclude_take_a_file_suffix_in_any_case(tmp_path):
    # --include '*.bmp' (the jurkat demo's own) left A.BMP out without a word, though training's image_glob
    # '**/*.bmp' had trained on it
    import nibabel as nib

    from medseg.discovery import discover

    for name in ("A.BMP", "b.bmp", "c.png", "D.PNG"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name, format="PNG")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)), tmp_path / "v.NII.GZ")
    assert [i.rel for i in discover(tmp_path, include=["*.bmp"])[0]] == ["A", "b"]
    assert [i.rel for i in discover(tmp_path, exclude=["*.png", "*.nii.gz"])[0]] == ["A", "b"]
    assert [i.rel for i in discover(tmp_path, include=["*.nii.gz"])[0]] == ["v"]  # both suffixes
    assert [i.rel for i in discover(tmp_path, include=["A.*"])[0]] == ["A"]  # the rest of a name: as written


def test_recorded_samples_are_those_a_split_record_names(tmp_path, caplog):
    from medseg.data import recorded_samples

    samples = [{"name": n, "image": f"{n}.png"} for n in ("a", "b", "c")]
    datalists = {"train": samples[:2], "val": samples[2:], "all": samples}
    record = tmp_path / "split.json"
    record.write_text(json.dumps({"train": ["b", "c"], "val": ["a", "gone"]}))
    assert recorded_samples(datalists, record, "train") == samples[1:]  # by name, not as drawn here
    assert recorded_samples(datalists, record, "val") == samples[:1]
    assert "1 of its 2 val images are not in the data given" in caplog.text
    assert recorded_samples(datalists, None, "val") == samples[2:]  # no record: as drawn
    assert recorded_samples(datalists, record, "all") == samples
    record.write_text(json.dumps({"val": ["x", "y"]}))
    with pytest.raises(DataError, match=r"split\.json: none of the 2 val images it names are in the data given"):
        recorded_samples(datalists, record, "val")
    record.write_text("{not json")
    with pytest.raises(DataError, match=r"split\.json: not a readable split record"):
        recorded_samples(datalists, record, "val")


def test_a_volume_among_training_data_is_said_to_be_one(tmp_path):
    # a NIfTI volume matched by image_glob was "no images match '*.nii'; set image_glob", and in isbi_em's image/
    # "no images (supported: .png, .tif, .tiff)", a list without the BMP and JPEG it reads
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
    with pytest.raises(DataError, match=r"no images match '\*\.nii\.gz' \(.*\); ct\.nii\.gz is NIfTI, which training "
                                        r"does not read \(medseg infer does\): save its slices"):
        find_image_mask_pairs(tmp_path, image_glob="*.nii.gz", mask_template="{stem}_label.nii.gz")
    (tmp_path / "image").mkdir()
    (tmp_path / "label").mkdir()
    (tmp_path / "ct.nii.gz").rename(tmp_path / "image" / "ct.nii.gz")
    with pytest.raises(DataError, match=r"image: no images \(supported: \.png, \.tif, \.tiff, \.bmp, \.jpg, \.jpeg\); "
                                        r"ct\.nii\.gz is NIfTI"):
        find_pairs(tmp_path)
    (tmp_path / "image" / "ct.nii.gz").unlink()
    with pytest.raises(DataError, match=r"image: no images \(supported: .*\.jpeg\)$"):
        find_pairs(tmp_path)
