"""Short real trainings and real-file checks on ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE, REPO
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data import find_pairs

pytestmark = pytest.mark.realdata


def test_real_isbi_pairs_are_binary_512(shared_isbi):
    from medseg.transforms import BinaryLabeld, LoadSliced

    pairs = find_pairs(shared_isbi)
    assert len(pairs) >= 20
    d = BinaryLabeld(keys="label")(LoadSliced(keys=["image", "label"])(pairs[0]))
    assert d["image"].shape == (1, 512, 512) and set(np.unique(d["label"]).tolist()) == {0.0, 1.0}
    assert 0.6 < d["label"].mean() < 0.9  # about 78% interior


def test_short_real_training_loss_falls_and_scores_rise(shared_isbi, tmp_path):
    """A few epochs of the default network on real slices: the loss falls, validation Dice and V_rand rise
    above those of the untrained network (validated once before the first epoch) and Dice above the trivial
    all-interior answer."""
    out = tmp_path / "run"
    args = ["train", str(BUNDLE), "--data", str(shared_isbi), "--output", str(out), "--epochs", "6",
            "--no-progress", "--no-tracking", "--device", "cpu",
            "--set", "patch_size=[128,128]", "--set", "samples_per_image=2", "--set", "val_count=2",
            "--set", "val_interval=3", "--set", "val_at_start=true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    loss = history["train_loss"]
    assert history["val_epoch"] == [0, 3, 6] and len(loss) == 6
    dice = [m["val_mean_dice"] for m in history["val"]]
    v_rand = [m["val_v_rand"] for m in history["val"]]
    assert np.mean(loss[-2:]) < 0.8 * loss[0]
    # Dice of the interior must beat both the untrained network and the trivial all-interior answer
    # (about 0.89 here, since 80% of the pixels are interior)
    from medseg.transforms import BinaryLabeld, LoadSliced

    fractions = [BinaryLabeld(keys="label")(LoadSliced(keys="label")(p))["label"].mean()
                 for p in find_pairs(shared_isbi)[-2:]]
    all_interior_dice = float(np.mean([2 * f / (1 + f) for f in fractions]))
    assert max(dice[1:]) > max(dice[0], all_interior_dice) + 0.01
    assert max(v_rand[1:]) > v_rand[0] + 0.3
    assert json.loads((out / "split.json").read_text())["val"] == ["23", "24"]
    assert (out / "model.pt").is_file() and (out / "curves.png").is_file()


@pytest.mark.slow
def test_default_config_reaches_isbi_scores(shared_isbi, tmp_path):
    """The default config for 10 minutes: V_rand and V_info on the validation slices (slow)."""
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(BUNDLE), "--data", str(shared_isbi), "--output", str(out),
                                 "--max-minutes", "10", "--no-progress", "--no-tracking"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(BUNDLE), "--data", str(shared_isbi), "--checkpoint",
                                 str(out / "model.pt"), "--output", str(tmp_path / "eval"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["v_rand"] > 0.9 and summary["v_info"] > 0.9


# --- jurkat on the real 3-class WBC images (../shared/data/cells3class) ------------------------------------------

JURKAT = BUNDLE.parent / "jurkat"
NUCLEI = BUNDLE.parent / "nuclei"
SMALL_NET = ["network_def#channels=[8,16,32]", "network_def#strides=[2,2]", "network_def#num_res_units=0"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_real_cells3class_pairs_load_with_the_class_map(shared_cells3class):
    from PIL import Image

    from medseg.data import find_image_mask_pairs
    from medseg.transforms import ClassMapd, LoadSliced

    pairs = find_image_mask_pairs(shared_cells3class, "**/*.bmp", "{stem}.png")
    groups = {g: sum(p["group"] == g for p in pairs) for g in {p["group"] for p in pairs}}
    assert groups == {"dataset1": 240, "dataset2_subset": 20}
    for path in (p["label"] for p in pairs):  # every mask holds only the three documented values
        assert set(np.unique(np.asarray(Image.open(path))).tolist()) <= {0, 128, 255}, path
    load = LoadSliced(keys=["image", "label"], channels=[3, 1])
    class_map = ClassMapd(keys="label", class_map={"0": 0, "128": 1, "255": 2})
    for pair in (pairs[0], pairs[-1]):
        d = class_map(load(pair))
        assert d["image"].shape[0] == 3 and d["label"].shape == (1, *d["image"].shape[1:])
        assert set(np.unique(d["label"]).tolist()) == {0.0, 1.0, 2.0}
        fractions = np.bincount(d["label"].astype(int).ravel(), minlength=3) / d["label"].size
        assert fractions[0] > fractions[1] > 0.02 and fractions[2] > 0.02  # background dominates
    assert load(pairs[-1])["image"].shape == (3, 300, 300)  # dataset 2 images are 300x300


def test_short_real_jurkat_training_learns_the_classes(shared_cells3class, tmp_path):
    """4 epochs of a small network on the 50 real images 000-059 of dataset 1 (10 validate): mean foreground Dice
    rises from the untrained network's (about 0.2) above 0.5 (0.80 when checked), and `medseg evaluate`
    reproduces it."""
    out = tmp_path / "run"
    sets = [*SMALL_NET, "patch_size=[96,96]", "image_glob=dataset1/0[0-5]?.bmp", "batch_size=8",
            "learning_rate=0.01", "val_interval=2", "val_at_start=true"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(JURKAT), "--data", str(shared_cells3class), "--output", str(out),
                                 "--epochs", "4", "--no-progress", "--no-tracking", "--device", "cpu", *_sets(sets)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    dice = [m["val_mean_dice"] for m in history["val"]]
    assert history["val_epoch"] == [0, 2, 4] and all(np.isfinite(dice + history["train_loss"]))
    assert dice[-1] > 0.5 and dice[-1] > dice[0] + 0.3
    assert history["train_loss"][-1] < 0.6 * history["train_loss"][0]
    assert (out / "model.pt").is_file() and len(json.loads((out / "split.json").read_text())["val"]) == 10
    result = runner.invoke(app, ["evaluate", str(JURKAT), "--data", str(shared_cells3class), "--checkpoint",
                                 str(out / "model.pt"), "--output", str(tmp_path / "eval"), "--no-progress",
                                 "--device", "cpu", *_sets(sets)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 10 and summary["mean_dice"] == pytest.approx(max(dice), abs=0.02)
    assert summary["dice_cell"] > summary["mean_dice"] - 0.05  # cell = body + nucleus is the easier region


# --- nuclei on the real DSB 2018 subset (../shared/data/dsb2018) -------------------------------------------------


def test_real_dsb_samples_and_masks_merge(shared_dsb):
    import csv

    from medseg.data import find_dsb_samples
    from medseg.transforms import LoadInstanceMasksd, LoadSliced

    samples = find_dsb_samples(shared_dsb)
    with open(shared_dsb / "manifest.csv", newline="") as fh:
        manifest = {r["image_id"]: r for r in csv.DictReader(fh)}
    assert len(samples) == len(manifest) == 94
    assert {s["group"] for s in samples} == {"fluorescence", "brightfield_gray", "brightfield_histology_he"}
    fewest = min(samples, key=lambda s: int(manifest[s["name"]]["n_instance_masks"]))
    for sample in (fewest, samples[0]):
        d = LoadInstanceMasksd(keys="label")(LoadSliced(keys="image", gray=False)(sample))
        n_files = len(list(Path(sample["label"]).glob("*.png")))
        row = manifest[sample["name"]]
        assert d["label"].shape == (1, int(row["height"]), int(row["width"]))
        assert int(d["label"].max()) == n_files == int(row["n_instance_masks"])
        assert len(np.unique(d["label"])) == n_files + 1  # every mask kept a label


def _dsb_subset(shared_dsb: Path, root: Path) -> Path:
    """8 fluorescence 256x256 + 4 H&E samples of the real subset (linked), with their manifest rows."""
    import csv
    import os

    with open(shared_dsb / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pick = [r for r in rows if r["category"] == "fluorescence" and (r["height"], r["width"]) == ("256", "256")][:8]
    pick += [r for r in rows if r["category"] == "brightfield_histology_he"][:4]
    (root / "stage1_train").mkdir(parents=True)
    for r in pick:
        os.symlink(shared_dsb / "stage1_train" / r["image_id"], root / "stage1_train" / r["image_id"])
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(pick)
    return root


def test_short_real_nuclei_training_finds_nuclei(shared_dsb, tmp_path):
    """6 epochs of a small network on 9 real images (3 validate, one of them H&E): the DSB score rises from 0
    above 0.1 (0.33 when checked), and `medseg evaluate --no-tta` reproduces it."""
    data = _dsb_subset(shared_dsb.resolve(), tmp_path / "data")
    out = tmp_path / "run"
    sets = [*SMALL_NET, "patch_size=[128,128]", "val_fraction=0.25", "samples_per_image=4", "batch_size=8",
            "learning_rate=0.01", "val_interval=3", "val_at_start=true"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(NUCLEI), "--data", str(data), "--output", str(out), "--epochs", "6",
                                 "--no-progress", "--no-tracking", "--device", "cpu", *_sets(sets)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    scores = [m["val_dsb_score"] for m in history["val"]]
    assert history["val_epoch"] == [0, 3, 6] and all(np.isfinite(scores + history["train_loss"]))
    assert scores[-1] > 0.1 and max(scores) > scores[0] + 0.1
    assert history["val"][-1]["val_ap_50"] > 0.3
    assert (out / "model.pt").is_file()
    result = runner.invoke(app, ["evaluate", str(NUCLEI), "--data", str(data), "--checkpoint", str(out / "model.pt"),
                                 "--output", str(tmp_path / "eval"), "--no-progress", "--device", "cpu",
                                 "--no-tta", *_sets(sets)])  # validation is single-pass; evaluate's default is TTA
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["dsb_score"] == pytest.approx(max(scores), abs=1e-6)
    assert set(summary["groups"]) == {"fluorescence", "brightfield_histology_he"}
    # the trained model from Python, on the real images as read into arrays: what medseg infer writes
    from PIL import Image

    from medseg import Segmenter
    from medseg.bundle import parse_override

    network = [*SMALL_NET, "patch_size=[128,128]"]
    images = tmp_path / "images"
    images.mkdir()
    for name in json.loads((out / "split.json").read_text())["val"]:
        shutil.copy(next((data / "stage1_train" / name / "images").glob("*.png")), images)
    result = runner.invoke(app, ["infer", str(NUCLEI), str(images), str(tmp_path / "inferred"), "--checkpoint",
                                 str(out / "model.pt"), "--no-progress", "--device", "cpu", *_sets(network)])
    assert result.exit_code == 0, result.output
    nuclei = Segmenter(NUCLEI, out / "model.pt", device="cpu", overrides=dict(parse_override(i) for i in network))
    for path in sorted(images.glob("*.png")):
        result = nuclei.segment(np.asarray(Image.open(path)))  # RGBA, its alpha opaque
        written = np.asarray(Image.open(tmp_path / "inferred" / "mask" / path.name))
        assert np.array_equal(result.mask, written) and result.mask.max() == len(result.objects) > 0, path.name


@pytest.mark.slow
def test_infer_speed_benchmark_runs_on_one_slice(shared_isbi, tmp_path):
    """benchmarks/infer_speed.py reads the bundle's inference config as medseg does (expressions included; a
    development tool, so slow: 8 passes of the full network on a CPU without bfloat16 take a while)."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    script = REPO / "benchmarks" / "infer_speed.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(shared_isbi / "test"), "--limit", "1",
                           "--repeats", "1", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plain MONAI sliding_window_inference (256×256 windows)" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["seconds_median"]) == {
        "plain MONAI sliding_window_inference (256×256 windows)", "plain MONAI, one 512×512 window",
        "medseg infer (default: closed contours)", "medseg infer -s close_contours=false"}
    # an agreement figure per plain side (with untrained weights it says nothing of the segmentations)
    assert len(result["mask_pixel_agreement"]) == 2
    assert all(0 <= v <= 1 for v in result["mask_pixel_agreement"].values())
    assert "note: untrained weights" in done.stdout
