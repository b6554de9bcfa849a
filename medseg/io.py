"""Read 2D images and TIFF pages into numpy, and write results atomically (PNG, TIFF)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medseg.errors import DataError

#: Suffix -> format name for the 2D readers of this module.
SUPPORTED_SUFFIXES: dict[str, str] = {".png": "png", ".tif": "tiff", ".tiff": "tiff"}


def image_format(path: str | os.PathLike) -> str:
    """Return the format name of ``path`` from its suffix.

    Raises:
        DataError: the suffix is not one of :data:`SUPPORTED_SUFFIXES`.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise DataError(f"{path}: unsupported file type '{suffix}'; supported: {supported}")
    return SUPPORTED_SUFFIXES[suffix]


def count_pages(path: str | os.PathLike) -> int:
    """Number of 2D pages (slices) in an image file: 1 for PNG, the page count for TIFF."""
    if image_format(path) == "png":
        return 1
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = series.shape, series.axes
            if len(tif.series) > 1 and all(s.shape == shape and s.axes == axes for s in tif.series):
                return len(tif.series) * _plane_count(shape, axes)  # pages written as separate series
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise DataError(f"{path}: cannot read TIFF ({err}); check the file is complete") from err
    spatial = sum(1 for a in axes if a in "YX")
    if spatial != 2:
        raise DataError(f"{path}: TIFF has axes '{axes}', expected two spatial axes Y and X")
    return _plane_count(shape, axes)


def _plane_count(shape: tuple[int, ...], axes: str) -> int:
    """Number of 2D planes in a TIFF series (the sample axis S stays inside a plane)."""
    n = 1
    for size, axis in zip(shape, axes, strict=True):
        if axis not in "YXS":
            n *= size
    return n


def read_image(path: str | os.PathLike, page: int | None = None) -> np.ndarray:
    """Read one 2D image as ``(H, W)`` or ``(H, W, C)`` in the file's own dtype.

    Args:
        path: a PNG or TIFF file.
        page: for TIFF stacks, the 0-based slice to read; ``None`` reads the first.

    Raises:
        DataError: the file is missing, unreadable, truncated or of an unsupported type.
    """
    path = Path(path)
    fmt = image_format(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if fmt == "png":
            from PIL import Image

            with Image.open(path) as im:
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                arr = np.asarray(im)
        else:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                planes = _plane_count(series.shape, series.axes) * len(tif.series)
                if len(tif.pages) == planes:  # one plane per page: read only that page
                    arr = tif.pages[page or 0].asarray()
                else:
                    arr = _tiff_page(series.asarray(), series.axes, page or 0)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, IndexError) as err:
        raise DataError(f"{path}: cannot read image ({err}); the file may be truncated or corrupt") from err
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # alpha carries no image content
    if arr.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D image, got shape {arr.shape}")
    return arr


def _tiff_page(arr: np.ndarray, axes: str, page: int) -> np.ndarray:
    """Index a TIFF series array to one 2D page (keeping a trailing sample axis)."""
    keep = "YXS"
    lead = [i for i, a in enumerate(axes) if a not in keep]
    if not lead:
        return arr
    lead_shape = [arr.shape[i] for i in lead]
    index = np.unravel_index(page, lead_shape)
    slicer: list[object] = [slice(None)] * arr.ndim
    for dim, idx in zip(lead, index, strict=True):
        slicer[dim] = int(idx)
    return arr[tuple(slicer)]


def iter_pages(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield the 2D pages of a file one at a time (TIFF stacks are not loaded whole)."""
    for k in range(count_pages(path)):
        yield read_image(path, page=k)


def to_gray(arr: np.ndarray) -> np.ndarray:
    """Convert ``(H, W)`` or ``(H, W, 3)`` to ``(H, W)`` float32 (ITU-R 601 luma for RGB)."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.astype(np.float32, copy=False)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it into place, else remove it.

    Readers never see a half-written file, and an interrupted run leaves no partial output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_png(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Write a 2D uint8/uint16 array as PNG, atomically."""
    from PIL import Image

    arr = np.asarray(arr)
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs uint8 or uint16 data, got {arr.dtype}")
    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


def write_tiff(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Write ``(H, W)``, ``(H, W, 3)`` uint8 RGB or a ``(pages, H, W)`` stack as TIFF, atomically (integers zlib)."""
    import tifffile

    arr = np.asarray(arr)
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8
    with atomic_output(path) as tmp:
        # say so explicitly: tifffile would read a leading axis of 3 as RGB samples, not slices
        # zlib for integer masks/labels (small, fast); floats barely compress and zlib costs ~70 ms a slice
        compression = "zlib" if arr.dtype.kind in "iub" else None
        tifffile.imwrite(tmp, arr, compression=compression, photometric="rgb" if rgb else "minisblack")
    return Path(path)
