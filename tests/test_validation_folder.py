"""A validation folder of its own (``--val-data``, the bundles' ``val_dir``): every image of ``--data`` trains,
those of the folder validate; the split record, ``evaluate`` and ``--resume`` follow it."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import (
    DATA_FOUND,
    REPO,
    TINY_NET,
    write_dsb_folder,
    write_isbi_folder,
    write_jurkat_folder,
)
from test_multiclass import JURKAT, LAYOUT, TINY, _invoke, _sets

from medseg.data import dsb_split, folder_split, instance_split, isbi_split, recorded_samples
from medseg.errors import DataError


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def _rows(report: Path) -> list[str]:
    with open(report / "metrics.csv", newline="", encoding="utf-8") as f:
        return [row["name"] for row in csv.DictReader(f)]


def test_every_image_of_the_data_trains_and_every_one_of_the_folder_validates(tmp_path):
    data = write_jurkat_folder(tmp_path / "data")
    val = write_jurkat_folder(tmp_path / "held", layout=[("other", (80, 80))] * 3, seed=1)
    split = folder_split(data, **LAYOUT, val_fraction=0.5, seed=3, save_to=str(tmp_path / "run"), val_dir=val)
    assert len(split["train"]) == 8 and [d["name"] for d in split["val"]] == ["other/001", "other/002", "other/003"]
    assert all(Path(d["image"]).is_relative_to(val) for d in split["val"])
    assert split["all"] == split["train"] + split["val"]
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["val_dir"] == str(val.resolve()) and record["data_dir"] == str(data.resolve())
    assert record["val"] == ["other/001", "other/002", "other/003"] and len(record["train"]) == 8
    assert set(record["sha256"]) == set(record["train"]) | set(record["val"])
    # an exported bundle's evaluate.json finds the recorded validation images again by name
    assert recorded_samples(split, tmp_path / "run" / "split.json") == split["val"]
    with pytest.raises(DataError, match=r"give val_dir the folder it was validated on \(held; dataset_dir the one "
                                        r"it was trained on\)"):
        recorded_samples(folder_split(data, **LAYOUT), tmp_path / "run" / "split.json")


def test_a_validation_folder_that_cannot_be_told_apart_from_the_data_is_refused(tmp_path, caplog):
    data = write_jurkat_folder(tmp_path / "data")
    with pytest.raises(DataError, match=r"the validation folder is the training data folder itself"):
        folder_split(data, **LAYOUT, val_dir=data)
    # the image pattern reaches into a validation folder inside the data: the same images would train and validate
    with pytest.raises(DataError, match=r"found both in the training data .*; 2 such images\): one folder is inside "
                                        r"the other, or links to the same files"):
        folder_split(data, **LAYOUT, val_dir=data / "set_b")
    # links to the training files, in a folder of their own
    links = tmp_path / "links" / "set_c"
    links.mkdir(parents=True)
    for suffix in (".bmp", ".png"):
        (links / f"l001{suffix}").symlink_to(data / "set_a" / f"001{suffix}")
    with pytest.raises(DataError, match=r"l001\.bmp: found both in the training data"):
        folder_split(data, **LAYOUT, val_dir=links.parent)
    # a name of both folders where a training image has the prefixed name too: the prefix tells nothing apart
    write_jurkat_folder(data, layout=[("val/set_b", (80, 80))], seed=2)
    same_names = write_jurkat_folder(tmp_path / "held", layout=[("set_b", (80, 80))], seed=1)
    with pytest.raises(DataError, match=r"001\.bmp: has the name 'set_b/001' of a training image .*rename the "
                                        r"validation images"):
        folder_split(data, **LAYOUT, val_dir=same_names)
    other = write_jurkat_folder(tmp_path / "held2", layout=[("set_a", (80, 80))], seed=1)  # val/set_a/001 is free
    assert [d["name"] for d in folder_split(data, **LAYOUT, val_dir=other)["val"]] == ["val/set_a/001"]
    shutil.rmtree(data / "val")
    # copies under other names are taken, and said
    copies = tmp_path / "copies" / "held"
    copies.mkdir(parents=True)
    for suffix in (".bmp", ".png"):
        shutil.copyfile(data / "set_b" / f"001{suffix}", copies / f"c001{suffix}")
    with caplog.at_level(logging.WARNING, logger="medseg.data"):
        split = folder_split(data, **LAYOUT, save_to=str(tmp_path / "run"), val_dir=copies.parent)
    assert len(split["val"]) == 1
    assert "1 of its 1 validation images are copies of training images, label and all" in caplog.text
    assert "set_b/001.bmp" in caplog.text


def test_isbi_and_dsb_splits_take_a_validation_folder(tmp_path, isbi_stacks):
    data = write_isbi_folder(tmp_path / "isbi", n=4, size=64)
    val = tmp_path / "isbi_val"
    for sub in ("image", "label"):
        (val / sub).mkdir(parents=True)
        for k in (0, 1):
            shutil.copyfile(data / "train" / sub / f"{k}.png", val / sub / f"v{k}.png")
    split = isbi_split(data, val_count=3, val_dir=val)  # val_count is not used with a folder
    assert len(split["train"]) == 4 and [d["name"] for d in split["val"]] == ["v0", "v1"]
    # two challenge stacks of the same file names: the validation slices are named after their folder
    split = isbi_split(isbi_stacks, val_dir=_stacks_copy(isbi_stacks, tmp_path / "stack_val"))
    assert [d["name"] for d in split["val"]] == [f"val/train-volume_{k:03d}" for k in range(3)]
    dsb = write_dsb_folder(tmp_path / "dsb")
    dsb_val = write_dsb_folder(tmp_path / "dsb_val", layout=[("z1", (64, 64), False), ("z2", (64, 64), True)])
    split = dsb_split(dsb, val_dir=dsb_val)
    assert len(split["train"]) == 6 and [d["name"] for d in split["val"]] == ["z1", "z2"]
    assert instance_split(dsb, val_dir=dsb_val)["val"] == split["val"]


def _stacks_copy(stacks: Path, to: Path) -> Path:
    to.mkdir()
    for f in stacks.glob("train-*.tif"):
        shutil.copyfile(f, to / f.name)
    return to


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valdir")
    data = write_jurkat_folder(root / "data")
    val = write_jurkat_folder(root / "held", layout=[("other", (80, 80))] * 2, seed=1)
    out = root / "run"
    os.chdir(root)  # a relative --val-data is recorded as an absolute path
    try:
        result = _invoke("train", JURKAT, "--data", data, "--val-data", "held", "--output", out, "--epochs", 1,
                         "--no-progress", "--device", "cpu", "--no-tracking", *_sets(TINY))
    finally:
        os.chdir(REPO)
    assert result.exit_code == 0, result.output
    return {"data": data, "val": val, "out": out, "output": result.output}


def test_train_says_where_it_validates_and_records_the_folder(run):
    said = [line for line in run["output"].splitlines() if DATA_FOUND.search(line)]
    assert said == [f"{run['data']}: 8 labelled images (images '**/*.bmp', masks '{{stem}}.png') for training; "
                    f"{run['val']}: 2 for validation; the split is recorded in {run['out'] / 'split.json'}"]
    summary = json.loads((run["out"] / "train_summary.json").read_text())
    assert summary["images"] == {"train": 8, "val": 2, "val_dir": str(run["val"])}
    assert json.loads((run["out"] / "config.json").read_text())["val_dir"] == str(run["val"])
    assert json.loads((run["out"] / "split.json").read_text())["val_dir"] == str(run["val"].resolve())


def test_evaluate_on_the_training_data_scores_the_validation_folder(run, tmp_path, caplog):
    base = ("evaluate", JURKAT, "--checkpoint", run["out"] / "model.pt", "--device", "cpu", "--no-progress",
            "--no-tracking", "--no-tta")
    result = _invoke(*base, "--data", run["data"], "--output", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert f"the run trained on all of {run['data']} and validated on {run['val']}" in caplog.text
    caplog.clear()
    assert _rows(tmp_path / "a") == ["other/001", "other/002"]  # the folder's names: no training image's
    # the folder itself: its images, with nothing to warn of
    result = _invoke(*base, "--data", run["val"], "--output", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "scoring" not in caplog.text and _rows(tmp_path / "b") == _rows(tmp_path / "a")
    # the training images are still there to score
    result = _invoke(*base, "--data", run["data"], "--split", "train", "--output", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert len(_rows(tmp_path / "c")) == 8


def test_resume_keeps_the_validation_folder_and_refuses_another(run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    base = ("train", JURKAT, "--data", run["data"], "--output", out, "--no-progress", "--device", "cpu",
            "--no-tracking", *_sets(TINY))
    other = write_jurkat_folder(tmp_path / "other", layout=[("more", (80, 80))] * 2, seed=2)
    line = _error_line(_invoke(*base, "--resume", "--epochs", 2, "--val-data", other))
    assert "another train/validation split" in line and "another data or validation folder" in line
    result = _invoke(*base, "--resume", "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert f"continuing with the run's own val_dir={run['val']}" in caplog.text
    assert f"{run['val']}: 2 for validation" in result.output


def test_an_exported_model_validated_on_a_folder_of_its_own_says_how_to_score_it(run, tmp_path):
    model = tmp_path / "model"
    result = _invoke("export", JURKAT, run["out"] / "model.pt", model)
    assert result.exit_code == 0, result.output
    docs = (model / "docs" / "README.md").read_text()
    assert "medseg evaluate MODEL --data VAL_DIR" in docs and "--dataset_dir DATA_DIR --val_dir VAL_DIR" in docs
    assert "(`held` in training)" in docs
    copy = tmp_path / "data_copy"  # the receiver's copy of the training data, elsewhere
    shutil.copytree(run["data"], copy)
    line = _error_line(_invoke("evaluate", model, "--data", copy, "--device", "cpu", "--no-progress",
                               "--no-tracking", "--output", tmp_path / "e"))
    assert f"the run validated on a folder of its own, {run['val'].resolve()}: give --data that folder" in line
    assert "--split all" not in line
    result = _invoke("evaluate", model, "--data", run["val"], "--device", "cpu", "--no-progress", "--no-tracking",
                     "--output", tmp_path / "v")
    assert result.exit_code == 0, result.output
    assert _rows(tmp_path / "v") == ["other/001", "other/002"]


def test_a_validation_folder_that_is_not_there_or_not_known_to_the_bundle_is_one_line(run, tmp_path):
    base = ("train", JURKAT, "--data", run["data"], "--no-progress", "--device", "cpu", "--no-tracking",
            *_sets(TINY))
    line = _error_line(_invoke(*base, "--output", tmp_path / "a", "--val-data", tmp_path / "nope"))
    assert f"{tmp_path / 'nope'}: validation folder not found; pass --val-data" in line
    assert not (tmp_path / "a").exists()


def _copy_pointing_elsewhere(run: dict[str, Path], to: Path, record: str, folder: Path) -> Path:
    """A copy of the module's run whose ``record`` (split.json, config.json) names ``folder`` as its
    validation folder."""
    shutil.copytree(run["out"], to)
    content = json.loads((to / record).read_text())
    content["val_dir"] = str(folder)
    (to / record).write_text(json.dumps(content))
    return to


def test_the_validation_folder_of_the_evaluated_run_gone_is_named(run, tmp_path):
    out = _copy_pointing_elsewhere(run, tmp_path / "run", "split.json", tmp_path / "moved")
    line = _error_line(_invoke("evaluate", JURKAT, "--data", run["data"], "--checkpoint", out / "model.pt",
                               "--device", "cpu", "--no-progress", "--no-tracking", "--output", tmp_path / "e"))
    assert f"{tmp_path / 'moved'}: the run validated on this folder" in line and "--split train or all" in line


def test_isbi_em_trains_with_a_validation_folder(tmp_path):
    data = write_isbi_folder(tmp_path / "isbi", n=3, size=64)
    val = write_isbi_folder(tmp_path / "isbi_val", n=2, size=64)
    for sub in ("image", "label"):  # named apart from the training slices
        for f in sorted((val / "train" / sub).iterdir()):
            f.rename(f.with_name("v" + f.name))
    result = _invoke("train", REPO / "bundles" / "isbi_em", "--data", data, "--val-data", val, "--output",
                     tmp_path / "run", "--epochs", 1, "--no-progress", "--device", "cpu", "--no-tracking",
                     *_sets([*TINY_NET, "val_interval=1"]))
    assert result.exit_code == 0, result.output
    assert f"{data}: 3 labelled slices for training; {val}: 2 for validation" in result.output


def test_resuming_a_run_whose_validation_folder_is_gone_says_to_put_it_back(run, tmp_path):
    out = _copy_pointing_elsewhere(run, tmp_path / "run", "config.json", tmp_path / "gone")
    line = _error_line(_invoke("train", JURKAT, "--data", run["data"], "--output", out, "--resume", "--epochs", 2,
                               "--no-progress", "--device", "cpu", "--no-tracking", *_sets(TINY)))
    assert line == f"error: {tmp_path / 'gone'}: validation folder not found; put the run's validation folder back " \
                   "there, or give --val-data the folder where it is now, to resume"


def test_a_validation_folder_of_another_layout_is_named_as_such(tmp_path):
    dsb = write_dsb_folder(tmp_path / "dsb")
    other = write_jurkat_folder(tmp_path / "folders", layout=[("images", (64, 64))])
    with pytest.raises(DataError, match=r"folders: no labelled images found in the validation folder as in the "
                                        r"training data \(DSB Kaggle layout: .*\); lay it out as the training data is"):
        instance_split(dsb, val_dir=other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: no labelled images found in the validation folder as in the "
                                        r"training data \(image/ \+ label/ slices, or the ISBI TIFF stacks\)"):
        isbi_split(write_isbi_folder(tmp_path / "isbi", n=2, size=64), val_dir=empty)
    with pytest.raises(DataError, match=r"empty: no labelled images found .* \(images '\*\*/\*\.bmp', masks "):
        folder_split(write_jurkat_folder(tmp_path / "jk"), **LAYOUT, val_dir=empty)


def test_evaluate_without_the_split_record_still_scores_the_validation_folder(run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("model.pt", "config.json"):  # no split.json: config.json says where the run validated
        shutil.copyfile(run["out"] / name, out / name)
    result = _invoke("evaluate", JURKAT, "--data", run["data"], "--checkpoint", out / "model.pt", "--device", "cpu",
                     "--no-progress", "--no-tracking", "--no-tta", "--output", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert _rows(tmp_path / "e") == ["other/001", "other/002"]  # never a training image


@pytest.mark.parametrize(("without_id", "said"), [
    (True, "train.json: has no val_dir id, so --val-data cannot be used with it"),  # a bundle of an earlier version
    (False, "train.json: its datalists does not read @val_dir, so a validation folder would not validate"),
])
def test_a_bundle_whose_split_does_not_read_the_folder_is_refused(run, tmp_path, without_id, said):
    custom = tmp_path / "custom"
    shutil.copytree(JURKAT, custom)
    config = json.loads((custom / "configs" / "train.json").read_text())
    del config["datalists"]["val_dir"]  # the split does not take it (the folder was ignored without a word)
    if without_id:
        del config["val_dir"]
    (custom / "configs" / "train.json").write_text(json.dumps(config))
    line = _error_line(_invoke("train", custom, "--data", run["data"], "--val-data", run["val"], "--output",
                               tmp_path / "b", "--no-progress", "--device", "cpu", "--no-tracking", *_sets(TINY)))
    assert said in line


def test_resume_names_the_validation_folder_for_a_changed_validation_image(run, tmp_path):
    val = tmp_path / "held"
    shutil.copytree(run["val"], val)
    out = tmp_path / "run"
    base = ("train", JURKAT, "--data", run["data"], "--output", out, "--no-progress", "--device", "cpu",
            "--no-tracking", *_sets(TINY))
    assert _invoke(*base, "--val-data", val, "--epochs", 1).exit_code == 0
    shutil.copyfile(val / "other" / "002.png", val / "other" / "001.png")
    line = _error_line(_invoke(*base, "--resume", "--epochs", 2))
    assert line.startswith(f"error: {val}: 1 of the run's images or labels differ") and "other/001" in line


def test_a_home_relative_or_linked_validation_folder_is_recorded_as_given(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "link").symlink_to(run["val"])
    out = tmp_path / "run"
    result = _invoke("train", JURKAT, "--data", run["data"], "--output", out, "--set", "val_dir=~/link",
                     "--epochs", 1, "--no-progress", "--device", "cpu", "--no-tracking", *_sets(TINY))
    assert result.exit_code == 0, result.output
    for name in ("config.json", "split.json"):  # the link, not its target: moving the target keeps the run whole
        assert json.loads((out / name).read_text())["val_dir"] == str(tmp_path / "link")


def test_folders_numbered_alike_are_told_apart_by_the_validation_folders_name(tmp_path, caplog):
    # Cellpose keeps train/ and test/, both numbered from 000: the validation names get the folder's name
    data = write_jurkat_folder(tmp_path / "train", layout=[("set_a", (80, 80))] * 3)
    val = write_jurkat_folder(tmp_path / "test", layout=[("set_a", (80, 80))] * 2, seed=1)
    split = folder_split(data, **LAYOUT, save_to=str(tmp_path / "run"), val_dir=val)
    assert [d["name"] for d in split["val"]] == ["val/set_a/001", "val/set_a/002"]
    assert [d["name"] for d in split["train"]] == ["set_a/001", "set_a/002", "set_a/003"]
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["val"] == ["val/set_a/001", "val/set_a/002"] and record["val_prefix"] == "val/"
    assert set(record["sha256"]) == {*record["train"], *record["val"]}
    # the validation folder read on its own (an exported bundle's evaluate.json on it) finds them by those names
    alone = folder_split(val, **LAYOUT)
    picked = recorded_samples(alone, tmp_path / "run" / "split.json")
    assert [d["name"] for d in picked] == record["val"]
    assert [d["image"] for d in picked] == [d["image"] for d in alone["all"]]
    assert recorded_samples(split, tmp_path / "run" / "split.json") == split["val"]
    # a folder holding the training images (numbered alike) does not stand in for them: never scored as validation
    with pytest.raises(DataError, match=r"none of the 2 val images it names are in the data given"):
        recorded_samples(folder_split(data, **LAYOUT), tmp_path / "run" / "split.json")
    # a validation image edited since is still that image (said as changed where evaluate compares digests)
    shutil.copyfile(val / "set_a" / "001.png", val / "set_a" / "002.png")
    assert [d["name"] for d in recorded_samples(folder_split(val, **LAYOUT), tmp_path / "run" / "split.json")] == \
        record["val"]


def test_evaluate_scores_a_validation_folder_numbered_as_the_data_both_ways(tmp_path):
    data = write_jurkat_folder(tmp_path / "train", layout=[("set_a", (80, 80))] * 4)
    val = write_jurkat_folder(tmp_path / "test", layout=[("set_a", (80, 80))] * 2, seed=1)
    out = tmp_path / "run"
    result = _invoke("train", JURKAT, "--data", data, "--val-data", val, "--output", out, "--epochs", 1,
                     "--no-progress", "--device", "cpu", "--no-tracking", *_sets(TINY))
    assert result.exit_code == 0, result.output
    base = ("evaluate", JURKAT, "--checkpoint", out / "model.pt", "--device", "cpu", "--no-progress",
            "--no-tracking", "--no-tta")
    for given, report in ((data, "a"), (val, "b")):
        result = _invoke(*base, "--data", given, "--output", tmp_path / report)
        assert result.exit_code == 0, result.output
        assert _rows(tmp_path / report) == ["val/set_a/001", "val/set_a/002"]
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()


def test_a_moved_validation_folder_resumes_under_the_names_it_had(tmp_path):
    data = write_jurkat_folder(tmp_path / "train", layout=[("set_a", (80, 80))] * 4)
    val = write_jurkat_folder(tmp_path / "test", layout=[("set_a", (80, 80))] * 2, seed=1)
    out = tmp_path / "run"
    base = ("train", JURKAT, "--data", data, "--output", out, "--no-progress", "--device", "cpu", "--no-tracking",
            *_sets(TINY))
    assert _invoke(*base, "--val-data", val, "--epochs", 1).exit_code == 0
    val.rename(tmp_path / "moved")
    result = _invoke(*base, "--val-data", tmp_path / "moved", "--resume", "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "split.json").read_text())["val"] == ["val/set_a/001", "val/set_a/002"]


def test_ensemble_members_validated_on_other_folders_of_the_same_names_are_refused(tmp_path):
    from medseg.workflows import _recorded_split

    members = []
    for run, folder in (("r1", "held_a"), ("r2", "held_b")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "model.pt").write_bytes(b"")
        record = {"train": ["a"], "val": ["b"], "data_dir": str(tmp_path / "data"), "val_dir": str(tmp_path / folder)}
        (tmp_path / run / "split.json").write_text(json.dumps(record))
        members.append(str(tmp_path / run / "model.pt"))
    with pytest.raises(DataError, match=r"r2/split\.json: this member was trained on another train/validation split"):
        _recorded_split(members)
    assert _recorded_split(members[:1] * 2)["val_dir"] == str(tmp_path / "held_a")
