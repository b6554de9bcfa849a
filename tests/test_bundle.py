"""The bundles are real MONAI bundles: schema-valid metadata, standard ids, plain monai.bundle loading and running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE, REPO, TINY, write_isbi_folder
from monai.bundle import ConfigParser

from medseg.bundle import load_config, parse_override, validate_metadata
from medseg.errors import BundleError, CheckpointError

BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_is_schema_valid_and_bundle_files_exist(bundle):
    meta = validate_metadata(bundle)
    assert meta["network_data_format"]["inputs"] and meta["network_data_format"]["outputs"]
    for name in ("LICENSE", "docs/README.md", "configs/train.json", "configs/evaluate.json",
                 "configs/inference.json", "configs/logging.conf"):
        assert (bundle / name).is_file(), name
    assert not any(f.stat().st_size > 25 * 2**20 for f in bundle.rglob("*") if f.is_file())


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_eval_metrics_are_named_as_evaluate_reports_them(bundle, tmp_path):
    # isbi_em's "mean_dice" and nuclei's "foreground_dice" were in no summary.json, which says "dice": a
    # tool comparing the published figures with an evaluation by key found neither
    import numpy as np

    config = json.loads((bundle / "configs" / "evaluate.json").read_text())
    report = next(h for h in config["validate#handlers"] if "medseg.evaluation." in str(h.get("_target_")))
    name = report["_target_"].rsplit(".", 1)[1]
    label = np.zeros((1, 8, 8), np.int64)
    label[0, 2:5, 2:5] = 1
    if name == "ChallengeMetrics":
        from medseg.evaluation import ChallengeMetrics as Report
        out, kwargs = {"prob": torch.from_numpy(np.concatenate([1.0 - label, label * 1.0])),
                       "label": torch.from_numpy(label)}, {}
    elif name == "ClassMetrics":
        from medseg.evaluation import ClassMetrics as Report
        train = json.loads((bundle / "configs" / "train.json").read_text())
        kwargs = {k: train[k] for k in ("num_classes", "class_names", "regions")}
        out = {"pred": torch.from_numpy(label), "label": torch.from_numpy(label)}
    else:
        from medseg.evaluation import InstanceMetrics as Report
        out, kwargs = {"pred_instances": torch.from_numpy(label), "gt_instances": torch.from_numpy(label)}, {}
    made = Report(str(tmp_path), **kwargs)
    made.rows.append(made.score(out, {}))
    published = json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert set(published) <= set(made.summarise()), (bundle.name, sorted(published), sorted(made.summarise()))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_monai_workflow_property_checks_pass(bundle, tmp_path):
    # what model-zoo tooling runs: every required property present, every handler list entry a component
    from conftest import write_dsb_folder, write_jurkat_folder
    from monai.bundle import ConfigWorkflow

    configs = bundle / "configs"
    make = {"isbi_em": write_isbi_folder, "jurkat": write_jurkat_folder, "nuclei": write_dsb_folder}[bundle.name]
    data = make(tmp_path / "data", n=8) if bundle.name == "isbi_em" else make(tmp_path / "data")
    images = next(p.parent for p in sorted(data.rglob("*.png")))
    for workflow_type, config, settings in (
        ("train", "train.json", {"dataset_dir": str(data), "output_dir": str(tmp_path / "o")}),
        ("infer", "inference.json", {"dataset_dir": str(images), "output_dir": str(tmp_path / "p")}),
    ):
        workflow = ConfigWorkflow(config_file=str(configs / config), meta_file=str(configs / "metadata.json"),
                                  workflow_type=workflow_type, logging_file=False, **settings)
        workflow.initialize()
        assert workflow.check_properties() == [], (bundle.name, workflow_type)
        parser = workflow.parser
        if workflow_type == "train":  # the ids the run's expressions use are the attached handlers
            assert parser.get_parsed_content("ema") is parser.get_parsed_content("train#handlers")[0]
            assert parser.get_parsed_content("early_stop") is parser.get_parsed_content("validate#handlers")[2]
        else:  # plain `monai.bundle run --dataset_dir DIR` points inference at DIR
            assert parser.get_parsed_content("input_dir") == settings["dataset_dir"]


def test_metadata_errors_name_the_problem(tmp_path):
    (tmp_path / "configs").mkdir()
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="version 9.9.9 has no changelog entry"):
        validate_metadata(tmp_path)
    del meta["task"]
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="'task' is a required property"):
        validate_metadata(tmp_path)


def test_standard_ids_present():
    train = ConfigParser.load_config_file(str(BUNDLE / "configs" / "train.json"))
    parser = ConfigParser(train)
    for key in ("bundle_root", "device", "dataset_dir", "network_def", "network", "train#trainer",
                "train#trainer#max_epochs", "train#dataset", "train#dataset#data", "train#handlers",
                "validate#evaluator", "validate#handlers", "val_interval", "initialize", "run", "training"):
        assert key in parser, key
    infer = ConfigParser(ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.json")))
    for key in ("bundle_root", "device", "network_def", "network", "inferer", "preprocessing",
                "postprocessing", "dataset", "evaluator", "output_dir", "run"):
        assert key in infer, key


def test_network_in_out_and_torchscript():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    parser = ConfigParser(ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.json")))
    net = parser.get_parsed_content("network_def").eval()
    fmt = meta["network_data_format"]
    x = torch.rand(1, fmt["inputs"]["image"]["num_channels"], *fmt["inputs"]["image"]["spatial_shape"])
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, fmt["outputs"]["pred"]["num_channels"], *fmt["outputs"]["pred"]["spatial_shape"])
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), y)


def test_train_and_inference_networks_agree():
    train = ConfigParser(ConfigParser.load_config_file(str(BUNDLE / "configs" / "train.json")))
    infer = ConfigParser(ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.json")))
    assert train["network_def"] == infer["network_def"]
    assert train["validate#preprocessing#transforms"][1] == infer["preprocessing#transforms"][1]


def test_overrides_must_name_existing_keys():
    parser = load_config(BUNDLE, "train", overrides={"max_epochs": 3, "network_def#channels": [4, 8]})
    assert parser["max_epochs"] == 3 and parser["network_def#channels"] == [4, 8]
    with pytest.raises(BundleError, match="unknown config key 'max_epoch'.*did you mean max_epochs"):
        load_config(BUNDLE, "train", overrides={"max_epoch": 3})
    # a parent the config lacks: the near top-level ids, not the missing parent again ("did you mean
    # dataloader#num_workers?" for dataloader#num_workers)
    with pytest.raises(BundleError, match=r"did you mean num_workers\?$"):
        load_config(BUNDLE, "train", overrides={"dataloader#num_workers": 2})
    with pytest.raises(BundleError, match=r"did you mean network_def#channels, "):
        load_config(BUNDLE, "train", overrides={"network_def#chanels": [4, 8]})
    with pytest.raises(BundleError, match=r"did you mean network_def#channels\?$"):  # the parent misspelt
        load_config(BUNDLE, "train", overrides={"netwrk_def#channels": [4, 8]})
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_config(REPO / "bundles" / "nope", "train")
    assert parse_override("a#b=[1, 2]") == ("a#b", [1, 2])
    assert parse_override("loss_name=dice_ce") == ("loss_name", "dice_ce")
    with pytest.raises(BundleError, match="has no '='"):
        parse_override("max_epochs")


def test_dice_ce_overlay_selects_the_loss_and_drops_the_class_balance_prior():
    default = load_config(BUNDLE, "train")
    assert default.get_parsed_content("logit_shift") == [0.0, 1.2]  # undoes the class-balanced loss's prior
    parser = load_config(BUNDLE, "train", overlays=[REPO / "configs" / "dice_ce.json"])
    assert type(parser.get_parsed_content("loss")).__name__ == "DiceCEOnLabel"
    assert parser.get_parsed_content("logit_shift") == [0.0, 0.0]  # an unweighted loss has no prior to undo
    infer = load_config(BUNDLE, "infer", overlays=[REPO / "configs" / "dice_ce.json"])  # infer takes it too
    assert infer.get_parsed_content("logit_shift") == [0.0, 0.0]


@pytest.mark.parametrize("bundle, workflow, overlay, key", [
    ("jurkat", "train", "dice_ce.json", "loss_name"),  # jurkat's own loss is Dice + cross-entropy already
    ("isbi_em", "infer", "quick.json", "max_epochs"),
])
def test_overlay_key_the_bundle_lacks_is_a_one_line_error(bundle, workflow, overlay, key):
    """An overlay is never silently ignored: a key the bundle's configs lack names the overlay and the key."""
    path = REPO / "configs" / overlay
    with pytest.raises(BundleError) as info:
        load_config(REPO / "bundles" / bundle, workflow, overlays=[path])
    message = str(info.value)
    assert message.startswith(f"{path}: '{key}' is not a config id of {bundle}'s {workflow} configs")
    assert "\n" not in message


def test_yaml_overlay_numbers_and_whole_component_replacements(tmp_path):
    # YAML 1.1 reads 1e-4 as a word: where the bundle has a number it is taken as one; a word that is no
    # number, and a component replaced by a dict without _target_, are errors naming the file and key
    overlay = tmp_path / "ov.yaml"
    overlay.write_text("learning_rate: 1e-4\nval_interval: '2'\n")
    parser = load_config(BUNDLE, "train", overlays=[overlay])
    assert parser["learning_rate"] == 1e-4 and parser["val_interval"] == 2
    overlay.write_text("learning_rate: fast\n")
    with pytest.raises(BundleError, match=r"ov.yaml: learning_rate: 'fast' is not a number"):
        load_config(BUNDLE, "train", overlays=[overlay])
    overlay.write_text("max_epochs: 2e1\n")  # a count stays a count
    assert load_config(BUNDLE, "train", overlays=[overlay])["max_epochs"] == 20
    for bad in ("2.5e0", "nan"):
        overlay.write_text(f"max_epochs: {bad}\n")
        with pytest.raises(BundleError, match=rf"max_epochs: '{bad}' is not a whole number"):
            load_config(BUNDLE, "train", overlays=[overlay])
    overlay.write_text("network_def: {channels: [16, 32, 64]}\n")
    with pytest.raises(BundleError, match=r"ov.yaml: 'network_def' replaces the bundle's whole network_def.*"
                                          r"'network_def#channels'"):
        load_config(BUNDLE, "train", overlays=[overlay])
    overlay.write_text("network_def#channels: [16, 32, 64, 128, 256]\n")
    assert load_config(BUNDLE, "train", overlays=[overlay])["network_def#channels"] == [16, 32, 64, 128, 256]
    # where the bundle has null or a list of numbers, too: 1e-2 reached the weight averaging as a word
    overlay.write_text("ema_momentum: 1e-2\n")
    assert load_config(BUNDLE, "train", overlays=[overlay])["ema_momentum"] == 0.01
    overlay.write_text("class_weights: [1.0, 1.0, 3e0]\n")
    assert load_config(REPO / "bundles" / "nuclei", "train", overlays=[overlay])["class_weights"] == [1.0, 1.0, 3.0]
    overlay.write_text("target_diameter: 7.5e1\n")
    for workflow in ("train", "infer"):
        assert load_config(REPO / "bundles" / "jurkat", workflow, overlays=[overlay])["target_diameter"] == 75.0
    overlay.write_text("optimizer#lr: 1e-4\n")  # the bundle's is a reference (@learning_rate)
    assert load_config(BUNDLE, "train", overlays=[overlay]).get_parsed_content("optimizer").defaults["lr"] == 1e-4
    # only numbers: a name of a list of names stays a name, and a JSON overlay's text stays text
    overlay.write_text("class_names: [background, 1e1, boundary]\n")
    assert load_config(REPO / "bundles" / "nuclei", "train", overlays=[overlay])["class_names"][1] == "1e1"


def test_every_shipped_overlay_applies_to_training_every_bundle_it_names():
    """quick.json and no_early_stop.json fit every bundle's training; dice_ce.json fits isbi_em's."""
    for bundle in ("isbi_em", "jurkat", "nuclei"):
        for overlay in ("quick.json", "no_early_stop.json"):
            load_config(REPO / "bundles" / bundle, "train", overlays=[REPO / "configs" / overlay])
    load_config(BUNDLE, "train", overlays=[REPO / "configs" / "dice_ce.json"])


def test_plain_monai_bundle_run_with_mlflow_tracking(tmp_path):
    """``python -m monai.bundle run training`` trains the bundle, and ``--tracking mlflow`` finds our ids."""
    data = write_isbi_folder(tmp_path / "data", n=3, size=64)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE),
            "--config_file", str(BUNDLE / "configs" / "train.json"),
            "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
            "--dataset_dir", str(data), "--output_dir", str(out), "--max_epochs", "1", "--tracking", "mlflow"]
    for item in TINY:
        key, value = item.split("=", 1)
        args += [f"--{key}", value]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.pt").is_file() and (out / "split.json").is_file()
    assert (out / "mlruns.db").is_file()  # MONAI's MLflow handlers were patched into our handler lists


def test_plain_monai_evaluate_config_scores_a_checkpoint(tmp_path, isbi_folder):
    """train.json + evaluate.json run with ``monai.bundle`` alone (``python -m monai.bundle run evaluating``):
    the bundle's CheckpointLoader loads the weights and the report writes the challenge scores."""
    from monai.bundle import ConfigWorkflow

    parser = ConfigParser(ConfigParser.load_config_file(str(BUNDLE / "configs" / "train.json")))
    ckpt = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    configs = [str(BUNDLE / "configs" / name) for name in ("train.json", "evaluate.json")]
    workflow = ConfigWorkflow(
        config_file=configs, meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type=None,
        run_id="evaluating", bundle_root=str(BUNDLE), dataset_dir=str(isbi_folder), output_dir=str(tmp_path / "eval"),
        ckpt_path=str(ckpt), device="$torch.device('cpu')", val_count=1)
    workflow.initialize()
    workflow.run()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 1 and 0.0 <= summary["v_rand"] <= 1.0
    assert len((tmp_path / "eval" / "metrics.csv").read_text().splitlines()) == 2


def test_plain_monai_inference_workflow_writes_outputs(tmp_path, isbi_folder):
    from monai.bundle import ConfigWorkflow

    parser = ConfigParser(ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.json")))
    ckpt = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
        workflow_type="infer", bundle_root=str(BUNDLE), input_dir=str(isbi_folder / "train" / "image"),
        output_dir=str(tmp_path / "out"), ckpt_path=str(ckpt), device="$torch.device('cpu')", patch_size=[64, 64])
    workflow.initialize()
    workflow.run()
    assert sorted(p.name for p in (tmp_path / "out" / "mask").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert len(list((tmp_path / "out" / "prob").glob("*.tif"))) == 4
    assert Path(ckpt).is_file()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_plain_monai_inference_lists_the_slices_of_a_4d_nifti_by_its_channel_axis(bundle, tmp_path):
    """``--nifti_channel_dim`` reaches the slice list of plain ``monai.bundle run`` inference (it counted the
    slices without it and refused the file, naming the very setting it had been given)."""
    import nibabel as nib
    import numpy as np

    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 5, 3), np.float32), np.eye(4)), tmp_path / "in" / "four.nii.gz")
    parser = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "inference.json")))
    parser["input_dir"], parser["bundle_root"] = str(tmp_path / "in"), str(bundle)
    with pytest.raises(Exception) as refused:
        parser.get_parsed_content("datalist")
    assert "nifti_channel_dim=3" in str(refused.value.__cause__)
    parser["nifti_channel_dim"] = 3
    datalist = parser.get_parsed_content("datalist", lazy=False)
    assert [d["page"] for d in datalist] == [0, 1, 2, 3, 4] and {d["pages"] for d in datalist} == {5}


# --- every bundle (jurkat, nuclei and isbi_em): plain monai.bundle parsing ------------------------------------

TRAIN_IDS = ("bundle_root", "device", "dataset_dir", "output_dir", "network_def", "network", "loss", "optimizer",
             "datalists", "train#trainer", "train#trainer#max_epochs", "train#dataset", "train#dataset#data",
             "train#handlers", "validate#evaluator", "validate#handlers", "val_interval", "initialize", "run",
             "training", "compile")
INFER_IDS = ("bundle_root", "device", "network_def", "network", "inferer", "preprocessing", "postprocessing",
             "dataset", "evaluator", "output_dir", "ckpt_path", "run", "inferring")


def _bundle_data(bundle: Path, root: Path) -> Path:
    from conftest import write_dsb_folder, write_jurkat_folder

    if bundle.name == "jurkat":
        return write_jurkat_folder(root / "jurkat", layout=[("a", (48, 52))] * 3)
    if bundle.name == "nuclei":
        return write_dsb_folder(root / "dsb", layout=[("s1", (48, 48), False), ("s2", (48, 48), False)])
    return write_isbi_folder(root / "isbi", n=3, size=48)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_configs_parse_with_plain_monai_bundle(bundle, tmp_path):
    """train, train + evaluate and inference configs resolve with ``monai.bundle.ConfigParser`` alone."""
    configs = bundle / "configs"
    meta = json.loads((configs / "metadata.json").read_text())
    train = ConfigParser(ConfigParser.load_config_file(str(configs / "train.json")))
    infer = ConfigParser(ConfigParser.load_config_file(str(configs / "inference.json")))
    for key in TRAIN_IDS:
        assert key in train, key
    assert train["train"]["trainer"]["compile"] == "@compile" and train["compile"] is False  # opt-in
    for key in INFER_IDS:
        assert key in infer, key
    # the same network in training and inference, taking and giving the channels metadata.json documents
    nets = [p.get_parsed_content("network_def") for p in (train, infer)]
    shapes = [[tuple(v.shape) for v in net.state_dict().values()] for net in nets]
    assert shapes[0] == shapes[1]
    fmt = meta["network_data_format"]
    x = torch.rand(1, fmt["inputs"]["image"]["num_channels"], 64, 64)
    with torch.no_grad():
        assert nets[1].eval()(x).shape == (1, fmt["outputs"]["pred"]["num_channels"], 64, 64)
    # train + evaluate, on a small data folder: datalists, evaluator and evaluation handlers instantiate
    evaluate = ConfigParser()
    evaluate.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    evaluate["dataset_dir"] = str(_bundle_data(bundle, tmp_path))
    evaluate["output_dir"] = str(tmp_path / "eval")
    evaluate["device"] = "$torch.device('cpu')"
    if "val_count" in evaluate:
        evaluate["val_count"] = 1  # isbi_em holds out the last N slices
    assert evaluate.get_parsed_content("datalists")["val"]
    assert evaluate.get_parsed_content("validate#evaluator") is not None
    assert len(evaluate.get_parsed_content("validate#handlers")) >= 2


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_inference_logit_shift_matches_training(bundle):
    """The prior correction that validation applies (derived from the training loss) is the one inference applies."""
    train = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "train.json")))
    infer = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "inference.json")))
    if "logit_shift" not in train:
        assert "logit_shift" not in infer
        return
    train.get_parsed_content("imports")
    infer.get_parsed_content("imports")
    expected = train.get_parsed_content("logit_shift")
    assert infer.get_parsed_content("logit_shift") == pytest.approx(expected, abs=1e-6)
    assert any(expected), "a bundle with logit_shift should shift at least one class"
    # the ids the training derives the shift from exist in inference.json too, and derive the same shift
    changes = {"class_balance": False, "loss_name": "dice_ce", "class_weights": [1.0, 1.0, 4.0],
               "interior_log_prior": 0.5}
    used = {k: v for k, v in changes.items() if k in train}
    assert used, "train.json derives logit_shift from config ids"
    for key, value in used.items():
        t = load_config(bundle, "train", overrides={key: value})
        i = load_config(bundle, "infer", overrides={key: value})
        shift = t.get_parsed_content("logit_shift")
        assert i.get_parsed_content("logit_shift") == pytest.approx(shift, abs=1e-6), key
        assert shift != pytest.approx(expected, abs=1e-6), key
    if "loss_name" in train:  # the clDice variant keeps the weighted cross-entropy's class prior
        for workflow in ("train", "infer"):
            shift = load_config(bundle, workflow, overrides={"loss_name": "weighted_ce_cldice"})
            assert shift.get_parsed_content("logit_shift") == pytest.approx(expected, abs=1e-6), workflow


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_inference_object_scale_matches_training(bundle):
    """With object-size normalisation on, inference brings objects to the diameter training used, measured alike."""
    from medseg.scale import ScaledTiledInferer

    train = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "train.json")))
    infer = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "inference.json")))
    keys = ("target_diameter", "diameter_statistic", "zoom_limits", "zoom_tolerance", "zoom_iterations")
    if "target_diameter" not in train:
        assert not any(k in infer for k in keys)
        return
    train.get_parsed_content("imports")
    for key in keys:
        assert infer.get_parsed_content(key) == train.get_parsed_content(key), key
    assert infer.get_parsed_content("inferer").target is None  # off by default in the shipped bundles
    train["target_diameter"] = infer["target_diameter"] = 20
    train.parse(reset=True)
    infer.parse(reset=True)
    ours, theirs = train.get_parsed_content("validate#inferer"), infer.get_parsed_content("inferer")
    assert isinstance(ours, ScaledTiledInferer) and isinstance(theirs, ScaledTiledInferer)
    for attr in ("target", "foreground", "statistic", "grow", "limits", "tolerance", "iterations"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert (ours.shift is None) == (theirs.shift is None)
    if ours.shift is not None:
        torch.testing.assert_close(ours.shift, theirs.shift)
    assert ours.target == 20 and theirs.diameter is None  # estimated per image unless given


def test_nuclei_distance_head_agrees_between_training_and_inference():
    """``distance_head`` (off by default) sets the same 4-channel network in both files, and inference shifts and
    activates only the class channels."""
    from medseg.bundle import load_config
    from medseg.transforms import ClassActivationsd, LogitShiftd

    bundle = REPO / "bundles" / "nuclei"
    assert all(load_config(bundle, w).get_parsed_content("distance_head") is False for w in ("train", "infer"))
    for value, channels in ((False, 3), (True, 4)):
        train, infer = (load_config(bundle, w, overrides={"distance_head": value}) for w in ("train", "infer"))
        nets = [parser.get_parsed_content("network_def") for parser in (train, infer)]
        assert [net.out_channels for net in nets] == [channels, channels]
        shift, activate = infer.get_parsed_content("postprocessing").transforms[:2]
        assert isinstance(shift, LogitShiftd) and shift.extra_channels == channels - 3
        assert isinstance(activate, ClassActivationsd) and activate.num_classes == 3
        assert train.get_parsed_content("loss").distance_head is value


@pytest.mark.parametrize("name", ["jurkat", "nuclei"])
def test_plain_monai_train_workflow_on_new_bundles(name, tmp_path):
    """``ConfigWorkflow`` (what ``python -m monai.bundle run training`` uses) trains the new bundles."""
    from monai.bundle import ConfigWorkflow

    bundle = REPO / "bundles" / name
    overrides = {"patch_size": [32, 32], "network_def#channels": [4, 8], "network_def#strides": [2],
                 "network_def#num_res_units": 0, "batch_size": 1, "val_interval": 1}
    if name == "nuclei":
        overrides["samples_per_image"] = 1
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="train", bundle_root=str(bundle), dataset_dir=str(_bundle_data(bundle, tmp_path)),
        output_dir=str(tmp_path / "out"), device="$torch.device('cpu')", max_epochs=1, **overrides)
    workflow.initialize()
    workflow.run()
    assert (tmp_path / "out" / "model.pt").is_file() and (tmp_path / "out" / "split.json").is_file()
    workflow.finalize()


def _conv_net(width: int, extra_layers: int = 0) -> torch.nn.Module:
    layers = [torch.nn.Conv2d(1, width, 3), torch.nn.ReLU(), torch.nn.Conv2d(width, 2, 1)]
    for _ in range(extra_layers):
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("saved, expected", [
    (_conv_net(4), "0.weight is [4, 1, 3, 3] in the checkpoint and [8, 1, 3, 3] in the network"),
    (torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3)), 'missing from the checkpoint: "2.weight", "2.bias"'),
    (_conv_net(8, extra_layers=1), 'not in the network: "4.weight", "4.bias"'),
], ids=["narrower", "fewer layers", "more layers"])
def test_checkpoint_of_another_network_names_the_first_difference(tmp_path, saved, expected):
    """The one-line error says which weight differs and how, instead of PyTorch's multi-line report."""
    from medseg.bundle import load_checkpoint
    from medseg.errors import CheckpointError

    path = tmp_path / "model.pt"
    torch.save({"model": saved.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_conv_net(8), path)
    message = str(info.value)
    assert message.startswith(f"{path}: weights do not fit this bundle's network (")
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("content, expected", [
    ("model", "holds pickled objects, not only weights; save the weights alone with torch.save"),
    ("tensor", "holds a Tensor, not a state dict of weights"),
    ("junk", "not a readable PyTorch checkpoint ("),
    ("zip", "not a readable PyTorch checkpoint ("),
    ("torchscript", "a TorchScript model, not a checkpoint of weights"),
    ("folder", "not a file (a folder, or a pipe)"),
], ids=["whole pickled model", "a tensor", "junk bytes", "a zip of something else", "TorchScript", "a folder"])
def test_a_file_that_is_no_state_dict_is_a_one_line_error(tmp_path, content, expected):
    import warnings
    import zipfile

    from medseg.bundle import load_checkpoint
    from medseg.errors import CheckpointError

    path = tmp_path / "model.pt"
    if content == "model":
        torch.save(_conv_net(8), path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "junk":
        path.write_bytes(b"\x80\x02junk" * 50)
    elif content == "torchscript":
        torch.jit.script(_conv_net(8)).save(str(path))
    elif content == "folder":
        path.mkdir()
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not weights")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed beside the one line (torch warns of TorchScript)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(_conv_net(8), path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    assert "weights_only" not in message  # torch's advice to load it unsafely is not passed on


def test_unknown_key_hint_names_an_id_of_that_commands_config():
    with pytest.raises(BundleError) as info:
        load_config(BUNDLE, "infer", overrides={"zzzqqq": 1})
    message = str(info.value)
    assert "not an id of this command's config" in message and "inferer#overlap" in message
    assert "train#" not in message


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_validation_dice_and_iou_score_an_image_like_evaluate(bundle):
    # a class the label lacks but the network predicts costs validation what it costs `medseg evaluate`
    from monai.handlers import IgniteMetricHandler
    from monai.metrics import DiceMetric, MeanIoU

    from medseg.metrics import multiclass_scores

    parser = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "train.json")))
    metrics = {**parser.get_parsed_content("validate#key_metric"),
               **parser.get_parsed_content("validate#additional_metrics")}
    handlers = [m for m in metrics.values() if isinstance(m, IgniteMetricHandler)]
    assert {type(h.metric_fn) for h in handlers} >= {DiceMetric}
    classes = max(3, int(parser.get_parsed_content("network_def#out_channels")))
    gt = torch.zeros(1, 8, 8, dtype=torch.long)
    gt[0, 2:5, 2:5] = 1
    pred = gt.clone()
    pred[0, 0, 0] = classes - 1  # one pixel of a class absent from the label
    expected = multiclass_scores(pred[0].numpy(), gt[0].numpy(), classes)

    def onehot(x):
        return torch.nn.functional.one_hot(x, classes).permute(0, 3, 1, 2).float()

    for handler in handlers:
        handler.metric_fn.reset()
        handler.metric_fn(onehot(pred), onehot(gt))
        key = {DiceMetric: "mean_dice", MeanIoU: "mean_iou"}[type(handler.metric_fn)]
        assert handler.metric_fn.aggregate().item() == pytest.approx(expected[key]), (bundle.name, key)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_cache_rate_sets_how_much_of_the_data_is_held_in_memory(bundle, tmp_path):
    # data larger than memory: -s cache_rate=0.5 caches half the training and validation samples
    data = _bundle_data(bundle, tmp_path)
    counts = {}
    for rate in (1.0, 0.5):
        parser = load_config(bundle, "train", overrides={"dataset_dir": str(data), "cache_rate": rate,
                                                          "output_dir": str(tmp_path / f"o{rate}")})
        if "val_count" in parser:
            parser["val_count"] = 1
        train, val = (parser.get_parsed_content(f"{part}#dataset") for part in ("train", "validate"))
        counts[rate] = (train.cache_num, len(train), val.cache_num, len(val))
    n_train, n_val = counts[1.0][1], counts[1.0][3]
    assert counts[1.0] == (n_train, n_train, n_val, n_val)
    assert counts[0.5] == (int(n_train * 0.5), n_train, int(n_val * 0.5), n_val)


# --- the training's settings, used by evaluate and infer ------------------------------------------------------

NUCLEI = REPO / "bundles" / "nuclei"


def _run_record(folder: Path, bundle: Path, changes: dict | None = None) -> Path:
    """A run folder as ``medseg train`` leaves it: ``config.json`` (the bundle's train config with ``changes``,
    by config id, ``a#b`` for nested ones) beside ``model.pt``."""
    from medseg.bundle import default_config

    config = default_config(bundle, "train")
    config["_meta_"] = json.loads((bundle / "configs" / "metadata.json").read_text())
    config["dataset_dir"], config["output_dir"], config["device"] = "/data", str(folder), "$torch.device('cpu')"
    for key, value in (changes or {}).items():
        *parents, leaf = key.split("#")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.pt").write_bytes(b"")
    return folder / "model.pt"


def test_training_settings_are_the_inference_ids_the_training_changed(tmp_path, caplog):
    from medseg.runfolder import training_settings

    ckpt = _run_record(tmp_path / "run", NUCLEI, {"target_diameter": 20, "network_def#channels": [8, 16, 32],
                                                  "max_epochs": 3, "learning_rate": 0.1, "tta": True,
                                                  "stain": "hematoxylin", "postprocess#min_area": 10})
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        found = training_settings(NUCLEI, [ckpt], {})
        assert not caplog.records  # said once the weights have loaded
        found.say()
    # the model's ids the inference config has; not the training's own (max_epochs, learning_rate), nor the
    # call's data, folders, device and tta
    assert found.values == {"target_diameter": 20, "network_def#channels": [8, 16, 32], "stain": "hematoxylin",
                            "postprocess#min_area": 10}
    (said,) = [r.getMessage() for r in caplog.records]
    assert "target_diameter=20" in said and str(tmp_path / "run" / "config.json") in said
    parser = load_config(NUCLEI, "infer", trained=found.values, overrides={"target_diameter": 30})
    assert parser["network_def"]["channels"] == [8, 16, 32] and parser["target_diameter"] == 30  # --set wins
    # what this call gives by --set or an overlay is not taken, nor what holds it or a part of it; MONAI's '::'
    # separator counts as '#'; a '+' overlay merging into a mapping gives its own keys only
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"network_def::channels": [4, 8], "+postprocess": {"min_seed_area": 8}}))
    assert training_settings(NUCLEI, [ckpt], {"target_diameter": 30}, [overlay]).values == {
        "stain": "hematoxylin", "postprocess#min_area": 10}
    assert "network_def#channels" not in training_settings(NUCLEI, [ckpt], {"network_def": {}}).values
    assert "postprocess#min_area" not in training_settings(NUCLEI, [ckpt], {"postprocess::min_area": 5}).values
    # an overlay that cannot be read is left to load_config to name
    assert training_settings(NUCLEI, [ckpt], {}, [tmp_path / "missing.json"]).values == found.values
    # no record (a bundle's models/model.pt), or an unchanged training: nothing
    (tmp_path / "bare").mkdir()
    assert training_settings(NUCLEI, [tmp_path / "bare" / "model.pt"], {}).values == {}
    assert training_settings(NUCLEI, [_run_record(tmp_path / "plain", NUCLEI)], {}).values == {}


@pytest.mark.parametrize("content, reason", [("{not json", "not JSON (Expecting property name"),
                                             ("[1, 2]", "not a config"),
                                             ('{"patch_size": 16}', "recorded by a training of no bundle")])
def test_a_record_that_is_not_this_bundles_is_said_and_left_out(tmp_path, caplog, content, reason):
    from medseg.runfolder import training_settings

    (tmp_path / "config.json").write_text(content)
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        assert training_settings(NUCLEI, [tmp_path / "model.pt"], {}).values == {}
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(str(tmp_path / "config.json")) and reason in said and "not taken" in said


def test_training_settings_of_an_ensemble_must_agree_and_another_bundles_are_refused(tmp_path, caplog):
    from medseg.errors import ConfigValueError
    from medseg.runfolder import training_settings

    a = _run_record(tmp_path / "a", NUCLEI, {"target_diameter": 20})
    b = _run_record(tmp_path / "b", NUCLEI, {"target_diameter": 16})
    same = _run_record(tmp_path / "c", NUCLEI, {"target_diameter": 20})
    found = training_settings(NUCLEI, [a, same], {})
    assert found.values == {"target_diameter": 20} and len(found.sources) == 2
    with pytest.raises(ConfigValueError, match="target_diameter: the checkpoints were trained with different") as err:
        training_settings(NUCLEI, [a, b], {})
    for run in ("a", "b"):
        assert str(tmp_path / run / "config.json") in str(err.value)
    # a member trained with the bundle's value, or without a record (taken as the bundle's), differs too
    default = _run_record(tmp_path / "d", NUCLEI)
    with pytest.raises(ConfigValueError, match=r"20 in .*a/config.json, null in .*d/config.json"):
        training_settings(NUCLEI, [a, default], {})
    with pytest.raises(ConfigValueError, match=r"the bundle's null for .*none/model.pt \(no record\)"):
        training_settings(NUCLEI, [a, tmp_path / "none" / "model.pt"], {})
    assert training_settings(NUCLEI, [a, b], {"target_diameter": 18}).values == {}  # given: not asked
    # another bundle's training: refused (a jurkat model with one input channel has nuclei's shape, and nuclei
    # read its nucleus class as the boundary class, with a warning only)
    other = _run_record(tmp_path / "other", NUCLEI, {"target_diameter": 20, "_meta_#name": "another bundle",
                                                     "bundle_root": "/models/bundles/other"})
    # where that bundle is, as the record has it (it said to move config.json away: the weights then ran as
    # this bundle's, whose classes they do not mean)
    with pytest.raises(CheckpointError, match=r"other/model.pt: trained with the bundle 'another bundle' at "
                                              r"/models/bundles/other \(its config.json\), not this one, '.*'; give "
                                              r"that bundle \(its weights mean its own classes and settings\)$"):
        training_settings(NUCLEI, [other], {})
    # a record that names it relative to the folder its training ran in (make demo's bundles/jurkat): from there
    relative = _run_record(tmp_path / "rel", NUCLEI, {"_meta_#name": "another bundle", "bundle_root": "bundles/other"})
    (tmp_path / "rel" / "train_summary.json").write_text(json.dumps({"environment": {"cwd": "/work/project"}}))
    with pytest.raises(CheckpointError, match=r"trained with the bundle 'another bundle' at "
                                              r"/work/project/bundles/other \(its config.json\)"):
        training_settings(NUCLEI, [relative], {})


def test_a_linked_checkpoint_finds_its_record_and_a_lone_one_is_said(tmp_path, caplog):
    from medseg.runfolder import training_settings

    run = _run_record(tmp_path / "run", NUCLEI, {"target_diameter": 20})
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "model.pt").symlink_to(run)
    assert training_settings(NUCLEI, [tmp_path / "links" / "model.pt"], {}).values == {"target_diameter": 20}
    (tmp_path / "lone").mkdir()
    shutil.copy(run, tmp_path / "lone" / "model.pt")
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        assert training_settings(NUCLEI, [tmp_path / "lone" / "model.pt"], {}).values == {}
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{tmp_path / 'lone' / 'model.pt'}: no config.json of its training beside it, so it runs "
                           "with the bundle's settings")
    caplog.clear()
    shipped = shutil.copytree(NUCLEI, tmp_path / "bundle", ignore=shutil.ignore_patterns("models"))
    (shipped / "models").mkdir()
    shutil.copy(run, shipped / "models" / "model.pt")  # the bundle's own weights need no record
    with caplog.at_level("WARNING", logger="medseg.runfolder"):
        assert training_settings(shipped, [shipped / "models" / "model.pt"], {}).values == {}
    assert not caplog.records


def test_training_settings_take_components_parts_added_and_expressions(tmp_path):
    from medseg.runfolder import training_settings

    dynunet = {"_target_": "monai.networks.nets.DynUNet", "spatial_dims": 2, "in_channels": 1,
               "out_channels": "@out_channels", "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
               "upsample_kernel_size": [2, 2], "filters": [8, 16, 32]}
    ckpt = _run_record(tmp_path / "run", NUCLEI, {"network_def": dynunet})
    assert training_settings(NUCLEI, [ckpt], {}).values == {"network_def": dynunet}  # another class: whole
    network = load_config(NUCLEI, "infer", trained={"network_def": dynunet}).get_parsed_content("network_def")
    assert type(network).__name__ == "DynUNet" and network(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    # a part added to the bundle's component ('+network_def' overlay), and values given as expressions (saved
    # with MONAI's '::' separator)
    ckpt = _run_record(tmp_path / "run2", NUCLEI, {"network_def#kernel_size": 5, "network_def#up_kernel_size": 5,
                                                   "network_def#channels": "$[4 * 2 ** i for i in range(5)]",
                                                   "target_diameter": "$float(@patch_size::0) / 8"})
    found = training_settings(NUCLEI, [ckpt], {}).values
    assert found == {"network_def#kernel_size": 5, "network_def#up_kernel_size": 5,
                     "network_def#channels": "$[4 * 2 ** i for i in range(5)]",
                     "target_diameter": "$float(@patch_size::0) / 8"}
    parser = load_config(NUCLEI, "infer", trained=found)
    assert parser.get_parsed_content("target_diameter") == 32.0
    assert parser.get_parsed_content("network_def").model[0].conv.unit0.conv.kernel_size == (5, 5)
    # a shipped expression saved with '::' is no change
    from medseg.bundle import default_config

    shift = default_config(NUCLEI, "train")["logit_shift"]
    assert "#" in shift or "@" in shift
    ckpt = _run_record(tmp_path / "run3", NUCLEI, {"logit_shift": shift.replace("#", "::")})
    assert training_settings(NUCLEI, [ckpt], {}).values == {}


def test_a_bundle_that_only_infers_takes_the_trainings_settings_too(tmp_path):
    import shutil

    from medseg.runfolder import training_settings

    bundle = tmp_path / "infer_only"
    (bundle / "configs").mkdir(parents=True)
    for name in ("inference.json", "metadata.json", "logging.conf"):
        shutil.copy(NUCLEI / "configs" / name, bundle / "configs" / name)
    ckpt = _run_record(tmp_path / "run", NUCLEI, {"target_diameter": 20})
    found = training_settings(bundle, [ckpt], {}).values  # compared with its inference config instead
    assert found["target_diameter"] == 20
    assert load_config(bundle, "infer", trained=found).get_parsed_content("target_diameter") == 20


def test_training_settings_whole_components_numbers_and_expressions_worked_out_alike(tmp_path):
    from medseg.errors import ConfigValueError
    from medseg.runfolder import training_settings

    # a component given whole with fewer parts: the parts it left out had the class's defaults in training
    whole = {"_target_": "medseg.instances.WatershedInstances", "seed_threshold": 0.6}
    ckpt = _run_record(tmp_path / "pp", NUCLEI, {"postprocess": whole})
    assert training_settings(NUCLEI, [ckpt], {}).values == {"postprocess": whole}
    post = load_config(NUCLEI, "infer", trained={"postprocess": whole}).get_parsed_content("postprocess")
    assert (post.seed_threshold, post.min_seed_area, post.min_area) == (0.6, 4, 8)
    # a --set part of it is applied over the whole taken; an overlay's part or the whole given leaves it out
    found = training_settings(NUCLEI, [ckpt], {"postprocess#min_area": 30})
    assert found.values == {"postprocess": whole}
    post = load_config(NUCLEI, "infer", trained=found.values, overrides={"postprocess#min_area": 30})
    assert post.get_parsed_content("postprocess").min_area == 30
    assert training_settings(NUCLEI, [ckpt], {"postprocess": whole}).values == {}
    # 40 and 40.0 are one value for an ensemble
    a = _run_record(tmp_path / "a", NUCLEI, {"target_diameter": 40})
    b = _run_record(tmp_path / "b", NUCLEI, {"target_diameter": 40.0})
    assert training_settings(NUCLEI, [a, b], {}).values == {"target_diameter": 40}
    with pytest.raises(ConfigValueError, match=r"\(true in .*, the bundle's false for"):
        training_settings(NUCLEI, [_run_record(tmp_path / "d", NUCLEI, {"distance_head": True}), tmp_path / "x.pt"], {})
    # an expression an earlier bundle version wrote otherwise, working out the same: not the training's setting
    isbi = REPO / "bundles" / "isbi_em"
    older = "$[0.0, @interior_log_prior if @class_balance and @loss_name == 'weighted_ce' else 0.0]"
    assert training_settings(isbi, [_run_record(tmp_path / "old", isbi, {"logit_shift": older})], {}).values == {}
    # ... unless it works out otherwise with the values taken beside it, or in itself
    other = "$[0.0, 0.5]"
    assert training_settings(isbi, [_run_record(tmp_path / "new", isbi, {"logit_shift": other})], {}).values == {
        "logit_shift": other}


def test_parts_given_now_apply_over_the_trainings_whole_component(tmp_path):
    whole = {"_target_": "medseg.instances.WatershedInstances", "min_area": 30, "seed_threshold": 0.7}
    trained = {"postprocess": whole}
    parser = load_config(NUCLEI, "infer", overrides={"postprocess#min_area": 25}, trained=trained)
    post = parser.get_parsed_content("postprocess")
    assert (post.min_area, post.seed_threshold) == (25, 0.7) and whole["min_area"] == 30  # the record untouched
    for content in ({"+postprocess": {"min_area": 50}}, {"postprocess::min_area": 50}, {"postprocess#min_area": 50}):
        overlay = tmp_path / "overlay.json"
        overlay.write_text(json.dumps(content))
        post = load_config(NUCLEI, "infer", [overlay], trained=trained).get_parsed_content("postprocess")
        assert (post.min_area, post.seed_threshold) == (50, 0.7), content
    # a part the bundle's component lacks but the training's has, and the type check of one the training's lacks
    basic = {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
             "features": [4, 4, 8, 16, 32, 4]}
    parser = load_config(NUCLEI, "infer", overrides={"network_def#features": [4, 8, 8, 16, 32, 8]},
                         trained={"network_def": basic})
    assert parser["network_def"]["features"] == [4, 8, 8, 16, 32, 8]
    with pytest.raises(BundleError, match="postprocess#min_area"):
        load_config(NUCLEI, "infer", overrides={"postprocess#min_area": "abc"},
                    trained={"postprocess": {"_target_": "medseg.instances.WatershedInstances"}})
    # a part of a value the training gave as an expression: one line naming the fix
    with pytest.raises(BundleError, match=r"--set network_def#channels: network_def is .* give the whole network_def"):
        load_config(NUCLEI, "infer", overrides={"network_def#channels": [4, 8]},
                    trained={"network_def": "$monai.networks.nets.UNet(2, 1, 3, [4, 8], [2])"})


def test_resume_puts_back_the_runs_parts_around_this_calls_own(tmp_path):
    from medseg.bundle import default_config
    from medseg.runfolder import resume_settings

    record = default_config(NUCLEI, "train")
    record["postprocess"] = {"_target_": "medseg.instances.WatershedInstances", "min_area": 30, "seed_threshold": 0.7}
    record["network_def"]["channels"] = [4, 8]
    record["network_def"]["strides"] = [2]
    parser = load_config(NUCLEI, "train", overrides={"postprocess#min_area": 50})
    resume_settings(parser, record, {"postprocess#min_area": 50}, [])
    assert parser["postprocess"]["seed_threshold"] == 0.7 and parser["postprocess"]["min_area"] == 50
    overlay = tmp_path / "plus.json"
    overlay.write_text(json.dumps({"+network_def": {"dropout": 0.2}}))
    parser = load_config(NUCLEI, "train", [overlay])
    resume_settings(parser, record, {}, [overlay])
    assert parser["network_def"]["channels"] == [4, 8] and parser["network_def"]["dropout"] == 0.2
    # a network of another class is put back whole
    record["network_def"] = {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2, "in_channels": 1,
                             "out_channels": "@out_channels", "features": [4, 4, 8, 16, 32, 4]}
    parser = load_config(NUCLEI, "train")
    resume_settings(parser, record, {}, [])
    assert parser["network_def"] == record["network_def"]


def test_an_expression_is_compared_with_this_calls_own_settings(tmp_path):
    from medseg.runfolder import training_settings

    isbi = REPO / "bundles" / "isbi_em"
    shift = "$[0.0, @interior_log_prior]"  # the bundle's own value with its defaults, not with class_balance off
    ckpt = _run_record(tmp_path / "run", isbi, {"logit_shift": shift})
    assert training_settings(isbi, [ckpt], {}).values == {}
    assert training_settings(isbi, [ckpt], {"class_balance": False}).values == {"logit_shift": shift}

