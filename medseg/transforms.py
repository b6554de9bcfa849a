"""MONAI dictionary transforms of medseg: slice loading, label maps (binary, class, instance), stain
normalisation, weights, warps, and outputs (logit shift, class activations, kept channels, largest object)."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_numpy
from scipy import ndimage

from medseg.bundle import config_flag
from medseg.errors import ConfigValueError, DataError
from medseg.metrics import FOUR_CONNECTED
from medseg.readers import (
    LOSSY_SUFFIXES,
    count_slices,
    lossy_mask_error,
    open_picture,
    read_slice,
    separate_channels,
    turned_size_hint,
)

#: The files of a DSB ``masks/`` folder that are read as instance masks (hidden files never are)
INSTANCE_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def to_gray(arr: np.ndarray) -> np.ndarray:
    """Convert channel-first ``(C, H, W)`` to ``(1, H, W)`` float32: RGB by ITU-R 601 luma, one channel as is.

    Gray saved as RGB (three equal channels) keeps its values exactly: luma in float32 would turn a mask
    value of 10 into 9.9999.
    """
    arr = np.asarray(arr)
    if arr.shape[0] == 3 and np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
        return arr[:1].astype(np.float32)
    if arr.shape[0] == 3:
        # channel by channel, so that the result does not depend on the array's memory layout (a dot product's
        # summation order does: an RGB PNG and the same pixels as a planar TIFF differed by 1 in the last bit)
        r, g, b = (arr[c].astype(np.float32) for c in range(3))
        return (np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b)[None]
    return arr.astype(np.float32, copy=False)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _near_zero(arr: np.ndarray) -> np.ndarray:
    """An image of float64 or wide integers whose values lie far from 0 for their spread (1e6 + x / 255,
    2**25 + counts), less its minimum, taken in float64: float32, whose steps at a value v are v / 2**23,
    merged its levels (such a float64 image of 253 levels kept 17) before the intensity scaling, which a
    shift leaves as it is, could tell them apart. Other images are returned as they are."""
    if arr.size == 0 or not (arr.dtype == np.float64 or (arr.dtype.kind in "iu" and arr.dtype.itemsize > 2)):
        return arr
    low, high = float(arr.min()), float(arr.max())
    if not (np.isfinite(low) and np.isfinite(high) and high > low) or max(abs(low), abs(high)) <= 256 * (high - low):
        return arr
    return arr.astype(np.float64) - low
_PICK = ": pick channels with --set input_channels=[N] (numbered from 0)"


def _refuse_separate_channels(arr: np.ndarray, path: str, **kwargs: Any) -> None:
    """Refuse a 3-channel image of file ``path`` whose channels are separate images (stains, volumes), which
    would be blended into gray as the colours of one picture; an array without a file (the API's) passes."""
    if arr.shape[0] == 3 and Path(path).is_file() and separate_channels(path, **kwargs):
        raise DataError(f"{path}: 3 separate channels, not the colours of an RGB picture; the model takes one "
                        f"(gray) or RGB images{_PICK}")


class LoadSliced(MapTransform):
    """Load slice ``data[page_key]`` of any supported input (PNG, TIFF page, NIfTI or DICOM slice) as ``(C, H, W)``.

    Reads through :func:`medseg.readers.read_slice` (only that slice where the format allows). RGB becomes
    one gray channel unless ``gray`` is false; ``channels`` (one value or one per key) sets it per key: 1 (gray),
    3 (gray repeated, RGB as is) or None (``gray`` decides); ``data["series_uid"]`` picks a DICOM series. The
    source path of each key is kept under ``"{key}_file"``, and all loaded keys must share one spatial size.
    ``min_size`` is the smallest height and width a later transform can take (a mirror padding of ``b``
    pixels needs ``b + 1``). ``select`` picks channels of the ``"image"`` key by index (0-based) before the
    rest, e.g. ``[1]`` for the nuclear stain of a two-channel image (bundle id ``input_channels``).

    Raises:
        DataError: a file is unreadable, has a channel count the model cannot take or fewer channels than
            ``select`` names, a label's size differs from its image's, or it is smaller than ``min_size``.
    """

    def __init__(self, keys: KeysCollection, page_key: str = "page", gray: bool = True,
                 nifti_channel_dim: int | None = None, channels: int | Sequence[int | None] | None = None,
                 min_size: int = 1, select: Sequence[int] | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = int(min_size)
        if select is not None and (not isinstance(select, (list, tuple)) or not select or any(
                not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in select)):
            raise ConfigValueError(f"input_channels={select}: give channel numbers from 0, e.g. --set "
                                   "input_channels=[1], or null for the image's own channels")
        self.select = None if select is None else [int(c) for c in select]
        per_key = list(channels) if isinstance(channels, (list, tuple)) else [channels] * len(self.keys)
        if len(per_key) != len(self.keys) or any(c not in (None, 1, 3) for c in per_key):
            raise ValueError(f"channels must be 1, 3 or None (or one of those per key), got {channels}")
        self.page_key, self.gray, self.nifti_channel_dim = page_key, gray, nifti_channel_dim
        self.channels = dict(zip(self.keys, per_key, strict=True))

    def convert(self, arr: np.ndarray, key: Hashable, path: str) -> np.ndarray:
        """The channels key ``key`` takes, from a read ``(C, H, W)`` array (``path`` names it in errors)."""
        with np.errstate(over="ignore", invalid="ignore"):  # values float32 cannot hold: refused by name below
            return self._convert(arr, key, path)

    def _convert(self, arr: np.ndarray, key: Hashable, path: str) -> np.ndarray:
        if arr.dtype.kind == "c":  # a Fourier or MR phase image: its real part alone is no picture of it
            raise DataError(f"{path}: complex values ({arr.dtype}); save the image's magnitude (abs) or the part "
                            "to segment as real numbers")
        channels = self.channels.get(key)
        floats = arr.dtype.kind == "f"  # whole numbers are finite and fit float32 (up to 2**64 < 3.4e38)
        if key == "image":
            arr = _near_zero(arr)
        as_colour = channels == 1 or (channels is None and self.gray)  # 3 channels blended as RGB's luma below
        if key == "image" and self.select is None and as_colour:
            _refuse_separate_channels(arr, path, nifti_channel_dim=self.nifti_channel_dim)
        if self.select is not None and key == "image":
            if max(self.select) >= arr.shape[0]:
                raise DataError(f"{path}: {arr.shape[0]} channel{'s' * (arr.shape[0] != 1)}, and input_channels="
                                f"{self.select} asks for channel {max(self.select)}; channels count from 0")
            arr = arr[self.select]
        if channels == 3:
            if arr.shape[0] not in (1, 3):
                raise DataError(f"{path}: {arr.shape[0]} channels; the model takes gray or RGB images"
                                f"{_PICK if key == 'image' else ''}")
            arr = np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr
            arr = arr.astype(np.float32, copy=False)
        elif channels == 1 or (channels is None and self.gray):
            if arr.shape[0] not in (1, 3):
                raise DataError(f"{path}: {arr.shape[0]} channels; the model takes one (gray) or RGB "
                                f"images{_PICK if key == 'image' else ''}")
            arr = to_gray(arr)
        else:
            arr = arr.astype(np.float32, copy=False)
        if floats and not np.isfinite(arr).all():  # NaN would reach the watershed and hang it
            raise DataError(f"{path}: holds NaN or infinite values (or values beyond the range of float32, which "
                            "the network computes in); replace them (e.g. by the background value) first")
        if floats and arr.size and float(arr.max()) - float(arr.min()) > _FLOAT32_MAX:
            raise DataError(f"{path}: its values span {float(arr.min()):.3g} to {float(arr.max()):.3g}, more than "
                            "float32 (which the network computes in) can hold; rescale the image first")
        if min(arr.shape[1:], default=0) < self.min_size:
            raise DataError(f"{path}: {' × '.join(map(str, arr.shape[1:]))} pixels, smaller than the "
                            f"{self.min_size} × {self.min_size} this training takes (its mirror padding); "
                            "leave the image out, or pad it first")
        return arr

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        page = int(d.get(self.page_key, 0) or 0)
        series_uid = str(d.get("series_uid") or "") or None
        first_key, first_shape = None, None
        for key in self.key_iterator(d):
            path = str(d[key])
            arr = self.convert(read_slice(path, page, series_uid=series_uid, nifti_channel_dim=self.nifti_channel_dim),
                               key, path)
            if first_shape is None:
                first_key, first_shape = key, arr.shape
            elif arr.shape[1:] != first_shape[1:]:
                other = d[f"{first_key}_file"]
                raise DataError(
                    f"{path}: size {arr.shape[1:]} differs from {other} {first_shape[1:]}; the image and its label "
                    f"must have the same size{turned_size_hint(arr.shape[1:], first_shape[1:], other, path)}"
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
                source = d.get(f"{key}_file")
                colour = " (a colour label, its colours read as their luma)" if source and _in_colour(
                    str(source), int(d.get("page", 0) or 0)) else ""
                raise DataError(
                    f"{d.get(f'{key}_file', key)}: label values {shown} are not binary{colour}; expected "
                    f"0 = membrane and {self.on_value:g} = cell interior, as 8-bit gray"
                )
            d[key] = (arr > 0).astype(np.float32)
        return d


def _colour_key(key: object) -> int | None:
    """``#RRGGBB`` as one integer (R·65536 + G·256 + B); ``None`` for anything else."""
    text = str(key).strip()
    if len(text) == 7 and text.startswith("#"):
        try:
            return int(text[1:], 16)
        except ValueError:
            return None
    return None


class ClassMapd(MapTransform):
    """Map the pixel values of a label image to class indices, e.g. ``{0: 0, 128: 1, 255: 2}``, or the
    colours of a colour-coded mask, e.g. ``{"#000000": 0, "#800000": 1, "#008000": 2}``.

    The label may have one channel or three (a gray mask saved as RGB gives its gray values). Colour keys
    need the label's three channels, so load it with ``channels=3``. The result is float32 ``(1, H, W)``
    holding 0..C-1, as MONAI's one-hot losses and metrics expect.

    Raises:
        DataError: the label holds a value or colour the map does not know; the message names the file and
            the values.
    """

    def __init__(self, keys: KeysCollection, class_map: Mapping, num_classes: int | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_map, self.colours = parse_class_map(class_map, num_classes)

    def _show(self, value: float) -> str:
        return f"#{int(value):06x}" if self.colours else f"{value:g}"

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr = np.asarray(d[key])
            source = d.get(f"{key}_file", key)
            if self.colours:
                if arr.ndim != 3 or arr.shape[0] != 3:
                    raise DataError(f"{source}: a {arr.shape[0]}-channel label image; the class map names colours, "
                                    "which need an RGB mask (load the label with channels=3)")
                rgb = np.rint(arr).astype(np.int64)
                arr = (rgb[0] << 16 | rgb[1] << 8 | rgb[2])[None]
            elif arr.ndim == 3 and arr.shape[0] == 3 and np.array_equal(arr[0], arr[1]) and \
                    np.array_equal(arr[0], arr[2]):
                arr = arr[:1]  # a gray mask saved as RGB
            elif arr.ndim == 3 and arr.shape[0] > 1:
                raise DataError(f"{source}: a colour mask ({arr.shape[0]} channels); class_map gives gray values: "
                                "save the mask as 8-bit gray, or give class_map colours as \"#RRGGBB\" keys")
            values, inverse = np.unique(arr, return_inverse=True)
            unknown = [v for v in values.tolist() if (int(v) if self.colours else float(v)) not in self.class_map]
            if unknown:
                shown = ", ".join(self._show(v) for v in unknown[:5]) + (" …" if len(unknown) > 5 else "")
                known = ", ".join(self._show(k) for k in self.class_map)
                if not self.colours and d.get(f"{key}_file") and _in_colour(str(source), int(d.get("page", 0) or 0)):
                    raise DataError(f"{source}: a colour mask (its colours read as their luma {shown}); class "
                                    f"masks are read by gray values ({known} in class_map): save it with those "
                                    "values as 8-bit gray, or give class_map colours as \"#RRGGBB\" keys")
                what = "colours" if self.colours else "values"
                indices = _palette_indices(Path(str(source))) if d.get(f"{key}_file") and not self.colours else None
                if indices is not None:  # the class map may have been written for the palette's indices
                    listed = ", ".join(str(v) for v in np.unique(indices)[:5].tolist())
                    raise DataError(f"{source}: label values {shown} are not in the class map ({known}); a palette "
                                    f"PNG is read by its colours' gray values, not by its indices ({listed}): give "
                                    "class_map those values, or save the mask as 8-bit gray")
                if not self.colours and unknown == [255] and 1.0 in self.class_map:  # 0/1 once, 0/255 now
                    raise DataError(f"{source}: label values 255 are not in the class map ({known}); a 1-bit mask "
                                    "reads as 0 and 255 (earlier versions read a 1-bit TIFF as 0 and 1): give "
                                    "255 in class_map where 1 stands")
                raise DataError(f"{source}: label {what} {shown} are not in the class map ({known}); fix the mask "
                                "or add them to class_map")
            lut = np.array([self.class_map[int(v) if self.colours else float(v)] for v in values.tolist()],
                           dtype=np.float32)
            d[key] = lut[inverse].reshape(arr.shape).astype(np.float32)
        return d


def parse_class_map(class_map: Any, num_classes: int | None = None) -> tuple[dict[float, int], bool]:
    """``class_map`` as ``({pixel value or RGB integer: class index}, whether its keys are colours)``.

    Raises:
        ConfigValueError: not value -> index pairs, keys of both kinds, a value listed twice (``"1"`` and
            ``"1.0"``), an index that is not a whole number or lies outside ``0..num_classes-1``, or no pairs.
    """
    how = ("give pixel value -> class index pairs, e.g. --set 'class_map={\"0\": 0, \"255\": 1}', or colours "
           "as \"#RRGGBB\" keys (all keys one kind)")
    try:
        items = list(dict(class_map).items())
        colours = bool(items) and all(_colour_key(k) is not None for k, _ in items)
        keys = [_colour_key(k) if colours else float(k) for k, _ in items]
        indices = [float(v) for _, v in items]
    except (TypeError, ValueError) as err:
        raise ConfigValueError(f"class_map={class_map!r}: {how}") from err
    if not items:
        raise ConfigValueError("class_map is empty; give pixel value -> class index pairs")
    if not all(i.is_integer() for i in indices):
        raise ConfigValueError(f"class_map={class_map!r}: class indices are whole numbers; {how}")
    parsed: dict[float, int] = {}
    for (key, _), value, index in zip(items, keys, indices, strict=True):
        if value in parsed:
            first = next(k for (k, _), v in zip(items, keys, strict=True) if v == value)
            raise ConfigValueError(f"class_map lists one mask value twice ({first!r} and {key!r}); give each "
                                   "value once")
        parsed[value] = int(index)
    outside = sorted({v for v in parsed.values() if v < 0 or (num_classes and v >= num_classes)})
    if outside:
        raise ConfigValueError(f"class_map maps to class {outside[0]}, outside 0..{(num_classes or 1) - 1} "
                               "(num_classes); fix class_map or num_classes")
    return parsed, colours


def class_mask_values(class_map: Mapping, num_classes: int | None = None) -> list[int] | None:
    """The mask value of each class under ``class_map`` (the inverse of :class:`ClassMapd`), so that written
    masks hold the values of the training masks: ``{"0": 0, "255": 1}`` gives ``[0, 255]``. Where several values
    map to one class, the first listed that a mask can hold is taken. ``None`` (masks then hold class indices)
    for a colour map, and, with a warning, where a class has no value a mask can hold (a whole number 0..65535).

    Raises:
        ConfigValueError: ``class_map`` is not a class map (see :func:`parse_class_map`).
    """
    parsed, colours = parse_class_map(class_map, num_classes)
    if colours:
        return None
    first: dict[int, float] = {}
    for value, index in parsed.items():  # the first listed that a mask can hold, else the first listed
        if index not in first or (not _mask_value(first[index]) and _mask_value(value)):
            first[index] = value
    count = int(num_classes) if num_classes else max(first) + 1
    missing = [c for c in range(count) if c not in first]
    bad = [first[c] for c in range(count) if c in first and not _mask_value(first[c])]
    if missing or bad:
        why = (f"maps no pixel value to class {missing[0]}" if missing
               else f"value {bad[0]:g} cannot be a mask value (whole numbers 0..65535)")
        logging.getLogger(__name__).warning("class_map %s, so PNG/TIFF masks hold class indices; give class_values, "
                                            "one mask value per class, for others", why)
        return None
    return [int(first[c]) for c in range(count)]


def _mask_value(value: float) -> bool:
    """Whether ``value`` is one a PNG/TIFF mask can hold (a whole number 0..65535)."""
    return value.is_integer() and 0 <= value <= 65535


def _in_colour(path: str, page: int = 0) -> bool:
    """Whether slice ``page`` of ``path`` holds colours (RGB or a colour palette), for error messages."""
    try:
        arr = read_slice(path, page)
    except (DataError, OSError, IndexError, ValueError):
        return False
    return arr.shape[0] >= 3 and not (np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]))


class LoadInstanceMasksd(MapTransform):
    """Load the ``(1, H, W)`` instance image of a sample: from a folder of per-object masks (DSB 2018: one PNG
    per nucleus), or from an instance label image file.

    Masks are read in file-name order and mask *k* gets label *k* (1-based, empty masks skipped); where masks
    overlap the earlier one keeps the pixel, so the result is deterministic. Any non-zero pixel of a mask
    belongs to its object. A label image is read by :func:`instance_label_image`. The path is kept under
    ``"{key}_file"``.

    Raises:
        DataError: the folder or file is missing, a mask is unreadable, a mask's size differs from the
            others' or from ``data[ref_key]``'s, or a label image is not instance labels.
    """

    def __init__(self, keys: KeysCollection, ref_key: str | None = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from medseg.instances import InstanceMerger

        d = dict(data)
        for key in self.key_iterator(d):
            folder = Path(str(d[key]))
            ref = d.get(self.ref_key) if self.ref_key else None
            shape = tuple(np.asarray(ref).shape[1:]) if ref is not None and not isinstance(ref, str) else None
            if folder.is_file():
                d[f"{key}_file"] = str(folder)
                d[key] = instance_label_image(folder, int(d.get("page", 0) or 0), shape,
                                              d.get(f"{self.ref_key}_file"))[None].astype(np.float32)
                continue
            if not folder.is_dir():
                raise DataError(f"{folder}: no masks folder; add one PNG per object there")
            listed = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            lossy = [p for p in listed if p.suffix.lower() in LOSSY_SUFFIXES]
            if lossy:
                raise lossy_mask_error(lossy[0], "instance mask")
            files = [p for p in listed if p.suffix.lower() in INSTANCE_MASK_SUFFIXES]
            merger = None  # the label image, filled as the masks are read (only one mask in memory at a time)
            covered = []  # masks wholly under earlier ones (a mask of all the nuclei among them, say)
            for path in files:
                if path.suffix.lower() in (".tif", ".tiff") and (pages := count_slices(str(path))) > 1:
                    raise DataError(f"{path}: a stack of {pages} pages; each file in a masks/ folder is one object's "
                                    "mask: save each page as its own file")
                mask = read_slice(str(path), 0)
                if mask.shape[0] != 1:
                    mask = mask.max(axis=0, keepdims=True)
                if shape is None:
                    shape = mask.shape[1:]
                elif mask.shape[1:] != shape:
                    image = d.get(f"{self.ref_key}_file") if self.ref_key else None
                    turned = turned_size_hint(mask.shape[1:], shape, image, path)
                    raise DataError(f"{path}: size {mask.shape[1:]} differs from its image's {shape}; "
                                    f"the masks must have the image's size{turned}")
                several = np.any((mask[0] != 0) & (mask[0] != mask[0].max()))
                if several and len(files) == 1:  # the one file of the folder: a label image of all its objects
                    raise DataError(f"{path}: the one mask of its masks/ folder holds several object values, so it is "
                                    "an instance label image, which would be read as one object; read each "
                                    "sample's label image with --set 'image_glob=*/images/*' --set "
                                    "'mask_template=../masks/*'")
                if several and (str(folder.parent.parent), "several") not in _SAID:
                    _SAID.add((str(folder.parent.parent), "several"))  # a label image would become one object
                    logging.getLogger(__name__).warning(
                        "%s: holds more than one non-zero value, read as one object (every non-zero pixel); each "
                        "file in a masks/ folder is one object's mask; to read one instance label image per "
                        "image, keep it alone in its masks/ folder and give --set 'image_glob=*/images/*' --set "
                        "'mask_template=../masks/*' (said once for the data folder)", path)
                if merger is None:
                    merger = InstanceMerger(shape)
                if not merger.add(mask[0] > 0) and np.any(mask[0] > 0):
                    covered.append(path)
            if covered and (str(folder.parent.parent), "covered") not in _SAID:  # each warning once, not either
                _SAID.add((str(folder.parent.parent), "covered"))
                logging.getLogger(__name__).warning(
                    "%s: lies wholly under the masks before it (in name order), so it adds no object (%d such in "
                    "this folder); a mask of several objects hides them all as one: remove it (said once for the "
                    "data folder)", covered[0], len(covered))
            if shape is None:
                raise DataError(f"{folder}: no masks and no image to size an empty label; add the image first")
            labels = merger.labels if merger is not None else np.zeros(shape, dtype=np.int32)
            d[f"{key}_file"] = str(folder)
            d[key] = labels[None].astype(np.float32)
        return d


#: folders already warned about (a warning per file would repeat it for every sample)
_SAID: set[Any] = set()


def instance_label_image(path: str | Path, page: int = 0, shape: tuple[int, ...] | None = None,
                         image: str | Path | None = None) -> np.ndarray:
    """The ``(H, W)`` int32 instances of an instance label image: 0 for background and one value per object
    (8- to 64-bit integers, whole-valued floats, a palette PNG's indices, gray saved as RGB), renumbered 1..N
    in the order of the values. One value in several separate regions is a binary mask: each 8-connected
    region becomes an object (said once per folder, since touching objects then merge). ``image``, the
    image's path, only words the error of a size other than ``shape``.

    Raises:
        DataError: colour channels, negative or fractional values, a size other than ``shape``, or a class
            mask (at most 4 values making many separate regions).
    """
    path = Path(path)
    if path.suffix.lower() in LOSSY_SUFFIXES:
        raise lossy_mask_error(path, "instance label image")
    arr = _palette_indices(path)
    arr = read_slice(str(path), page) if arr is None else arr
    if arr.shape[0] == 3 and np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
        arr = arr[:1]  # gray values saved as RGB
    if arr.shape[0] != 1:
        raise DataError(f"{path}: an instance label image has one channel (0 = background, one value per object), "
                        f"this one {arr.shape[0]}; save the labels as a gray 16-bit PNG or TIFF")
    labels = arr[0]
    if shape is not None and labels.shape != tuple(shape):
        turned = turned_size_hint(labels.shape, shape, image, path)
        raise DataError(f"{path}: size {labels.shape} differs from its image's {tuple(shape)}; the label image "
                        f"must have the image's size{turned}")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise DataError(f"{path}: holds fractional values, not instance labels; save whole numbers "
                        "(0 = background, one value per object)")
    if labels.dtype.kind not in "ub" and labels.min(initial=0) < 0:
        raise DataError(f"{path}: holds negative values ({labels.min()}); instance labels are 0 for background and "
                        "a positive value per object")
    kept, inverse = np.unique(labels, return_inverse=True)
    values = kept[kept != 0]
    if len(values) == 1 and labels.size >= 1024 and np.count_nonzero(labels) > 0.9 * labels.size \
            and f"inverted {path.parent}" not in _SAID:
        _SAID.add(f"inverted {path.parent}")  # objects 0 and background one value: one object of it all
        logging.getLogger(__name__).warning(
            "%s: one object covers %.0f%% of the image; if the objects are 0 and the background %s, invert the "
            "masks (said once for the folder)", path, 100 * np.count_nonzero(labels) / labels.size, values[0])
    if len(values) == 1:
        regions, count = ndimage.label(labels != 0, structure=np.ones((3, 3), bool))
        if count > 1:
            if str(path.parent) not in _SAID:
                _SAID.add(str(path.parent))
                logging.getLogger(__name__).warning(
                    "%s: one value (%s) in %d separate regions: read as a binary mask, each region one object, so "
                    "touching objects merge; give each object its own value for separate instances (said once "
                    "for the folder)", path, values[0], count)
            return regions.astype(np.int32)
    # renumbered 1..N in the order of the values, 0 kept (exactly, whatever the values' type and size)
    renumbered = (inverse.reshape(labels.shape) + (kept[0] != 0)).astype(np.int32)
    if len(values) >= 2:
        from skimage.measure import label as regions_of

        pieces = regions_of(renumbered, connectivity=2, background=0)
        count = int(np.count_nonzero(np.bincount(pieces.ravel())[1:] >= 8))  # stray specks of a brush not counted
        if len(values) <= 4 and count >= 2 * len(values) + 2:  # an object is one region, seldom two; a class many
            raise DataError(f"{path}: its {len(values)} values ({', '.join(map(str, values[:4]))}"
                            f"{', ...' if len(values) > 4 else ''}) make {count} separate regions, so it is a class "
                            "mask (e.g. 1 = background, 2 = nuclei), not instance labels; give each object its own "
                            "value, or save a binary mask (0 and one value; each region is read as one object)")
    if kept[0] != 0 and len(kept) >= 2:
        _check_background_is_zero(path, labels, kept, inverse)
    return renumbered


def _check_background_is_zero(path: Path, labels: np.ndarray, kept: np.ndarray, inverse: np.ndarray) -> None:
    """An instance label image without a 0 pixel whose smallest value fills most of it along every edge: its
    background bears that value (1-based labels, a class mask 1 = background, 2 = nuclei), and would be read as
    one object covering the image.

    Raises:
        DataError: naming the file, the value and the fix.
    """
    # a background bears the smallest value (1 of 1-based labels); a large nucleus among others need not
    share = np.count_nonzero(inverse == 0) / labels.size
    filled = labels == kept[0]
    if share < 0.5 or not (filled[0].any() and filled[-1].any() and filled[:, 0].any() and filled[:, -1].any()):
        return
    raise DataError(f"{path}: has no 0 (background) pixel, and its value {kept[0]} fills {100 * share:.0f}% of "
                    f"it along every edge, so it is the background; instance labels are 0 for background: save "
                    f"the labels with {kept[0]} as 0 (e.g. 1-based labels minus 1)")


def _palette_indices(path: Path) -> np.ndarray | None:
    """A palette PNG's or BMP's indices as ``(1, H, W)`` (label tools save instance labels so; the picture reader
    gives their colours), else ``None``."""
    if path.suffix.lower() not in (".png", ".bmp"):
        return None
    try:
        with open_picture(path) as im:
            return np.asarray(im)[None] if im.mode == "P" else None
    except (OSError, DataError):
        return None  # the reader names the file


class InstanceTargetd(MapTransform):
    """Turn an instance image ``(1, H, W)`` into 3 classes (0 background, 1 interior, 2 boundary).

    The boundary is ``boundary_width`` pixels wide on the inside of each object, so touching objects are
    separated by boundary pixels; ``boundary="touching"`` marks only the edges shared with another object
    (see :func:`medseg.instances.instance_targets`). The instance image is kept under ``instance_key`` for
    instance metrics.
    """

    def __init__(self, keys: KeysCollection, boundary_width: int = 2, instance_key: str | None = "instances",
                 boundary: str = "outline", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if boundary not in ("outline", "touching"):
            raise ConfigValueError(f"boundary={boundary!r}: unknown; use --set boundary=outline or boundary=touching")
        self.boundary_width, self.instance_key, self.boundary = boundary_width, instance_key, boundary

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from medseg.instances import instance_targets

        d = dict(data)
        for key in self.key_iterator(d):
            labels = np.asarray(d[key])[0].astype(np.int32)
            if self.instance_key:
                d[self.instance_key] = labels[None].astype(np.float32)
            d[key] = instance_targets(labels, self.boundary_width, self.boundary)[None].astype(np.float32)
        return d


class InstanceDistanced(MapTransform):
    """Add ``data[distance_key]``: :func:`medseg.instances.instance_distance_map` of the ``(1, H, W)`` instances
    at ``keys`` (each nucleus's distance to its outline over its largest; the target of a distance head)."""

    def __init__(self, keys: KeysCollection, distance_key: str = "distance", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.distance_key = distance_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from medseg.instances import instance_distance_map

        d = dict(data)
        for key in self.key_iterator(d):
            d[self.distance_key] = instance_distance_map(np.asarray(d[key])[0])[None]
        return d


def is_colour(arr: np.ndarray, tolerance: float = 2.0) -> bool:
    """Whether a ``(3, H, W)`` image holds colour: its channels differ by over ``tolerance`` on average."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        return False
    scale = 255.0 / max(float(arr.max()), 1e-6) if arr.max() > 255 else 1.0
    return float(np.abs(arr[0] - arr[1]).mean() + np.abs(arr[1] - arr[2]).mean()) * scale / 2 > tolerance


def hematoxylin(arr: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density ``(1, H, W)`` of a channel-first RGB image (Ruifrok-Johnston colour deconvolution).

    Hematoxylin stains nuclei: in an H&E image its density is high on nuclei and low on eosin-stained
    tissue, where luma cannot tell the two apart.
    """
    from skimage.color import rgb2hed

    arr = np.asarray(arr, dtype=np.float32)
    peak = 65535.0 if arr.max() > 255 else 255.0
    rgb = np.clip(np.moveaxis(arr, 0, -1) / peak, 0.0, 1.0)
    return rgb2hed(rgb)[..., 0][None].astype(np.float32)


def background_level(scaled: np.ndarray, bins: int = 64) -> float:
    """The background's level in an image scaled to [0, 1]: the centre of its histogram's peak (``bins`` bins,
    smoothed over one bin), where the objects are textured and the background flat. In an image saturated at
    its top (over 2 % of its pixels at the maximum, where the scaling's percentile clips 0.2 %), the peak may be
    the saturation of bright objects (clipped fluorescence nuclei) as well as of a bright background, so there
    the median decides."""
    if np.mean(scaled >= 1.0) > 0.02:
        return float(np.median(scaled))
    counts, _ = np.histogram(scaled, bins=bins, range=(0.0, 1.0))
    return (int(np.argmax(ndimage.gaussian_filter1d(counts.astype(np.float64), 1.0))) + 0.5) / bins


class BrightObjectsd(MapTransform):
    """Make any stain look like fluorescence: one gray channel, scaled to [0, 1], objects bright.

    Colour becomes luma, or with ``stain="hematoxylin"`` a colour image with a bright background (H&E
    tissue) becomes its hematoxylin density (:func:`hematoxylin`), which is high on nuclei; intensities are
    scaled between the ``lower`` and ``upper`` percentiles of the image; images with a bright background
    (brightfield) are inverted, so the network sees bright nuclei on a dark background whatever the modality.

    The background is the image's most frequent level (the peak of its histogram, :func:`background_level`;
    the median in an image saturated at its top): flat, where nuclei are textured, so a fluorescence field that
    nuclei fill for the most part (a crop around one, a dense culture) still counts as dark; its median, the
    earlier test, was a nucleus's.

    Args:
        keys: image keys, channel-first.
        lower, upper: percentiles mapped to 0 and 1.
        stain: ``"luma"`` (every image through luma) or ``"hematoxylin"`` (bright-background colour
            images through colour deconvolution; gray and dark-background images through luma).
        invert: ``None`` (by the background, as above), ``True`` (a bright background: every image
            inverted) or ``False`` (never), for data of one known kind.
    """

    def __init__(self, keys: KeysCollection, lower: float = 1.0, upper: float = 99.8, stain: str = "luma",
                 invert: bool | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if stain not in ("luma", "hematoxylin"):
            raise ConfigValueError(f"stain={stain!r}: unknown; use --set stain=luma or --set stain=hematoxylin")
        if invert not in (None, True, False):
            raise ConfigValueError(f"invert={invert!r}: use --set invert=null (by the image's background), "
                                   "true (bright backgrounds) or false (dark backgrounds)")
        self.lower, self.upper, self.stain, self.invert = lower, upper, stain, invert

    def _scale(self, gray: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(gray, (self.lower, self.upper))
        return np.clip((gray - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(gray)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = convert_to_numpy(img, wrap_sequence=True)
            source = str(d.get(f"{key}_file", key))
            if arr.shape[0] not in (1, 3):
                raise DataError(f"{source}: {arr.shape[0]} channels; the model takes gray or RGB images{_PICK}")
            _refuse_separate_channels(arr, source)
            scaled = self._scale(to_gray(arr))
            bright_background = background_level(scaled) > 0.5 if self.invert is None else self.invert
            if bright_background and self.stain == "hematoxylin" and is_colour(arr):
                scaled = self._scale(hematoxylin(arr))
            elif bright_background:
                scaled = 1.0 - scaled
            d[key] = scaled.astype(np.float32)
        return d


def _border_term(cells: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``, ``d1``/``d2`` the distances to the nearest and second-nearest object.

    ``cells`` holds one label per object (0 = none); a pixel inside an object is at distance 0 from it.
    Where there is no second object within reach the term is 0.
    """
    d1 = np.full(cells.shape, np.inf, dtype=np.float32)
    d2 = np.full(cells.shape, np.inf, dtype=np.float32)
    # beyond this distance sum the border term is < 1e-3 of w0: only look that far from each object
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
    return np.nan_to_num(border, nan=0.0, posinf=0.0).astype(np.float32)


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
    border = _border_term(cells, w0, sigma)
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


def touching_weight_map(instances: np.ndarray, w0: float = 10.0, sigma: float = 3.0) -> np.ndarray:
    """Loss weights ``1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` that stress where instances touch.

    The U-Net paper's border term computed from an instance label image: ``d1``/``d2`` are the distances
    to the nearest and second-nearest instance (0 inside an instance), so the weight peaks at ``1 + w0``
    on the line where two nuclei meet, falls off over ``sigma`` pixels, and is 1 around isolated nuclei.
    Touching nuclei, which a binary mask would merge into one component, keep their own labels here.

    Args:
        instances: ``(H, W)`` integer instance labels, 0 = background.
        w0: peak extra weight; 0 gives all ones.
        sigma: fall-off in pixels.

    Returns:
        ``(H, W)`` float32 weights.
    """
    instances = np.asarray(instances)
    if instances.ndim != 2:
        raise ValueError(f"instances must be 2D (H, W), got shape {instances.shape}")
    if w0 < 0 or sigma <= 0:
        raise ValueError(f"touching weights need w0 >= 0 and sigma > 0, got w0={w0}, sigma={sigma}")
    weight = np.ones(instances.shape, dtype=np.float32)
    if w0 == 0:
        return weight
    return weight + _border_term(instances.astype(np.int64), w0, sigma)


class TouchingWeightd(MapTransform):
    """Add ``data[weight_key]``: :func:`touching_weight_map` of the ``(1, H, W)`` instance image at ``keys``."""

    def __init__(self, keys: KeysCollection, weight_key: str = "weight", w0: float = 10.0, sigma: float = 3.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not (float(w0) >= 0 and float(sigma) > 0):
            raise ConfigValueError(
                f"touch_weight={w0}, touch_sigma={sigma}: need touch_weight >= 0 and touch_sigma > 0; set them with "
                "--set touch_weight=10 --set touch_sigma=3 (touch_weight=0 turns it off)")
        self.weight_key, self.w0, self.sigma = weight_key, float(w0), float(sigma)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = np.asarray(d[key])[0].astype(np.int64)
            d[self.weight_key] = touching_weight_map(labels, self.w0, self.sigma)[None]
        return d


class LogitShiftd(MapTransform):
    """Add a per-channel offset to channel-first logits ``(C, ...)`` before the softmax.

    Class-balanced training (weights ``w_c``) learns posteriors scaled by ``w_c``; adding ``-log(w_c)``
    (up to a constant) to each class's logit undoes that prior shift, so that 0.5 is again the
    decision threshold of the unweighted problem. With ``w_c = 0.5 / freq_c`` over two classes this is
    ``[0, log(f / (1 - f))]``, ``f`` the foreground fraction of the training labels. The last
    ``extra_channels`` channels (e.g. a distance head's) are not classes and are left as they are.
    """

    def __init__(self, keys: KeysCollection, shift: Sequence[float], extra_channels: int = 0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.shift = [float(v) for v in shift]
        self.extra_channels = int(extra_channels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = d[key]
            if len(self.shift) + self.extra_channels != logits.shape[0]:
                raise ValueError(f"{len(self.shift)} logit shifts and {self.extra_channels} extra channels for "
                                 f"{logits.shape[0]} channels of '{key}'")
            if not any(self.shift):
                continue
            shift = self.shift + [0.0] * self.extra_channels
            shape = (-1,) + (1,) * (logits.ndim - 1)
            if isinstance(logits, torch.Tensor):
                offset = torch.as_tensor(shift, dtype=logits.dtype, device=logits.device).view(shape)
            else:
                offset = np.asarray(shift, dtype=np.asarray(logits).dtype).reshape(shape)
            d[key] = logits + offset
        return d


class ClassActivationsd(MapTransform):
    """Softmax over the first ``num_classes`` channels of channel-first logits ``(C, ...)``, sigmoid over the rest.

    The trailing channels are per-pixel regressions learnt with a sigmoid (a distance head); without them this
    is MONAI's ``Activationsd(softmax=True)``.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = torch.as_tensor(d[key])
            if logits.shape[0] < self.num_classes:
                raise ValueError(f"'{key}' has {logits.shape[0]} channels, fewer than {self.num_classes} classes")
            classes, extra = logits[: self.num_classes], logits[self.num_classes:]
            d[key] = torch.cat([torch.softmax(classes.float(), 0), torch.sigmoid(extra.float())])
        return d


class KeepChannelsd(MapTransform):
    """Keep the first ``count`` channels of channel-first arrays (the class probabilities, not a distance head's)."""

    def __init__(self, keys: KeysCollection, count: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.count = int(count)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][: self.count]
        return d


class KeepLargestObjectd(MapTransform):
    """Keep only the largest connected foreground object of channel-first class probabilities ``(C, H, W)``.

    For images that show one object each (a single cell, as in leukocyte and Jurkat cell crops): the
    foreground is every pixel whose most likely class is in ``foreground``; its 8-connected components
    other than the largest are set to the background class (probability 1 for ``background``, 0 for
    the rest), so that argmax, thresholds and saved probabilities agree. ``(C, Z, H, W)`` volumes are
    cleaned slice by slice; an image without foreground is left as it is.

    Args:
        keys: keys of the probability outputs.
        foreground: the classes that make up the object (e.g. cell body and nucleus).
        background: the class given to removed pixels.
        enabled: ``False`` passes the data through (one switch in a bundle config).
    """

    def __init__(self, keys: KeysCollection, foreground: Sequence[int], background: int = 0, enabled: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.foreground = [int(c) for c in foreground]
        self.background, self.enabled = int(background), config_flag(enabled, "single_object")

    def _stray(self, winner: np.ndarray) -> np.ndarray:
        labels, n = ndimage.label(np.isin(winner, self.foreground), structure=np.ones((3, 3)))
        if n < 2:
            return np.zeros(winner.shape, bool)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return (labels > 0) & (labels != int(sizes.argmax()))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            prob = d[key]
            if prob.ndim not in (3, 4):
                raise ValueError(f"'{key}': expected (C, H, W) or (C, Z, H, W) probabilities, got shape {prob.shape}")
            winner = np.asarray(torch.as_tensor(prob).argmax(0).cpu())
            stray = self._stray(winner) if winner.ndim == 2 else np.stack([self._stray(w) for w in winner])
            if not stray.any():
                continue
            out = prob.clone() if isinstance(prob, torch.Tensor) else np.array(prob, copy=True)
            mask = torch.as_tensor(stray, device=out.device) if isinstance(out, torch.Tensor) else stray
            for c in range(out.shape[0]):
                out[c][mask] = 1.0 if c == self.background else 0.0
            d[key] = out
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
