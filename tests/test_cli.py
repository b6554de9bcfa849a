"""The medseg CLI end to end on synthetic data (Typer's CliRunner), including every bad-input case."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import BUNDLE, DATA_FOUND, REPO, TINY, TINY_NET, synthetic_em, write_isbi_folder
from PIL import Image
from typer.testing import CliRunner

from medseg.bundle import parse_override
from medseg.cli import app

runner = CliRunner()


def _tiny_args(items: list[str] = TINY) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny training run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    data = write_isbi_folder(root / "data", n=4, size=96)
    out = root / "run"
    result = _invoke("train", BUNDLE, "--data", data, "--output", out, "--epochs", 3, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    return {"data": data, "out": out, "root": root, "output": result.output}


def test_info_reports_a_broken_bundle_and_lists_the_others(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "good")
    shutil.copytree(BUNDLE / "configs", tmp_path / ".good.abcd1234.part" / "configs")  # an export being made
    (tmp_path / "bad" / "configs").mkdir(parents=True)
    (tmp_path / "bad" / "configs" / "metadata.json").write_text("{not json")
    result = _invoke("info", "--bundles-dir", tmp_path)
    assert result.exit_code == 0, result.output
    bundles = json.loads(result.output[: result.output.rindex("}") + 1])["bundles"]
    assert bundles["good"]["version"] and "bad/configs/metadata.json: unreadable metadata" in bundles["bad"]["error"]
    assert sorted(bundles) == ["bad", "good"]
    assert "metadata_problem" not in bundles["good"]
    # one that runs but misses fields of MONAI's schema is listed with what to fix
    meta = json.loads((tmp_path / "good" / "configs" / "metadata.json").read_text())
    for field in ("authors", "schema"):  # the model zoo's schema requires the address of its schema too
        broken = {k: v for k, v in meta.items() if k != field}
        (tmp_path / "good" / "configs" / "metadata.json").write_text(json.dumps(broken))
        bundles = json.loads(_invoke("info", "--bundles-dir", tmp_path).output.split("\nnote")[0])["bundles"]
        assert f"'{field}' is a required property" in bundles["good"]["metadata_problem"]


def test_a_bundle_without_name_or_version_is_one_line_error(tmp_path, isbi_folder):
    bundle = tmp_path / "mine"
    shutil.copytree(BUNDLE, bundle)
    for meta, expected in (({}, "no name and no version"), ({"name": "mine"}, "no version"), ([], "not a JSON object"),
                           ({"name": "mine", "version": 1}, "version 1 is not a text"),
                           ({"name": "mine", "version": "  "}, "no version")):
        (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
        for command in (["train", bundle, "--data", isbi_folder, "--output", tmp_path / "o"],
                        ["infer", bundle, isbi_folder, tmp_path / "out"]):
            result = _invoke(*command)
            _assert_one_line_error(result, "mine/configs/metadata.json", expected)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_a_config_file_that_does_not_parse_is_named(tmp_path):
    bundle = tmp_path / "isbi_em"
    shutil.copytree(BUNDLE, bundle)
    (bundle / "configs" / "train.json").write_text('{"a": 1,}')
    result = _invoke("evaluate", bundle, "--data", tmp_path, "--checkpoint", tmp_path / "m.pt")
    assert result.exit_code == 1
    assert "train.json: cannot read config" in result.output and "Traceback" not in result.output


def test_a_config_value_no_component_takes_is_one_line_naming_the_cause(trained, tmp_path):
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", tmp_path / "o", "--no-tracking",
                     "--no-progress", "--device", "cpu", *_tiny_args(), "--set", "images_per_batch=0")
    _assert_one_line_error(result, "a config value does not work", "batch_size=0", "DataLoader", "--set")


def test_a_training_that_cannot_start_leaves_no_folder_it_made(trained, tmp_path):
    # the checks write the split, the config and the MLflow store; a failed start takes them away again, with
    # the folders it made, so the fixed command starts clean; a folder that was there keeps its files
    out = tmp_path / "new" / "o"
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--no-progress", "--device", "cpu",
                     *_tiny_args(), "--set", "images_per_batch=0")
    _assert_one_line_error(result, "a config value does not work", "batch_size=0")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", tmp_path / "kept", "--no-progress",
                     "--device", "cpu", *_tiny_args(), "--set", "images_per_batch=0")
    assert result.exit_code == 1 and (tmp_path / "kept" / "split.json").is_file()


def test_a_training_refused_by_the_lock_leaves_the_other_trainings_files(trained, tmp_path, monkeypatch):
    # two trainings started together into a new folder: the one refused by the lock must not take away what
    # the other (holding the lock) has written
    import contextlib

    import medseg.batch
    from medseg.locking import folder_lock

    out = tmp_path / "new" / "o"
    original, held = medseg.io.check_writable, contextlib.ExitStack()

    def the_other_starts_first(folder):
        out.mkdir(parents=True)
        held.enter_context(folder_lock(out, "train"))
        for name in ("config.json", "split.json", "mlflow.db"):
            (out / name).write_text("the other training's")
        return original(folder)

    monkeypatch.setattr(medseg.io, "check_writable", the_other_starts_first)
    with held:
        result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--no-progress",
                         "--device", "cpu", *_tiny_args())
        _assert_one_line_error(result, "is writing into this folder")
        assert all((out / name).read_text() == "the other training's"
                   for name in ("config.json", "split.json", "mlflow.db"))


def test_a_malformed_yaml_overlay_is_named(tmp_path):
    (tmp_path / "fast.yaml").write_text("learning_rate: [1, 2\n")
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "-c", tmp_path / "fast.yaml")
    _assert_one_line_error(result, "fast.yaml: cannot read config", "fix its JSON/YAML syntax")


def test_info_lists_versions_and_bundles():
    result = _invoke("info", "--bundles-dir", BUNDLE.parent)
    assert result.exit_code == 0
    info = json.loads(result.output)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert info["bundles"]["isbi_em"]["version"] == meta["version"]
    assert info["versions"]["monai"] and "cuda_available" in info["device"]
    # the decoders behind compressed TIFF and DICOM, asked for first when a colleague cannot read a file
    assert info["versions"]["imagecodecs"] and info["versions"]["python-gdcm"] and info["versions"]["pillow"]


def test_info_from_another_folder_lists_the_bundles_that_come_with_medseg(tmp_path):
    os.chdir(tmp_path)  # no bundles/ here: it listed none
    try:
        result = _invoke("info")
    finally:
        os.chdir(REPO)
    assert result.exit_code == 0, result.output
    bundles = json.loads(result.output[: result.output.rindex("}") + 1])["bundles"]
    assert sorted(bundles) == ["isbi_em", "jurkat", "nuclei"]
    assert bundles["isbi_em"]["path"] == str(BUNDLE)


def test_train_writes_checkpoints_curves_split_and_summary(trained):
    out = trained["out"]
    for name in ("model.pt", "curves.png", "history.json", "split.json", "config.json", "train_summary.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("last_checkpoint_epoch=3.pt"))
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3] and history["val_epoch"] == [1, 2, 3]
    assert all(np.isfinite(history["train_loss"]))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == 3 and 0.0 <= summary["best_metric"] <= 1.0
    config = json.loads((out / "config.json").read_text())  # the resolved, overridden config is stored
    assert config["network_def"]["channels"] == [4, 8, 16] and config["max_epochs"] == 3


def test_train_logs_to_local_mlflow_store(trained):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained['out'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["loss_name"] == "weighted_ce" and run.data.params["max_epochs"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "val_mean_dice")) == 3
    assert len(client.get_metric_history(run.info.run_id, "train_loss_epoch")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "curves.png", "config.json", "split.json", "train_summary.json"} <= artifacts


def test_resume_continues_from_last_checkpoint(trained, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 4, "--resume",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3, 4]  # only epoch 4 ran
    assert json.loads((out / "train_summary.json").read_text())["epochs"] == 4
    assert [p.name for p in out.glob("last_checkpoint_epoch=*.pt")] == ["last_checkpoint_epoch=4.pt"]


def test_training_into_a_trained_run_is_refused_unless_resumed_or_overwritten(trained, tmp_path):
    """A second training into a run folder would replace its model.pt at the first validation: refused; with
    --overwrite the old run's checkpoints, history and curves go, and the new run's alone remain."""
    out = tmp_path / "again"
    shutil.copytree(trained["out"], out)
    before = sorted(p.name for p in out.iterdir())
    model = (out / "model.pt").read_bytes()
    args = ("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 2, "--no-progress",
            "--no-tracking", "--device", "cpu", *_tiny_args())
    result = _invoke(*args)
    _assert_one_line_error(result, str(out), "holds a trained run (last_checkpoint_epoch=3.pt, model.pt)",
                           "--resume", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before and (out / "model.pt").read_bytes() == model
    result = _invoke(*args, "--resume", "--overwrite")
    _assert_one_line_error(result, "--resume", "--overwrite", "give one")
    # a bad setting is found before anything is removed, also one found after the split is drawn again
    _assert_one_line_error(_invoke(*args, "--overwrite", "--set", "no_such_key=1"), "no_such_key")
    split = (out / "split.json").read_bytes()
    result = _invoke(*args, "--overwrite", "--set", "val_count=2", "--set", "network_def#strides=[2]")
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == before and (out / "model.pt").read_bytes() == model
    assert (out / "split.json").read_bytes() == split  # the old model's split, not the failed run's
    result = _invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("last_checkpoint_epoch=*.pt")] == ["last_checkpoint_epoch=2.pt"]
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]
    assert json.loads((out / "train_summary.json").read_text())["epochs"] == 2


def test_isbi_em_trains_on_slices_smaller_than_its_patch(tmp_path):
    # crops of a slice under the patch size came out smaller ("stack expects each tensor to be equal size")
    # or of sizes the network cannot take; such slices are mirrored up to the patch, as jurkat and nuclei do
    data = write_isbi_folder(tmp_path / "data", n=2, size=96)
    for k, size in ((2, 40), (3, 44), (4, 30)):  # any two training slices in a batch differ in size
        image, label = synthetic_em(size=size, seed=k)
        Image.fromarray(image).save(data / "train" / "image" / f"{k}.png")
        Image.fromarray(label).save(data / "train" / "label" / f"{k}.png")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "split.json").read_text())["train"] == ["0", "1", "2", "3"]


def test_training_never_replaces_files_of_its_names_that_no_training_wrote(trained, tmp_path):
    """A folder's own config.json or split.json (a project folder, another tool's output) would be replaced by
    the training's record: refused with any flag; a training's own records, also a stopped one's, are not."""
    args = ("train", BUNDLE, "--data", trained["data"], "--epochs", 1, "--no-progress", "--no-tracking",
            "--device", "cpu", *_tiny_args())
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"lr": 0.1}')
    (out / "curves.png").write_bytes(b"mine")
    (out / "history.json").write_text("not json")
    for flags in ((), ("--overwrite",)):
        result = _invoke(*args, "--output", out, *flags)
        _assert_one_line_error(result, str(out), "holds config.json, history.json, curves.png, not written by a "
                               "medseg training", "move them, or choose another --output")
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "curves.png", "history.json"]
        assert (out / "config.json").read_text() == '{"lr": 0.1}'
    # a training stopped before its first checkpoint left only its records: a new one starts there
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("config.json", "split.json", "history.json", "curves.png"):
        shutil.copy2(trained["out"] / name, stopped / name)
    result = _invoke(*args, "--output", stopped)
    assert result.exit_code == 0, result.output
    assert json.loads((stopped / "history.json").read_text())["epoch"] == [1]
    (stopped / "split.json").write_text('{"train": ["0"], "val": ["1"], "source": "curated"}')  # a data set's
    (stopped / "model.pt").unlink()
    for name in stopped.glob("last_checkpoint_epoch=*.pt"):
        name.unlink()
    _assert_one_line_error(_invoke(*args, "--output", stopped, "--overwrite"), "holds split.json, not written by")
    # beside weights, a record cut short (an empty or damaged file) is the run's own: resumed or replaced
    (stopped / "split.json").write_text("")
    result = _invoke(*args, "--output", stopped)
    assert result.exit_code == 0, result.output
    (stopped / "config.json").write_text("{")
    result = _invoke(*args, "--output", stopped, "--overwrite")
    assert result.exit_code == 0, result.output
    # but a readable file of another kind is not the run's, weights or not
    (stopped / "config.json").write_text('{"project": "x"}')
    for flags in (("--overwrite",), ("--resume", "--epochs", "3")):
        _assert_one_line_error(_invoke(*args, "--output", stopped, *flags), "holds config.json, not written by a "
                               "medseg training", "move it, or choose another --output")
    assert (stopped / "config.json").read_text() == '{"project": "x"}'


def _mlflow_runs(out: Path) -> list[tuple[str, str, str | None]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em")
    return sorted((r.info.run_name, r.info.status, r.data.params.get("max_epochs"))
                  for r in client.search_runs([experiment.experiment_id]))


def _training_that_fails_on_a_label(tmp_path: Path) -> tuple[tuple, Path, bytes]:
    """(train arguments without --output, the label that fails it during the run, that label's good bytes)."""
    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    label = data / "train" / "label" / "0.png"
    good = label.read_bytes()
    label.write_bytes(b"not a png")
    args = ("train", BUNDLE, "--data", data, "--no-progress", "--device", "cpu", *_tiny_args(),
            "--set", "train#dataset#cache_rate=0", "--set", "validate#dataset#cache_rate=0")
    return args, label, good


def test_a_training_stopped_by_an_error_is_a_failed_run_and_the_next_one_a_new_run(tmp_path):
    args, label, good = _training_that_fails_on_a_label(tmp_path)
    out = tmp_path / "run"
    args = (*args, "--output", out)
    _assert_one_line_error(_invoke(*args, "--epochs", 1), "0.png")  # met during the run, not before it
    assert _mlflow_runs(out) == [("run", "FAILED", "1")]
    label.write_bytes(good)
    # another epoch count: continuing the failed run would have been refused by MLflow (a changed param)
    result = _invoke(*args, "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert _mlflow_runs(out) == [("run", "FINISHED", "2"), ("run (replaced)", "FAILED", "1")]


def test_a_killed_run_is_closed_by_the_next_training_also_after_the_folder_moved(tmp_path):
    import mlflow

    args, label, good = _training_that_fails_on_a_label(tmp_path)
    args = (*args, "--epochs", 1)
    out = tmp_path / "first"
    _assert_one_line_error(_invoke(*args, "--output", out), "0.png")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    client.update_run(run.info.run_id, status="RUNNING")  # as a killed training leaves it
    moved = tmp_path / "second"
    out.rename(moved)
    label.write_bytes(good)
    result = _invoke(*args, "--output", moved)
    assert result.exit_code == 0, result.output
    assert _mlflow_runs(moved) == [("first (replaced)", "FAILED", "1"), ("second", "FINISHED", "1")]


def test_a_moved_run_folder_logs_into_its_own_mlflow_store(trained, tmp_path):
    """The store records its artifact folder as an absolute path: a moved (or copied) run folder must not
    write into, or recreate, the folder it came from, and its earlier runs' artifacts must be found."""
    import mlflow

    moved = tmp_path / "moved"
    shutil.copytree(trained["out"], tmp_path / "was")
    (tmp_path / "was").rename(moved)
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", moved, "--epochs", 1, "--overwrite",
                     "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "was").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{moved / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em")
    assert experiment.artifact_location == (moved / "mlruns").resolve().as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for run in runs:  # the earlier run's too: it moved with the folder
        assert run.info.artifact_uri.startswith(experiment.artifact_location + "/")
        assert "model.pt" in [a.path for a in client.list_artifacts(run.info.run_id)]
    from medseg.tracking import _follow_moved_store

    (tmp_path / "empty.db").write_bytes(b"")
    _follow_moved_store(tmp_path / "empty.db")  # an empty store is MLflow's to set up, not an error


@pytest.mark.parametrize("status", ["RUNNING", "FINISHED"])
def test_a_shared_tracking_store_keeps_apart_folders_of_the_same_name(tmp_path, monkeypatch, status):
    """Another folder's run of the same name (e.g. `--output run` from another directory) is neither
    continued nor retired: this training's run takes a name of its own (so that a later --resume of
    either folder finds its own run), and gets its own files."""
    import mlflow

    write_isbi_folder(tmp_path / "d", n=3, size=48)
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("medseg-isbi_em", artifact_location=(tmp_path / "artifacts").as_uri())
    other = client.create_run(experiment, run_name="run")
    client.log_param(other.info.run_id, "output_dir", str(tmp_path / "elsewhere" / "run"))
    if status == "FINISHED":
        client.set_terminated(other.info.run_id, status)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = _invoke("train", BUNDLE, "--data", "../d", "--output", "run", "--epochs", 1, "--no-progress",
                     "--device", "cpu", "--tracking-uri", uri, *_tiny_args())
    assert result.exit_code == 0, result.output
    runs = {r.info.run_id: r for r in client.search_runs([other.info.experiment_id])}
    assert (runs[other.info.run_id].info.run_name, runs[other.info.run_id].info.status) == ("run", status)
    (ours,) = [r for r in runs.values() if r.info.run_id != other.info.run_id]
    assert ours.info.run_name.startswith("run-") and ours.info.status == "FINISHED"
    assert ours.data.params["output_dir"] == str(tmp_path / "here" / "run")
    assert ours.data.params["dataset_dir"] == str(tmp_path / "here" / ".." / "d")  # absolute, as config.json has it
    assert "train_summary.json" in [a.path for a in client.list_artifacts(ours.info.run_id)]
    assert client.list_artifacts(other.info.run_id) == []


def test_the_first_open_lock_takes_the_stores_own_file_and_never_stops_a_store(tmp_path, monkeypatch):
    import errno
    import fcntl

    from medseg.tracking import _check_tracking_uri, _first_open

    monkeypatch.chdir(tmp_path)
    with _first_open("sqlite:///:memory:"):
        pass
    with _first_open(f"sqlite:///{tmp_path / 'q.db'}?timeout=30"):  # the file, not one named with the query
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.db"]

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a share without a lock daemon: the store works unlocked
    _check_tracking_uri(f"sqlite:///{tmp_path / 'nfs.db'}")
    assert (tmp_path / "nfs.db").stat().st_size > 0


def test_a_full_disk_at_the_stores_first_read_is_said_as_such(tmp_path, monkeypatch):
    # it was "cannot be read (...database or disk is full); check that the server runs", for a local file
    import sqlite3

    from medseg import tracking
    from medseg.errors import MedsegError

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(tracking, "_runs_named", full)
    with pytest.raises(MedsegError) as caught:
        tracking._run_name(f"sqlite:///{tmp_path / 'mlflow.db'}", "medseg-isbi_em", tmp_path / "run")
    assert "the tracking database cannot write (database or disk is full); free disk space" in str(caught.value)
    assert "server" not in str(caught.value)


def test_trainings_started_together_on_a_new_sqlite_store_all_track(tmp_path):
    # MLflow creates a new store's tables on first use; trainings started at once on one new store (an
    # ensemble's seeds) raced there and all but one failed ("duplicate column name: step", "table ... already
    # exists"). Three processes open the store as a training does before it starts
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    code = f"from medseg.tracking import _check_tracking_uri; _check_tracking_uri({uri!r}, 'MLFLOW_TRACKING_URI')"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    failed = [err[-300:] for p in procs if (err := p.communicate(timeout=120)[1]) and p.returncode]
    assert not failed, failed


def test_mlflow_tracking_uri_in_the_environment_is_the_default_store_and_never_splits_a_run(tmp_path, monkeypatch):
    """MONAI's handler prefers MLFLOW_TRACKING_URI to the URI it is given: a run with --tracking-uri went to
    the variable's store, and one without it logged there while medseg kept its books (run name, resume) in the
    folder's own store, so a resume started a second run."""
    import mlflow

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    env_uri, given_uri = f"sqlite:///{tmp_path / 'env.db'}", f"sqlite:///{tmp_path / 'given.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    args = ("--no-progress", "--device", "cpu", *_tiny_args(), "--set", "val_interval=1")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "a", "--epochs", 1,
                     "--tracking-uri", given_uri, *args)
    assert result.exit_code == 0, result.output
    assert os.environ["MLFLOW_TRACKING_URI"] == env_uri  # as it was
    assert [r.info.run_name for r in mlflow.MlflowClient(tracking_uri=given_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=given_uri).get_experiment_by_name("medseg-isbi_em").experiment_id])] == ["a"]
    assert mlflow.MlflowClient(tracking_uri=env_uri).get_experiment_by_name("medseg-isbi_em") is None

    for epochs, extra in ((1, ()), (2, ("--resume",))):
        result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "b", "--epochs", epochs, *extra,
                         *args)
        assert result.exit_code == 0, result.output
    assert not (tmp_path / "b" / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=env_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert run.info.run_name == "b" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2]
    recorded = json.loads((tmp_path / "b" / "config.json").read_text())["_tracking_"]
    assert recorded["tracking_uri"] == env_uri and recorded["tracking_store"] == "given"


def test_mlflow_tracking_uri_of_no_server_names_the_variable(tmp_path, monkeypatch):
    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    _assert_one_line_error(result, "MLFLOW_TRACKING_URI http://127.0.0.1:9: no MLflow server answers there",
                           "--no-tracking")


@pytest.mark.parametrize("code", ["INTERNAL_ERROR", "RESOURCE_DOES_NOT_EXIST"])  # gone; the run deleted in the UI
def test_a_tracking_store_failing_mid_run_is_one_warning_and_the_training_goes_on(tmp_path, monkeypatch, caplog,
                                                                                   code):
    """A server gone away mid-run: each MLflow call stalled for minutes of retries, then the training ended
    with "a config value does not work (ConnectionRefusedError ...)", without its summary or curves."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    real, metric_calls, after = mlflow.MlflowClient.log_batch, [], []

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            metric_calls.append(run_id)
        if len(metric_calls) >= 3:  # epoch 2's: the server has gone
            after.append(run_id)
            raise MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with "
                                  "exception HTTPConnectionPool: Max retries exceeded (Connection refused)",
                                  error_code=getattr(databricks_pb2, code))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 4, "--no-progress",
                     "--device", "cpu", *_tiny_args(), "--set", "val_interval=1")
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "tracking stops here" in r.getMessage()]
    assert len(said) == 1 and "MlflowException: API request" in said[0]
    assert len(after) == 1  # neither handler asked the store again
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["epoch"] == history["val_epoch"] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "train_summary.json").is_file() and (tmp_path / "run" / "curves.png").is_file()


def test_a_tracking_call_the_store_refuses_or_a_bug_still_fails_the_training(tmp_path, monkeypatch):
    import mlflow

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)

    def broken(self, *args, **kwargs):
        raise TypeError("a bug in an output transform")

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", broken)
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 1 and "a bug in an output transform" in result.output, result.output


def test_a_run_deleted_in_the_ui_mid_run_leaves_the_training_untracked(tmp_path, monkeypatch, caplog):
    # the evaluator's handler starts at each validation and looks its run up: the deleted run ended the training
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    real, calls = mlflow.MlflowClient.get_run, []

    def get_run(self, run_id):
        calls.append(run_id)
        if len(calls) >= 4:
            raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return real(self, run_id)

    monkeypatch.setattr(mlflow.MlflowClient, "get_run", get_run)
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 4, "--no-progress",
                     "--device", "cpu", *_tiny_args(), "--set", "val_interval=1")
    assert result.exit_code == 0, result.output
    assert len([r for r in caplog.records if "tracking stops here" in r.getMessage()]) == 1
    assert json.loads((tmp_path / "run" / "history.json").read_text())["val_epoch"] == [1, 2, 3, 4]


def test_a_param_the_store_refuses_while_the_run_opens_still_fails_the_training(tmp_path, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)

    def refused(self, run_id, metrics=(), params=(), *args, **kwargs):
        raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", refused)
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 1 and "Changing param values is not allowed" in result.output, result.output


def test_closing_runs_after_a_second_ctrl_c_asks_a_server_once():
    from types import SimpleNamespace

    from medseg.tracking import close_runs

    seen = []

    class Handler:
        failed: list = []

        def __init__(self, run_id):
            self.cur_run = SimpleNamespace(info=SimpleNamespace(run_id=run_id))

        def close(self):
            seen.append((self.cur_run.info.run_id, os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
                         self.run_finish_status))

    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    close_runs([Handler("r1"), Handler("r1")], "KILLED", at_once=True)  # the trainer's and the evaluator's
    close_runs([Handler("r2")], "FAILED")
    assert seen == [("r1", "0", "KILLED"), ("r2", before, "FAILED")]
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before


def test_resume_continues_the_recorded_mlflow_run_by_its_id(tmp_path):
    """A run was found by its name and folder: in a shared store, a moved folder's resume started a second
    run, and another machine's unfinished run of the same path took the resumed epochs."""
    import mlflow

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ("--no-progress", "--device", "cpu", "--tracking-uri", uri, *_tiny_args(), "--set", "val_interval=1")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "em1", "--epochs", 1, *args)
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medseg-isbi_em").experiment_id
    (ours,) = client.search_runs([experiment])
    assert json.loads((tmp_path / "em1" / "config.json").read_text())["_tracking_"]["run_id"] == ours.info.run_id
    # the same path's run on another machine, unfinished and newer
    other = client.create_run(experiment, run_name="em1")
    client.log_param(other.info.run_id, "output_dir", str((tmp_path / "moved").resolve()))
    shutil.move(tmp_path / "em1", tmp_path / "moved")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "moved", "--epochs", 2, "--resume", *args)
    assert result.exit_code == 0, result.output
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert set(runs) == {ours.info.run_id, other.info.run_id}
    assert [m.step for m in client.get_metric_history(ours.info.run_id, "train_loss_epoch")] == [1, 2]
    assert [m.step for m in client.get_metric_history(ours.info.run_id, "val_mean_dice")] == [1, 2]
    assert runs[ours.info.run_id].info.status == "FINISHED" and runs[ours.info.run_id].info.run_name == "em1"
    assert client.get_metric_history(other.info.run_id, "train_loss_epoch") == []
    assert runs[other.info.run_id].info.status == "RUNNING"
    # a copy of the run folder beside its original starts a run of its own rather than take the original's
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "copy", "--epochs", 3, "--resume", *args)
    assert result.exit_code == 0, result.output
    assert [m.step for m in client.get_metric_history(ours.info.run_id, "train_loss_epoch")] == [1, 2]
    (copied,) = set(r.info.run_id for r in client.search_runs([experiment])) - set(runs)
    assert [m.step for m in client.get_metric_history(copied, "train_loss_epoch")] == [3]
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["_tracking_"]["run_id"] == copied


def test_resume_without_a_recorded_run_id_or_with_a_moved_folder_finds_its_own_run(tmp_path, monkeypatch):
    """Runs recorded before their id was: continued by name, but only from their own folder (a copy beside
    the original starts its own); a moved folder whose old path holds a new training keeps its run; a run
    started untracked and resumed with MLFLOW_TRACKING_URI starts a run, not another folder's of its name."""
    import mlflow

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ("--no-progress", "--device", "cpu", "--tracking-uri", uri, *_tiny_args())
    client = mlflow.MlflowClient(tracking_uri=uri)

    def train(folder, epochs, *extra):
        result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / folder, "--epochs", epochs,
                         *extra, *args)
        assert result.exit_code == 0, result.output
        config = json.loads((tmp_path / folder / "config.json").read_text())
        return config.get("_tracking_", {}).get("run_id")

    def steps(run_id):
        return [m.step for m in client.get_metric_history(run_id, "train_loss_epoch")]

    old = train("old", 1)  # as an earlier version recorded it: no id, no folder tag
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["_tracking_"]["run_id"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    client.delete_tag(old, "medseg.output_dir")
    shutil.copytree(tmp_path / "old", tmp_path / "old_copy")
    assert train("old_copy", 2, "--resume") != old and steps(old) == [1]
    assert train("old", 2, "--resume") == old and steps(old) == [1, 2]

    first = train("a/run1", 1)
    shutil.move(tmp_path / "a" / "run1", tmp_path / "b" / "run1")
    second = train("a/run1", 1)  # a new training where the moved one was
    assert train("b/run1", 2, "--resume") == first and steps(first) == [1, 2] and steps(second) == [1]

    plain = ("--no-progress", "--device", "cpu", *_tiny_args())
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "u" / "run2", "--epochs", 1,
                     "--no-tracking", *plain)
    assert result.exit_code == 0, result.output
    elsewhere = client.create_run(client.get_experiment_by_name("medseg-isbi_em").experiment_id, run_name="run2")
    client.log_param(elsewhere.info.run_id, "output_dir", str(tmp_path / "elsewhere" / "run2"))  # left RUNNING
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "u" / "run2", "--epochs", 2, "--resume",
                     *plain)
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "u" / "run2" / "config.json").read_text())["_tracking_"]["run_id"]
    assert steps(resumed) == [2] and steps(elsewhere.info.run_id) == []


def test_an_unreachable_tracking_server_is_one_line_at_once(tmp_path):
    import time

    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    start = time.perf_counter()
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                     "--device", "cpu", "--tracking-uri", "http://127.0.0.1:9", *_tiny_args())
    _assert_one_line_error(result, "--tracking-uri http://127.0.0.1:9: no MLflow server answers there",
                           "--no-tracking")
    assert time.perf_counter() - start < 60  # not MLflow's minutes of retries


def test_a_folder_another_command_is_writing_into_is_refused(trained, tmp_path):
    """Two trainings (or batches) into one folder would overwrite each other's checkpoints and records."""
    from medseg.locking import folder_lock

    out = tmp_path / "busy"
    out.mkdir()
    with folder_lock(out, "train"):
        result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 1,
                         "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args())
        _assert_one_line_error(result, str(out), "medseg train (process", "is writing into this folder",
                               "wait for it to end")
        result = _invoke("infer", BUNDLE, trained["data"] / "train" / "image", out, "--checkpoint",
                         trained["out"] / "model.pt", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
        _assert_one_line_error(result, str(out), "medseg train (process", "is writing into this folder")
    assert [p.name for p in out.iterdir()] == []  # nothing written
    result = _invoke("infer", BUNDLE, trained["data"] / "train" / "image", out, "--checkpoint",
                     trained["out"] / "model.pt", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output  # free again


def test_files_an_interrupted_overwrite_set_aside_are_put_back(trained, tmp_path):
    """A process killed during --overwrite's checks leaves the old run's split beside the new one's: the
    next training in the folder puts it back first (the weights there were trained on it)."""
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    old = (out / "split.json").read_bytes()
    (out / ".split.json.replaced").write_bytes(old)
    (out / "split.json").write_text('{"train": ["0"], "val": ["1", "2", "3"]}')
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--no-progress", "--device", "cpu",
                     *_tiny_args())
    _assert_one_line_error(result, "holds a trained run")
    assert (out / "split.json").read_bytes() == old and not (out / ".split.json.replaced").exists()


def test_a_tracking_failure_after_training_is_a_warning(tmp_path, isbi_folder, monkeypatch):
    from medseg import tracking as mlflow_tracking

    def fail(*args, **kwargs):
        raise RuntimeError("server gone")

    monkeypatch.setattr(mlflow_tracking, "_log_late_artifacts", fail)
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "run", "--epochs", 1,
                     "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.pt").is_file()


def test_a_resumed_run_logged_with_a_relative_folder_gets_no_second_folder_param(tmp_path):
    import mlflow

    from medseg.tracking import _params_beside

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e"), run_name="r")
    client.log_param(run.info.run_id, "output_dir", "runs/r")
    client.log_param(run.info.run_id, "max_epochs", "3")
    params = _params_beside({"output_dir": str(tmp_path / "runs" / "r"), "max_epochs": 5},
                            client.get_run(run.info.run_id).data.params)
    assert params == {"max_epochs.resume1": 5}


def test_a_refused_resume_leaves_the_finished_mlflow_run_as_it_was(trained, tmp_path):
    # the run was reopened (marked KILLED, its end time rewritten) before the length was found already reached
    import mlflow

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")

    def run_info():
        experiment = client.get_experiment_by_name("medseg-isbi_em").experiment_id
        return [(r.info.status, r.info.end_time) for r in client.search_runs([experiment])]

    before = run_info()
    assert [status for status, _ in before] == ["FINISHED"]
    _assert_one_line_error(_invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume",
                                   "--epochs", 3, "--no-progress", "--device", "cpu", *_tiny_args()),
                           "has trained 3 epochs and the run is set to 3")
    assert run_info() == before


def test_a_store_failing_while_the_run_to_continue_is_looked_up_stops_the_resume(trained, tmp_path, monkeypatch):
    # a server erring once it had answered the first check: the resume opened a second run for the same training
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em").experiment_id
    before = [(r.info.run_id, r.info.status) for r in client.search_runs([experiment])]

    def unavailable(self, run_id):
        raise MlflowException("the server is busy", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(mlflow.MlflowClient, "get_run", unavailable)
    _assert_one_line_error(_invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume",
                                   "--epochs", 4, "--no-progress", "--device", "cpu", *_tiny_args()),
                           "the MLflow store failed while looking up the run to continue (the server is busy)",
                           "resume again once it answers, or with --no-tracking")
    monkeypatch.undo()
    assert [(r.info.run_id, r.info.status) for r in client.search_runs([experiment])] == before
    assert not list(out.glob("last_checkpoint_epoch=4.pt"))


def test_an_artifact_folder_that_cannot_be_written_still_ends_the_mlflow_run(trained, tmp_path, caplog,
                                                                            monkeypatch):
    # a server whose artifact root is its own path: the files failed, the run was left RUNNING for good, and the
    # warning said the whole store had failed
    import errno

    import mlflow

    def refused(self, run_id, local_path, artifact_path=None):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", "/srv/mlflow/artifacts")

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", refused)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 1, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("MLflow could not store the run's files at "), warnings
    assert "/srv/mlflow/artifacts" in warnings[0] and "tracking stops here" not in caplog.text
    assert "could not log" not in caplog.text  # the late files are not tried again
    assert (out / "curves.png").is_file() and (out / "model.pt").is_file()


def test_resume_finishes_a_run_killed_after_its_last_epoch(trained, tmp_path, caplog, monkeypatch):
    # killed after its last checkpoint, before its summary: --resume refused ("has trained 3 epochs"), so the
    # run could only be finished by training more epochs
    import mlflow

    from medseg.handlers import TrainingCurves

    plotted, plot = [], TrainingCurves.plot

    def recorded(self, engine=None):  # what curves.png is drawn from: it was blank, no epoch having run
        plotted.append(json.loads(json.dumps(self.history)))
        return plot(self, engine)

    monkeypatch.setattr(TrainingCurves, "plot", recorded)

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    (out / "train_summary.json").unlink()
    (out / "curves.png").unlink()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em").experiment_id
    (run,) = client.search_runs([experiment])
    client.update_run(run.info.run_id, status="RUNNING")  # as a kill leaves it
    weights = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    history = (out / "history.json").read_text()
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume", "--epochs", 3,
                     "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert "finishing it without training" in caplog.text
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == weights
    assert (out / "history.json").read_text() == history
    assert json.loads((out / "train_summary.json").read_text())["epochs"] == 3 and (out / "curves.png").stat().st_size
    assert plotted == [json.loads(history)] and len(plotted[0]["epoch"]) == 3 and plotted[0]["val"]
    assert [(r.info.run_id, r.info.status) for r in client.search_runs([experiment])] == [(run.info.run_id, "FINISHED")]
    # finished now: a further --resume of the same length is refused as before
    _assert_one_line_error(_invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume",
                                   "--epochs", 3, "--no-progress", "--device", "cpu", *_tiny_args()),
                           "has trained 3 epochs and the run is set to 3")


def test_resume_keeps_the_runs_own_split_of_the_same_images_drawn_otherwise_now(trained, tmp_path, caplog,
                                                                              monkeypatch):
    # a medseg version that groups the data otherwise (nuclei's stage1_train/ read with its manifest) drew
    # another split of the same images, and the resume was refused with a fix that could not work
    import monai.data

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    record = json.loads((out / "split.json").read_text())
    assert record["train"] == ["0", "1", "2"] and record["val"] == ["3"]
    record["train"], record["val"] = ["0", "1", "3"], ["2"]  # as an earlier version might have drawn it
    (out / "split.json").write_text(json.dumps(record))
    used, made = [], monai.data.CacheDataset.__init__

    def seen(self, data, *args, **kwargs):
        used.append([d["name"] for d in data])
        made(self, data, *args, **kwargs)

    monkeypatch.setattr(monai.data.CacheDataset, "__init__", seen)
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume", "--epochs", 4,
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert "the run goes on with its own split, from its split.json" in caplog.text
    assert used == [["0", "1", "3"], ["2"]]  # trained and validated on the recorded sets
    after = json.loads((out / "split.json").read_text())
    assert after["train"] == ["0", "1", "3"] and after["val"] == ["2"]
    # a split asked for now, by a part of the drawing too, is refused rather than overruled by the record
    for asked in ("val_count=2", "datalists#val_count=2"):
        _assert_one_line_error(_invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume",
                                       "--epochs", 5, "--no-progress", "--no-tracking", "--device", "cpu",
                                       *_tiny_args(), "--set", asked), "another train/validation split")
    # a seed the drawing does not read (isbi_em holds out the last slices) asks for no other split
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume", "--epochs", 5,
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(), "--set", "seed=5")
    assert result.exit_code == 0, result.output
    # nor does the run's own value given by a part of the drawing
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume", "--epochs", 6,
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(),
                     "--set", "datalists#val_count=1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "split.json").read_text())["val"] == ["2"]


def test_resume_keeps_the_runs_length_split_and_needs_epochs_left(trained, tmp_path, caplog):
    """As the interrupt message says it: --resume alone continues the run as it was set, not the bundle's
    150 epochs; on its own split; and a length already reached is one line, not Ignite's traceback."""
    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    config = json.loads((out / "config.json").read_text())
    config["max_epochs"] = 4  # as if the run had been started with --epochs 4 and stopped after 3
    (out / "config.json").write_text(json.dumps(config))
    args = ("train", BUNDLE, "--data", trained["data"], "--output", out, "--resume", "--no-progress",
            "--no-tracking", "--device", "cpu", *_tiny_args())
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2, 3, 4]
    _assert_one_line_error(_invoke(*args, "--epochs", 2), "--resume: last_checkpoint_epoch=4.pt has trained 4 "
                           "epochs and the run is set to 2", "--epochs above 4")
    _assert_one_line_error(_invoke(*args, "--epochs", 4), "has trained 4 epochs and the run is set to 4")
    # another split (here: another number of validation slices) is refused, the record kept
    split = (out / "split.json").read_bytes()
    _assert_one_line_error(_invoke(*args, "--epochs", 6, "--set", "val_count=2"), "split.json",
                           "another train/validation split", "--overwrite instead of --resume")
    assert (out / "split.json").read_bytes() == split
    # the same names with other pixels (another copy of the data, an image edited since) are refused too
    assert sorted(json.loads(split)["sha256"]) == ["0", "1", "2", "3"]
    data = tmp_path / "edited"
    shutil.copytree(trained["data"], data)
    Image.fromarray(synthetic_em(size=96, seed=42)[0]).save(data / "train" / "image" / "2.png")
    _assert_one_line_error(_invoke(*args[:3], data, *args[4:], "--epochs", 6),
                           f"{data}: 1 of the run's images or labels differ from those it was trained on (first: 2)",
                           "--overwrite instead of --resume")
    assert (out / "split.json").read_bytes() == split
    # without its record the split cannot be checked: said, not passed over
    (out / "split.json").unlink()
    with caplog.at_level("WARNING"):
        result = _invoke(*args, "--epochs", 5)
    assert result.exit_code == 0, result.output
    assert "the run's split.json was missing or unreadable" in caplog.text


@pytest.mark.parametrize("damage", ["other network", "truncated"])
def test_resume_from_an_unusable_last_checkpoint_is_one_line(trained, tmp_path, damage):
    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    extra = []
    if damage == "truncated":
        last = next(out.glob("last_checkpoint_epoch=*.pt"))
        last.write_bytes(last.read_bytes()[:500])
    else:
        extra = ["--set", "network_def#channels=[8,16,32]"]
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 4, "--resume",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(), *extra)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "cannot resume: " in errors[0] and "last_checkpoint_epoch=3.pt" in errors[0]
    assert "start anew with --overwrite instead of --resume" in errors[0]
    # resuming with other settings cannot help a truncated file
    assert ("resume with the settings the run was started with" in errors[0]) == (damage == "other network")
    # a refused resume leaves the run's record as it was
    assert (out / "split.json").read_bytes() == (trained["out"] / "split.json").read_bytes()
    assert (out / "config.json").read_bytes() == (trained["out"] / "config.json").read_bytes()


def test_resume_refuses_settings_its_checkpoint_would_overrule_and_another_bundle(trained, tmp_path):
    """The checkpoint's optimizer (its learning rate) and epoch length would silently win over a --set given at
    resume, while the run's records said the new value: refused, the run left as it was. So is a resume with
    another bundle than the run's."""
    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    args = ("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 4, "--resume", "--no-progress",
            "--no-tracking", "--device", "cpu", *_tiny_args())
    record = (out / "config.json").read_bytes()
    _assert_one_line_error(_invoke(*args, "--set", "learning_rate=0.00001"),
                           "--resume: the optimizer's learning rate is 1e-05 now and 0.001 in "
                           "last_checkpoint_epoch=3.pt", "start anew with --overwrite instead of --resume")
    _assert_one_line_error(_invoke(*args, "--set", "images_per_batch=1"),
                           "--resume: an epoch is 3 batches now and 2 in last_checkpoint_epoch=3.pt",
                           "start anew with --overwrite instead of --resume")
    jurkat = REPO / "bundles" / "jurkat"
    _assert_one_line_error(_invoke("train", jurkat, *args[2:11]), f"{out / 'config.json'}: the run was started with "
                           "the bundle 'ISBI 2012 EM membrane segmentation'", "resume it with that bundle")
    assert (out / "config.json").read_bytes() == record
    assert [p.name for p in out.glob("last_checkpoint_epoch=*.pt")] == ["last_checkpoint_epoch=3.pt"]
    result = _invoke(*args, "--set", "learning_rate=0.001")  # the run's own value, given again: resumed
    assert result.exit_code == 0, result.output


def test_a_resume_compares_optimizer_settings_not_what_a_schedule_moves(tmp_path):
    """One-cycle and cyclic schedules move momenta (and the rate) at every step: an unchanged run resumes; a
    weight decay or initial rate given otherwise is refused, and so is a rate without a schedule."""
    import torch

    from medseg.errors import ConfigValueError
    from medseg.runfolder import check_resumed_state

    def built(decay=0.0, rate=0.01, schedule=True):
        net = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=rate, weight_decay=decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rate, total_steps=20) if schedule else None
        return net, optimizer, scheduler

    last = tmp_path / "last_checkpoint_epoch=2.pt"
    for schedule in (True, False):
        net, optimizer, scheduler = built(schedule=schedule)
        for _ in range(5):
            net(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        saved = {"optimizer": optimizer.state_dict(), "trainer": {"epoch_length": 3, "iteration": 6},
                 **({"lr_scheduler": scheduler.state_dict()} if scheduler is not None else {})}
        check_resumed_state(saved, built(schedule=schedule)[1], 3, last)  # the same settings: resumed
        with pytest.raises(ConfigValueError, match="weight_decay is 0.1 now and 0 in last_checkpoint_epoch=2.pt"):
            check_resumed_state(saved, built(decay=0.1, schedule=schedule)[1], 3, last)
        with pytest.raises(ConfigValueError, match="the optimizer's learning rate is 0.0\\d+ now and 0.0"):
            check_resumed_state(saved, built(rate=0.02, schedule=schedule)[1], 3, last)
        with pytest.raises(ConfigValueError, match="an epoch is 4 batches now and 3"):
            check_resumed_state(saved, built(schedule=schedule)[1], 4, last)


@pytest.mark.parametrize("step", [3, 1], ids=["in epoch 2", "in epoch 1"])
def test_ctrl_c_ends_training_through_its_normal_end(tmp_path, isbi_folder, monkeypatch, step):
    # Ctrl-C (SIGINT) at a training step: training stops after it, the run folder and the MLflow run are
    # complete (KILLED, which --resume continues), and the command ends with one line and exit code 130.
    # The tiny data make 2 steps per epoch: step 3 is in epoch 2, step 1 in epoch 1 (nothing to resume).
    import os
    import signal

    import mlflow
    from ignite.engine import Events

    from medseg import workflows

    original = workflows._check_batches

    def press_ctrl_c(trainer, data_dir, *rest):
        original(trainer, data_dir, *rest)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=step), lambda _: os.kill(os.getpid(), signal.SIGINT))

    monkeypatch.setattr(workflows, "_check_batches", press_ctrl_c)
    out = tmp_path / "run"
    args = ("--data", isbi_folder, "--output", out, "--no-progress", "--device", "cpu", *_tiny_args(),
            "--set", "images_per_batch=2")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or "ignored" in a background job
    result = _invoke("train", BUNDLE, "--epochs", 5, *args)
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert "KeyboardInterrupt" not in result.output  # no traceback of the interrupt
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    summary = json.loads((out / "train_summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"
    if step == 1:
        assert lines == [f"error: interrupted; no epoch finished, so {out} holds nothing to resume; start the "
                         "training again"]
        assert summary["interrupted"] is True and summary["epochs"] == 0
        # starting again is a new MLflow run, not a continuation of the stopped one, which stays as it was
        monkeypatch.setattr(workflows, "_check_batches", original)
        result = _invoke("train", BUNDLE, "--epochs", 1, *args)
        assert result.exit_code == 0, result.output
        runs = sorted((r.info.run_name, r.info.status) for r in client.search_runs([experiment.experiment_id]))
        assert runs == [("run", "FINISHED"), ("run (replaced)", "KILLED")]
        return
    assert lines == [f"error: interrupted; last_checkpoint_epoch=1.pt holds the last finished epoch; continue with "
                     f"--resume --output {out}"]
    assert summary["interrupted"] is True and summary["epochs"] == 1
    monkeypatch.setattr(workflows, "_check_batches", original)
    result = _invoke("train", BUNDLE, "--epochs", 3, "--resume", *args)
    assert result.exit_code == 0, result.output
    (run,) = client.search_runs([experiment.experiment_id])  # the same run, continued and now finished
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2, 3]


@pytest.mark.parametrize(("epochs", "validated"), [(3, [2, 3]), (4, [2, 4])])
def test_the_last_epoch_is_always_validated(tmp_path, isbi_folder, epochs, validated):
    """Validation every 2 epochs and a training of 3: epoch 3's weights are validated too (and may become
    model.pt), not left unjudged; an epoch the schedule already validated is not validated twice."""
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", epochs, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args(), "--set", "val_interval=2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "history.json").read_text())["val_epoch"] == validated
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == epochs and summary["best_metric_epoch"] in validated
    # data-loader workers are started so that they leave SIGTERM to the main process
    config = json.loads((out / "config.json").read_text())
    for loader in (config["train"]["dataloader"], config["validate"]["dataloader"]):
        assert loader["worker_init_fn"]["_target_"] == "medseg.workflows.data_worker_init"


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, isbi_folder, monkeypatch):
    import torch

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(str(f))
        if "last_checkpoint_epoch=2" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 2048 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", 3, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]  # after the epochs' log lines
    assert last.startswith("error: ") and "last_checkpoint_epoch=2.pt: cannot write the checkpoint" in last, last
    assert "--resume" in last
    assert sorted(p.name for p in out.glob("*.pt")) == ["last_checkpoint_epoch=1.pt", "model.pt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("code", "says"), [(28, "cannot write (No space left on device); free disk space"),
                                            (13, "Permission denied; check the permissions")])
def test_a_disk_or_permission_failure_anywhere_is_one_line_naming_the_file(tmp_path, isbi_folder, monkeypatch,
                                                                          code, says):
    # the split is written while MONAI builds the config: it was "a config value does not work", no file named
    import os
    from pathlib import Path

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".split.") and self.suffix == ".json":  # a temporary file that becomes split.json
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    result = _invoke("train", BUNDLE, "--epochs", 1, "--data", isbi_folder, "--output", tmp_path / "run",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args())
    _assert_one_line_error(result, f"{tmp_path / 'run' / 'split.json'}: {says}")


def test_a_full_tracking_database_is_one_warning_without_tracebacks(tmp_path, isbi_folder, monkeypatch, capfd, caplog):
    # SQLite says "database or disk is full" (no errno, no file); MLflow logs it with a traceback, then wraps it.
    # The training goes on without tracking (a full disk of its own folder fails its checkpoints by name)
    import sqlite3

    import sqlalchemy
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    real_log_batch, full = SqlAlchemyStore.log_batch, []

    def log_batch(self, run_id, metrics, params, tags):
        if metrics:  # the first metrics of the run: the disk is full from now on
            full.append(True)
        return real_log_batch(self, run_id, metrics, params, tags)

    real_commit = sqlalchemy.orm.Session.commit

    def commit(self):
        if full:  # as SQLAlchemy raises it: the driver's error is both its ``orig`` and its cause
            orig = sqlite3.OperationalError("database or disk is full")
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, orig) from orig
        return real_commit(self)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", log_batch)
    monkeypatch.setattr(sqlalchemy.orm.Session, "commit", commit)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", 2, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    captured = capfd.readouterr()
    assert full and result.exit_code == 0, result.output
    assert "Traceback" not in result.output + captured.out + captured.err, captured.err
    said = [r.getMessage() for r in caplog.records if "tracking stops here" in r.getMessage()]
    assert len(said) == 1 and "the tracking database cannot write (database or disk is full); free disk" in said[0]
    assert (out / "train_summary.json").is_file()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_before_the_first_validation_still_leaves_a_model(tmp_path, isbi_folder, monkeypatch, signum):
    # SIGTERM (kill, timeout, a batch scheduler's end of job) is taken as Ctrl-C
    # validation every 5 epochs, Ctrl-C in epoch 2: the run validates once on its way out, as a time limit
    # makes it, so model.pt exists to evaluate or hand over
    import os
    import signal

    from ignite.engine import Events

    from medseg import workflows

    original = workflows._check_batches

    def press_ctrl_c(trainer, data_dir, *rest):
        original(trainer, data_dir, *rest)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3),
                                  lambda _: os.kill(os.getpid(), getattr(signal, signum)))

    monkeypatch.setattr(workflows, "_check_batches", press_ctrl_c)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", 8, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args(), "--set", "images_per_batch=2",
                     "--set", "val_interval=5")
    assert result.exit_code == {"SIGINT": 130, "SIGTERM": 143}[signum], result.output  # 128 + the signal
    summary = json.loads((out / "train_summary.json").read_text())
    assert (out / "model.pt").is_file() and summary["best_metric"] is not None and summary["epochs"] == 1


@pytest.mark.parametrize("setting", ["", "ema_momentum=0.1", "amp=true"], ids=["plain", "ema", "amp"])
def test_a_resumed_training_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, isbi_folder, monkeypatch,
                                                                          setting):
    # each epoch's randomness comes from the seed and the epoch's number: a resumed run used to replay epoch
    # 1's crops and augmentations in epoch 2 (its generators restarted), so it ended with other weights. The
    # weight average's warm-up counts from the run's iteration (it restarted), and the mixed-precision grad
    # scaler is checkpointed (on a CPU it is there but disabled)
    import os
    import signal

    from ignite.engine import Events

    from medseg import workflows

    args = ("--epochs", 3, "--data", isbi_folder, "--no-progress", "--no-tracking", "--device", "cpu",
            *_tiny_args(), "--set", "images_per_batch=2", *(["--set", setting] if setting else []))
    assert _invoke("train", BUNDLE, "--output", tmp_path / "straight", *args).exit_code == 0
    original = workflows._check_batches

    def press_ctrl_c(trainer, data_dir, *rest):  # in epoch 2's first step (2 steps per epoch)
        original(trainer, data_dir, *rest)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda _: os.kill(os.getpid(), signal.SIGINT))

    monkeypatch.setattr(workflows, "_check_batches", press_ctrl_c)
    assert _invoke("train", BUNDLE, "--output", tmp_path / "stopped", *args).exit_code == 130
    monkeypatch.setattr(workflows, "_check_batches", original)
    result = _invoke("train", BUNDLE, "--output", tmp_path / "stopped", "--resume", *args)
    assert result.exit_code == 0, result.output
    for name in ("last_checkpoint_epoch=3.pt", "model.pt"):
        straight, resumed = (torch.load(tmp_path / run / name) for run in ("straight", "stopped"))
        for part in ("model", "ema_model") if "model" in straight else (None,):
            a, b = (straight[part], resumed[part]) if part else (straight, resumed)
            assert all(torch.equal(a[k], b[k]) for k in a), (name, part)
        if name.startswith("last"):
            assert ("scaler" in straight) == ("scaler" in resumed) == (setting == "amp=true")
    history = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("straight", "stopped")]
    assert history[0]["train_loss"] == history[1]["train_loss"] and history[0]["val"] == history[1]["val"]
    # the run's record says it was resumed, from where, and what its earlier session did
    summary = json.loads((tmp_path / "stopped" / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == 3
    (earlier,) = summary["earlier_sessions"]
    assert earlier["interrupted"] is True and earlier["epochs"] == 1 and "resumed_from_epoch" not in earlier
    env = summary["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["monai"] and env["cwd"]
    assert env["torch_threads"] == torch.get_num_threads() and isinstance(env["cpu_bf16_available"], bool)
    assert env["amp"] is False  # amp=true on a CPU: no mixed precision ran


def test_each_epoch_draws_other_crops(tmp_path, isbi_folder, monkeypatch):
    # seeded per epoch, yet not the same draw every epoch
    import hashlib

    import monai.engines.trainer as trainer_module

    drawn: dict[int, list[str]] = {}
    original = trainer_module.SupervisedTrainer._iteration

    def spy(self, engine, batch):
        drawn.setdefault(engine.state.epoch, []).append(hashlib.sha1(batch["image"].numpy().tobytes()).hexdigest())
        return original(self, engine, batch)

    monkeypatch.setattr(trainer_module.SupervisedTrainer, "_iteration", spy)
    result = _invoke("train", BUNDLE, "--epochs", 3, "--data", isbi_folder, "--output", tmp_path / "run",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(), "--set", "images_per_batch=2")
    assert result.exit_code == 0, result.output
    assert len(drawn) == 3 and len({tuple(batches) for batches in drawn.values()}) == 3


def test_a_diverged_training_stops_in_one_line_keeping_the_weights_before_it(tmp_path, isbi_folder, monkeypatch):
    # weights gone NaN in epoch 2 (as a too high learning rate makes them): the training stops there, before
    # a validation or a checkpoint meets them (NaN reached the contour closing's watershed, which crashed
    # the process), keeps epoch 1's model.pt and last checkpoint, and ends the MLflow run as FAILED
    import mlflow
    from ignite.engine import Events

    from medseg import workflows

    original = workflows._check_batches

    def break_weights(trainer, data_dir, *rest):
        original(trainer, data_dir, *rest)

        def nan(_):
            with torch.no_grad():
                next(trainer.network.parameters()).fill_(float("nan"))

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), nan)

    monkeypatch.setattr(workflows, "_check_batches", break_weights)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", 5, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--device", "cpu", *_tiny_args(), "--set", "images_per_batch=2")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: training diverged: the weights became NaN or infinite at epoch 2 (iteration 4); model.pt keeps "
        "the best weights validated before it (epoch 1); lower the learning rate (learning_rate is 0.001: try "
        "--set learning_rate=0.0001), or check the data for extreme values, and train again with --overwrite")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == 1 and summary["diverged"].startswith("the weights became NaN")
    for name in ("model.pt", "last_checkpoint_epoch=1.pt"):
        state = torch.load(out / name)
        state = state.get("model", state)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
    assert sorted(p.name for p in out.glob("last_checkpoint_epoch=*.pt")) == ["last_checkpoint_epoch=1.pt"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert run.info.status == "FAILED"


def test_nan_losses_stop_a_training_only_when_they_persist():
    # with mixed precision a step whose gradients overflow is skipped: a lone NaN loss is not divergence,
    # ten in a row are, and so are NaN weights at once
    from ignite.engine import Engine

    from medseg.guards import DIVERGED_LOSSES, stop_on_divergence

    def run(losses, broken_at=None, broken=lambda net: net[0].weight, epochs=1):
        network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))

        def step(engine, _):
            if engine.state.iteration == broken_at:
                with torch.no_grad():
                    broken(network).fill_(float("inf"))
            return {"loss": torch.tensor(losses[(engine.state.iteration - 1) % len(losses)])}

        engine = Engine(step)
        engine.network = network
        flag = stop_on_divergence(engine)
        engine.run(range(len(losses)), max_epochs=epochs)
        return flag, engine.state.iteration

    nan = float("nan")
    flag, steps = run([1.0, nan, 1.0] * 10)
    assert not flag and steps == 30
    flag, steps = run([1.0, 1.0] + [nan] * 20)
    assert flag.what == "loss" and steps == 2 + DIVERGED_LOSSES
    # weights gone bad after a finite loss: found with the next bad loss, else at the epoch's end, before
    # its handlers (validation, checkpoints) run; BatchNorm statistics count too
    flag, steps = run([1.0] * 3 + [nan] + [1.0] * 16, broken_at=3)
    assert flag.what == "weights" and steps == 4 and flag.iteration == 4
    flag, steps = run([1.0] * 20, broken_at=4, broken=lambda net: net[1].running_var, epochs=2)
    assert flag.what == "weights" and steps == 20 and flag.epoch == 1


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, isbi_folder, monkeypatch, signum):
    # Ctrl-C twice in one step: training stops at once, without Ignite's or MONAI's log of the interrupt's
    # traceback; the line says what the run folder holds, the MLflow run is KILLED and logging works again.
    # SIGTERM twice (a scheduler's warning, then its end of the job) does the same, with exit code 143
    import logging
    import os
    import signal

    import mlflow
    from ignite.engine import Events

    from medseg import workflows

    original = workflows._check_batches

    def press_ctrl_c_twice(trainer, data_dir, *rest):
        original(trainer, data_dir, *rest)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3),
                                  lambda _: [os.kill(os.getpid(), getattr(signal, signum)) for _ in range(2)])

    monkeypatch.setattr(workflows, "_check_batches", press_ctrl_c_twice)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", 5, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--device", "cpu", *_tiny_args(), "--set", "images_per_batch=2")
    assert result.exit_code == {"SIGINT": 130, "SIGTERM": 143}[signum], result.output
    assert "KeyboardInterrupt" not in result.output and "Exception:" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == [f"error: interrupted; stopped at once; last_checkpoint_epoch=1.pt holds the last finished "
                     f"epoch; continue with --resume --output {out}"]
    assert logging.root.manager.disable == logging.NOTSET
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert run.info.status == "KILLED"


def test_resume_keeps_the_runs_own_overlays_and_set_values(tmp_path, isbi_folder, caplog):
    # as the Ctrl-C message suggests: `--resume --output X` alone continues the run as it was set up, its
    # overlay (Dice + CE loss) and every --set (a tiny network, one validation slice) included
    out = tmp_path / "run"
    args = ("--data", isbi_folder, "--output", out, "--no-progress", "--no-tracking", "--device", "cpu")
    result = _invoke("train", BUNDLE, *args, "--epochs", 2, "-c", REPO / "configs" / "dice_ce.json", *_tiny_args(),
                     "--set", "val_interval=2")
    assert result.exit_code == 0, result.output
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        result = _invoke("train", BUNDLE, *args, "--epochs", 3, "--resume")
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "continuing with the run's own" in r.getMessage()]
    assert len(said) == 1 and "loss_name=dice_ce," in said[0] and "network_def#channels=[4, 8, 16]" in said[0]
    config = json.loads((out / "config.json").read_text())
    assert config["loss_name"] == "dice_ce" and config["val_interval"] == 2 and config["val_count"] == 1
    assert config["network_def"]["channels"] == [4, 8, 16]
    # what this call gives wins over the run's value
    result = _invoke("train", BUNDLE, *args, "--epochs", 4, "--resume", "--set", "val_interval=1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["val_interval"] == 1


def test_resume_keeps_a_part_an_overlay_added_to_the_network(tmp_path, isbi_folder):
    # '+network_def' merges a part the bundle's network_def lacks (kernel_size 5): resumed and segmented with it
    out, overlay = tmp_path / "run", tmp_path / "plus.yaml"
    overlay.write_text("+network_def:\n  kernel_size: 5\n")
    args = ("--data", isbi_folder, "--output", out, "--no-progress", "--no-tracking", "--device", "cpu")
    result = _invoke("train", BUNDLE, *args, "--epochs", 1, "-c", overlay, *_tiny_args())
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["network_def"]["kernel_size"] == 5
    result = _invoke("train", BUNDLE, *args, "--epochs", 2, "--resume")
    assert result.exit_code == 0, result.output
    result = _invoke("infer", BUNDLE, isbi_folder / "train" / "image", tmp_path / "out", "--checkpoint",
                     out / "model.pt", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_evaluate_and_infer_use_the_trainings_own_settings(tmp_path, isbi_folder, caplog):
    # a model trained with an overlay (Dice + CE: no prior correction) and --set (a tiny network) is evaluated
    # and segmented as trained without giving them again, read from the config.json beside the checkpoint
    from medseg import Segmenter

    run = tmp_path / "run"
    dice_ce = REPO / "configs" / "dice_ce.json"
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", run, "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", "-c", dice_ce, *_tiny_args())
    assert result.exit_code == 0, result.output
    given = ("-c", dice_ce, *_tiny_args(TINY_NET))
    common = ("--checkpoint", run / "model.pt", "--no-progress", "--device", "cpu")
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        for name, extra in (("plain", ()), ("given", given)):
            result = _invoke("evaluate", BUNDLE, "--data", isbi_folder, "--output", tmp_path / f"eval_{name}",
                             *common, *extra)
            assert result.exit_code == 0, result.output
            images = isbi_folder / "train" / "image"
            result = _invoke("infer", BUNDLE, images, tmp_path / f"out_{name}", *common, *extra)
            assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "using the training's" in r.getMessage()]
    assert len(said) == 2 and "loss_name=dice_ce," in said[0] and "network_def#channels=[4, 8, 16]" in said[0]
    assert str(run / "config.json") in said[0]
    scores = [json.loads((tmp_path / f"eval_{n}" / "summary.json").read_text()) for n in ("plain", "given")]
    assert scores[0]["v_rand"] == scores[1]["v_rand"] and scores[0]["dice"] == scores[1]["dice"]
    for path in sorted((tmp_path / "out_given" / "prob").iterdir()):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "out_plain" / "prob" / path.name),
                                      tifffile.imread(path))
    (run_info,) = json.loads((tmp_path / "out_plain" / "run.json").read_text())["runs"].values()
    assert run_info["settings"]["from_training"]["loss_name"] == "dice_ce"
    assert scores[0]["run"]["from_training"]["loss_name"] == "dice_ce" and "from_training" not in scores[1]["run"]
    # the same run whether the training's values are taken or given: each folder continues the other way
    for name, extra in (("plain", given), ("given", ())):
        result = _invoke("infer", BUNDLE, images, tmp_path / f"out_{name}", *common, *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output[result.output.index("{"):])["skipped"] == 4
    # a bad overlay or checkpoint is named in one line, before any word of the training's values
    caplog.clear()
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        result = _invoke("infer", BUNDLE, images, tmp_path / "o2", *common, "-c", tmp_path / "none.json")
        _assert_one_line_error(result, "none.json: overlay config not found")
        result = _invoke("infer", BUNDLE, images, tmp_path / "o2", "--checkpoint", run / "modle.pt")
        _assert_one_line_error(result, "modle.pt: checkpoint not found")
    assert not [r for r in caplog.records if "using the training's" in r.getMessage()]
    # the same in Python; and a value given now wins over the training's
    image = np.asarray(Image.open(sorted((isbi_folder / "train" / "image").iterdir())[0]))
    plain = Segmenter(BUNDLE, run / "model.pt", device="cpu").segment(image).prob
    explicit = Segmenter(BUNDLE, run / "model.pt", device="cpu", overlays=[dice_ce],
                         overrides=dict(parse_override(item) for item in TINY_NET)).segment(image).prob
    np.testing.assert_array_equal(plain, explicit)
    shifted = Segmenter(BUNDLE, run / "model.pt", device="cpu", overrides={"loss_name": "weighted_ce"})
    assert not np.array_equal(shifted.segment(image).prob, plain)


def test_a_run_folder_with_spaces_keeps_its_mlflow_artifacts(tmp_path, isbi_folder):
    # the store's URI escapes a space; MONAI's default artifact folder escaped it twice (%2520), so the
    # artifacts went to a new "sp%20ace/run%20one/mlruns" tree beside the run folder
    import mlflow

    out = tmp_path / "sp ace" / "run one"
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", out, "--epochs", 1, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert not [p for p in tmp_path.rglob("*%*")], list(tmp_path.rglob("*%*"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "config.json"} <= logged
    assert (out / "mlruns").is_dir() and list((out / "mlruns").rglob("model.pt"))
    # a store of one's own given as an escaped SQLite URI: its artifacts beside it, under the unescaped path
    from monai.utils import path_to_sqlite_uri

    store = tmp_path / "my store" / "m.db"
    store.parent.mkdir()
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "two", "--epochs", 1,
                     "--no-progress", "--device", "cpu", "--tracking-uri", path_to_sqlite_uri(str(store)),
                     *_tiny_args())
    assert result.exit_code == 0, result.output
    assert list((store.parent / "mlruns").rglob("model.pt")) and not [p for p in tmp_path.rglob("*%*")]


def test_a_run_folder_with_a_percent_sign_leaves_no_escaped_twin(tmp_path, isbi_folder):
    # the store's URI escapes '%' as %25 and MLflow makes the store's folder from the URI as written: an empty
    # "100%25" folder appeared beside "100%"
    import mlflow

    out = tmp_path / "runs" / "100%" / "a"
    for _ in range(2):  # a first run, and a second into the store that exists
        result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", out, "--epochs", 1, "--no-progress",
                         "--device", "cpu", "--overwrite", *_tiny_args())
        assert result.exit_code == 0, result.output
        assert [p.name for p in (tmp_path / "runs").iterdir()] == ["100%"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert len(runs) == 2 and all("model.pt" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs)


def _tracked_two_epochs(trained, tmp_path):
    """A 2-epoch training with MLflow: its CLI args, the MLflow client, experiment and run."""
    import mlflow

    out = tmp_path / "tracked"
    args = ("--data", trained["data"], "--output", out, "--no-progress", "--device", "cpu", *_tiny_args())
    assert _invoke("train", BUNDLE, "--epochs", 2, *args).exit_code == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg-isbi_em")
    (run,) = client.search_runs([experiment.experiment_id])
    return args, client, experiment, run


def test_resume_with_another_epoch_count_continues_the_mlflow_run(trained, tmp_path):
    # an interrupted run stays unfinished in MLflow; resuming it with --epochs changed must not trip over
    # MLflow's refusal to change a logged param: the new value is logged beside the old one
    args, client, experiment, run = _tracked_two_epochs(trained, tmp_path)
    client.update_run(run.info.run_id, status="RUNNING")  # as after a crash or a killed process
    result = _invoke("train", BUNDLE, "--epochs", 3, "--resume", *args)
    assert result.exit_code == 0, result.output
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["max_epochs"] == "2" and run.data.params["max_epochs.resume1"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "train_loss_epoch")) == 3


def test_extending_a_finished_training_continues_its_mlflow_run(trained, tmp_path):
    # --resume --epochs N+1 after a run that finished: one MLflow run with every epoch, not a second run of
    # the same name holding only the new epochs
    args, client, experiment, run = _tracked_two_epochs(trained, tmp_path)
    assert run.info.status == "FINISHED"
    result = _invoke("train", BUNDLE, "--epochs", 3, "--resume", *args)
    assert result.exit_code == 0, result.output
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")] == [1, 2, 3]


def test_extending_a_moved_training_continues_its_mlflow_run(trained, tmp_path):
    # the folder's own store holds only this folder's runs, whatever path they were logged from
    import mlflow

    args, client, experiment, run = _tracked_two_epochs(trained, tmp_path)
    moved = tmp_path / "moved"
    (tmp_path / "tracked").rename(moved)
    args = tuple(moved if a == tmp_path / "tracked" else a for a in args)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{moved / 'mlflow.db'}")
    assert client.list_artifacts(run.info.run_id) == []  # the store still points at the old place (README)
    result = _invoke("train", BUNDLE, "--epochs", 3, "--resume", *args)
    assert result.exit_code == 0, result.output
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id
    assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}  # found again
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2, 3]


def test_extending_a_training_whose_bundle_folder_was_renamed_continues_its_mlflow_run(trained, tmp_path):
    # the experiment is named after the bundle folder when the run starts; a resume keeps the recorded one
    # (it started a run of its own in a new experiment 'medseg-isbi_em_v2', holding the later epochs alone)
    args, client, experiment, run = _tracked_two_epochs(trained, tmp_path)
    renamed = shutil.copytree(BUNDLE, tmp_path / "isbi_em_v2")
    assert _invoke("train", renamed, "--epochs", 3, "--resume", *args).exit_code == 0
    assert {e.name for e in client.search_experiments()} - {"Default"} == {"medseg-isbi_em"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2, 3]


def test_a_runs_config_runs_with_plain_monai_without_touching_the_runs_store(trained, tmp_path):
    # config.json held medseg's MLflow handlers, with the run's store, artifacts and params: running it with
    # plain monai.bundle (as the README says) logged the new training into the old run's store, the old
    # model.pt as its artifact, and a later --resume of the old folder continued that stray run
    import mlflow

    args, client, experiment, run = _tracked_two_epochs(trained, tmp_path)
    config = json.loads((tmp_path / "tracked" / "config.json").read_text())
    handlers = json.dumps([config["train"].get("handlers"), config["validate"].get("handlers")])
    assert "MLFlowHandler" not in handlers and "tracking_uri" not in config
    assert config["_tracking_"]["tracking_store"] == "folder" and config["_tracking_"]["run_name"] == "tracked"
    assert config["dataset_dir"] == str(Path(trained["data"]).absolute())  # absolute, from any folder
    assert config["output_dir"] == str((tmp_path / "tracked").absolute())
    elsewhere = tmp_path / "colleague"
    elsewhere.mkdir()
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               str(tmp_path / "tracked" / "config.json"), "--output_dir", str(elsewhere / "again"), "--max_epochs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=elsewhere,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "again" / "model.pt").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tracked' / 'mlflow.db'}")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2]


def test_an_exported_bundle_runs_its_model_alike_with_medseg_and_plain_monai(tmp_path, isbi_folder):
    # a bundle with models/model.pt and the run's config.json beside it ran under MONAI's own runner with the
    # bundle's settings (MONAI reads no training record): another logit shift, or weights that do not load
    run = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", run, "-c", REPO / "configs" / "dice_ce.json",
                     "--epochs", 1, "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    shared = tmp_path / "colleague" / "em_model"
    result = _invoke("export", BUNDLE, run / "model.pt", shared)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["settings"]["loss_name"] == "dice_ce"
    assert sorted(p.name for p in (shared / "models").iterdir()) == ["config.json", "model.pt", "model.ts",
                                                                     "split.json"]
    inference = json.loads((shared / "configs" / "inference.json").read_text())
    assert inference["loss_name"] == "dice_ce" and inference["network_def"]["channels"] == [4, 8, 16]
    assert json.loads((shared / "configs" / "train.json").read_text())["network_def"]["channels"] == [4, 8, 16]
    assert not list(tmp_path.glob("colleague/.*part"))
    images = isbi_folder / "train" / "image"
    result = _invoke("infer", BUNDLE, images, tmp_path / "medseg", "--checkpoint", run / "model.pt", "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = _invoke("infer", shared, images, tmp_path / "shared", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    command = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--bundle_root", str(shared),
               "--config_file", str(shared / "configs" / "inference.json"),
               "--meta_file", str(shared / "configs" / "metadata.json"),
               "--dataset_dir", str(images), "--output_dir", str(tmp_path / "monai")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    maps = sorted((tmp_path / "medseg" / "prob").glob("*.tif"))
    assert maps
    for path in maps:
        ours = tifffile.imread(path)
        for other in ("shared", "monai"):
            np.testing.assert_array_equal(tifffile.imread(tmp_path / other / "prob" / path.name), ours)
    _assert_one_line_error(_invoke("export", BUNDLE, run / "model.pt", shared), str(shared), "already exists")
    _assert_one_line_error(_invoke("export", BUNDLE, run / "none.pt", tmp_path / "x"), "none.pt",
                           "checkpoint not found")
    assert not (tmp_path / "x").exists()
    # only the bundle's own parts go: not the data and runs a plain monai.bundle run puts inside it (its
    # dataset_dir and output_dir default there), and never a folder inside the bundle
    crowded = shutil.copytree(BUNDLE, tmp_path / "crowded", ignore=shutil.ignore_patterns("models"))
    shutil.copytree(isbi_folder, crowded / "data")
    shutil.copytree(run, crowded / "runs" / "r1")
    record = json.loads((run / "config.json").read_text())  # a record of an earlier version: tracked in it
    record["tracking_uri"] = f"sqlite:///{run / 'mlflow.db'}"
    record["train"]["handlers"].append({"_target_": "MLFlowHandler", "tracking_uri": "@tracking_uri"})
    (crowded / "runs" / "r1" / "config.json").write_text(json.dumps(record))
    _assert_one_line_error(_invoke("export", crowded, crowded / "runs" / "r1" / "model.pt", crowded / "out"),
                           "inside the bundle")
    result = _invoke("export", crowded, crowded / "runs" / "r1" / "model.pt", tmp_path / "clean")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["LICENSE", "configs", "docs", "models"]
    handed = json.loads((tmp_path / "clean" / "models" / "config.json").read_text())
    assert "tracking_uri" not in handed and "_tracking_" not in handed
    assert "MLFlowHandler" not in json.dumps(handed) and handed["loss_name"] == "dice_ce"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_an_exported_bundle_describes_its_own_weights_and_scores_their_validation_slices(tmp_path):
    # the export kept the source bundle's metadata (its reference scores) and docs, a folder only its owner could
    # read, and an evaluate.json that drew the bundle's own split: MONAI's runner scored training slices
    data = write_isbi_folder(tmp_path / "isbi", n=6)
    run = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--data", data, "--output", run, "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    shared = tmp_path / "colleague" / "em_model"
    result = _invoke("export", BUNDLE, run / "model.pt", shared)
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    assert shared.stat().st_mode & 0o777 == 0o777 & ~umask
    digest = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
    summary = json.loads((run / "train_summary.json").read_text())
    meta = json.loads((shared / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {"v_rand": round(summary["best_metric"], 4)}
    assert meta["exported_from"]["weights_sha256"] == digest == json.loads(result.output)["sha256"]
    assert "network_def#channels = [4, 8, 16]" in meta["description"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2  # as the source's: unchanged
    docs = (shared / "docs" / "README.md").read_text()
    assert docs.startswith("# Exported model") and digest in docs
    assert docs.endswith((BUNDLE / "docs" / "README.md").read_text())
    validation = json.loads((run / "split.json").read_text())["val"]
    command = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--bundle_root", str(shared),
               "--config_file", str([str(shared / "configs" / n) for n in ("train.json", "evaluate.json")]),
               "--dataset_dir", str(data), "--output_dir", str(tmp_path / "monai"), "--tracking", "None"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "monai" / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows if not row.startswith("mean")] == validation
    result = _invoke("evaluate", shared, "--data", data, "--output", tmp_path / "ours", "--device", "cpu",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ours" / "metrics.csv").read_text() == (tmp_path / "monai" / "metrics.csv").read_text()
    # an export of the export, with weights alone: the earlier split record is not taken for these weights,
    # but what the earlier export said of them stays true. It said the bundle's defaults and no score: the
    # settings are in the exported bundle's configs already, so none differed from them, and no training
    # summary lies beside the weights
    (tmp_path / "bare").mkdir()
    shutil.copyfile(run / "model.pt", tmp_path / "bare" / "model.pt")
    result = _invoke("export", shared, tmp_path / "bare" / "model.pt", tmp_path / "again")
    assert result.exit_code == 0, result.output
    docs = (tmp_path / "again" / "docs" / "README.md").read_text()
    best = f"v_rand {summary['best_metric']:.4f} at epoch {summary['best_metric_epoch']} (as the training validates"
    assert docs.count("# Exported model") == 1 and f"best validation score in training: {best}" in docs
    assert "network_def#channels = [4, 8, 16]" in docs
    assert json.loads((tmp_path / "again" / "configs" / "evaluate.json").read_text())["split_record"] is None
    again = json.loads((tmp_path / "again" / "configs" / "metadata.json").read_text())
    assert again["eval_metrics"] == meta["eval_metrics"] and again["description"] == meta["description"]
    assert again["exported_from"]["settings"] == meta["exported_from"]["settings"]
    assert again["exported_from"]["eval_metrics"].endswith("validation split")  # its split did not go along
    # other weights of the same network: the settings still hold, the score is not theirs
    weights = torch.load(run / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, tmp_path / "bare" / "b.pt")
    assert _invoke("export", shared, tmp_path / "bare" / "b.pt", tmp_path / "other").exit_code == 0
    other = json.loads((tmp_path / "other" / "configs" / "metadata.json").read_text())
    assert other["eval_metrics"] == {} and other["description"] == meta["description"]
    assert "best validation score in training: not recorded" in (tmp_path / "other" / "docs" / "README.md").read_text()
    # weights that do not fit the network the export describes, or a training's last checkpoint: refused
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    _assert_one_line_error(_invoke("export", BUNDLE, other, tmp_path / "x"), "other.pt", "do not fit")
    _assert_one_line_error(_invoke("export", BUNDLE, run / "last_checkpoint_epoch=1.pt", tmp_path / "x"),
                           "last checkpoint", "model.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name == "x" or p.name.endswith(".part")] == []


def test_an_export_holds_the_network_as_torchscript_for_plain_pytorch(trained, tmp_path, monkeypatch, caplog):
    # a receiver without medseg or MONAI runs models/model.ts with torch alone; MONAI's loader also gets the
    # metadata and configs stored in it, as its ckpt_export writes them
    from monai.data import load_net_with_metadata

    from medseg.bundle import load_checkpoint, load_config

    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "em")
    assert result.exit_code == 0, result.output
    script = tmp_path / "em" / "models" / "model.ts"
    assert json.loads(result.output)["torchscript"] == str(script)
    network = load_config(tmp_path / "em", "infer").get_parsed_content("network_def").eval()
    load_checkpoint(network, trained["out"] / "model.pt")
    image = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(script))(image), network(image), rtol=0, atol=0)
    _, meta, extra = load_net_with_metadata(str(script), more_extra_files=("inference.json", "train.json"))
    configs = tmp_path / "em" / "configs"
    assert meta.items() >= json.loads((configs / "metadata.json").read_text()).items()
    assert json.loads(extra["inference.json"]) == json.loads((configs / "inference.json").read_text())
    assert "model.ts" in (tmp_path / "em" / "docs" / "README.md").read_text()

    def unscriptable(module):  # a custom network TorchScript cannot compile
        raise RuntimeError("Python builtin <built-in function id> is currently not supported in Torchscript")

    monkeypatch.setattr(torch.jit, "script", unscriptable)
    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "custom")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["torchscript"] is None
    assert sorted(p.name for p in (tmp_path / "custom" / "models").iterdir()) == ["config.json", "model.pt",
                                                                                   "split.json"]
    assert "no models/model.ts, as this PyTorch cannot script the network (RuntimeError: Python builtin" in caplog.text
    assert "model.ts" not in (tmp_path / "custom" / "docs" / "README.md").read_text()
    monkeypatch.undo()
    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "plain", "--no-torchscript")
    assert result.exit_code == 0 and json.loads(result.output)["torchscript"] is None, result.output
    assert not (tmp_path / "plain" / "models" / "model.ts").exists()


def test_an_export_lists_its_weights_for_download_as_the_model_zoo_keeps_bundles(trained, tmp_path):
    # the model zoo keeps weights out of its repository: large_files.yml says where they are, and MONAI's own
    # download_large_files fetches them into a copy of the bundle without them and checks their SHA-256
    import yaml  # MONAI reads .yml configs with it (PyYAML, which MLflow requires)
    from monai.bundle import download_large_files

    hosted = tmp_path / "hosted\u00fc"
    url = f"file://{hosted}/"  # a folder's address; the name beyond ASCII is percent-encoded in the list
    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "em", "--weights-url", url)
    assert result.exit_code == 0, result.output
    listed = tmp_path / "em" / "large_files.yml"
    assert json.loads(result.output)["large_files"] == str(listed)
    assert listed.read_bytes().isascii()  # read alike under any locale
    entries = yaml.safe_load(listed.read_text())["large_files"]
    models = tmp_path / "em" / "models"
    encoded = url.replace("\u00fc", "%C3%BC")
    assert [(e["path"], e["url"], e["hash_type"]) for e in entries] == [
        ("models/model.pt", encoded + "model.pt", "sha256"), ("models/model.ts", encoded + "model.ts", "sha256")]
    assert entries[0]["hash_val"] == hashlib.sha256((trained["out"] / "model.pt").read_bytes()).hexdigest()
    assert "large_files.yml" in (tmp_path / "em" / "docs" / "README.md").read_text()
    assert (models / "split.json").read_bytes().endswith(b"}\n")  # as the model zoo's file checks ask
    hosted.mkdir()
    for name in ("model.pt", "model.ts"):  # uploaded, and left out of the shared copy
        shutil.copyfile(models / name, hosted / name)
    shared = shutil.copytree(tmp_path / "em", tmp_path / "shared", ignore=shutil.ignore_patterns("model.[pt]*"))
    download_large_files(bundle_path=str(shared))
    for name in ("model.pt", "model.ts"):
        assert (shared / "models" / name).read_bytes() == (models / name).read_bytes()
    (shared / "models" / "model.pt").unlink()
    (hosted / "model.pt").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="sha256 hash check of downloaded file failed"):
        download_large_files(bundle_path=str(shared))
    # without TorchScript only model.pt is listed; without an address, no list
    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "pt", "--no-torchscript",
                     "--weights-url", "https://example.org/em1")
    assert result.exit_code == 0, result.output
    assert [e["url"] for e in yaml.safe_load((tmp_path / "pt" / "large_files.yml").read_text())["large_files"]] \
        == ["https://example.org/em1/model.pt"]
    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "none")
    assert json.loads(result.output)["large_files"] is None and not (tmp_path / "none" / "large_files.yml").exists()
    assert "large_files.yml" not in (tmp_path / "none" / "docs" / "README.md").read_text()
    # a run of an earlier version wrote its split.json without the final newline the zoo's checks ask for
    old = shutil.copytree(trained["out"], tmp_path / "old run", ignore=shutil.ignore_patterns("mlruns", "*.db"))
    (old / "split.json").write_text((old / "split.json").read_text().rstrip("\n"))
    assert _invoke("export", BUNDLE, old / "model.pt", tmp_path / "old").exit_code == 0
    assert (tmp_path / "old" / "models" / "split.json").read_text() == (old / "split.json").read_text() + "\n"
    # an export of that export lists nothing of its source's (other files, other hashes)
    result = _invoke("export", tmp_path / "em", models / "model.pt", tmp_path / "again")
    assert result.exit_code == 0 and not (tmp_path / "again" / "large_files.yml").exists(), result.output
    bad = "https://zenodo.org/x?download=1"
    _assert_one_line_error(_invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "bad",
                                   "--weights-url", bad), f"{bad}: cannot hold ?, # or \\")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("url, says", [
    ("models/em1", "not an address of a folder"), ("s3://bucket/em1", "not an address of a folder"),
    ("https:///em1", "not an address of a folder"), ("http://example.org/em1?", "cannot hold ?, # or"),
    ("http://example.org/em1#", "cannot hold ?, # or"), ("https://example.org\\em1", "cannot hold ?, # or"),
    ("https://example.org/a b", "write a space as %20"), ("https://example.org/a\x7fb", "control characters"),
    ("https://example.org/a%2", "not followed by two hexadecimal digits"),
    ("https://example.org:99999/em1", "not an address (Port out of range"),
    ("https://[::1/em1", "not an address (Invalid IPv6 URL)"),
    ("file://srv/em1", "three slashes"), ("file:em1", "three slashes"), ("file://example.org/em1", "three slashes"),
    ("https://user:secret@example.org/em1", "holds a user name or password"),
    ("https://user@example.org/em1", "holds a user name or password"),
    ("https://:secret@example.org/em1", "holds a user name or password"),
    ("https://drive.google.com/drive/folders/abc", "Google Drive"), ("https://DRIVE.google.com/x", "Google Drive"),
    ("https://docs.google.com/x", "Google Drive"), ("http://127.0.0.1:0/em1", "port 0"),
    ("http://[::1]x/em1", "not an address (host '[::1]x')"), ("file://127.0.0.1/srv/em1", "three slashes"),
    ("https://example.org/em1/model.pt", "the address of a file"),
    ("https://example.org/em1/MODEL.TS/", "the address of a file"),
    ("https://ex\u00e4mple.org/em1", "ASCII form"), ("https://example.org/a\udcff", "not text"),
])
def test_a_weights_address_no_download_can_follow_is_refused_before_the_export(url, says):
    from medseg.errors import MedsegError
    from medseg.export import _check_url

    with pytest.raises(MedsegError, match=re.escape(says)):
        _check_url(url)


def test_a_weights_address_is_written_as_monai_can_fetch_it():
    from medseg.export import _check_url

    assert _check_url("https://example.org/em1/") == "https://example.org/em1/"
    assert _check_url("HTTPS://example.org/a%20b") == "HTTPS://example.org/a%20b"  # kept as given
    assert _check_url("https://example.org/\u00fcber") == "https://example.org/%C3%BCber"  # UTF-8, percent-encoded
    assert _check_url("file://localhost/srv/em1") == "file://localhost/srv/em1"
    assert _check_url("file://LOCALHOST/srv/em1") == "file://LOCALHOST/srv/em1"  # host names know no case
    assert _check_url("ftp://example.org/em1") == "ftp://example.org/em1"
    assert _check_url("http://[::1]:8765/em1") == "http://[::1]:8765/em1"
    assert _check_url("https://example.org/@user/em1") == "https://example.org/@user/em1"  # a path's @


def test_an_export_onto_a_full_disk_names_the_target(trained, tmp_path, monkeypatch):
    import errno

    import medseg.export

    real = shutil.copyfile

    def full(source, target, *args, **kwargs):
        if Path(target).name == "model.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(source))  # as the copy names it
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(medseg.export.shutil, "copyfile", full)
    target = tmp_path / "shared" / "em"
    _assert_one_line_error(_invoke("export", BUNDLE, trained["out"] / "model.pt", target),
                           f"{target}: cannot export the bundle (No space left on device)")
    assert not target.parent.exists()  # its partial folder removed, and the folder made to hold it
    # the TorchScript file, which libtorch's own writer aborted the process on, leaving the partial folder
    monkeypatch.setattr(medseg.export.shutil, "copyfile", real)
    write_bytes = Path.write_bytes

    def full_at_model_ts(self, data):
        if self.name == "model.ts":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_model_ts)
    _assert_one_line_error(_invoke("export", BUNDLE, trained["out"] / "model.pt", target),
                           f"{target}: cannot export the bundle (No space left on device)")
    assert not target.parent.exists()


def test_an_export_into_a_folder_it_cannot_write_names_that_folder_not_its_hidden_one(trained, tmp_path,
                                                                                      monkeypatch):
    import errno

    import medseg.io

    target = tmp_path / "ro" / "em"

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(path).parent / f".{Path(path).name}.x1y2.part"))

    monkeypatch.setattr(medseg.io, "held_partial_folder", read_only)  # imported by the export when it runs
    result = _invoke("export", BUNDLE, trained["out"] / "model.pt", target)
    _assert_one_line_error(result, f"{target}: cannot export the bundle (Read-only file system); give the export a "
                           "folder you can write to, or fix the permissions of its parent")
    assert ".part" not in result.output

    def no_folder(path):  # the folder to hold it cannot be made
        raise OSError(errno.EACCES, "Permission denied", str(Path(path).parent))

    monkeypatch.setattr(medseg.io, "held_partial_folder", no_folder)
    deeper = tmp_path / "ro" / "new" / "em"
    _assert_one_line_error(_invoke("export", BUNDLE, trained["out"] / "model.pt", deeper),
                           f"{deeper}: cannot export the bundle (Permission denied); give the export a folder you "
                           "can write to")


def test_an_export_removes_what_a_killed_export_to_its_folder_left_and_nothing_else(trained, tmp_path, caplog):
    from medseg.io import held_partial_folder, partial_folder

    target = tmp_path / "em"
    killed = ("import os, sys; from medseg.io import held_partial_folder; part, _ = held_partial_folder(sys.argv[1]); "
              "(part / 'model.pt').write_bytes(b'0' * 1000); os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", killed, str(target)]).returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert len(left) == 1 and (left[0] / "model.pt").is_file()
    running, held = held_partial_folder(target)  # another export to the same folder, still copying
    other = partial_folder(tmp_path / "em.v2")  # an export to another folder, killed too
    (left[0] / "configs").mkdir()
    (left[0] / "configs" / "inference.json").write_text("{}")
    (left[0] / "configs").chmod(0o500)  # a read-only folder copied by an earlier version goes too
    try:
        result = _invoke("export", BUNDLE, trained["out"] / "model.pt", target)
    finally:
        os.close(held)
    assert result.exit_code == 0, result.output
    assert f"{left[0]}: removed what an export to {target} that was stopped had copied" in caplog.text
    assert sorted(p for p in tmp_path.iterdir() if p.name.endswith(".part")) == sorted([running, other])
    assert (target / "models" / "model.pt").is_file()


def test_an_export_of_a_read_only_bundle_is_made_of_files_of_ones_own(trained, tmp_path):
    # the copies kept the source's read-only modes: the export could not write its own configs, and what it left
    # could not be removed without chmod (as a user: root writes regardless)
    source = tmp_path / "ro"
    shutil.copytree(BUNDLE, source, ignore=shutil.ignore_patterns("__pycache__", "models"))
    for path in sorted(source.rglob("*"), reverse=True) + [source]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        result = _invoke("export", source, trained["out"] / "model.pt", tmp_path / "em")
    finally:
        for path in [source, *source.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert result.exit_code == 0, result.output
    for path in [tmp_path / "em", *(tmp_path / "em").rglob("*")]:
        assert path.stat().st_mode & 0o200, path  # the owner may change and remove each


def test_an_export_of_a_run_still_training_says_so(trained, tmp_path, caplog):
    from medseg.locking import folder_lock

    with folder_lock(trained["out"], "train"):
        result = _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "em")
    assert result.exit_code == 0, result.output
    assert "medseg train (process" in caplog.text and "is still writing into its run" in caplog.text
    # and the export says so too, to whoever gets it
    docs = (tmp_path / "em" / "docs" / "README.md").read_text()
    # (its summary, of an earlier session of a resumed run, is not taken for this one's)
    assert " It was exported while its training was still running: these are its best weights at that moment." \
        in docs and "It trained" not in docs
    exported = json.loads((tmp_path / "em" / "configs" / "metadata.json").read_text())["exported_from"]
    assert exported["still_training"] is True and "epochs" not in exported and "interrupted" not in exported


def test_an_exports_weights_replaced_since_are_said_to_be_other_than_its_docs_describe(trained, tmp_path, caplog):
    import torch

    assert _invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "em").exit_code == 0
    image = next(p for p in sorted((trained["data"]).rglob("*.png")) if "image" in p.parts)
    args = ("infer", tmp_path / "em", image, tmp_path / "o1", "--no-progress", "--device", "cpu")
    assert _invoke(*args).exit_code == 0
    assert "not the weights this bundle was exported with" not in caplog.text
    weights = torch.load(tmp_path / "em" / "models" / "model.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
               tmp_path / "em" / "models" / "model.pt")
    assert _invoke(*args[:3], tmp_path / "o2", *args[4:]).exit_code == 0
    said = [r.getMessage() for r in caplog.records if "not the weights this bundle was exported with" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'em' / 'models' / 'model.pt'}: ")
    # the same file by another path (a link to the bundle, "..") is its own too
    (tmp_path / "link").symlink_to(tmp_path / "em")
    caplog.clear()
    assert _invoke("infer", tmp_path / "link", image, tmp_path / "o3", "--no-progress", "--device", "cpu",
                   "--checkpoint", tmp_path / "em" / "models" / ".." / "models" / "model.pt").exit_code == 0
    assert "not the weights this bundle was exported with" in caplog.text
    assert said[0].endswith("its docs and scores describe those, and models/model.ts holds them")


def test_an_export_says_how_long_its_training_ran_and_whether_it_was_stopped(trained, tmp_path, caplog):
    # a run stopped by Ctrl-C at epoch 4 of --epochs 12 was exported as if it had trained its 12 epochs
    run = tmp_path / "run"
    shutil.copytree(trained["out"], run, ignore=shutil.ignore_patterns("mlflow*", "mlruns"))
    summary = json.loads((run / "train_summary.json").read_text())
    (run / "train_summary.json").write_text(json.dumps({**summary, "epochs": 2, "interrupted": True}))
    result = _invoke("export", BUNDLE, run / "model.pt", tmp_path / "em")
    assert result.exit_code == 0, result.output
    assert f"{run / 'model.pt'}: its training was stopped before its end (after epoch 2); the export says so" \
        in caplog.text
    docs = (tmp_path / "em" / "docs" / "README.md").read_text()
    assert "It trained 2 epochs, and was stopped before its end (by Ctrl-C or a signal), so it did not train as " \
        "long as its settings say." in docs
    exported = json.loads((tmp_path / "em" / "configs" / "metadata.json").read_text())["exported_from"]
    assert exported["interrupted"] is True and exported["epochs"] == 2 and exported["settings"]
    # exported again, as it is: the words go along with the same weights
    assert _invoke("export", tmp_path / "em", tmp_path / "em" / "models" / "model.pt", tmp_path / "re").exit_code == 0
    again = json.loads((tmp_path / "re" / "configs" / "metadata.json").read_text())["exported_from"]
    assert again["interrupted"] is True and again["epochs"] == 2
    assert "stopped before its end" in (tmp_path / "re" / "docs" / "README.md").read_text()
    # weights without their training's record: its settings are not known, and not said to be the defaults
    (tmp_path / "lone").mkdir()
    shutil.copyfile(run / "model.pt", tmp_path / "lone" / "model.pt")
    bundle = tmp_path / "tiny_em"  # a bundle whose own network is the one these weights fit
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("__pycache__", "models"))
    for name in ("train.json", "inference.json"):
        config = json.loads((bundle / "configs" / name).read_text())
        config["network_def"].update(channels=[4, 8, 16], strides=[2, 2], num_res_units=0)
        (bundle / "configs" / name).write_text(json.dumps(config))
    result = _invoke("export", bundle, tmp_path / "lone" / "model.pt", tmp_path / "em2")
    assert result.exit_code == 0, result.output
    docs = (tmp_path / "em2" / "docs" / "README.md").read_text()
    assert "written into `configs/`: not known, as no record of the training (its run's `config.json`) was " \
        "beside the weights" in docs and "none (the bundle's defaults)" not in docs and "It trained" not in docs
    assert json.loads((tmp_path / "em2" / "configs" / "metadata.json").read_text())["exported_from"]["settings"] \
        is None


def test_an_export_names_the_image_channels_its_training_picked(trained, tmp_path):
    # a model trained with input_channels=[2] of RGB images was said to take "R": the source bundle's first
    # channel name, whichever channel the training picked
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(trained["out"] / "model.pt", run / "model.pt")
    record = json.loads((trained["out"] / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "input_channels": [2]}))
    source = tmp_path / "rgb"
    shutil.copytree(BUNDLE, source, ignore=shutil.ignore_patterns("models"))
    meta = json.loads((source / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"].update(num_channels=3, channel_def={"0": "R", "1": "G", "2": "B"})
    (source / "configs" / "metadata.json").write_text(json.dumps(meta))
    result = _invoke("export", source, run / "model.pt", tmp_path / "out")
    assert result.exit_code == 0, result.output
    picked = json.loads((tmp_path / "out" / "configs" / "metadata.json").read_text())
    assert picked["network_data_format"]["inputs"]["image"] == {**meta["network_data_format"]["inputs"]["image"],
                                                                "num_channels": 1, "channel_def": {"0": "B"}}
    # exported again, the picks stay named; a channel the metadata has no name for is named by its number
    assert _invoke("export", tmp_path / "out", run / "model.pt", tmp_path / "again").exit_code == 0
    again = json.loads((tmp_path / "again" / "configs" / "metadata.json").read_text())
    assert again["network_data_format"]["inputs"] == picked["network_data_format"]["inputs"]
    # a training that started from that export and picked another channel: its metadata names the picks of the
    # earlier training (B), not the image's channels, so the channel goes by its number
    (run / "config.json").write_text(json.dumps({**record, "input_channels": [0]}))
    assert _invoke("export", tmp_path / "out", run / "model.pt", tmp_path / "repicked").exit_code == 0
    repicked = json.loads((tmp_path / "repicked" / "configs" / "metadata.json").read_text())
    assert repicked["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "channel 0 of the image"}
    assert repicked["exported_from"]["settings"]["input_channels"] == [0]
    (run / "config.json").write_text(json.dumps({**record, "input_channels": [1]}))
    assert _invoke("export", BUNDLE, run / "model.pt", tmp_path / "gray").exit_code == 0
    gray = json.loads((tmp_path / "gray" / "configs" / "metadata.json").read_text())
    assert gray["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "channel 1 of the image"}


def test_an_export_of_one_picked_channel_given_as_gray_names_it_in_each_input_channel(tmp_path):
    # a jurkat training with input_channels=[1] (3 network inputs: G repeated) was said to take G and then
    # "output 1, not a class", words for outputs
    from medseg.export import _Export, _write_metadata

    class Parsed:
        values = {"network_def#in_channels": 3, "network_def#out_channels": 3}

        def __contains__(self, key):
            return key in self.values

        def get_parsed_content(self, key):
            return self.values[key]

    source = REPO / "bundles" / "jurkat" / "configs" / "metadata.json"
    about = _Export(REPO / "bundles" / "jurkat", "0" * 64, {"input_channels": [1]}, None, False, picked=[1])
    _write_metadata(source, tmp_path / "metadata.json", Parsed(), about)
    inputs = json.loads((tmp_path / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    assert inputs["num_channels"] == 3
    assert inputs["channel_def"] == {"0": "G", "1": "G (repeated)", "2": "G (repeated)"}


def test_an_export_states_the_channels_its_weights_have():
    from medseg.export import _describe_channels

    entry = {"num_channels": 3, "channel_def": {"0": "background", "1": "cell body", "2": "nucleus"}}
    _describe_channels(entry, 3, None)
    assert entry["channel_def"] == {"0": "background", "1": "cell body", "2": "nucleus"}
    _describe_channels(entry, 2, ["background", "cell"])
    assert entry == {"num_channels": 2, "channel_def": {"0": "background", "1": "cell"}}
    entry = {"num_channels": 3, "channel_def": {"0": "background", "1": "interior", "2": "boundary"}}
    _describe_channels(entry, 4, None)  # an extra output (a distance head) is no class
    assert entry["num_channels"] == 4 and entry["channel_def"]["2"] == "boundary"
    assert entry["channel_def"]["3"].startswith("output 3, not a class")


def test_an_export_describes_how_its_weights_were_trained_and_keeps_their_score_when_copied(trained, tmp_path):
    # the settings listed and written were only those evaluate and infer take: a training with weight averaging
    # or another length was described as the bundle's; a run's files copied by hand (the weights last) lost the
    # best score, judged by file times; and the exported docs gave no command for the exported folder
    run = shutil.copytree(trained["out"], tmp_path / "run")
    record = json.loads((run / "config.json").read_text())
    record["ema_momentum"] = 0.5  # as `--set ema_momentum=0.5` records it
    # what the machine ran with, not how the weights were made: not exported; nor an expression that works
    # out as the bundle's own (a record of an earlier version), which evaluate and infer do not take either
    shipped = json.loads((BUNDLE / "configs" / "train.json").read_text())
    record.update(cpu_bf16=not shipped["cpu_bf16"], compile=not shipped["compile"], num_workers=3, cache_rate=0.5,
                  logit_shift="$(" + shipped["logit_shift"][1:] + ")")
    (run / "config.json").write_text(json.dumps(record))
    handed = tmp_path / "handover"
    handed.mkdir()
    for name in ("config.json", "split.json", "train_summary.json", "model.pt"):  # the weights copied last
        shutil.copyfile(run / name, handed / name)
    os.utime(handed / "train_summary.json", (1, 1))
    result = _invoke("export", BUNDLE, handed / "model.pt", tmp_path / "shared")
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)["settings"]
    assert settings["ema_momentum"] == 0.5
    assert not {"cpu_bf16", "compile", "num_workers", "cache_rate", "logit_shift", "device"} & set(settings)
    shared = tmp_path / "shared"
    train = json.loads((shared / "configs" / "train.json").read_text())
    assert train["ema_momentum"] == 0.5 and train["max_epochs"] == 3  # trained 3 epochs (--epochs 3)
    for key in ("dataset_dir", "cpu_bf16", "compile", "num_workers", "cache_rate", "logit_shift"):
        assert train[key] == shipped[key], key
    for name in ("evaluate.json", "inference.json"):  # their own values stay theirs
        assert (shared / "configs" / name).read_text() == (BUNDLE / "configs" / name).read_text() or \
            "ema_momentum" not in (shared / "configs" / name).read_text()
    assert json.loads((shared / "configs" / "evaluate.json").read_text())["cache_rate"] == 0.0
    meta = json.loads((shared / "configs" / "metadata.json").read_text())
    assert "ema_momentum = 0.5" in meta["description"] and "max_epochs = 3" in meta["description"]
    assert "device" not in meta["exported_from"]["settings"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["weights_sha256"] == hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
    assert meta["eval_metrics"] == {"v_rand": round(summary["best_metric"], 4)}
    docs = (shared / "docs" / "README.md").read_text()
    title = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["name"]
    assert docs.startswith(f"# Exported model: trained weights of the bundle {title}\n")
    assert "medseg infer MODEL IN_DIR OUT_DIR" in docs and "run inferring --bundle_root MODEL" in docs
    # other weights beside that summary: its score is not theirs
    weights = torch.load(run / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, handed / "model.pt")
    os.utime(handed / "model.pt", (1, 1))  # older than the summary: the file times would have taken the score
    assert _invoke("export", BUNDLE, handed / "model.pt", tmp_path / "other").exit_code == 0
    assert json.loads((tmp_path / "other" / "configs" / "metadata.json").read_text())["eval_metrics"] == {}
    # a summary of an earlier version names no weights: it counts unless the weights are newer than it
    shutil.copyfile(run / "model.pt", handed / "model.pt")
    del summary["weights_sha256"]
    (handed / "train_summary.json").write_text(json.dumps(summary))
    os.utime(handed / "model.pt", (1, 1))
    assert _invoke("export", BUNDLE, handed / "model.pt", tmp_path / "old").exit_code == 0
    assert json.loads((tmp_path / "old" / "configs" / "metadata.json").read_text())["eval_metrics"]
    os.utime(handed / "train_summary.json", (0, 0))
    assert _invoke("export", BUNDLE, handed / "model.pt", tmp_path / "newer").exit_code == 0
    assert json.loads((tmp_path / "newer" / "configs" / "metadata.json").read_text())["eval_metrics"] == {}
    # a record of no bundle's training is not taken, for how the weights were made either
    from medseg.runfolder import recipe_changes

    assert recipe_changes(BUNDLE, handed / "model.pt")["ema_momentum"] == 0.5
    del record["_meta_"]
    (handed / "config.json").write_text(json.dumps(record))
    assert recipe_changes(BUNDLE, handed / "model.pt") == {}


def test_an_export_of_an_export_describes_a_component_changed_whole_then_in_part():
    from medseg.export import _merged_settings

    basic = {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2, "features": [4, 4, 8, 16, 32, 4]}
    merged = _merged_settings({"network_def": basic, "max_epochs": 5},
                              {"network_def#features": [8, 8, 16, 32, 64, 8], "loss_name": "dice_ce"})
    assert merged == {"network_def": {**basic, "features": [8, 8, 16, 32, 64, 8]}, "max_epochs": 5,
                      "loss_name": "dice_ce"}
    assert basic["features"] == [4, 4, 8, 16, 32, 4]  # the earlier settings are not changed
    assert _merged_settings({"network_def#channels": [4, 8]}, {"network_def": basic}) == {"network_def": basic}
    assert _merged_settings({"lr": 0.1}, {"lr#x": 1}) == {"lr#x": 1}  # a part of what is no component


def test_an_exports_docs_say_where_a_setting_no_config_holds_is_kept(tmp_path):
    # a bundle whose configs are not JSON (or hold no such id) gets no setting written: the docs said "written
    # into configs/" of them all
    from medseg.export import _Export, _write_docs_header

    about = _Export(BUNDLE, "0" * 64, {"ema_momentum": 0.5, "loss_name": "dice_ce"}, None, False,
                    name="isbi_em", unplaced=("ema_momentum",))
    _write_docs_header(tmp_path / "README.md", about, described=False, scripted=False)
    docs = (tmp_path / "README.md").read_text()
    assert docs.startswith("# Exported model: trained weights of the bundle isbi_em\n")
    assert "`ema_momentum` not in `configs/`" in docs and "`models/config.json`, the training's own record" in docs
    _write_docs_header(tmp_path / "all.md", about._replace(unplaced=()), described=False, scripted=False)
    assert "not in `configs/`" not in (tmp_path / "all.md").read_text()



def test_an_export_of_an_export_of_a_bundle_without_docs_holds_one_header(tmp_path):
    # the first export of a bundle without docs/README.md writes the header alone; a second export kept it below
    # its own, so the docs described two exports' weights
    from medseg.export import _Export, _write_docs_header

    first = _Export(BUNDLE, "1" * 64, {}, None, False, name="isbi_em")
    _write_docs_header(tmp_path / "README.md", first, described=False, scripted=False)
    _write_docs_header(tmp_path / "README.md", first._replace(sha256="2" * 64), described=False, scripted=False)
    docs = (tmp_path / "README.md").read_text()
    assert docs.count("# Exported model:") == 1 and "2" * 64 in docs and "1" * 64 not in docs
    # notes written below such a header are the docs the next export keeps
    (tmp_path / "README.md").write_text(docs + "\n## Lab notes\n\nStained with DAPI.\n")
    _write_docs_header(tmp_path / "README.md", first._replace(sha256="3" * 64), described=False, scripted=False)
    docs = (tmp_path / "README.md").read_text()
    assert docs.count("# Exported model:") == 1 and "3" * 64 in docs and "2" * 64 not in docs
    assert docs.endswith("---\n\n## Lab notes\n\nStained with DAPI.\n")
    # notes with a rule of their own, below a header alone: all of them kept
    (tmp_path / "alone.md").write_text(docs.split("\n\n---\n\n")[0].split("\n\nEverything below")[0] +
                                       "\nOur notes.\n\n---\n\nMore notes.\n")
    _write_docs_header(tmp_path / "alone.md", first, described=False, scripted=False)
    assert (tmp_path / "alone.md").read_text().endswith("---\n\nOur notes.\n\n---\n\nMore notes.\n")


def test_a_refused_export_names_the_source_and_leaves_nothing(trained, tmp_path, monkeypatch):
    # a broken config of the source bundle was named as the export's temporary copy, which was gone; a file in
    # the output's path was "File exists", a folder given as the checkpoint "not found", and folders made for
    # the output stayed after a failed export
    broken = shutil.copytree(BUNDLE, tmp_path / "broken", ignore=shutil.ignore_patterns("models"))
    (broken / "configs" / "evaluate.json").write_text("{oops")
    _assert_one_line_error(_invoke("export", broken, trained["out"] / "model.pt", tmp_path / "x"),
                           f"{broken / 'configs' / 'evaluate.json'}: cannot read", "fix it")
    (tmp_path / "afile").write_text("")
    _assert_one_line_error(_invoke("export", BUNDLE, trained["out"] / "model.pt", tmp_path / "afile" / "x"),
                           "afile: a file, not a folder")
    _assert_one_line_error(_invoke("export", BUNDLE, trained["out"], tmp_path / "x"), "a folder, not a checkpoint",
                           str(trained["out"] / "model.pt"))
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    _assert_one_line_error(_invoke("export", BUNDLE, other, tmp_path / "deep" / "er" / "x"), "do not fit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "broken", "other.pt"]
    # a bundle given as '.' is named by its metadata, not by an empty folder name
    monkeypatch.chdir(BUNDLE)
    assert _invoke("export", ".", trained["out"] / "model.pt", tmp_path / "dot").exit_code == 0
    assert "of the bundle \n" not in (tmp_path / "dot" / "docs" / "README.md").read_text()


def test_extending_a_moved_training_started_with_output_dot(trained, tmp_path, monkeypatch):
    # config.json records whose store the run logged to, so a relative --output (even '.') is no guess
    import mlflow

    (tmp_path / "dot").mkdir()
    monkeypatch.chdir(tmp_path / "dot")
    args = ("--data", trained["data"], "--no-progress", "--device", "cpu", *_tiny_args())
    assert _invoke("train", BUNDLE, "--epochs", 2, "--output", ".", *args).exit_code == 0
    assert json.loads((tmp_path / "dot" / "config.json").read_text())["_tracking_"]["tracking_store"] == "folder"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dot").rename(tmp_path / "moved")
    result = _invoke("train", BUNDLE, "--epochs", 3, "--resume", "--output", tmp_path / "moved", *args)
    assert result.exit_code == 0, result.output
    # no store at the old place (MLflow's in-process caches may still put an artifact there, which a new
    # process, as a user's resume is, does not)
    assert not (tmp_path / "dot" / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'moved' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2, 3]


def test_resume_logs_to_the_store_the_run_was_tracked_in(trained, tmp_path, monkeypatch):
    # trained with --tracking-uri (a shared store), resumed without it: the run there is continued, no
    # second store is started in the folder
    import mlflow

    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    out = tmp_path / "run"
    args = ("--data", trained["data"], "--output", out, "--no-progress", "--device", "cpu", *_tiny_args())
    assert _invoke("train", BUNDLE, "--epochs", 2, "--tracking-uri", uri, *args).exit_code == 0
    monkeypatch.chdir(tmp_path)  # from elsewhere, too
    result = _invoke("train", BUNDLE, "--epochs", 3, "--resume", *args)
    assert result.exit_code == 0, result.output
    # a resume without tracking keeps that record, so the next tracked one still finds the run
    assert _invoke("train", BUNDLE, "--epochs", 4, "--resume", "--no-tracking", *args).exit_code == 0
    assert _invoke("train", BUNDLE, "--epochs", 5, "--resume", *args).exit_code == 0
    assert not (out / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_epoch")] == [1, 2, 3, 5]
    # network settings are params too, so runs that differ only there can be compared
    assert run.data.params["network_def.channels"] == "[4, 8, 16]" and run.data.params["patch_size"]


def test_overwrite_of_a_run_tracked_elsewhere_says_where_it_was_tracked(trained, tmp_path, caplog):
    # redone without --tracking-uri, the new training logged to the folder's own store without a word, and the
    # replaced run in the shared store was never marked replaced
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    out = tmp_path / "run"
    args = ("--data", trained["data"], "--output", out, "--no-progress", "--device", "cpu", "--epochs", 1,
            *_tiny_args())
    assert _invoke("train", BUNDLE, "--tracking-uri", uri, *args).exit_code == 0
    assert _invoke("train", BUNDLE, "--overwrite", "--tracking-uri", uri, *args).exit_code == 0  # given: unsaid
    assert "the training replaced was tracked in" not in caplog.text
    assert _invoke("train", BUNDLE, "--overwrite", *args).exit_code == 0
    assert f"--overwrite: the training replaced was tracked in {uri}; this one logs to the folder's own store " \
           f"(give --tracking-uri {uri} to log where it did)" in caplog.text
    caplog.clear()  # replacing a run of the folder's own store: nothing to say
    assert _invoke("train", BUNDLE, "--overwrite", *args).exit_code == 0
    assert "the training replaced was tracked in" not in caplog.text


def test_resume_keeps_the_best_model_and_patience(trained, tmp_path):
    # the run before the interruption recorded V_rand 1.0 at epoch 2: no later validation can beat it, so the
    # resumed run must leave model.pt alone, report that best, and stop once patience (2) runs out at epoch 4
    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    history = json.loads((out / "history.json").read_text())
    assert history["val_epoch"] == [1, 2, 3]
    history["val"][1]["val_v_rand"] = 1.0
    (out / "history.json").write_text(json.dumps(history))
    before = (out / "model.pt").read_bytes()
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 6, "--resume",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(),
                     "--set", "early_stop_patience=2", "--set", "val_at_start=true")
    assert result.exit_code == 0, result.output
    assert (out / "model.pt").read_bytes() == before
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["best_metric"] == 1.0 and summary["best_metric_epoch"] == 2
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3, 4] and history["val_epoch"] == [1, 2, 3, 4]  # no fresh-weights check


def test_resume_of_a_run_early_stopping_ended_trains_no_further(trained, tmp_path, caplog):
    # its patience was restored as used up, but Ignite looks only at the next validation: each --resume trained
    # one more epoch, which the uninterrupted run never did, and could replace model.pt
    out = tmp_path / "stopped"
    shutil.copytree(trained["out"], out)
    history = json.loads((out / "history.json").read_text())
    history["val"][0]["val_v_rand"] = 1.0  # the best at epoch 1: patience 2 was used up at epoch 3
    (out / "history.json").write_text(json.dumps(history))
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 6, "--resume",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(),
                     "--set", "early_stop_patience=2")
    assert result.exit_code == 0, result.output
    assert "early stopping ended this run" in caplog.text
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    assert json.loads((out / "history.json").read_text()) == history  # no epoch trained, none validated again
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == 3 and summary["best_metric_epoch"] == 1 and "interrupted" not in summary


@pytest.mark.parametrize("at", ["the last validation", "the end"])
def test_ctrl_c_once_the_training_has_ended_does_not_mark_it_interrupted(tmp_path, isbi_folder, monkeypatch, at):
    # Ctrl-C while the last epoch was validated or the last files written made a finished run KILLED and
    # "interrupted", and told the user to --resume it, which then refused: all its epochs were trained
    import os
    import signal

    import mlflow
    from ignite.engine import Events

    from medseg import workflows

    original = workflows._check_batches

    def press_ctrl_c_at_the_end(trainer, data_dir, parser, *rest):
        original(trainer, data_dir, parser, *rest)
        if at == "the end":
            trainer.add_event_handler(Events.COMPLETED, lambda _: os.kill(os.getpid(), signal.SIGINT))
        else:
            parser.get_parsed_content("validate#evaluator").add_event_handler(
                Events.ITERATION_COMPLETED,
                lambda e: os.kill(os.getpid(), signal.SIGINT) if trainer.state.epoch == 2 and e.state.iteration == 1
                else None)

    monkeypatch.setattr(workflows, "_check_batches", press_ctrl_c_at_the_end)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--epochs", 2, "--data", isbi_folder, "--output", out, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert "interrupted: the training has ended" in result.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and "interrupted" not in summary
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert run.info.status == "FINISHED"


def test_weight_averaging_is_validated_shipped_and_resumed(trained, tmp_path):
    # with ema_momentum set, validation scores the averaged weights and model.pt holds them: evaluating
    # model.pt reproduces the best validation V_rand exactly; --resume restores the average as well
    out = tmp_path / "ema"
    args = ("--data", trained["data"], "--output", out, "--no-progress", "--no-tracking", "--device", "cpu",
            *_tiny_args(), "--set", "ema_momentum=0.3")
    result = _invoke("train", BUNDLE, "--epochs", 3, *args)
    assert result.exit_code == 0, result.output
    last = next(out.glob("last_checkpoint_epoch=3.pt"))
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert set(saved) >= {"model", "ema_model"}
    assert any(not torch.equal(saved["model"][k], saved["ema_model"][k]) for k in saved["model"])
    summary = json.loads((out / "train_summary.json").read_text())
    best = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    history = json.loads((out / "history.json").read_text())
    best_epoch = summary["best_metric_epoch"]
    if best_epoch == 3:  # the best is the last epoch's average
        assert all(torch.equal(best[k], saved["ema_model"][k]) for k in best)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", out / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET),
                     "--set", "ema_momentum=0.3")
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert scored["v_rand"] == pytest.approx(summary["best_metric"], abs=1e-6)
    assert len(history["val"]) == 3
    # a last checkpoint given as --checkpoint runs the averaged weights, those validated, not the raw ones
    from medseg.bundle import load_checkpoint

    network = torch.nn.Module()
    loaded = {}
    network.load_state_dict = lambda state, strict: loaded.update(state)
    load_checkpoint(network, last)
    assert all(torch.equal(loaded[k], saved["ema_model"][k]) for k in saved["ema_model"])
    result = _invoke("train", BUNDLE, "--epochs", 4, "--resume", *args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2, 3, 4]


def test_evaluate_scores_and_records_the_weights_it_loaded_when_the_file_is_replaced(trained, tmp_path, monkeypatch):
    """A training still running into the folder may replace model.pt while evaluate runs: the weights read
    at the start are the ones scored, and the digest recorded is theirs."""
    import hashlib
    import shutil

    import torch

    from medseg import workflows

    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "split.json"):
        shutil.copy(trained["out"] / name, run / name)
    first = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()
    other = {k: v + 0.5 if v.is_floating_point() else v for k, v in torch.load(run / "model.pt").items()}
    args = ("--data", trained["data"], "--checkpoint", run / "model.pt", "--no-progress", "--device", "cpu",
            *_tiny_args(TINY_NET))
    result = _invoke("evaluate", BUNDLE, *args, "--output", tmp_path / "clean")
    assert result.exit_code == 0, result.output
    original = workflows._recorded_split

    def replaced_meanwhile(checkpoints):  # after the weights are read, before the scoring starts
        torch.save(other, run / "model.pt")
        return original(checkpoints)

    monkeypatch.setattr(workflows, "_recorded_split", replaced_meanwhile)
    result = _invoke("evaluate", BUNDLE, *args, "--output", tmp_path / "raced")
    assert result.exit_code == 0, result.output
    raced = json.loads((tmp_path / "raced" / "summary.json").read_text())
    assert raced["run"]["checkpoints"][0]["sha256"] == first
    assert (tmp_path / "raced" / "metrics.csv").read_text() == (tmp_path / "clean" / "metrics.csv").read_text()


def test_evaluate_reads_with_num_workers_and_infer_refuses_them(trained, tmp_path, monkeypatch):
    from medseg import workflows

    started = tmp_path / "workers"
    started.mkdir()

    def noting_worker_init(worker_id: int) -> None:  # runs in the worker process
        (started / str(worker_id)).touch()

    monkeypatch.setattr(workflows, "data_worker_init", noting_worker_init)
    args = ("--data", trained["data"], "--checkpoint", trained["out"] / "model.pt", "--no-progress", "--device",
            "cpu", *_tiny_args(TINY_NET))
    result = _invoke("evaluate", BUNDLE, *args, "--output", tmp_path / "none")
    assert result.exit_code == 0, result.output
    result = _invoke("evaluate", BUNDLE, *args, "--output", tmp_path / "two", "--set", "num_workers=2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in started.iterdir()) == ["0", "1"]  # evaluate's own loader took them
    assert (tmp_path / "two" / "metrics.csv").read_text() == (tmp_path / "none" / "metrics.csv").read_text()
    result = _invoke("infer", BUNDLE, trained["data"], tmp_path / "inf", "--checkpoint",
                     trained["out"] / "model.pt", "--no-progress", "--set", "dataloader#num_workers=2")
    _assert_one_line_error(result, "dataloader#num_workers=2: medseg infer reads each input's slices itself")
    assert not (tmp_path / "inf").exists()


def test_evaluate_scores_the_runs_own_validation_slices(trained, tmp_path, caplog):
    # the run used val_count=1; its split.json beside model.pt sets that without an override (and --tta works)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--tta", "--no-progress", "--device", "cpu",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3"]
    # --set val_count=2 draws by count instead of by the record: slice 2, a training slice, is scored, and said
    with caplog.at_level("WARNING", logger="medseg.workflows"):
        result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                         "--output", tmp_path / "count", "--no-progress", "--device", "cpu",
                         *_tiny_args(TINY_NET), "--set", "val_count=2")
    assert result.exit_code == 0, result.output
    assert any("val_count=2: 1 of the 2 val images scored (first: 2) are training images" in r.getMessage()
               for r in caplog.records)
    # --split train: the other slices (the bundle's val_count of 5 would not fit the 4 slices)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "train", "--split", "train", "--no-progress", "--device", "cpu",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "train" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    # the bundle's own id for it, --set eval_split=train, is --split train; both at odds is an error
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "set", "--set", "eval_split=train", "--no-progress", "--device", "cpu",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "set" / "metrics.csv").read_text() == (tmp_path / "train" / "metrics.csv").read_text()
    overlay = tmp_path / "train_split.yaml"  # an overlay's eval_split counts too
    overlay.write_text("eval_split: train\n")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "overlay", "-c", overlay, "--no-progress", "--device", "cpu",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "overlay" / "metrics.csv").read_text() == (tmp_path / "train" / "metrics.csv").read_text()
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--split", "val", "--set", "eval_split=train", "--no-progress", "--device", "cpu")
    assert result.exit_code == 1
    assert result.output.strip() == "error: --set eval_split=train contradicts --split val; give one of them"


def test_evaluate_elsewhere_scores_the_runs_validation_slices_by_name(trained, tmp_path):
    # the run trained on slices 0-2 and validated on 3. Another folder was scored on its last slice by count,
    # whichever it was (a training slice where slice 3 is missing); by name it is slice 3, here amid slices 2
    # and a new 4, and a folder without slice 3 is an error
    other = tmp_path / "other"
    for sub in ("image", "label"):
        (other / "train" / sub).mkdir(parents=True)
        for k in (2, 3):
            shutil.copy(trained["data"] / "train" / sub / f"{k}.png", other / "train" / sub / f"{k}.png")
        Image.fromarray(synthetic_em(size=96, seed=9)[0 if sub == "image" else 1]).save(other / "train" / sub / "4.png")
    args = ("--checkpoint", trained["out"] / "model.pt", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    result = _invoke("evaluate", BUNDLE, "--data", other, "--output", tmp_path / "eval", *args)
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3"]
    for sub in ("image", "label"):
        (other / "train" / sub / "3.png").unlink()
    result = _invoke("evaluate", BUNDLE, "--data", other, "--output", tmp_path / "eval2", *args)
    assert result.exit_code == 1
    assert "none of the 1 val images that" in result.output and "pass --split all" in result.output


def test_evaluate_a_copy_of_the_validation_slices_alone_scores_them(trained, tmp_path):
    # the record's count was applied to the copy: "cannot hold out 1 validation slices from 1; lower val_count"
    held_out = tmp_path / "held_out"
    for sub in ("image", "label"):
        (held_out / "train" / sub).mkdir(parents=True)
        shutil.copy(trained["data"] / "train" / sub / "3.png", held_out / "train" / sub / "3.png")
    result = _invoke("evaluate", BUNDLE, "--data", held_out, "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3"]


def test_evaluate_with_no_image_to_score_is_an_error_not_an_empty_success(trained, tmp_path):
    # the evaluator did not run, so no report was written, yet the command printed {} and its paths, exit 0
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET),
                     "--set", "val_count=0")
    _assert_one_line_error(result, f"{trained['data']}: no val images to score among its 4 labelled images",
                           "pass --split all")
    assert not (tmp_path / "eval").exists()


def test_an_empty_argument_is_refused_before_it_becomes_the_current_folder(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", "", "--split", "all", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    _assert_one_line_error(result, "--output is given an empty value", "unset shell variable")
    result = _invoke("infer", BUNDLE, trained["data"] / "train" / "image", "", "--no-progress")
    _assert_one_line_error(result, "argument 3 after 'infer' is empty")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint=")
    _assert_one_line_error(result, "--checkpoint is given an empty value")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--output=  ")
    _assert_one_line_error(result, "--output is given an empty value")
    result = _invoke("infer", BUNDLE, "--no-progress", "--", trained["data"], "")
    _assert_one_line_error(result, "argument 5 after 'infer' is empty")
    result = _invoke("infer", BUNDLE, "--no-progress", trained["data"] / "missing", "out", "--set=tta=")
    assert "empty" not in result.output  # KEY= is a value (here one tta refuses)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_data_given_as_a_file_names_its_folder(trained, tmp_path):
    # an image of image/ + label/ (images/ + masks/): the folder holding both, not image/, which holds no labels
    png = trained["data"] / "train" / "image" / "0.png"
    result = _invoke("evaluate", BUNDLE, "--data", png, "--checkpoint", trained["out"] / "model.pt")
    _assert_one_line_error(result, f"{png}: a file, not a folder; pass --data {png.parent.parent}, the folder that "
                                   "holds image/ and label/")
    loose = tmp_path / "0.png"
    shutil.copyfile(png, loose)
    result = _invoke("evaluate", BUNDLE, "--data", loose, "--checkpoint", trained["out"] / "model.pt")
    _assert_one_line_error(result, f"{loose}: a file, not a folder; pass --data {tmp_path}, the folder that holds it")


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_a_blank_slice_is_scored_and_trained_on_without_a_warning(trained, tmp_path, command):
    # MONAI's "Divide by zero (a_min == a_max)" was printed for each constant image (air slices of a CT), naming
    # no file, as infer does not
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(data / "train" / "image" / "0.png")  # trained on
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(data / "train" / "image" / "3.png")  # validated
    args = ("--checkpoint", trained["out"] / "model.pt", "--output", tmp_path / "eval") if command == "evaluate" \
        else ("--output", tmp_path / "run", "--epochs", 1, "--no-tracking")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = _invoke(command, BUNDLE, "--data", data, *args, "--no-progress", "--device", "cpu",
                         *_tiny_args(TINY_NET if command == "evaluate" else TINY))
    assert result.exit_code == 0, result.output
    assert not [w for w in said if "a_min == a_max" in str(w.message)]
    assert "a_min == a_max" not in result.output


def test_evaluate_into_the_run_folder_keeps_its_split_record(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["out"], run)
    before = (run / "split.json").read_bytes()
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", run / "model.pt",
                     "--output", run, "--split", "all", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET),
                     "--set", "val_count=2")
    assert result.exit_code == 0, result.output
    assert (run / "split.json").read_bytes() == before and (run / "metrics.csv").is_file()


def test_bad_input_unreadable_split_record(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained["out"] / "model.pt", run / "model.pt")
    (run / "split.json").write_text("{not json")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", run / "model.pt",
                     "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 1
    assert "split.json: not a readable split record" in result.output and "Traceback" not in result.output


def test_evaluate_all_of_fewer_slices_than_the_bundle_holds_out(trained, tmp_path):
    # --split all on 4 slices failed: "cannot hold out 5 validation slices from 4"
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--split", "all", "--no-progress", "--device", "cpu",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["images"] == 4


def test_an_evaluations_record_names_the_split_it_scored_absolutely(trained, tmp_path, monkeypatch):
    # run.split_from was relative to the working folder, unlike the record's other paths
    monkeypatch.chdir(trained["out"].parent)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", Path(trained["out"].name) /
                     "model.pt", "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", "--no-tracking",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "eval" / "summary.json").read_text())["run"]
    assert run["split_from"] == str(trained["out"] / "split.json")


def test_evaluate_writes_csv_and_summary(trained, tmp_path, monkeypatch):
    import medseg.evaluation

    written, real_write = [], medseg.evaluation._write_report

    def write_report(output_dir, rows, summary, run=None):  # summary.json is written once, whole with its run
        written.append(run is not None)
        return real_write(output_dir, rows, summary, run)

    monkeypatch.setattr(medseg.evaluation, "_write_report", write_report)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--split", "all", "--no-progress", "--device", "cpu",
                     *_tiny_args())
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 4 and written == [True]
    for key in ("v_rand", "v_info", "dice", "iou", "pixel_accuracy", "pixel_error", "pixel_mismatch"):
        assert 0.0 <= summary[key] <= 1.0, key
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("name,dice,iou") and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    # what produced these numbers, so that another evaluation into the folder is told apart
    from medseg.io import file_sha256

    run = summary["run"]
    assert run["checkpoints"] == [{"path": str((trained["out"] / "model.pt").resolve()),
                                   "sha256": file_sha256(trained["out"] / "model.pt")}]
    assert run["bundle"].startswith("ISBI 2012 EM membrane segmentation ")  # its metadata's name, as infer's
    assert run["split"] == "all" and run["split_from"] == "all images"
    assert run["tta"] is False and run["data_dir"] == str(trained["data"].resolve())
    assert run["environment"]["versions"]["torch"] == torch.__version__ and run["environment"]["device"] == "cpu"
    assert run["environment"]["amp"] is False
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--tta", "--no-progress", "--device", "cpu", "--overwrite",
                     *_tiny_args(TINY_NET))
    run = json.loads((tmp_path / "eval" / "summary.json").read_text())["run"]
    assert run["tta"] is True and run["split"] == "val" and run["split_from"] == str(trained["out"] / "split.json")


def test_evaluate_replaces_only_its_own_report_unless_told(trained, tmp_path):
    """The same evaluation again replaces its report, however its settings are reached; another one (split,
    tta, checkpoint, settings, an overlay's content) would lose the earlier figures, so it is refused without
    --overwrite, as are files of its names no evaluation wrote; while one evaluation writes into a folder,
    another is refused."""
    out = tmp_path / "eval"
    common = ("evaluate", BUNDLE, "--data", trained["data"], "--output", out, "--no-progress", "--device", "cpu")
    base = (*common, "--checkpoint", trained["out"] / "model.pt")
    assert _invoke(*base).exit_code == 0  # the network's settings from the training's config.json
    first = json.loads((out / "summary.json").read_text())
    assert len(first["run"]["settings_sha256"]) == 64
    # the same evaluation: the same values by --set, a speed-only setting, the same weights elsewhere
    for extra in (_tiny_args(TINY_NET), ("--set", "num_workers=0"), ("--no-tta",)):
        result = _invoke(*base, *extra)
        assert result.exit_code == 0, result.output
    copy = tmp_path / "copy" / "model.pt"
    copy.parent.mkdir()
    for name in ("model.pt", "split.json", "config.json"):
        shutil.copy2(trained["out"] / name, copy.parent / name)
    assert _invoke(*common, "--checkpoint", copy).exit_code == 0
    report = (out / "summary.json").read_text(), (out / "metrics.csv").read_text()
    overlay = tmp_path / "overlay.json"
    overlay.write_text('{"merge_threshold": 0.3}')
    settings = "settings"
    others = ((("--split", "all"), "split"), (("--tta",), "tta"), (("--set", "merge_threshold=0.3"), settings),
              (("--config", overlay), settings))
    for extra, differ in others:
        result = _invoke(*base, *extra)
        _assert_one_line_error(result, str(out), f"holds the report of another evaluation (other {differ})",
                               "--overwrite", "another --output")
        assert ((out / "summary.json").read_text(), (out / "metrics.csv").read_text()) == report
    # an overlay edited since is another evaluation, though its path is the same
    assert _invoke(*base, "--config", overlay, "--overwrite").exit_code == 0
    overlay.write_text('{"merge_threshold": 0.7}')
    _assert_one_line_error(_invoke(*base, "--config", overlay), f"(other {settings})")
    other = tmp_path / "other" / "model.pt"  # other weights
    other.parent.mkdir()
    weights = torch.load(trained["out"] / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, other)
    shutil.copy2(trained["out"] / "config.json", other.parent / "config.json")
    _assert_one_line_error(_invoke(*common, "--checkpoint", other, "--split", "all"),
                           "(other checkpoints; split; settings)")
    result = _invoke(*base, "--split", "all", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["run"]["split"] == "all" and first["run"]["split"] == "val"
    # the same checkpoint file with other weights (trained again into its folder) is named as changed
    changed = tmp_path / "changed"
    shutil.copytree(copy.parent, changed)
    assert _invoke(*common, "--checkpoint", changed / "model.pt", "--split", "all", "--overwrite").exit_code == 0
    shutil.copy2(other, changed / "model.pt")
    _assert_one_line_error(_invoke(*common, "--checkpoint", changed / "model.pt", "--split", "all"),
                           "(other checkpoints: the checkpoint has changed since it was scored, trained again")
    # an ensemble is the same in any order
    pair = (*common, "--split", "all", "--output", tmp_path / "pair")
    assert _invoke(*pair, "--checkpoint", trained["out"] / "model.pt", "--checkpoint", other).exit_code == 0
    assert _invoke(*pair, "--checkpoint", other, "--checkpoint", trained["out"] / "model.pt").exit_code == 0
    # files of the report's names that no evaluation wrote; a folder of its name, which no --overwrite replaces
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my,own\n")
    _assert_one_line_error(_invoke(*base, "--output", mine), "holds metrics.csv without a record of the evaluation",
                           "that wrote it; replace it with --overwrite")
    assert (mine / "metrics.csv").read_text() == "my,own\n" and not (mine / "summary.json").exists()
    assert _invoke(*base, "--output", mine, "--overwrite").exit_code == 0
    (tmp_path / "odd" / "summary.json").mkdir(parents=True)
    for flags in ((), ("--overwrite",)):
        _assert_one_line_error(_invoke(*base, "--output", tmp_path / "odd", *flags),
                               "odd/summary.json: a folder, where the report is written")
    assert not (tmp_path / "odd" / "metrics.csv").exists()
    # one evaluation at a time per folder
    from medseg.locking import folder_lock

    with folder_lock(out, "evaluate"):
        _assert_one_line_error(_invoke(*base, "--overwrite"), "medseg evaluate (process", "is writing into this folder")


def test_tifffiles_own_log_of_a_damaged_file_is_not_shown_unless_debugging(trained, tmp_path, caplog):
    """tifffile logs a broken tag as it reads past it; the command's own output (or one-line error) says
    what matters, and --debug keeps the log."""
    import struct

    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    label = np.asarray(Image.open(data / "train" / "label" / "0.png"))
    (data / "train" / "label" / "0.png").unlink()
    tifffile.imwrite(data / "train" / "label" / "0.tif", label)
    raw = bytearray((data / "train" / "label" / "0.tif").read_bytes())
    ifd = struct.unpack("<I", raw[4:8])[0]
    for k in range(struct.unpack("<H", raw[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", raw[entry:entry + 2])[0] == 305:  # Software: an unknown data type
            raw[entry + 2:entry + 4] = struct.pack("<H", 99)
    (data / "train" / "label" / "0.tif").write_bytes(raw)
    args = ("evaluate", BUNDLE, "--data", data, "--checkpoint", trained["out"] / "model.pt", "--split", "all",
            "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    result = _invoke(*args, "--output", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]
    result = _invoke("--debug", *args, "--output", tmp_path / "eval2")
    assert result.exit_code == 0, result.output
    assert any("invalid data type 99" in r.getMessage() for r in caplog.records if r.name.startswith("tifffile"))


def test_a_run_checkpoint_that_does_not_fit_points_to_the_runs_recorded_settings(trained, tmp_path):
    # the run's own network is used unless network_def values are given, as here
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval", "--no-progress", "--device", "cpu",
                     "--set", "network_def#channels=[8,16,32]")
    _assert_one_line_error(result, "model.pt: weights do not fit this bundle's network",
                           f"trained with are recorded in {trained['out'] / 'config.json'}", "compare its network_def")


def test_infer_png_folder_and_tiff_stack_with_tta(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = synthetic_em(size=80, seed=9)
    Image.fromarray(image).save(inputs / "slice.png")
    stack = np.stack([synthetic_em(size=72, seed=s)[0] for s in (1, 2, 3)])
    tifffile.imwrite(inputs / "vol.tif", stack, photometric="minisblack")
    out = tmp_path / "out"
    result = _invoke("infer", BUNDLE, inputs, out, "--checkpoint", trained["out"] / "model.pt", "--tta",
                     "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["inputs"] == 2 and summary["ok"] == 2 and summary["slices"] == 4
    mask = np.asarray(Image.open(out / "mask" / "slice.png"))
    assert mask.shape == (80, 80) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    prob = tifffile.imread(out / "prob" / "slice.tif")
    assert prob.dtype == np.float32 and prob.shape == (80, 80) and 0.0 <= prob.min() <= prob.max() <= 1.0
    np.testing.assert_array_equal(mask == 255, prob > 0.5)
    assert tifffile.imread(out / "mask" / "vol.tif").shape == (3, 72, 72)
    assert tifffile.imread(out / "prob" / "vol.tif").shape == (3, 72, 72)
    assert not [p for p in out.rglob(".*")]  # no temporary files left


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not DATA_FOUND.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_full_disk_while_writing_the_history_names_it_and_says_to_resume(tmp_path, isbi_folder, monkeypatch):
    # the write failed without a file name ("cannot write (No space left on device)") and said "run again",
    # which a folder holding a trained run refuses: --resume is what carries on from the finished epochs
    import errno

    out = tmp_path / "run"
    write_text = Path.write_text

    def full_once_an_epoch_is_saved(self, data, *args, **kwargs):
        if "history" in self.name and any(out.glob("last_checkpoint_epoch=*.pt")):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write raises it
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_once_an_epoch_is_saved)
    args = ("--data", isbi_folder, "--output", out, "--epochs", 3, "--no-progress", "--no-tracking",
            "--device", "cpu", *_tiny_args())
    result = _invoke("train", BUNDLE, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {out / 'history.json'}: cannot write (No space left on device); free disk space, or raise the "
        f"quota or file-size limit, and continue with --resume --output {out}")
    assert not list(out.glob(".*.part"))
    monkeypatch.setattr(Path, "write_text", write_text)
    result = _invoke("train", BUNDLE, *args, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2, 3]


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_resume_with_nothing_to_resume_says_so_before_checking_the_data(tmp_path, isbi_folder, folder):
    # the bundle's own val_count (5) cannot be held out of 4 slices: that error used to hide the real one
    out = tmp_path / folder
    if folder == "empty":
        out.mkdir()
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", out, "--resume", "--no-progress")
    _assert_one_line_error(result, f"{out}: no last checkpoint to resume from; start anew without --resume")
    assert out.is_dir() == (folder == "empty") and not any(out.glob("*") if out.is_dir() else ())


def test_bad_input_missing_data_folder(tmp_path):
    result = _invoke("train", BUNDLE, "--data", tmp_path / "missing", "--output", tmp_path / "o")
    _assert_one_line_error(result, "missing", "data folder not found")


def test_bad_input_image_without_label(tmp_path):
    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    (data / "train" / "label" / "1.png").unlink()
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "o", "--no-tracking")
    _assert_one_line_error(result, "1.png", "no label found")


def test_bad_input_label_of_another_size(tmp_path):
    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(data / "train" / "label" / "0.png")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "o", "--no-tracking",
                     "--no-progress", *_tiny_args())
    _assert_one_line_error(result, "0.png", "must have the same size")


def test_bad_input_non_binary_label(tmp_path):
    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    label = np.zeros((48, 48), np.uint8)
    label[:10] = 128
    Image.fromarray(label).save(data / "train" / "label" / "2.png")
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "o", "--no-tracking",
                     "--no-progress", *_tiny_args())
    _assert_one_line_error(result, "2.png", "label values 128 are not binary")


def test_a_run_folder_in_the_data_folder_is_refused(tmp_path, isbi_folder):
    # the run's model.pt, mlflow.db, curves.png ... were written among the images, without a word
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", isbi_folder, "--epochs", 1, "--no-progress",
                     *_tiny_args())
    _assert_one_line_error(result, f"{isbi_folder}: the data folder itself (--data), where the run's files would mix "
                           "with the images; give --output a folder of its own, such as runs/NAME")
    assert not (isbi_folder / "model.pt").exists()
    # a folder inside it is a folder of its own (a project folder holding image/, label/ and runs/), as is an
    # empty validation folder setting
    os.chdir(isbi_folder)
    try:
        result = _invoke("train", BUNDLE, "--data", ".", "--output", "runs/em1", "--epochs", 1, "--no-progress",
                         "--no-tracking", "--set", 'val_dir=""', *_tiny_args())
    finally:
        os.chdir(REPO)
    assert result.exit_code == 0, result.output
    assert (isbi_folder / "runs" / "em1" / "model.pt").is_file()
    held = write_isbi_folder(tmp_path / "held", n=2)  # the validation folder as the output: refused alike
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--val-data", held, "--output", held, "--epochs", 1,
                     "--no-progress", *_tiny_args())
    _assert_one_line_error(result, f"{held}: the data folder itself (--val-data)")
    assert not (held / "model.pt").exists()


def test_make_demo_refuses_a_demo_it_has_no_data_for_before_anything_runs(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    # DEMO=isbi ran medseg train with an empty --data, which then took --output's value for its own; the venv
    # given cannot be made (a folder under a file), so nothing is installed whatever happens
    (tmp_path / "file").write_text("")
    result = subprocess.run(["make", "-s", "demo", "DEMO=isbi", f"VENV={tmp_path / 'file' / 'venv'}"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout.splitlines()[0] == ("make demo: DEMO=isbi is not one of isbi_em, jurkat, nuclei; give one "
                                             "of those, or DATA=... (and INFER=...) for bundles/isbi")


def test_bad_input_unknown_bundle(tmp_path, isbi_folder):
    result = _invoke("train", tmp_path / "no_bundle", "--data", isbi_folder, "--output", tmp_path / "o")
    _assert_one_line_error(result, "no_bundle: bundle folder not found")
    # a shipped bundle's path given from another folder: where it was looked for, and where the bundles are
    os.chdir(tmp_path)
    try:
        result = _invoke("train", "bundles/isbi_em", "--data", isbi_folder, "--output", tmp_path / "o")
    finally:
        os.chdir(REPO)
    _assert_one_line_error(result, f"bundles/isbi_em: bundle folder not found (looked for at "
                           f"{tmp_path / 'bundles' / 'isbi_em'}); the bundles that come with medseg are in "
                           f"{REPO / 'bundles'}: give {BUNDLE}")
    (tmp_path / "no_bundle").mkdir()
    result = _invoke("train", tmp_path / "no_bundle", "--data", isbi_folder, "--output", tmp_path / "o")
    _assert_one_line_error(result, "no_bundle: not a bundle (no configs/metadata.json)")


def test_bad_input_unknown_override_key(tmp_path, isbi_folder):
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o",
                     "--set", "learning_rat=0.1")
    _assert_one_line_error(result, "learning_rat", "did you mean learning_rate")


def test_bad_input_config_value_out_of_range(tmp_path, isbi_folder):
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o", "--no-tracking",
                     *_tiny_args(), "--set", "ema_momentum=2")
    _assert_one_line_error(result, "ema_momentum=2", "(0, 1)")


@pytest.mark.parametrize("extra, names", [
    (("--epochs", 0), ("max_epochs=0", "at least one epoch")),
    (("--max-minutes", -1), ("--max-minutes -1", "positive time")),
    (("--set", "learning_rate=abc"), ("learning_rate='abc'", "is a number (0.001); give a number")),
    (("--set", "cpu_bf16=1"), ("cpu_bf16=1", "is true or false")),
], ids=["no epochs", "negative time", "word for a number", "number for a switch"])
def test_bad_input_training_values(tmp_path, isbi_folder, extra, names):
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o", "--no-tracking", *extra)
    _assert_one_line_error(result, *names)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_bad_input_output_folder_that_is_a_file(trained, tmp_path, isbi_folder):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", taken, "--no-tracking", *_tiny_args())
    _assert_one_line_error(result, "taken", "a file, not a folder; choose another output folder")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", taken, "--device", "cpu", *_tiny_args(TINY_NET))
    _assert_one_line_error(result, "taken", "a file, not a folder; choose another output folder")
    # a checkpoint that is not there is reported before any output folder is made
    result = _invoke("infer", BUNDLE, isbi_folder, tmp_path / "new_out", "--checkpoint", tmp_path / "none.pt")
    _assert_one_line_error(result, "none.pt", "checkpoint not found")
    assert not (tmp_path / "new_out").exists()


def _has_cpu_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch raises its own error types when no compiler is found
        return False
    return True


@pytest.mark.skipif(not _has_cpu_compiler(), reason="torch.compile needs a C++ compiler on the CPU")
def test_train_with_compile_saves_a_plain_checkpoint_that_evaluates(tmp_path, isbi_folder, monkeypatch):
    """``compile: true`` trains through MONAI's ``torch.compile`` path; model.pt holds the plain network's weights."""
    compiled = []
    original = torch.compile

    def spy(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    out = tmp_path / "run"
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", out, "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args(), "--set", "compile=true")
    assert result.exit_code == 0, result.output
    assert compiled == ["UNet"]  # the trainer compiled the network once
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert state and not any("_orig_mod" in key for key in state)
    result = _invoke("evaluate", BUNDLE, "--data", isbi_folder, "--checkpoint", out / "model.pt", "--output",
                     tmp_path / "eval", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output


def test_bad_input_compile_without_a_cpu_compiler(tmp_path, isbi_folder, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("No working C++ compiler found in cpp_builder.py\n(details)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o", "--no-tracking",
                     "--device", "cpu", *_tiny_args(), "--set", "compile=true")
    _assert_one_line_error(result, "compile=true", "--set compile=false")


def test_bad_input_checkpoint_of_another_network(trained, tmp_path):
    # the default bundle network (16..256 channels) cannot take the tiny network's weights, here without the
    # run's record of its network beside them
    shutil.copy(trained["out"] / "model.pt", tmp_path / "model.pt")
    result = _invoke("infer", BUNDLE, trained["data"] / "train" / "image", tmp_path / "o",
                     "--checkpoint", tmp_path / "model.pt")
    _assert_one_line_error(result, "model.pt", "do not fit this bundle's network")
    assert "recorded" not in result.output
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", tmp_path / "none.pt")
    _assert_one_line_error(result, "none.pt", "checkpoint not found")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    # the one-line errors say "--debug shows the traceback": after the command it is taken too
    args = ["train", str(BUNDLE), "--data", str(tmp_path / "x"), "--output", str(tmp_path / "o")]
    result = runner.invoke(app, ["--debug", *args] if where == "before" else [*args, "--debug"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "DataError", result.output
    plain = runner.invoke(app, args)
    assert plain.exit_code == 1 and plain.output.startswith("error: ") and plain.exception is not None


@pytest.mark.parametrize("length", [("--epochs", 1), ("--epochs", 500, "--max-minutes", 0.02)],
                         ids=["last epoch", "time limit"])
def test_model_from_the_end_of_run_validation_is_tracked(tmp_path, isbi_folder, length):
    # training ends before its first validation: model.pt comes from one validation at the end, which
    # logs to the same MLflow run (not a second one), as the summary does
    import mlflow

    out = tmp_path / "short"
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", out, *length, "--no-progress",
                     "--device", "cpu", *_tiny_args(), "--set", "val_interval=1000")
    assert result.exit_code == 0, result.output
    assert (out / "model.pt").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])
    assert len(runs) == 1
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"model.pt", "train_summary.json", "config.json"} <= artifacts
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_dice")) == 1
    if "--max-minutes" in length:  # stopped by the limit (about a second), not by 500 epochs
        summary = json.loads((out / "train_summary.json").read_text())
        assert "interrupted" not in summary and summary["epochs"] < 500 and summary["wall_seconds"] < 10


def test_engine_logs_of_a_user_error_are_dropped_unless_debug():
    # Ignite and MONAI log every exception they re-raise, with its traceback; the CLI reports it in one line
    import io
    import logging

    from medseg.errors import DataError, quiet_user_error_logs, show_user_error_logs

    stream = io.StringIO()
    logger = logging.getLogger("medseg.test.engine")
    logger.addHandler(logging.StreamHandler(stream))

    def log_failure(err: Exception, message: str = "Exception") -> None:
        try:
            raise RuntimeError("applying transform") from err
        except RuntimeError as exc:
            logger.error(f"Engine run is terminating due to exception: {exc}")
            logger.exception(f"{message}: {exc}")

    try:
        with quiet_user_error_logs():
            log_failure(DataError("x.png: label values 77 are not binary"))
            assert stream.getvalue() == ""
            log_failure(ValueError("a bug"))  # on its way out to the CLI, which reports it in one line
            assert stream.getvalue() == ""
            log_failure(ValueError("a bug"), message="could not save")  # another log of a failure: kept
            assert "could not save" in stream.getvalue() and "Traceback" in stream.getvalue()
            assert "terminating" not in stream.getvalue()
        stream.seek(0)
        stream.truncate(0)
        log_failure(DataError("x.png"))  # after the run: the caller's own logs are untouched
        assert "Traceback" in stream.getvalue()
        show_user_error_logs(True)  # --debug
        stream.seek(0)
        stream.truncate(0)
        with quiet_user_error_logs():
            log_failure(DataError("x.png"))
        assert "Traceback" in stream.getvalue()
    finally:
        show_user_error_logs(False)
        logger.handlers.clear()


def test_pool_workers_still_in_a_task_are_waited_for_after_an_error():
    # MONAI's CacheDataset fills its cache in a thread pool; when one item fails, the others are still
    # running: exiting under them aborted the process (exit 134) after the one-line error
    import threading
    import time
    from multiprocessing.dummy import DummyProcess
    from multiprocessing.pool import ThreadPool

    from medseg.workflows import _let_pool_threads_finish, _pool_threads

    idle = ThreadPool(1)  # a caller's own pool, idle: not waited for
    before = _pool_threads()
    done = threading.Event()

    def task(k: int) -> int:
        if k == 0:
            raise ValueError("bad item")
        time.sleep(0.5)
        done.set()
        return k

    with pytest.raises(ValueError), ThreadPool(2) as pool:
        list(pool.imap(task, range(4)))
    start = time.monotonic()
    _let_pool_threads_finish(_pool_threads() - before, timeout=30)
    assert done.is_set() and time.monotonic() - start < 10  # the idle pool's workers were not joined
    assert not [t for t in _pool_threads() - before if isinstance(t, DummyProcess)]
    idle.terminate()


def test_a_lengthened_resume_names_the_schedule_period_it_keeps(tmp_path, isbi_folder, caplog):
    args = ("--data", isbi_folder, "--output", tmp_path / "run", "--no-progress", "--no-tracking", "--device", "cpu")
    result = _invoke("train", BUNDLE, *args, "--epochs", 1, *_tiny_args())
    assert result.exit_code == 0, result.output
    for epochs in (2, 3):  # the second lengthening: config.json says 2 by now, the schedule's period is still 1
        caplog.clear()
        with caplog.at_level("WARNING", logger="medseg.runfolder"):
            result = _invoke("train", BUNDLE, *args, "--epochs", epochs, "--resume")
        assert result.exit_code == 0, result.output
        said = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
        assert said == [f"--epochs {epochs}: the learning-rate schedule restored from the checkpoint keeps its "
                        "period of 1 epoch (a cosine schedule rises again after it); to anneal over the new "
                        "length, train anew with --overwrite"]


@pytest.mark.parametrize(("extra", "words"), [((), "run the same command again to do the rest"),
                                              (("--overwrite",), "run the same command again to redo every input "
                                                              "(--overwrite redoes those done too)")])
def test_ctrl_c_of_infer_says_what_running_it_again_does(tmp_path, monkeypatch, extra, words):
    from medseg import workflows

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "infer", stopped)
    (tmp_path / "in").mkdir()
    # before any input was done (the folder not even made): nothing is said to be kept there
    result = _invoke("infer", BUNDLE, tmp_path / "in", tmp_path / "out", *extra)
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == ["error: interrupted; no input was finished; run the same command again"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.csv").write_text("input,status\nin/notes.txt,ignored\nin/b.png,failed\n")
    result = _invoke("infer", BUNDLE, tmp_path / "in", tmp_path / "out", *extra)  # none done: files of other types
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == ["error: interrupted; no input was finished; run the same command again"]
    (tmp_path / "out" / "manifest.csv").write_text("input,status\nin/notes.txt,ignored\nin/a.png,ok\n")
    result = _invoke("infer", BUNDLE, tmp_path / "in", tmp_path / "out", *extra)
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == [f"error: interrupted; finished inputs are kept in {tmp_path / 'out'}; {words}"]


def test_ctrl_c_of_evaluate_says_no_report_was_written(trained, tmp_path, monkeypatch):
    from medseg import workflows

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "evaluate", stopped)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval")
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == ["error: interrupted; no report written; run it again to score"]  # none there to keep
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text("{}")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--output", tmp_path / "eval")
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == [f"error: interrupted; no report written (the one already in {tmp_path / 'eval'} is kept as it "
                     "was); run it again to score"]


def test_ctrl_c_while_a_cache_is_filled_waits_for_its_workers_before_exiting():
    """SIGTERM or Ctrl-C while MONAI's CacheDataset fills its cache in a thread pool: the interpreter must not
    exit under workers still inside a transform (it aborted with exit 134 instead of 130)."""
    import threading
    import time
    from multiprocessing.pool import ThreadPool
    from types import SimpleNamespace

    import typer

    from medseg.cli import _run
    from medseg.workflows import _finishing_pool_threads

    inside, done = threading.Event(), threading.Event()

    def task(k: int) -> int:
        if k > 0:
            inside.set()
            time.sleep(0.5)
            done.set()
        return k

    def filling_a_cache() -> None:
        with ThreadPool(2) as pool:
            items = pool.imap(task, range(4))
            next(items)
            inside.wait(10)
            raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as stop:
        _run(SimpleNamespace(obj={}), _finishing_pool_threads(filling_a_cache))  # as train and evaluate are
    assert stop.value.exit_code == 130
    assert done.is_set()  # the worker's task ended before the command did
    from medseg import workflows  # also for Python callers of the workflows that fill caches

    assert workflows.train.__wrapped__ and workflows.evaluate.__wrapped__


@pytest.mark.parametrize("uri", ["foo://bar", "sqlite:////proc/no/such/dir/mlflow.db"])
def test_unusable_tracking_uri_is_one_line(tmp_path, isbi_folder, uri):
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o", "--epochs", 1,
                     "--tracking-uri", uri, "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"--tracking-uri {uri}: not a usable MLflow store" in errors[0], result.output


def test_a_server_address_without_its_scheme_is_named_with_the_fix(tmp_path, isbi_folder):
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o", "--epochs", 1,
                     "--tracking-uri", "127.0.0.1:5077", "--no-progress", "--device", "cpu", *_tiny_args())
    _assert_one_line_error(result, "--tracking-uri 127.0.0.1:5077: a server address without its scheme",
                           "give http://127.0.0.1:5077")
    assert not (tmp_path / "o").exists()


def test_a_database_tracking_uri_is_used(tmp_path, isbi_folder):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "o", "--epochs", 1,
                     "--tracking-uri", uri, "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()])
    assert [r.info.run_name for r in runs] == ["o"]


def test_epochs_and_a_different_max_epochs_setting_contradict(tmp_path):
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "--epochs", 3,
                     "--set", "max_epochs=5")
    assert result.exit_code == 1
    assert "error: --set max_epochs=5 contradicts --epochs 3; give one of them" in result.output
    # and where the trainer takes it (it trained 2 epochs, its schedule built for 1)
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "--epochs", 1,
                     "--set", "train#trainer#max_epochs=2")
    assert "error: --set train#trainer#max_epochs=2 contradicts --epochs 1; give one of them" in result.output
    assert not (tmp_path / "o").exists()
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "--epochs", 1,
                     "--set", "train#trainer#max_epochs=@max_epochs")  # the bundle's own reference: no contradiction
    assert "contradicts" not in result.output


@pytest.mark.parametrize("command, options, setting, expected", [
    ("infer", ["--tta"], "tta=false", "--set tta=false contradicts --tta"),
    ("infer", ["--no-tta"], "tta=true", "--set tta=true contradicts --no-tta"),
    ("infer", ["--no-prob"], "save_prob=true", "--set save_prob=true contradicts --no-prob"),
    ("infer", ["--format", "tiff"], "output_format=png", "--set output_format=png contradicts --format tiff"),
    ("evaluate", ["--tta"], "tta=false", "--set tta=false contradicts --tta"),
], ids=["infer tta", "infer no-tta", "infer prob", "infer format", "evaluate tta"])
def test_a_named_option_and_a_different_setting_of_its_id_contradict(tmp_path, command, options, setting, expected):
    # before, evaluate let the option win and infer the setting, each silently
    where = [tmp_path, tmp_path / "out"] if command == "infer" else ["--data", tmp_path]
    result = _invoke(command, BUNDLE, *where, "--checkpoint", tmp_path / "model.pt", *options, "--set", setting)
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {expected}; give one of them"


def test_a_named_option_and_the_same_setting_agree():
    from medseg.cli import _overrides

    assert _overrides(["tta=true", "save_prob=false"], {"tta": (True, "--tta"), "save_prob": (None, "--no-prob")}) \
        == {"tta": True, "save_prob": False}


def test_the_last_of_two_max_epochs_settings_wins_without_epochs():
    from medseg.cli import _overrides

    assert _overrides(["max_epochs=5", "max_epochs=6"], max_epochs=None) == {"max_epochs": 6}


def test_device_names():
    import torch

    from medseg.errors import MedsegError
    from medseg.workflows import select_device

    assert select_device("cpu").type == "cpu"
    for name in ("cudaa", "gpu", "cuda:x"):
        with pytest.raises(MedsegError, match=f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N"):
            select_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="--device cuda:1: no CUDA device is available here"):
            select_device("cuda:1")


def test_a_gpu_index_beyond_the_machines_gpus_is_refused_by_name(monkeypatch):
    # it was taken, and the network's .to() failed later as "a config value does not work"
    import torch

    from medseg.errors import MedsegError
    from medseg.workflows import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda:1") and select_device("cuda") == torch.device("cuda")
    with pytest.raises(MedsegError, match=r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1; "
                                          r"CUDA_VISIBLE_DEVICES, where set, numbers those it lists from 0\)"):
        select_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MedsegError, match=r"--device cuda:1: this machine has 1 CUDA device \(cuda:0 only;"):
        select_device("cuda:1")
    for name in ("mps", "MPS:0", "xpu"):  # Apple's and Intel's GPUs: said so, not "unknown device"
        with pytest.raises(MedsegError, match=f"--device {name.lower()}: not supported \\(CUDA GPUs and the CPU "
                                              "are\\); use --device cpu"):
            select_device(name)


def test_a_cuda_runs_config_json_runs_on_a_machine_without_a_gpu(trained):
    # it recorded device as $torch.device('cuda') and amp true, so the file failed as a bundle config on a CPU
    import torch
    from monai.bundle import ConfigParser

    from medseg.workflows import device_settings, portable_config

    config = json.loads((trained["out"] / "config.json").read_text())
    assert portable_config(config, torch.device("cpu")) is config  # a CPU run's record is what ran
    for device in ("cuda", "cuda:1"):
        ran = {**config, **device_settings(torch.device(device))}
        for amp in (True, False):  # --set amp=false on CUDA stays off
            recorded = portable_config({**ran, "amp": amp}, torch.device(device))
            parser = ConfigParser(recorded)
            assert parser.get_parsed_content("device") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
            assert parser.get_parsed_content("amp") is (amp and torch.cuda.is_available())
            assert {k: v for k, v in recorded.items() if k not in ("device", "amp")} == {
                k: v for k, v in config.items() if k not in ("device", "amp")}


def test_compile_on_cuda_without_a_c_compiler_is_refused_before_training(monkeypatch):
    # Triton builds its kernel launcher with a C compiler at the first step; without one that step failed
    import shutil

    import torch

    from medseg import workflows
    from medseg.errors import ConfigValueError

    class Parsed(dict):
        def get_parsed_content(self, key, default=None):
            return self.get(key, default)

    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton_package", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigValueError, match="compile=true: torch.compile on CUDA needs a C compiler"):
        workflows._check_compile(Parsed(compile=True), torch.device("cuda"))
    workflows._check_compile(Parsed(compile=False), torch.device("cuda"))
    monkeypatch.setenv("CC", "/opt/cc")
    workflows._check_compile(Parsed(compile=True), torch.device("cuda"))
    # without Triton, or on a GPU older than Triton supports, the first step failed as "a config value does not
    # work"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    with pytest.raises(ConfigValueError, match=r"compute capability 7.0 or more, and cuda has 6.1; set --set "
                                               "compile=false"):
        workflows._check_compile(Parsed(compile=True), torch.device("cuda"))
    monkeypatch.setattr(torch.utils._triton, "has_triton_package", lambda: False)
    with pytest.raises(ConfigValueError, match="builds its kernels with Triton, which is not installed"):
        workflows._check_compile(Parsed(compile=True), torch.device("cuda"))


def test_a_run_with_amp_on_a_cpu_resumes_where_the_grad_scaler_is_on(tmp_path, isbi_folder, monkeypatch):
    # amp on a CPU saves the disabled scaler's empty state; resuming where CUDA is (emulated: the scaler and
    # autocast switch on, the tensors stay on the CPU) loaded it into an active scaler, which refuses it
    import torch

    args = ("--data", isbi_folder, "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args(),
            "--set", "images_per_batch=2", "--set", "amp=true")
    assert _invoke("train", BUNDLE, "--output", tmp_path / "run", "--epochs", 1, *args).exit_code == 0
    assert torch.load(tmp_path / "run" / "last_checkpoint_epoch=1.pt")["scaler"] == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = _invoke("train", BUNDLE, "--output", tmp_path / "run", "--resume", "--epochs", 2, *args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last_checkpoint_epoch=2.pt").is_file()


def test_long_reasons_are_cut_at_a_word():
    from medseg.errors import brief

    assert brief("one  two\nthree") == "one two three"
    cut = brief("word " * 60)
    assert len(cut) <= 160 and cut.endswith("word ...")


@pytest.mark.parametrize("command", ["train", "evaluate", "infer", "export", "info", None])
def test_help_shows_flags_without_value_placeholders(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    result = _invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if "--" in line]
    assert any("--help" in line for line in lines)  # --help too: an on/off flag
    assert lines and not [line for line in lines if "<bool>" in line or "list[" in line]
    if command in ("train", "evaluate", "infer"):
        assert "KEY=VALUE" in result.output and "FILE" in result.output
    usage = {"infer": r"BUNDLE\W+INPUT\W+OUTPUT_DIR", "export": r"BUNDLE\W+CHECKPOINT\W+OUTPUT_DIR"}
    if command in usage:  # the names the help text and the README use (it showed {input_path})
        assert re.search(usage[command], result.output), result.output


def test_resume_restores_whole_mappings_and_leaves_what_is_given_now():
    # a plain mapping (jurkat's class_map) comes back whole, not merged into the bundle's; a value the bundle
    # makes by an expression comes back as the run gave it; a key given now, or a part of it, is left alone
    from monai.bundle import ConfigParser

    from medseg.runfolder import resume_settings

    recorded = {"class_map": {"0": 0, "1": 1, "2": 2}, "network_def": {"_target_": "UNet", "channels": [4, 8]},
                "patch_size": [64, 64], "logit_shift": [0.0, 0.0], "val_at_start": True, "device": "cpu",
                "train": {"handlers": [{"_target_": "StatsHandler"}], "inferer": "@train::inferer"}}
    bundle = {"class_map": {"0": 0, "128": 1, "255": 2}, "network_def": {"_target_": "UNet", "channels": [16, 32]},
              "patch_size": [256, 256], "logit_shift": "$prior(@class_weights)", "val_at_start": False,
              "device": "cuda", "train": {"handlers": [], "inferer": "@train#inferer"}}
    parser = ConfigParser(copy.deepcopy(bundle))
    resume_settings(parser, recorded, {"patch_size#0": 128}, ())
    assert parser["class_map"] == {"0": 0, "1": 1, "2": 2}
    assert parser["network_def"]["channels"] == [4, 8] and parser["logit_shift"] == [0.0, 0.0]
    assert parser["patch_size"] == [256, 256]  # a part of it given now
    assert parser["val_at_start"] is False and parser["device"] == "cuda"  # set by each call
    assert parser["train"] == bundle["train"]  # handlers and references are not values to restore


def test_folders_named_like_config_syntax_are_taken_as_written(tmp_path, monkeypatch, trained):
    # MONAI reads a value that starts with $, @ or % as code, a reference or a macro, and rewrites '#' anywhere:
    # a data folder '$data' was run as Python, 'evaluate --output res#1' wrote to 'res::1' and said 'res#1'
    import mlflow
    from monai.bundle import ConfigParser

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained["data"], tmp_path / "$data#1")
    result = _invoke("train", BUNDLE, "--data", "$data#1", "--output", "@run#2", "--epochs", 1, "--no-progress",
                     "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    run = tmp_path / "@run#2"
    assert {"model.pt", "config.json", "split.json", "mlflow.db"} <= {p.name for p in run.iterdir()}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    logged = client.search_runs([client.get_experiment_by_name("medseg-isbi_em").experiment_id])[0]
    assert logged.info.run_name == "@run#2" and logged.data.params["dataset_dir"] == str(tmp_path / "$data#1")
    assert {"model.pt", "config.json"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}
    recorded = ConfigParser(json.loads((run / "config.json").read_text()))  # runs as a bundle config as it is
    assert recorded.get_parsed_content("dataset_dir") == str(tmp_path / "$data#1")  # absolute, as written
    assert recorded.get_parsed_content("output_dir") == str(tmp_path / "@run#2")

    result = _invoke("evaluate", BUNDLE, "--data", "$data#1", "--checkpoint", "@run#2/model.pt", "--output",
                     "%res#3", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert {"metrics.csv", "summary.json"} <= {p.name for p in (tmp_path / "%res#3").iterdir()}
    result = _invoke("infer", BUNDLE, "$data#1/train/image", "@out#4", "--checkpoint", "@run#2/model.pt",
                     "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "@out#4" / "mask").iterdir())) == 4
    assert not [p for p in tmp_path.rglob("*") if "::" in p.name or p.name in ("run", "out", "res")]


def test_a_set_text_keeps_its_hash_and_an_expression_stays_one():
    from monai.bundle import ConfigParser

    from medseg.bundle import literal, worked_out, written

    config = {"seed": 3, "folder": "", "model": "$@folder + '/model.pt'", "files": []}
    for text in ("res#1", "$HOME", "@seed", "%x", "a@::b", "it's #\"q\"", "{stem}@#x", "$print('ran')", "plain"):
        parser = ConfigParser(dict(config))
        parser["folder"], parser["files"] = literal(text), [literal(text)]
        assert parser.get_parsed_content("folder") == text and parser.get_parsed_content("files") == [text]
        assert parser.get_parsed_content("model") == text + "/model.pt"
        assert written(literal(text)) == text and not worked_out(literal(text))
    assert literal("plain") == "plain" and literal("runs/em 1") == "runs/em 1"  # nothing to escape: as it is
    assert worked_out("$torch.device('cpu')") and written("$torch.device('cpu')") == "$torch.device('cpu')"
    from medseg.bundle import load_config

    parser = load_config(REPO / "bundles" / "jurkat", "train", (), {"mask_template": "../masks#x/{stem}.png",
                                                                     "class_names": ["bg", "cell#body", "nucleus"],
                                                                     "seed": "$1 + 1"})
    assert parser.get_parsed_content("mask_template") == "../masks#x/{stem}.png"  # was ../masks::x/{stem}.png
    assert parser.get_parsed_content("class_names") == ["bg", "cell#body", "nucleus"]  # texts in a list too
    assert parser.get_parsed_content("seed") == 2  # an expression stays one


def test_a_multi_line_user_error_is_one_line(monkeypatch):
    import medseg.info
    from medseg.errors import DataError

    def broken(*a, **k):
        raise DataError("x.png: bad header\nTraceback-like detail")

    monkeypatch.setattr(medseg.info, "collect_info", broken)
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.strip()] == ["error: x.png: bad header"]


def test_overwrite_removes_the_replaced_runs_weights_even_when_the_new_run_fails(trained, tmp_path, monkeypatch):
    # a model.pt left from the replaced run beside the new run's config and split would pass for the new run's
    from ignite.engine import Events

    from medseg import workflows

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    original = workflows._check_batches

    def fail_at_once(trainer, data_dir, *rest):
        original(trainer, data_dir, *rest)

        def fail(_):
            raise RuntimeError("the new run fails")

        trainer.add_event_handler(Events.ITERATION_STARTED(once=1), fail)

    monkeypatch.setattr(workflows, "_check_batches", fail_at_once)
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", out, "--epochs", 2, "--overwrite",
                     "--no-progress", "--no-tracking", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 1, result.output
    assert not (out / "model.pt").exists() and not list(out.glob("last_checkpoint_epoch=*.pt"))


def test_a_data_loader_given_as_an_expression_still_trains(tmp_path, isbi_folder):
    # train#dataloader replaced by an overlay with a reference or an expression, not a component to add to
    overlay = tmp_path / "loader.json"
    overlay.write_text(json.dumps({"train#dataloader": "$monai.data.ThreadDataLoader(@train#dataset, "
                                                       "batch_size=1, shuffle=True)"}))
    result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", tmp_path / "run", "--epochs", 1,
                     "--no-progress", "--no-tracking", "--device", "cpu", "-c", overlay, *_tiny_args())
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.pt").is_file()


def test_a_failure_inside_the_training_loop_is_one_line_without_the_engines_traceback(trained, tmp_path, capfd):
    # Ignite and MONAI's StatsHandler log an exception (with its traceback) before re-raising it; the CLI
    # reports it once, in one line
    result = _invoke("train", BUNDLE, "--data", trained["data"], "--output", tmp_path / "o", "--no-tracking",
                     "--no-progress", "--device", "cpu", *_tiny_args(), "--set", "network_def#in_channels=2")
    _assert_one_line_error(result, "a config value does not work", "to have 2 channels", "--debug")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "terminating due to exception" not in captured.err + captured.out


def test_a_patch_size_the_network_cannot_take_is_refused_before_training(tmp_path):
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "--no-tracking",
                     "--set", "patch_size=[100,100]")
    _assert_one_line_error(result, "patch_size=[100, 100]", "multiple of size_divisor 16", "patch_size=[96, 96]")
    assert not (tmp_path / "o").exists()


def test_a_batch_smaller_than_one_images_crops_is_refused_before_training(tmp_path):
    # nuclei batches whole images' crops: batch_size // samples_per_image was 0, "batch_size should be positive"
    nuclei = REPO / "bundles" / "nuclei"
    result = _invoke("train", nuclei, "--data", tmp_path, "--output", tmp_path / "o", "--no-tracking",
                     "--set", "batch_size=2", "--set", "samples_per_image=4")
    _assert_one_line_error(result, "batch_size=2 is below samples_per_image=4", "--set batch_size=4")
    assert not (tmp_path / "o").exists()
    # evaluate does not batch training crops; a resumed run is checked with its own settings back
    from medseg.bundle import load_config

    assert load_config(nuclei, "evaluate", overrides={"batch_size": 1})["batch_size"] == 1
    from conftest import write_dsb_folder

    data = write_dsb_folder(tmp_path / "dsb", layout=[("a", (48, 48), False), ("b", (48, 48), False)])
    small = ["network_def#channels=[8,16,32]", "network_def#strides=[2,2]", "patch_size=[32,32]",
             "batch_size=1", "samples_per_image=1", "val_fraction=0.5"]
    args = ("--data", data, "--output", tmp_path / "run", "--no-tracking", "--no-progress", "--device", "cpu",
            *_tiny_args(small))
    assert _invoke("train", nuclei, *args, "--epochs", 1).exit_code == 0
    result = _invoke("train", nuclei, *args, "--epochs", 2, "--resume", "--set", "samples_per_image=4")
    _assert_one_line_error(result, "batch_size=1 is below samples_per_image=4")


@pytest.mark.parametrize("item, fragment", [
    ("max_epochs=2.5", "max_epochs is a whole number (150)"),
    ("train#trainer#max_epochs=2x", "train#trainer#max_epochs is a whole number (150)"),
    ("patch_size=[64,64", "--set patch_size=[64,64: not valid JSON, and the bundle's patch_size is a list; give "
                          "it as JSON, e.g. --set 'patch_size=[256, 256]'"),
    ("network_def={'channels': [4, 8]}", "network_def={'channels': [4, 8]}: not valid JSON, and the bundle's "
                                         "network_def is a mapping; give it as JSON"),  # no example that long
])
def test_set_values_are_checked_against_the_kind_they_replace(tmp_path, item, fragment):
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "--set", item)
    _assert_one_line_error(result, fragment)
    if item.startswith("network_def="):  # an example as long as the whole component is left out
        assert "e.g." not in result.output


def test_a_refused_write_says_how_to_go_on():
    import errno

    from medseg.errors import describe_os_failure

    denied = OSError(errno.EACCES, "Permission denied", "/run/history.json")
    assert describe_os_failure(denied) == ("/run/history.json: Permission denied; check the permissions of the file "
                                           "and its folder")
    assert describe_os_failure(denied, "continue with --resume --output /run") == (
        "/run/history.json: Permission denied; check the permissions of the file and its folder, then continue "
        "with --resume --output /run")


def test_settings_mlflow_cannot_name_are_logged_as_one_param():
    from medseg.tracking import _plain_params

    assert _plain_params({"m": {"#1": 0, "x": {"a": 1}}}) == {"m": '{"#1": 0}'}  # the plain part
    params = _plain_params({"max_epochs": 3, "expr": "$1+1", "class_map": {"#000000": 0, "#808080": 1},
                            "network_def": {"_target_": "monai.networks.nets.UNet", "channels": [4, 8],
                                            "act": "@act"}, "train": {"batch_size": 2}})
    assert params == {"max_epochs": 3, "class_map": '{"#000000": 0, "#808080": 1}',
                      "network_def._target_": "monai.networks.nets.UNet", "network_def.channels": "[4, 8]"}


def test_a_run_with_a_validation_folder_logs_no_share_held_out():
    from medseg.tracking import _plain_params

    config = {"val_dir": None, "val_fraction": 0.2, "val_count": 5, "seed": 0}
    assert _plain_params(config) == {"val_fraction": 0.2, "val_count": 5, "seed": 0}  # null is not logged
    assert _plain_params({**config, "val_dir": "/data/held"}) == {"val_dir": "/data/held", "seed": 0}


def test_tracking_uri_and_no_tracking_together_are_refused(tmp_path):
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o", "--no-tracking",
                     "--tracking-uri", "http://127.0.0.1:5000")
    _assert_one_line_error(result, "--tracking-uri http://127.0.0.1:5000 with --no-tracking", "give one")


def test_a_tracking_server_that_never_answers_is_one_line_within_seconds(tmp_path, monkeypatch):
    import socket
    import threading
    import time

    import medseg.tracking

    monkeypatch.setattr(medseg.tracking, "SERVER_ANSWER_SECONDS", 1.0)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # accepts connections (the kernel does), never reads nor answers
    held: list = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    data = write_isbi_folder(tmp_path / "d", n=3, size=48)
    start = time.perf_counter()
    try:
        result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1,
                         "--no-progress", "--device", "cpu", "--tracking-uri", uri, *_tiny_args())
    finally:
        server.close()
    _assert_one_line_error(result, f"--tracking-uri {uri}: the server accepted the connection but sent no answer "
                           "within 1 s", "--no-tracking")
    assert time.perf_counter() - start < 30


def test_the_run_record_hides_credentials_of_urls(monkeypatch):
    from medseg.info import environment

    monkeypatch.setattr("sys.argv", ["medseg", "train", "--tracking-uri", "https://ann:s3cret@mlflow.lab:5000"])
    record = environment()
    assert record["command"] == "medseg train --tracking-uri 'https://***@mlflow.lab:5000'"
    assert "s3cret" not in json.dumps(record)
    if (REPO / ".git").exists():  # run from a checkout: the source's commit, marked when it has local changes
        import re

        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", record["medseg_commit"]), record["medseg_commit"]


def test_train_ends_with_the_best_score_and_where_the_model_is(trained):
    import re

    last = trained["output"].strip().splitlines()[-1]
    assert re.fullmatch(r"best val_v_rand \d\.\d{4} at epoch [123]: .*model\.pt", last), last
    assert last.endswith(str(trained["out"] / "model.pt"))


def test_home_folder_paths_and_non_ascii_names_as_given(trained, tmp_path, monkeypatch):
    # '--output=~/x' is not expanded by the shell: it made a folder named '~'; and names were printed as \u00e9
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(trained["data"], tmp_path / "données")
    result = _invoke("evaluate", BUNDLE, "--data=~/données", f"--checkpoint={trained['out'] / 'model.pt'}",
                     "--output=~/évaluation", "--split", "all", "--no-progress", "--device", "cpu",
                     *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "évaluation" / "summary.json").is_file() and not list(Path.cwd().glob("~"))
    from medseg.cli import _home

    assert _home("~results") == Path("~results") and _home(["~", "~/a"]) == [tmp_path, tmp_path / "a"]
    assert f"summary: {tmp_path / 'évaluation' / 'summary.json'}" in result.output
    result = _invoke("infer", BUNDLE, "~/données/train/image", "~/segmentées", "--checkpoint",
                     trained["out"] / "model.pt", "--no-progress", "--device", "cpu", *_tiny_args(TINY_NET))
    assert result.exit_code == 0, result.output
    assert f'"manifest": "{tmp_path / "segmentées" / "manifest.csv"}"' in result.output  # not segment\u00e9es


def test_missing_folders_and_filters_that_leave_nothing_say_so(trained, tmp_path):
    result = _invoke("info", "--bundles-dir", tmp_path / "nowhere")
    _assert_one_line_error(result, f"{tmp_path / 'nowhere'}: folder not found; pass --bundles-dir")
    result = _invoke("infer", tmp_path / "nobundle", trained["data"], tmp_path / "out")
    _assert_one_line_error(result, f"{tmp_path / 'nobundle'}: bundle folder not found")
    result = _invoke("infer", BUNDLE, trained["data"], tmp_path / "out", "--checkpoint", tmp_path / "none.pt")
    _assert_one_line_error(result, "none.pt: checkpoint not found; give --checkpoint the model.pt of a training")
    result = _invoke("infer", BUNDLE, trained["data"] / "train" / "image", tmp_path / "out", "--checkpoint",
                     trained["out"] / "model.pt", "--include", "*.tif", "--no-progress", *_tiny_args(TINY_NET))
    _assert_one_line_error(result, "no images to segment: --include / --exclude left out all 4 files")


def test_a_failed_evaluation_leaves_no_empty_output_folder(trained, tmp_path):
    # a data folder without images failed after making the output folder, which stayed, empty
    out = tmp_path / "a" / "eval"
    result = _invoke("evaluate", BUNDLE, "--data", tmp_path / "nodata", "--checkpoint", trained["out"] / "model.pt",
                     "--output", out, "--no-progress", *_tiny_args(TINY_NET))
    _assert_one_line_error(result, "data folder not found")
    empty = tmp_path / "empty"
    (empty / "train" / "image").mkdir(parents=True)
    (empty / "train" / "label").mkdir(parents=True)
    result = _invoke("evaluate", BUNDLE, "--data", empty, "--checkpoint", trained["out"] / "model.pt",
                     "--output", out, "--split", "all", "--no-progress", *_tiny_args(TINY_NET))
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command, setting", [
    ("infer", "output_dir=elsewhere"), ("infer", "dataset_dir=elsewhere"), ("evaluate", "ckpt_path=other.pt"),
    ("train", "output_dir=elsewhere"),
])
def test_a_setting_the_command_takes_from_its_arguments_is_refused(tmp_path, command, setting):
    # infer -s output_dir=B wrote masks to B and its record and manifest to OUTPUT_DIR
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    where = {"infer": [tmp_path, tmp_path.parent / f"{tmp_path.name}_out", "--checkpoint", tmp_path / "model.pt"],
             "evaluate": ["--data", tmp_path, "--checkpoint", tmp_path / "model.pt", "--output",
                          tmp_path.parent / f"{tmp_path.name}_eval"],
             "train": ["--data", tmp_path, "--output", tmp_path.parent / f"{tmp_path.name}_run"]}[command]
    result = _invoke(command, BUNDLE, *where, "--set", setting)
    assert result.exit_code == 1
    key = setting.split("=")[0]
    assert result.output.strip() == (f"error: --set {key}: the command sets it from its arguments (the bundle, "
                                     "data or input folder, output folder, --checkpoint); give it there instead")
    name, value = setting.split("=")  # an overlay's value would silently give way to the argument
    (tmp_path / "overlay.json").write_text(json.dumps({name: value}))
    result = _invoke(command, BUNDLE, *where, "--config", tmp_path / "overlay.json")
    _assert_one_line_error(result, f"overlay.json: sets {key}, which the command sets from its arguments",
                           "leave it out of the overlay and give it there")


def test_mixed_precision_training_does_not_warn_of_monais_deprecated_grad_scaler(tmp_path):
    # MONAI's trainer makes torch.cuda.amp.GradScaler(), which PyTorch deprecates at every CUDA training (amp on a
    # CPU makes the same call, so the warning shows here too)
    data = write_isbi_folder(tmp_path / "data", n=4, size=96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                         "--no-tracking", "--device", "cpu", "--set", "amp=true", *_tiny_args())
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    assert any("GradScaler is enabled, but CUDA is not available" in m for m in said)  # the scaler was made
    assert not [m for m in said if "torch.cuda.amp.GradScaler(args...)` is deprecated" in m]


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_running_out_of_memory_in_training_says_what_lowers_it(tmp_path, monkeypatch, kind):
    # MONAI wraps the error, so a CUDA out-of-memory read "a config value does not work (OutOfMemoryError: ...)"
    import monai.networks.nets

    def too_big(self, x):
        if kind == "gpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(monai.networks.nets.UNet, "forward", too_big)
    data = write_isbi_folder(tmp_path / "data", n=4, size=96)
    result = _invoke("train", BUNDLE, "--data", data, "--output", tmp_path / "run", "--epochs", 1, "--no-progress",
                     "--no-tracking", "--device", "cpu", *_tiny_args())
    advice = ("make the batch or the crops smaller with --set (batch_size, or images_per_batch and "
              "samples_per_image for isbi_em; patch_size), or validate large images window by window (a lower "
              "whole_max_pixels)")
    if kind == "gpu":
        _assert_one_line_error(result, "error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB); "
                               f"{advice}, or use --device cpu")
    else:
        _assert_one_line_error(result, "error: out of memory ([enforce fail at alloc_cpu.cpp:117] data. "
                               "DefaultCPUAllocator: can't allocate memory:",
                               f"{advice}, or free memory on the machine")


@pytest.mark.parametrize("command", ["train", "evaluate", "infer"])
def test_a_device_set_other_than_by_the_device_option_is_refused(tmp_path, command):
    # --device cpu --set device=cuda failed as "a config value does not work (AssertionError: Torch not compiled
    # with CUDA enabled)"; on a GPU, --device auto --set device=cpu trained on the CPU with mixed precision on
    # and recorded the GPU as the run's device
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    where = {"infer": [tmp_path, tmp_path.parent / f"{tmp_path.name}_out", "--checkpoint", tmp_path / "model.pt"],
             "evaluate": ["--data", tmp_path, "--checkpoint", tmp_path / "model.pt", "--output",
                          tmp_path.parent / f"{tmp_path.name}_eval"],
             "train": ["--data", tmp_path, "--output", tmp_path.parent / f"{tmp_path.name}_run"]}[command]
    result = _invoke(command, BUNDLE, *where, "--device", "cpu", "--set", "device=$torch.device('cuda')")
    assert result.exit_code == 1
    assert result.output.strip() == ("error: --set device: the command sets it from --device (auto, cpu, cuda or "
                                     "cuda:N), which also decides mixed precision and what the run records; give "
                                     "--device instead")
    (tmp_path / "overlay.json").write_text(json.dumps({"device": "$torch.device('cpu')"}))
    result = _invoke(command, BUNDLE, *where, "--config", tmp_path / "overlay.json")
    _assert_one_line_error(result, "overlay.json: sets device; the command sets it from --device",
                           "leave it out of the overlay")
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}_*"))


@pytest.mark.parametrize("command, setting", [
    ("train", "validate#handlers#1#save_dir=elsewhere"), ("train", "datalists#save_to=elsewhere"),
    ("evaluate", "validate#handlers#2#output_dir=elsewhere"), ("infer", "postprocessing#transforms#3#output_dir=x"),
])
def test_a_setting_that_moves_where_a_component_writes_is_refused(tmp_path, command, setting):
    # train -s validate#handlers#1#save_dir=RUN wrote model.pt over another run's; evaluate's report went elsewhere
    from PIL import Image

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "a.png")
    where = {"infer": [data, out, "--checkpoint", tmp_path / "model.pt"],
             "evaluate": ["--data", data, "--checkpoint", tmp_path / "model.pt", "--output", out],
             "train": ["--data", data, "--output", out]}[command]
    result = _invoke(command, BUNDLE, *where, "--set", setting)
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: --set {setting.split('=')[0]}: where the command reads and writes "
                                     "follows its arguments (the data or input folder, the output folder, "
                                     "--checkpoint), not a setting of one component")
    assert not (tmp_path / "elsewhere").exists() and not out.exists()
    # nor from an overlay: ids by path ("a#b"), or a part added to a component ("+a": {"b": ...})
    key, value = setting.split("=")
    holder, part = key.rsplit("#", 1)
    for content in ({key: value}, {f"+{holder}": {part: value}}):
        overlay = tmp_path / "overlay.json"
        overlay.write_text(json.dumps(content))
        result = _invoke(command, BUNDLE, *where, "--config", overlay)
        _assert_one_line_error(result, f"overlay.json: sets {key}; where the command reads and writes follows",
                               "leave it out of the overlay")
    assert not (tmp_path / "elsewhere").exists() and not out.exists()


@pytest.mark.parametrize("command, key, component", [
    ("train", "validate#handlers#1", {"_target_": "medseg.handlers.CheckpointSaver", "save_dir": "elsewhere",
                                      "save_dict": {"model": "@eval_network"}, "save_key_metric": True}),
    ("evaluate", "validate#handlers", [{"_target_": "medseg.evaluation.ChallengeMetrics", "output_dir": "elsewhere"}]),
])
def test_a_component_given_whole_with_a_folder_of_its_own_is_refused(tmp_path, command, key, component):
    # the same setting inside a component given whole slipped through: a training's best model went over a
    # model.pt elsewhere (none in the run folder), an evaluation's report over another's
    from PIL import Image

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "a.png")
    where = {"evaluate": ["--data", data, "--checkpoint", tmp_path / "model.pt", "--output", out],
             "train": ["--data", data, "--output", out]}[command]
    place = next(k for k in ("save_dir", "output_dir") if k in json.dumps(component))
    inner = f"{key}#{place}" if isinstance(component, dict) else f"{key}#0#{place}"
    result = _invoke(command, BUNDLE, *where, "--set", f"{key}={json.dumps(component)}")
    _assert_one_line_error(result, f"--set {inner}: where the command reads and writes follows its arguments",
                           'refer to the command\'s folder instead, as the bundle does ("save_dir": "@output_dir")')
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({key: component}))
    result = _invoke(command, BUNDLE, *where, "--config", overlay)
    _assert_one_line_error(result, f"overlay.json: sets {inner}; where the command reads", "refer to the command")
    assert not (tmp_path / "elsewhere").exists() and not out.exists()
    by_reference = json.dumps(component).replace('"elsewhere"', '"@output_dir"')  # as the bundle does: taken
    assert "not a setting of one component" not in _invoke(command, BUNDLE, *where, "--set",
                                                           f"{key}={by_reference}").output
    for literal in ('"/elsewhere@v2"', '"$\'/elsewhere\'"'):  # an @ in a path, an expression of no reference
        given = by_reference.replace('"@output_dir"', literal)
        result = _invoke(command, BUNDLE, *where, "--set", f"{key}={given}")
        _assert_one_line_error(result, f"--set {inner}: where the command reads")


def test_the_bundles_own_handlers_given_whole_are_taken(tmp_path):
    # the checkpoint handler's key_metric_filename is a bare "model.pt" in the bundles: a copy of their own
    # handlers (to drop early stopping, say) was refused as a folder of its own
    handlers = json.loads((BUNDLE / "configs" / "train.json").read_text())["validate"]["handlers"]
    saver = next(h for h in handlers if "key_metric_filename" in h)
    assert saver["key_metric_filename"] == "model.pt"
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o",
                     "--set", f"validate#handlers={json.dumps(handlers)}")
    assert "not a setting of one component" not in result.output, result.output
    saver["key_metric_filename"] = "../model.pt"
    result = _invoke("train", BUNDLE, "--data", tmp_path, "--output", tmp_path / "o",
                     "--set", f"validate#handlers={json.dumps(handlers)}")
    assert "key_metric_filename: where the command reads and writes follows" in result.output


def test_evaluate_logs_its_scores_to_the_mlflow_run_of_the_training(trained, tmp_path, caplog):
    # the run folder moved since its training: the scores go into the run of the store that moved with it
    import mlflow

    run_dir = tmp_path / "moved"
    shutil.copytree(trained["out"], run_dir)
    run_id = json.loads((run_dir / "config.json").read_text())["_tracking_"]["run_id"]
    args = ("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", run_dir / "model.pt", "--split", "all",
            "--no-progress", "--device", "cpu", *_tiny_args())
    result = _invoke(*args, "--output", run_dir / "eval_all")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[: result.output.rindex("}") + 1])["mlflow_run_id"] == run_id
    summary = json.loads((run_dir / "eval_all" / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["eval_all/v_rand"] == pytest.approx(summary["v_rand"])
    assert run.data.metrics["eval_all/images"] == 4
    assert run.data.tags["eval_all/split"] == "all" and run.data.tags["eval_all/tta"] == "False"
    assert run.data.tags["eval_all/output_dir"] == "eval_all"  # in the run folder: wherever that moves
    assert run.data.tags["eval_all/checkpoint"] == summary["run"]["checkpoints"][0]["sha256"]
    assert {a.path for a in client.list_artifacts(run_id, "eval_all")} == {"eval_all/metrics.csv",
                                                                         "eval_all/summary.json"}
    logged = next(run_dir.glob("mlruns/**/artifacts/eval_all/summary.json"))  # in the moved folder's store
    assert json.loads(logged.read_text()) == summary
    assert not list(trained["out"].glob("mlruns/**/artifacts/eval_all"))
    # another folder of the same name: its figures would pass for the first report's, so they are not logged
    with caplog.at_level(logging.WARNING):
        result = _invoke(*args, "--output", tmp_path / "elsewhere" / "eval_all")
    assert result.exit_code == 0 and "mlflow_run_id" not in result.output
    assert client.get_run(run_id).data.metrics["eval_all/images"] == 4
    said = [r.getMessage() for r in caplog.records if "give --output a folder of another name" in r.getMessage()]
    assert len(said) == 1 and f"report in {(run_dir / 'eval_all').resolve()}" in said[0]
    caplog.clear()
    # the run folder moved again: its own report is logged again, in its place
    shutil.move(run_dir, tmp_path / "moved_again")
    run_dir = tmp_path / "moved_again"
    args = tuple(run_dir / "model.pt" if str(a).endswith("model.pt") else a for a in args)
    result = _invoke(*args, "--output", run_dir / "eval_all")
    assert result.exit_code == 0 and json.loads(result.output[: result.output.rindex("}") + 1])["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    # --no-tracking: the report alone
    result = _invoke(*args, "--output", run_dir / "eval_quiet", "--no-tracking")
    assert result.exit_code == 0 and "mlflow_run_id" not in result.output
    assert not any(k.startswith("eval_quiet") for k in client.get_run(run_id).data.metrics)
    # a store that cannot be used is a warning: the report is the evaluation's result
    (run_dir / "mlflow.db").write_bytes(b"not a database" * 100)
    with caplog.at_level(logging.WARNING):
        result = _invoke(*args, "--output", run_dir / "eval_broken")
    assert result.exit_code == 0, result.output
    assert (run_dir / "eval_broken" / "summary.json").is_file() and "mlflow_run_id" not in result.output
    said = [r.getMessage() for r in caplog.records if "MLflow run" in r.getMessage()]
    assert len(said) == 1 and str(run_dir / "eval_broken") in said[0] and "--no-tracking" in said[0]


def test_ctrl_c_of_evaluate_keeps_the_rows_of_the_images_scored(trained, tmp_path, monkeypatch):
    import medseg.evaluation

    args = ("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt", "--split",
            "all", "--output", tmp_path / "eval", "--no-progress", "--device", "cpu", "--no-tracking", *_tiny_args())
    assert _invoke(*args).exit_code == 0
    report = (tmp_path / "eval" / "metrics.csv").read_bytes(), (tmp_path / "eval" / "summary.json").read_bytes()
    real = medseg.evaluation.MetricsReport._collect

    def stopped_at_the_third(self, engine):
        if len(self.rows) == 2:
            raise KeyboardInterrupt
        real(self, engine)

    monkeypatch.setattr(medseg.evaluation.MetricsReport, "_collect", stopped_at_the_third)
    result = _invoke(*args)
    assert result.exit_code == 130, result.output
    partial = tmp_path / "eval" / "metrics.partial.csv"
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == [f"error: interrupted; stopped after 2 of 4 images, whose rows are in {partial}; no summary "
                     f"written (the report already in {tmp_path / 'eval'} is kept as it was); run it again to score "
                     "them all"]
    fresh = tuple(tmp_path / "fresh" if a == tmp_path / "eval" else a for a in args)  # no report there to keep
    lines = [line for line in _invoke(*fresh).output.splitlines() if line.startswith("error")]
    assert lines == [f"error: interrupted; stopped after 2 of 4 images, whose rows are in "
                     f"{tmp_path / 'fresh' / 'metrics.partial.csv'}; no summary written; run it again to score them "
                     "all"]
    import csv
    import io

    def per_image(text):  # V_rand and V_info are a slice's at the best threshold of the slices scored
        return [{k: v for k, v in row.items() if k not in ("v_rand", "v_info")}
                for row in csv.DictReader(io.StringIO(text))]

    rows = list(csv.DictReader(io.StringIO(partial.read_text())))
    assert len(rows) == 2 and list(rows[0]) == next(csv.reader(io.StringIO(report[0].decode())))
    assert per_image(partial.read_text()) == per_image(report[0].decode())[:2]
    assert ((tmp_path / "eval" / "metrics.csv").read_bytes(), (tmp_path / "eval" / "summary.json").read_bytes()) == \
        report  # the finished report stays as it was
    monkeypatch.setattr(medseg.evaluation.MetricsReport, "_collect", real)
    assert _invoke(*args).exit_code == 0 and not partial.exists()  # a finished evaluation removes them
    # stopped once its report is written (by a handler after it): the report stands, said as such
    written = medseg.evaluation.MetricsReport._write

    def stopped_after_writing(self, engine=None):
        written(self, engine)
        raise KeyboardInterrupt

    monkeypatch.setattr(medseg.evaluation.MetricsReport, "_write", stopped_after_writing)
    result = _invoke(*args)
    assert result.exit_code == 130 and not partial.exists()
    assert [line for line in result.output.splitlines() if line.startswith("error")] == [
        f"error: interrupted; the report was written in {tmp_path / 'eval'} before the stop"]


def test_evaluate_does_not_make_a_training_s_moved_store_anew(trained, tmp_path, caplog):
    # a training that logged to a shared SQLite store, which has moved since: no empty store appears in its place
    run_dir = tmp_path / "run"
    shutil.copytree(trained["out"], run_dir)
    (run_dir / "mlflow.db").unlink()
    config = json.loads((run_dir / "config.json").read_text())
    gone = tmp_path / "shared" / "mlflow.db"
    config["_tracking_"].update(tracking_store="given", tracking_uri=f"sqlite:///{gone}")
    (run_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", run_dir / "model.pt",
                         "--split", "all", "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    assert not gone.exists() and not gone.parent.exists()
    said = [r.getMessage() for r in caplog.records if "MLflow run" in r.getMessage()]
    assert len(said) == 1 and f"its store {gone} is not there" in said[0]


def test_evaluating_again_into_the_same_folder_leaves_no_earlier_score_in_the_run(trained, tmp_path):
    # an evaluation again with --overwrite whose report has fewer groups (other data) left the first report's
    # group scores in the training's run, beside the new means
    import math

    import mlflow

    from medseg.tracking import log_evaluation

    run_dir = shutil.copytree(trained["out"], tmp_path / "run")
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", run_dir / "model.pt", "--split",
                     "all", "--output", run_dir / "again", "--no-progress", "--device", "cpu", *_tiny_args())
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.output[: result.output.rindex("}") + 1])["mlflow_run_id"]
    report = run_dir / "again" / "summary.json"
    summary = json.loads(report.read_text())
    report.write_text(json.dumps({**summary, "groups": {"a": {"images": 2, "dice": 0.5}, "b": {"images": 2}}}))
    assert log_evaluation(run_dir / "model.pt", run_dir / "again") == run_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    assert client.get_run(run_id).data.metrics["again/a/dice"] == 0.5
    report.write_text(json.dumps({**summary, "groups": {"b": {"images": 4}}}))
    assert log_evaluation(run_dir / "model.pt", run_dir / "again") == run_id
    metrics = client.get_run(run_id).data.metrics
    assert math.isnan(metrics["again/a/dice"]) and math.isnan(metrics["again/a/images"])
    assert metrics["again/b/images"] == 4 and metrics["again/v_rand"] == pytest.approx(summary["v_rand"])
    assert not any(math.isnan(v) for k, v in metrics.items() if "/" not in k)  # the training's own


def test_evaluation_metric_names_are_ones_mlflow_takes():
    import math

    from mlflow.utils.validation import _validate_metric_name

    from medseg.tracking import _metrics_of

    summary = {"images": 3, "dice": 0.9, "v_rand": None, "flag": True, "note": "text",
               "groups": {".": {"images": 1, "dice": 0.8}, "a/b c#1": {"images": 2, "dice": math.nan}}}
    metrics = _metrics_of(summary, "eval")
    assert set(metrics) == {"eval/images", "eval/dice", "eval/v_rand", "eval/_/images", "eval/_/dice",
                            "eval/a_b c_1/images", "eval/a_b c_1/dice"}
    assert math.isnan(metrics["eval/v_rand"]) and math.isnan(metrics["eval/a_b c_1/dice"])  # not an old value
    for name in metrics:
        _validate_metric_name(name)


@pytest.mark.slow
def test_evaluate_logs_to_a_tracking_server_that_keeps_the_files_itself(tmp_path, isbi_folder):
    # `mlflow server` stores a run's files itself (mlflow-artifacts: URIs), reached through the server's address
    import socket
    import time

    import mlflow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "files"), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                mlflow.MlflowClient(uri).search_experiments(max_results=1)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        else:
            pytest.fail(f"mlflow server did not answer at {uri} within 2 minutes")
        out = tmp_path / "run"
        result = _invoke("train", BUNDLE, "--data", isbi_folder, "--output", out, "--epochs", 1, "--no-progress",
                         "--device", "cpu", "--tracking-uri", uri, *_tiny_args())
        assert result.exit_code == 0, result.output
        result = _invoke("evaluate", BUNDLE, "--data", isbi_folder, "--checkpoint", out / "model.pt", "--split",
                         "all", "--no-progress", "--device", "cpu", *_tiny_args())
        assert result.exit_code == 0, result.output
        run_id = json.loads(result.output[: result.output.rindex("}") + 1])["mlflow_run_id"]
        summary = json.loads((out / "eval" / "summary.json").read_text())
        assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics["eval/v_rand"] == pytest.approx(summary["v_rand"])
        kept = list((tmp_path / "files").glob(f"**/{run_id}/artifacts/eval/summary.json"))
        assert len(kept) == 1 and json.loads(kept[0].read_text()) == summary
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_evaluate_asks_a_failing_tracking_server_once(trained, tmp_path, caplog):
    # a server that answers every request with an error: MLflow's own retries would hold the finished evaluation
    # for minutes
    import http.server
    import threading
    import time

    asked = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(self.path)
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run_dir = tmp_path / "run"
        shutil.copytree(trained["out"], run_dir)
        config = json.loads((run_dir / "config.json").read_text())
        config["_tracking_"].update(tracking_store="given", tracking_uri=f"http://127.0.0.1:{server.server_port}")
        (run_dir / "config.json").write_text(json.dumps(config))
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", run_dir / "model.pt",
                             "--split", "all", "--no-progress", "--device", "cpu", *_tiny_args())
        seconds = time.monotonic() - start
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert (run_dir / "eval" / "summary.json").is_file() and "mlflow_run_id" not in result.output
    said = [r.getMessage() for r in caplog.records if "MLflow run" in r.getMessage()]
    assert len(said) == 1 and "runs/get failed" in said[0], said
    assert len([p for p in asked if "runs/get" in p]) == 1 and seconds < 60  # asked once, not retried for minutes


def test_ctrl_c_while_an_evaluation_is_logged_to_mlflow_says_the_report_is_written(trained, tmp_path, monkeypatch):
    import medseg.tracking

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medseg.tracking, "log_evaluation", stopped)
    result = _invoke("evaluate", BUNDLE, "--data", trained["data"], "--checkpoint", trained["out"] / "model.pt",
                     "--split", "all", "--output", tmp_path / "eval", "--no-progress", "--device", "cpu",
                     *_tiny_args())
    assert result.exit_code == 130, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == [f"error: interrupted; the report is written in {tmp_path / 'eval'}; stopped while logging it "
                     "to the training's MLflow run (--no-tracking leaves that out)"]
    assert (tmp_path / "eval" / "summary.json").is_file()


def test_a_report_outside_the_run_folder_that_moved_away_is_the_same_report(tmp_path):
    from medseg.tracking import _report_place, _same_report

    run_folder, outside = tmp_path / "run", tmp_path / "reports" / "eval"
    run_folder.mkdir()
    assert _report_place(run_folder / "eval", run_folder) == "eval"
    assert _report_place(outside, run_folder) == str(outside.resolve())
    assert _same_report("eval", "eval") and not _same_report("sub/eval", "eval")
    # a report logged from a folder outside the run folder: the same one once that folder holds no report any more
    outside.mkdir(parents=True)
    (outside / "summary.json").write_text("{}")
    assert not _same_report(str(outside.resolve()), str(tmp_path / "elsewhere" / "eval"))
    (outside / "summary.json").unlink()
    assert _same_report(str(outside.resolve()), str(tmp_path / "elsewhere" / "eval"))
