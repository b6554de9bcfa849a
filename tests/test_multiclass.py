"""The jurkat bundle (3 classes: background / cell body / nucleus): data discovery and split, class-map
transforms, class-mask writing and the CLI end to end on synthetic cells."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from conftest import (
    DATA_FOUND,
    JURKAT_TINY_NET,
    REPO,
    synthetic_cells,
    write_dicom_slice,
    write_dsb_folder,
    write_jurkat_folder,
)
from PIL import Image
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data import find_image_mask_pairs, folder_split, split_by_group
from medseg.errors import ConfigValueError, DataError
from medseg.metrics import multiclass_scores
from medseg.transforms import ClassMapd, LoadSliced, class_mask_values
from medseg.writers import SaveSegmentationd

JURKAT = REPO / "bundles" / "jurkat"
CLASS_MAP = {"0": 0, "128": 1, "255": 2}
#: Folder layout of the bundle's default data: masks beside the BMP images.
LAYOUT = {"image_glob": "**/*.bmp", "mask_template": "{stem}.png"}
TINY = [*JURKAT_TINY_NET, "batch_size=2", "val_interval=1"]

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not _is_log_noise(line)]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _is_log_noise(line: str) -> bool:
    # MONAI's StatsHandler loggers keep the streams of earlier CliRunner calls; ignore their log lines, and the
    # line in which a training says what data it found
    return " - INFO - " in line or line.startswith(("--- Logging error", "Message:", "Arguments:")) or \
        bool(DATA_FOUND.search(line))


# --- data: discovery and split --------------------------------------------------------------------------------


def test_pairs_found_with_names_groups_and_masks(jurkat_folder):
    pairs = find_image_mask_pairs(jurkat_folder, **LAYOUT)
    assert [p["name"] for p in pairs] == [f"set_a/{k:03d}" for k in range(1, 7)] + ["set_b/001", "set_b/002"]
    assert [p["group"] for p in pairs] == ["set_a"] * 6 + ["set_b"] * 2
    for p in pairs:
        assert p["image"].endswith(".bmp") and p["label"] == p["image"][:-4] + ".png" and p["page"] == 0


def test_pairs_in_linked_folders_are_found_and_broken_links_named(jurkat_folder, tmp_path):
    # pathlib's ** skips linked folders: a linked set_b was dropped from training without a word
    elsewhere = tmp_path / "elsewhere"
    shutil.move(jurkat_folder / "set_b", elsewhere)
    (jurkat_folder / "set_b").symlink_to(elsewhere, target_is_directory=True)
    (jurkat_folder / "set_a" / "loop").symlink_to(jurkat_folder, target_is_directory=True)  # no endless search
    pairs = find_image_mask_pairs(jurkat_folder, **LAYOUT)
    assert [p["name"] for p in pairs] == [f"set_a/{k:03d}" for k in range(1, 7)] + ["set_b/001", "set_b/002"]
    (jurkat_folder / "set_a" / "gone.bmp").symlink_to(tmp_path / "missing.bmp")
    with pytest.raises(DataError, match=r"set_a/gone\.bmp: a link whose target does not exist"):
        find_image_mask_pairs(jurkat_folder, **LAYOUT)
    (jurkat_folder / "set_a" / "notes.txt").symlink_to(tmp_path / "missing.txt")  # not an image: no matter
    # a pattern without ** (the nuclei default, images/*) dropped the broken link without a word
    with pytest.raises(DataError, match=r"set_a/gone\.bmp: a link whose target does not exist"):
        find_image_mask_pairs(jurkat_folder, image_glob="set_a/*", mask_template="{stem}.png")
    (jurkat_folder / "set_a" / "gone.bmp").unlink()
    assert len(find_image_mask_pairs(jurkat_folder, **LAYOUT)) == 8
    assert len(find_image_mask_pairs(jurkat_folder, image_glob="set_a/*.bmp", mask_template="{stem}.png")) == 6
    # hidden folders (a notebook's checkpoints) are not entered unless the pattern names them
    shutil.copytree(jurkat_folder / "set_a", jurkat_folder / ".ipynb_checkpoints", symlinks=True)
    (jurkat_folder / ".ipynb_checkpoints" / "loop").unlink()
    (jurkat_folder / ".ipynb_checkpoints" / "notes.txt").unlink()
    assert len(find_image_mask_pairs(jurkat_folder, **LAYOUT)) == 8
    named = find_image_mask_pairs(jurkat_folder, image_glob=".ipynb_checkpoints/**/*.bmp", mask_template="{stem}.png")
    assert [p["name"] for p in named] == [f".ipynb_checkpoints/{k:03d}" for k in range(1, 7)]


def test_pairs_in_images_and_masks_folders(tmp_path):
    """The library default: ``root/images/NAME`` + ``root/masks/STEM.*`` (any supported suffix)."""
    rng = np.random.default_rng(1)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for k in (2, 10, 1):
        image, mask = synthetic_cells(rng, (40, 40))
        Image.fromarray(image).save(tmp_path / "images" / f"c{k}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"c{k}.tif")
    pairs = find_image_mask_pairs(tmp_path)
    assert [p["name"] for p in pairs] == ["images/c1", "images/c2", "images/c10"]  # natural order
    assert all(p["label"].endswith(f"masks/{Path(p['image']).stem}.tif") for p in pairs)


def test_split_is_stratified_reproducible_and_recorded(jurkat_folder, tmp_path):
    split = folder_split(jurkat_folder, val_fraction=0.2, seed=0, save_to=str(tmp_path / "run"), **LAYOUT)
    val_groups = sorted(p["group"] for p in split["val"])
    assert val_groups == ["set_a", "set_b"]  # round(0.2 * 6) = 1 from set_a, at least 1 from set_b
    assert len(split["train"]) == 6 and len(split["all"]) == 8
    assert {p["name"] for p in split["train"]}.isdisjoint(p["name"] for p in split["val"])
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["val"] == [p["name"] for p in split["val"]]
    assert record["train"] == [p["name"] for p in split["train"]]
    assert record["data_dir"] == str(jurkat_folder.resolve())
    again = folder_split(jurkat_folder, val_fraction=0.2, seed=0, **LAYOUT)
    assert [p["name"] for p in again["val"]] == record["val"]
    # another seed draws other validation images (for at least one of a few seeds)
    others = {tuple(p["name"] for p in folder_split(jurkat_folder, val_fraction=0.2, seed=s, **LAYOUT)["val"])
              for s in range(1, 6)}
    assert others - {tuple(record["val"])}


def test_split_fraction_bounds():
    samples = [{"name": str(k), "group": "g"} for k in range(10)]
    assert len(split_by_group(samples, 0.0)["val"]) == 0
    assert len(split_by_group(samples, 0.5)["val"]) == 5
    with pytest.raises(DataError, match="val_fraction 1.0 must be in"):
        split_by_group(samples, 1.0)


def test_split_pools_single_sample_groups():
    """Groups of one sample (e.g. DSB images of unique sizes) are pooled, so the split still validates."""
    samples = [{"name": str(k), "group": f"size{k}"} for k in range(10)] + [{"name": "x", "group": "big"},
                                                                         {"name": "y", "group": "big"}]
    split = split_by_group(samples, 0.2, seed=0)
    assert len(split["val"]) == 2  # a group of 2 cannot give 20 % either: pooled too, round(0.2 * 12)
    assert split_by_group(samples, 0.2, seed=0) == split
    assert split_by_group([{"name": "only", "group": "g"}], 0.2)["val"] == []
    # folders of two gave one each, half the data; pooled they give 20 %
    pairs = [{"name": f"{g}{k}", "group": g} for g in "abcde" for k in range(2)]
    assert len(split_by_group(pairs, 0.2, seed=0)["val"]) == 2
    assert len(split_by_group(pairs, 0.5, seed=0)["val"]) == 5  # where each gives one, each still does
    big = samples[:10] + [{"name": f"b{k}", "group": "big"} for k in range(5)]
    val = [s["name"] for s in split_by_group(big, 0.2, seed=0)["val"]]
    assert len(val) == 3 and len([n for n in val if n.startswith("b")]) == 1  # round(0.2 * 10) singles + 1 of big


def test_data_errors_name_the_file(jurkat_folder, tmp_path):
    (jurkat_folder / "set_a" / "003.png").unlink()
    with pytest.raises(DataError, match=r"set_a/003\.bmp: no mask matches .*003\.png") as err:
        find_image_mask_pairs(jurkat_folder, **LAYOUT)
    assert "\n" not in str(err.value)
    (jurkat_folder / "set_a" / "003.jpg").write_bytes(b"jpeg")  # a JPEG mask is named as such
    with pytest.raises(DataError, match=r"set_a/003\.jpg: a \.jpg mask; JPEG compression"):
        find_image_mask_pairs(jurkat_folder, **{**LAYOUT, "mask_template": "{stem}.*"})

    # a placeholder that does not exist: named, with those that do (it was a generic "a config value does not
    # work (KeyError: 'folder')")
    for template, error in (("../{folder}/{stem}.png", "KeyError 'folder'"), ("{0}.png", "IndexError"),
                            ("{stem.png", "ValueError")):
        with pytest.raises(ConfigValueError, match=rf"mask_template '{re.escape(template)}': {error}.* placeholders "
                                                   r"are \{stem\}, \{name\}, \{match\} .* and \{parent\}"):
            find_image_mask_pairs(jurkat_folder, **{**LAYOUT, "mask_template": template})
    other = write_jurkat_folder(tmp_path / "two", layout=[("x", (40, 40))])
    shutil.copy(other / "x" / "001.png", other / "x" / "001.tif")
    with pytest.raises(DataError, match=r"x/001\.bmp: 2 masks match .*make mask_template specific"):
        find_image_mask_pairs(other, image_glob="**/*.bmp", mask_template="{stem}.*")

    with pytest.raises(DataError, match=r"no images match '\*\*/\*\.jpg'.*set image_glob"):
        find_image_mask_pairs(other, image_glob="**/*.jpg", mask_template="{stem}.png")
    # DSB samples given to a bundle of images + masks: the layout named, and the bundle that reads it
    dsb = write_dsb_folder(tmp_path / "dsb")
    with pytest.raises(DataError, match=r"no images match '\*\*/\*\.bmp' \(of the types read: .*\); this is the "
                                        r"Data Science Bowl layout .*, which bundles/nuclei reads$"):
        find_image_mask_pairs(dsb, image_glob="**/*.bmp", mask_template="{stem}.png")
    # images/ + masks/ in each group's folder (one mask per image) is no DSB sample: the glob is what to set
    (tmp_path / "grp" / "plate1" / "images").mkdir(parents=True)
    (tmp_path / "grp" / "plate1" / "masks").mkdir()
    shutil.copy(other / "x" / "001.bmp", tmp_path / "grp" / "plate1" / "images" / "a.png")
    with pytest.raises(DataError, match=r"no images match .*; set image_glob in the bundle config"):
        find_image_mask_pairs(tmp_path / "grp", image_glob="**/*.bmp", mask_template="{stem}.png")
    with pytest.raises(DataError, match="missing: data folder not found"):
        find_image_mask_pairs(tmp_path / "missing")


# --- transforms ----------------------------------------------------------------------------------------------


def test_class_map_maps_values_to_indices(jurkat_folder):
    pair = find_image_mask_pairs(jurkat_folder, **LAYOUT)[0]
    d = LoadSliced(keys=["image", "label"], channels=[3, 1])(pair)
    raw = d["label"].copy()
    d = ClassMapd(keys="label", class_map=CLASS_MAP)(d)
    assert d["image"].shape == (3, 72, 80) and d["label"].shape == (1, 72, 80) and d["label"].dtype == np.float32
    assert set(np.unique(d["label"]).tolist()) == {0.0, 1.0, 2.0}
    for value, index in ((0, 0), (128, 1), (255, 2)):
        np.testing.assert_array_equal(d["label"] == index, raw == value)


def test_class_map_unknown_values_name_values_and_file(jurkat_folder):
    path = jurkat_folder / "set_a" / "002.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[:3, :3], mask[-1, -1] = 77, 200
    Image.fromarray(mask).save(path)
    pair = find_image_mask_pairs(jurkat_folder, **LAYOUT)[1]
    d = LoadSliced(keys=["image", "label"], channels=[3, 1])(pair)
    with pytest.raises(DataError) as err:
        ClassMapd(keys="label", class_map=CLASS_MAP)(d)
    message = str(err.value)
    assert message.startswith(str(path)) and "label values 77, 200 are not in the class map (0, 128, 255)" in message
    with pytest.raises(ValueError, match="class_map is empty"):
        ClassMapd(keys="label", class_map={})


def test_a_gray_palette_mask_says_it_is_read_by_its_colours_not_its_indices(jurkat_folder):
    # indices 0/1/2 under a gray palette 0/128/255, with a class map written for the indices: "values 128,
    # 255 are not in the class map" named values the user does not see in np.array(Image.open(...))
    pair = find_image_mask_pairs(jurkat_folder, **LAYOUT)[0]
    values = np.asarray(Image.open(pair["label"]))
    mask = Image.fromarray(np.select([values == 128, values == 255], [1, 2], 0).astype(np.uint8), "P")
    mask.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255] + [0] * 759)
    mask.save(pair["label"])
    d = LoadSliced(keys=["image", "label"], channels=[3, 1])(pair)
    with pytest.raises(DataError, match=r"values 128, 255 are not in the class map \(0, 1, 2\); a palette PNG is "
                                        r"read by its colours' gray values, not by its indices \(0, 1, 2\)"):
        ClassMapd(keys="label", class_map={"0": 0, "1": 1, "2": 2})(d)
    assert ClassMapd(keys="label", class_map=CLASS_MAP)(d)["label"].max() == 2  # by its gray values it is read


@pytest.mark.parametrize("kind", ["palette", "rgb"])
def test_a_colour_mask_is_named_as_such(jurkat_folder, kind):
    """A mask saved with class colours (labelme / VOC palette, or RGB) is read by luma; the error says so."""
    pair = find_image_mask_pairs(jurkat_folder, **LAYOUT)[0]
    values = np.asarray(Image.open(pair["label"]))
    indices = np.select([values == 128, values == 255], [1, 2], 0).astype(np.uint8)
    if kind == "palette":
        mask = Image.fromarray(indices, "P")
        mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
    else:
        mask = Image.fromarray(np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]], np.uint8)[indices])
    mask.save(pair["label"])
    d = LoadSliced(keys=["image", "label"], channels=[3, 1])(pair)
    with pytest.raises(DataError) as err:
        ClassMapd(keys="label", class_map=CLASS_MAP)(d)
    message = str(err.value)
    assert message.startswith(str(pair["label"])) and "a colour mask (its colours read as their luma" in message
    assert "save it with those values as 8-bit gray" in message


def test_class_map_rejects_colour_labels_but_takes_gray_saved_as_rgb(tmp_path):
    path = tmp_path / "rgb.png"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = 128
    Image.fromarray(rgb).save(path)
    d = LoadSliced(keys="label", channels=3)({"label": str(path)})
    assert set(np.unique(ClassMapd(keys="label", class_map=CLASS_MAP)(d)["label"]).tolist()) == {0.0, 1.0}
    rgb[0, 0] = (200, 0, 0)
    Image.fromarray(rgb).save(path)
    d = LoadSliced(keys="label", channels=3)({"label": str(path)})
    with pytest.raises(DataError, match=r"rgb\.png: a colour mask \(3 channels\); class_map gives gray values.*"
                                        r"#RRGGBB"):
        ClassMapd(keys="label", class_map=CLASS_MAP)(d)


COLOURS = {"#000000": 0, "#800000": 1, "#008000": 2}


@pytest.mark.parametrize("kind", ["palette", "rgb"])
def test_class_map_of_colours_takes_colour_coded_masks(jurkat_folder, kind):
    """Masks saved with class colours (labelme / VOC palette PNG, or RGB) map by their colours, in the
    bundle's own load chain; a colour the map lacks is named as #RRGGBB."""
    from monai.transforms import Compose

    from medseg.bundle import load_config

    parser = load_config(JURKAT, "train", settings={"dataset_dir": str(jurkat_folder),
                                                    "output_dir": str(jurkat_folder.parent / "run"),
                                                    "class_map": COLOURS})
    sample = parser.get_parsed_content("datalists")["train"][0]
    values = np.asarray(Image.open(sample["label"]))
    indices = np.select([values == 128, values == 255], [1, 2], 0).astype(np.uint8)
    table = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [255, 0, 255]], np.uint8)
    if kind == "palette":
        mask = Image.fromarray(indices, "P")
        mask.putpalette(table.ravel().tolist())
    else:
        mask = Image.fromarray(table[indices])
    mask.save(sample["label"])
    chain = Compose(parser.get_parsed_content("load"))
    np.testing.assert_array_equal(np.asarray(chain(dict(sample))["label"])[0], indices)
    indices[0, 0] = 3  # magenta: not in the map
    mask = Image.fromarray(indices, "P") if kind == "palette" else Image.fromarray(table[indices])
    if kind == "palette":
        mask.putpalette(table.ravel().tolist())
    mask.save(sample["label"])
    with pytest.raises(Exception) as err:  # noqa: PT011 - MONAI wraps it; the user error is found in the chain
        chain(dict(sample))
    from medseg.errors import find_user_error

    assert "label colours #ff00ff are not in the class map (#000000, #800000, #008000)" in str(
        find_user_error(err.value))
    with pytest.raises(ValueError, match="all keys one kind"):
        ClassMapd(keys="label", class_map={"#000000": 0, "255": 1})


def test_gray_mask_saved_as_rgb_keeps_its_exact_values(tmp_path):
    # every gray level survives (luma in float32 would make 10 into 9.9999 and fail the class map)
    path = tmp_path / "mask.png"
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.stack([levels] * 3, axis=-1)).save(path)
    d = LoadSliced(keys="label", channels=1)({"label": str(path)})
    np.testing.assert_array_equal(d["label"][0], levels.astype(np.float32))
    d = ClassMapd(keys="label", class_map={0: 0, 10: 1, 123: 2})(
        {"label": np.where(np.isin(levels, [0, 10, 123]), levels, 0).astype(np.float32)[None],
         "label_file": str(path)})
    assert set(np.unique(d["label"]).tolist()) == {0.0, 1.0, 2.0}


def test_image_and_mask_of_different_sizes_name_the_file(jurkat_folder):
    path = jurkat_folder / "set_b" / "001.png"
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(path)
    pair = next(p for p in find_image_mask_pairs(jurkat_folder, **LAYOUT) if p["name"] == "set_b/001")
    with pytest.raises(DataError, match=r"set_b/001\.png: size \(50, 60\) differs from .*set_b/001\.bmp"):
        LoadSliced(keys=["image", "label"], channels=[3, 1])(pair)


def test_load_channels_per_key(tmp_path):
    gray = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgb = np.stack([gray, gray // 2, 255 - gray], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    d = LoadSliced(keys=["image", "label"], channels=[3, 1])({"image": str(tmp_path / "gray.png"),
                                                             "label": str(tmp_path / "rgb.bmp")})
    assert d["image"].shape == (3, 12, 10) and d["image"].dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(d["image"][c], gray)  # gray repeated
    assert d["label"].shape == (1, 12, 10)  # RGB -> luma
    np.testing.assert_allclose(d["label"][0], rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)
    d = LoadSliced(keys="image", channels=3)({"image": str(tmp_path / "rgb.bmp")})
    np.testing.assert_array_equal(d["image"], np.moveaxis(rgb, -1, 0))  # RGB kept as is
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        LoadSliced(keys=["image", "label"], channels=[3])
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        LoadSliced(keys="image", channels=2)


def test_bundle_load_chain_gives_scaled_rgb_and_class_indices(jurkat_folder):
    from monai.transforms import Compose

    from medseg.bundle import load_config

    parser = load_config(JURKAT, "train", settings={"dataset_dir": str(jurkat_folder),
                                                    "output_dir": str(jurkat_folder.parent / "run")})
    chain = Compose(parser.get_parsed_content("load"))
    d = chain(parser.get_parsed_content("datalists")["train"][0])
    image, label = np.asarray(d["image"]), np.asarray(d["label"])
    assert image.shape[0] == 3 and label.shape == (1, *image.shape[1:])
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(label).tolist()) == {0.0, 1.0, 2.0}


def test_training_chain_pads_images_smaller_than_half_the_patch(jurkat_folder):
    """Cell crops of a third of the patch or less (48 px for 144) pad by mirroring, which torch's reflect pad cannot."""
    from monai.transforms import Compose

    from medseg.bundle import load_config

    parser = load_config(JURKAT, "train", settings={"dataset_dir": str(jurkat_folder),
                                                    "output_dir": str(jurkat_folder.parent / "run")})
    chain = Compose(parser.get_parsed_content("train#preprocessing").transforms)
    sample = parser.get_parsed_content("datalists")["train"][0]
    Image.fromarray(np.asarray(Image.open(sample["image"]))[:40, :40]).save(jurkat_folder / "small.bmp")
    Image.fromarray(np.asarray(Image.open(sample["label"]))[:40, :40]).save(jurkat_folder / "small.png")
    d = chain({"image": str(jurkat_folder / "small.bmp"), "label": str(jurkat_folder / "small.png")})
    patch = tuple(parser.get_parsed_content("patch_size"))
    assert tuple(np.asarray(d["image"]).shape) == (3, *patch) and tuple(np.asarray(d["label"]).shape) == (1, *patch)
    assert set(np.unique(np.asarray(d["label"])).tolist()) <= {0.0, 1.0, 2.0}


# --- writers: class masks ------------------------------------------------------------------------------------


def _one_hot(index: np.ndarray, n: int = 3) -> np.ndarray:
    return np.stack([index == k for k in range(n)]).astype(np.float32)


def _class_index(h: int = 20, w: int = 24) -> np.ndarray:
    index = np.zeros((h, w), np.int64)
    index[4:16, 4:20] = 1
    index[8:12, 8:14] = 2
    return index


def test_class_masks_png_holds_class_values(tmp_path):
    source = tmp_path / "in" / "cell.bmp"
    source.parent.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(source)
    index = _class_index()
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="classes",
                               class_values=[0, 128, 255], save_prob=True)
    d = writer({"pred": _one_hot(index), "name": "cell", "image_file": str(source)})
    mask = np.asarray(Image.open(tmp_path / "out" / "mask" / "cell.png"))
    assert d["pred_mask_file"] == str(tmp_path / "out" / "mask" / "cell.png")
    assert mask.dtype == np.uint8 and mask.shape == (20, 24)
    np.testing.assert_array_equal(mask, np.array([0, 128, 255])[index])
    prob = tifffile.imread(tmp_path / "out" / "prob" / "cell.tif")  # foreground = 1 - background
    np.testing.assert_allclose(prob, (index > 0).astype(np.float32))
    # without class_values the PNG holds the class index
    plain = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "idx"), mask_mode="classes", save_prob=False)
    plain({"pred": _one_hot(index), "name": "cell", "image_file": str(source)})
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "idx" / "mask" / "cell.png")), index)
    assert not (tmp_path / "idx" / "prob").exists()


def test_class_mask_dtype_follows_the_class_values_not_the_slice(tmp_path):
    # values above 255: every slice is 16-bit, also one whose classes all fit 8 bits, so TIFF pages agree
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="classes", class_values=[0, 300, 600])
    only_background = _one_hot(np.zeros((20, 24), np.int64))
    assert writer.mask_of(only_background, "tiff")[0].dtype == np.uint16
    assert writer.mask_of(_one_hot(_class_index()), "tiff")[0].dtype == np.uint16
    small = SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="classes", class_values=[0, 128, 255])
    assert small.mask_of(only_background, "png")[0].dtype == np.uint8


def test_class_masks_nifti_holds_indices(tmp_path):
    source = tmp_path / "cell.png"
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(source)
    index = _class_index()
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="classes",
                               class_values=[0, 128, 255], output_format="nifti", save_prob=False)
    writer({"pred": _one_hot(index), "name": "cell", "image_file": str(source)})
    seg = nib.load(tmp_path / "out" / "mask" / "cell.nii.gz")
    data = np.asarray(seg.dataobj)
    assert seg.get_data_dtype() == np.uint8
    assert sorted(np.unique(data).tolist()) == [0, 1, 2]  # indices, not 0/128/255
    assert np.bincount(data.ravel(), minlength=3).tolist() == np.bincount(index.ravel(), minlength=3).tolist()


def test_class_masks_of_dicom_go_to_nifti_and_bad_options(tmp_path):
    dcm = write_dicom_slice(tmp_path / "ct" / "IM0.dcm", np.zeros((8, 8), np.int16),
                            series_uid="1.2.826.0.1.3680043.8.498.77", position=(0.0, 0.0, 0.0))
    with pytest.raises(DataError, match="DICOM SEG output holds binary masks; this bundle writes classes"):
        SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="classes",
                          output_format="dicom-seg")  # refused before any input
    # by default (auto) the class masks of DICOM inputs go to NIfTI
    auto = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="classes")
    assert auto.paths_for("ct", "dicom", 1)["mask"].name == "ct.nii.gz"
    assert dcm.is_file()
    binary = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "b"))
    assert binary.paths_for("ct", "dicom", 1)["mask"].name == "ct.seg.dcm"  # binary bundles keep DICOM SEG
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="labels")
    with pytest.raises(ConfigValueError, match=r"class_values=\[0, 70000\]: give one whole number 0..65535"):
        SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="classes", class_values=[0, 70000])


def test_class_mask_values_invert_the_class_map(caplog):
    assert class_mask_values(CLASS_MAP) == [0, 128, 255]
    assert class_mask_values({"0": 0, "255": 1}, 2) == [0, 255]
    assert class_mask_values({"0": 0, "1": 0, "255": 1, "200": 1}) == [0, 255]  # the first value listed
    assert class_mask_values({"0": 0, "127.5": 1, "128": 1, "255": 2}) == [0, 128, 255]  # the first a mask holds
    assert class_mask_values({"#000000": 0, "#ff0000": 1}) is None  # colours: masks hold class indices
    # maps masks cannot show: class indices, said (NIfTI and Segmenter need no values; PNG gets indices)
    with caplog.at_level("WARNING"):
        assert class_mask_values({"0": 0, "255": 1}, 3) is None
        assert class_mask_values({"0": 0, "0.5": 1}) is None
    assert "maps no pixel value to class 2" in caplog.text and "value 0.5 cannot be a mask value" in caplog.text
    for bad, expected in (({"0": 0, "1": 1, "1.0": 2}, "lists one mask value twice ('1' and '1.0')"),
                          ({"#000000": 0, "#000000 ": 1}, "lists one mask value twice"),
                          ({"0": 0, "255": 3}, "maps to class 3, outside 0..1"),
                          ([0, 255], "give pixel value -> class index pairs"),
                          ({"0": 0, "#ff0000": 1}, "all keys one kind"),
                          ({"0": 0, "255": 1.5}, "class indices are whole numbers")):
        for call in (lambda m: class_mask_values(m, 2), lambda m: ClassMapd("label", m, 2)):
            with pytest.raises(ConfigValueError, match=re.escape(expected)):
                call(bad)


def test_class_masks_follow_the_class_map_and_class_values_are_checked_first(tmp_path):
    source = tmp_path / "cell.bmp"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(source)
    index = np.minimum(_class_index(), 1)
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), mask_mode="classes", save_prob=False,
                               class_map={"0": 0, "255": 1}, num_classes=2)
    writer({"pred": _one_hot(index)[:2], "name": "cell", "image_file": str(source)})
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "mask" / "cell.png")), index * 255)
    given = SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="classes", class_values=[0, 9],
                              class_map={"0": 0, "255": 1}, num_classes=2)
    assert given.class_values.tolist() == [0, 9]  # class_values given win over the map
    for values, expected in (([255], "1 mask value(s) for 3 classes; give one per class, e.g. --set "
                                      "'class_values=[0,1,2]'"), ([0, 1, 2, 3], "4 mask value(s) for 3"),
                             (["a", "b", "c"], "give one whole number"),
                             ([0, 1.5, 2], "give one whole number"), ([[0, 1, 2]], "give one whole number")):
        with pytest.raises(ConfigValueError, match=re.escape(expected)):
            SaveSegmentationd(keys="pred", output_dir=str(tmp_path), mask_mode="classes", class_values=values,
                              num_classes=3)


# --- evaluation report ----------------------------------------------------------------------------------------


def test_class_metrics_report_per_image_groups_and_summary(tmp_path):
    from ignite.engine import Engine

    from medseg.evaluation import ClassMetrics

    index = _class_index()
    wrong = index.copy()
    wrong[wrong == 2] = 1  # nucleus predicted as cell body
    items = [("a/1", "a", index, index), ("a/2", "a", wrong, index), ("b/1", "b", index, index)]
    report = ClassMetrics(str(tmp_path / "eval"), num_classes=3, class_names=["background", "cell_body", "nucleus"],
                          regions={"cell": [1, 2]})
    engine = Engine(lambda e, batch: [{"pred": _one_hot(b["pred"]), "label": b["label"][None].astype(np.float32)}
                                      for b in batch])
    report.attach(engine)
    engine.run([[{"name": n, "group": g, "pred": p, "label": t}] for n, g, p, t in items])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["dice_cell"] == 1.0  # the merged region is right everywhere
    assert summary["dice_nucleus"] == pytest.approx(2 / 3)  # 1, 0, 1
    assert summary["groups"]["a"]["images"] == 2 and summary["groups"]["b"]["dice_nucleus"] == 1.0
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["a/1", "a/2", "b/1"] and float(rows[1]["dice_nucleus"]) == 0.0
    assert engine.state.metrics["mean_dice"] == pytest.approx(summary["mean_dice"])


@pytest.mark.parametrize("classes, names, regions, expected", [
    (3, ["background", "cell", "nucleus"], {"cell": [1, 2]}, "'cell' is also the name of a class"),
    (2, ["background", "cell"], {"whole": [1, 2]}, "'whole' needs class indices 0..1, got [1, 2]"),
    (2, ["background", "cell"], {"whole": []}, "'whole' needs class indices 0..1, got []"),
    (2, ["background", "cell", "nucleus"], None, "3 names for 2 classes"),
])
def test_class_metrics_refuse_names_and_regions_they_cannot_report(tmp_path, classes, names, regions, expected):
    from medseg.evaluation import ClassMetrics

    with pytest.raises(ConfigValueError, match=re.escape(expected)):
        ClassMetrics(str(tmp_path), num_classes=classes, class_names=names, regions=regions)
    with pytest.raises(ValueError):  # the function scores nothing with them either
        multiclass_scores(np.zeros((2, 2), int), np.zeros((2, 2), int), classes, names, regions)


# --- CLI end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny 2-epoch jurkat training on synthetic cells, shared by the CLI tests."""
    root = tmp_path_factory.mktemp("jurkat_cli")
    data = write_jurkat_folder(root / "data")
    out = root / "run"
    result = _invoke("train", JURKAT, "--data", data, "--output", out, "--epochs", 2, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_sets(TINY))
    assert result.exit_code == 0, result.output
    return {"data": data, "out": out, "output": result.output}


def test_cli_train_writes_model_split_and_history(trained):
    out = trained["out"]
    # what was found, said before the training starts, and kept in the summary
    said = [line for line in trained["output"].splitlines() if "labelled images" in line]
    assert said == [f"{trained['data']}: 8 labelled images (images '**/*.bmp', masks '{{stem}}.png'): 6 for training, "
                    f"2 for validation; the split is recorded in {out / 'split.json'}"]
    assert json.loads((out / "train_summary.json").read_text())["images"] == {"train": 6, "val": 2}
    for name in ("model.pt", "split.json", "history.json", "curves.png", "config.json", "train_summary.json"):
        assert (out / name).is_file(), name
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 6
    history = json.loads((out / "history.json").read_text())
    assert history["val_epoch"] == [1, 2] and all(np.isfinite(history["train_loss"]))
    assert all(0.0 <= m["val_mean_dice"] <= 1.0 for m in history["val"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["key_metric"] == "val_mean_dice" and summary["epochs"] == 2


def test_fewer_training_images_than_a_batch_still_train(trained, tmp_path):
    # 6 training images, batch_size 8: one partial batch per epoch rather than no epoch and no model.pt
    out = tmp_path / "small"
    result = _invoke("train", JURKAT, "--data", trained["data"], "--output", out, "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_sets([*TINY, "batch_size=8"]))
    assert result.exit_code == 0, result.output
    assert (out / "model.pt").is_file() and json.loads((out / "train_summary.json").read_text())["epochs"] == 1


def test_a_loader_with_no_batch_is_a_one_line_error():
    import torch

    from medseg.errors import DataError
    from medseg.workflows import _check_batches

    loader = torch.utils.data.DataLoader(list(range(3)), batch_size=4, drop_last=True)
    with pytest.raises(DataError, match=r"^DATA: 3 training images fill no batch of 4; add images or lower"):
        _check_batches(type("Trainer", (), {"data_loader": loader})(), "DATA")
    _check_batches(type("Trainer", (), {"data_loader": torch.utils.data.DataLoader(list(range(3)))})(), "DATA")
    # the bundle's own id is named, with the largest value that fills a batch: nuclei's batch_size counts crops
    from medseg.bundle import load_config

    trainer = type("Trainer", (), {"data_loader": loader})()
    for bundle, hint in (("nuclei", "batch_size, which counts crops, 2 per image (--set batch_size=6 at most)"),
                         ("isbi_em", "images_per_batch (--set images_per_batch=3 at most)"),
                         ("jurkat", "batch_size (--set batch_size=3 at most)")):
        with pytest.raises(DataError, match=re.escape(hint)):
            _check_batches(trainer, "DATA", load_config(REPO / "bundles" / bundle, "train"))


def test_cli_evaluate_checks_model_and_output_folder_before_writing(trained, tmp_path):
    # the run's split.json makes evaluate read the data lists, which write split.json to the output folder:
    # a bad checkpoint or output folder must be reported before that, in one line
    taken = tmp_path / "taken"
    taken.write_text("a file")
    base = ("evaluate", JURKAT, "--data", trained["data"], "--device", "cpu", *_sets(JURKAT_TINY_NET))
    result = _invoke(*base, "--checkpoint", trained["out"] / "model.pt", "--output", taken)
    assert result.exit_code == 1 and "taken: a file, not a folder" in result.output, result.output
    junk = tmp_path / "junk" / "model.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"not weights")
    shutil.copy(trained["out"] / "split.json", junk.parent / "split.json")
    result = _invoke(*base, "--checkpoint", junk, "--output", tmp_path / "eval")
    assert result.exit_code == 1 and "not a readable PyTorch checkpoint" in result.output, result.output
    assert not (tmp_path / "eval").exists()


def test_cli_evaluate_writes_class_scores(trained, tmp_path):
    result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_sets(JURKAT_TINY_NET))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 2
    for key in ("dice_background", "dice_cell_body", "dice_nucleus", "iou_cell_body", "iou_nucleus",
                "pixel_accuracy", "macro_f1", "mean_dice", "mean_iou", "dice_cell", "iou_cell"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["mean_dice"] == pytest.approx((summary["dice_cell_body"] + summary["dice_nucleus"]) / 2)
    assert sorted(summary["groups"]) == ["set_a", "set_b"]  # one validation image per folder
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # the validation images of the training run (same seed and fraction)
    assert [r["name"] for r in rows] == json.loads((trained["out"] / "split.json").read_text())["val"]


def test_cli_evaluate_val_follows_the_recorded_split(trained, tmp_path):
    """Other seed/val_fraction settings at evaluation still score the run's own validation images."""
    result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu",
                     *_sets([*JURKAT_TINY_NET, "seed=7", "val_fraction=0.5"]))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert names == json.loads((trained["out"] / "split.json").read_text())["val"]
    # and so through a link to the run's model.pt (the split was looked for beside the link: training images
    # were scored as validation ones, with a warning of no record)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "model.pt").symlink_to(trained["out"] / "model.pt")
    result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--checkpoint", tmp_path / "link" / "model.pt",
                     "--output", tmp_path / "eval_link", "--no-progress", "--device", "cpu",
                     *_sets([*JURKAT_TINY_NET, "seed=7"]))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval_link" / "metrics.csv", newline="") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == names
    assert json.loads((tmp_path / "eval_link" / "summary.json").read_text())["run"]["split_from"] == str(
        trained["out"] / "split.json")
    # --split train scores the run's own training images, whatever the seed given now
    result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "train", "--split", "train", "--no-progress", "--device", "cpu",
                     *_sets([*JURKAT_TINY_NET, "seed=7"]))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "train" / "metrics.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert names == json.loads((trained["out"] / "split.json").read_text())["train"]
    # --split all scores every image
    result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "all", "--split", "all", "--no-progress", "--device", "cpu",
                     *_sets(JURKAT_TINY_NET))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["images"] == 8


def test_cli_evaluate_follows_the_recorded_split_by_name_in_another_folder(trained, tmp_path, caplog):
    """A copy of the data at another path: the run's validation images by their names, never a split drawn
    anew (which held training images); images missing are left out, none present is an error."""
    data = tmp_path / "copy"
    shutil.copytree(trained["data"], data)
    val = json.loads((trained["out"] / "split.json").read_text())["val"]
    args = ("--checkpoint", trained["out"] / "model.pt", "--no-progress", "--device", "cpu",
            *_sets([*JURKAT_TINY_NET, "seed=3"]))
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", data, "--output", tmp_path / "eval", *args)
    assert result.exit_code == 0, result.output
    assert any("scoring the val images of the same names" in r.getMessage() for r in caplog.records)
    with open(tmp_path / "eval" / "metrics.csv", newline="") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == val
    assert not any("differ from those of the same names" in r.getMessage() for r in caplog.records)
    edited = data / f"{val[0]}.bmp"  # the same name, other pixels: scored as they are now, with a warning
    Image.fromarray(np.asarray(Image.open(edited))[::-1].copy()).save(edited)
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", data, "--output", tmp_path / "edited", *args)
    assert result.exit_code == 0, result.output
    assert any(f"1 of the images scored differ from those of the same names it records (first: {val[0]})"
               in r.getMessage() for r in caplog.records)
    # another data set whose names are the run's (a test set numbered alike): every validation image differs,
    # and scoring only those names (a few of the set, exit 0) is refused
    other = shutil.copytree(data, tmp_path / "other")
    for name in val:
        image = other / f"{name}.bmp"
        Image.fromarray(np.asarray(Image.open(image))[:, ::-1].copy()).save(image)
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", other, "--output", tmp_path / "other_eval", *args)
    assert result.exit_code == 0, result.output  # the same data re-saved (same pixels, other bytes) looks alike
    (said,) = [r.getMessage() for r in caplog.records if "every one of the" in r.getMessage()]
    assert f"every one of the {len(val)} val images that {trained['out'] / 'split.json'} names differs" in said
    assert "not the run's val images but a few of the set; pass --split all" in said
    for path in data.rglob(f"{Path(val[0]).name}.*"):  # one validation image (and its mask) gone
        path.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", data, "--output", tmp_path / "eval1", *args)
    assert result.exit_code == 0, result.output
    assert any(f"1 of its {len(val)} val images are not in" in r.getMessage() for r in caplog.records)
    with open(tmp_path / "eval1" / "metrics.csv", newline="") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == val[1:]
    for name in val[1:]:
        for path in data.rglob(f"{Path(name).name}.*"):
            path.unlink()
    result = _invoke("evaluate", JURKAT, "--data", data, "--output", tmp_path / "eval0", *args)
    assert result.exit_code == 1
    assert f"none of the {len(val)} val images that {trained['out'] / 'split.json'} records are here" in result.output
    assert "pass --split all" in result.output


def test_cli_evaluate_without_a_split_record_warns(trained, tmp_path, caplog):
    # a checkpoint handed over without its split.json: a warning naming the missing record
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained["out"] / "model.pt", models / "model.pt")
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--checkpoint", models / "model.pt",
                         "--output", tmp_path / "eval2", "--no-progress", "--device", "cpu", *_sets(JURKAT_TINY_NET))
    assert result.exit_code == 0, result.output
    assert any(r.getMessage().startswith(f"{models / 'split.json'}: no split record beside the checkpoint")
               for r in caplog.records)


def _evaluated_on_val(caplog, data: Path, run: Path, out: Path, args: tuple, val: list[str], about: str) -> str:
    """Evaluate ``run``'s model on ``data`` (its validation split), check that ``val`` were scored, and return the
    one warning that says ``about``."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", data, "--checkpoint", run / "model.pt", "--output", out, *args)
    assert result.exit_code == 0, result.output
    with open(out / "metrics.csv", newline="") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == val
    (said,) = [r.getMessage() for r in caplog.records if about in r.getMessage()]
    return said


def test_cli_evaluate_without_a_split_record_draws_the_split_as_the_training_did(tmp_path, caplog):
    # model.pt and config.json handed over without split.json: the split was drawn with the bundle's seed and
    # val_fraction, not the training's, and scored training images as validation ones under a warning that
    # read as if the training's settings were used
    data = write_jurkat_folder(tmp_path / "data", layout=[("set_a", (72, 72))] * 10)
    run = tmp_path / "run"
    args = ("--no-progress", "--device", "cpu", "--no-tracking", *_sets(JURKAT_TINY_NET))
    result = _invoke("train", JURKAT, "--data", data, "--output", run, "--epochs", 1,
                     "-s", "seed=3", "-s", "val_fraction=0.3", *args)
    assert result.exit_code == 0, result.output
    val = json.loads((run / "split.json").read_text())["val"]
    (run / "split.json").unlink()
    said = _evaluated_on_val(caplog, data, run, tmp_path / "eval", args, val, "no split record")
    assert "drawn again with the split settings its config.json records (seed 3, val_fraction 0.3)" in said
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["run"]["split_from"] == "drawn with the training's seed, val_fraction (config.json)"
    # a value given now wins
    result = _invoke("evaluate", JURKAT, "--data", data, "--checkpoint", run / "model.pt", "--output",
                     tmp_path / "eval_0", "-s", "seed=0", *args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval_0" / "summary.json").read_text())["run"]["split_from"] == \
        "drawn with the training's val_fraction (config.json)"
    with open(tmp_path / "eval_0" / "metrics.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert len(names) == 3 and names != val  # 30 % of 10 with another seed


def test_cli_evaluate_reads_the_data_as_the_training_did(tmp_path, caplog):
    # images/ + masks/ folders: a run trained with its own image_glob and mask_template is evaluated on its data
    # without giving them again (the bundle's **/*.bmp found nothing here)
    src = write_jurkat_folder(tmp_path / "src", layout=[("set_a", (72, 72))] * 5)
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for image in (src / "set_a").glob("*.bmp"):
        shutil.copy(image, data / "images" / image.name)
        shutil.copy(image.with_suffix(".png"), data / "masks" / f"{image.stem}.png")
    layout = ["image_glob=images/*", "mask_template=../masks/{stem}.png"]
    run = tmp_path / "run"
    args = ("--no-progress", "--device", "cpu", "--no-tracking", *_sets(JURKAT_TINY_NET))
    result = _invoke("train", JURKAT, "--data", data, "--output", run, "--epochs", 1, *_sets(layout), *args)
    assert result.exit_code == 0, result.output
    val = json.loads((run / "split.json").read_text())["val"]
    said = _evaluated_on_val(caplog, data, run, tmp_path / "eval", args, val, "as the training read it")
    assert said == (f"reading {data} as the training read it: image_glob=images/*, "
                    f"mask_template=../masks/{{stem}}.png (from {run / 'config.json'}); give --set to read it "
                    "otherwise")
    # another folder, in the bundle's own layout (held-out images): read as the bundle reads data, as before
    other = write_jurkat_folder(tmp_path / "other", layout=[("set_a", (72, 72))] * 3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", JURKAT, "--data", other, "--checkpoint", run / "model.pt", "--output",
                         tmp_path / "eval_other", "--split", "all", *args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval_other" / "summary.json").read_text())["images"] == 3
    assert not any("as the training read it" in r.getMessage() for r in caplog.records)
    # another folder laid out as the training's: not found as the bundle lays data out, and the error says how
    # the training read its data
    shutil.copytree(data, tmp_path / "copy")
    result = _invoke("evaluate", JURKAT, "--data", tmp_path / "copy", "--checkpoint", run / "model.pt", "--output",
                     tmp_path / "eval_copy", "--split", "all", *args)
    _one_line_error(result, "images/001.bmp: no mask matches", "; the training read its data with image_glob=images/*, "
                    f"mask_template=../masks/{{stem}}.png ({run / 'config.json'}): give them by --set if this data "
                    "is laid out so")
    result = _invoke("evaluate", JURKAT, "--data", tmp_path / "copy", "--checkpoint", run / "model.pt", "--output",
                     tmp_path / "eval_copy", "--split", "all", *_sets(layout), *args)
    assert result.exit_code == 0, result.output


def test_cli_infer_refuses_dicom_seg_before_making_the_output_folder(trained, tmp_path):
    result = _invoke("infer", JURKAT, trained["data"] / "set_b", tmp_path / "o", "--checkpoint",
                     trained["out"] / "model.pt", "--format", "dicom-seg", "--no-progress", "--device", "cpu",
                     *_sets(JURKAT_TINY_NET))
    assert result.exit_code == 1 and "DICOM SEG output holds binary masks" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_cli_infer_writes_class_value_masks(trained, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(trained["data"] / "set_b", inputs)
    for mask in inputs.glob("*.png"):
        mask.unlink()
    gray, _ = synthetic_cells(np.random.default_rng(5), (70, 66))
    Image.fromarray(gray.mean(-1).astype(np.uint8)).save(inputs / "gray.png")  # gray input -> 3 channels
    out = tmp_path / "out"
    result = _invoke("infer", JURKAT, inputs, out, "--checkpoint", trained["out"] / "model.pt", "--no-progress",
                     "--device", "cpu", *_sets(JURKAT_TINY_NET))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"): result.output.rindex("}") + 1])
    assert summary["ok"] == 3 and summary["failed"] == 0
    for name, shape in (("001", (96, 96)), ("002", (88, 100)), ("gray", (70, 66))):
        mask = np.asarray(Image.open(out / "mask" / f"{name}.png"))
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 128, 255}
        prob = tifffile.imread(out / "prob" / f"{name}.tif")
        assert prob.shape == shape and 0.0 <= prob.min() <= prob.max() <= 1.0
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["status"] for r in rows} == {"ok"} and {r["objects"] for r in rows} == {""}


def test_a_two_class_model_made_by_settings_writes_and_scores_its_own_classes(tmp_path, caplog):
    import torch

    data = write_jurkat_folder(tmp_path / "data")
    for mask in data.rglob("*.png"):  # cell or not: 0 / 255
        Image.fromarray(np.where(np.asarray(Image.open(mask)) > 0, 255, 0).astype(np.uint8)).save(mask)
    two = ['class_map={"0": 0, "255": 1}', "num_classes=2", 'class_names=["background", "cell"]', "regions={}"]
    # the bundle's 3-class map on such masks trains no cell body: said (it trained without a word)
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("train", JURKAT, "--data", data, "--output", tmp_path / "three", "--epochs", 1,
                         "--no-progress", "--no-tracking", "--device", "cpu", *_sets(TINY))
    assert result.exit_code == 0, result.output
    (said,) = [r.getMessage() for r in caplog.records if "the model cannot learn it" in r.getMessage()]
    assert said.startswith("class 1 (cell_body, mask value 128): in none of the 6 training masks held in memory")
    caplog.clear()
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("train", JURKAT, "--data", data, "--output", run, "--epochs", 1, "--no-progress",
                         "--no-tracking", "--device", "cpu", *_sets([*TINY, *two]))
    assert result.exit_code == 0, result.output
    assert "cannot learn" not in caplog.text
    weights = torch.load(run / "model.pt", map_location="cpu")
    last = [k for k, v in weights.items() if k.endswith("bias") and v.shape == (2,)][-1]
    weights[last] = torch.tensor([-20.0, 20.0])  # every pixel the cell: the mask shows the cell's value
    torch.save(weights, run / "model.pt")
    # nothing repeated: the classes, names, regions and network come from the training's config.json
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        result = _invoke("infer", JURKAT, data / "set_b", out, "--checkpoint", run / "model.pt", "--include",
                         "*.bmp", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert 'class_map={"0": 0, "255": 1}' in caplog.text and "num_classes=2" in caplog.text
    for name in ("001", "002"):
        assert np.unique(np.asarray(Image.open(out / "mask" / f"{name}.png"))).tolist() == [255]  # not 128
    # a checkpoint without its record (or of an earlier version, whose record kept the 3 class names): infer
    # scores nothing, so the class names and regions it would not use do not stop it; an expression given is
    # built afresh after the classes were checked
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "model.pt", alone / "model.pt")
    for n, extra in enumerate(([], ["object_classes=$list(range(1, @network_def.out_channels))"])):
        result = _invoke("infer", JURKAT, data / "set_b", tmp_path / f"out{n}", "--checkpoint", alone / "model.pt",
                         "--include", "*.bmp", "--no-progress", "--device", "cpu",
                         *_sets([*JURKAT_TINY_NET, *two[:2], *extra]))
        assert result.exit_code == 0, result.output
        assert np.unique(np.asarray(Image.open(tmp_path / f"out{n}" / "mask" / "001.png"))).tolist() == [255]
    result = _invoke("evaluate", JURKAT, "--data", data, "--checkpoint", run / "model.pt", "--output",
                     tmp_path / "eval", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["dice_background"] == 0.0 and 0.0 < summary["dice_cell"] == summary["mean_dice"] < 1.0
    assert "dice_nucleus" not in summary and "dice_cell_body" not in summary
    # a region named like a class would replace the class's scores: refused before any image is scored
    result = _invoke("evaluate", JURKAT, "--data", data, "--checkpoint", run / "model.pt", "--output",
                     tmp_path / "eval2", "--no-progress", "--device", "cpu", "--set", 'regions={"cell": [1]}')
    _one_line_error(result, "'cell' is also the name of a class", "regions={}")
    assert not (tmp_path / "eval2" / "summary.json").exists()


def test_cli_bad_mask_value_is_one_line_naming_file_and_value(tmp_path):
    data = write_jurkat_folder(tmp_path / "d", layout=[("a", (48, 48))] * 3)
    mask = np.asarray(Image.open(data / "a" / "002.png")).copy()
    mask[:4, :4] = 77
    Image.fromarray(mask).save(data / "a" / "002.png")
    result = _invoke("train", JURKAT, "--data", data, "--output", tmp_path / "o", "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_sets(TINY))
    _one_line_error(result, "002.png", "77", "not in the class map")


def test_cli_image_without_mask_is_one_line(tmp_path):
    data = write_jurkat_folder(tmp_path / "d", layout=[("a", (48, 48))] * 2)
    (data / "a" / "001.png").unlink()
    result = _invoke("train", JURKAT, "--data", data, "--output", tmp_path / "o", "--no-tracking",
                     "--device", "cpu", *_sets(TINY))
    _one_line_error(result, "001.bmp", "no mask matches")
    assert not (tmp_path / "o" / "model.pt").exists()


def test_cli_split_without_validation_is_one_line(tmp_path):
    data = write_jurkat_folder(tmp_path / "d", layout=[("a", (48, 48))] * 3)
    result = _invoke("train", JURKAT, "--data", data, "--output", tmp_path / "o", "--no-tracking",
                     "--device", "cpu", *_sets([*TINY, "val_fraction=0"]))
    _one_line_error(result, "no validation samples", "val_fraction")


def test_cli_tta_follows_the_bundle_unless_given(trained, tmp_path, monkeypatch):
    """jurkat averages the 8 rotations/flips by default (its ``tta``); ``--no-tta`` / ``--tta`` override it."""
    from medseg.scale import ScaledTiledInferer

    seen: list[bool] = []
    call = ScaledTiledInferer.__call__

    def spy(self, *args, **kwargs):
        seen.append(self.tta)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ScaledTiledInferer, "__call__", spy)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(trained["data"] / "set_b" / "001.bmp", inputs / "001.bmp")
    common = ("--checkpoint", trained["out"] / "model.pt", "--no-progress", "--device", "cpu",
              *_sets(JURKAT_TINY_NET))
    for flag, expected in ((None, True), ("--no-tta", False), ("--tta", True)):
        seen.clear()
        flags = [flag] if flag else []
        result = _invoke("evaluate", JURKAT, "--data", trained["data"], "--output", tmp_path / f"e{flag}",
                         *flags, *common)
        assert result.exit_code == 0, result.output
        assert seen and set(seen) == {expected}, (flag, seen)
        seen.clear()
        result = _invoke("infer", JURKAT, inputs, tmp_path / f"o{flag}", *flags, *common)
        assert result.exit_code == 0, result.output
        assert seen and set(seen) == {expected}, (flag, seen)


@pytest.mark.parametrize("bundle, setting, expected", [
    ("jurkat", 'class_map={"0": 0, "128": 1, "255": 5}', "class_map maps to class 5, outside 0..2"),
    ("jurkat", "class_map={}", "class_map is empty"),
    ("jurkat", 'class_map={"0": 0, "128": 1, "128.0": 2}', "class_map lists one mask value twice ('128' and '128.0')"),
    ("jurkat", 'class_names=["background", "cell", "cell"]', "'cell' names two classes"),
    ("jurkat", 'class_names=["background", "cell"]', "2 names for 3 classes (num_classes)"),
    ("jurkat", 'regions={"nucleus": [2]}', "regions: 'nucleus' is also the name of a class"),
    ("jurkat", "object_classes=[5]", "object_classes=[5]: give the classes an object is made of, among 1..2"),
    ("nuclei", "class_weights=[1,2]", "class_weights: 2 weights for 3 classes"),
    ("nuclei", "class_weights=[1,-1,2]", "class_weights must be positive"),
    ("isbi_em", "loss_name=foo", "unknown loss 'foo'; options are"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, bundle, setting, expected):
    from conftest import write_dsb_folder, write_isbi_folder

    make = {"isbi_em": write_isbi_folder, "jurkat": write_jurkat_folder, "nuclei": write_dsb_folder}[bundle]
    data = make(tmp_path / "data", n=8) if bundle == "isbi_em" else make(tmp_path / "data")
    result = _invoke("train", REPO / "bundles" / bundle, "--data", data, "--output", tmp_path / "o", "--epochs", 1,
                     "--no-tracking", "--no-progress", "--device", "cpu", "--set", setting)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "internal error" not in errors[0], result.output


def test_hidden_files_beside_the_images_are_not_images(jurkat_folder):
    (jurkat_folder / "set_a" / "._001.bmp").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    names = [p["name"] for p in find_image_mask_pairs(jurkat_folder, **LAYOUT)]
    assert names and not any("._" in n for n in names)


def test_jpeg_images_pair_with_lossless_masks(tmp_path):
    folder = write_jurkat_folder(tmp_path / "j", layout=[("x", (40, 40)), ("x", (40, 40))])
    for bmp in sorted(folder.rglob("*.bmp")):
        Image.open(bmp).save(bmp.with_suffix(".jpg"), quality=95)
        bmp.unlink()
    pairs = find_image_mask_pairs(folder, image_glob="**/*.jpg", mask_template="{stem}.*")
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in pairs] == [("001.jpg", "001.png"),
                                                                            ("002.jpg", "002.png")]
    (folder / "x" / "002.png").unlink()  # the image itself is not taken for its own (JPEG) mask
    with pytest.raises(DataError, match=r"x/002\.jpg: no mask matches"):
        find_image_mask_pairs(folder, image_glob="**/*.jpg", mask_template="{stem}.*")


def test_two_images_of_one_name_are_refused_not_taken_twice(tmp_path):
    # JPEG previews beside the PNG originals: each sample would be trained (and perhaps validated) twice
    folder = write_jurkat_folder(tmp_path / "j", layout=[("x", (40, 40)), ("x", (40, 40))])
    Image.open(folder / "x" / "002.bmp").save(folder / "x" / "002.jpg")
    with pytest.raises(DataError, match=r"x/002\.jpg: another image of the same name, 002\.bmp, is also matched by "
                                        r"'\*\*/\*\.\[bj\]\[mp\]\[gp\]'; keep one, or make image_glob specific "
                                        r"\(e\.g\. \*\*/\*\.bmp\)"):
        find_image_mask_pairs(folder, image_glob="**/*.[bj][mp][gp]", mask_template="{stem}.png")
    assert len(find_image_mask_pairs(folder, image_glob="**/*.bmp", mask_template="{stem}.png")) == 2
