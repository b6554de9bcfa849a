"""The nuclei bundle (DSB 2018 layout, interior/boundary classes, watershed instances): samples and split,
instance transforms, instance writing and metrics, and the CLI end to end on synthetic nuclei."""

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
import torch
from conftest import (
    NUCLEI_TINY_NET,
    REPO,
    synthetic_nuclei,
    write_dicom_series,
    write_dicom_slice,
    write_dsb_folder,
    write_dsb_sample,
)
from ignite.engine import Engine
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data import dsb_split, find_dsb_samples
from medseg.errors import ConfigValueError, DataError
from medseg.evaluation import DsbScore, InstanceMetrics
from medseg.instances import MEASUREMENT_FIELDS, WatershedInstances, instance_targets
from medseg.transforms import BrightObjectsd, InstanceTargetd, LoadInstanceMasksd, LoadSliced
from medseg.writers import SaveSegmentationd

NUCLEI = REPO / "bundles" / "nuclei"
TINY = [*NUCLEI_TINY_NET, "batch_size=2", "samples_per_image=1", "val_interval=1"]

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _mask_count(sample: dict) -> int:
    return len(list(Path(sample["label"]).glob("*.png")))


def _clean_prob(labels: np.ndarray) -> np.ndarray:
    """A perfect (3, H, W) softmax: the one-hot of the instance target."""
    target = instance_targets(labels, 2)
    return np.stack([target == k for k in range(3)]).astype(np.float32)


# --- data: samples and split ---------------------------------------------------------------------------------


def test_dsb_samples_found_with_names_groups_and_masks(dsb_folder):
    samples = find_dsb_samples(dsb_folder)
    assert [s["name"] for s in samples] == ["a1", "a2", "a3", "b1", "b2", "c1"]
    assert [s["group"] for s in samples] == ["RGBA-64x64"] * 3 + ["RGBA-80x72"] * 2 + ["RGB-64x64"]
    for s in samples:
        assert Path(s["image"]) == dsb_folder / "stage1_train" / s["name"] / "images" / f"{s['name']}.png"
        assert Path(s["label"]).name == "masks" and _mask_count(s) >= 3
    # the stage1_train folder itself works too
    assert [s["name"] for s in find_dsb_samples(dsb_folder / "stage1_train")] == [s["name"] for s in samples]


def test_dsb_groups_from_manifest_categories(dsb_folder):
    rows = ["image_id,category", "a1,fluorescence", "a2,fluorescence", "b1,fluorescence", "c1,brightfield"]
    (dsb_folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    groups = {s["name"]: s["group"] for s in find_dsb_samples(dsb_folder)}
    assert groups == {"a1": "fluorescence", "a2": "fluorescence", "a3": "RGBA-64x64", "b1": "fluorescence",
                      "b2": "RGBA-80x72", "c1": "brightfield"}  # unlisted samples fall back to their size
    # --data pointing at stage1_train itself reads the manifest beside it: the same groups, so the same split
    assert {s["name"]: s["group"] for s in find_dsb_samples(dsb_folder / "stage1_train")} == groups
    assert dsb_split(dsb_folder / "stage1_train")["val"] == dsb_split(dsb_folder)["val"]
    # a manifest above that names none of the samples is not theirs
    (dsb_folder / "manifest.csv").write_text("image_id,category\nzz,fluorescence\n")
    assert {s["name"]: s["group"] for s in find_dsb_samples(dsb_folder / "stage1_train")}["a1"] == "RGBA-64x64"


def test_dsb_split_is_stratified_reproducible_and_recorded(dsb_folder, tmp_path):
    split = dsb_split(dsb_folder, val_fraction=0.2, seed=0, save_to=str(tmp_path / "run"))
    # one from each group of two or more; the single RGB sample always trains
    assert sorted(s["group"] for s in split["val"]) == ["RGBA-64x64", "RGBA-80x72"]
    assert "c1" in [s["name"] for s in split["train"]] and len(split["all"]) == 6
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["val"] == [s["name"] for s in split["val"]] and len(record["train"]) == 4
    assert [s["name"] for s in dsb_split(dsb_folder, 0.2, 0)["val"]] == record["val"]


def test_a_samples_digest_covers_the_masks_the_loader_reads(dsb_folder):
    # a .DS_Store or Thumbs.db in masks/ is not a mask: it must not mark the sample as changed
    from medseg.data import find_dsb_samples, sample_digest

    sample = next(s for s in find_dsb_samples(dsb_folder) if s["name"] == "a1")
    before = sample_digest(sample)
    masks = Path(sample["label"])
    (masks / ".DS_Store").write_bytes(b"finder")
    (masks / "Thumbs.db").write_bytes(b"explorer")
    assert sample_digest(sample) == before
    first = sorted(masks.glob("*.png"))[0]
    Image.fromarray(np.zeros_like(np.asarray(Image.open(first)))).save(first)
    assert sample_digest(sample) != before


def test_dsb_image_with_another_name_is_accepted(dsb_folder):
    images = dsb_folder / "stage1_train" / "a2" / "images"
    (images / "a2.png").rename(images / "other.png")
    sample = next(s for s in find_dsb_samples(dsb_folder) if s["name"] == "a2")
    assert Path(sample["image"]).name == "other.png"
    # a suffix in capitals (saved so on Windows or macOS), beside a macOS "._" companion: the image, not an
    # error that says no image is there
    (images / "other.png").rename(images / "a2.PNG")
    (images / "._a2.PNG").write_bytes(b"\0" * 64)
    sample = next(s for s in find_dsb_samples(dsb_folder) if s["name"] == "a2")
    assert Path(sample["image"]).name == "a2.PNG"


def test_dsb_errors_name_the_sample(dsb_folder, tmp_path):
    shutil.rmtree(dsb_folder / "stage1_train" / "b1" / "masks")
    with pytest.raises(DataError, match=r"stage1_train/b1: no masks/ folder") as err:
        find_dsb_samples(dsb_folder)
    assert "\n" not in str(err.value)
    (dsb_folder / "stage1_train" / "b1" / "masks").mkdir()  # an empty masks/ folder = no nuclei: fine
    assert len(find_dsb_samples(dsb_folder)) == 6

    (dsb_folder / "stage1_train" / "a3" / "images" / "a3.png").unlink()
    with pytest.raises(DataError, match=r"stage1_train/a3: no images/a3\.png"):
        find_dsb_samples(dsb_folder)
    shutil.rmtree(dsb_folder / "stage1_train" / "a3" / "images")
    with pytest.raises(DataError, match=r"stage1_train/a3: no images/a3\.png"):
        find_dsb_samples(dsb_folder)

    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no DSB samples found"):
        find_dsb_samples(tmp_path / "empty")
    with pytest.raises(DataError, match="missing: data folder not found"):
        find_dsb_samples(tmp_path / "missing")


# --- transforms ----------------------------------------------------------------------------------------------


def _loaded(sample: dict) -> dict:
    return LoadInstanceMasksd(keys="label")(LoadSliced(keys="image", gray=False)(sample))


def test_instance_masks_merge_one_label_per_file(dsb_folder):
    sample = find_dsb_samples(dsb_folder)[0]
    d = _loaded(sample)
    labels = d["label"]
    assert labels.shape == (1, 64, 64) and labels.dtype == np.float32 and d["label_file"] == sample["label"]
    assert labels.max() == _mask_count(sample) == len(np.unique(labels)) - 1
    for k, path in enumerate(sorted(Path(sample["label"]).glob("*.png")), start=1):  # file order = label order
        mask = np.asarray(Image.open(path)) > 0
        assert np.all(mask[labels[0] == k]) and (labels[0][mask] == k).mean() > 0.8


def test_instance_masks_overlap_goes_to_the_earlier_file(tmp_path):
    image = np.zeros((20, 20), np.uint8)
    write_dsb_sample(tmp_path, "s", image, np.zeros((20, 20), np.int32))
    first, second = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    first[2:10, 2:10], second[6:14, 6:14] = 255, 255
    Image.fromarray(second).save(tmp_path / "s" / "masks" / "b.png")
    Image.fromarray(first).save(tmp_path / "s" / "masks" / "a.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "s" / "masks" / "c.png")  # empty: skipped
    labels = _loaded({"image": str(tmp_path / "s" / "images" / "s.png"), "label": str(tmp_path / "s" / "masks")})
    labels = labels["label"][0]
    assert labels[8, 8] == 1 and labels[12, 12] == 2 and labels[3, 3] == 1  # overlap (6..9) kept by a.png
    assert np.count_nonzero(labels == 1) == 64 and np.count_nonzero(labels == 2) == 64 - 16
    assert labels.max() == 2


def test_instance_masks_are_merged_as_read_not_held_all_at_once(tmp_path):
    """A sample's masks/ folder may hold hundreds of full-size masks (DSB 2018 has images of over 300 nuclei
    at 1024²): memory follows the label image, not the number of masks."""
    import tracemalloc

    size, count = 256, 120
    image = np.zeros((size, size), np.uint8)
    write_dsb_sample(tmp_path, "s", image, np.zeros((size, size), np.int32))
    for k in range(count):
        mask = np.zeros((size, size), np.uint8)
        row, col = divmod(k, 12)
        mask[row * 20:row * 20 + 15, col * 20:col * 20 + 15] = 255
        Image.fromarray(mask).save(tmp_path / "s" / "masks" / f"m{k:03d}.png")
    sample = {"image": np.zeros((1, size, size), np.float32), "label": str(tmp_path / "s" / "masks")}
    tracemalloc.start()
    try:
        labels = LoadInstanceMasksd(keys="label")(sample)["label"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels.max() == count and np.count_nonzero(labels) == count * 15 * 15
    assert peak < 12 * size * size * 4, peak  # a dozen label images' worth; all the masks held would be 30


def test_a_mask_stack_is_refused_and_a_mask_hiding_others_is_said(tmp_path, caplog):
    # a multi-page TIFF in masks/ gave its first page only (4 of 5 nuclei silently background); a mask of all
    # the nuclei, sorted first, made every sample one object without a word
    from medseg import transforms

    image = np.zeros((20, 20), np.uint8)
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6], labels[10:15, 10:15] = 1, 2
    folder = write_dsb_sample(tmp_path, "s", image, labels)
    sample = {"image": str(folder / "images" / "s.png"), "label": str(folder / "masks")}
    Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8)).save(folder / "masks" / "0_all.png")
    said_before = set(transforms._SAID)  # each folder is said once per process
    transforms._SAID.clear()
    try:
        assert _loaded(sample)["label"].max() == 1  # as given: the union first, the two masks under it
        said = [r.getMessage() for r in caplog.records if "lies wholly under the masks before it" in r.getMessage()]
        assert len(said) == 1 and "m01.png" in said[0] and "(2 such in this folder)" in said[0], said
    finally:
        transforms._SAID.clear()
        transforms._SAID.update(said_before)
    # a mask of several values in another sample of the data folder: each warning is said, not the first alone
    other = write_dsb_sample(tmp_path, "t", image, labels)
    both = np.where(labels == 1, 100, np.where(labels == 2, 200, 0)).astype(np.uint8)
    Image.fromarray(both).save(other / "masks" / "m00.png")
    transforms._SAID.clear()
    try:
        with caplog.at_level("WARNING", logger="medseg.transforms"):
            _loaded({"image": str(other / "images" / "t.png"), "label": str(other / "masks")})
            _loaded(sample)
        messages = [r.getMessage() for r in caplog.records]
        assert any("m00.png: holds more than one non-zero value" in m for m in messages)
        assert sum("lies wholly under the masks before it" in m for m in messages) == 2  # before, and now
    finally:
        transforms._SAID.clear()
        transforms._SAID.update(said_before)
    (folder / "masks" / "0_all.png").unlink()
    stack = np.stack([np.where(labels == k, 255, 0).astype(np.uint8) for k in (1, 2)])
    for name in ("m01.png", "m02.png"):
        (folder / "masks" / name).unlink()
    tifffile.imwrite(folder / "masks" / "nuclei.tif", stack, photometric="minisblack")
    with pytest.raises(DataError, match=r"masks/nuclei\.tif: a stack of 2 pages; each file in a masks/ folder is one"):
        _loaded(sample)


def test_an_inverted_binary_label_image_is_said(tmp_path, caplog):
    # objects 0, background 255: one object of nearly the whole image, trained on (and scored 1.0) silently
    from medseg.transforms import instance_label_image

    labels = np.full((64, 64), 255, np.uint8)
    labels[10:16, 10:16] = 0
    Image.fromarray(labels).save(tmp_path / "inv.png")
    assert instance_label_image(tmp_path / "inv.png").max() == 1
    said = [r.getMessage() for r in caplog.records if "invert the masks" in r.getMessage()]
    assert len(said) == 1 and "one object covers 99% of the image" in said[0], said


def test_instance_masks_errors_name_the_file(dsb_folder, tmp_path):
    sample = find_dsb_samples(dsb_folder)[1]
    bad = sorted(Path(sample["label"]).glob("*.png"))[-1]
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(bad)
    with pytest.raises(DataError, match=rf"{bad.name}: size \(32, 64\) differs from its image's \(64, 64\)"):
        _loaded(sample)
    with pytest.raises(DataError, match=r"nowhere: no masks folder"):
        LoadInstanceMasksd(keys="label")({"label": str(tmp_path / "nowhere")})
    (tmp_path / "nomasks").mkdir()
    with pytest.raises(DataError, match=r"nomasks: no masks and no image"):
        LoadInstanceMasksd(keys="label", ref_key=None)({"label": str(tmp_path / "nomasks")})
    # a JPEG mask is named, not skipped as if the nucleus were not there; BMP is lossless and read; a macOS
    # "._" file beside the masks is not a mask
    jpeg = sorted(Path(sample["label"]).glob("*.png"))[0]
    Image.open(jpeg).convert("L").save(jpeg.with_suffix(".jpg"))
    jpeg.unlink()
    with pytest.raises(DataError, match=rf"{jpeg.stem}\.jpg: a \.jpg instance mask; JPEG compression"):
        _loaded(sample)
    Image.open(jpeg.with_suffix(".jpg")).save(jpeg.with_suffix(".bmp"))
    jpeg.with_suffix(".jpg").unlink()
    bad.unlink()
    (Path(sample["label"]) / "._x.png").write_bytes(b"\x00\x05\x16\x07")
    assert _loaded(sample)["label"].max() == len(list(Path(sample["label"]).glob("*.[pb][nm][gp]"))) - 1
    # an empty masks folder beside an image gives an all-background label
    d = LoadInstanceMasksd(keys="label")({"image": np.zeros((1, 9, 7), np.float32), "label": str(tmp_path / "nomasks")})
    assert d["label"].shape == (1, 9, 7) and not d["label"].any()


def _write_label_folders(root: Path, seed: int = 0, n: int = 5) -> list[np.ndarray]:
    """Images + instance label images (``root/images/sNN.png`` + ``root/masks/sNN.png``, 16-bit, values 100 +
    7k so they are neither 1..N nor 8 bit); returns the labels written."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    written = []
    for k in range(n):
        image, labels = synthetic_nuclei(rng, (64, 64))
        Image.fromarray(image).save(root / "images" / f"s{k:02d}.png")
        coded = np.where(labels > 0, 100 + 7 * labels, 0).astype(np.uint16)
        Image.fromarray(coded).save(root / "masks" / f"s{k:02d}.png")
        written.append(labels)
    return written


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects, whatever their numbers."""
    pairs = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def test_images_with_instance_label_images_load_and_split(tmp_path):
    from medseg.data import instance_layout, instance_split

    written = _write_label_folders(tmp_path / "data")
    assert instance_layout(tmp_path / "data") == "folders"
    split = instance_split(tmp_path / "data", val_fraction=0.2, seed=0, save_to=str(tmp_path / "run"))
    assert len(split["all"]) == 5 and len(split["val"]) == 1 and len(split["train"]) == 4
    assert json.loads((tmp_path / "run" / "split.json").read_text())["val"] == [s["name"] for s in split["val"]]
    for sample, labels in zip(split["all"], written, strict=True):
        d = _loaded(sample)
        assert d["label"].shape == (1, 64, 64) and d["label_file"] == sample["label"]
        loaded = d["label"][0].astype(np.int32)
        assert loaded.max() == labels.max() == len(np.unique(loaded)) - 1  # renumbered 1..N
        assert _same_partition(loaded, labels)
    # the Kaggle layout is still found as such, and asking for it where there is none says what to set
    assert instance_layout(write_dsb_folder(tmp_path / "dsb")) == "kaggle"
    with pytest.raises(DataError, match=r"no DSB samples found; .* --set layout=folders"):
        instance_split(tmp_path / "data", layout="kaggle")
    from medseg.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"layout='stardist': unknown; use --set layout=auto, kaggle or folders"):
        instance_split(tmp_path / "data", layout="stardist")


def test_a_binary_mask_given_as_labels_becomes_one_object_per_region(tmp_path, caplog):
    written = _write_label_folders(tmp_path / "data", n=2)
    for k, labels in enumerate(written):
        Image.fromarray(((labels > 0) * 255).astype(np.uint8)).save(tmp_path / "data" / "masks" / f"s{k:02d}.png")
    from medseg.data import instance_split

    with caplog.at_level("WARNING", logger="medseg.transforms"):
        for sample, labels in zip(instance_split(tmp_path / "data", val_fraction=0.5)["all"], written, strict=True):
            loaded = _loaded(sample)["label"][0].astype(np.int32)
            regions = ndimage_label(labels > 0)
            assert loaded.max() == regions.max() > 1 and _same_partition(loaded, regions)
    said = [r.getMessage() for r in caplog.records if "binary mask" in r.getMessage()]
    assert len(said) == 1 and "s00.png: one value (255) in" in said[0]  # once for the folder


def ndimage_label(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), bool))[0]


@pytest.mark.parametrize(("content", "says"), [
    ("rgb", r"an instance label image has one channel .* this one 3; save the labels as a gray 16-bit"),
    ("fraction", r"holds fractional values, not instance labels"),
    ("negative", r"holds negative values \(-3\)"),
    ("small", r"size \(32, 64\) differs from its image's \(64, 64\)"),
    ("jpeg", r"a \.jpg instance label image; JPEG compression"),
])
def test_bad_instance_label_images_are_named(tmp_path, content, says):
    from medseg.data import instance_split

    _write_label_folders(tmp_path / "data", n=2)
    bad = tmp_path / "data" / "masks" / "s01.png"
    bad.unlink()
    if content == "rgb":  # colour-coded objects
        colours = np.zeros((64, 64, 3), np.uint8)
        colours[5:15, 5:15] = (200, 30, 90)
        Image.fromarray(colours).save(bad)
    elif content == "fraction":
        bad = bad.with_suffix(".tif")
        tifffile.imwrite(bad, np.full((64, 64), 1.5, np.float32))
    elif content == "negative":
        bad = bad.with_suffix(".tif")
        tifffile.imwrite(bad, np.full((64, 64), -3, np.int16))
    elif content == "small":
        Image.fromarray(np.zeros((32, 64), np.uint16)).save(bad)
    else:
        bad = bad.with_suffix(".jpg")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(bad)
    if content == "jpeg":  # not taken as a mask by the listing: named there
        with pytest.raises(DataError, match=rf"{bad.name}: .*JPEG"):
            instance_split(tmp_path / "data", val_fraction=0.5)
        return
    sample = next(s for s in instance_split(tmp_path / "data", val_fraction=0.5)["all"] if s["name"].endswith("s01"))
    with pytest.raises(DataError, match=rf"{bad.name}: {says}"):
        _loaded(sample)


def test_instance_target_classes_and_kept_instances():
    _, labels = synthetic_nuclei(np.random.default_rng(3), (64, 64), n_single=2, n_pairs=1)
    d = InstanceTargetd(keys="label", boundary_width=2)({"label": labels[None].astype(np.float32)})
    target, instances = d["label"][0], d["instances"][0]
    assert d["label"].dtype == np.float32 and set(np.unique(target).tolist()) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(instances, labels)
    np.testing.assert_array_equal(target > 0, labels > 0)
    # the touching pair (labels 1 and 2) is separated: no interior pixel of 1 borders an interior pixel of 2
    interior = np.where(target == 1, labels, 0)
    touching = (interior[:, :-1] * interior[:, 1:] > 0) & (interior[:, :-1] != interior[:, 1:])
    touching_v = (interior[:-1] * interior[1:] > 0) & (interior[:-1] != interior[1:])
    assert not touching.any() and not touching_v.any()
    shared = (labels[:-1] == 1) & (labels[1:] == 2) | (labels[:-1] == 2) & (labels[1:] == 1)
    assert shared.any()  # the pair does touch
    d = InstanceTargetd(keys="label", instance_key=None)({"label": labels[None].astype(np.float32)})
    assert "instances" not in d


def test_bright_objects_inverts_bright_backgrounds_only(dsb_folder):
    samples = {s["name"]: s for s in find_dsb_samples(dsb_folder)}
    for name in ("a1", "c1"):  # a1: dark background (RGBA), c1: bright background (RGB)
        d = _loaded(samples[name])
        raw = d["image"].copy()
        out = BrightObjectsd(keys="image")(d)["image"]
        nuclei = d["label"][0] > 0
        assert out.shape == (1, 64, 64) and out.dtype == np.float32 and 0.0 <= out.min() <= out.max() <= 1.0
        assert out[0][nuclei].mean() > out[0][~nuclei].mean() + 0.5, name  # nuclei bright in both
        raw_gray = raw[:3].mean(0)
        assert (raw_gray[nuclei].mean() > raw_gray[~nuclei].mean()) == (name == "a1")
    flat = BrightObjectsd(keys="image")({"image": np.full((1, 5, 5), 7.0, np.float32)})["image"]
    assert not flat.any()  # a constant image stays finite
    # two channels (an ImageJ hyperstack, say): named, not a shape error deep in the network
    with pytest.raises(DataError, match=r"^st\.tif: 2 channels; the model takes gray or RGB images"):
        BrightObjectsd(keys="image")({"image": np.zeros((2, 5, 5), np.float32), "image_file": "st.tif"})


def test_a_field_that_nuclei_fill_stays_a_dark_background_one():
    # the median decided the polarity: a fluorescence crop that nuclei fill for the most part was inverted,
    # and the network then segmented its background
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    nuclei = np.zeros((96, 96), bool)
    for cy, cx in ((28, 28), (28, 70), (70, 28), (70, 70)):
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 < 22 ** 2
    assert nuclei.mean() > 0.6
    image = np.where(nuclei, rng.uniform(150, 250, nuclei.shape), rng.normal(10, 1, nuclei.shape))[None]
    out = BrightObjectsd(keys="image")({"image": image.astype(np.float32)})["image"][0]
    assert out[nuclei].mean() > out[~nuclei].mean() + 0.4
    brightfield = BrightObjectsd(keys="image")({"image": (255 - image).astype(np.float32)})["image"][0]
    np.testing.assert_allclose(brightfield, out, atol=0.02)  # the same picture, bright background: inverted
    # a data set of one known kind can say so
    forced = BrightObjectsd(keys="image", invert=True)({"image": image.astype(np.float32)})["image"][0]
    np.testing.assert_allclose(forced, 1.0 - out, atol=1e-6)
    kept = BrightObjectsd(keys="image", invert=False)({"image": (255 - image).astype(np.float32)})["image"][0]
    assert kept[nuclei].mean() < kept[~nuclei].mean()
    with pytest.raises(ConfigValueError, match="invert="):
        BrightObjectsd(keys="image", invert="yes")
    # saturation makes a peak in the top bins: clipped fluorescence nuclei stay bright, an overexposed
    # brightfield background is still inverted (the median decides there)
    one = (yy - 48) ** 2 + (xx - 48) ** 2 < 22 ** 2  # 16 % of the image
    clipped = np.where(one, 255.0, rng.normal(20, 4, one.shape))[None].astype(np.float32)
    out = BrightObjectsd(keys="image")({"image": clipped})["image"][0]
    assert out[one].mean() > out[~one].mean() + 0.5
    overexposed = np.where(one, rng.uniform(20, 120, one.shape), 255.0)[None].astype(np.float32)
    out = BrightObjectsd(keys="image")({"image": overexposed})["image"][0]
    assert out[one].mean() > out[~one].mean() + 0.5


def test_bundle_load_chain(dsb_folder):
    from monai.transforms import Compose

    from medseg.bundle import load_config

    parser = load_config(NUCLEI, "train", settings={"dataset_dir": str(dsb_folder),
                                                    "output_dir": str(dsb_folder.parent / "run")})
    chain = Compose(parser.get_parsed_content("load"))
    sample = next(s for s in parser.get_parsed_content("datalists")["all"] if s["name"] == "c1")
    d = chain(sample)
    assert np.asarray(d["image"]).shape == (1, 64, 64)
    assert set(np.unique(np.asarray(d["label"])).tolist()) == {0.0, 1.0, 2.0}
    assert int(np.asarray(d["instances"]).max()) == _mask_count(sample)


def test_training_chain_brings_nuclei_to_the_standard_size_before_the_targets(dsb_folder):
    """Training resamples image and instances (nearest) to ``target_diameter``, then derives the classes, so the
    boundary keeps its width in the network's pixels; validation keeps the images' own size."""
    from monai.transforms import Compose

    from medseg.bundle import load_config
    from medseg.scale import inscribed_diameter

    parser = load_config(NUCLEI, "train", overrides={"target_diameter": 20},
                         settings={"dataset_dir": str(dsb_folder), "output_dir": str(dsb_folder.parent / "run")})
    train = Compose([*parser.get_parsed_content("load_instances"), parser.get_parsed_content("train#rescale"),
                     *parser.get_parsed_content("targets")])
    sample = next(s for s in parser.get_parsed_content("datalists")["all"] if s["name"] == "a1")
    d = train(sample)
    native = Compose(parser.get_parsed_content("load"))(sample)
    zoom = parser.get_parsed_content("target_diameter") / inscribed_diameter(np.asarray(native["instances"])[0])
    assert zoom > 1.5 and d["zoom"] == pytest.approx(zoom)  # synthetic nuclei are 7-14 px wide
    size = tuple(round(n * zoom) for n in (64, 64))
    assert np.asarray(d["image"]).shape == (1, *size) and np.asarray(d["label"]).shape == (1, *size)
    assert set(np.unique(np.asarray(d["label"])).tolist()) == {0.0, 1.0, 2.0}
    assert int(np.asarray(d["instances"]).max()) == _mask_count(sample)  # no nucleus lost
    assert inscribed_diameter(np.asarray(d["instances"])[0]) == pytest.approx(20, rel=0.15)
    assert np.asarray(native["image"]).shape == (1, 64, 64)


@pytest.mark.parametrize("touch_weight", [0.0, 10.0])
def test_training_chain_carries_the_touching_weights_and_distances_in_the_label(dsb_folder, touch_weight):
    """The training label is (class, pixel weight, distance), cropped, rotated and flipped together: the weights
    exceed 1 only with touch_weight set, and then peak on the boundary class where two nuclei touch; the
    distance target is positive exactly on the nuclei; the loss is the Dice + pixel-weighted CE that reads
    them."""
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from medseg.bundle import load_config
    from medseg.losses import DiceWeightedCE

    overrides = {"touch_weight": touch_weight, "samples_per_image": 1, "patch_size": [48, 48]}
    parser = load_config(NUCLEI, "train", overrides=overrides, settings={"dataset_dir": str(dsb_folder),
                                                                         "output_dir": str(dsb_folder.parent / "run")})
    assert isinstance(parser.get_parsed_content("loss"), DiceWeightedCE)
    chain = Compose(parser.get_parsed_content("train#preprocessing").transforms)
    sample = next(s for s in parser.get_parsed_content("datalists")["all"] if s["name"] == "c1")
    set_determinism(seed=0)
    peaks_on_boundary = 0
    for _ in range(12):  # random 48-px crops of the 64-px image, rotations and flips
        d = chain(sample)
        d = d[0] if isinstance(d, list) else d
        label = np.asarray(d["label"])
        assert label.shape == (3, 48, 48) and not {"weight", "distance", "instances"} & set(d)
        assert set(np.unique(label[0]).tolist()) <= {0.0, 1.0, 2.0}
        np.testing.assert_array_equal(label[2] > 0, label[0] > 0)  # aligned with the targets after the flips
        assert label[2].max() <= 1.0
        if not touch_weight:
            np.testing.assert_array_equal(label[1], 1.0)
        elif label[1].max() > 10.0:  # the crop holds the touching pair's shared edge (peak 1 + 10 e^(-1/18))
            assert label[1].min() >= 1.0
            assert np.all(label[0][label[1] > 10.0] == 2.0)  # aligned with the targets after the flips
            peaks_on_boundary += 1
    set_determinism(seed=None)
    assert peaks_on_boundary > 0 or not touch_weight


def test_evaluate_and_infer_average_the_8_transforms_but_validation_does_not(dsb_folder):
    """nuclei's TTA (+0.012 to +0.019 DSB measured) runs in evaluate and infer; the 30 validations of a training
    stay single-pass so that 300 epochs fit the time budget; ``--no-tta`` (an override) turns it off."""
    from medseg.bundle import load_config

    settings = {"dataset_dir": str(dsb_folder)}
    assert load_config(NUCLEI, "train", settings=settings).get_parsed_content("validate#inferer").tta is False
    assert load_config(NUCLEI, "evaluate", settings=settings).get_parsed_content("validate#inferer").tta is True
    assert load_config(NUCLEI, "infer").get_parsed_content("inferer").tta is True
    off = load_config(NUCLEI, "evaluate", overrides={"validate#inferer#tta": False}, settings=settings)
    assert off.get_parsed_content("validate#inferer").tta is False


# --- writers: instance labels and tables ---------------------------------------------------------------------


def test_instances_png_uint16_labels_and_table(tmp_path):
    image, labels = synthetic_nuclei(np.random.default_rng(4), (64, 64), n_single=3, n_pairs=1)
    source = tmp_path / "in" / "n.png"
    source.parent.mkdir()
    Image.fromarray(image).save(source)
    n = int(labels.max())
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="instances",
                               postprocess=WatershedInstances(), save_prob=True)
    writer({"pred": _clean_prob(labels), "name": "n", "image_file": str(source)})
    mask = np.asarray(Image.open(tmp_path / "out" / "mask" / "n.png"))
    assert mask.dtype == np.uint16 and mask.shape == (64, 64)
    assert sorted(np.unique(mask).tolist()) == list(range(n + 1))  # the touching pair is split again
    assert writer.object_counts == {"n": n}
    with open(tmp_path / "out" / "table" / "n.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == MEASUREMENT_FIELDS and len(rows) == n
    assert [int(r["label"]) for r in rows] == list(range(1, n + 1))
    assert sum(int(r["area"]) for r in rows) == np.count_nonzero(mask)
    assert all(float(r["mean_intensity"]) > 120 for r in rows)  # the input's own pixel values (bright nuclei)
    prob = tifffile.imread(tmp_path / "out" / "prob" / "n.tif")
    np.testing.assert_allclose(prob, (labels > 0).astype(np.float32))


def test_the_table_is_in_micrometres_too_where_the_input_states_its_pixel_size(tmp_path):
    import nibabel as nib

    from medseg.readers import read_geometry
    from medseg.writers import pixel_micrometres

    image, labels = synthetic_nuclei(np.random.default_rng(4), (64, 64), n_single=3, n_pairs=1)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "plain.png")
    # 20000 pixels per cm across, 40000 down: 0.5 x 0.25 µm
    tifffile.imwrite(tmp_path / "in" / "cal.tif", image, resolution=(20000, 40000), resolutionunit="CENTIMETER")
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="instances",
                               postprocess=WatershedInstances())
    for name in ("plain.png", "cal.tif"):
        writer({"pred": _clean_prob(labels), "name": name.split(".")[0], "image_file": str(tmp_path / "in" / name)})
    tables = {}
    for name in ("plain", "cal"):
        with open(tmp_path / "out" / "table" / f"{name}.csv", newline="") as fh:
            tables[name] = list(csv.DictReader(fh))
    assert tables["plain"] and all(r["area_um2"] == r["centroid_y_um"] == r["centroid_x_um"] == ""
                                   for r in tables["plain"])  # no pixel size: empty, the columns kept
    for plain, cal in zip(tables["plain"], tables["cal"], strict=True):
        assert {k: cal[k] for k in MEASUREMENT_FIELDS[:9]} == {k: plain[k] for k in MEASUREMENT_FIELDS[:9]}
        assert float(cal["area_um2"]) == pytest.approx(int(cal["area"]) * 0.125, rel=1e-6)
        assert float(cal["centroid_y_um"]) == pytest.approx(float(cal["centroid_y"]) * 0.25, rel=1e-6)
        assert float(cal["centroid_x_um"]) == pytest.approx(float(cal["centroid_x"]) * 0.5, rel=1e-6)
    # the units of the readers: NIfTI millimetres and micrometres, none where NIfTI says its unit is unknown
    volume = np.zeros((8, 6, 2), np.uint8)  # NIfTI (i, j, k): the slices' rows are j, their columns i
    for unit, expected in (("mm", (300.0, 200.0)), ("micron", (0.3, 0.2)), ("unknown", None)):
        nifti = nib.Nifti1Image(volume, np.diag([0.2, 0.3, 1.0, 1.0]))
        nifti.header.set_xyzt_units(unit)
        nib.save(nifti, tmp_path / f"v_{unit}.nii.gz")
        found = pixel_micrometres(read_geometry(tmp_path / f"v_{unit}.nii.gz"))
        assert found == (pytest.approx(expected) if expected else None), unit
    # DICOM pixel spacing (row, column) in mm; none where the headers give no size, or one that is not a size
    # (1 mm is taken there, and said)
    import pydicom

    for case, spacing in (("stated", ["0.25", "0.5"]), ("none", None), ("zero", ["0", "0"]),
                          ("zero beside a detector's", ["0", "0"])):
        for n in (2, 1):  # a series, and a single file
            folder = write_dicom_series(tmp_path / f"{case} {n}", n=n)
            for path in sorted(folder.iterdir()):
                ds = pydicom.dcmread(path)
                if spacing is None:
                    del ds.PixelSpacing
                else:
                    ds.PixelSpacing = spacing
                if case.endswith("detector's"):  # not the spacing read: PixelSpacing is, and 1 mm stands in
                    ds.ImagerPixelSpacing = ["0.3", "0.6"]
                ds.save_as(path)
            found = pixel_micrometres(read_geometry(sorted(folder.iterdir())[0]))
            assert found == ((250.0, 500.0) if case == "stated" else None), (case, n)


def test_instances_tiff_stack_counts_every_slice(tmp_path):
    rng = np.random.default_rng(6)
    pairs = [synthetic_nuclei(rng, (48, 48), n_single=2, n_pairs=0) for _ in range(2)]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([p[0] for p in pairs]), photometric="minisblack")
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="instances",
                               postprocess=WatershedInstances(), save_prob=False)
    for page, (_, labels) in enumerate(pairs):
        writer({"pred": _clean_prob(labels), "name": "stack", "image_file": str(tmp_path / "stack.tif"),
                "page": page, "pages": 2})
    stack = tifffile.imread(tmp_path / "out" / "mask" / "stack.tif")
    assert stack.shape == (2, 48, 48) and stack.dtype == np.uint16
    counts = [int(p[1].max()) for p in pairs]
    assert [int(s.max()) for s in stack] == counts and writer.object_counts == {"stack": sum(counts)}
    with open(tmp_path / "out" / "table" / "stack.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["slice"]) for r in rows] == [0] * counts[0] + [1] * counts[1]


def _every_pixel_its_own(pred: np.ndarray) -> np.ndarray:
    """A labelling of one object per pixel: 65792 objects in a 257 x 256 slice."""
    return np.arange(1, pred[0].size + 1).reshape(pred[0].shape)


def test_a_slice_of_over_65535_objects_gets_32_bit_labels(tmp_path):
    # the input failed, with every output dropped, as "a 16-bit label image holds 65535" (a whole-slide region)
    Image.fromarray(np.full((257, 256), 9, np.uint8)).save(tmp_path / "big.png")
    pred = np.zeros((3, 257, 256), np.float32)
    item = {"pred": pred, "name": "big", "image_file": str(tmp_path / "big.png")}
    tiff = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "t"), mask_mode="instances",
                             postprocess=_every_pixel_its_own, output_format="tiff", save_prob=False)
    tiff(dict(item))
    mask = tifffile.imread(tmp_path / "t" / "mask" / "big.tif")
    assert mask.dtype == np.uint32 and int(mask.max()) == 65792 and tiff.object_counts == {"big": 65792}
    np.testing.assert_array_equal(mask, _every_pixel_its_own(pred))
    png = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "p"), mask_mode="instances",
                            postprocess=_every_pixel_its_own, save_prob=False)
    with pytest.raises(DataError, match="65792 objects in one slice, over the 65535 labels a 16-bit PNG holds; "
                                        "use --format tiff or nifti"):
        png(dict(item))
    # a volume's slices after it widen, and a slice of many objects after 16-bit slices widens the volume
    tifffile.imwrite(tmp_path / "vol.tif", np.full((3, 257, 256), 9, np.uint8), photometric="minisblack")
    few = lambda pred: (pred[1] > 0.5).astype(np.int32)  # noqa: E731 - one object
    for fmt, first in (("nifti", few), ("nifti", _every_pixel_its_own), ("tiff", _every_pixel_its_own)):
        order = [first, few, _every_pixel_its_own]
        calls = iter(order)
        writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / f"{fmt}_{first.__name__}"),
                                   mask_mode="instances", postprocess=lambda pred, calls=calls: next(calls)(pred),
                                   output_format=fmt, save_prob=False)
        writer.measure = lambda *args: []  # 65792 rows a slice: slow, and measured above
        one = pred.copy()
        one[1, 10:20, 10:20] = 1.0
        for page in range(3):
            writer({"pred": one, "name": "vol", "image_file": str(tmp_path / "vol.tif"), "page": page, "pages": 3})
        paths = writer.paths_for("vol", "tiff", 3)
        volume = np.asanyarray(nib.load(paths["mask"]).dataobj) if fmt == "nifti" else \
            tifffile.imread(paths["mask"])
        assert volume.dtype == np.uint32, fmt
        slices = np.moveaxis(volume, -1, 0) if fmt == "nifti" else volume
        assert [int(v.max()) for v in slices] == [65792 if f is _every_pixel_its_own else 1 for f in order]
    tiff_stack = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "stack16"), mask_mode="instances",
                                   postprocess=lambda pred: next(calls)(pred), output_format="tiff", save_prob=False)
    tiff_stack.measure = lambda *args: []
    calls = iter([few, _every_pixel_its_own])
    tiff_stack({"pred": one, "name": "vol", "image_file": str(tmp_path / "vol.tif"), "page": 0, "pages": 3})
    with pytest.raises(DataError, match="slice 1: 65792 objects, over the 65535 labels the 16-bit slices before "
                                        "it hold; use --format nifti"):
        tiff_stack({"pred": one, "name": "vol", "image_file": str(tmp_path / "vol.tif"), "page": 1, "pages": 3})


def test_the_table_measures_the_channels_the_network_reads(tmp_path):
    # with input_channels=[1] the mean intensity averaged a flat channel 0 into the nuclear stain's
    image = np.zeros((2, 32, 32), np.uint16)
    image[0] = 1000
    image[1, 8:16, 8:16] = 4000
    tifffile.imwrite(tmp_path / "two.tif", image, photometric="minisblack", metadata={"axes": "CYX"})
    labels = np.zeros((32, 32), np.int32)
    labels[8:16, 8:16] = 1
    prob = _clean_prob(labels)
    for channels, mean in ((None, 2500.0), ([1], 4000.0), ([0], 1000.0)):
        writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / f"o{channels}"), mask_mode="instances",
                                   postprocess=WatershedInstances(min_seed_area=1, min_area=1),
                                   measure_channels=channels, save_prob=False)
        writer({"pred": prob, "name": "two", "image_file": str(tmp_path / "two.tif")})
        with open(tmp_path / f"o{channels}" / "table" / "two.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [float(r["mean_intensity"]) for r in rows] == [mean], channels
    assert json.loads((NUCLEI / "configs" / "inference.json").read_text())["postprocessing"][
        "transforms"][-1]["measure_channels"] == "@input_channels"
    from medseg.bundle import load_config  # the bundle's writer measures what input_channels picks

    for picked in (None, [1]):
        parser = load_config(NUCLEI, "infer", overrides={"input_channels": picked})
        assert parser.get_parsed_content("postprocessing").transforms[-1].measure_channels == picked
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o3"), mask_mode="instances",
                               postprocess=WatershedInstances(min_seed_area=1, min_area=1), measure_channels=[2])
    with pytest.raises(DataError, match=r"two.tif: 2 channels, and the table measures channels \[2\]"):
        writer({"pred": prob, "name": "two", "image_file": str(tmp_path / "two.tif")})
    for bad in (1, [], [-1], ["1"]):
        with pytest.raises(ValueError, match="measure_channels must be channel numbers from 0"):
            SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="instances",
                              postprocess=WatershedInstances(), measure_channels=bad)


def test_instances_of_dicom_go_to_nifti_and_need_a_postprocess(tmp_path):
    write_dicom_slice(tmp_path / "ct" / "IM0.dcm", np.zeros((8, 8), np.int16),
                      series_uid="1.2.826.0.1.3680043.8.498.78", position=(0.0, 0.0, 0.0))
    with pytest.raises(DataError, match="DICOM SEG output holds binary masks; this bundle writes instances"):
        SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"), mask_mode="instances",
                          postprocess=WatershedInstances(), output_format="dicom-seg")
    auto = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "o"), mask_mode="instances",
                             postprocess=WatershedInstances())
    paths = auto.paths_for("ct", "dicom", 1)  # by default instance labels of DICOM inputs go to NIfTI
    assert (paths["mask"].name, paths["table"].name) == ("ct.nii.gz", "ct.csv")
    assert set(auto.paths_for("x", "png", 1)) == {"mask", "prob", "table"}
    with pytest.raises(ValueError, match="needs a postprocess"):
        SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="instances")


# --- instance metrics ----------------------------------------------------------------------------------------


def _engine(items: list[tuple[np.ndarray, np.ndarray, str]], attach) -> Engine:
    """Run an engine over one image per iteration; outputs are ``{"prob", "pred_instances", "gt_instances"}``
    (the watershed applied once, as the bundle's postprocessing does), batches ``{"name"}`` (as the
    evaluator's decollated lists)."""
    watershed = WatershedInstances()

    def step(engine, batch):
        return [{"prob": item["prob"], "pred_instances": watershed(item["prob"]),
                 "gt_instances": item["gt"][None].astype(np.float32)} for item in batch]

    engine = Engine(step)
    attach(engine)
    engine.run([[{"prob": prob, "gt": gt, "name": name}] for prob, gt, name in items])
    return engine


def test_dsb_metric_and_report_on_perfect_and_empty_predictions(tmp_path, caplog):
    rng = np.random.default_rng(8)
    gts = [synthetic_nuclei(rng, (48, 48))[1] for _ in range(2)]
    empty = np.zeros((3, 48, 48), np.float32)
    empty[0] = 1.0

    def metric(engine):
        DsbScore(output_transform=lambda out: (
            [o["pred_instances"] for o in out], [o["gt_instances"] for o in out])).attach(engine, "dsb")

    perfect = [(_clean_prob(gt), gt, f"p{k}") for k, gt in enumerate(gts)]
    assert _engine(perfect, metric).state.metrics["dsb"] == pytest.approx(1.0)
    assert _engine([(empty, gts[0], "x")], metric).state.metrics["dsb"] == 0.0
    with pytest.raises(ValueError, match="at least one image"):
        DsbScore().compute()

    report = InstanceMetrics(str(tmp_path / "eval"))
    engine = _engine([perfect[0], (empty, gts[1], "b")], report.attach)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary == report.summary and engine.state.metrics["dsb_score"] == pytest.approx(0.5)
    assert summary["images"] == 2 and summary["dsb_score"] == pytest.approx(0.5)
    assert summary["ap_50"] == pytest.approx(0.5) and summary["dice"] == pytest.approx(0.5)
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["p0", "b"]
    assert [int(r["gt_count"]) for r in rows] == [int(g.max()) for g in gts]
    assert [int(r["pred_count"]) for r in rows] == [int(gts[0].max()), 0]
    assert summary["images_without_nuclei"] == 0
    # an image without nuclei on either side has no score, and is left out of the means (it scored 1.0 and
    # lifted them: five empty fields moved a set from 0.20 to 0.37)
    nothing = np.zeros((48, 48), np.int32)
    report = InstanceMetrics(str(tmp_path / "eval2"))
    engine = _engine([perfect[0], (empty, gts[1], "b"), (empty, nothing, "none")], report.attach)
    assert report.summary["images"] == 3 and report.summary["images_without_nuclei"] == 1
    assert report.summary["dsb_score"] == pytest.approx(0.5) and report.summary["dice"] == pytest.approx(0.5)
    assert engine.state.metrics["dsb_score"] == pytest.approx(0.5)
    with open(tmp_path / "eval2" / "metrics.csv", newline="") as fh:
        assert [r["dsb_score"] for r in csv.DictReader(fh)][2] == "nan"
    assert np.isnan(_engine([(empty, nothing, "none")], metric).state.metrics["dsb"])  # no score at all
    once = DsbScore()
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.evaluation"):
        for _ in range(2):  # two validations of one training: said once
            once.reset()
            once.update(([nothing[None]], [nothing[None]]))
            assert np.isnan(once.compute())
    assert len([r for r in caplog.records if "has a nucleus in its label or its prediction" in r.getMessage()]) == 1
    report = InstanceMetrics(str(tmp_path / "eval3"))
    _engine([(empty, nothing, "none")], report.attach)
    summary = json.loads((tmp_path / "eval3" / "summary.json").read_text())
    assert summary["dsb_score"] is None and summary["images_without_nuclei"] == 1


# --- CLI end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny 2-epoch nuclei training on synthetic DSB samples, shared by the CLI tests."""
    root = tmp_path_factory.mktemp("nuclei_cli")
    data = write_dsb_folder(root / "data")
    out = root / "run"
    result = _invoke("train", NUCLEI, "--data", data, "--output", out, "--epochs", 2, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_sets(TINY))
    assert result.exit_code == 0, result.output
    return {"data": data, "out": out}


def test_cli_train_writes_model_split_and_dsb_history(trained):
    out = trained["out"]
    for name in ("model.pt", "split.json", "history.json", "config.json", "train_summary.json"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "split.json").read_text())["val"]) == 2
    history = json.loads((out / "history.json").read_text())
    assert history["val_epoch"] == [1, 2]
    for m in history["val"]:
        assert 0.0 <= m["val_dsb_score"] <= 1.0 and 0.0 <= m["val_ap_50"] <= 1.0 and 0.0 <= m["val_mean_dice"] <= 1
    assert json.loads((out / "train_summary.json").read_text())["key_metric"] == "val_dsb_score"


def test_cli_evaluate_all_writes_dsb_scores_and_groups(trained, tmp_path):
    result = _invoke("evaluate", NUCLEI, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--split", "all", "--no-progress", "--device", "cpu",
                     *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 6
    for key in ("dsb_score", "ap_50", "ap_75", "dice"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["groups"].keys() == {"RGBA-64x64", "RGBA-80x72", "RGB-64x64"}
    assert [g["images"] for g in summary["groups"].values()] == [1, 3, 2]
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    for sample in find_dsb_samples(trained["data"]):
        assert int(rows[sample["name"]]["gt_count"]) == _mask_count(sample)


def test_cli_evaluate_val_scores_the_runs_validation_samples(trained, tmp_path):
    result = _invoke("evaluate", NUCLEI, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert names == json.loads((trained["out"] / "split.json").read_text())["val"]


def test_cli_infer_writes_labels_tables_and_object_counts(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for sample in find_dsb_samples(trained["data"]):
        if sample["name"] in ("a1", "a3", "c1"):  # c1: RGB with a bright background
            shutil.copy(sample["image"], inputs)
    write_dicom_series(inputs / "ct", n=2, size=24)  # instance labels of a DICOM series go to NIfTI
    out = tmp_path / "out"
    result = _invoke("infer", NUCLEI, inputs, out, "--checkpoint", trained["out"] / "model.pt", "--no-progress",
                     "--device", "cpu", *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0, result.output
    with open(out / "manifest.csv", newline="") as fh:
        rows = {Path(r["input"]).stem: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["a1", "a3", "c1", "ct"]
    ct = rows.pop("ct")
    assert ct["status"] == "ok" and ct["mask"] == str(out / "mask" / "ct.nii.gz")
    labels = np.asarray(nib.load(ct["mask"]).dataobj)
    assert labels.shape == (24, 24, 2) and labels.dtype == np.uint16
    with open(ct["table"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert int(ct["objects"]) == len(table) and {r["slice"] for r in table} <= {"0", "1"}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["objects"] != ""
        mask = np.asarray(Image.open(out / "mask" / f"{name}.png"))
        assert mask.dtype == np.uint16 and mask.shape == (64, 64)
        assert row["table"] == str(out / "table" / f"{name}.csv")
        with open(row["table"], newline="") as fh:
            table = list(csv.DictReader(fh))
        assert int(row["objects"]) == len(table) == len(set(np.unique(mask).tolist()) - {0})
        assert (out / "prob" / f"{name}.tif").is_file()
    # a second run skips the inputs whose outputs (table included) exist
    result = _invoke("infer", NUCLEI, inputs, out, "--checkpoint", trained["out"] / "model.pt", "--no-progress",
                     "--device", "cpu", *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0 and json.loads(result.output[result.output.index("{"):])["skipped"] == 4
    with open(out / "manifest.csv", newline="") as fh:  # a skipped input keeps its count
        again = {Path(r["input"]).stem: r["objects"] for r in csv.DictReader(fh)}
    assert again == {name: r["objects"] for name, r in {**rows, "ct": ct}.items()}


def test_cli_object_size_option_trains_evaluates_and_infers_on_the_input_grid(tmp_path, monkeypatch):
    """``target_diameter`` (off by default) runs through train, evaluate and infer; ``diameter`` is a known size."""
    from medseg.scale import ScaledTiledInferer

    zooms: list[float] = []
    call = ScaledTiledInferer.__call__

    def spy(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        zooms.extend(self.last_zooms)
        return out

    monkeypatch.setattr(ScaledTiledInferer, "__call__", spy)
    data = write_dsb_folder(tmp_path / "data")
    result = _invoke("train", NUCLEI, "--data", data, "--output", tmp_path / "run", "--epochs", 1,
                     "--no-progress", "--no-tracking", "--device", "cpu", *_sets([*TINY, "target_diameter=16"]))
    assert result.exit_code == 0, result.output
    assert any(z > 1.0 for z in zooms)  # validation brought the 7-14 px nuclei up to the standard size
    net_sets = [*NUCLEI_TINY_NET, "target_diameter=16"]
    result = _invoke("evaluate", NUCLEI, "--data", data, "--checkpoint", tmp_path / "run" / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_sets(net_sets))
    assert result.exit_code == 0, result.output
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(next(s for s in find_dsb_samples(data) if s["name"] == "b1")["image"], inputs)
    zooms.clear()
    result = _invoke("infer", NUCLEI, inputs, tmp_path / "out", "--checkpoint", tmp_path / "run" / "model.pt",
                     "--no-progress", "--device", "cpu", *_sets([*net_sets, "diameter=8"]))
    assert result.exit_code == 0, result.output
    assert zooms == [2.0]  # 16 / 8, nothing estimated
    mask = np.asarray(Image.open(tmp_path / "out" / "mask" / "b1.png"))
    assert mask.shape == (80, 72) and mask.dtype == np.uint16  # on the input's grid


def test_cli_distance_head_trains_evaluates_and_infers(tmp_path):
    """``distance_head`` (off by default) adds a fourth output channel, trained on the normalised distance map and
    used as the watershed's seed map, through train, evaluate and infer; the saved probability map stays the
    foreground probability."""
    data = write_dsb_folder(tmp_path / "data")
    sets = [*TINY, "distance_head=true"]
    result = _invoke("train", NUCLEI, "--data", data, "--output", tmp_path / "run", "--epochs", 1,
                     "--no-progress", "--no-tracking", "--device", "cpu", *_sets(sets))
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert [v.shape[0] for k, v in state.items() if k.endswith("bias")][-1] == 4  # 3 classes + distance
    net_sets = [*NUCLEI_TINY_NET, "distance_head=true"]
    result = _invoke("evaluate", NUCLEI, "--data", data, "--checkpoint", tmp_path / "run" / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_sets(net_sets))
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads((tmp_path / "eval" / "summary.json").read_text())["dsb_score"] <= 1.0
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(next(s for s in find_dsb_samples(data) if s["name"] == "b1")["image"], inputs)
    result = _invoke("infer", NUCLEI, inputs, tmp_path / "out", "--checkpoint", tmp_path / "run" / "model.pt",
                     "--no-progress", "--device", "cpu", *_sets(net_sets))
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "out" / "mask" / "b1.png")).shape == (80, 72)
    prob = tifffile.imread(tmp_path / "out" / "prob" / "b1.tif")
    assert prob.shape == (80, 72) and 0.0 <= prob.min() and prob.max() <= 1.0
    # without the settings, those of the training (its config.json) are used
    result = _invoke("evaluate", NUCLEI, "--data", data, "--checkpoint", tmp_path / "run" / "model.pt",
                     "--output", tmp_path / "eval2", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval2" / "summary.json").read_text())["dsb_score"] == \
        json.loads((tmp_path / "eval" / "summary.json").read_text())["dsb_score"]
    # the distance model run with distance_head=false is a one-line error naming the checkpoint, not a traceback
    result = _invoke("evaluate", NUCLEI, "--data", data, "--checkpoint", tmp_path / "run" / "model.pt",
                     "--output", tmp_path / "eval3", "--no-progress", "--device", "cpu",
                     *_sets([*NUCLEI_TINY_NET, "distance_head=false"]))
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(errors) == 1 and "model.pt" in errors[0] and "Traceback" not in result.output


def test_cli_sample_without_masks_is_one_line(tmp_path):
    data = write_dsb_folder(tmp_path / "d", layout=[("x1", (48, 48), False), ("x2", (48, 48), False)])
    shutil.rmtree(data / "stage1_train" / "x2" / "masks")
    result = _invoke("train", NUCLEI, "--data", data, "--output", tmp_path / "o", "--no-tracking",
                     "--device", "cpu", *_sets(TINY))
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "x2: no masks/ folder" in errors[0] and "Traceback" not in result.output


def test_layouts_chosen_by_the_settings_and_refused_when_both_are_there(tmp_path):
    from medseg.data import instance_layout
    from medseg.errors import ConfigValueError

    # per-folder images/ + masks/: the Kaggle guess would have merged each label image into one nucleus
    _write_label_folders(tmp_path / "odd" / "p1", n=2)
    assert instance_layout(tmp_path / "odd") == "kaggle"
    assert instance_layout(tmp_path / "odd", image_glob="*/images/*") == "folders"
    both = write_dsb_folder(tmp_path / "both")
    _write_label_folders(both, n=1)
    with pytest.raises(ConfigValueError, match=r"holds both images/ \+ masks/ and DSB samples .* --set layout=folders"):
        instance_layout(both)
    assert instance_layout(both, "kaggle") == "kaggle"


def test_data_folder_mistakes_get_the_fix_named(tmp_path):
    from medseg.data import instance_split

    _write_label_folders(tmp_path / "d" / "train", n=2)
    _write_label_folders(tmp_path / "d" / "test", n=2)
    for image in (tmp_path / "d" / "test" / "images").iterdir():  # StarDist keeps TIFFs
        tifffile.imwrite(image.with_suffix(".tif"), np.asarray(Image.open(image)))
        image.unlink()
    # the parent of StarDist's train/ and test/: not DSB samples named train and test
    with pytest.raises(DataError, match=r"d/test: images/ holds 2 images, not one DSB sample's; .*the folder to "
                                        r"train on, e.g. --data .*d/train$"):
        instance_split(tmp_path / "d")
    # the images folder itself
    with pytest.raises(DataError, match=r"images: no DSB samples found; .* pass --data .*d/train$"):
        instance_split(tmp_path / "d" / "train" / "images")
    with pytest.raises(DataError, match=r"masks: no DSB samples found; .* pass --data .*d/train$"):
        instance_split(tmp_path / "d" / "train" / "masks")
    # a flat folder of images and their label images (Cellpose's): not its parent, but the settings that read it
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in (tmp_path / "d" / "train" / "images").iterdir():
        shutil.copyfile(image, flat / f"{image.stem}_img.png")
    with pytest.raises(DataError, match=r"flat: no DSB samples found; .* set image_glob and mask_template, e\.g\. "
                                        r"for Cellpose's .* -s 'mask_template=\{match\}_masks\.png'$"):
        instance_split(flat)
    # the labels folder under another name
    (tmp_path / "d" / "train" / "masks").rename(tmp_path / "d" / "train" / "mask")
    with pytest.raises(DataError, match=r"train: no DSB samples found; .* put the labels in masks/ beside it "
                                        r"\(found: mask\)"):
        instance_split(tmp_path / "d" / "train")


def test_cellpose_style_masks_beside_their_images_are_not_taken_for_images(tmp_path):
    from medseg.data import instance_split

    written = _write_label_folders(tmp_path / "src", n=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        shutil.copy(tmp_path / "src" / "images" / f"s{k:02d}.png", flat / f"s{k:02d}.png")
        shutil.copy(tmp_path / "src" / "masks" / f"s{k:02d}.png", flat / f"s{k:02d}_masks.png")
    samples = instance_split(flat, image_glob="*.png", mask_template="{stem}_masks.png", val_fraction=0.34)["all"]
    assert [s["name"] for s in samples] == ["s00", "s01", "s02"]
    assert _same_partition(_loaded(samples[1])["label"][0].astype(np.int32), written[1])
    # Cellpose's training data: 000_img.png + 000_masks.png, the part the * matched names the mask
    for k in range(3):
        (flat / f"s{k:02d}.png").rename(flat / f"s{k:02d}_img.png")
    samples = instance_split(flat, image_glob="*_img.png", mask_template="{match}_masks.png", val_fraction=0.34)
    assert [s["name"] for s in samples["all"]] == ["s00_img", "s01_img", "s02_img"]
    assert [Path(s["label"]).name for s in samples["all"]] == ["s00_masks.png", "s01_masks.png", "s02_masks.png"]


def test_label_images_in_sub_folders_pair_by_the_folder_name(tmp_path):
    from medseg.data import instance_split

    # StarDist-style folders split by plate: images/plateA/x.png + masks/plateA/x.png, one name in two plates
    for plate in ("plateA", "plateB"):
        _write_label_folders(tmp_path / "src" / plate, n=2)
        for sub in ("images", "masks"):
            shutil.copytree(tmp_path / "src" / plate / sub, tmp_path / "d" / sub / plate)
    with pytest.raises(DataError, match=r"d: no DSB samples found; .*with sub-folders: .* -s 'image_glob=images/\*/\*' "
                                        r"-s 'mask_template=\.\./\.\./masks/\{parent\}/\{stem\}\.\*'$"):
        instance_split(tmp_path / "d")
    samples = instance_split(tmp_path / "d", image_glob="images/*/*", mask_template="../../masks/{parent}/{stem}.*",
                             val_fraction=0.5)
    assert [Path(os.path.normpath(s["label"])).relative_to(tmp_path / "d").as_posix() for s in samples["all"]] == [
        "masks/plateA/s00.png", "masks/plateA/s01.png", "masks/plateB/s00.png", "masks/plateB/s01.png"]
    assert {s["group"] for s in samples["val"]} == {"images/plateA", "images/plateB"}  # stratified by plate
    # images at the data root: {parent} is the root's own name, however the root is spelled
    here = tmp_path / "d" / "images" / "plateA"
    shutil.copytree(tmp_path / "d" / "masks" / "plateA", here / "plateA-masks")
    cwd = os.getcwd()
    try:
        os.chdir(here)
        for root in (".", str(here)):
            found = instance_split(root, image_glob="*.png", mask_template="{parent}-masks/{stem}.png", val_fraction=0)
            assert [Path(s["label"]).name for s in found["all"]] == ["s00.png", "s01.png"], root
    finally:
        os.chdir(cwd)
    # a wildcard for the plate finds both plates' masks: both are named with their folders
    with pytest.raises(DataError, match=r"s00\.png: 2 masks match .* \(masks/plateA/s00\.png, masks/plateB/s00\.png\); "
                                        r"make mask_template specific \(its \{parent\}"):
        instance_split(tmp_path / "d", image_glob="images/*/*", mask_template="../../masks/*/{stem}.*")


def test_masks_of_a_type_not_read_are_named_as_such(tmp_path):
    from medseg.data import instance_split

    _write_label_folders(tmp_path / "src", n=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(2):
        shutil.copy(tmp_path / "src" / "images" / f"s{k:02d}.png", flat / f"s{k:02d}.png")
        np.save(flat / f"s{k:02d}_seg.npy", np.zeros((4, 4), np.uint16))
    # the mask is there, as Cellpose's GUI saves it: not "no mask matches"
    with pytest.raises(DataError, match=r"s00_seg\.npy: masks of type \.npy are not read; Cellpose's _seg\.npy .*"
                                        r"--save_tif"):
        instance_split(flat, image_glob="*.png", mask_template="{stem}_seg.npy")
    for k in range(2):
        (flat / f"s{k:02d}_seg.npy").rename(flat / f"s{k:02d}.csv")
    with pytest.raises(DataError, match=r"s00\.csv: masks of type \.csv are not read; save it as a PNG or TIFF"):
        instance_split(flat, image_glob="*.png", mask_template="{stem}.*")


def test_masks_without_an_image_are_said_and_cellpose_outputs_named(tmp_path, caplog):
    from medseg.data import instance_split

    _write_label_folders(tmp_path / "d", n=3)
    (tmp_path / "d" / "images" / "s01.png").unlink()  # an image lost: its mask was left out without a word
    with caplog.at_level("WARNING", logger="medseg.data"):
        samples = instance_split(tmp_path / "d", val_fraction=0.5)["all"]
    assert [s["name"] for s in samples] == ["images/s00", "images/s02"]
    (said,) = [r.getMessage() for r in caplog.records if "with no image" in r.getMessage()]
    assert said == (f"{tmp_path / 'd' / 'masks'}: 1 mask file pairs with no image (s01.png) and is not used; is its "
                    "image missing, or left out by image_glob?")
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.data"):  # a command that lists its data twice says it once
        instance_split(tmp_path / "d", val_fraction=0.5)
    assert not [r for r in caplog.records if "with no image" in r.getMessage()]
    from medseg.data import forget_said

    forget_said()  # as the next command starts: said again
    with caplog.at_level("WARNING", logger="medseg.data"):
        instance_split(tmp_path / "d", val_fraction=0.5)
    assert len([r for r in caplog.records if "with no image" in r.getMessage()]) == 1
    # masks that are links to files of other names (git-annex, DVC): paired, so not said to have no image
    annexed = tmp_path / "annexed"
    shutil.copytree(tmp_path / "d" / "images", annexed / "images")
    (annexed / "masks").mkdir()
    (tmp_path / "objects").mkdir()
    for k in (0, 2):
        shutil.copy(tmp_path / "d" / "masks" / f"s{k:02d}.png", tmp_path / "objects" / f"SHA{k}.png")
        (annexed / "masks" / f"s{k:02d}.png").symlink_to(tmp_path / "objects" / f"SHA{k}.png")
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.data"):
        assert len(instance_split(annexed, val_fraction=0.5)["all"]) == 2
    assert not [r for r in caplog.records if "with no image" in r.getMessage()]
    # images/ linked from elsewhere: the masks read are those of the folder linked to, and so is the warning
    store = tmp_path / "store"
    (tmp_path / "d").rename(store)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "images").symlink_to(store / "images", target_is_directory=True)
    (tmp_path / "linked" / "masks").mkdir()  # the folder "images/../masks" is not, through the link
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.data"):
        instance_split(tmp_path / "linked", layout="folders", val_fraction=0.5)
    (said,) = [r.getMessage() for r in caplog.records if "with no image" in r.getMessage()]
    assert said.startswith(f"{store / 'masks'}: 1 mask file pairs with no image (s01.png)")
    # masks beside their images, a subset picked by image_glob: the others are not said to have no image
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.data"):
        instance_split(store / "images", image_glob="s00.png", mask_template="../masks/{stem}.png")
        beside = tmp_path / "beside"
        beside.mkdir()
        for k in (0, 2):
            shutil.copy(store / "images" / f"s{k:02d}.png", beside / f"s{k:02d}.png")
            shutil.copy(store / "masks" / f"s{k:02d}.png", beside / f"s{k:02d}_masks.png")
        instance_split(beside, image_glob="s00.png", mask_template="{stem}_masks.png", val_fraction=0)
    assert [r.getMessage() for r in caplog.records if "with no image" in r.getMessage()] == [
        f"{store / 'masks'}: 2 mask files pair with no image (s01.png, s02.png) and are not used; are their images "
        "missing, or left out by image_glob?"]
    # Cellpose writes x_flows.tif beside x.tif and x_masks.tif: not an image without a mask, but its output
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in (0, 2):
        tifffile.imwrite(flat / f"s{k:02d}.tif", np.asarray(Image.open(store / "images" / f"s{k:02d}.png")))
        shutil.copy(store / "masks" / f"s{k:02d}.png", flat / f"s{k:02d}_masks.png")
    tifffile.imwrite(flat / "s00_flows.tif", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"s00_flows\.tif: no mask matches .*; it looks like Cellpose's output for "
                                        r"s00\.tif, not an image: move Cellpose's outputs out of .*flat, or set "
                                        r"image_glob to match the images alone$"):
        instance_split(flat, image_glob="*.tif", mask_template="{stem}_masks.png")


def test_stacks_are_refused_in_the_folders_layout(tmp_path):
    from medseg.data import instance_split

    _write_label_folders(tmp_path / "data", n=2)
    (tmp_path / "data" / "masks" / "s01.png").unlink()
    tifffile.imwrite(tmp_path / "data" / "masks" / "s01.tif", np.zeros((5, 64, 64), np.uint16))
    with pytest.raises(DataError, match=r"s01\.tif: a stack of 5 pages; this bundle trains on 2D images"):
        instance_split(tmp_path / "data")


def test_palette_and_64_bit_label_images_keep_their_objects(tmp_path):
    from medseg.transforms import instance_label_image

    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6], labels[10:15, 10:15], labels[2:6, 12:18] = 3, 7, 200
    palette = Image.fromarray(labels, "P")
    palette.putpalette([v for k in range(256) for v in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)])
    palette.save(tmp_path / "p.png")
    assert _same_partition(instance_label_image(tmp_path / "p.png"), labels)
    big = np.where(labels > 0, 2**60 + labels.astype(np.uint64), 0).astype(np.uint64)
    tifffile.imwrite(tmp_path / "big.tif", big)
    got = instance_label_image(tmp_path / "big.tif")
    assert got.max() == 3 and _same_partition(got, labels)


def test_a_label_image_put_in_a_masks_folder_is_said(tmp_path, caplog):
    import medseg.transforms

    _, labels = synthetic_nuclei(np.random.default_rng(5), (48, 48))
    folder = write_dsb_sample(tmp_path / "dsb", "x", np.zeros((48, 48), np.uint8), np.zeros((48, 48), np.int32))
    Image.fromarray(labels.astype(np.uint16)).save(folder / "masks" / "x.png")
    sample = {"image": str(folder / "images" / "x.png"), "label": str(folder / "masks")}
    # the folder's one file: a label image of all the nuclei, which the message says how to read (it was a
    # warning, and its hint, --set layout=folders, found no images in the Kaggle layout; so did the hint of the
    # warning for such a file among others)
    with pytest.raises(DataError, match=r"masks/x\.png: the one mask of its masks/ folder holds several object "
                                        r"values, .* 'image_glob=\*/images/\*' --set 'mask_template=../masks/\*'"):
        _loaded(sample)
    Image.fromarray((labels == 1).astype(np.uint8) * 255).save(folder / "masks" / "one.png")
    medseg.transforms._SAID.discard((str(tmp_path / "dsb"), "several"))
    with caplog.at_level("WARNING", logger="medseg.transforms"):
        loaded = _loaded(sample)
    assert loaded["label"].max() == 2  # one.png's nucleus, and the rest of x.png as one object
    assert any("x.png: holds more than one non-zero value, read as one object" in r.getMessage()
               and "keep it alone in its masks/ folder and give --set 'image_glob=*/images/*' --set "
               "'mask_template=../masks/*'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("coding", ["ilastik", "semantic"])
def test_a_class_mask_given_as_labels_is_refused(tmp_path, coding):
    # ilastik's simple segmentation (1 = background, 2 = nuclei) or interior/boundary classes: read as instances,
    # the background became one nucleus and all interiors another
    from medseg.transforms import instance_label_image

    _, labels = synthetic_nuclei(np.random.default_rng(7), (64, 64), n_single=4, n_pairs=1)
    if coding == "ilastik":
        classes = np.where(labels > 0, 2, 1)
    else:
        classes = instance_targets(labels, 2).astype(np.uint8)
    Image.fromarray(classes.astype(np.uint8)).save(tmp_path / "classes.png")
    with pytest.raises(DataError, match=r"classes\.png: its 2 values \(1, 2\) make \d+ separate regions, so it is a "
                                        r"class mask .* give each object its own value"):
        instance_label_image(tmp_path / "classes.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "labels.png")  # real instances: read
    assert instance_label_image(tmp_path / "labels.png").max() == labels.max()


@pytest.mark.parametrize("coding", ["one-based", "two-classes-few-nuclei"])
def test_labels_whose_background_is_not_0_are_refused(tmp_path, coding):
    # 1-based labels (background 1, nuclei 2..N) or a class mask with few nuclei: the background was read as
    # one nucleus covering the image (evaluate then reported a Dice of 1.0 against such masks)
    from medseg.transforms import instance_label_image

    _, labels = synthetic_nuclei(np.random.default_rng(7), (64, 64), n_single=2, n_pairs=0)
    coded = labels + 1 if coding == "one-based" else np.where(labels > 0, 2, 1)
    Image.fromarray(coded.astype(np.uint16)).save(tmp_path / "coded.png")
    with pytest.raises(DataError, match=r"coded\.png: has no 0 \(background\) pixel, and its value 1 fills 9\d% of "
                                        r"it along every edge, so it is the background; .* with 1 as 0"):
        instance_label_image(tmp_path / "coded.png")
    crowded = np.arange(1, 17, dtype=np.uint16).repeat(4).reshape(8, 8).repeat(8, 0)  # nuclei edge to edge
    Image.fromarray(crowded).save(tmp_path / "crowded.png")
    assert instance_label_image(tmp_path / "crowded.png").max() == 16  # no background, none taken for it
    large = np.full((96, 96), 7, np.uint16)  # a crop inside one large nucleus, two small ones in its corners
    large[:10, :10], large[-10:, -10:] = 3, 12
    Image.fromarray(large).save(tmp_path / "large.png")
    assert instance_label_image(tmp_path / "large.png").max() == 3


def test_instance_labels_with_brush_specks_are_not_taken_for_a_class_mask(tmp_path):
    from medseg.transforms import instance_label_image

    labels = np.zeros((40, 40), np.uint16)
    for k, (y, x) in enumerate([(5, 5), (5, 25), (25, 15)], start=1):
        labels[y:y + 8, x:x + 8] = k
        labels[y + 10, x], labels[min(y + 12, 39), x + 6] = k, k  # two one-pixel specks of each label
    Image.fromarray(labels).save(tmp_path / "specks.png")
    assert instance_label_image(tmp_path / "specks.png").max() == 3


def test_gray_labels_saved_as_rgb_are_read(tmp_path):
    from medseg.transforms import instance_label_image

    _, labels = synthetic_nuclei(np.random.default_rng(8), (48, 48))
    Image.fromarray(np.repeat(labels.astype(np.uint8)[..., None], 3, axis=-1), "RGB").save(tmp_path / "rgb.png")
    assert _same_partition(instance_label_image(tmp_path / "rgb.png"), labels)


def test_real_dsb_samples_read_the_same_as_instance_label_images(shared_dsb, tmp_path):
    from medseg.transforms import instance_label_image

    for sample in find_dsb_samples(shared_dsb)[:3]:
        merged = _loaded(sample)["label"][0].astype(np.uint16)
        Image.fromarray(merged).save(tmp_path / "labels.png")
        again = instance_label_image(tmp_path / "labels.png", shape=merged.shape)
        assert again.max() == merged.max() > 0 and _same_partition(again, merged)


def test_cli_trains_and_evaluates_on_instance_label_images_including_infers_own_masks(tmp_path):
    """Images + instance label images train and evaluate as the Kaggle layout does; the masks ``medseg infer``
    writes serve as such labels, and ``evaluate`` scores them as a perfect match to the same model's output."""
    written = _write_label_folders(tmp_path / "data", n=5)
    out = tmp_path / "run"
    result = _invoke("train", NUCLEI, "--data", tmp_path / "data", "--output", out, "--epochs", 2, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_sets(TINY))
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "split.json").read_text())["val"]) == 1
    result = _invoke("evaluate", NUCLEI, "--data", tmp_path / "data", "--checkpoint", out / "model.pt", "--output",
                     tmp_path / "eval", "--split", "all", "--no-progress", "--device", "cpu", *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert [int(rows[f"images/s{k:02d}"]["gt_count"]) for k in range(5)] == [int(w.max()) for w in written]
    # the model's own masks as labels: every nucleus matched, so the DSB score is 1 wherever it found any
    result = _invoke("infer", NUCLEI, tmp_path / "data" / "images", tmp_path / "pred", "--checkpoint",
                     out / "model.pt", "--no-progress", "--device", "cpu", *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0, result.output
    result = _invoke("evaluate", NUCLEI, "--data", tmp_path / "data", "--checkpoint", out / "model.pt", "--output",
                     tmp_path / "self", "--split", "all", "--no-progress", "--device", "cpu",
                     "--set", "mask_template=../../pred/mask/{stem}.png", *_sets(NUCLEI_TINY_NET))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "self" / "metrics.csv", newline="") as fh:
        scored = list(csv.DictReader(fh))
    assert len(scored) == 5 and all(float(r["dsb_score"]) == 1.0 for r in scored), scored
    assert sum(int(r["gt_count"]) for r in scored) > 0


def test_cli_two_channel_images_train_and_segment_on_the_channel_given(tmp_path):
    # Cellpose-style data: a cytoplasm stain and a nuclear stain; the model takes the nuclear one
    rng = np.random.default_rng(9)
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    for k in range(4):
        image, labels = synthetic_nuclei(rng, (64, 64))
        cyto = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        tifffile.imwrite(tmp_path / "data" / "images" / f"c{k}.tif", np.stack([cyto, image]),
                         photometric="minisblack", planarconfig="separate")
        Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "data" / "masks" / f"c{k}.png")
    args = ("--no-progress", "--device", "cpu")
    result = _invoke("train", NUCLEI, "--data", tmp_path / "data", "--output", tmp_path / "plain", "--epochs", 1,
                     "--no-tracking", *args, *_sets(TINY))
    assert result.exit_code == 1 and "2 channels" in result.output and "--set input_channels=[N]" in result.output
    picked = [*_sets(NUCLEI_TINY_NET), "--set", "input_channels=[1]"]
    result = _invoke("train", NUCLEI, "--data", tmp_path / "data", "--output", tmp_path / "run", "--epochs", 1,
                     "--no-tracking", *args, *_sets(TINY), "--set", "input_channels=[1]")
    assert result.exit_code == 0, result.output
    result = _invoke("evaluate", NUCLEI, "--data", tmp_path / "data", "--checkpoint", tmp_path / "run" / "model.pt",
                     "--output", tmp_path / "eval", "--split", "all", *args, *picked)
    assert result.exit_code == 0, result.output
    result = _invoke("infer", NUCLEI, tmp_path / "data" / "images", tmp_path / "out", "--checkpoint",
                     tmp_path / "run" / "model.pt", *args, *picked)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out" / "mask").iterdir()) == ["c0.tif", "c1.tif", "c2.tif", "c3.tif"]


def test_hematoxylin_separates_nuclei_from_eosin_that_luma_confuses():
    from medseg.transforms import hematoxylin, is_colour

    # pink (eosin) background, purple (hematoxylin) nuclei, and a dark red eosin patch as dark as a nucleus
    img = np.empty((3, 40, 40), np.float32)
    img[:] = np.array([235, 200, 220], np.float32)[:, None, None]
    img[:, 5:15, 5:15] = np.array([90, 60, 150], np.float32)[:, None, None]  # nucleus
    img[:, 25:35, 25:35] = np.array([170, 40, 70], np.float32)[:, None, None]  # eosin patch
    nucleus, patch = np.s_[5:15, 5:15], np.s_[25:35, 25:35]
    assert is_colour(img) and not is_colour(np.repeat(img[:1], 3, axis=0))
    luma = BrightObjectsd(keys="image")({"image": img})["image"][0]
    he = BrightObjectsd(keys="image", stain="hematoxylin")({"image": img})["image"][0]
    assert abs(luma[nucleus].mean() - luma[patch].mean()) < 0.25  # luma: both look like nuclei
    assert he[nucleus].mean() > he[patch].mean() + 0.5  # hematoxylin: only the nucleus is bright
    assert he.min() >= 0.0 and he.max() <= 1.0 and hematoxylin(img).shape == (1, 40, 40)
    # gray brightfield images keep the luma path (inverted), whatever the stain option
    gray = np.repeat(img[:1], 3, axis=0)
    np.testing.assert_array_equal(BrightObjectsd(keys="image", stain="hematoxylin")({"image": gray})["image"],
                                  BrightObjectsd(keys="image")({"image": gray})["image"])
    with pytest.raises(ValueError, match="stain"):
        BrightObjectsd(keys="image", stain="eosin")



def test_one_kaggle_sample_given_as_the_data_names_the_folder_of_samples(dsb_folder, tmp_path):
    # "no mask matches .../images/../masks/a1.*; add the mask or set mask_template" pointed the wrong way
    sample = dsb_folder / "stage1_train" / "a1"
    result = CliRunner().invoke(app, ["train", str(NUCLEI), "--data", str(sample), "--output", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {sample}: one sample of the Kaggle DSB layout (images/a1.png + "
                                     f"masks/*); pass --data {dsb_folder / 'stage1_train'}, the folder that holds "
                                     "the samples")
    # its image given as the data: the folder of samples too, not the sample (one folder of images/ + masks/)
    image = sample / "images" / "a1.png"
    result = CliRunner().invoke(app, ["train", str(NUCLEI), "--data", str(image), "--output", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {image}: a file, not a folder; pass --data {dsb_folder / 'stage1_train'}"
                                     ", the folder of DSB samples that holds its sample")
