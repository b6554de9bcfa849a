"""File plumbing: result files written atomically (temporary file + rename: PNG, TIFF, NIfTI), writable
folders, file digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from medseg.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_writable(folder: str | os.PathLike, parts: tuple[str, ...] = ()) -> Path:
    """Create ``folder`` if needed and make sure files can be written there, and in those of its sub-folders
    ``parts`` that exist already (``mask/`` of an earlier run, say), before any work.

    Raises:
        DataError: the folder is a file, or it or one of ``parts`` cannot be created or written.
    """
    folder = Path(folder)
    for where in (folder, *(folder / part for part in parts)):
        if where.is_file():
            raise DataError(f"{where}: a file, not a folder; choose another output folder, or move the file away")
    for where in (folder, *(folder / part for part in parts if (folder / part).is_dir())):
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(prefix=".medseg-write-test.", dir=where):
                pass
        except OSError as err:
            raise DataError(f"{where}: output folder is not writable ({err.strerror or err}); choose another "
                            "output folder or fix its permissions") from err
    return folder


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f: BinaryIO) -> str:
    """Hex SHA-256 of what is left to read in the open binary file ``f`` (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


#: What marks a file :func:`atomic_output` is writing (``.NAME.XXXXXXXX.part.png``): left behind only by a
#: process killed mid-write, and removed by :func:`remove_partial_files`.
_PART = ".part"
_PART_NAME = re.compile(r"^\..*\.[a-z0-9_]{8}\.part(\.[A-Za-z0-9]+)*$")


def remove_partial_files(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Remove the temporary files a killed :func:`atomic_output` left in ``folder``; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        if _PART_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def partial_file(path: str | os.PathLike) -> Path:
    """Create (empty, with the usual permissions) the temporary file that will become ``path`` by
    ``os.replace``: in its folder, hidden, its suffix kept (writers key on it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    stem = path.name[: -len(suffix) or None][:100]  # the longest legal final name must leave room for the rest
    while len(os.fsencode(stem)) > 100:  # in bytes, as file systems count (an accented or CJK name is longer)
        stem = stem[:-1]
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{_PART}{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual permissions
    return Path(tmp)


def partial_folder(path: str | os.PathLike) -> Path:
    """Create (empty, with the usual permissions) the temporary folder that will become ``path`` by a rename: in
    its parent, hidden, named ``.NAME.*.part`` (:func:`held_partial_folder` also locks it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_PART, dir=path.parent)
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700: others could not read what is handed over
    return Path(tmp)


def held_partial_folder(path: str | os.PathLike) -> tuple[Path, int | None]:
    """:func:`partial_folder`, made and locked (``flock`` on the folder itself) while its parent is locked, so
    that :func:`remove_abandoned_folders` never sees it unlocked; with the descriptor that holds the lock (close
    it with ``os.close`` once the folder is renamed or removed: the system drops the lock when the process ends,
    however it ends). ``None`` where there is no ``flock`` (Windows, some network file systems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held(path.parent, wait=True):
        part = partial_folder(path)
        return part, _lock(part)


def _lock(folder: Path, wait: bool = False) -> int | None:
    """A descriptor of ``folder`` holding its ``flock``; ``None`` where another process holds it, or where it
    cannot be locked (no ``flock``: Windows, some network file systems)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _held(folder: Path, wait: bool = False) -> Iterator[bool]:
    """Hold ``folder``'s lock (:func:`_lock`) in the block; yields whether it is held."""
    fd = _lock(folder, wait)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def remove_tree(folder: str | os.PathLike) -> None:
    """Remove ``folder`` and what it holds, also its read-only sub-folders (copied from a read-only bundle by an
    earlier version); what cannot go is left."""
    def opened(path: str) -> None:  # each folder made writable and searchable first, where one may
        with contextlib.suppress(OSError):
            os.chmod(path, os.stat(path).st_mode | 0o700)
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    opened(entry.path)

    if os.path.isdir(folder) and not os.path.islink(folder):
        opened(os.fspath(folder))
    shutil.rmtree(folder, ignore_errors=True)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the folder ``source`` to ``target`` (made) as files of one's own: the permissions the umask gives,
    not the source's (a read-only bundle gave read-only copies that could not be edited, nor removed); caches
    (``__pycache__``) left out."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(target):
        os.chmod(folder, 0o777 & ~_UMASK)  # copytree gives folders the source's modes


def remove_abandoned_folders(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of ``path`` (:func:`held_partial_folder`) that no process holds: those a
    killed command left, with what it had copied. Returns them; none where the folders cannot be locked (no
    ``flock``), as a folder being filled could not be told apart. ``flock`` tells the processes of one machine
    apart; on a network file system, two machines exporting to one folder at once are not told apart."""
    path = Path(path)
    name = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}" + re.escape(_PART))
    removed = []
    with _held(path.parent, wait=True) as held:
        if not held:
            return removed
        with contextlib.suppress(OSError):
            for part in path.parent.iterdir():
                if not name.fullmatch(part.name) or part.is_symlink() or not part.is_dir():
                    continue
                with _held(part) as free:
                    if not free:  # being filled by a command still running
                        continue
                    remove_tree(part)
                    if not part.exists():
                        removed.append(part)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it into place, else remove it.

    Readers never see a half-written file, and an interrupted run leaves no partial output.
    """
    tmp_path = partial_file(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:  # a full disk, say: named by the file meant, not its temporary one or none
        if err.errno is not None and err.filename in (None, os.fspath(tmp_path)):  # else str(err) loses its words
            if err.filename2 in (None, os.fspath(path)):  # os.replace names both ends: the file meant, once
                # a new error, as one whose filename2 was set to None ends its message in "-> None"
                named = OSError(err.errno, err.strerror, os.fspath(path))  # of the errno's own subclass
                raise named.with_traceback(err.__traceback__) from None
            err.filename = os.fspath(path)
        raise
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


def write_tiff(path: str | os.PathLike, arr: np.ndarray, spacing: tuple[float, ...] | None = None,
               unit: str = "pixel", ome: bool = False) -> Path:
    """Write ``(H, W)``, ``(H, W, 3)`` uint8 RGB or a ``(pages, H, W)`` stack as TIFF, atomically (integers zlib).

    Args:
        spacing: ``(y, x)`` or ``(z, y, x)`` pixel size in ``unit`` (``um`` or ``mm``), stored as resolution
            tags (and, for a stack, ImageJ's unit and slice spacing), so viewers such as Fiji show the input's
            calibration; any other unit writes an uncalibrated file.
        ome: a 2D image as an OME-TIFF (:func:`ome_description`), for the outputs of an OME-TIFF input.
    """
    import tifffile

    arr = np.asarray(arr)
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8
    calibration = tiff_calibration(spacing, unit, pages=arr.shape[0] if arr.ndim == 3 and not rgb else 1)
    description = ome_description(arr.dtype, arr.shape, spacing, unit) if ome and arr.ndim == 2 else None
    if description is not None:
        calibration["description"] = description
    if "description" in calibration:
        calibration["metadata"] = None  # ImageJ's description or OME-XML, not tifffile's own
    with atomic_output(path) as tmp:
        # say so explicitly: tifffile would read a leading axis of 3 as RGB samples, not slices
        # zlib for integer masks/labels (small, fast); floats barely compress and zlib costs ~70 ms a slice
        compression = "zlib" if arr.dtype.kind in "iub" else None
        tifffile.imwrite(tmp, arr, compression=compression, photometric="rgb" if rgb else "minisblack",
                         **calibration)
    return Path(path)


#: Micrometres per unit of the spacing units medseg's readers report (and ImageJ's words for them)
_MICRONS = {"nm": 1e-3, "um": 1.0, "micron": 1.0, "mm": 1000.0, "meter": 1e6, "m": 1e6}

#: The time units medseg's readers report (ImageJ's ``tunit`` words, OME's symbols without µ): seconds per unit,
#: for a NIfTI time step, and OME's symbol
_TIME_UNITS = {"sec": (1.0, "s"), "s": (1.0, "s"), "second": (1.0, "s"), "seconds": (1.0, "s"),
               "ms": (1e-3, "ms"), "msec": (1e-3, "ms"), "us": (1e-6, "µs"), "usec": (1e-6, "µs"),
               "ns": (1e-9, "ns"), "min": (60.0, "min"), "minute": (60.0, "min"), "minutes": (60.0, "min"),
               "h": (3600.0, "h"), "hr": (3600.0, "h"), "hour": (3600.0, "h"), "hours": (3600.0, "h"),
               "d": (86400.0, "d"), "day": (86400.0, "d"), "days": (86400.0, "d")}


def ome_description(dtype: Any, plane: tuple[int, ...], spacing: tuple[float, ...] | None, unit: str,
                    lead: tuple[tuple[str, int], ...] | None = None,
                    frame_interval: tuple[float, str] | None = None) -> bytes | None:
    """The OME-XML (UTF-8, for the first page's description) that makes a TIFF of the pages ``lead`` (the
    slices' axes with their sizes, outermost first, e.g. ``(("T", 5), ("Z", 12))``) of ``plane``-sized images
    of ``dtype`` an OME-TIFF: its Z and T axes in either order, the pixel size in micrometres (``spacing`` ``(y, x)`` or
    ``(z, y, x)`` in ``unit``; none when uncalibrated) and the time step; ``None`` when OME cannot state the
    layout: axes other than Z and T (positions, a ``Q`` of several series), which OME would hold as time
    points or channels."""
    import tifffile

    lead = tuple(lead or ())
    axes = "".join(a for a, _ in lead) + "YX"
    if not set(axes[:-2]) <= {"Z", "T"} or len(set(axes[:-2])) < len(axes[:-2]):
        return None
    shape = (*(int(n) for _, n in lead), *(int(n) for n in plane[-2:]))
    pages = int(np.prod(shape[:-2], dtype=np.int64))
    metadata: dict[str, Any] = {}
    factor = _MICRONS.get(unit)
    if spacing is not None and factor:
        metadata.update(PhysicalSizeY=float(spacing[-2]) * factor, PhysicalSizeYUnit="µm",
                        PhysicalSizeX=float(spacing[-1]) * factor, PhysicalSizeXUnit="µm")
        if len(spacing) == 3 and "Z" in axes:
            metadata.update(PhysicalSizeZ=float(spacing[0]) * factor, PhysicalSizeZUnit="µm")
    time_unit = _TIME_UNITS.get(str(frame_interval[1]).lower()) if frame_interval else None
    if time_unit and "T" in axes:
        metadata.update(TimeIncrement=float(frame_interval[0]), TimeIncrementUnit=time_unit[1])
    ome = tifffile.OmeXml()
    ome.addimage(np.dtype(dtype), shape, (pages, 1, 1, *shape[-2:], 1), axes=axes, **metadata)
    return ome.tostring().encode("utf-8")


def tiff_calibration(spacing: tuple[float, ...] | None, unit: str, pages: int = 1,
                     lead: tuple[tuple[str, int], ...] | None = None,
                     frame_interval: tuple[float, str] | None = None) -> dict[str, Any]:
    """tifffile ``imwrite``/``write`` keywords storing the pixel size and a stack's axes.

    A single image gets resolution tags in pixels per centimetre, which every TIFF reader understands (none
    when uncalibrated). A stack of ``pages`` with a ``(z, y, x)`` spacing is written as ImageJ writes one:
    resolution in pixels per micrometre and an ImageJ description (for the first page only) with
    ``unit=micron`` and the slice ``spacing``, since baseline TIFF has no tag for the distance between pages.
    ``lead`` names the input's axes of the pages with their sizes: a time series (``T``) is written as ImageJ
    frames, without a slice spacing, and ``T`` then ``Z`` as a hyperstack of frames and slices (ImageJ's own
    page order), with the input's ``frame_interval`` (value, unit) when it had one; these keep their axes
    when uncalibrated too. Time in another order (OME's ``Z`` then ``T``), which an ImageJ description cannot
    state, gives plain pages in the input's order, claiming neither slices nor a spacing.
    """
    factor = _MICRONS.get(unit)
    letters = "".join(a for a, _ in lead or ())
    if spacing is None or (factor is None and not (pages > 1 and "T" in letters)):
        return {}
    if pages > 1 and len(spacing) == 3:
        sizes = dict(lead or ())
        z_spacing = f"spacing={float(spacing[0]) * factor:.10g}\n" if factor else ""
        if letters == "T":
            counts, z_spacing = f"frames={pages}\n", ""
        elif letters == "TZ":
            counts = f"slices={sizes['Z']}\nframes={sizes['T']}\nhyperstack=true\n"
        elif "T" in letters:  # time in another order: ImageJ's hyperstacks hold frames of slices only
            counts, z_spacing = "", ""
        else:
            counts = f"slices={pages}\n"
        if frame_interval and letters in ("T", "TZ"):
            value, time_unit = frame_interval
            z_spacing += f"finterval={value:.10g}\n" + (f"tunit={time_unit}\n" if time_unit != "sec" else "")
        if not factor:  # uncalibrated: the axes alone
            return {"description": f"ImageJ=1.11a\nimages={pages}\n{counts}{z_spacing}loop=false\n"}
        y, x = float(spacing[-2]) * factor, float(spacing[-1]) * factor
        description = f"ImageJ=1.11a\nimages={pages}\n{counts}unit=micron\n{z_spacing}loop=false\n"
        return {"resolution": (1.0 / x, 1.0 / y), "resolutionunit": "NONE", "description": description}
    if factor is None:
        return {}
    y, x = float(spacing[-2]) * factor, float(spacing[-1]) * factor
    return {"resolution": (1e4 / x, 1e4 / y), "resolutionunit": "CENTIMETER"}  # pixels per centimetre


#: NIfTI's names of the spatial units medseg's readers report (``spacing_unit``)
NIFTI_UNITS = {"mm": "mm", "um": "micron", "micron": "micron", "meter": "meter", "m": "meter"}


def write_nifti(path: str | os.PathLike, arr: np.ndarray, affine: np.ndarray, unit: str = "mm",
                codes: tuple[int, int] = (1, 1), qform: np.ndarray | None = None,
                frame_interval: tuple[float, str] | None = None) -> Path:
    """Write ``arr`` (in NIfTI voxel order) with ``affine`` (sform and qform) as ``.nii``/``.nii.gz``, atomically
    (NIfTI-2 when a dimension exceeds NIfTI-1's 32,767).

    Args:
        unit: the affine's spatial unit (``mm``, ``um``/``micron``, ``meter``; anything else is written as
            ``unknown``), so a micrometre image is not read back as millimetres.
        codes: ``(sform_code, qform_code)``: 1 = scanner, 2 = aligned, ...; a NIfTI input's own codes
            keep their meaning.
        qform: the qform affine when it differs from ``affine`` (a NIfTI input's own), else ``affine``; a flat
            one (an axis of size 0) holds no rotation: no qform is written (code 0), the sform kept.
        frame_interval: for a 4D ``arr`` (a time series), the time between volumes and its unit: written as
            the fourth voxel size in seconds (a unit not known in seconds, or none: 1, time unit unknown).
    """
    import nibabel as nib

    arr = np.asarray(arr)
    # NIfTI-1 holds each dimension in 16 bits: a longer one (a 35,000-pixel line scan) needs NIfTI-2
    kind = nib.Nifti2Image if max(arr.shape, default=0) > 32767 else nib.Nifti1Image
    affine = np.asarray(affine, dtype=np.float64)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            image = kind(arr, affine)
    except (np.linalg.LinAlgError, nib.spatialimages.HeaderDataError):  # a flat affine (an axis of size 0), as
        image = kind(arr, None)  # its input's: no rotation for a qform (below); the sform kept
        zooms = np.linalg.norm(affine[:3, :3], axis=0)[: min(arr.ndim, 3)]
        zooms = np.where(np.isfinite(zooms) & (zooms > 0), zooms, 1.0)  # pixdim 0 is no size: 1, as readers take it
        image.header.set_zooms((*zooms, *image.header.get_zooms()[3:]))
    seconds = _TIME_UNITS.get(str(frame_interval[1]).lower(), (None,))[0] if frame_interval else None
    image.header.set_xyzt_units(NIFTI_UNITS.get(str(unit), "unknown"), "sec" if seconds and arr.ndim == 4 else None)
    if arr.ndim == 4:
        zooms = image.header.get_zooms()
        image.header.set_zooms((*zooms[:3], float(frame_interval[0]) * seconds if seconds else 1.0))
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            image.set_qform(affine if qform is None else np.asarray(qform, dtype=np.float64), code=int(codes[1]))
    except (np.linalg.LinAlgError, nib.spatialimages.HeaderDataError):  # a flat one: no qform
        image.set_qform(None, code=0)
    image.set_sform(affine, code=int(codes[0]))
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
