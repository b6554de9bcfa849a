"""Checkpoint ensembles: outputs averaged exactly, members checked, evaluate and infer with several --checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import BUNDLE, TINY_NET, synthetic_em, write_isbi_folder
from PIL import Image
from typer.testing import CliRunner

from medseg.bundle import load_config, parse_override
from medseg.cli import app
from medseg.ensemble import MeanEnsemble, load_members
from medseg.errors import CheckpointError
from medseg.io import file_sha256

runner = CliRunner()
TINY_ARGS = [arg for item in TINY_NET for arg in ("--set", item)]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tiny_network() -> torch.nn.Module:
    parser = load_config(BUNDLE, "infer", overrides=dict(parse_override(item) for item in TINY_NET))
    return parser.get_parsed_content("network_def")


def _output_bias(state: dict) -> str:
    """The bias of the last layer: one value per output class, added to that class's logit."""
    return [k for k, v in state.items() if k.endswith("bias") and v.shape == (2,)][-1]


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints A, B = A with the interior logit raised by 2, and C = A raised by 1 (the mean of A and B)."""
    root = tmp_path_factory.mktemp("ensemble")
    torch.manual_seed(3)
    state = _tiny_network().state_dict()
    bias = _output_bias(state)
    paths = {}
    for name, shift in (("a", 0.0), ("b", 2.0), ("c", 1.0)):
        shifted = {k: v.clone() for k, v in state.items()}
        shifted[bias][1] += shift
        (root / name).mkdir()
        paths[name] = root / name / "model.pt"
        torch.save({"model": shifted}, paths[name])
    inputs = root / "in"
    inputs.mkdir()
    for seed in (1, 2):
        Image.fromarray(synthetic_em(size=72, seed=seed)[0]).save(inputs / f"s{seed}.png")
    paths["inputs"] = inputs
    return paths


def test_mean_ensemble_averages_outputs():
    first, second = torch.nn.Conv2d(1, 2, 1), torch.nn.Conv2d(1, 2, 1)
    x = torch.randn(2, 1, 5, 5)
    expected = (first(x) + second(x)) / 2
    torch.testing.assert_close(MeanEnsemble([first, second])(x), expected)
    with pytest.raises(ValueError):
        MeanEnsemble([])


def test_load_members_loads_each_checkpoint_into_its_own_copy(members):
    network = _tiny_network()
    loaded, digests = load_members(network, [members["a"]])
    assert loaded is network and digests == [file_sha256(members["a"])]
    ensemble, digests = load_members(_tiny_network(), [members["a"], members["b"]])
    assert digests == [file_sha256(members["a"]), file_sha256(members["b"])]
    assert isinstance(ensemble, MeanEnsemble) and len(ensemble.members) == 2
    bias = _output_bias(ensemble.members[0].state_dict())
    assert ensemble.members[1].state_dict()[bias][1] - ensemble.members[0].state_dict()[bias][1] == pytest.approx(2)


def test_load_members_names_the_member_of_another_network(members, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"model": torch.nn.Conv2d(1, 2, 1).state_dict()}, other)
    with pytest.raises(CheckpointError, match="other.pt: weights do not fit"):
        load_members(_tiny_network(), [members["a"], other])


def test_infer_ensemble_equals_the_network_with_averaged_logits(members, tmp_path):
    # mean of A's and B's logits = A's logits + 1 on the interior class = C's logits, through the whole pipeline
    common = ["--no-progress", "--device", "cpu", "--no-tta", *TINY_ARGS]
    result = _invoke("infer", BUNDLE, members["inputs"], tmp_path / "ens", "--checkpoint", members["a"],
                     "--checkpoint", members["b"], *common)
    assert result.exit_code == 0, result.output
    assert _invoke("infer", BUNDLE, members["inputs"], tmp_path / "c", "--checkpoint", members["c"],
                   *common).exit_code == 0
    assert _invoke("infer", BUNDLE, members["inputs"], tmp_path / "a", "--checkpoint", members["a"],
                   *common).exit_code == 0
    for name in ("s1", "s2"):
        ens, single = (tifffile.imread(tmp_path / d / "prob" / f"{name}.tif") for d in ("ens", "c"))
        np.testing.assert_allclose(ens, single, atol=1e-5)
        assert not np.allclose(ens, tifffile.imread(tmp_path / "a" / "prob" / f"{name}.tif"), atol=1e-3)
    record = json.loads((tmp_path / "ens" / "run.json").read_text())
    (run,) = record["runs"].values()
    assert run["identity"]["checkpoint"].count("+") == 1
    assert run["checkpoint_path"] == [str(members["a"].resolve()), str(members["b"].resolve())]
    # the same folder with another member set is another run's output
    result = _invoke("infer", BUNDLE, members["inputs"], tmp_path / "ens", "--checkpoint", members["a"], *common)
    assert result.exit_code == 1 and "another checkpoint" in result.output


def test_evaluate_ensemble_of_identical_members_scores_as_one(members, tmp_path):
    data = write_isbi_folder(tmp_path / "data", n=3, size=80)
    twin = tmp_path / "twin" / "model.pt"
    twin.parent.mkdir()
    shutil.copy(members["a"], twin)
    common = ["--data", data, "--split", "all", "--no-progress", "--device", "cpu", "--no-tta", *TINY_ARGS,
              "--set", "val_count=1"]
    single = _invoke("evaluate", BUNDLE, "--checkpoint", members["a"], "--output", tmp_path / "one", *common)
    assert single.exit_code == 0, single.output
    both = _invoke("evaluate", BUNDLE, "--checkpoint", members["a"], "--checkpoint", twin, *common)
    assert both.exit_code == 0, both.output
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((members["a"].parent / "eval_ensemble" / "summary.json").read_text())  # the default
    assert one["images"] == two["images"] == 3
    for key in ("v_rand", "v_info", "dice", "pixel_mismatch"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_evaluate_and_the_api_score_an_ensemble_as_its_averaged_logits(members, tmp_path):
    # members that differ: A + B scores as C (A's logits + 1 on the interior), not as A alone
    from medseg.api import Segmenter

    data = write_isbi_folder(tmp_path / "data", n=3, size=80)
    common = ["--data", data, "--split", "all", "--no-progress", "--device", "cpu", "--no-tta", *TINY_ARGS,
              "--set", "val_count=1"]
    scores = {}
    for name, ckpts in (("ab", ["a", "b"]), ("c", ["c"]), ("a", ["a"])):
        args = [a for k in ckpts for a in ("--checkpoint", members[k])]
        result = _invoke("evaluate", BUNDLE, *args, "--output", tmp_path / name, *common)
        assert result.exit_code == 0, result.output
        scores[name] = (tmp_path / name / "metrics.csv").read_text()
    assert scores["ab"] == scores["c"] != scores["a"]
    overrides = dict(parse_override(item) for item in TINY_NET)
    image = synthetic_em(size=72, seed=1)[0]
    probs = {name: Segmenter(BUNDLE, [members[k] for k in ckpts], device="cpu", tta=False,
                             overrides=overrides).segment(image).prob
             for name, ckpts in (("ab", ["a", "b"]), ("c", ["c"]), ("a", ["a"]))}
    np.testing.assert_allclose(probs["ab"], probs["c"], atol=1e-5)
    assert not np.allclose(probs["ab"], probs["a"], atol=1e-3)


def test_bad_input_members_trained_on_other_splits(members, tmp_path):
    data = write_isbi_folder(tmp_path / "data", n=3, size=80)
    runs = []
    for name, val in (("r1", [2]), ("r2", [1])):
        run = tmp_path / name
        run.mkdir()
        shutil.copy(members["a"], run / "model.pt")
        (run / "split.json").write_text(json.dumps({"train": [0], "val": val}))
        runs.append(run / "model.pt")
    result = _invoke("evaluate", BUNDLE, "--data", data, "--checkpoint", runs[0], "--checkpoint", runs[1],
                     "--no-progress", "--device", "cpu", *TINY_ARGS)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "r2/split.json: this member was trained on another train/validation split" in result.output


def test_bad_input_the_same_checkpoint_twice(members, tmp_path):
    result = _invoke("infer", BUNDLE, members["inputs"], tmp_path / "o", "--checkpoint", members["a"],
                     "--checkpoint", members["a"], "--no-progress", "--device", "cpu", *TINY_ARGS)
    assert result.exit_code == 1 and "given twice" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("bundle", ["jurkat", "nuclei"])
def test_init_seed_changes_initialisation_but_not_the_split(bundle, tmp_path, jurkat_folder, dsb_folder):
    data = jurkat_folder if bundle == "jurkat" else dsb_folder
    root = BUNDLE.parent / bundle
    names, weights = [], []
    for init_seed in (0, 1):
        settings = {"dataset_dir": str(data), "output_dir": str(tmp_path / str(init_seed))}
        parser = load_config(root, "train", overrides={"init_seed": init_seed}, settings=settings)
        names.append([str(d["name"]) for d in parser.get_parsed_content("datalists")["val"]])
        parser.get_parsed_content("initialize")  # set_determinism(seed=init_seed), as the run does
        weights.append(next(iter(parser.get_parsed_content("network_def").parameters())).detach().clone())
    assert names[0] == names[1] and names[0]
    assert not torch.equal(weights[0], weights[1])


def test_checkpoints_default_to_the_bundles_model_and_evaluations_go_beside_them(tmp_path):
    from medseg.errors import CheckpointError
    from medseg.workflows import checkpoint_list, evaluation_dir

    bundle = tmp_path / "bundle"
    assert checkpoint_list(None, bundle) == [str(bundle / "models" / "model.pt")]
    assert checkpoint_list(tmp_path / "a.pt", bundle) == [str(tmp_path / "a.pt")]
    with pytest.raises(CheckpointError, match="no checkpoint given; pass --checkpoint"):
        checkpoint_list(None)
    with pytest.raises(CheckpointError, match="an empty list of checkpoints"):  # not the bundle's own weights
        checkpoint_list([], bundle)
    assert evaluation_dir([str(tmp_path / "run" / "model.pt")]) == tmp_path / "run" / "eval"
    assert evaluation_dir([str(tmp_path / "a" / "model.pt"), str(tmp_path / "b" / "model.pt")]) == \
        tmp_path / "a" / "eval_ensemble"
