"""Collect an evaluator's probability maps and labels, then write per-image and challenge metrics (CSV + JSON)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from medseg.io import atomic_output
from medseg.metrics import binary_scores, isbi_scores


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ChallengeMetrics:
    """Write ``metrics.csv`` (one row per image) and ``summary.json`` when an evaluator completes.

    Per image: Dice, IoU, pixel accuracy and mismatch at ``threshold``, ISBI pixel error, and V_rand /
    V_info at the stack's best thresholds. The summary holds the means and the ISBI 2012 stack scores
    (V_rand, V_info: per-slice mean, maximised over the 11 thresholds).

    Args:
        output_dir: where the two files go.
        prob_key: output key of the softmax probabilities ``(C, H, W)``.
        label_key: output key of the label, one-hot ``(C, H, W)`` or index ``(1, H, W)``.
        channel: the foreground channel.
        threshold: probability threshold of the binary scores.
    """

    def __init__(self, output_dir: str, prob_key: str = "prob", label_key: str = "label",
                 channel: int = 1, threshold: float = 0.5) -> None:
        self.output_dir = Path(output_dir)
        self.prob_key, self.label_key = prob_key, label_key
        self.channel, self.threshold = channel, threshold
        self.names: list[str] = []
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.names, self.probs, self.labels = [], [], []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for item, source in zip(outputs, batch, strict=False):
            prob = _numpy(item[self.prob_key])[self.channel]
            label = _numpy(item[self.label_key])
            label = label[self.channel] if label.shape[0] > 1 else label[0]
            self.probs.append(prob.astype(np.float32))
            self.labels.append(label > 0)
            self.names.append(str(source.get("name", f"image_{len(self.names)}")))

    def _write(self, engine: Engine | None = None) -> dict[str, Any]:
        rows = [{"name": n, **binary_scores(p, g, self.threshold)}
                for n, p, g in zip(self.names, self.probs, self.labels, strict=True)]
        isbi = isbi_scores(self.probs, self.labels) if self.probs else {}
        for row, vr, vi in zip(rows, isbi.get("per_slice_v_rand", []), isbi.get("per_slice_v_info", []),
                               strict=False):
            row["v_rand"], row["v_info"] = vr, vi
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "name"} if rows else {}
        self.summary = {
            "images": len(rows),
            "v_rand": isbi.get("v_rand"),
            "v_info": isbi.get("v_info"),
            "v_rand_threshold": isbi.get("v_rand_threshold"),
            "v_info_threshold": isbi.get("v_info_threshold"),
            **{k: v for k, v in means.items() if k not in ("v_rand", "v_info")},
            "threshold": self.threshold,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.output_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[-1]))
                writer.writeheader()
                writer.writerows(rows)
        with atomic_output(self.output_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(self.summary, indent=2))
        if engine is not None:
            engine.state.metrics.update({k: v for k, v in self.summary.items() if isinstance(v, float)})
        return self.summary


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
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self.probs, self.labels = [], []

    def update(self, output: Any) -> None:
        probs, labels = output
        for prob, label in zip(probs, labels, strict=True):
            prob, label = _numpy(prob), _numpy(label)
            self.probs.append(prob[self.channel].astype(np.float32))
            self.labels.append((label[self.channel] if label.shape[0] > 1 else label[0]) > 0)

    def compute(self) -> float:
        if not self.probs:
            raise ValueError("IsbiScore needs at least one image before compute()")
        return isbi_scores(self.probs, self.labels)[self.score]
