"""Score an evaluator's outputs per image (binary/ISBI, multi-class, DSB instances) and write CSV + JSON reports."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.utils import convert_to_numpy

from medseg.errors import DataError
from medseg.io import atomic_output
from medseg.metrics import IsbiStack, binary_scores, check_classes, dsb_scores, multiclass_scores


def _numpy(x: Any) -> np.ndarray:
    return convert_to_numpy(x, wrap_sequence=True)


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (atomic_output(path) as tmp,
          open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh):
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)


def _write_report(output_dir: Path, rows: list[dict], summary: dict[str, Any], run: dict | None = None) -> None:
    _write_rows(output_dir / "metrics.csv", rows)
    with atomic_output(output_dir / "summary.json") as tmp:
        record = summary if run is None else {**summary, "run": run}
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    (output_dir / PARTIAL_ROWS).unlink(missing_ok=True)  # the rows of an evaluation stopped before this one


#: The rows of an evaluation stopped part of the way (Ctrl-C, SIGTERM): what it scored, without a summary.
PARTIAL_ROWS = "metrics.partial.csv"


def keep_scored_rows(reports: list[MetricsReport], total: int) -> str:
    """After an evaluation was stopped: write the rows its first report had scored to :data:`PARTIAL_ROWS` in
    that report's folder, and say so (``""`` when there were none, or they could not be written). Scores of the
    whole stack in a row (ISBI's per-slice V_rand and V_info, at the stack's best threshold) are those of the
    images scored."""
    if not reports or not reports[0].rows:
        return ""
    report = reports[0]
    if report.complete:  # stopped after its report was written: the report stands
        return f"the report was written in {report.output_dir} before the stop"
    path = report.output_dir / PARTIAL_ROWS
    try:
        report.summarise()  # the columns a report completes at its end (ISBI: each slice's V_rand, V_info)
        _write_rows(path, report.rows)
    except OSError:
        return ""
    kept = f" (the report already in {report.output_dir} is kept as it was)" if all(
        (report.output_dir / name).is_file() for name in REPORT_FILES) else ""
    return (f"stopped after {len(report.rows)}{f' of {total}' if total else ''} images, whose rows are in {path}; no "
            f"summary written{kept}; run it again to score them all")


#: The files of an evaluation's report.
REPORT_FILES = ("metrics.csv", "summary.json")

#: What makes two evaluations the same one (the parts of their ``run`` record), in words for the message.
_SAME_EVALUATION = {"checkpoints": "checkpoints", "data_dir": "data folder", "split": "split", "tta": "tta",
                    "settings_sha256": "settings"}

#: Config ids that do not change an evaluation's figures, or are compared on their own: the call's folders and
#: device, loader workers, test-time augmentation, the bundle's description.
_NOT_SETTINGS = ("_meta_", "bundle_root", "dataset_dir", "output_dir", "ckpt_path", "device", "amp", "num_workers",
                 "tta", "eval_split", "validate#dataloader#num_workers", "validate#inferer#tta")


def settings_digest(config: dict) -> str:
    """SHA-256 of an evaluation's config as merged (bundle, overlays' contents, the training's values, ``--set``),
    without :data:`_NOT_SETTINGS`: the same settings reached by another route give the same digest."""
    import copy
    import hashlib

    content = copy.deepcopy(config)
    for key in _NOT_SETTINGS:
        *holders, last = key.split("#")
        part = content
        for holder in holders:
            part = part.get(holder) if isinstance(part, dict) else None
        if isinstance(part, dict):
            part.pop(last, None)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _what_it_was(run: dict) -> dict[str, Any]:
    """The parts of an evaluation's ``run`` record that make it that evaluation: the weights by their digests, in
    any order (a copy elsewhere, an ensemble listed otherwise, is the same), and the settings by theirs."""
    same = {k: run.get(k) for k in _SAME_EVALUATION}
    same["checkpoints"] = sorted(str(c.get("sha256") if isinstance(c, dict) else c)
                                 for c in run.get("checkpoints") or [])
    return json.loads(json.dumps(same, default=str))  # as summary.json holds it


def check_report_folder(output_dir: str | Path, run: dict, overwrite: bool = False) -> None:
    """An evaluation replaces the ``metrics.csv`` and ``summary.json`` in ``output_dir`` only when they are its
    own earlier report (the same weights, data, split, ``tta`` and settings: ``run`` holds ``checkpoints`` with
    their ``sha256``, ``data_dir``, ``split``, ``tta`` and ``settings_sha256``) or with ``overwrite``: another
    evaluation's report, or files of those names no evaluation wrote, are otherwise kept. A folder or other
    non-file of those names is refused either way.

    Raises:
        DataError: the folder holds another evaluation's report, or such files.
    """
    out = Path(output_dir)
    present = [name for name in REPORT_FILES if (out / name).exists() or (out / name).is_symlink()]
    for name in present:
        if not (out / name).is_file():
            what = "a folder" if (out / name).is_dir() else "a link to nothing" if not (out / name).exists() \
                else "not a regular file"
            raise DataError(f"{out / name}: {what}, where the report is written; move it, or choose another --output")
    if not present or overwrite:
        return
    try:
        earlier = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        earlier = None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("run"), dict):
        which = "them" if len(present) > 1 else "it"
        raise DataError(f"{out}: holds {', '.join(present)} without a record of the evaluation that wrote "
                        f"{which}; replace {which} with --overwrite, or choose another --output")
    before, now = _what_it_was(earlier["run"]), _what_it_was(run)
    differ = [words for key, words in _SAME_EVALUATION.items() if before[key] != now[key]]
    if not differ:
        return
    paths = [[str(c.get("path")) for c in r.get("checkpoints") or [] if isinstance(c, dict)]
             for r in (earlier["run"], run)]
    if "checkpoints" in differ and sorted(paths[0]) == sorted(paths[1]) and all(paths):
        changed = "the checkpoint has" if len(paths[1]) == 1 else "checkpoints have"
        differ[0] = f"checkpoints: {changed} changed since it was scored, trained again perhaps"
    if "settings" in differ and before["settings_sha256"] is None:
        differ[differ.index("settings")] = "settings, or a report of an earlier medseg that does not record them"
    raise DataError(f"{out}: holds the report of another evaluation (other {'; '.join(differ)}); replace it with "
                    "--overwrite, or choose another --output")


def _items(engine: Engine) -> list[tuple[dict, dict]]:
    """``(output, batch item)`` pairs of the engine's last iteration (decollated outputs)."""
    outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
    batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
    return list(zip(outputs, batch, strict=False))


def _index_map(x: Any) -> np.ndarray:
    """``(C, H, W)`` one-hot/probabilities -> argmax; ``(1, H, W)`` or ``(H, W)`` indices -> ``(H, W)`` int."""
    arr = _numpy(x)
    if arr.ndim == 3 and arr.shape[0] > 1:
        return arr.argmax(axis=0).astype(np.int64)
    return np.rint(arr.reshape(arr.shape[-2:])).astype(np.int64)


class MetricsReport:
    """Base of the evaluation handlers: score each image as it passes, write ``metrics.csv`` + ``summary.json``.

    Subclasses implement :meth:`score` (one row per image) and may extend :meth:`summarise`. The summary holds
    the mean of every numeric column, ``images``, and the means per ``group`` of the samples when they have one.
    ``run``, when set, is what produced the evaluation; ``summary.json`` holds it under ``"run"``.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.rows: list[dict] = []
        self.summary: dict[str, Any] = {}
        self.run: dict[str, Any] | None = None
        self.complete = False  # whether the report of the images scored is written

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows, self.complete = [], False

    def _collect(self, engine: Engine) -> None:
        for output, source in _items(engine):
            row = {"name": str(source.get("name", f"image_{len(self.rows)}"))}
            if source.get("group") not in (None, ""):
                row["group"] = str(source["group"])
            row.update(self.score(output, source))
            self.rows.append(row)

    def score(self, output: dict, source: dict) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _means(rows: list[dict]) -> dict[str, float | None]:
        """The mean of each numeric column over the images that have a value (NaN: none, such as the DSB score
        of an image without nuclei on either side); None where no image has one."""
        keys = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], (int, float)) and
                not isinstance(rows[0][k], bool)]
        values = {k: [float(r[k]) for r in rows if not math.isnan(float(r[k]))] for k in keys}
        return {k: float(np.mean(v)) if v else None for k, v in values.items()}

    def summarise(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"images": len(self.rows), **self._means(self.rows)}
        groups = sorted({r["group"] for r in self.rows if "group" in r})
        if len(groups) > 1:
            summary["groups"] = {g: {"images": sum(r.get("group") == g for r in self.rows),
                                     **self._means([r for r in self.rows if r.get("group") == g])}
                                 for g in groups}
        return summary

    def _write(self, engine: Engine | None = None) -> dict[str, Any]:
        self.summary = self.summarise()
        _write_report(self.output_dir, self.rows, self.summary, self.run)
        self.complete = True
        if engine is not None:
            engine.state.metrics.update({k: v for k, v in self.summary.items() if isinstance(v, float)})
        return self.summary


class ClassMetrics(MetricsReport):
    """Multi-class report: per-class Dice and IoU, pixel accuracy, macro F1, mean foreground Dice/IoU, regions.

    Args:
        output_dir: where ``metrics.csv`` and ``summary.json`` go.
        num_classes: number of classes (background is class 0).
        class_names: a name per class, used in the column names (``dice_nucleus``).
        regions: merged classes also scored, e.g. ``{"cell": [1, 2]}`` (cell = body + nucleus).
        pred_key: output key of the prediction (one-hot, probabilities or indices).
        label_key: output key of the label (one-hot or indices).
    """

    def __init__(self, output_dir: str, num_classes: int, class_names: list[str] | None = None,
                 regions: dict[str, list[int]] | None = None, pred_key: str = "pred",
                 label_key: str = "label") -> None:
        super().__init__(output_dir)
        self.num_classes, self.class_names, self.regions = num_classes, class_names, regions
        self.pred_key, self.label_key = pred_key, label_key
        check_classes(num_classes, class_names, regions)

    def score(self, output: dict, source: dict) -> dict[str, Any]:
        return multiclass_scores(_index_map(output[self.pred_key]), _index_map(output[self.label_key]),
                                 self.num_classes, self.class_names, self.regions)


class InstanceMetrics(MetricsReport):
    """DSB 2018 report: predicted instance images scored against the ground-truth instances.

    Per image: the DSB score (mean over IoU thresholds 0.50:0.05:0.95 of TP / (TP + FP + FN), a match needs
    IoU > t), AP at 0.5 and 0.75, object counts, and the semantic Dice of the foreground; an image without a
    nucleus on either side has none of these scores (NaN), is left out of the means and counted in the
    summary's ``images_without_nuclei``. The evaluator's
    postprocessing makes the predicted instances once per image (e.g. ``Lambdad`` with
    :class:`medseg.instances.WatershedInstances`), so the report and the :class:`DsbScore` metrics share them.

    Args:
        output_dir: where ``metrics.csv`` and ``summary.json`` go.
        pred_key: output key of the predicted instance image.
        instance_key: output key of the ground-truth instance image.
    """

    def __init__(self, output_dir: str, pred_key: str = "pred_instances", instance_key: str = "gt_instances") -> None:
        super().__init__(output_dir)
        self.pred_key, self.instance_key = pred_key, instance_key

    def score(self, output: dict, source: dict) -> dict[str, Any]:
        return instance_row(_index_map(output[self.pred_key]), _index_map(output[self.instance_key]))

    def summarise(self) -> dict[str, Any]:
        summary = super().summarise()
        summary["images_without_nuclei"] = sum(r["gt_count"] == 0 and r["pred_count"] == 0 for r in self.rows)
        return summary


def instance_row(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """One image's DSB scores, counts and foreground Dice from predicted and ground-truth instance images; NaN
    scores for an image without a nucleus on either side (0 / 0)."""
    from medseg.metrics import dice

    scores = dsb_scores(gt, pred)
    empty = scores["gt_count"] == 0 and scores["pred_count"] == 0
    return {"dsb_score": scores["score"], "ap_50": scores["ap_50"], "ap_75": scores["ap_75"],
            "gt_count": scores["gt_count"], "pred_count": scores["pred_count"],
            "dice": math.nan if empty else dice(pred > 0, gt > 0)}


class ChallengeMetrics(MetricsReport):
    """ISBI 2012 report: ``metrics.csv`` (one row per image) and ``summary.json`` when an evaluator completes.

    Per image: Dice, IoU, pixel accuracy and mismatch at ``threshold``, ISBI pixel error (at the slice's own
    best threshold), and V_rand / V_info at the stack's best thresholds. The summary holds the means and the
    ISBI 2012 stack scores (V_rand, V_info: per-slice mean, maximised over the 11 thresholds; pixel error:
    counts pooled over the slices, one best threshold).

    Args:
        output_dir: where the two files go.
        prob_key: output key of the softmax probabilities ``(C, H, W)``.
        label_key: output key of the label, one-hot ``(C, H, W)`` or index ``(1, H, W)``.
        channel: the foreground channel.
        threshold: probability threshold of the binary scores.
    """

    def __init__(self, output_dir: str, prob_key: str = "prob", label_key: str = "label",
                 channel: int = 1, threshold: float = 0.5) -> None:
        super().__init__(output_dir)
        self.prob_key, self.label_key = prob_key, label_key
        self.channel, self.threshold = channel, threshold
        self.stack = IsbiStack()  # the stack scores, slice by slice: no map is kept

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        self.stack = IsbiStack()

    def score(self, output: dict, source: dict) -> dict[str, Any]:
        prob = _numpy(output[self.prob_key])[self.channel].astype(np.float32)
        label = _numpy(output[self.label_key])
        label = (label[self.channel] if label.shape[0] > 1 else label[0]) > 0
        self.stack.add(prob, label)
        return binary_scores(prob, label, self.threshold)

    def summarise(self) -> dict[str, Any]:
        isbi = self.stack.scores() if len(self.stack) else {}
        for row, vr, vi in zip(self.rows, isbi.get("per_slice_v_rand", []), isbi.get("per_slice_v_info", []),
                               strict=False):
            row["v_rand"], row["v_info"] = vr, vi
        means = self._means(self.rows)
        return {
            "images": len(self.rows),
            "v_rand": _score_or_none(isbi.get("v_rand")),  # none: no slice's label has a cell
            "v_info": _score_or_none(isbi.get("v_info")),
            "v_rand_threshold": _score_or_none(isbi.get("v_rand_threshold")),
            "v_info_threshold": _score_or_none(isbi.get("v_info_threshold")),
            **{k: v for k, v in means.items() if k not in ("v_rand", "v_info")},
            # the challenge's pixel error of the stack: counts of all slices pooled, one best threshold
            "pixel_error": self.stack.pixel_error() if len(self.stack) else None,
            "threshold": self.threshold,
        }


def _score_or_none(value: float | None) -> float | None:
    """A stack score (or its threshold) for ``summary.json``: None where there is none (NaN, which JSON cannot
    hold)."""
    return None if value is None or math.isnan(value) else value


class IsbiScore(Metric):
    """Ignite metric: an ISBI 2012 stack score (``v_rand`` or ``v_info``) of the probability maps seen.

    Usable as a ``SupervisedEvaluator`` key metric, so that best checkpoints and early stopping follow the
    challenge score rather than Dice. ``output_transform`` must give ``(prob, label)`` batches: softmax
    probabilities ``(B, C, H, W)`` (or lists of ``(C, H, W)``) and one-hot or index labels.

    Args:
        score: ``"v_rand"`` or ``"v_info"``.
        channel: the foreground (cell interior) channel.
    """

    def __init__(self, score: str = "v_rand", channel: int = 1, output_transform: Any = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        if score not in ("v_rand", "v_info"):
            raise ValueError(f"score must be 'v_rand' or 'v_info', got {score!r}")
        self.score, self.channel = score, channel
        self.stack = IsbiStack()  # scored slice by slice: no map is kept
        self._said = False  # that there is no score (kept across resets: once per training)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self.stack = IsbiStack()

    def update(self, output: Any) -> None:
        probs, labels = output
        for prob, label in zip(probs, labels, strict=True):
            prob, label = _numpy(prob), _numpy(label)
            self.stack.add(prob[self.channel].astype(np.float32),
                           (label[self.channel] if label.shape[0] > 1 else label[0]) > 0)

    def compute(self) -> float:
        if not len(self.stack):
            raise ValueError("IsbiScore needs at least one image before compute()")
        value = self.stack.scores()[self.score]
        if math.isnan(value) and not self._said:  # no label with a cell: no best model, no early stop; said once
            self._said = True
            logging.getLogger(__name__).warning(
                "%s: none of the %d labels scored holds a cell interior (255 or 1), so there is no score to "
                "choose the best model by; check that the labels mark cells, not only membranes (said once)",
                self.score, len(self.stack))
        return value


class DsbScore(Metric):
    """Ignite metric: mean DSB 2018 score of the images seen (key metric for nucleus bundles).

    ``output_transform`` must give ``(pred_instances, gt_instances)`` batches of instance images
    (``(B, 1, H, W)`` or lists of ``(H, W)`` / ``(1, H, W)``).

    Args:
        score: ``dsb_score``, ``ap_50``, ``ap_75`` or ``dice``.
    """

    def __init__(self, score: str = "dsb_score", output_transform: Any = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        self.score = score
        self.values: list[float] = []
        self._said = False  # that there is no score (kept across resets: once per training)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self.values = []

    def update(self, output: Any) -> None:
        preds, instances = output
        for pred, gt in zip(preds, instances, strict=True):
            self.values.append(instance_row(_index_map(pred), _index_map(gt))[self.score])

    def compute(self) -> float:
        if not self.values:
            raise ValueError("DsbScore needs at least one image before compute()")
        scored = [v for v in self.values if not math.isnan(v)]  # images with nuclei on one side at least
        if not scored and not self._said:  # said once, not at every validation of a training
            self._said = True
            logging.getLogger(__name__).warning(
                "%s: none of the %d images scored has a nucleus in its label or its prediction, so there is no "
                "score to choose the best model by; check that the labels mark the nuclei (said once)", self.score,
                len(self.values))
            return math.nan
        return float(np.mean(scored))
