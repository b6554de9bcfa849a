"""Object-size normalisation: measure object diameters and rescale images so objects have one standard size.

A network trained on objects of one apparent size generalises badly to images whose objects are two or three
times larger or smaller (another microscope, magnification or camera). As Cellpose does with its ``diameter``,
training images are resampled so that their objects have ``target_diameter`` pixels
(:class:`RescaleToDiameterd`, diameters read from the label), and at inference :class:`ScaledTiledInferer`
estimates the diameter from a first pass of the network, resamples the image to the standard size, runs the
network again and resamples the logits back, so postprocessing, metrics and written masks stay on the input's
own pixel grid. Labels are resampled only by nearest neighbour, and only for training.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from medseg.errors import ConfigValueError
from medseg.inferers import TiledInferer

_STATISTICS = ("median", "largest", "inscribed")


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Diameters of the circles with each labelled object's area: ``sqrt(4 * area / pi)``, one per non-zero label."""
    areas = np.bincount(np.asarray(labels, dtype=np.int64).ravel())[1:]
    return np.sqrt(4.0 * areas[areas > 0] / np.pi)


def inscribed_diameter(mask: np.ndarray) -> float | None:
    """Area-weighted median, over a mask's 8-connected components, of each one's largest inscribed circle's diameter.

    Each component's diameter is twice its largest distance to the background; the median is taken over the
    foreground pixels, so specks of a few pixels barely count, and touching objects (one component) count
    with the size of their largest member rather than of the clump. ``None`` when the mask is empty.
    """
    fg = np.asarray(mask) > 0
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    if n == 0 or fg.all():  # no object, or no background to measure to
        return None
    widest = 2.0 * ndimage.maximum(ndimage.distance_transform_edt(fg), labels, index=np.arange(1, n + 1))
    return float(np.median(np.concatenate([[0.0], widest])[labels[fg]]))


def object_diameter(mask: np.ndarray, statistic: str = "median", instances: bool = False) -> float | None:
    """The typical object diameter in pixels of a 2D mask, or ``None`` when it has no object.

    Args:
        mask: ``(H, W)`` boolean foreground (objects are its 8-connected components) or, with ``instances``,
            an instance label image (each non-zero value is one object).
        statistic: ``"median"`` of the objects' equivalent diameters, ``"largest"`` object's (one object per
            image, e.g. a cell crop), or ``"inscribed"`` (:func:`inscribed_diameter` of the foreground: robust
            to specks and touching objects, so it reads sizes from a network's first pass as well as from
            labels; instance labels count as one foreground).
        instances: ``mask`` holds instance labels.
    """
    if statistic not in _STATISTICS:
        raise ConfigValueError(f"diameter_statistic {statistic!r} is unknown; use one of {', '.join(_STATISTICS)}")
    mask = np.asarray(mask)
    if statistic == "inscribed":
        return inscribed_diameter(mask)
    labels = mask.astype(np.int64) if instances else ndimage.label(mask > 0, structure=np.ones((3, 3)))[0]
    diameters = equivalent_diameters(labels)
    if diameters.size == 0:
        return None
    return float(np.median(diameters) if statistic == "median" else diameters.max())


def zoom_for(diameter: float | None, target: float, limits: Sequence[float] = (0.25, 4.0),
             tolerance: float = 0.0) -> float:
    """The zoom that brings objects of ``diameter`` pixels to ``target``, clipped to ``limits``.

    Returns 1.0 when there is no diameter, or when the zoom is within ``tolerance`` of 1 (a relative
    difference: 0.2 leaves objects between ``target / 1.2`` and ``target * 1.2`` as they are).
    """
    if not diameter or diameter <= 0:
        return 1.0
    zoom = float(np.clip(target / diameter, limits[0], limits[1]))
    return 1.0 if max(zoom, 1.0 / zoom) <= 1.0 + tolerance else zoom


def resample(image: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample ``(B, C, H, W)`` to ``size`` (antialiased when shrinking; ``mode="nearest"`` for labels)."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[-2:]) == size:
        return image
    if mode == "nearest":
        return F.interpolate(image, size=size, mode="nearest-exact")
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image, size=size, mode=mode, align_corners=False, antialias=shrink)


def zoomed_size(shape: Sequence[int], zoom: float) -> tuple[int, int]:
    """The ``(H, W)`` of a 2D image of ``shape`` after ``zoom`` (at least 1 pixel each)."""
    return max(1, round(shape[-2] * zoom)), max(1, round(shape[-1] * zoom))


def _check(target_diameter: float, limits: Sequence[float], tolerance: float, name: str) -> None:
    if not target_diameter or float(target_diameter) <= 0:
        raise ConfigValueError(f"{name}: target_diameter must be a positive number of pixels, got {target_diameter}")
    if len(limits) != 2 or not 0 < float(limits[0]) <= 1.0 <= float(limits[1]):
        raise ConfigValueError(f"{name}: zoom limits must be [low <= 1, high >= 1], got {list(limits)}")
    if float(tolerance) < 0:
        raise ConfigValueError(f"{name}: tolerance must be >= 0, got {tolerance}")


class RescaleToDiameterd(MapTransform):
    """Resample a training sample so that its objects have ``target_diameter`` pixels, the diameter read from a label.

    The diameter is measured on ``data[diameter_key]`` (:func:`object_diameter`): with ``foreground`` given, the
    objects are the connected components of those class values; otherwise each non-zero value is one object
    (an instance image). Every key in ``keys`` is resampled to the same size: images bilinearly (antialiased
    when shrinking), the keys in ``nearest_keys`` (labels, instances) by nearest neighbour, so that no label
    value is invented. The zoom used is stored under ``"zoom"``. ``target_diameter=None`` passes data through.

    Args:
        keys: the channel-first ``(C, H, W)`` arrays to resample.
        diameter_key: the label to measure.
        target_diameter: the standard object diameter in pixels (``None``: no resampling).
        nearest_keys: keys resampled by nearest neighbour.
        foreground: class values that make up an object (``None``: ``diameter_key`` holds instance labels).
        statistic: ``"median"``, ``"largest"`` or ``"inscribed"`` (see :func:`object_diameter`; ``"inscribed"``
            measures the instances' merged foreground).
        limits: smallest and largest zoom.
        tolerance: leave samples whose zoom is within this relative difference of 1.
    """

    def __init__(self, keys: KeysCollection, diameter_key: str, target_diameter: float | None,
                 nearest_keys: KeysCollection = (), foreground: Sequence[int] | None = None,
                 statistic: str = "median", limits: Sequence[float] = (0.25, 4.0), tolerance: float = 0.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if target_diameter is not None:
            _check(target_diameter, limits, tolerance, "RescaleToDiameterd")
        object_diameter(np.zeros((1, 1)), statistic)  # validates the statistic
        self.diameter_key = diameter_key
        self.target = None if target_diameter is None else float(target_diameter)
        self.nearest = {nearest_keys} if isinstance(nearest_keys, str) else set(nearest_keys)
        self.foreground = None if foreground is None else [int(c) for c in foreground]
        self.statistic, self.limits, self.tolerance = statistic, tuple(float(x) for x in limits), float(tolerance)

    def measure(self, label: Any) -> float | None:
        """The object diameter of a ``(1, H, W)`` label."""
        arr = np.asarray(label)[0]
        if self.foreground is None:
            return object_diameter(arr, self.statistic, instances=True)
        return object_diameter(np.isin(np.rint(arr).astype(np.int64), self.foreground), self.statistic)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.target is None:
            return d
        zoom = zoom_for(self.measure(d[self.diameter_key]), self.target, self.limits, self.tolerance)
        d["zoom"] = zoom
        if zoom == 1.0:
            return d
        for key in self.key_iterator(d):
            arr = d[key]
            tensor = torch.as_tensor(np.asarray(arr, dtype=np.float32))[None]
            out = resample(tensor, zoomed_size(tensor.shape, zoom), "nearest" if key in self.nearest else "bilinear")[0]
            d[key] = out if isinstance(arr, torch.Tensor) else out.numpy()
        return d


class ScaledTiledInferer(TiledInferer):
    """:class:`~medseg.inferers.TiledInferer` that first brings each image's objects to a standard diameter.

    A first pass at the image's own scale (without TTA) gives class scores; the objects are the pixels whose
    most likely class is in ``foreground``, and their diameter (:func:`object_diameter` with ``statistic``,
    plus ``grow`` pixels for classes that cover only the inside of an object) sets the zoom that brings them
    to ``target_diameter``. With ``iterations`` > 1 the image is run again at that zoom and the diameter
    measured again, which corrects a first estimate made on objects far from the trained size (a network
    sees a too large object in pieces), until the zoom changes by less than ``tolerance``. The final pass
    (with TTA if set) runs at the last zoom, and the logits are resampled back to the input's size, so
    postprocessing and written masks stay on the input's pixel grid. ``target_diameter=None`` makes this a
    plain :class:`TiledInferer`.

    Args:
        target_diameter: the object diameter, in pixels, that the network was trained on.
        foreground: the classes whose pixels are the objects in the estimating passes.
        statistic: ``"median"``, ``"largest"`` or ``"inscribed"`` (:func:`object_diameter`).
        grow: pixels added to each measured diameter (e.g. twice an inner boundary class's width).
        logit_shift: per-class offsets added to the logits before objects are measured (the bundle's prior
            correction, :class:`~medseg.transforms.LogitShiftd`), so that sizes are read from the scores
            that postprocessing sees; the returned logits are not shifted. Channels past the shifts (a
            distance head's) take no part in the measurement.
        limits: smallest and largest zoom.
        tolerance: relative zoom change under which the estimate is taken as settled (and under which an
            image is left at its own scale).
        iterations: most estimating passes.
        diameter: the objects' diameter in the input's pixels, when known (as Cellpose's ``diameter``): the
            zoom is ``target_diameter / diameter`` and nothing is estimated.
        **kwargs: :class:`TiledInferer`'s arguments.

    Example:
        >>> inferer = ScaledTiledInferer(roi_size=144, target_diameter=75, foreground=[1, 2], statistic="largest")
        >>> logits = inferer(image, network)   # same (H, W) as image
    """

    def __init__(self, roi_size: Sequence[int] | int, target_diameter: float | None = None,
                 foreground: Sequence[int] = (1,), statistic: str = "median", grow: float = 0.0,
                 limits: Sequence[float] = (0.25, 4.0), tolerance: float = 0.0, iterations: int = 2,
                 logit_shift: Sequence[float] | None = None, diameter: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(roi_size=roi_size, **kwargs)
        if target_diameter is not None:
            _check(target_diameter, limits, tolerance, "ScaledTiledInferer")
        if int(iterations) < 1:
            raise ConfigValueError(f"ScaledTiledInferer: iterations must be >= 1, got {iterations}")
        if diameter is not None and not float(diameter) > 0:
            raise ConfigValueError(f"ScaledTiledInferer: diameter must be a positive number of pixels, got {diameter}")
        if diameter is not None and target_diameter is None:
            raise ConfigValueError("ScaledTiledInferer: diameter is used only with target_diameter (the object size "
                                   "the model was trained at): set target_diameter too, or leave diameter out")
        object_diameter(np.zeros((1, 1)), statistic)
        self.target = None if target_diameter is None else float(target_diameter)
        self.diameter = None if diameter is None else float(diameter)
        self.foreground = [int(c) for c in foreground]
        self.statistic, self.grow, self.iterations = statistic, float(grow), int(iterations)
        self.limits, self.tolerance = tuple(float(x) for x in limits), float(tolerance)
        self.shift = None if logit_shift is None else torch.as_tensor([float(v) for v in logit_shift])
        self.last_zooms: list[float] = []

    def measure(self, logits: torch.Tensor) -> float | None:
        """The object diameter, in the pixels of ``logits`` ``(C, H, W)``, or ``None`` without objects."""
        if self.shift is not None:  # class logits only: channels past the shifts (a distance head) are no class
            logits = logits[: len(self.shift)] + self.shift.to(logits.device).view(-1, *([1] * (logits.ndim - 1)))
        winner = np.asarray(logits.argmax(0).cpu())
        diameter = object_diameter(np.isin(winner, self.foreground), self.statistic)
        return None if diameter is None else diameter + self.grow

    def _run(self, image: torch.Tensor, zoom: float, network: Callable[..., Any], tta: bool,
             *args: Any, **kwargs: Any) -> torch.Tensor:
        scaled = image if zoom == 1.0 else resample(image, zoomed_size(image.shape, zoom))
        return self.infer(scaled, network, tta, *args, **kwargs)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.target is None:
            return super().__call__(inputs, network, *args, **kwargs)
        outputs, self.last_zooms = [], []
        for image in inputs.split(1):
            if self.diameter is not None:
                zoom = zoom_for(self.diameter, self.target, self.limits, self.tolerance)
                self.last_zooms.append(zoom)
                outputs.append(resample(self._run(image, zoom, network, self.tta, *args, **kwargs), image.shape[-2:]))
                continue
            zoom = 1.0
            for _ in range(self.iterations):
                logits, at = self._run(image, zoom, network, False, *args, **kwargs), zoom
                diameter = self.measure(logits[0])
                if diameter is None:
                    break
                new = zoom_for(diameter / zoom, self.target, self.limits)
                if max(new / zoom, zoom / new) <= 1.0 + self.tolerance:
                    break
                zoom = new
            if max(zoom, 1.0 / zoom) <= 1.0 + self.tolerance:
                zoom = 1.0  # settled close to the image's own scale
            if zoom != at or self.tta:
                logits = self._run(image, zoom, network, self.tta, *args, **kwargs)
            self.last_zooms.append(zoom)
            outputs.append(resample(logits, image.shape[-2:]))
        return torch.cat(outputs)
