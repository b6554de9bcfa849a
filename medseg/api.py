"""Segment images held in memory (NumPy arrays) with a bundle and its weights: ``medseg infer`` from Python.

    >>> from medseg import Segmenter
    >>> nuclei = Segmenter("bundles/nuclei", "runs/nuclei/model.pt")
    >>> result = nuclei.segment(image)          # (H, W) gray or (H, W, 3) RGB, any dtype
    >>> result.mask, result.prob, result.objects

The bundle's own inference config does the work, as in ``medseg infer``: its preprocessing (after the file
reader), inferer (tiling, mirror border, test-time augmentation), postprocessing (logit shift, activations,
contour closing, largest object, watershed) and the mask rules of its writer. So an array gives the same mask
as the same pixels saved to a file and segmented by ``medseg infer``; only the values differ where a file
format stores them differently (see :class:`Segmentation`).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import BundleError, DataError


@dataclass(frozen=True)
class Segmentation:
    """What a bundle makes of one image.

    Attributes:
        mask: ``(H, W)``, by the bundle's kind (:attr:`Segmenter.kind`): ``binary`` 0/1 ``uint8`` (isbi_em: 1 =
            cell interior; ``medseg infer`` writes 255 in PNG/TIFF), ``classes`` the class index ``uint8``
            (jurkat: 0 background, 1 cell body, 2 nucleus; PNG/TIFF files hold the training masks' values),
            ``instances`` a ``uint16`` label per object (nuclei: 0 background, 1…N; ``uint32`` past 65535).
        prob: ``(H, W)`` ``float32``, the probability map ``medseg infer`` writes to ``prob/``: the interior
            class of a binary bundle, 1 − p(background) otherwise.
        objects: ``instances`` bundles: one dict per object in label order, the columns of ``medseg infer``'s
            ``table/`` CSV (``label, area, centroid_y, …, mean_intensity``, in pixels, intensity of the input's
            own values; ``area_um2, centroid_y_um, centroid_x_um`` in micrometres for an image file that
            states its pixel size, None for arrays and uncalibrated files); ``None`` for other bundles.

    For a stack (:meth:`Segmenter.segment_stack`) ``mask`` and ``prob`` are ``(Z, H, W)``, instances are
    labelled slice by slice, and each object's row has its ``slice`` (0-based) first.
    """

    mask: np.ndarray
    prob: np.ndarray
    objects: list[dict] | None = None


class Segmenter:
    """A bundle's inference with trained weights, applied to arrays, images or image files.

    Args:
        bundle: the bundle folder (e.g. ``bundles/nuclei``).
        checkpoint: the weights (a ``model.pt`` of ``medseg train``); several paths segment as one ensemble,
            logits averaged. Default: the bundle's ``models/model.pt``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``; mixed precision on CUDA as in
            ``medseg infer``.
        tta: average the 8 rotations/flips of each image; ``None`` takes the bundle's ``tta``.
        overlays: config files applied over the bundle's ``inference.json``, as ``medseg infer -c``.
        overrides: config ids and values, as ``medseg infer --set`` (e.g. ``{"diameter": 30}``).

    Raises:
        BundleError: the bundle or a config override is invalid, or its inference config lacks the file
            reader or the writer this class takes the rules from.
        CheckpointError: a checkpoint is missing or holds another network's weights.
        ConfigValueError: a setting's value does not work, such as ``device="cuda"`` without a GPU or ``tta``
            given twice, differently.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        *,
        device: str = "auto",
        tta: bool | None = None,
        overlays: Sequence[str | os.PathLike] = (),
        overrides: dict[str, Any] | None = None,
    ) -> None:
        # a first import of MONAI draws from Python's generator; the network's init from torch's
        with _python_words(), _rng_kept():
            self._build(str(bundle), checkpoint, device, tta, overlays, overrides)

    def _build(self, bundle: str, checkpoint: Any, device: str, tta: bool | None, overlays: Sequence[Any],
               overrides: dict[str, Any] | None) -> None:
        from medseg.bundle import config_flag, load_config
        from medseg.ensemble import load_members
        from medseg.errors import ConfigValueError
        from medseg.export import say_other_weights
        from medseg.runfolder import training_settings
        from medseg.transforms import LoadSliced
        from medseg.workflows import checkpoint_list, device_settings, select_device
        from medseg.writers import SaveSegmentationd

        checkpoints = checkpoint_list(checkpoint, bundle)
        self.device = select_device(device)
        if tta is not None:
            tta = config_flag(tta, "tta")
            if "tta" in (overrides or {}) and config_flag((overrides or {})["tta"], "tta") != tta:
                raise ConfigValueError(f"tta={tta} contradicts overrides {{'tta': {overrides['tta']!r}}}; give one "
                                       "of them")
        settings = {"ckpt_path": checkpoints[0], "datalist": [], "handlers": [],
                    **({} if tta is None else {"tta": tta}), **device_settings(self.device)}
        overrides = {k: v for k, v in (overrides or {}).items() if not (k == "tta" and tta is not None)}
        overlays = (overlays,) if isinstance(overlays, (str, os.PathLike)) else overlays  # one file, not its letters
        overlays = tuple(str(o) for o in overlays)
        trained = training_settings(bundle, checkpoints, overrides or {}, overlays)
        parser = load_config(bundle, "infer", overlays, overrides, settings, trained=trained.values)
        trained.say(checkpoints)
        with _user_errors():
            network, digests = load_members(parser.get_parsed_content("network_def"), checkpoints)
            say_other_weights(bundle, checkpoints, digests)
            self.network = network.to(self.device).eval()
            parser.get_parsed_content("initialize")
            self.inferer = parser.get_parsed_content("inferer")
            self.amp = bool(parser.get_parsed_content("amp", default=False)) and self.device.type == "cuda"
            pre = list(getattr(parser.get_parsed_content("preprocessing"), "transforms", ()))
            post = list(getattr(parser.get_parsed_content("postprocessing"), "transforms", ()))
        self.tta = bool(getattr(self.inferer, "tta", False))
        reader = next((i for i, t in enumerate(pre) if isinstance(t, LoadSliced)), None)
        writer = next((i for i, t in enumerate(post) if isinstance(t, SaveSegmentationd)), None)
        if reader is None or writer is None:
            missing = "preprocessing has no medseg.transforms.LoadSliced" if reader is None else \
                "postprocessing has no medseg.writers.SaveSegmentationd"
            raise BundleError(f"{bundle}: inference {missing}; add one (it sets how inputs are read or masks made)")
        self._reader, self._writer = pre[reader], post[writer]
        self._pre, self._post = pre[reader + 1:], post[:writer]
        self._key = self._reader.keys[0]
        self.bundle, self.checkpoints = bundle, checkpoints

    @property
    def _takes_channels(self) -> bool:
        """Whether the model picks its channels itself (``input_channels``): every channel given is kept."""
        return getattr(self._reader, "select", None) is not None

    @property
    def kind(self) -> str:
        """``binary``, ``classes`` or ``instances``: what :attr:`Segmentation.mask` holds."""
        return str(self._writer.mask_mode)

    def __repr__(self) -> str:
        weights = self.checkpoints[0] if len(self.checkpoints) == 1 else self.checkpoints
        return (f"Segmenter({self.bundle!r}, {weights!r}, kind={self.kind!r}, device={str(self.device)!r}, "
                f"tta={self.tta})")

    def segment(self, image: Any, channel_axis: int | None = None, diameter: float | None = None) -> Segmentation:
        """Segment one 2D image.

        Args:
            image: ``(H, W)`` gray, or with a channel axis of 1, 3 (RGB) or 4 (RGBA) samples, or 2 (gray +
                alpha); a NumPy array, anything ``np.asarray`` takes (a PIL image is turned by its EXIF
                orientation and converted to RGB unless gray, RGB or RGBA, as the file readers do), a tensor,
                or the path of an image file, read as ``medseg infer`` reads it. An alpha channel must be constant
                (opaque): a fourth or second channel that varies is refused rather than dropped.
            channel_axis: the channel axis of a 3D array; ``None`` takes the last axis when it has 1–4 samples
                and the first one has not, the first axis in the opposite case (``(C, H, W)`` as MONAI holds
                images), and refuses arrays where both could be.
            diameter: the objects' diameter in this image's pixels, for a model trained with
                ``target_diameter`` (as ``medseg infer --set diameter=D``, here per image): the image is
                brought to the trained size without estimating it.

        Raises:
            DataError: not a 2D image, an ambiguous or unsupported channel count, an empty image, or values
                that are NaN or infinite.
            ConfigValueError: ``diameter`` not positive, or given for a model trained without ``target_diameter``.
        """
        with _python_words():
            if isinstance(image, (str, os.PathLike)):
                _check_path(image)
                return self._segment_file(image, None, channel_axis, diameter, self._calibration(image))
            return self._segment(_channels_first(image, channel_axis, self._takes_channels), diameter)

    def segment_stack(self, stack: Any, channel_axis: int | None = None,
                      diameter: float | None = None) -> Segmentation:
        """Segment each slice of a stack ``(Z, H, W)`` (or ``(Z, H, W, C)`` / ``(Z, C, H, W)`` with
        ``channel_axis`` counted in the stack's axes) as :meth:`segment` does, as ``medseg infer`` segments a
        TIFF stack or a volume slice by slice; ``diameter`` as for :meth:`segment`, for every slice. ``stack`` may
        be the path of a TIFF stack, NIfTI or DICOM file, read as ``medseg infer`` reads it."""
        with _python_words():
            return self._segment_stack(stack, channel_axis, diameter)

    def _segment_stack(self, stack: Any, channel_axis: int | None, diameter: float | None) -> Segmentation:
        if isinstance(stack, (str, os.PathLike)):
            from medseg.readers import count_slices

            _check_path(stack)
            pages = count_slices(stack)
            pixel_um = self._calibration(stack)  # one header read for the stack
            results = [self._segment_file(stack, z, channel_axis, diameter, pixel_um) for z in range(pages)]
            return _stacked(results, self.kind == "instances")
        arr = _as_numpy(stack)
        if arr.ndim not in (3, 4):
            raise DataError(f"a stack of {arr.ndim} axes {arr.shape}; give (Z, H, W), or (Z, H, W, C) with its "
                            "channel axis")
        if arr.shape[0] == 0:
            raise DataError(f"an empty stack of shape {arr.shape}")
        if arr.ndim == 3 and channel_axis is not None:
            raise DataError(f"channel_axis {channel_axis}: a stack of 3 axes {arr.shape} is (Z, H, W), without one")
        if arr.ndim == 4 and channel_axis is None:
            channel_axis = 3 if arr.shape[3] in (1, 2, 3, 4) and arr.shape[1] not in (1, 2, 3, 4) else None
            if channel_axis is None:
                raise DataError(f"a stack of shape {arr.shape}: which axis holds the channels? pass channel_axis")
        if arr.ndim == 4 and channel_axis not in (1, 2, 3, -1, -2, -3):
            raise DataError(f"channel_axis {channel_axis}: the channel axis of a (Z, ...) stack is 1, 2 or 3 "
                            "(0 is its slice axis)")
        if arr.ndim == 3 and arr.shape[2] in (3, 4) and min(arr.shape[:2]) > 4:
            raise DataError(f"a stack of shape {arr.shape} would be {arr.shape[0]} slices of {arr.shape[1]} x "
                            f"{arr.shape[2]} pixels; for one colour image (H, W, {arr.shape[2]}) use segment")
        slice_axis = None if arr.ndim == 3 else (channel_axis % 4) - 1
        results = [self._segment(_channels_first(arr[z], slice_axis, self._takes_channels), diameter)
                   for z in range(arr.shape[0])]
        return _stacked(results, self.kind == "instances")

    def _calibration(self, path: str | os.PathLike) -> tuple[float, float] | None:
        """The pixel size in micrometres of the file ``path`` for the nuclei table (None for other bundles)."""
        from medseg.readers import read_geometry
        from medseg.writers import pixel_micrometres

        if self.kind != "instances":
            return None
        return pixel_micrometres(read_geometry(path, nifti_channel_dim=getattr(self._reader, "nifti_channel_dim",
                                                                              None)))

    def _segment_file(self, path: str | os.PathLike, page: int | None, channel_axis: int | None,
                      diameter: float | None, pixel_um: tuple[float, float] | None) -> Segmentation:
        """Slice ``page`` of the file ``path`` (``None``: the file is one image) read as ``medseg infer`` reads it:
        the same reader, EXIF orientation, channel checks and, for nuclei, the table's intensities; ``pixel_um``
        the file's pixel size in micrometres (:meth:`_calibration`)."""
        from medseg.readers import count_slices, read_slice

        if channel_axis is not None:
            raise DataError(f"{path}: channel_axis {channel_axis} is for arrays; a file's channels are read from "
                            "the file")
        pages = count_slices(path) if page is None else 1
        if pages > 1:
            raise DataError(f"{path}: a stack of {pages} slices; segment it with segment_stack")
        nifti_channel_dim = getattr(self._reader, "nifti_channel_dim", None)
        data = self._reader({self._key: str(path), "page": page or 0})
        intensity = read_slice(path, page or 0, nifti_channel_dim=nifti_channel_dim) \
            if self.kind == "instances" else None
        return self._segment(intensity, diameter, loaded=data, pixel_um=pixel_um)

    def _segment(self, arr: np.ndarray | None, diameter: float | None = None,
                 loaded: dict | None = None, pixel_um: tuple[float, float] | None = None) -> Segmentation:
        """Segment ``arr`` (``(C, H, W)``), or the sample ``loaded`` as the bundle's reader gave it (``arr`` then
        holds the intensities the nuclei table measures; ``pixel_um`` the pixel size in micrometres of its
        file, for the table)."""
        import torch

        from medseg.workflows import quiet_constant_images

        inferer = self.inferer
        if diameter is not None:
            inferer = self._inferer_at(diameter)
        with quiet_constant_images():  # a blank image is a blank mask, not a warning
            data = loaded if loaded is not None else \
                {self._key: self._reader.convert(arr, self._key, "the array"), f"{self._key}_file": "the array"}
            for transform in self._pre:
                data = transform(data)
            x = torch.as_tensor(data[self._key])[None].to(self.device)
            autocast = torch.autocast("cuda") if self.amp else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                pred = inferer(x, self.network)
            post = {**data, "pred": pred[0]}
            for transform in self._post:
                post = transform(post)
        out = post["pred"]
        out = out.detach().float().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)
        mask, prob = self._writer.mask_of(out, "nifti")  # NIfTI's values: 0/1, class indices, labels
        objects = self._writer.measure(mask, arr, pixel_um=pixel_um) if self.kind == "instances" else None
        return Segmentation(mask, prob, objects)

    def _inferer_at(self, diameter: float) -> Any:
        """The inferer with the objects' diameter given (a copy: calls from several threads stay apart)."""
        import copy

        from medseg.errors import ConfigValueError

        if getattr(self.inferer, "target", None) is None:
            raise ConfigValueError(f"diameter={diameter}: this model was not trained at a standard object size "
                                   "(target_diameter), so it segments images at their own scale; leave diameter out")
        try:
            positive = float(diameter) > 0
        except (TypeError, ValueError):
            positive = False
        if not positive:
            raise ConfigValueError(f"diameter={diameter!r}: must be a positive number of pixels")
        inferer = copy.copy(self.inferer)
        inferer.diameter = float(diameter)
        return inferer


#: How the readers' advice, worded for the command line, reads in Python
_IN_PYTHON = (
    ("with --set input_channels=[N]", "with overrides={'input_channels': [N]}"),
    ("pick one by its SeriesInstanceUID or let `medseg infer` split the folder into one input per series",
     "give the folder of one series (`medseg infer` splits such a folder into one input per series)"),
    ("no DICOM files in this folder", "no DICOM files in this folder (a folder is read as one DICOM series; "
                                      "give the path of an image file)"),
    ("give --checkpoint the model.pt", "give as checkpoint the model.pt"),
    ("use --device auto or cpu", "use device='auto' or 'cpu'"),
    ("from --device (auto, cpu, cuda or cuda:N)", "from the device argument ('auto', 'cpu', 'cuda' or 'cuda:N')"),
    ("give --device instead", "give device= instead"),
    ("pick one of them or --device cuda", "pick one of them or device='cuda'"),
    ("use --device cpu", "use device='cpu'"),
    ("output folder, --checkpoint)", "output folder, checkpoint)"),
)


def _override_in_python(found: re.Match) -> str:
    """``--set key=value`` as the ``overrides`` entry that gives it, where the value reads as one (a number,
    ``true``, ``null``, a list, a word, a quoted string or a placeholder such as ``VALUE``); else
    ``overrides key=value`` as written."""
    key, value, after = found[1], found[2], found[3]
    if re.fullmatch(r"[A-Z][A-Z_]*|\.\.\.", value):  # a placeholder
        python = value
    elif len(value) > 1 and value[0] == value[-1] == "'":
        python = value
    elif value in ("nan", "inf", "-inf"):  # a float as Python writes it
        python = f"float('{value}')"
    elif value[:1] in ("[", "{"):  # a list or mapping as JSON writes it; a text that is not one, as written
        try:
            python = repr(json.loads(value))
        except ValueError:
            return f"overrides {key}={value}{after}"
    else:
        try:  # a value as Python writes it (True, None, 1.5), else as JSON (true, null)
            python = repr(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            try:
                python = repr(json.loads(value))
            except ValueError:
                if not re.fullmatch(r"[\w.\-]+", value):
                    return f"overrides {key}={value}{after}"
                python = repr(value)
    return f"overrides={{'{key}': {python}}}{after}"


#: Options of the command line named with a value (``--set key=value``, ``--device cuda: ...``), and how they
#: read in Python: the argument that takes them; any other ``--set`` reads ``overrides``
_OPTIONS_IN_PYTHON = (
    (re.compile(r"--set ([A-Za-z_][\w#:]*)=(\S*?)([:;,)]?)(?=\s|$)"), _override_in_python),
    (re.compile(r"--set (?=\S)"), lambda found: "overrides "),
    (re.compile(r"^--device ([\w:.\-]+): "), lambda found: f"device='{found[1]}': "),
)


def _check_path(path: str | os.PathLike) -> None:
    """An empty string is no file (as a path it is the current folder, which was read as a DICOM series)."""
    if not os.fspath(path):
        raise DataError("an empty path: give the path of an image file, or the image as an array")


@contextlib.contextmanager
def _python_words() -> Iterator[None]:
    """A :class:`MedsegError` whose advice names a command-line option, reworded for a Python caller."""
    from medseg.errors import MedsegError

    try:
        yield
    except MedsegError as err:
        message = str(err)
        for cli, python in _IN_PYTHON:
            message = message.replace(cli, python)
        for option, python in _OPTIONS_IN_PYTHON:
            message = option.sub(python, message)
        try:
            reworded = type(err)(message) if message != str(err) else None
        except TypeError:  # an error class that takes more than its message: kept as it is
            reworded = None
        if reworded is None:
            raise
        raise reworded.with_traceback(err.__traceback__) from err


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """MONAI's errors in building a config item, as the one-line :class:`BundleError` the CLI prints."""
    from medseg.errors import MedsegError, describe_config_failure, find_user_error

    try:
        yield
    except MedsegError:
        raise
    except Exception as err:
        user = find_user_error(err)
        if user is not None:
            raise user from err
        described = describe_config_failure(err, where="in overrides and overlays")
        if described is None:
            raise
        raise BundleError(described) from err


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Put torch's, NumPy's and Python's global random generators back as they were."""
    import random

    python, numpy = random.getstate(), np.random.get_state()  # before importing torch, which may draw too
    import torch

    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


#: PIL modes whose samples are the picture's values as the file readers give them (others are converted)
_PIL_AS_IS = ("1", "L", "LA", "I", "F", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N")


def _stacked(results: list[Segmentation], instances: bool) -> Segmentation:
    """Per-slice results as one of the stack (table rows numbered by slice)."""
    objects = [{"slice": z, **row} for z, r in enumerate(results) for row in (r.objects or [])] if instances else None
    return Segmentation(np.stack([r.mask for r in results]), np.stack([r.prob for r in results]), objects)


def _as_numpy(image: Any) -> np.ndarray:
    if hasattr(image, "getexif") and hasattr(image, "transpose"):  # a PIL image: upright, as the file readers turn it
        from medseg.readers import displayed

        image = displayed(image)
    if hasattr(image, "mode") and hasattr(image, "convert") and image.mode not in _PIL_AS_IS:
        # CMYK, YCbCr, HSV, LAB, palette: their samples are not RGB (a CMYK's K passed for a constant alpha)
        image = image.convert("RGB")  # a palette's transparency too: the file readers drop a varying alpha
    if hasattr(image, "detach"):  # a torch tensor, perhaps on a GPU, perhaps of a type NumPy lacks (bfloat16)
        image = image.detach().cpu()
        try:
            image = image.numpy()
        except TypeError:  # bfloat16 and other types NumPy lacks
            image = image.float().numpy()
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"an array of {arr.dtype}; give numbers (integer or float pixels)")
    return arr


def _channels_first(image: Any, channel_axis: int | None, keep_channels: bool = False) -> np.ndarray:
    """A 2D image as ``(C, H, W)`` with C 1 or 3, as :mod:`medseg.readers` gives files (alpha dropped); with
    ``keep_channels`` (a model that picks its ``input_channels``) every channel is kept."""
    arr = _as_numpy(image)
    if arr.ndim == 2 and channel_axis is not None:
        raise DataError(f"channel_axis {channel_axis}: an image of shape {arr.shape} has no channel axis; leave it "
                        "out")
    if arr.ndim == 3 and channel_axis is None:
        last, first = arr.shape[-1] in (1, 2, 3, 4), arr.shape[0] in (1, 2, 3, 4)
        if not last and not first and keep_channels:  # a model that picks its channels takes any number
            raise DataError(f"an image of shape {arr.shape}: which axis holds the channels? pass channel_axis "
                            "(-1 for (H, W, C), 0 for (C, H, W))")
        if not last and not first:
            raise DataError(f"an array of shape {arr.shape}: no axis of 1–4 channels, so not one image; for a stack "
                            "of slices (Z, H, W) use segment_stack")
        if last == first:
            raise DataError(f"an image of shape {arr.shape}: which axis holds the channels? pass channel_axis "
                            "(-1 for (H, W, C), 0 for (C, H, W))")
        channel_axis = -1 if last else 0
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if channel_axis not in (0, 1, 2, -1, -2, -3):
            raise DataError(f"channel_axis {channel_axis}: an image has axes 0–2")
        arr = np.moveaxis(arr, channel_axis, 0)
        if arr.shape[0] in (2, 4) and not keep_channels:  # gray + alpha, RGBA: the alpha is dropped, as files
            if arr[-1].min() != arr[-1].max():  # not an (opaque) alpha: a channel of data, e.g. [cyto, nuclei]
                raise DataError(f"{arr.shape[0]} channels whose last is not a constant alpha; give the channels "
                                "the model takes: one gray channel, or RGB (e.g. image[..., :3])")
            arr = arr[:-1]
    else:
        raise DataError(f"an array of {arr.ndim} axes {arr.shape}; give one 2D image, (H, W) or with channels "
                        "(segment_stack takes a stack)")
    if min(arr.shape[1:]) < 1:
        raise DataError(f"an empty image of shape {arr.shape[1:]}")
    return np.require(arr, requirements="W")  # torch warns of arrays it cannot write
