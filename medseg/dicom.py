"""DICOM series: find and group files by series, order slices in space, read voxels and geometry, write DICOM SEG."""

from __future__ import annotations

import datetime
import functools
import logging
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError

#: File suffixes taken as DICOM without looking inside; other files are sniffed for the ``DICM`` preamble.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

#: LPS (DICOM patient coordinates) to RAS (NIfTI / MONAI world coordinates).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | os.PathLike, *, marked: bool = False) -> bool:
    """True when ``path`` has a DICOM suffix, the DICOM Part 10 preamble (``DICM`` at byte 128), or starts as a
    data set written without it (older scanners and archives): see :func:`_starts_a_data_set`. ``marked``:
    only the first two, which name a file DICOM beyond doubt."""
    path = Path(path)
    if path.name.upper() == "DICOMDIR":
        return False  # a media directory, not an image
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or (not marked and _starts_a_data_set(head))


def _starts_a_data_set(head: bytes) -> bool:
    """True when ``head`` begins with a little-endian element of group 0002 (file meta) or 0008 (identification),
    in explicit VR (two capital letters) or implicit VR (an even length under 64 KiB), as a DICOM data set
    written without the Part 10 preamble does."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    length = struct.unpack("<I", head[4:8])[0]
    return length < 1 << 16 and length % 2 == 0


def _read(path: str | os.PathLike, pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise DataError(f"{path}: cannot read DICOM ({err}); the file may be truncated or not DICOM") from err


#: Modalities of DICOM objects that are not images to segment: segmentations (ours among them), structure
#: sets, reports, presentation states, registrations, raw data
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "RAW",
                                  "FID", "DOC", "PLAN"})


def non_image_kind(ds) -> str | None:
    """The modality of a DICOM object that is not an image (a SEG, an RT structure set, ...), else None."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    return modality if modality in NON_IMAGE_MODALITIES else None


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series: its files (unsorted) and identity."""

    uid: str
    files: tuple[str, ...]
    folder: str
    number: int | None = None
    description: str = ""
    placeless: bool = False  # no file has an ImagePositionPatient: images that make no volume


def series_number(ds: Any) -> int | None:
    """The SeriesNumber of a header as an int; None when absent or not a whole number (no error for a bad one)."""
    try:
        value = getattr(ds, "SeriesNumber", None)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def group_series(files: Iterable[str | os.PathLike], skip_bad: bool = False) -> list[DicomSeries]:
    """Group DICOM files by SeriesInstanceUID (headers only), in order of first appearance.

    Args:
        skip_bad: leave out files that are not readable DICOM, have no SeriesInstanceUID or are not images
            (:data:`NON_IMAGE_MODALITIES`; a folder scan does: discovery reports such files on their own)
            instead of raising.

    Raises:
        DataError: a file is not readable DICOM or has no SeriesInstanceUID (unless ``skip_bad``).
    """
    groups: dict[str, list[tuple[str, object]]] = {}
    for path in files:
        try:
            ds = _read(path)
            if skip_bad and non_image_kind(ds):
                continue  # not an image (e.g. a segmentation beside its series)
            uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
            if not uid:
                raise DataError(f"{path}: DICOM file has no SeriesInstanceUID; it cannot be assigned to a series")
        except DataError:
            if skip_bad:
                continue
            raise
        groups.setdefault(uid, []).append((str(path), ds))
    result = []
    for uid, members in groups.items():
        first = members[0][1]
        result.append(DicomSeries(
            uid=uid,
            files=tuple(p for p, _ in members),
            folder=str(Path(members[0][0]).parent),
            number=series_number(first),
            description=str(getattr(first, "SeriesDescription", "") or ""),
            placeless=all(getattr(ds, "ImagePositionPatient", None) is None for _, ds in members),
        ))
    return result


def series_in_folder(folder: str) -> tuple[DicomSeries, ...]:
    """The series of the DICOM files directly inside ``folder`` (hidden and unreadable files left out).

    Headers are read once per state of the folder (file names and modification times).
    """
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))
    return _series_in_folder(tuple((str(p), p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=64)
def _series_in_folder(stamped: tuple[tuple[str, int], ...]) -> tuple[DicomSeries, ...]:
    return tuple(group_series([path for path, _ in stamped], skip_bad=True))


def find_series(source: str | os.PathLike, uid: str | None = None) -> DicomSeries:
    """The series a path stands for: a DICOM file's own series, or the one series of a folder.

    Args:
        source: a DICOM file or a folder of DICOM files.
        uid: pick this SeriesInstanceUID when the folder holds several.

    Raises:
        DataError: no DICOM there, the uid is absent, or the folder mixes series and no uid was given.
    """
    source = Path(source)
    if source.is_file():
        ds = _read(source)
        return DicomSeries(uid=uid or str(getattr(ds, "SeriesInstanceUID", "") or ""), files=(str(source),),
                           folder=str(source.parent))
    if not source.is_dir():
        raise DataError(f"{source}: not found; give a DICOM file or a folder holding one series")
    series = series_in_folder(str(source))
    if not series:
        raise DataError(f"{source}: no DICOM files in this folder")
    if uid is not None:
        for s in series:
            if s.uid == uid:
                return s
        raise DataError(f"{source}: no series with SeriesInstanceUID {uid}")
    if len(series) > 1:
        listed = ", ".join(_series_said(s) for s in series[:4])
        raise DataError(
            f"{source}: folder mixes {len(series)} DICOM series ({listed}); pick one by its SeriesInstanceUID "
            "or let `medseg infer` split the folder into one input per series"
        )
    return series[0]


def _series_said(series: DicomSeries) -> str:
    """A series as a list of a folder's series names it: its number and description, and a file of it (two
    series of one number and no description are told apart by their files)."""
    files = sorted(Path(f).name for f in series.files)
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    number = f"number {series.number}" if series.number is not None else "no number"
    described = f" {series.description!r}" if series.description else ""
    return f"{number}{described} in {files[0]}{more}"


@dataclass(frozen=True)
class SeriesGeometry:
    """Where the slices of a series are: their order, the affine and spacing (headers only, no pixels)."""

    files: tuple[str, ...]  # one entry per slice, in spatial order (a multi-frame file repeats)
    frames: tuple[int, ...]  # the frame of each slice inside its file (0 for single-frame files)
    sop_uids: tuple[str, ...]
    affine: np.ndarray = field(compare=False)  # RAS, for the index order (z, y, x)
    spacing: tuple[float, float, float]  # (slice step, row spacing, column spacing) in mm
    shape: tuple[int, int, int]  # (Z, Y, X)
    series_uid: str
    #: for slices stacked at a tilt (``affine`` sheared): the same stack straight, as ITK reads it (origin and
    #: axes of the first slice, ``spacing[0]`` apart along its normal); ``None`` for a straight stack
    straight: np.ndarray | None = field(default=None, compare=False)
    #: whether the headers state the pixel size (else 1 mm is taken, and sizes in mm are not the image's)
    sized: bool = True


def _values(value: Any) -> list:
    """The values of a DICOM attribute: a multi-valued one's, or the single one (a text is one value)."""
    return [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)


def _numbers(item: Any, keyword: str, count: int, path: str) -> np.ndarray | None:
    """The ``count`` numbers of attribute ``keyword`` of ``item`` (a dataset or a sequence item); ``None`` when
    absent or empty.

    Raises:
        DataError: another number of values, or values that are not finite numbers (naming the file and tag).
    """
    value = getattr(item, keyword, None)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    values = _values(value)
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        numbers = np.array([np.nan])
    if len(values) != count or not np.all(np.isfinite(numbers)):
        shown = "\\".join(str(v) for v in values)
        raise DataError(f"{path}: {keyword} '{shown}' is not {count} numbers; fix the file's header")
    return numbers


#: (folder, value) pairs already warned about
_SAID: set[tuple[str, str]] = set()


def _checked(row: np.ndarray, col: np.ndarray, ps: np.ndarray, path: str) -> tuple[np.ndarray, ...]:
    """Orientation cosines as unit vectors, refused when they are not two perpendicular directions; a pixel
    spacing that is not positive read as unknown (1 mm), with a warning."""
    norms = np.linalg.norm(row), np.linalg.norm(col)
    if min(norms) < 1e-6 or abs(float(row @ col)) / (norms[0] * norms[1]) > 0.05:
        shown = "\\".join(f"{v:g}" for v in (*row, *col))
        raise DataError(f"{path}: ImageOrientationPatient '{shown}' is not two perpendicular directions, so the "
                        "slice has no orientation; fix the file's header")
    if not np.all(ps > 0):
        shown = "\\".join(f"{v:g}" for v in ps)
        if (str(Path(path).parent), shown) not in _SAID:  # once for the files of a series, not per slice
            _SAID.add((str(Path(path).parent), shown))
            logging.getLogger(__name__).warning("%s: pixel spacing %s is not a spacing; 1 mm is used", path, shown)
        ps = np.ones(2)
    return row / norms[0], col / norms[1], ps


def _stated_spacing(ds, path: str = "") -> np.ndarray:
    """The pixel spacing of ``ds`` as :func:`_geometry` picks it, before an unusable one is replaced by 1 mm
    (zeros where none is stated)."""
    ps = _numbers(ds, "PixelSpacing", 2, path)
    if ps is None:
        ps = _numbers(ds, "ImagerPixelSpacing", 2, path)
    return np.zeros(2) if ps is None else ps


def _geometry(ds, path: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row cosines, column cosines, pixel spacing (row, col)) of a slice; identity and 1 mm when absent.

    Raises:
        DataError: malformed ImageOrientationPatient or pixel spacing (see :func:`_numbers`, :func:`_checked`).
    """
    orientation = _numbers(ds, "ImageOrientationPatient", 6, path)
    ps = _numbers(ds, "PixelSpacing", 2, path)
    if ps is None:
        ps = _numbers(ds, "ImagerPixelSpacing", 2, path)
    ps = np.ones(2) if ps is None else ps
    if orientation is None:
        return _checked(np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), ps, path)
    return _checked(orientation[:3], orientation[3:], ps, path)


def _say_unsized(ds, path: str) -> None:
    """Warn, once per folder, when ``ds`` states no pixel size (PixelSpacing, ImagerPixelSpacing, or an
    enhanced image's pixel measures) and 1 mm is taken, as ITK takes it: sizes in mm are then not known."""
    groups = [_functional(ds, f"{kind}FunctionalGroupsSequence", 0) for kind in ("Shared", "PerFrame")]
    measures = [getattr(g, "PixelMeasuresSequence", None) for g in groups if g is not None]
    stated = [getattr(ds, k, "") for k in ("PixelSpacing", "ImagerPixelSpacing")]
    stated += [getattr(m[0], "PixelSpacing", "") for m in measures if m]  # as _enhanced_geometry reads them
    if any(str(value or "").strip() for value in stated):
        return
    said = (str(Path(path).parent), "no pixel size")
    if said not in _SAID:
        _SAID.add(said)
        logging.getLogger(__name__).warning("%s: no PixelSpacing, so pixels are taken as 1 mm and sizes in mm are "
                                            "not the image's (a secondary capture?)", path)


def _affine(origin: np.ndarray, step: np.ndarray, row: np.ndarray, col: np.ndarray, ps: np.ndarray) -> np.ndarray:
    """RAS affine for index (z, y, x): x runs along the row cosines, y along the column cosines."""
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = step, col * ps[0], row * ps[1], origin
    return LPS_TO_RAS @ affine


def _pixels(ds, path: str) -> np.ndarray:
    """The pixels as float32 ``(frames, C, Y, X)``: one channel, or RGB for colour images (a PALETTE COLOR image
    by its colours), with RescaleSlope/Intercept applied."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (SOP class {getattr(ds, 'SOPClassUID', '?')}); "
                        "it is not an image")
    _transfer_syntax_from_encoding(ds)
    try:
        arr = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, EOFError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(f"{path}: cannot decode DICOM pixels ({_decode_failure(err)}); {_decode_advice(syntax)}") \
            from err
    colour = int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "PALETTE COLOR":  # indices: their colours
        from pydicom.pixels import apply_color_lut

        try:
            arr, colour = apply_color_lut(arr, ds), True
        except (ValueError, KeyError, AttributeError, IndexError, TypeError) as err:
            raise DataError(f"{path}: PALETTE COLOR image with an unusable colour table ({err}); convert it to "
                            "RGB or gray first") from err
    if str(getattr(ds, "PhotometricInterpretation", "")).startswith("MONOCHROME1"):
        arr = _invert_stored(arr, ds)
    # samples last as pydicom gives them (YBR already converted to RGB), then channels first per frame
    arr = np.moveaxis(arr[..., :3].reshape(-1, *arr.shape[-3:-1], 3), -1, 1) if colour else \
        arr.reshape(-1, 1, *arr.shape[-2:])
    slope, intercept = _rescale(ds)
    if not np.isscalar(slope):
        slope, intercept = slope[:, None], intercept[:, None]  # (frames, 1, 1, 1)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _decode_failure(err: BaseException) -> str:
    """pydicom's reason on one line: a missing decoder's message lists, on its later lines, the packages that
    would decode the pixels."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def _decode_advice(syntax: Any) -> str:
    """What to do about pixels that did not decode, by the file's transfer syntax: uncompressed pixels that
    fail are damaged; compressed ones may want a decoder this installation lacks."""
    name = getattr(syntax, "name", None) or str(syntax or "none named")
    try:
        compressed = bool(syntax) and bool(syntax.is_compressed)
    except (AttributeError, ValueError):  # not a transfer syntax pydicom knows: a private or unknown one
        return (f"its transfer syntax ({name}) is not one DICOM defines (a private one?); convert the file to "
                "an uncompressed transfer syntax with the software that wrote it")
    if syntax and not compressed:
        return f"its pixels are uncompressed ({name}), so the file is truncated or damaged; export it again"
    return (f"the file may be truncated, or its transfer syntax ({name}) needs a decoder this installation lacks "
            "(python-gdcm, a dependency, decodes JPEG, JPEG-LS and JPEG 2000; for others install the packages "
            "named, or convert the file to an uncompressed transfer syntax)")


def _transfer_syntax_from_encoding(ds: Any) -> None:
    """A file without file meta (no preamble, as some older systems write) names no transfer syntax, which
    pydicom needs to decode the pixels; its data are native, in the encoding pydicom read the header with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit and little else \
        ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _invert_stored(arr: np.ndarray, ds) -> np.ndarray:
    """MONOCHROME1 (low = bright) to MONOCHROME2 (high = bright): stored values mirrored within their bit range.

    The range comes from BitsStored and PixelRepresentation, so every slice of a series is inverted alike
    (a slice's own maximum would shift each slice by a different amount); rescaling follows, as for any file.
    """
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    return (lo + hi) - arr.astype(np.float64)


def _rescale(ds) -> tuple[Any, Any]:
    """RescaleSlope/Intercept: top level, an enhanced image's shared functional groups, or per frame.

    Per-frame values that differ come back as ``(frames, 1, 1)`` arrays, which scale each frame by its own.
    """
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    shared = _functional(ds, "SharedFunctionalGroupsSequence", 0)
    seq = getattr(shared, "PixelValueTransformationSequence", None) if shared is not None else None
    if seq:
        return float(getattr(seq[0], "RescaleSlope", 1) or 1), float(getattr(seq[0], "RescaleIntercept", 0) or 0)
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []
    values = []
    for item in per_frame:
        seq = getattr(item, "PixelValueTransformationSequence", None)
        if not seq:
            return 1.0, 0.0
        values.append((float(getattr(seq[0], "RescaleSlope", 1) or 1), float(getattr(seq[0], "RescaleIntercept", 0)
                                                                             or 0)))
    if not values or len(values) != int(getattr(ds, "NumberOfFrames", 1) or 1):
        return 1.0, 0.0
    if len(set(values)) == 1 or len(values) == 1:
        return values[0]
    table = np.asarray(values, dtype=np.float32)
    return table[:, 0].reshape(-1, 1, 1), table[:, 1].reshape(-1, 1, 1)


def series_geometry(series: DicomSeries, spacing_tolerance: float = 0.01) -> SeriesGeometry:
    """Order the slices of ``series`` along the slice normal (ImagePositionPatient projected on it).

    Cached per series and file modification times, so a series is scanned once per batch.

    Raises:
        DataError: no pixel data, slices of different size or orientation, no positions, duplicate
            positions, or inconsistent slice spacing (relative deviation above ``spacing_tolerance``).
    """
    stamps = tuple(Path(f).stat().st_mtime_ns if Path(f).exists() else 0 for f in series.files)
    return _series_geometry(series, spacing_tolerance, stamps)


@functools.lru_cache(maxsize=16)
def _series_geometry(series: DicomSeries, spacing_tolerance: float, stamps: tuple[int, ...]) -> SeriesGeometry:
    if len(series.files) == 1:
        return _single_geometry(series.files[0], series.uid)
    headers = [(path, _read(path)) for path in series.files]
    path0, ds0 = headers[0]
    row0, col0, ps0 = _geometry(ds0, path0)
    _say_unsized(ds0, path0)
    sized = bool(np.all(_stated_spacing(ds0, path0) > 0))  # else 1 mm stands in for it
    normal = np.cross(row0, col0)
    positioned = []
    for path, ds in headers:
        if "Rows" not in ds:
            raise DataError(f"{path}: DICOM file has no image (no Rows/pixel data); remove it from the series")
        row, col, ps = _geometry(ds, path)
        if (ds.Rows, ds.Columns) != (ds0.Rows, ds0.Columns):
            raise DataError(f"{path}: slice is {ds.Rows}x{ds.Columns} but {path0} is {ds0.Rows}x{ds0.Columns}; "
                            "the series mixes image sizes")
        if not (np.allclose(row, row0, atol=1e-4) and np.allclose(col, col0, atol=1e-4)):
            raise DataError(f"{path}: ImageOrientationPatient differs from {path0}; the series mixes orientations "
                            "(a localizer?): give its files one by one, or one folder per orientation")
        if not np.allclose(ps, ps0, rtol=1e-3, atol=0):  # one affine for all: a slice of its own scale misplaced
            raise DataError(f"{path}: PixelSpacing {'/'.join(f'{v:g}' for v in ps)} differs from {path0}'s "
                            f"{'/'.join(f'{v:g}' for v in ps0)}; the series mixes pixel sizes: give its files one "
                            "by one, or one folder per pixel size")
        position = _numbers(ds, "ImagePositionPatient", 3, path)
        if position is None:
            raise DataError(f"{path}: no ImagePositionPatient; the slices of this series cannot be ordered into a "
                            "volume: give its files one by one (`medseg infer` given one file segments it alone)")
        positioned.append((float(position @ normal), position, path, str(getattr(ds, "SOPInstanceUID", ""))))
    copies: dict[str, str] = {}
    for _, _, path, sop in positioned:
        if sop and copies.setdefault(sop, path) != path:
            raise DataError(f"{path}: the same SOPInstanceUID as {copies[sop]}, so a copy of that file; remove one "
                            "of them from the series' folder")
    positioned.sort(key=lambda t: t[0])
    names = [p[2] for p in positioned]
    _check_steps(np.array([p[0] for p in positioned]), names, series.folder, spacing_tolerance)
    step, straight = _stack_step(np.array([p[1] for p in positioned]), names, row0, col0, ps0, spacing_tolerance)
    return SeriesGeometry(
        files=tuple(names),
        frames=(0,) * len(positioned),
        sop_uids=tuple(p[3] for p in positioned),
        affine=_affine(positioned[0][1], step, row0, col0, ps0),
        spacing=(float(np.linalg.norm(step)), float(ps0[0]), float(ps0[1])),
        shape=(len(positioned), int(ds0.Rows), int(ds0.Columns)),
        series_uid=series.uid,
        straight=straight,
        sized=sized,
    )


def _stack_step(positions: np.ndarray, names: list[str], row: np.ndarray, col: np.ndarray, ps: np.ndarray,
                tolerance: float = 0.01) -> tuple[np.ndarray, np.ndarray | None]:
    """The step from slice to slice of ``positions`` (ImagePositionPatient, sorted and evenly spaced along the
    normal: :func:`_check_steps`), and for a stack at a tilt (gantry tilt: each slice shifted in its plane)
    the affine of the same stack straight (:attr:`SeriesGeometry.straight`), with a warning, else ``None``.

    Raises:
        DataError: a slice lies off the line through the first and last ones (by over ``tolerance`` of the
            step, or a tenth of a pixel if more), so the slices do not stack into one volume.
    """
    count = len(positions)
    step = (positions[-1] - positions[0]) / (count - 1)
    normal = np.cross(row, col)
    residual = positions - (positions[0] + np.arange(count)[:, None] * step)
    # within the plane only: the steps along the normal may differ by the tolerance of _check_steps
    off = np.linalg.norm(residual - np.outer(residual @ normal, normal), axis=1)
    limit = max(tolerance * float(np.linalg.norm(step)), 0.1 * float(np.min(ps)))
    if off.max() > limit:
        k = int(np.argmax(off))
        raise DataError(f"{names[k]}: its ImagePositionPatient lies {off[k]:.3g} mm off the line through the "
                        f"positions of {names[0]} and {names[-1]}, so the series' slices do not stack into one "
                        "volume (a slice of another acquisition?); move it out of the series' folder, or give the "
                        "files one by one")
    across = step - float(step @ normal) * normal  # the shift within the plane from one slice to the next
    length = float(np.linalg.norm(step))
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(step @ normal)) / length))))
    # straight: under half a pixel in all, or under 0.2° (orientations written to 3 decimals are 0.06° off)
    if float(np.linalg.norm(across)) * (count - 1) <= 0.5 * float(np.min(ps)) or tilt < 0.2:
        return step, None
    said = (names[0], "tilt")  # once a series: its geometry is worked out again when the cache drops it
    if said not in _SAID:
        _SAID.add(said)
        logging.getLogger(__name__).warning(
            "%s: the series' slices are stacked at a tilt of %.1f° (gantry tilt); a NIfTI output's sform places "
            "each slice where it was acquired, while its qform, which ITK-based viewers (3D Slicer, ITK-SNAP) "
            "read, a TIFF stack and a NRRD or MetaImage mask them straight, %.4g mm apart, as ITK reads the "
            "series itself (voxel sizes then give volumes %.1f%% large); a DICOM SEG (--format dicom-seg) "
            "overlays the series exactly", names[0],
            tilt, length, 100 * (length / abs(float(step @ normal)) - 1))
    return step, _affine(positions[0], normal * length, row, col, ps)  # sorted along the normal: ascending


def _check_steps(distances: np.ndarray, names: list[str], where: str, tolerance: float = 0.01) -> None:
    """Slices sorted by ``distances`` along the normal must be distinct and evenly spaced.

    Raises:
        DataError: duplicate positions, or a step deviating from the median by more than ``tolerance``.
    """
    steps = np.diff(distances)
    if np.any(np.abs(steps) < 1e-4):
        k = int(np.argmin(np.abs(steps)))
        raise DataError(f"{names[k + 1]}: same slice position as {names[k]}; the series holds duplicate slices "
                        "(two acquisitions or time points in one series?): move the extra files out of its folder")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > tolerance * median + 1e-3):
        k = int(np.argmax(np.abs(steps - median)))
        raise DataError(f"{names[k + 1]}: inconsistent slice spacing in the series of {where} ({steps.min():.3g} "
                        f"to {steps.max():.3g} mm; missing slices?); give a complete series")


def _single_geometry(path: str, uid: str) -> SeriesGeometry:
    """One file: a single slice, or a multi-frame image ordered by its per-frame positions where present."""
    ds = _read(path)
    if "Rows" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (SOP class {getattr(ds, 'SOPClassUID', '?')}); "
                        "it is not an image")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    row, col, ps = _geometry(ds, path)
    # an enhanced image states its plane in functional groups, whatever its number of frames (one included)
    row, col, ps = _enhanced_geometry(_functional(ds, "SharedFunctionalGroupsSequence", 0), row, col, ps, path)
    row, col, ps = _per_frame_geometry(ds, path, row, col, ps)
    # the spacing picked as above but before 1 mm stands in for an unusable one: whether sizes are known
    stated = _enhanced_geometry(_functional(ds, "SharedFunctionalGroupsSequence", 0), row, col,
                                _stated_spacing(ds, path), path)
    sized = bool(np.all(_per_frame_geometry(ds, path, *stated)[2] > 0))
    row, col, ps = _checked(row, col, ps, path)
    _say_unsized(ds, path)
    normal = np.cross(row, col)
    positions = _frame_positions(ds, frames, path)
    if positions is not None:
        order = np.argsort(positions @ normal, kind="stable")
        positions = positions[order]
        step = None
        if frames > 1:
            names = [f"{path} frame {int(i) + 1}" for i in order]
            _check_steps(positions @ normal, names, path)
            step, straight = _stack_step(positions, names, row, col, ps)
        origin = positions[0]
    else:
        order = np.arange(frames)
        origin = _numbers(ds, "ImagePositionPatient", 3, path)
        origin = np.zeros(3) if origin is None else origin
        step = None
    if step is None:
        step, straight = normal * _slice_step(ds), None
    return SeriesGeometry(
        files=(path,) * frames,
        frames=tuple(int(i) for i in order),
        sop_uids=(str(getattr(ds, "SOPInstanceUID", "")),) * frames,
        affine=_affine(origin, step, row, col, ps),
        spacing=(float(np.linalg.norm(step)), float(ps[0]), float(ps[1])),
        shape=(frames, int(ds.Rows), int(ds.Columns)),
        series_uid=uid or str(getattr(ds, "SeriesInstanceUID", "")),
        straight=straight,
        sized=sized,
    )


def _slice_step(ds) -> float:
    """The distance between slices of a file whose positions do not tell it: SpacingBetweenSlices, else
    SliceThickness, of the pixel measures an enhanced image shares or states for its first frame, or of the top
    level; 1 mm when none gives a positive number."""
    groups = (_functional(ds, "SharedFunctionalGroupsSequence", 0),
              _functional(ds, "PerFrameFunctionalGroupsSequence", 0))
    places = [seq[0] for seq in (getattr(g, "PixelMeasuresSequence", None) for g in groups if g is not None) if seq]
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        for item in (*places, ds):
            try:
                value = float(getattr(item, keyword, 0) or 0)
            except (TypeError, ValueError):
                continue
            if np.isfinite(value) and value > 0:
                return value
    return 1.0


@functools.lru_cache(maxsize=2)
def _file_pixels(path: str, mtime_ns: int) -> np.ndarray:
    """All frames of one file, ``(frames, C, Y, X)`` (cached: multi-frame files are decoded once)."""
    return _pixels(_read(path, pixels=True), path)


def read_slice(series: DicomSeries, index: int) -> np.ndarray:
    """Slice ``index`` (spatial order) of a series as ``(C, Y, X)`` float32, ``C`` 1 or 3 (colour kept as RGB);
    reads one file for classic series."""
    from medseg.readers import check_plane

    geometry = series_geometry(series)
    path, frame = geometry.files[index], geometry.frames[index]
    check_plane(path, geometry.shape[1], geometry.shape[2])
    if len(series.files) > 1:
        arr = _pixels(_read(path, pixels=True), path)
        if arr.shape[0] != 1:
            raise DataError(f"{path}: multi-frame file ({arr.shape[0]} frames) inside a series of single "
                            "slices; move it out of the series' folder")
        return arr[0]
    return _file_pixels(path, Path(path).stat().st_mtime_ns)[frame]


def read_series(series: DicomSeries) -> tuple[np.ndarray, SeriesGeometry]:
    """The whole series as ``(C, Z, Y, X)`` float32 in spatial order (``C`` 1, or 3 for colour), with its
    geometry."""
    geometry = series_geometry(series)
    slices = [read_slice(series, k) for k in range(geometry.shape[0])]
    for k, arr in enumerate(slices[1:], start=1):
        if arr.shape[0] != slices[0].shape[0]:
            raise DataError(f"{geometry.files[k]}: {'colour' if arr.shape[0] > 1 else 'gray'} slice in a "
                            f"{'colour' if slices[0].shape[0] > 1 else 'gray'} series ({geometry.files[0]}); "
                            "give a series of one kind")
    return np.stack(slices, axis=1), geometry


def _functional(ds, name: str, index: int):
    seq = getattr(ds, name, None)
    return seq[index] if seq is not None and len(seq) > index else None


def _enhanced_geometry(group, row, col, ps, path: str = ""):
    if group is None:
        return row, col, ps
    orient = getattr(group, "PlaneOrientationSequence", None)
    cos = _numbers(orient[0], "ImageOrientationPatient", 6, path) if orient else None
    if cos is not None:
        row, col = cos[:3], cos[3:]
    measures = getattr(group, "PixelMeasuresSequence", None)
    spacing = _numbers(measures[0], "PixelSpacing", 2, path) if measures else None
    if spacing is not None:
        ps = spacing
    return row, col, ps


def _per_frame_geometry(ds, path: str, row, col, ps):
    """Orientation and pixel spacing stored per frame (some scanners do), which must agree across frames."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []
    found = [_enhanced_geometry(item, row, col, ps, path) for item in per_frame]
    if not found:
        return row, col, ps
    first = np.concatenate([np.asarray(v, dtype=np.float64) for v in found[0]])
    for k, values in enumerate(found[1:], start=2):
        if not np.allclose(np.concatenate([np.asarray(v, dtype=np.float64) for v in values]), first, atol=1e-4):
            raise DataError(f"{path}: frame {k} has another orientation or pixel spacing than frame 1, so the "
                            "frames are not one volume; split them into one series per orientation")
    return found[0]


def _frame_positions(ds, frames: int, path: str = "") -> np.ndarray | None:
    """Per-frame ImagePositionPatient of an enhanced multi-frame image, or None."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if not per_frame or len(per_frame) != frames:
        return None
    positions = []
    for item in per_frame:
        seq = getattr(item, "PlanePositionSequence", None)
        if not seq:
            return None
        position = _numbers(seq[0], "ImagePositionPatient", 3, path)
        if position is None:
            return None
        positions.append(position)
    return np.array(positions)


def _frame_geometry(geometry: SeriesGeometry) -> dict[str, Any]:
    """highdicom plane keywords for a multi-frame source, from our geometry (frames in file order)."""
    import highdicom as hd

    lps = LPS_TO_RAS @ geometry.affine  # the flip is its own inverse
    col_spacing, row_spacing = geometry.spacing[2], geometry.spacing[1]
    row_cos, col_cos = lps[:3, 2] / col_spacing, lps[:3, 1] / row_spacing
    positions: list[Any] = [None] * geometry.shape[0]
    for k, frame in enumerate(geometry.frames):
        point = lps @ np.array([k, 0.0, 0.0, 1.0])
        positions[frame] = hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                    [float(v) for v in point[:3]])
    return {
        "plane_positions": positions,
        "plane_orientation": hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                                         [float(v) for v in (*row_cos, *col_cos)]),
        "pixel_measures": hd.PixelMeasuresSequence([row_spacing, col_spacing], geometry.spacing[0]),
    }


def _place_in_space(ds: Any, spatial: dict[str, Any]) -> None:
    """Give a multi-frame source with no place in space (a secondary capture, an ultrasound clip: no position
    at all) the derived one of :func:`_frame_geometry`, in memory, where highdicom looks for it: a position and
    orientation at the top and the functional groups of an enhanced image. highdicom builds a SEG of several
    frames only in a patient coordinate system; the SEG's frames still name their source frames."""
    from pydicom.dataset import Dataset

    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if "ImagePositionPatient" in ds or any("PlanePositionSequence" in item for item in per_frame):
        return
    ds.ImagePositionPatient = list(spatial["plane_positions"][0][0].ImagePositionPatient)
    ds.ImageOrientationPatient = list(spatial["plane_orientation"][0].ImageOrientationPatient)
    if "SharedFunctionalGroupsSequence" not in ds and not per_frame:
        shared = Dataset()
        shared.PixelMeasuresSequence = spatial["pixel_measures"]
        shared.PlaneOrientationSequence = spatial["plane_orientation"]
        ds.SharedFunctionalGroupsSequence = [shared]
        frames = []
        for position in spatial["plane_positions"]:
            item = Dataset()
            item.PlanePositionSequence = position
            frames.append(item)
        ds.PerFrameFunctionalGroupsSequence = frames


def _plane_where_read(ds: Any, thickness: float) -> None:
    """Copy the orientation and pixel spacing that only the frames of ``ds`` state (the first frame that states
    them: they agree, the reader checked) to where highdicom looks for them, in memory: the shared functional
    groups of a multi-frame image (into shared groups that lack them, too), and the top level of one whose class
    has no functional groups; shared pixel measures without a slice thickness, which highdicom needs, get
    ``thickness`` (the slice step)."""
    import copy

    from pydicom.dataset import Dataset

    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = _functional(ds, "SharedFunctionalGroupsSequence", 0)
    for seq_name, keyword in (("PlaneOrientationSequence", "ImageOrientationPatient"),
                              ("PixelMeasuresSequence", "PixelSpacing")):
        # the first frame that states it (a frame that does not falls back on the top level, which agrees)
        stated = next((item[seq_name] for item in per_frame if item.get(seq_name) and keyword in item[seq_name][0]),
                      None)
        value = stated[0][keyword].value if stated else ds.get(keyword)
        if stated is not None and keyword not in ds:
            setattr(ds, keyword, copy.deepcopy(value))
        if shared is not None and shared.get(seq_name):
            if value is not None and keyword not in shared[seq_name][0]:  # shared without it (a thickness alone)
                setattr(shared[seq_name][0], keyword, copy.deepcopy(value))
            continue
        if stated is None:
            continue  # at the top level alone, or nowhere: nothing to share
        if shared is None:
            shared = Dataset()
            ds.SharedFunctionalGroupsSequence = [shared]
        setattr(shared, seq_name, copy.deepcopy(stated))
    measures = shared.get("PixelMeasuresSequence") if shared is not None else None
    if measures and "PixelSpacing" in measures[0] and not str(measures[0].get("SliceThickness", "") or "").strip():
        measures[0].SliceThickness = f"{thickness:.6g}"


def _reference_source_frames(seg: Any, source: Any, positions: list[Any]) -> None:
    """Name, in each frame of ``seg`` that names none, the frame of the multi-frame ``source`` it segments.

    highdicom references source frames by their own plane positions; a multi-frame file without per-frame
    positions gets the ones :func:`_frame_geometry` derives (``positions``, in the file's frame order), and
    its SEG frames then referenced nothing, leaving viewers only those derived positions to align them by.
    """
    from pydicom.dataset import Dataset

    def code(value: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        return item

    def key(point: Any) -> tuple[str, ...]:  # the values as written (highdicom copies them): exact
        return tuple(str(v) for v in point)

    keys = [key(p[0].ImagePositionPatient) for p in positions]
    frame_of = {k: number for number, k in enumerate(keys, start=1) if keys.count(k) == 1}  # repeated: unknown
    for item in seg.PerFrameFunctionalGroupsSequence:
        number = frame_of.get(key(item.PlanePositionSequence[0].ImagePositionPatient))
        if item.get("DerivationImageSequence") or number is None:
            continue
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        ref.ReferencedFrameNumber = number
        ref.SpatialLocationsPreserved = "YES"
        ref.PurposeOfReferenceCodeSequence = [code("121322", "Source image for image processing operation")]
        derivation = Dataset()
        derivation.SourceImageSequence = [ref]
        derivation.DerivationCodeSequence = [code("113076", "Segmentation")]
        item.DerivationImageSequence = [derivation]


#: Patient/study attributes a SEG copies from its source; type 2 (may be empty) but often missing.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_CHECKED_COPIED = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")  # highdicom parses these


def _valid_copied(keyword: str, value: Any) -> bool:
    """Whether ``value`` of an attribute a SEG copies and highdicom parses is one it can: a DA (``YYYYMMDD``),
    a TM (``HHMMSS.FFFFFF``, leading parts), PatientSex (``M``, ``F``, ``O``); empty is valid."""
    text = str(value or "").strip()
    if not text:
        return True
    if keyword == "PatientSex":
        return text in ("M", "F", "O")
    if keyword.endswith("Time"):
        found = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", text)
        return bool(found) and int(found[1]) < 24 and int(found[2] or 0) < 60 and int(found[3] or 0) < 61 \
            and not (found[4] and not found[3])
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
        return len(text) == 8
    except ValueError:
        return False


def _usable_charset(ds: Any) -> None:
    """Give ``ds`` a SpecificCharacterSet a SEG can carry: the common variants written as the standard spells
    them (an empty first value of a code-extension list is ``ISO 2022 IR 6``, lower case, a single-byte set
    named in its code-extension form), the default repertoire as no value, and anything else that highdicom
    refuses replaced by UTF-8 (``ISO_IR 192``) once the text values are decoded with the file's own set."""
    import highdicom as hd

    if "SpecificCharacterSet" not in ds:
        return
    terms = [str(t).strip().upper() for t in _values(ds.SpecificCharacterSet)]
    if len(terms) > 1 and not terms[0]:
        terms[0] = "ISO 2022 IR 6"
    if len(terms) == 1 and terms[0].startswith("ISO 2022 IR ") and terms[0] != "ISO 2022 IR 6":
        terms = [terms[0].replace("ISO 2022 IR ", "ISO_IR ")]
    if terms in ([], [""], ["ISO_IR 6"], ["ISO 2022 IR 6"]):
        del ds.SpecificCharacterSet  # the default repertoire
        return
    try:
        for term in terms:
            hd.enum.SpecificCharacterSetValues(term)
    except ValueError:
        terms = ["ISO_IR 192"]
    ds.decode()  # text values as the file's own set reads them, before the set they are written in changes
    ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]


def write_seg(
    path: str | os.PathLike,
    mask: np.ndarray,
    geometry: SeriesGeometry,
    *,
    segment_label: str = "foreground",
    algorithm: str = "medseg",
    algorithm_version: str = "0",
) -> Path:
    """Write a binary DICOM SEG for ``mask`` ``(Z, Y, X)`` that references its source series, atomically.

    Args:
        path: output ``.dcm`` file.
        mask: nonzero = segment; slices in the spatial order of ``geometry`` (as :func:`read_series` gives).
        geometry: the source series' geometry from :func:`series_geometry`.
        segment_label: the segment's label shown by viewers.
        algorithm: the algorithm's name (the bundle) recorded in the SEG.
        algorithm_version: its version.

    Raises:
        DataError: highdicom cannot build a SEG for this source (the message names the first source file).
    """
    from medseg.io import atomic_output

    seg = _build_seg(mask, geometry, segment_label, algorithm, algorithm_version)
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


def check_seg(geometry: SeriesGeometry, *, segment_label: str = "foreground", algorithm: str = "medseg",
              algorithm_version: str = "0") -> None:
    """Build (and drop) an empty SEG for the series of ``geometry``, so that a series no SEG can be built for is
    refused before its slices are segmented rather than after: what stops a SEG is in the source's attributes.

    Raises:
        DataError: as :func:`write_seg` would.
    """
    _build_seg(np.zeros(geometry.shape, dtype=bool), geometry, segment_label, algorithm, algorithm_version,
               say=False)


def _build_seg(mask: np.ndarray, geometry: SeriesGeometry, segment_label: str, algorithm: str,
               algorithm_version: str, say: bool = True) -> Any:
    """The ``highdicom`` SEG of :func:`write_seg`; ``say``: warn about source values it leaves empty."""
    import warnings

    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from medseg import __version__

    mask = np.asarray(mask) > 0
    if mask.shape != geometry.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the series shape {geometry.shape}")
    spatial: dict[str, Any] = {}
    if len(set(geometry.files)) == 1:  # one (multi-frame) source: frames in the file's own order
        sources = [_read(geometry.files[0], pixels=True)]
        _plane_where_read(sources[0], geometry.spacing[0])
        pixel_array = np.zeros_like(mask)
        pixel_array[list(geometry.frames)] = mask
        if mask.shape[0] > 1:
            spatial = _frame_geometry(geometry)
            own = _frame_positions(sources[0], mask.shape[0])
            if own is not None:  # each frame where its source frame says it is, not on the even grid
                spatial["plane_positions"] = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                                       [float(v) for v in p]) for p in own]
            _place_in_space(sources[0], spatial)
    else:
        sources = [_read(p, pixels=True) for p in geometry.files]
        for ds in sources[1:]:  # one orientation to within 1e-4, as the reader took them; highdicom wants equality
            if "ImageOrientationPatient" in ds and "ImageOrientationPatient" in sources[0]:
                ds.ImageOrientationPatient = sources[0].ImageOrientationPatient
        pixel_array = mask
    emptied: dict[str, str] = {}
    for ds in sources:  # anonymised exports often drop type-2 attributes that a SEG must copy (empty is valid)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
            elif keyword in _CHECKED_COPIED and not _valid_copied(keyword, ds[keyword].value):
                value = str(ds[keyword].value).strip()
                # ACR-NEMA's 2024.02.29 and 10:15:30, a lower-case sex: the same value in today's form
                modern = value.upper() if keyword == "PatientSex" else value.replace(".", "") \
                    if keyword.endswith("Date") else value.replace(":", "")
                if _valid_copied(keyword, modern):
                    setattr(ds, keyword, modern)
                else:
                    emptied.setdefault(keyword, value)  # a SEG cannot carry it as it is
                    setattr(ds, keyword, "")
        _usable_charset(ds)
        if not str(getattr(ds, "SliceThickness", "") or "").strip():  # highdicom reads it of non-enhanced classes
            ds.SliceThickness = f"{geometry.spacing[0]:.6g}"  # the slice step stands in for a missing thickness
        if not str(getattr(ds, "FrameOfReferenceUID", "") or "").strip():  # required by SEG: a stable one
            ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["medseg-frame-of-reference", geometry.series_uid])
        if not str(getattr(ds, "Modality", "") or "").strip():
            ds.Modality = "OT"  # other: a SEG's series needs its source's modality
        if "PerFrameFunctionalGroupsSequence" not in ds and not str(getattr(ds, "PixelSpacing", "") or "").strip():
            ds.PixelSpacing = [f"{geometry.spacing[1]:.6g}", f"{geometry.spacing[2]:.6g}"]  # as read (1 mm unknown)
        if not str(getattr(ds, "StudyInstanceUID", "") or "").strip():
            raise DataError(f"{geometry.files[0]}: no StudyInstanceUID, which a SEG must share with its source; "
                            "use --format nifti")
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):  # highdicom blames "series or dimensions"
        for k, ds in enumerate(sources[1:], start=1):
            if str(getattr(ds, keyword, "")) != str(getattr(sources[0], keyword, "")):
                raise DataError(f"{geometry.files[k]}: its {keyword} differs from {geometry.files[0]}'s, so the "
                                "series' slices are not one study and space, which a SEG needs; use --format nifti")
    if emptied and say:
        many = len(emptied) > 1
        logging.getLogger(__name__).warning(
            "%s: %s %s not a valid DICOM value; the SEG leaves %s empty", geometry.files[0],
            ", ".join(f"{k} {v!r}" for k, v in emptied.items()), "are" if many else "is", "them" if many else "it")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label[:64],
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Cell if "cell" in segment_label.lower() else codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm[:64], version=str(algorithm_version)[:64], family=codes.DCM.ArtificialIntelligence
        ),
    )
    number = series_number(sources[0])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*person name.*")  # source names are copied as they are
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[description],
                series_instance_uid=hd.UID(),
                series_number=number + 1000 if number is not None and 0 <= number <= 2**31 - 1 - 1000 else 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=algorithm[:64],
                software_versions=__version__,
                device_serial_number="0",
                series_description=f"{algorithm} segmentation"[:64],
                omit_empty_frames=False,
                **spatial,
            )
    except (ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{geometry.files[0]}: cannot build a DICOM SEG for this series ({err}); "
                        "use --format nifti") from err
    if spatial:
        _reference_source_frames(seg, sources[0], spatial["plane_positions"])
    if mask.shape[0] == 1:  # highdicom says 1 mm between the slices of one: the step the NIfTI outputs are given
        for measures in getattr(seg.SharedFunctionalGroupsSequence[0], "PixelMeasuresSequence", None) or []:
            if "SpacingBetweenSlices" in measures:
                measures.SpacingBetweenSlices = f"{geometry.spacing[0]:.6g}"
    return seg
