"""Short real trainings and real-file checks on ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BUNDLE
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
