"""Write segmentation outputs per input: an interior-probability TIFF and an 8-bit mask, atomically.

Single images give ``prob/NAME.tif`` (float32) and ``mask/NAME.png`` (or ``.tif`` for TIFF inputs);
TIFF stacks are streamed page by page into multi-page ``prob/NAME.tif`` and ``mask/NAME.tif``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medseg.io import write_png, write_tiff


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value


class _StackWriter:
    """Append 2D pages to a TIFF in a temporary file; :meth:`close` renames it into place."""

    def __init__(self, path: Path) -> None:
        import tifffile

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        self.path, self.tmp = path, Path(tmp)
        self.writer = tifffile.TiffWriter(self.tmp, bigtiff=True)

    def append(self, page: np.ndarray) -> None:
        # metadata=None: plain pages that readers see as one stack of len(pages) slices
        self.writer.write(page, compression="zlib", photometric="minisblack", metadata=None)

    def close(self, keep: bool = True) -> None:
        self.writer.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class SaveSegmentationd(MapTransform):
    """Save the foreground probability and the thresholded mask of ``data[key]`` (softmax, ``(C, H, W)``).

    Args:
        keys: the prediction key(s).
        output_dir: folder receiving ``prob/`` and ``mask/``.
        channel: the foreground channel of the prediction.
        threshold: mask = probability > threshold, written as 255, background 0.
        save_prob: also write the float32 probability map.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        channel: int = 1,
        threshold: float = 0.5,
        save_prob: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.channel, self.threshold, self.save_prob = channel, threshold, save_prob
        self._stacks: dict[str, list[_StackWriter]] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        name = str(d["name"])
        page, pages = int(_scalar(d.get("page", 0))), int(_scalar(d.get("pages", 1)))
        source = str(d.get("image_file", d.get("image", "")))
        for key in self.key_iterator(d):
            pred = d[key]
            pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            prob = pred[self.channel].astype(np.float32)
            mask = np.where(prob > self.threshold, 255, 0).astype(np.uint8)
            mask_suffix = ".tif" if pages > 1 or source.lower().endswith((".tif", ".tiff")) else ".png"
            mask_path = self.output_dir / "mask" / f"{name}{mask_suffix}"
            prob_path = self.output_dir / "prob" / f"{name}.tif"
            if pages == 1:
                (write_tiff if mask_suffix == ".tif" else write_png)(mask_path, mask)
                if self.save_prob:
                    write_tiff(prob_path, prob)
            else:
                self._append(name, page, pages, mask_path, prob_path, mask, prob)
            d[f"{key}_mask_file"] = str(mask_path)
        return d

    def _append(self, name: str, page: int, pages: int, mask_path: Path, prob_path: Path,
                mask: np.ndarray, prob: np.ndarray) -> None:
        if page == 0:
            for writer in self._stacks.pop(name, []):  # an unfinished earlier stack of this name
                writer.close(keep=False)
            self._stacks[name] = [_StackWriter(mask_path)] + ([_StackWriter(prob_path)] if self.save_prob else [])
        writers = self._stacks.get(name)
        if writers is None:
            raise RuntimeError(f"page {page} of {name} arrived before page 0; keep stack pages in order")
        writers[0].append(mask)
        if self.save_prob:
            writers[1].append(prob)
        if page == pages - 1:
            for writer in self._stacks.pop(name):
                writer.close()
