"""The image contract: every supported format read as a channel-first array plus metadata, as MONAI ImageReaders.

Contract (pinned by ``tests/test_readers.py``)
----------------------------------------------
``read_image(source)`` returns ``(array, meta)``:

* ``array`` is channel first. 2D images (PNG, single-page TIFF) are ``(C, Y, X)``; volumes (TIFF stacks,
  NIfTI, NRRD, MetaImage, DICOM) are ``(C, Z, Y, X)``, Z being the slice axis a 2D model runs over: the TIFF
  page axis, the third voxel axis (k) of NIfTI, NRRD and MetaImage, DICOM slices ordered along the slice
  normal. Y is rows (top to bottom as stored), X columns. C is 1 for gray, 3 for RGB (alpha dropped, CMYK
  converted; a gray TIFF page whose extra sample is marked unspecified rather than alpha gives 2, the sample
  kept as data; a palette PNG gives its colours, a palette TIFF its values, its colour table being a display
  LUT; colour DICOM, PALETTE COLOR included, its colours, YBR converted to RGB), a configured NIfTI channel
  axis, or the values of a NRRD or MetaImage voxel.
  Values: the file's own dtype for PNG/TIFF/NIfTI/NRRD/MetaImage (1-bit PNG and TIFF as uint8 0 and 255;
  NIfTI ``scl_slope``/``scl_inter`` applied; NRRD and MetaImage int8 as int16 and 64-bit integers as float64,
  which ITK's Python reads), float32 after
  RescaleSlope/Intercept for DICOM (CT in Hounsfield units).
* ``meta`` holds ``format``, ``source`` (the path), ``affine`` (4x4, RAS world coordinates of the array's own
  spatial index order (z, y, x) or (y, x); MONAI's ``MetaTensor`` convention), ``spacing`` (per spatial axis,
  same order), ``spacing_unit`` (``mm``, ``um`` or ``pixel``), ``spatial_shape``, ``original_channel_dim``
  (0), ``slice_count`` and format extras: NIfTI ``nifti_affine`` and ``nifti_shape`` (the file's own);
  DICOM ``series_uid``, ``files`` and ``sop_uids`` (one per slice, in array order) and
  ``pixel_size_stated`` (False where no usable pixel spacing is given); TIFF ``axes``, and for a stack
  ``lead_sizes`` (the slices' axes with their sizes, e.g. ``(("T", 5), ("Z", 12))``), ``frame_interval``
  (the time step and its unit, where given) and ``ome`` (True for an OME-TIFF).

``read_slice(source, k)`` gives slice ``k`` as ``(C, Y, X)`` without loading the whole volume where the
format allows it (TIFF pages, DICOM files, uncompressed NIfTI), so stacks larger than memory are segmented
slice by slice. ``count_slices`` says how many there are.

The readers are :class:`monai.data.ImageReader` subclasses, so bundles use them through ``LoadImage(d)``:
``{"_target_": "LoadImaged", "keys": "image", "reader": "medseg.readers.TiffReader"}``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader

from medseg.dicom import DICOM_SUFFIXES
from medseg.errors import DataError, brief

#: File suffix -> format name. DICOM files may also have no suffix (sniffed by content).
SUFFIXES: dict[str, str] = {
    ".png": "png",
    ".bmp": "png",  # other 2D formats Pillow reads go through the PNG reader (and give PNG masks)
    ".jpg": "png",  # images only: a JPEG mask is refused (LOSSY_SUFFIXES)
    ".jpeg": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "itk",  # NRRD (3D Slicer's own) and MetaImage, read through ITK
    ".nhdr": "itk",
    ".mha": "itk",
    ".mhd": "itk",
    **dict.fromkeys(DICOM_SUFFIXES, "dicom"),
}


#: The most pixels one slice may have unless ``MEDSEG_MAX_PIXELS`` says otherwise: Pillow's own
#: decompression-bomb limit (about 13,400²), so that a small corrupt or malicious file cannot take all memory.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


def max_pixels() -> int:
    """The most pixels (height × width) one slice may have: ``MEDSEG_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    value = os.environ.get("MEDSEG_MAX_PIXELS", "").strip().replace("_", "")
    if not value:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"MEDSEG_MAX_PIXELS={value!r}: give a whole number of pixels, e.g. 400000000")
    return int(value)


def check_plane(path: str | os.PathLike, height: int, width: int) -> None:
    """Refuse a slice of more than :func:`max_pixels` pixels before it is read."""
    limit = max_pixels()
    if height * width > limit:
        raise DataError(f"{path}: one slice of {height} × {width} = {height * width:,} pixels, over the {limit:,} "
                        "read at once (a guard against corrupt or malicious files); cut the image into tiles, or "
                        "set MEDSEG_MAX_PIXELS to a larger number if the machine has the memory")


def check_volume(path: str | os.PathLike, shape: Sequence[int], itemsize: int, fix: str) -> None:
    """Refuse a volume that must be read whole (a compressed file) when it is larger than this machine's
    memory: a corrupt header, or a file to be saved so that it can be read slice by slice (``fix``)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on every system
        return
    if memory <= 0:  # unknown (-1)
        return
    size = int(np.prod([int(n) for n in shape], dtype=np.float64)) * int(itemsize)
    if size > memory:
        raise DataError(f"{path}: {' × '.join(str(int(n)) for n in shape)} values ({size / 2**30:.1f} GiB) must be "
                        f"read whole, more than this machine's memory ({memory / 2**30:.1f} GiB); if the header "
                        f"is right, {fix}")


_PILLOW_LIMIT = threading.Lock()


def open_picture(path: str | os.PathLike):
    """``PIL.Image.open(path)`` with :func:`max_pixels` as the limit in place of Pillow's own (both are
    checked from the header, before any pixel is decoded)."""
    from PIL import Image

    limit = max_pixels()
    try:
        with _PILLOW_LIMIT:  # Pillow's limit is the process's: set aside for this open only
            before = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # ours decides, below, from the header (no warning below it)
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = before
    except Image.DecompressionBombError:
        raise DataError(f"{path}: more than the {limit:,} pixels read at once (a guard against corrupt or malicious "
                        "files); cut the image into tiles, or set MEDSEG_MAX_PIXELS to a larger number if the "
                        "machine has the memory") from None
    if im.size[0] * im.size[1] > limit:
        im.close()
        check_plane(path, im.size[1], im.size[0])
    return im


#: Image types that cannot hold masks (lossy, or at best 8-bit palette): named when met among masks.
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif")


#: The first bytes of the formats a file may hold under another format's suffix
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG", ".png"), (b"\xff\xd8\xff", "a JPEG", ".jpg"), (b"BM", "a BMP", ".bmp"),
          (b"II*\x00", "a TIFF", ".tif"), (b"MM\x00*", "a TIFF", ".tif"), (b"II+\x00", "a BigTIFF", ".tif"),
          (b"\x1f\x8b", "gzip-compressed", ".nii.gz"))


def _content_hint(path: str | os.PathLike, expected: str) -> str:
    """``; it is a PNG file: rename it to .png`` when ``path``'s first bytes are another format's than ``expected``
    (``"tiff"``, ``"nifti"``, ``"picture"`` or ``"dicom"``: a suffix that does not fit the content), else ``""``."""
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError:
        return ""
    if head[128:132] == b"DICM":  # before the magics: a preamble may start as a TIFF's header does
        return "" if expected == "dicom" else "; it is a DICOM file: rename it to .dcm"
    nifti = _is_nifti(head)
    if nifti and expected != "nifti":
        return "; it is a NIfTI file: rename it to .nii"
    if expected == "nifti" and nifti and str(path).lower().endswith(".gz"):
        return "; it is an uncompressed NIfTI named .nii.gz: rename it to .nii"
    for magic, what, suffix in _MAGIC:
        if not head.startswith(magic) or (expected == "tiff" and "TIFF" in what) or \
                (expected == "picture" and suffix != ".nii.gz"):  # Pillow reads these by content: a broken one
            continue
        if suffix != ".nii.gz":
            return f"; it is {what} file: rename it to {suffix}"
        if expected != "nifti":
            import gzip

            try:
                with gzip.open(path, "rb") as f:
                    inner = f.read(352)
            except (OSError, EOFError):
                inner = b""
            return "; it is a gzip-compressed NIfTI: rename it to .nii.gz" if _is_nifti(inner) else \
                "; it is gzip-compressed: decompress it"
        return "" if str(path).lower().endswith(".gz") else "; it is gzip-compressed: rename it to .nii.gz"
    return ""


def _or_corrupt(path: str | os.PathLike, expected: str,
                otherwise: str = "; the file may be truncated or corrupt") -> str:
    """The end of a "cannot read" error: :func:`_content_hint`'s fix when the file is of another format, else
    ``otherwise``."""
    return _content_hint(path, expected) or otherwise


def _is_nifti(head: bytes) -> bool:
    """True when ``head`` (a file's first 352 bytes) is a single-file NIfTI-1 or NIfTI-2 header, of either byte
    order."""
    return (len(head) >= 348 and head[344:348] == b"n+1\x00") or head[4:8] == b"n+2\x00"


def lossy_mask_error(path: str | os.PathLike, kind: str = "mask") -> DataError:
    """The error for a mask in one of :data:`LOSSY_SUFFIXES`, naming the file and the fix."""
    suffix = Path(path).suffix
    why = ("JPEG compression changes the values at every edge" if suffix.lower() in (".jpg", ".jpeg", ".jpe", ".jfif")
           else "the format does not keep exact values")
    return DataError(f"{path}: a {suffix} {kind}; {why}: save the masks as PNG or TIFF")


def suffix_of(path: str | os.PathLike) -> str:
    """The format-bearing suffix of ``path`` (``.nii.gz`` counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def format_of(path: str | os.PathLike) -> str:
    """The format of a file or folder: by suffix, DICOM by its preamble, a folder as a DICOM series.

    Raises:
        DataError: the type is not supported (the message lists the supported suffixes).
    """
    from medseg.dicom import is_dicom_file

    path = Path(path)
    if path.is_dir():
        return "dicom"
    fmt = SUFFIXES.get(suffix_of(path))
    if fmt is None and path.is_file() and is_dicom_file(path):
        fmt = "dicom"
    if fmt is None and path.name.upper() == "DICOMDIR":
        raise DataError(f"{path}: a DICOMDIR is the index of a DICOM medium, not an image; give the folder that "
                        "holds it, whose series are found by themselves")
    if fmt is None:
        supported = ", ".join(sorted(set(SUFFIXES)))
        raise DataError(f"{path}: unsupported file type '{suffix_of(path) or '(none)'}'; supported: {supported} "
                        "and DICOM files without a suffix")
    return fmt


#: The file types read through another format's reader, by suffix: what an input is, for the records of a run
_KINDS = {".bmp": "bmp", ".jpg": "jpeg", ".jpeg": "jpeg", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage",
          ".mhd": "metaimage"}


def kind_of(path: str | os.PathLike, fmt: str) -> str:
    """The kind of an input of format ``fmt`` (:func:`format_of`) as a user names it: ``jpeg`` and ``bmp``
    for the pictures the PNG reader takes, ``nrrd`` and ``metaimage`` for ITK's formats, else ``fmt``."""
    return _KINDS.get(suffix_of(Path(path)), fmt) if fmt in ("png", "itk") else fmt


def _meta(fmt: str, source: str, spatial: tuple[int, ...], affine: np.ndarray, spacing: Sequence[float],
          unit: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": fmt,
        "source": source,
        "affine": np.asarray(affine, dtype=np.float64),
        "original_affine": np.asarray(affine, dtype=np.float64),
        "spacing": np.asarray(spacing, dtype=np.float64),
        "spacing_unit": unit,
        "spatial_shape": np.asarray(spatial),
        "original_channel_dim": 0,
        "slice_count": spatial[0] if len(spatial) == 3 else 1,
        **extra,
    }


def _series_extra(geometry: Any) -> dict[str, Any]:
    """The metadata a DICOM series adds: its UID, its files and SOP instances per slice, and for slices stacked
    at a tilt the affine of the stack straight (``straight_affine``, RAS for (z, y, x), as ``affine``), and
    ``pixel_size_stated`` False where the headers give no usable pixel size (``spacing`` then holds 1 mm)."""
    extra: dict[str, Any] = {"series_uid": geometry.series_uid, "files": list(geometry.files),
                             "sop_uids": list(geometry.sop_uids), "pixel_size_stated": bool(geometry.sized)}
    if geometry.straight is not None:
        extra["straight_affine"] = np.asarray(geometry.straight, dtype=np.float64)
    return extra


def _scaled_affine(spacing: Sequence[float]) -> np.ndarray:
    """Affine of a raster without world position: spacing along the (z,) y, x index axes."""
    affine = np.eye(4)
    for i, s in enumerate(spacing):
        affine[i, i] = s
    return affine


class _MedsegReader(ImageReader):
    """Shared plumbing: one source per call, ``get_data`` passes the (array, meta) pair through."""

    format: str = ""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and SUFFIXES.get(suffix_of(names[0])) == self.format

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> tuple[np.ndarray, dict]:
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) != 1:
            raise DataError(f"{names[0]}: {type(self).__name__} reads one source at a time, got {len(names)}")
        return self.read_source(str(names[0]))

    def separate_channels(self, path: str) -> bool:
        """Whether the channels of a slice of ``path`` are separate images (fluorescence stains, volumes), not
        the colours of one picture (RGB samples)."""
        return False

    def get_data(self, img: tuple[np.ndarray, dict]) -> tuple[np.ndarray, dict]:
        return img

    # the per-format part
    def read_source(self, path: str) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def count_slices(self, path: str) -> int:
        raise NotImplementedError

    def read_slice(self, path: str, index: int) -> np.ndarray:
        raise NotImplementedError

    def read_meta(self, path: str) -> dict:
        """The metadata of :meth:`read_source` without reading the voxels."""
        raise NotImplementedError


def _channels_first_2d(arr: np.ndarray, path: str = "") -> np.ndarray:
    """``(H, W)`` or ``(H, W, S)`` to ``(C, H, W)``, dropping an alpha sample."""
    if arr.ndim == 2:
        return arr[None]
    arr = np.moveaxis(arr, -1, 0)
    return _without_alpha(arr, path) if arr.shape[0] in (2, 4) else arr  # gray+alpha or RGBA


def _without_alpha(arr: np.ndarray, path: str) -> np.ndarray:
    """Channel-first samples less the last, an alpha channel.

    Raises:
        DataError: only the alpha channel varies (a mask exported from an overlay keeps its labels there):
            dropping it would leave a blank picture, a mask without any object.
    """
    colour, alpha = arr[:-1], arr[-1]
    if colour.size and alpha.min() != alpha.max() and colour.min() == colour.max():
        raise DataError(f"{path}: only its alpha (transparency) channel varies, and alpha is dropped on reading, "
                        f"which would leave every pixel {colour.flat[0]}; save the alpha channel as a gray image")
    return colour


def _page_channels_first(page, path: str = "") -> np.ndarray:
    """A TIFF page as ``(C, Y, X)``: contiguous (``YXS``) or planar (``SYX``) samples, alpha dropped, CMYK
    converted to RGB."""
    arr, axes = page.asarray(), page.axes
    if "S" not in axes:
        arr = arr.reshape(1, *arr.shape[-2:])
    else:
        arr = np.moveaxis(arr, axes.index("S"), 0)
    return _resolve_photometric(arr, page, path)


def _resolve_photometric(arr: np.ndarray, page, path: str) -> np.ndarray:
    """Channel-first samples of a TIFF ``page``'s kind as gray or RGB: CMYK converted, alpha dropped.

    A palette page keeps its values: in microscopy the colour table is a display LUT (ImageJ saves an 8-bit
    image shown in Green or Fire that way), and the values are the measurement.
    """
    page = getattr(page, "keyframe", None) or page  # later pages of a series are frames of the first one's kind
    if arr.dtype == bool:  # 1-bit: 0 and 255, as a 1-bit PNG reads (a mask's values then mean the same in both)
        return arr.astype(np.uint8) * np.uint8(255)
    if int(getattr(page, "photometric", 1)) == 5:  # separated: CMYK when InkSet is 1 (the default)
        inkset = page.tags.get("InkSet")
        if (inkset is not None and int(inkset.value) != 1) or arr.shape[0] not in (4, 5) or \
                arr.dtype not in (np.uint8, np.uint16):
            raise DataError(f"{path}: TIFF with {arr.shape[0]} ink separations ({arr.dtype}); only 8/16-bit CMYK "
                            "is read: convert it to RGB first")
        top = float(np.iinfo(arr.dtype).max)
        cmy, k = arr[:3].astype(np.float64), arr[3].astype(np.float64)
        return np.rint((top - cmy) * (top - k) / top).astype(arr.dtype)
    if arr.shape[0] not in (2, 4):
        return arr
    extra = tuple(int(e) for e in getattr(page, "extrasamples", ()) or ())
    if extra and extra[-1] == 0 and int(getattr(page, "photometric", 1)) in (0, 1):
        return arr  # gray with an unspecified extra sample: a second channel (two stains), not transparency
    return _without_alpha(arr, path)


#: EXIF orientations (2-8) that swap the stored width and height when applied.
_EXIF_SWAPS = (5, 6, 7, 8)


def _exif_orientation(im) -> int:
    """The EXIF Orientation (1-8) of a Pillow image: 1 (as stored) when it has none or an invalid one."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block (Pillow raises many kinds) reads as none
        return 1
    return value if 1 <= value <= 8 else 1


def turned_size_hint(shape: tuple[int, ...], other_shape: tuple[int, ...], *paths: str | os.PathLike | None) -> str:
    """For an image and its mask whose sizes differ: when one is the other turned and one of ``paths`` (a PNG,
    JPEG or BMP; None ones skipped) is turned by its EXIF orientation on reading, a clause that says so and how
    to fix it; else ``""``."""
    if tuple(shape) != tuple(other_shape)[::-1]:
        return ""
    for path in paths:
        try:
            if path and suffix_of(path) in (".png", ".jpg", ".jpeg", ".bmp"):
                with open_picture(str(path)) as im:
                    if _exif_orientation(im) in _EXIF_SWAPS:
                        return (f"; {Path(path).name} is turned by its EXIF orientation, as viewers show it: "
                                "save the other file turned the same way, or this one without the tag")
        except (OSError, ValueError, DataError):
            continue
    return ""


def displayed(im):
    """``im`` as viewers show it: its EXIF orientation applied (cameras and phones store a portrait picture
    sideways with a tag that says so); masks are written in that orientation, without the tag. The pixels
    are turned directly (``ImageOps.exif_transpose`` also rewrites the EXIF block, and fails on one that is
    slightly damaged though its orientation reads)."""
    return _turned(im, _exif_orientation(im))


def _turned(im, orientation: int):
    """Pillow image ``im`` turned as the EXIF ``orientation`` (1-8) says it is shown."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return im if method is None else im.transpose(method)


def _png16_samples(path: str, samples: int) -> np.ndarray:
    """A 16-bit colour or gray+alpha PNG as ``(C, H, W)`` uint16, alpha dropped and its EXIF orientation applied.

    Pillow keeps 8 bits per channel of these, so ITK's PNG reader decodes them (into float32 vectors, which hold
    every 16-bit value exactly), after the size is checked from the header. libpng would shift the values of a
    file with an ``sBIT`` chunk (significant bits) down to those bits, so such a file is read from a copy
    without it: the stored values, as Pillow reads a 16-bit gray PNG.
    """
    import tempfile

    import itk

    with open_picture(path) as im:  # the pixel limit, before anything is decoded
        turn = _exif_orientation(im)
    source, copy = path, None
    try:
        plain = _without_chunk(Path(path).read_bytes(), b"sBIT")
        if plain is not None:
            try:
                handle, copy = tempfile.mkstemp(suffix=".png")
                with os.fdopen(handle, "wb") as tmp:
                    tmp.write(plain)
            except OSError as err:  # the temporary folder, not the picture
                raise DataError(f"{path}: cannot write the copy of it that is read without its sBIT chunk in "
                                f"{tempfile.gettempdir()} ({err.strerror or err}); free space there, or set TMPDIR "
                                "to a writable folder") from err
            source = copy
        arr = itk.array_from_image(itk.imread(source, pixel_type=itk.Vector[itk.F, samples]))
    except (RuntimeError, OSError) as err:  # ITK's text: "SOURCE:LINE: ITK ERROR: PNGImageIO(0x...): why"
        why = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", str(err).split("ITK ERROR:")[-1])
        for read in filter(None, (copy, str(path))):  # the input is named in front; a copy it read is no news
            why = why.replace(f": {read}", "").replace(read, "the file")
        raise DataError(f"{path}: cannot read the 16-bit PNG ({brief(why)}){_or_corrupt(path, 'picture')}") from err
    finally:
        if copy is not None:
            Path(copy).unlink(missing_ok=True)
    arr = _channels_first_2d(arr.astype(np.uint16), path)
    if turn == 1:
        return arr
    from PIL import Image

    return np.stack([np.asarray(_turned(Image.fromarray(np.ascontiguousarray(c)), turn)) for c in arr])


def _without_chunk(png: bytes, kind: bytes) -> bytes | None:
    """``png`` less its chunks of type ``kind``, or ``None`` when it has none (or its chunks cannot be walked:
    the reader names what is wrong)."""
    pos, kept, found = 8, [png[:8]], False
    while pos + 12 <= len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > len(png):
            return None
        if png[pos + 4:pos + 8] == kind:
            found = True
        else:
            kept.append(png[pos:end])
        if png[pos + 4:pos + 8] == b"IEND":
            break
        pos = end
    return b"".join(kept) if found else None


class PngReader(_MedsegReader):
    """PNG, BMP and JPEG via Pillow: 8/16-bit gray, RGB, RGBA (alpha dropped), palette (resolved to RGB),
    CMYK (converted to RGB); 16-bit colour PNG via ITK; an EXIF orientation is applied, as every viewer does."""

    format = "png"

    def _read2d(self, path: str) -> np.ndarray:
        from PIL import UnidentifiedImageError

        try:
            with open(path, "rb") as f:
                header = f.read(26)
            if header[:8] == b"\x89PNG\r\n\x1a\n" and len(header) < 26:
                raise DataError(f"{path}: PNG file ends after {len(header)} bytes; the file is truncated")
            if header[:8] == b"\x89PNG\r\n\x1a\n" and header[24] == 16 and header[25] in (2, 4, 6):
                return _png16_samples(path, {2: 3, 4: 2, 6: 4}[header[25]])
            with open_picture(path) as opened:
                im = displayed(opened)
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode == "CMYK":  # print JPEGs; 4 channels would otherwise pass for RGBA
                    im = im.convert("RGB")
                elif im.mode == "I":  # 16-bit gray opened as 32-bit by some Pillow versions
                    arr = np.asarray(im)
                    return _channels_first_2d(arr.astype(np.uint16) if arr.max(initial=0) < 65536 else arr)
                elif im.mode == "1":
                    im = im.convert("L")
                return _channels_first_2d(np.asarray(im), path)
        except FileNotFoundError as err:
            raise DataError(f"{path}: file not found") from err
        except PermissionError as err:
            raise DataError(f"{path}: cannot open the file (permission denied); check its permissions") from err
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: cannot read the image ({err}){_or_corrupt(path, 'picture')}") from err

    def read_source(self, path: str) -> tuple[np.ndarray, dict]:
        arr = self._read2d(path)
        return arr, _meta("png", path, arr.shape[1:], np.eye(4), (1.0, 1.0), "pixel")

    def read_meta(self, path: str) -> dict:
        from PIL import UnidentifiedImageError

        try:
            with open_picture(path) as im:
                width, height = im.size
                if _exif_orientation(im) in _EXIF_SWAPS:
                    width, height = height, width
        except (OSError, ValueError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: cannot read the image ({err}){_or_corrupt(path, 'picture')}") from err
        return _meta("png", path, (height, width), np.eye(4), (1.0, 1.0), "pixel")

    def count_slices(self, path: str) -> int:
        return 1

    def read_slice(self, path: str, index: int) -> np.ndarray:
        if index != 0:
            raise IndexError(f"{path}: a PNG has one slice, asked for {index}")
        return self._read2d(path)


class _ThreadEntries(OrderedDict):
    """One thread's kept files: closed when the thread ends and its local data goes (a loader's worker
    thread), not left to the garbage collector's warnings."""

    def __init__(self, close: Callable[[Any], None] | None) -> None:
        super().__init__()
        self._close = close

    def __del__(self) -> None:
        if self._close is None:
            return
        for key, entry in list(self.items()):
            try:
                if key[0] == os.getpid():
                    self._close(entry)
            except Exception:  # noqa: BLE001, S110 - at interpreter exit anything may be gone already
                pass


class _RecentFiles:
    """The last few files a reader opened, kept open so that reading a stack slice by slice costs one slice each.

    Entries are per process and per state of the file (size and modification time: a file rewritten since
    is read afresh, and its older entry dropped). With ``per_thread`` (file handles, whose position the
    threads of a data cache's pool must not share) each thread keeps its own entries, and only that thread
    drops (and closes) them, so no handle is closed under another thread's read. Beyond ``size`` entries
    the oldest is dropped.
    """

    def __init__(self, size: int = 8, close: Callable[[Any], None] | None = None, per_thread: bool = True) -> None:
        self.size, self.close, self.per_thread = size, close, per_thread
        self.local = threading.local()
        self.shared: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    def _items(self) -> OrderedDict[tuple, Any]:
        if not self.per_thread:
            return self.shared
        if not hasattr(self.local, "items"):
            self.local.items = _ThreadEntries(self.close)
        return self.local.items

    def clear(self) -> None:
        """Drop (and close) this thread's entries (all entries, when they are not per thread)."""
        items = self._items()
        with self.lock:
            own = [v for k, v in items.items() if k[0] == os.getpid()]
            items.clear()
        if self.close is not None:
            for entry in own:
                self.close(entry)

    def get(self, path: str, load: Callable[[], Any], variant: Any = None) -> Any:
        """The entry of ``path`` (and ``variant``, e.g. a reader setting that changes what ``load`` gives)."""
        stat = os.stat(path)
        name = (os.getpid(), os.path.abspath(path), variant)
        key = (*name, stat.st_size, stat.st_mtime_ns)
        items = self._items()
        with self.lock:
            if key in items:
                items.move_to_end(key)
                return items[key]
        value = load()
        with self.lock:
            dropped = [k for k in items if k[:3] == name]  # the same file as it was before
            items[key] = value
            while len(items) - len(dropped) > self.size:
                dropped.append(next(k for k in items if k not in dropped))
            old = [items.pop(k) for k in dropped if k[0] == os.getpid()]
            for k in dropped:
                items.pop(k, None)
        if self.close is not None:
            for entry in old:
                self.close(entry)
        return value


#: micrometres per unit, for the spatial units of OME-XML and ImageJ metadata
_MICROMETRES = {"pm": 1e-6, "å": 1e-4, "angstrom": 1e-4, "nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "μm": 1.0,
                "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "\\u00b5m": 1.0, "mm": 1e3,
                "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6, "inch": 25400.0,
                "in": 25400.0}


def _micrometres(unit: str) -> float | None:
    """Micrometres per ``unit`` (OME or ImageJ spelling), None for pixels or an unknown unit."""
    return _MICROMETRES.get(unit.strip().lower())


#: TIFF files whose left-out series were said (once per file, not per slice)
_SERIES_SAID: set[str] = set()


class TiffReader(_MedsegReader):
    """TIFF via tifffile: single images and multi-page stacks, 8/16-bit, float, RGB, OME/ImageJ axes.

    Axes ``Y`` and ``X`` are spatial; ``S`` (samples) or ``C`` (channels) become the channel axis; all other
    axes (``Z``, ``T``, ``Q``, ``I``, ...) are flattened, in order, into the slice axis. Slices are read page
    by page when each plane is stored as its own page(s).
    """

    format = "tiff"
    _recent = _RecentFiles(close=lambda tif: tif.close())

    def _open_kept(self, path: str):
        """An open ``TiffFile`` kept for the next slices of the same file (see :class:`_RecentFiles`)."""
        def load():
            tif = self._open(path)
            tif.pages.cache = True  # each page's header is parsed once, not at every slice
            return tif

        try:
            return self._recent.get(path, load)
        except FileNotFoundError as err:
            raise DataError(f"{path}: file not found") from err

    @staticmethod
    def _open(path: str):
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
        except FileNotFoundError as err:
            raise DataError(f"{path}: file not found") from err
        except PermissionError as err:
            raise DataError(f"{path}: cannot open the file (permission denied); check its permissions") from err
        except (OSError, ValueError, tifffile.TiffFileError) as err:
            raise DataError(f"{path}: cannot read TIFF ({err}){_or_corrupt(path, 'tiff')}") from err
        try:
            TiffReader._check_page_chain(path, tif)
        except BaseException:
            tif.close()
            raise
        return tif

    @staticmethod
    def _check_page_chain(path: str, tif) -> None:
        """Refuse a TIFF whose chain of pages breaks: tifffile stops at a bad next-page offset with a log line
        only, and the pages after it would be silently missing (2 slices of a 4-slice stack)."""
        import struct

        count = len(tif.pages)  # indexes every page, stopping where the chain breaks
        if not count:
            return  # an empty file: said where its layout is read
        header = tif.tiff
        try:
            fh = tif.filehandle
            fh.seek(tif.pages[-1].offset)
            tags = struct.unpack(header.tagnoformat, fh.read(header.tagnosize))[0]
            fh.seek(tif.pages[-1].offset + header.tagnosize + tags * header.tagsize)
            following = struct.unpack(header.offsetformat, fh.read(header.offsetsize))[0]
        except (OSError, struct.error, ValueError):
            following = -1  # the last page's own header is cut short
        if following != 0:
            raise DataError(f"{path}: the TIFF's pages cannot all be read (the link after page {count} is broken); "
                            "the file is truncated or corrupt, so save it again")

    @staticmethod
    def _layout(path: str, tif) -> tuple[tuple[int, ...], str, list[int], int | None]:
        """(shape, axes, lead axis positions, channel axis position or None) of the first series."""
        if not len(tif.pages):
            raise DataError(f"{path}: TIFF holds no images (no pages)"
                            f"{_or_corrupt(path, 'tiff', '; the file is empty or truncated')}")
        try:
            series = tif.series[0]
        except (IndexError, ValueError, OSError) as err:
            raise DataError(f"{path}: cannot read TIFF ({err or 'no image data'}); the file may be truncated or "
                            "corrupt") from err
        shape, axes = tuple(series.shape), series.axes
        listed = int((tif.imagej_metadata or {}).get("images", 1) or 1) if tif.is_imagej else 1
        planes = int(np.prod([n for n, a in zip(shape, axes, strict=True) if a not in "YXS"]))
        if listed > planes:  # tifffile falls back to the pages it finds, with a warning only
            raise DataError(f"{path}: its ImageJ description lists {listed} images but the file holds {planes}; "
                            "the file is truncated or corrupt, so save it again")
        if len(tif.series) > 1 and all(s.shape == series.shape and s.axes == axes for s in tif.series):
            shape, axes = (len(tif.series), *shape), "Q" + axes  # pages written as separate series
        elif len(tif.series) > 1 and path not in _SERIES_SAID:  # pages of other sizes or types: not read
            _SERIES_SAID.add(path)
            others = ", ".join(f"{'×'.join(map(str, s.shape))} {s.dtype}" for s in tif.series[1:4])
            logging.getLogger(__name__).warning(
                "%s: holds %d series of different shapes; only the first (%s %s) is read, the others (%s%s) are "
                "left out: save each as its own file to segment it", path, len(tif.series),
                "×".join(map(str, series.shape)), series.dtype, others, ", ..." if len(tif.series) > 4 else "")
        if "Y" not in axes or "X" not in axes:
            raise DataError(f"{path}: TIFF has axes '{axes}', expected spatial axes Y and X")
        channel = next((i for i, a in enumerate(axes) if a in "SC"), None)
        if sum(a in "SC" for a in axes) > 1:
            raise DataError(f"{path}: TIFF has both sample and channel axes ('{axes}'); split the channels first")
        lead = [i for i, a in enumerate(axes) if a not in "YXSC"]
        return shape, axes, lead, channel

    @staticmethod
    def _frame_interval(tif) -> tuple[float, str] | None:
        """The time between frames of a time series and its unit: OME's ``TimeIncrement`` (seconds when no
        unit is given, as OME's schema says) or ImageJ's ``finterval`` and ``tunit`` (seconds when not
        given); None when the file states none."""
        import re

        ij = tif.imagej_metadata or {}
        ome = tif.ome_metadata or ""
        step = re.search(r'TimeIncrement="([^"]*)"', ome)
        step_unit = re.search(r'TimeIncrementUnit="([^"]*)"', ome)
        given = (step.group(1), step_unit.group(1) if step_unit else "s") if step else \
            (ij.get("finterval", 0), ij.get("tunit", "sec"))
        try:
            value = float(given[0] or 0)
        except (TypeError, ValueError):
            return None
        unit = str(given[1] or "sec").replace("µ", "u").replace("\u03bc", "u")  # µs: us
        # written back into a TIFF description, which is ASCII: another unit is one we cannot keep
        return (value, unit) if 0 < value < 1e30 and unit.isascii() and unit.isprintable() else None

    def _spacing(self, tif) -> tuple[tuple[float, float, float], str]:
        """(z, y, x) spacing in micrometres from OME PhysicalSize* (with their units), ImageJ's unit and
        spacing, or the resolution tags; ``pixel`` for an uncalibrated file."""
        ome = tif.ome_metadata
        if ome:
            import re

            def grab(axis: str) -> float | None:
                match = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', ome)
                unit = re.search(rf'PhysicalSize{axis}Unit="([^"]*)"', ome)
                factor = _micrometres(unit.group(1) if unit else "µm")  # the OME schema's default unit
                return float(match.group(1)) * factor if match and factor else None

            x, y, z = grab("X"), grab("Y"), grab("Z")
            if x and y:
                return (z or 1.0, y, x), "um"
        page = tif.pages[0]
        tags = page.tags
        res_x, res_y = tags.get("XResolution"), tags.get("YResolution")
        unit_tag = tags.get("ResolutionUnit")
        ij = tif.imagej_metadata or {}
        ij_factor = _micrometres(str(ij.get("unit", ""))) if ij else None
        try:  # ImageJ's spacing is in its own unit; one that is not a size (0, say) is none
            z = float(ij.get("spacing", 1.0))
        except (TypeError, ValueError):
            z = 1.0
        z = (abs(z) if math.isfinite(z) and z else 1.0) * (ij_factor or 1.0)  # a negative depth: its size
        if res_x is not None and res_y is not None:
            (nx, dx), (ny, dy) = res_x.value, res_y.value
            if nx and ny and (nx, dx) != (1, 1):
                x, y = dx / nx, dy / ny  # units per pixel
                if ij_factor and (unit_tag is None or int(unit_tag.value) == 1):
                    return (z, y * ij_factor, x * ij_factor), "um"  # ImageJ's unit (its tag says none)
                code = int(unit_tag.value) if unit_tag is not None else 2  # TIFF 6.0: an absent unit is inch
                if code == 3:  # centimetre
                    return (z, y * 1e4, x * 1e4), "um"
                if code == 2:  # inch
                    return (z, y * 25400, x * 25400), "um"
        return (1.0, 1.0, 1.0), "pixel"

    def read_source(self, path: str) -> tuple[np.ndarray, dict]:
        meta = self.read_meta(path)
        slices = [self.read_slice(path, k) for k in range(meta["slice_count"])]
        return (slices[0] if len(meta["spatial_shape"]) == 2 else np.stack(slices, axis=1)), meta

    def read_meta(self, path: str) -> dict:
        with self._open(path) as tif:
            shape, axes, lead, _ = self._layout(path, tif)
            spacing, unit = self._spacing(tif)
            interval = self._frame_interval(tif) if any(axes[i] == "T" for i in lead) else None
            ome = {"ome": True} if tif.is_ome else {}  # its outputs are OME-TIFFs too
        plane = (shape[axes.index("Y")], shape[axes.index("X")])
        if not lead:
            return _meta("tiff", path, plane, _scaled_affine(spacing[1:]), spacing[1:], unit, axes=axes, **ome)
        spatial = (int(np.prod([shape[i] for i in lead])), *plane)
        lead_sizes = tuple((axes[i], int(shape[i])) for i in lead)  # the slices' axes: Z, T, ...
        return _meta("tiff", path, spatial, _scaled_affine(spacing), spacing, unit, axes=axes,
                     lead_sizes=lead_sizes, **({"frame_interval": interval} if interval else {}), **ome)

    def count_slices(self, path: str) -> int:
        with self._open(path) as tif:
            shape, _, lead, _ = self._layout(path, tif)
        return int(np.prod([shape[i] for i in lead])) if lead else 1

    def separate_channels(self, path: str) -> bool:
        """A ``C`` axis (ImageJ and OME channels) holds separate images; ``S`` samples are a picture's colours."""
        _, axes, _, channel = self._layout(path, self._open_kept(path))
        return channel is not None and axes[channel] == "C"

    def read_slice(self, path: str, index: int) -> np.ndarray:
        tif = self._open_kept(path)
        shape, axes, lead, channel = self._layout(path, tif)
        count = int(np.prod([shape[i] for i in lead])) if lead else 1
        if not 0 <= index < count:
            raise IndexError(f"{path}: slice {index} out of range (the file has {count})")
        check_plane(path, shape[axes.index("Y")], shape[axes.index("X")])
        try:
            return self._plane(tif, shape, axes, lead, channel, index, path)
        except NotImplementedError as err:  # "chroma subsampling not supported": a feature, not damage
            raise DataError(f"{path}: cannot read slice {index} ({err}); the file uses a TIFF feature this reader "
                            "lacks: save it again as a plain TIFF (e.g. in Fiji)") from err
        except (OSError, ValueError, IndexError, RuntimeError) as err:  # imagecodecs' errors are RuntimeErrors
            if "requires the" in str(err):  # tifffile names the codec package the compression needs
                raise DataError(f"{path}: cannot read slice {index} ({err}); install that package "
                                "(pip install imagecodecs)") from err
            why = f"{type(err).__name__}: {err}" if isinstance(err, RuntimeError) else str(err)  # DeflateError: ...
            raise DataError(f"{path}: cannot read slice {index} ({why}); the file may be truncated or "
                            "damaged") from err

    @staticmethod
    def _plane(tif, shape, axes, lead, channel, index: int, path: str = "") -> np.ndarray:
        pages = [p for s in tif.series for p in s.pages] if axes[0] == "Q" and len(tif.series) > 1 else \
            list(tif.series[0].pages)
        plane_axes = [i for i, a in enumerate(axes) if a not in "YXS"]  # axes that index pages
        n_planes = int(np.prod([shape[i] for i in plane_axes])) if plane_axes else 1
        lead_index = np.unravel_index(index, [shape[i] for i in lead]) if lead else ()
        if len(pages) == n_planes and all(p is not None for p in pages):
            # one page per plane: read just the pages of this slice (all channels when C indexes pages)
            page_shape = [shape[i] for i in plane_axes]
            channels = range(shape[channel]) if channel is not None and axes[channel] == "C" else [None]
            planes = []
            for c in channels:
                idx = []
                for i in plane_axes:
                    idx.append(c if axes[i] == "C" else int(lead_index[lead.index(i)]))
                page = pages[int(np.ravel_multi_index(idx, page_shape))] if idx else pages[0]
                planes.append(_page_channels_first(page, path))
            if channels != [None]:
                return np.concatenate(planes)
            return planes[0]
        # planes share pages (e.g. one page holds a volume): memory-map uncompressed data, else read it all
        import tifffile

        if axes[0] == "Q":
            check_volume(path, shape, tif.series[0].dtype.itemsize,
                         "save each series as its own file, with one page per slice")
            arr = np.stack([s.asarray() for s in tif.series])
        else:
            def whole():
                check_volume(path, tif.series[0].shape, tif.series[0].dtype.itemsize,
                             "save it with one page per slice, which is read page by page")
                return tif.series[0].asarray()

            try:
                arr = tifffile.memmap(tif.filehandle.path, mode="r")
            except ValueError:
                arr = whole()
            if arr.shape != tuple(shape):
                arr = whole()
        slicer: list[Any] = [slice(None)] * arr.ndim
        for i, li in zip(lead, lead_index, strict=True):
            slicer[i] = int(li)
        plane = np.asarray(arr[tuple(slicer)])
        kept = [a for i, a in enumerate(axes) if i not in lead]  # e.g. "YX", "CYX", "YXS"
        if "C" in kept:
            return np.moveaxis(plane, kept.index("C"), 0)
        plane = np.moveaxis(plane, kept.index("S"), 0) if "S" in kept else plane[None]
        return _resolve_photometric(plane, tif.pages[0], path)


#: NIfTI intent codes of values per voxel on the fifth axis: vector (as ITK writes a vector or colour image),
#: RGB and RGBA vectors
_VECTOR_INTENTS = (1007, 2003, 2004)


def _values_per_voxel(img: Any) -> bool:
    """Whether a NIfTI holds several values per voxel (colours, vector components) on its fifth axis, as the
    standard puts them: ``(X, Y, Z, 1, C)`` with a vector intent."""
    return len(img.shape) == 5 and img.shape[3] == 1 and int(img.header.get("intent_code", 0)) in _VECTOR_INTENTS


class NiftiReader(_MedsegReader):
    """NIfTI-1/2 via nibabel, keeping the affine; 2D and 3D, 4D only with a configured channel axis.

    Args:
        channel_dim: the voxel axis (3 for ``(X, Y, Z, C)``) holding channels in 4D files; ``None`` makes 4D
            files (other than a trailing axis of 1) an error.
    """

    format = "nifti"

    #: the last decompressed ``.nii.gz`` volume: gzip cannot seek, so each slice read on its own would
    #: decompress the file from its start (quadratic in the number of slices)
    _volumes = _RecentFiles(size=1, per_thread=False)

    def __init__(self, channel_dim: int | None = None) -> None:
        super().__init__()
        self.channel_dim = channel_dim

    def _load(self, path: str):
        import nibabel as nib

        try:
            img = nib.load(path)
        except FileNotFoundError as err:
            raise DataError(f"{path}: file not found") from err
        except PermissionError as err:
            raise DataError(f"{path}: cannot open the file (permission denied); check its permissions") from err
        except (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as err:
            raise DataError(f"{path}: cannot read NIfTI ({err}){_or_corrupt(path, 'nifti')}") from err
        if self.channel_dim not in (None, 3):
            raise DataError(f"{path}: nifti_channel_dim={self.channel_dim} is not supported; channels must be the "
                            "fourth voxel axis (3)")
        shape = img.shape
        if _values_per_voxel(img):  # ITK's vector and colour images: (X, Y, Z, 1, C), the values of a voxel last
            shape = (*shape[:3], min(shape[4], 3) if int(img.header["intent_code"]) == 2004 else shape[4])
            if 0 in shape:
                raise DataError(f"{path}: NIfTI of shape {tuple(img.shape)} holds no voxels; the file was written "
                                "empty, write it again from its source")
            return img, shape
        while len(shape) > 3 and shape[-1] == 1 and (self.channel_dim is None or self.channel_dim < len(shape) - 1):
            shape = shape[:-1]
        if len(shape) == 4 and self.channel_dim is None:
            raise DataError(f"{path}: 4D NIfTI {tuple(img.shape)} (time or channels); split it into 3D volumes, "
                            "or set nifti_channel_dim=3 for a network that takes that many channels")
        if len(shape) > 4 or len(shape) < 2:
            raise DataError(f"{path}: NIfTI with {len(shape)} dimensions {tuple(img.shape)}; expected 2D or 3D"
                            + (" (several values per voxel on the fifth axis, but not marked as vectors: its "
                               "intent code is not 1007, vector, nor 2003/2004, RGB/RGBA); save it with that intent, "
                               "or as RGB24" if len(img.shape) == 5 and img.shape[3] == 1 else ""))
        if 0 in shape:
            raise DataError(f"{path}: NIfTI of shape {tuple(img.shape)} holds no voxels; the file was written "
                            "empty, write it again from its source")
        if len(shape) >= 3 and 1 in shape[:2] and shape[2] > 1:  # slices across it would be 1-voxel strips
            raise DataError(f"{path}: one plane stored across the slice axis ({'×'.join(map(str, shape[:3]))} "
                            "voxels), whose slices along the third axis are strips one voxel wide; store it as "
                            "X×Y×1 (the one-voxel axis last, the affine's columns swapped to match)")
        return img, shape

    def _voxels(self, img, shape, index: int | None) -> np.ndarray:
        """``(C, Z, Y, X)`` (or one slice ``(C, Y, X)``) from the file's ``(X, Y[, Z][, C])``."""
        try:
            return self._voxels_unchecked(img, shape, index)
        except (OSError, ValueError, EOFError, zlib.error) as err:
            raise DataError(f"{img.get_filename()}: cannot read NIfTI voxels ({err}); the file may be truncated or "
                            "corrupt") from err

    def _voxels_unchecked(self, img, shape, index: int | None) -> np.ndarray:
        proxy = img.dataobj
        if len(shape) == 2:
            data = np.asarray(proxy).reshape(shape)[:, :, None, None]
        elif len(shape) == 3:
            data = (np.asarray(proxy[:, :, index]).reshape(shape[:2] + (1,)) if index is not None
                    else np.asarray(proxy).reshape(shape))[..., None]
        elif len(img.shape) == 5:  # values per voxel (_values_per_voxel): the fifth axis, after one of 1
            data = np.asarray(proxy[:, :, :, 0] if index is None else proxy[:, :, index : index + 1, 0])
            if int(img.header["intent_code"]) == 2004:  # RGBA: alpha dropped, as for RGBA32, PNG and TIFF
                data = data[..., :3]
        else:
            cdim = self.channel_dim
            data = np.moveaxis(np.asarray(proxy), cdim, 3)
            if index is not None:
                data = data[:, :, index : index + 1]
        if data.dtype.names:  # NIfTI's RGB24 / RGBA32: one record per voxel, its fields the channels
            colours = [name for name in data.dtype.names if name != "A"]  # alpha dropped, as for PNG and TIFF
            data = np.stack([data[name][..., 0] for name in colours], axis=-1)
        data = data.transpose(3, 2, 1, 0)  # (C, Z, Y, X)
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        return data[:, 0] if index is not None else data

    def read_source(self, path: str) -> tuple[np.ndarray, dict]:
        img, shape = self._load(path)
        arr = np.ascontiguousarray(self._voxels(img, shape, None))
        return arr, self._meta(path, img, shape)

    def separate_channels(self, path: str) -> bool:
        """Volumes along the channel axis are separate images; RGB24 voxels are a picture's colours."""
        if self.channel_dim is None:
            return False
        img, _ = self._load(path)
        return not img.get_data_dtype().names and not _values_per_voxel(img)

    def read_meta(self, path: str) -> dict:
        img, shape = self._load(path)
        return self._meta(path, img, shape)

    @staticmethod
    def _meta(path: str, img, shape: tuple[int, ...]) -> dict:
        nifti_affine = np.asarray(img.affine, dtype=np.float64)
        affine = nifti_affine[:, [2, 1, 0, 3]]  # columns follow our (z, y, x) index order
        zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - len(shape[:3]))
        spatial = (int(shape[2]) if len(shape) > 2 else 1, int(shape[1]), int(shape[0]))
        unit = img.header.get_xyzt_units()[0]
        spacing_unit = {None: "mm", "unknown": "mm", "micron": "um"}.get(unit, unit)
        return _meta("nifti", path, spatial, affine, zooms[:3][::-1], spacing_unit,
                     nifti_affine=nifti_affine, nifti_shape=np.asarray(img.shape),
                     nifti_codes=np.asarray([int(img.header["sform_code"]), int(img.header["qform_code"])]),
                     nifti_qform=np.asarray(img.header.get_qform(), dtype=np.float64),
                     nifti_unit=str(unit or "unknown"))

    def count_slices(self, path: str) -> int:
        img, shape = self._load(path)
        return int(shape[2]) if len(shape) >= 3 else 1

    def read_slice(self, path: str, index: int) -> np.ndarray:
        img, shape = self._load(path)
        count = int(shape[2]) if len(shape) >= 3 else 1
        if not 0 <= index < count:
            raise IndexError(f"{path}: slice {index} out of range (the file has {count})")
        check_plane(path, int(shape[1]), int(shape[0]))
        if len(shape) == 2:
            return self._voxels(img, shape, None)[:, 0]
        if str(path).lower().endswith(".gz"):
            check_volume(path, shape, img.get_data_dtype().itemsize, "save it uncompressed (.nii), which is "
                         "read slice by slice")
            volume = self._volumes.get(path, lambda: self._voxels(img, shape, None), variant=self.channel_dim)
            return volume[:, index].copy()  # the caller's own array, not a view of the kept volume
        data = np.ascontiguousarray(self._voxels(img, shape, index))
        # nibabel reads a slice of an unscaled file into an array over the bytes read, which cannot be written
        # (PyTorch warns of it when it takes the array)
        return data if data.flags.writeable else data.copy()


#: ITK component types read as another type that holds their values (ITK's Python wraps a few types only):
#: int8 as int16, exactly; 64-bit integers as float64, exactly up to 2**53
_ITK_WIDER = {"char": "SS", "long": "D", "unsigned_long": "D", "long_long": "D", "unsigned_long_long": "D"}

#: integer component types of ITK's ImageIO, for multi-component images read as floats
_ITK_INTEGERS = {"unsigned_char": np.uint8, "char": np.int8, "unsigned_short": np.uint16, "short": np.int16,
                 "unsigned_int": np.uint32, "int": np.int32, "unsigned_long": np.uint64, "long": np.int64,
                 "unsigned_long_long": np.uint64, "long_long": np.int64}


def _itk_error(path: str, err: BaseException, what: str) -> DataError:
    """ITK's exception text (``SOURCE:LINE: ITK ERROR: ImageIO(0x...): why``; NRRD's library adds its own
    ``[nrrd] function: why`` chain, whose last link says why) as one line naming ``path``."""
    text = re.split(r"(?i)itk(?:::| )error:", str(err))[-1]
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*(ReadImageInformation:\s*)?", "", text)
    links = [t.strip() for t in re.split(r"\[nrrd\]", text) if t.strip()]
    if len(links) > 1:
        text = re.sub(r"^\w+:\s*", "", links[-1])
    why = brief(" ".join(text.replace(str(path), "the file").split()))
    if "encoding" in why.lower() and re.search(r"not available|not supported|unsupported|not compiled", why,
                                               re.IGNORECASE):
        return DataError(f"{path}: cannot read {what} ({why}); save it again with raw or gzip encoding")
    if "dimension of space" in why:  # a 2D image placed in 3D space, as some tools write a slice
        return DataError(f"{path}: cannot read {what} ({why}); save it as a 3D image of one slice")
    return DataError(f"{path}: cannot read {what} ({why}){_or_corrupt(path, 'itk')}")


def _data_file_gone(path: str, err: FileNotFoundError) -> DataError:
    return DataError(f"{path}: its data file {err.filename} is no longer there; copy the header and its data files "
                     "together")


class ItkReader(_MedsegReader):
    """NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) via ITK: 2D and 3D images, one value or
    several per voxel, placed in the world as ITK places them (origin, spacing and direction, in LPS, given here
    as RAS like NIfTI's and DICOM's affines), the spacing in NRRD's ``space units`` or MetaImage's
    ``DistanceUnits`` where stated, else in millimetres as ITK and 3D Slicer take it (``pixel`` for a header
    that states no pixel size or a unit not known). The header and
    the voxels are checked first (:mod:`medseg.itkfiles`): ITK takes damaged compressed data without a word.

    The voxels are read whole (ITK reads these files whole), the last volume kept for its next slices.
    """

    format = "itk"
    _volumes = _RecentFiles(size=1, per_thread=False)
    _heads = _RecentFiles(size=8, per_thread=False)  # read once for all the slices of a file, not per slice

    def _header(self, path: str) -> dict[str, Any]:
        """Size, spacing, origin, direction and pixel type from the header, without the voxels."""
        try:
            return self._heads.get(path, lambda: self._read_header(path))
        except FileNotFoundError as err:
            raise DataError(f"{path}: file not found") from err

    @staticmethod
    def _read_header(path: str) -> dict[str, Any]:
        import itk

        from medseg.itkfiles import read_header

        io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
        if io is None or io.GetNameOfClass() not in ("NrrdImageIO", "MetaImageIO"):  # ITK goes by content too
            raise DataError(f"{path}: not a NRRD or MetaImage file{_or_corrupt(path, 'itk')}")
        header = read_header(path)  # its data files there, before ITK looks for them
        try:
            io.SetFileName(path)
            io.ReadImageInformation()
        except (RuntimeError, OSError) as err:
            raise _itk_error(path, err, "the header") from err
        dims = int(io.GetNumberOfDimensions())
        size = [int(io.GetDimensions(i)) for i in range(dims)]
        if dims not in (2, 3):
            raise DataError(f"{path}: {dims}D image ({' × '.join(map(str, size))}); expected 2D or 3D: split it into "
                            "3D volumes (a time series into one file per time point)")
        if 0 in size:
            raise DataError(f"{path}: image of size {' × '.join(map(str, size))} holds no voxels; the file was "
                            "written empty, write it again from its source")
        try:  # a value type ITK does not know fails here, not above
            direction = np.array([list(io.GetDirection(i)) for i in range(dims)], dtype=np.float64).T  # columns: axes
            components, itemsize = int(io.GetNumberOfComponents()), int(io.GetComponentSize())
            pixel = str(io.GetPixelTypeAsString(io.GetPixelType()))
            component = str(io.GetComponentTypeAsString(io.GetComponentType()))
            spacing = [float(io.GetSpacing(i)) for i in range(dims)]
            origin = [float(io.GetOrigin(i)) for i in range(dims)]
        except (RuntimeError, OSError) as err:
            raise _itk_error(path, err, "the header") from err
        return {"size": size, "spacing": spacing, "origin": origin, "direction": direction, "component": component,
                "components": components, "pixel": pixel, "itemsize": itemsize, "header": header,
                "colours": components > 1 and header.colours(components, itemsize, pixel)}

    def _meta(self, path: str, head: dict[str, Any]) -> dict:
        from medseg.dicom import LPS_TO_RAS

        unit, scale = head["header"].unit  # e.g. a NRRD in cm: its world in mm
        dims = len(head["size"])
        lps = np.eye(4)  # voxel (x, y[, z]) -> LPS world
        lps[:dims, :dims] = head["direction"] * np.asarray(head["spacing"]) * scale
        lps[:dims, 3] = np.asarray(head["origin"]) * scale
        affine = (LPS_TO_RAS @ lps)[:, [2, 1, 0, 3]]  # columns follow our (z, y, x) index order
        x, y, *z = head["size"]
        spacing = np.array([head["spacing"][2] if dims == 3 else 1.0, head["spacing"][1], head["spacing"][0]])
        spacing[-dims:] *= scale
        return _meta("itk", path, (z[0] if z else 1, y, x), affine, spacing, unit, itk_pixel=head["pixel"],
                     itk_dimensions=dims)

    def read_meta(self, path: str) -> dict:
        return self._meta(path, self._header(path))

    def count_slices(self, path: str) -> int:
        size = self._header(path)["size"]
        return size[2] if len(size) == 3 else 1

    def separate_channels(self, path: str) -> bool:
        """Several values per voxel are separate images unless they are colours (NRRD's ``kinds`` say so; a
        MetaImage's RGB(A) pixels, or three or four 8-bit values)."""
        head = self._header(path)
        return head["components"] > 1 and not head["colours"]

    def _voxels(self, path: str, head: dict[str, Any]) -> np.ndarray:
        """The whole image as ``(C, Z, Y, X)`` in the file's own value type (see :data:`_ITK_WIDER`)."""
        import itk

        from medseg.itkfiles import check_voxels

        x, y, *z = head["size"]
        components, itemsize, component = head["components"], head["itemsize"], head["component"]
        # ITK's Python wraps few vector types: their values are read as float32 (8- and 16-bit, float) or float64
        wide = components > 1 and (component == "double" or (itemsize > 2 and component != "float"))
        check_volume(path, (components, z[0] if z else 1, y, x), 8 if wide else max(itemsize, 4 * (components > 1)),
                     "split it into smaller volumes")
        check_plane(path, y, x)
        try:
            check_voxels(head["header"], x * y * (z[0] if z else 1) * components * itemsize)
        except FileNotFoundError as err:  # a data file removed since the header was read
            raise _data_file_gone(path, err) from err
        try:
            if components > 1:
                image = itk.imread(path, pixel_type=itk.VariableLengthVector[itk.D if wide else itk.F])
            elif component in _ITK_WIDER:
                image = itk.imread(path, pixel_type=getattr(itk, _ITK_WIDER[component]))
            else:
                image = itk.imread(path)
            data = np.array(itk.array_view_from_image(image))  # a copy that outlives the ITK image
        except (RuntimeError, OSError, KeyError, TypeError) as err:
            raise _itk_error(path, err, "the voxels") from err
        data = data.reshape(*(z[:1] or [1]), y, x, components)  # (Z, Y, X, C) whatever ITK gave
        if components > 1 and component in _ITK_INTEGERS:
            data = data.astype(_ITK_INTEGERS[component])  # the values stored, whole numbers again
        if head["colours"] and components == 4:
            data = data[..., :3]  # alpha dropped, as for PNG, TIFF and NIfTI
        return np.ascontiguousarray(data.transpose(3, 0, 1, 2))

    def read_source(self, path: str) -> tuple[np.ndarray, dict]:
        head = self._header(path)
        return self._voxels(path, head), self._meta(path, head)

    def read_slice(self, path: str, index: int) -> np.ndarray:
        head = self._header(path)
        count = head["size"][2] if len(head["size"]) == 3 else 1
        if not 0 <= index < count:
            raise IndexError(f"{path}: slice {index} out of range (the file has {count})")
        files = head["header"].data_files  # a data file rewritten since is read afresh (a few looked at per slice)
        try:
            stamp = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, files)) if len(files) <= 4 \
                else len(files)
        except FileNotFoundError as err:
            raise _data_file_gone(path, err) from err
        volume = self._volumes.get(path, lambda: self._voxels(path, head), variant=stamp)
        return volume[:, index].copy()  # the caller's own array, not a view of the kept volume


class DicomReader(_MedsegReader):
    """DICOM via pydicom: a file (single or multi-frame) or a folder holding one series (see :mod:`medseg.dicom`).

    Args:
        series_uid: pick this SeriesInstanceUID from a folder holding several series.
    """

    format = "dicom"

    def __init__(self, series_uid: str | None = None) -> None:
        super().__init__()
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and (Path(names[0]).is_dir() or format_of_or_none(names[0]) == "dicom")

    def _series(self, path: str):
        from medseg.dicom import find_series

        return find_series(path, self.series_uid)

    def read_source(self, path: str) -> tuple[np.ndarray, dict]:
        from medseg.dicom import read_series

        arr, geometry = read_series(self._series(path))
        return arr, _meta("dicom", path, arr.shape[1:], geometry.affine, geometry.spacing, "mm",
                          **_series_extra(geometry))

    def read_meta(self, path: str) -> dict:
        from medseg.dicom import series_geometry

        geometry = series_geometry(self._series(path))
        return _meta("dicom", path, geometry.shape, geometry.affine, geometry.spacing, "mm",
                     **_series_extra(geometry))

    def count_slices(self, path: str) -> int:
        from medseg.dicom import series_geometry

        return series_geometry(self._series(path)).shape[0]

    def read_slice(self, path: str, index: int) -> np.ndarray:
        from medseg.dicom import read_slice

        return read_slice(self._series(path), index)


def release_files() -> None:
    """Close the files this thread's readers keep open and drop the kept ``.nii.gz`` volume (end of a batch)."""
    TiffReader._recent.clear()
    NiftiReader._volumes.clear()
    ItkReader._volumes.clear()
    ItkReader._heads.clear()


def format_of_or_none(path: str | os.PathLike) -> str | None:
    """:func:`format_of`, or ``None`` for unsupported files."""
    try:
        return format_of(path)
    except DataError:
        return None


#: Format name -> reader class. Bundles name these classes in ``LoadImage(d)``'s ``reader``.
READERS: dict[str, type[_MedsegReader]] = {
    "png": PngReader,
    "tiff": TiffReader,
    "nifti": NiftiReader,
    "dicom": DicomReader,
    "itk": ItkReader,
}


def reader_for(source: str | os.PathLike, series_uid: str | None = None,
               nifti_channel_dim: int | None = None) -> _MedsegReader:
    """The reader instance for ``source`` (a file, or a DICOM folder / series)."""
    fmt = format_of(source)
    if fmt == "dicom":
        return DicomReader(series_uid=series_uid)
    if fmt == "nifti":
        return NiftiReader(channel_dim=nifti_channel_dim)
    return READERS[fmt]()


def _check_exists(source: str | os.PathLike) -> str:
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return str(path)


def read_image(source: str | os.PathLike, **kwargs: Any) -> tuple[np.ndarray, dict]:
    """Read ``source`` under the contract above. ``kwargs`` go to :func:`reader_for`.

    Raises:
        DataError: missing, unreadable, corrupt or unsupported input (one line naming the file).
    """
    path = _check_exists(source)
    return reader_for(path, **kwargs).read_source(path)


def count_slices(source: str | os.PathLike, **kwargs: Any) -> int:
    """Number of 2D slices in ``source`` (1 for 2D images)."""
    path = _check_exists(source)
    return reader_for(path, **kwargs).count_slices(path)


def read_geometry(source: str | os.PathLike, **kwargs: Any) -> dict:
    """The metadata :func:`read_image` would give for ``source``, reading headers only."""
    path = _check_exists(source)
    return reader_for(path, **kwargs).read_meta(path)


def separate_channels(source: str | os.PathLike, **kwargs: Any) -> bool:
    """Whether the channels of ``source``'s slices are separate images (a TIFF's ``C`` axis, a 4D NIfTI's
    volumes), not the colours of one picture (see :meth:`_MedsegReader.separate_channels`)."""
    path = _check_exists(source)
    return reader_for(path, **kwargs).separate_channels(path)


def read_slice(source: str | os.PathLike, index: int = 0, **kwargs: Any) -> np.ndarray:
    """Slice ``index`` of ``source`` as ``(C, Y, X)``, reading as little of the file as the format allows."""
    path = _check_exists(source)
    return reader_for(path, **kwargs).read_slice(path, index)
