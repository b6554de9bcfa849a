"""Sweep the nuclei bundle's watershed thresholds on one split: the network runs once, the watershed per setting.

Choose thresholds on the training split (``--split train``) and report them on the validation split, so
that the validation score stays an honest estimate:

    python benchmarks/nuclei_postprocess.py --data ../shared/data/dsb2018 --checkpoint runs/nuclei/model.pt \
        --split train

The settings a model was trained with (e.g. ``--set distance_head=true``) are taken from the ``config.json``
beside the checkpoint, as ``medseg evaluate`` takes them; ``--set`` overrides them. ``--interior-seeds`` seeds a
distance-head model from its interior probability instead of its distance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from medseg.bundle import load_checkpoint, load_config, parse_override
from medseg.instances import WatershedInstances
from medseg.metrics import dsb_scores
from medseg.runfolder import training_settings
from medseg.transforms import ClassActivationsd, LogitShiftd

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "nuclei"


def predictions(data: str, checkpoint: str, split: str, tta: bool,
                sets: dict | None = None) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(name, group, probabilities (3 or 4, H, W), ground-truth instances)`` of every image of ``split``."""
    overrides = {**(sets or {}), "validate#inferer#tta": tta}
    settings = {"dataset_dir": data, "output_dir": str(Path(checkpoint).parent / "sweep"), "ckpt_path": checkpoint,
                "eval_split": split, "device": "$torch.device('cpu')", "amp": False}
    trained = training_settings(BUNDLE, [checkpoint], overrides)  # as medseg evaluate takes them
    parser = load_config(str(BUNDLE), "evaluate", (), overrides, settings, trained=trained.values)
    trained.say([checkpoint])
    recorded = Path(checkpoint).parent / "split.json"
    samples = parser.get_parsed_content("datalists")
    if recorded.is_file():  # the run's own split
        names = json.loads(recorded.read_text())[split]
        by_name = {s["name"]: s for s in samples["all"]}
        samples = {split: [by_name[n] for n in names]}
    network = parser.get_parsed_content("network_def")
    load_checkpoint(network, checkpoint)
    network.eval()
    transform = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    shift = LogitShiftd("pred", parser.get_parsed_content("logit_shift"),
                        extra_channels=int(parser.get_parsed_content("distance_head")))
    activate = ClassActivationsd("pred", parser.get_parsed_content("num_classes"))
    out = []
    with torch.inference_mode():
        for sample in samples[split]:
            d = transform(sample)
            logits = inferer(torch.as_tensor(d["image"])[None], network)[0].float()
            prob = np.asarray(activate(shift({"pred": logits}))["pred"])
            out.append((sample["name"], sample.get("group", ""), prob, np.asarray(d["instances"])[0].astype(np.int32)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--seed", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--fg", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    ap.add_argument("--min-area", type=int, nargs="+", default=[8, 20])
    ap.add_argument("--min-seed", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (the training's own settings are read from its config.json)")
    ap.add_argument("--interior-seeds", action="store_true",
                    help="seed from the interior probability even where the model has a distance channel")
    args = ap.parse_args()

    start = time.perf_counter()
    sets = dict(parse_override(text) for text in args.set)
    preds = predictions(args.data, args.checkpoint, args.split, args.tta, sets)
    print(f"{len(preds)} images of split '{args.split}' predicted in {time.perf_counter() - start:.0f} s")
    results = []
    for seed, fg, area, min_seed in itertools.product(args.seed, args.fg, args.min_area, args.min_seed):
        post = WatershedInstances(fg_threshold=fg, seed_threshold=seed, min_seed_area=min_seed, min_area=area)
        scores = [dsb_scores(gt, post(prob[:3] if args.interior_seeds else prob))["score"] for _, _, prob, gt in preds]
        groups: dict[str, list[float]] = {}
        for (_, group, _, _), s in zip(preds, scores, strict=True):
            groups.setdefault(group, []).append(s)
        results.append({"seed_threshold": seed, "fg_threshold": fg, "min_area": area, "min_seed_area": min_seed,
                        "dsb_score": round(float(np.mean(scores)), 4),
                        **{g: round(float(np.mean(v)), 4) for g, v in sorted(groups.items())}})
    results.sort(key=lambda r: -r["dsb_score"])
    for row in results:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
