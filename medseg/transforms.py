"""MONAI dictionary transforms of medseg: slice loading, binary labels, U-Net border weights, coarse elastic warps."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

from medseg.errors import DataError
from medseg.readers import read_slice

#: 4-connectivity, as the ISBI 2012 scoring and the U-Net weight map use.
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def to_gray(arr: np.ndarray) -> np.ndarray:
    """Convert channel-first ``(C, H, W)`` to ``(1, H, W)`` float32: RGB by ITU-R 601 luma, one channel as is."""
    arr = np.asarray(arr)
    if arr.shape[0] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.tensordot(weights, arr.astype(np.float32), axes=1)[None]
    return arr.astype(np.float32, copy=False)


class LoadSliced(MapTransform):
    """Load slice ``data[page_key]`` of any supported input (PNG, TIFF page, NIfTI or DICOM slice) as ``(C, H, W)``.

    Reads through :func:`medseg.readers.read_slice` (only that slice where the format allows). RGB becomes
    one gray channel unless ``gray`` is false; ``data["series_uid"]`` picks a DICOM series. The source path of
    each key is kept under ``"{key}_file"``, and all loaded keys must share one spatial size.

    Raises:
        DataError: a file is unreadable, has a channel count the model cannot take, or a label's size differs
            from its image's.
    """

    def __init__(self, keys: KeysCollection, page_key: str = "page", gray: bool = True,
                 nifti_channel_dim: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.page_key, self.gray, self.nifti_channel_dim = page_key, gray, nifti_channel_dim

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        page = int(d.get(self.page_key, 0) or 0)
        series_uid = str(d.get("series_uid") or "") or None
        first_key, first_shape = None, None
        for key in self.key_iterator(d):
            path = str(d[key])
            arr = read_slice(path, page, series_uid=series_uid, nifti_channel_dim=self.nifti_channel_dim)
            if self.gray:
                if arr.shape[0] not in (1, 3):
                    raise DataError(f"{path}: {arr.shape[0]} channels; the model takes one (gray) or RGB "
                                    "images: select a channel first")
                arr = to_gray(arr)
            else:
                arr = arr.astype(np.float32, copy=False)
            if first_shape is None:
                first_key, first_shape = key, arr.shape
            elif arr.shape[1:] != first_shape[1:]:
                raise DataError(
                    f"{path}: size {arr.shape[1:]} differs from {d[f'{first_key}_file']} "
                    f"{first_shape[1:]}; the image and its label must have the same size"
                )
            d[f"{key}_file"] = path
            d[key] = arr
        return d


class BinaryLabeld(MapTransform):
    """Map a binary label with values {0, ``on_value``} (or {0, 1}) to {0, 1} float32.

    Raises:
        DataError: the label has any other value; the message names the file and the values found.
    """

    def __init__(self, keys: KeysCollection, on_value: float = 255, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.on_value = on_value

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr = np.asarray(d[key])
            values = set(np.unique(arr).tolist())
            if not (values <= {0.0, 1.0} or values <= {0.0, float(self.on_value)}):
                bad = sorted(values - {0.0, float(self.on_value)})
                shown = ", ".join(f"{v:g}" for v in bad[:5]) + (" …" if len(bad) > 5 else "")
                raise DataError(
                    f"{d.get(f'{key}_file', key)}: label values {shown} are not binary; expected "
                    f"0 = membrane and {self.on_value:g} = cell interior"
                )
            d[key] = (arr > 0).astype(np.float32)
        return d


def border_weight_map(
    interior: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True
) -> np.ndarray:
    """U-Net loss weights ``w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` for a binary label.

    Cells are the 4-connected components of ``interior``; ``d1``/``d2`` are the distances (pixels) to
    the nearest and second-nearest cell. The border term is applied to the non-interior (membrane)
    pixels, where it separates touching cells; ``w_c`` balances the two class frequencies.

    Args:
        interior: ``(H, W)`` array, non-zero inside cells.
        w0: peak border weight.
        sigma: border width in pixels.
        class_balance: add inverse-frequency class weights (mean 1 over the image); else ``w_c = 1``.

    Returns:
        ``(H, W)`` float32 weights.
    """
    interior = np.asarray(interior) > 0
    cells, _ = ndimage.label(interior, structure=FOUR_CONNECTED)
    d1 = np.full(interior.shape, np.inf, dtype=np.float32)
    d2 = np.full(interior.shape, np.inf, dtype=np.float32)
    # beyond this distance sum the border term is < 1e-3 of w0: only look that far from each cell
    reach = int(np.ceil(sigma * np.sqrt(2.0 * np.log(1e3))))
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        win = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in box)
        dist = ndimage.distance_transform_edt(cells[win] != index).astype(np.float32)
        near, second = d1[win], d2[win]
        d2[win] = np.minimum(second, np.maximum(near, dist))
        d1[win] = np.minimum(near, dist)
    with np.errstate(invalid="ignore", over="ignore"):
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    border = np.nan_to_num(border, nan=0.0, posinf=0.0).astype(np.float32)
    border[interior] = 0.0
    weight = np.ones(interior.shape, dtype=np.float32)
    if class_balance and 0 < interior.sum() < interior.size:
        frac = interior.mean()
        weight = np.where(interior, 0.5 / frac, 0.5 / (1.0 - frac)).astype(np.float32)
    return weight + border


class BorderWeightd(MapTransform):
    """Add ``data[weight_key]``: :func:`border_weight_map` of the binary ``(1, H, W)`` label at ``keys``."""

    def __init__(
        self,
        keys: KeysCollection,
        weight_key: str = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        class_balance: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.weight_key, self.w0, self.sigma, self.class_balance = weight_key, w0, sigma, class_balance

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = np.asarray(d[key])[0]
            d[self.weight_key] = border_weight_map(label, self.w0, self.sigma, self.class_balance)[None]
        return d


class LogitShiftd(MapTransform):
    """Add a per-channel offset to channel-first logits ``(C, ...)`` before the softmax.

    Class-balanced training (weights ``w_c``) learns posteriors scaled by ``w_c``; adding ``-log(w_c)``
    (up to a constant) to each class's logit undoes that prior shift, so that 0.5 is again the
    decision threshold of the unweighted problem. With ``w_c = 0.5 / freq_c`` over two classes this is
    ``[0, log(f / (1 - f))]``, ``f`` the foreground fraction of the training labels.
    """

    def __init__(self, keys: KeysCollection, shift: Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.shift = [float(v) for v in shift]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key]
            if len(self.shift) != logits.shape[0]:
                raise ValueError(f"{len(self.shift)} logit shifts for {logits.shape[0]} channels of '{key}'")
            if not any(self.shift):
                continue
            shape = (-1,) + (1,) * (logits.ndim - 1)
            if isinstance(logits, torch.Tensor):
                offset = torch.as_tensor(self.shift, dtype=logits.dtype, device=logits.device).view(shape)
            else:
                offset = np.asarray(self.shift, dtype=np.asarray(logits).dtype).reshape(shape)
            d[key] = logits + offset
        return d


class RandElasticGridd(RandomizableTransform, MapTransform):
    """Elastic deformation as in the U-Net paper: random displacements on a coarse grid, bicubically upsampled.

    Displacements of the ``grid x grid`` control points are drawn from N(0, ``sigma``²) pixels; the
    dense field is their bicubic interpolation over the image. Image-like keys are resampled
    bilinearly, labels with nearest neighbour (``mode`` per key), borders are mirrored.
    """

    def __init__(
        self,
        keys: KeysCollection,
        grid: int = 3,
        sigma: float = 10.0,
        prob: float = 0.8,
        mode: str | Sequence[str] = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.grid, self.sigma = grid, sigma
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.mode) != len(self.keys):
            raise ValueError(f"mode needs one entry per key ({len(self.keys)}), got {len(self.mode)}")
        self._offsets = np.zeros((2, grid, grid), dtype=np.float32)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._offsets = self.R.normal(0.0, self.sigma, size=(2, self.grid, self.grid)).astype(np.float32)

    def _sampling_grid(self, height: int, width: int) -> torch.Tensor:
        coarse = torch.from_numpy(self._offsets)[None]
        dense = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
        ys = torch.linspace(-1.0, 1.0, height)
        xs = torch.linspace(-1.0, 1.0, width)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        gx = gx + dense[1] * 2.0 / max(width - 1, 1)
        gy = gy + dense[0] * 2.0 / max(height - 1, 1)
        return torch.stack((gx, gy), dim=-1)[None]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        grid = None
        for key, mode in self.key_iterator(d, self.mode):
            img = torch.as_tensor(np.asarray(d[key]) if not torch.is_tensor(d[key]) else d[key])
            if grid is None:
                grid = self._sampling_grid(*img.shape[-2:])
            warped = F.grid_sample(
                img[None].float(), grid, mode=mode, padding_mode="reflection", align_corners=True
            )[0]
            d[key] = type(d[key])(warped) if torch.is_tensor(d[key]) else warped.numpy()
        return d
