"""Write each input's segmentation in the input's own kind (or a chosen one): mask plus optional probability map.

| input | mask (default)                       | probability map (``save_prob``) |
|-------|--------------------------------------|---------------------------------|
| PNG   | ``mask/REL.png``, 8-bit, 255 = class | ``prob/REL.tif`` float32        |
| TIFF  | ``mask/REL.tif`` (a stack for stacks, calibration kept), 8-bit 255 | ``prob/REL.tif`` float32 |
| NIfTI | ``mask/REL.nii.gz`` uint8, 1 = class, the input's affine and voxel order | ``prob/REL.nii.gz`` float32 |
| DICOM | ``mask/REL.seg.dcm`` binary DICOM SEG referencing the source series | ``prob/REL.nii.gz`` float32 |
| NRRD  | ``mask/REL.nrrd`` uint8, 1 = class, the input's grid, place and unit | ``prob/REL.nrrd`` float32 |
| MetaImage | ``mask/REL.mha`` as for NRRD                 | ``prob/REL.mha`` float32        |

``REL`` is the input's path relative to the input folder without its suffix. Three kinds of mask (``mask_mode``):

* ``binary``: ``prob[channel] > threshold`` (255 in PNG/TIFF, 1 in NIfTI, one DICOM SEG segment);
* ``classes``: the argmax class; PNG/TIFF hold ``class_values`` (e.g. 0/128/255, as the training masks),
  NIfTI the class index;
* ``instances``: ``postprocess(prob)`` labels (e.g. seeded watershed), uint16 in every format (uint32 in
  TIFF and NIfTI for a slice of over 65535 objects: a TIFF stack only when no 16-bit slice came first), plus
  ``table/REL.csv`` with one row per object (slice, label, area, centroid, bounding box, mean intensity).

For ``classes`` and ``instances`` the probability map is the foreground probability ``1 - prob[0]``; DICOM SEG
holds binary masks only, so their masks of DICOM inputs go to NIfTI by default. ``output_format`` (``png``,
``tiff``, ``nifti``, ``dicom-seg``, ``nrrd``, ``metaimage``) overrides the mask's kind; NRRD and MetaImage masks of
other inputs lie where ITK (and so 3D Slicer) places the input (:func:`_itk_geometry`), in mm. All files are
written atomically; TIFF stacks are streamed page by page, volumes for NIfTI, NRRD, MetaImage and DICOM SEG are
assembled in memory (one mask and one float32 probability volume per input).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from medseg.bundle import config_flag
from medseg.discovery import OUTPUT_FORMATS, PROB_SUFFIXES
from medseg.errors import ConfigValueError, DataError
from medseg.io import ome_description, partial_file, tiff_calibration, write_nifti, write_png, write_tiff
from medseg.readers import suffix_of

#: Input kind (:func:`medseg.readers.kind_of`) -> the mask kind written for it by default.
_DEFAULT_FOR_INPUT = {"png": "png", "jpeg": "png", "bmp": "png", "tiff": "tiff", "nifti": "nifti",
                      "dicom": "dicom-seg", "nrrd": "nrrd", "metaimage": "metaimage"}


def mask_format(input_format: str, output_format: str = "auto", slices: int = 1, source: str | None = None) -> str:
    """The mask kind for an input: its own kind unless ``output_format`` says otherwise. ``source``: the input's
    file, which tells NRRD from MetaImage (format ``itk``).

    Raises:
        DataError: the choice cannot hold this input (PNG for a volume, DICOM SEG for a non-DICOM input).
    """
    from medseg.readers import kind_of

    kind = kind_of(source, input_format) if source else input_format
    if kind == "itk" and output_format in ("auto", "", None):
        raise ValueError("a NRRD or MetaImage input's mask kind needs its file: give source")
    fmt = _DEFAULT_FOR_INPUT[kind] if output_format in ("auto", "", None) else output_format
    if fmt not in OUTPUT_FORMATS:
        raise DataError(f"unknown output format '{output_format}'; choose auto, {', '.join(OUTPUT_FORMATS)}")
    if fmt == "png" and slices > 1:
        fmt = "tiff"  # a PNG holds one slice: volumes go to a TIFF stack
    if fmt == "dicom-seg" and input_format != "dicom":
        raise DataError("--format dicom-seg needs DICOM inputs, and this one is not DICOM; use nifti or tiff")
    return fmt


#: The longest file name (bytes) the usual file systems take (ext4, XFS, NTFS, APFS).
_NAME_MAX = 255


def output_paths(output_dir: str | os.PathLike, rel: str, fmt: str, save_prob: bool,
                 table: bool = False) -> dict[str, Path]:
    """``{"mask": path[, "prob": path][, "table": path]}`` of one input's outputs for mask kind ``fmt``.

    Raises:
        DataError: ``rel`` is absolute or climbs out (``..``): outputs never leave their folder; or an output's
            name would be longer than a file name may be.
    """
    out = Path(output_dir)
    parts = PurePosixPath(rel).parts
    if not rel or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise DataError(f"its output name {rel!r} is not a name inside the output folder {out}; rename the input")
    paths = {"mask": out / "mask" / f"{rel}{OUTPUT_FORMATS[fmt]}"}
    if save_prob:
        paths["prob"] = out / "prob" / f"{rel}{PROB_SUFFIXES[fmt]}"
    if table:
        paths["table"] = out / "table" / f"{rel}.csv"
    for path in paths.values():
        if len(os.fsencode(path.name)) > _NAME_MAX:
            raise DataError(f"its output name would be {len(os.fsencode(path.name))} bytes long, over the "
                            f"{_NAME_MAX} a file name may have; rename the input to a shorter name")
    return paths


MASK_MODES = ("binary", "classes", "instances")


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value


class _StackWriter:
    """Append 2D pages to a TIFF in a temporary file; :meth:`close` renames it into place."""

    def __init__(self, path: Path, calibration: dict[str, Any], pages: int = 1, ome: dict | None = None) -> None:
        self.path, self.tmp, self.calibration, self.pages = path, partial_file(path), dict(calibration), pages
        self.ome = ome  # ome_description's keywords other than the pages': an OME-TIFF of the input's axes
        self.writer: Any = None
        self.dtype: np.dtype | None = None  # the pages' type, once the first is written

    def append(self, page: np.ndarray) -> None:
        self.dtype = page.dtype
        if self.writer is None:
            import tifffile

            # a classic TIFF, which ImageJ's own opener reads, unless the pages could pass its 4 GB limit
            self.writer = tifffile.TiffWriter(self.tmp, bigtiff=self.pages * page.nbytes > 2**32 - 2**26)
            description = ome_description(page.dtype, page.shape, **self.ome) if self.ome is not None else None
            if description is not None:  # in place of ImageJ's: OME-XML states Z and T in either order
                self.calibration["description"] = description
        # metadata=None: plain pages that readers see as one stack of len(pages) slices; ImageJ's
        # description (unit, slice spacing) goes on the first page only. ImageJ reads the pages of an
        # uncompressed file with that description as one block from the first page's data on, not by their
        # directories: uncompressed pages (the probability maps) are written contiguously, their directories
        # at the end
        compression = "zlib" if page.dtype.kind in "iub" else None
        self.writer.write(page, compression=compression, photometric="minisblack", metadata=None,
                          contiguous=compression is None, **self.calibration)
        self.calibration.pop("description", None)

    def close(self, keep: bool = True) -> None:
        if self.writer is None and keep:  # no page came: still a well-formed (empty) TIFF, as before
            import tifffile

            self.writer = tifffile.TiffWriter(self.tmp)
        if keep:
            if self.writer is not None:
                self.writer.close()
            os.replace(self.tmp, self.path)
            return
        try:  # discarded: closing writes what is left (a contiguous stack's page directories), which may fail
            if self.writer is not None:  # as the write before it did (a full disk); the file goes all the same
                with contextlib.suppress(OSError):
                    self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class _VolumeSink:
    """Collects the slices of one input and writes its outputs when the last slice arrives."""

    def __init__(self, item: dict, fmt: str, paths: dict[str, Path], pages: int, options: dict) -> None:
        self.item, self.fmt, self.paths, self.pages, self.options = item, fmt, paths, pages, options
        self.seen = 0
        self.table: list[dict] | None = [] if "table" in paths else None
        self.stacks: dict[str, _StackWriter] = {}
        self.volumes: dict[str, np.ndarray] = {}
        self.series: Any = None
        if fmt == "dicom-seg":  # a series no SEG can be built for is refused now, not after its last slice
            from medseg import dicom

            self.series = dicom.series_geometry(dicom.find_series(item["image"], item.get("series_uid") or None))
            dicom.check_seg(self.series, **options)
        if fmt in ("nrrd", "metaimage"):  # a series no such file can hold is refused now, not after its last slice
            self.itk_geometry = _itk_geometry(_geometry(item), item["image"])
        # the NIfTI outputs' place, read once; a place of NaN no NIfTI holds is refused now
        self.meta = _geometry(item) if fmt == "nifti" or (fmt == "dicom-seg" and "prob" in paths) else None
        if self.meta is not None:
            meta = self.meta
            if not np.isfinite(np.asarray(meta.get("nifti_affine", meta["affine"]), dtype=np.float64)).all():
                raise DataError(f"{item['image']}: its header places it nowhere: its affine holds values that are "
                                "not numbers (NaN or infinity); mend its header")
        if fmt == "tiff":
            meta = _geometry(item)
            geometry = {"spacing": tuple(meta["spacing"]), "unit": _tiff_unit(meta), "lead": meta.get("lead_sizes"),
                        "frame_interval": meta.get("frame_interval")}
            calibration = tiff_calibration(pages=pages, **geometry)
            ome = geometry if meta.get("ome") else None
            self.stacks = {k: _StackWriter(p, calibration, pages, ome) for k, p in paths.items() if k != "table"}

    def add(self, page: int, mask: np.ndarray, prob: np.ndarray, rows: list[dict] | None = None) -> bool:
        """Take slice ``page``; return True when the input is complete (and written)."""
        if page != self.seen:
            raise RuntimeError(f"slice {page} of {self.item['name']} arrived after {self.seen - 1}; "
                               "keep the slices of an input in order")
        arrays = {"mask": mask, "prob": prob}
        first = self.stacks["mask"].dtype if self.stacks else getattr(self.volumes.get("mask"), "dtype", None)
        if first is not None and mask.dtype.itemsize < first.itemsize:
            arrays["mask"] = mask.astype(first)  # labels of a slice after one of over 65535 objects
        elif first is not None and mask.dtype.itemsize > first.itemsize:
            if self.stacks:  # the pages written hold 16 bits: one stack is one type
                raise DataError(f"slice {page}: {mask.max()} objects, over the 65535 labels the 16-bit slices "
                                "before it hold; use --format nifti")
            self.volumes["mask"] = self.volumes["mask"].astype(mask.dtype)
        if self.table is not None and rows:
            self.table.extend(rows)
        if self.stacks:
            for key, writer in self.stacks.items():
                writer.append(arrays[key])
        else:
            for key in ("mask", "prob"):
                if key not in self.paths:
                    continue
                if key not in self.volumes:
                    self.volumes[key] = np.zeros((self.pages, *mask.shape), dtype=arrays[key].dtype)
                self.volumes[key][page] = arrays[key]
        self.seen += 1
        if self.seen < self.pages:
            return False
        self._finish()
        return True

    def _finish(self) -> None:
        if self.table is not None:
            from medseg.instances import write_measurements_csv

            write_measurements_csv(self.paths["table"], self.table, slices=self.pages > 1)
        if self.stacks:
            for writer in self.stacks.values():
                writer.close()
            return
        mask = self.volumes["mask"]
        if self.fmt == "dicom-seg":
            from medseg import dicom

            dicom.write_seg(self.paths["mask"], mask, self.series, **self.options)
        elif self.fmt in ("nrrd", "metaimage"):
            from medseg.itkfiles import write_image

            geometry, two_d = self.itk_geometry
            for key in ("mask", "prob"):
                if key in self.paths:
                    write_image(self.paths[key], self.volumes[key][0] if two_d else self.volumes[key], geometry)
            return
        meta = self.meta
        if self.fmt != "dicom-seg":  # nifti
            write_nifti(self.paths["mask"], *_nifti_layout(mask, meta), **_nifti_header(meta))
        if "prob" in self.paths:
            write_nifti(self.paths["prob"], *_nifti_layout(self.volumes["prob"], meta), **_nifti_header(meta))

    def abort(self) -> None:
        for writer in self.stacks.values():
            writer.close(keep=False)
        self.volumes.clear()


def _tiff_unit(meta: dict) -> str:
    """The unit a TIFF output is calibrated in: none for a NIfTI that gives no unit (read as mm otherwise)."""
    return "pixel" if str(meta.get("nifti_unit", "")) == "unknown" else str(meta["spacing_unit"])


def pixel_micrometres(meta: dict) -> tuple[float, float] | None:
    """A slice's pixel size ``(y, x)`` in micrometres from an input's metadata (:func:`medseg.readers.read_image`):
    TIFF resolution, OME or ImageJ calibration, DICOM pixel spacing, NIfTI voxel size; ``None`` for an
    uncalibrated input (a PNG, a TIFF without resolution, a NIfTI of unknown unit, a DICOM image without a
    usable pixel spacing)."""
    from medseg.readers import _micrometres

    if meta.get("pixel_size_stated") is False:
        return None
    factor = _micrometres(_tiff_unit(meta))  # the readers' mm, um, meter; None for pixel
    spacing = [float(v) for v in np.asarray(meta.get("spacing", ())).ravel()]
    if factor is None or len(spacing) < 2 or not all(v > 0 and np.isfinite(v) for v in spacing[-2:]):
        return None
    return spacing[-2] * factor, spacing[-1] * factor


def _geometry(item: dict) -> dict:
    """The source's metadata (affine, spacing, NIfTI layout) without its voxels."""
    from medseg.readers import read_geometry

    return read_geometry(item["image"], series_uid=item.get("series_uid") or None,
                         nifti_channel_dim=item.get("nifti_channel_dim"))


def _itk_geometry(meta: dict, source: str) -> tuple[Any, bool]:
    """``(geometry, two_d)`` of a NRRD or MetaImage mask of an input: its :class:`medseg.itkfiles.Geometry`
    where ITK (and so 3D Slicer) places the input, and whether the mask is 2D (as ITK reads the input):

    * NRRD, MetaImage: the header's own numbers and unit word (ITK reads the numbers as they stand, whatever
      the unit; medseg reads the mask's unit as the input's);
    * NIfTI: as ITK reads its header (its choice of qform or sform, in mm);
    * DICOM: the series' place in mm, its slices straight along the normal, as ITK stacks a series (a tilted
      one too);
    * PNG, TIFF: a picture's pixels where ITK places them, sized as medseg reads them, in mm;

    ``None`` for an input without a pixel size or a place.

    Raises:
        DataError: a time series (a TIFF's frames), which these masks hold as space; a header that places the
            image nowhere usable (a pixel size of 0, values that are not numbers).
    """
    from medseg.itkfiles import Geometry
    from medseg.readers import _micrometres

    lead = "".join(a for a, _ in meta.get("lead_sizes") or ())
    if "T" in lead:
        raise DataError(f"{source}: a time series; a NRRD or MetaImage mask holds space only: use --format tiff "
                        "or nifti")
    physical = _micrometres(_tiff_unit(meta)) is not None and meta.get("pixel_size_stated") is not False
    placed = _itk_placed(meta, source)
    if placed is None:
        with np.errstate(invalid="ignore", divide="ignore"):  # a broken header's NaN are refused below
            placed = _placed_by_affine(meta)
    spacing, origin, direction, word = placed
    flipped = spacing < 0  # a negative pixel size (ITK gives one for a NIfTI without codes): the axis turned
    spacing, direction = np.abs(spacing), direction * np.where(flipped, -1.0, 1.0)
    if not (np.isfinite(spacing).all() and np.isfinite(origin).all() and np.isfinite(direction).all()
            and spacing.all() and abs(np.linalg.det(direction)) > 1e-6):
        raise DataError(f"{source}: its header places it nowhere usable (pixel size "
                        f"{' × '.join(f'{v:g}' for v in spacing)}, origin {' '.join(f'{v:g}' for v in origin)}); "
                        "mend its header, or use --format tiff")
    if word is None and physical:
        word = "mm"
    if word is None and np.allclose(spacing, 1.0) and not np.any(origin) and \
            np.allclose(direction, np.eye(len(spacing))):
        return None, len(spacing) == 2  # pixels, nowhere in particular: a mask without a pixel size, as the input
    return Geometry(tuple(map(float, spacing)), tuple(map(float, origin)), direction, word), len(spacing) == 2


def _itk_placed(meta: dict, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None] | None:
    """``(spacing, origin, direction, unit word)`` of a NRRD, MetaImage or NIfTI input as ITK reads its header
    (``None`` for other inputs, and for a NIfTI header ITK cannot read, one holding values that are not numbers,
    which ITK's reader never returns from, or one whose grid is not the one medseg reads)."""
    if meta.get("format") == "itk":
        from medseg.readers import ItkReader

        head = ItkReader()._header(source)
        word = head["header"].unit_word
        return (np.asarray(head["spacing"], dtype=np.float64), np.asarray(head["origin"], dtype=np.float64),
                np.asarray(head["direction"], dtype=np.float64), word)
    if meta.get("format") != "nifti" or not _finite_nifti_header(source):  # ITK spins forever on an infinity
        return None
    import itk

    shape = tuple(int(s) for s in np.asarray(meta.get("nifti_shape", ())).ravel())
    warnings = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)  # its words on the console of a header it reads all the same
    try:
        io = itk.ImageIOFactory.CreateImageIO(source, itk.CommonEnums.IOFileMode_ReadMode)
        if io is None or io.GetNameOfClass() != "NiftiImageIO":
            return None
        io.SetFileName(source)
        io.ReadImageInformation()
        dims = min(int(io.GetNumberOfDimensions()), 3)
        size = tuple(int(io.GetDimensions(i)) for i in range(dims))
        spacing = np.array([io.GetSpacing(i) for i in range(dims)], dtype=np.float64)
        origin = np.array([io.GetOrigin(i) for i in range(dims)], dtype=np.float64)
        direction = np.array([list(io.GetDirection(i))[:dims] for i in range(dims)], dtype=np.float64).T
    except (RuntimeError, OSError, ValueError):
        return None
    finally:
        itk.Object.SetGlobalWarningDisplay(warnings)
    if size != shape[:dims]:  # not the voxel grid medseg reads (a layout of its own): placed by the affine
        return None
    return spacing, origin, direction, None


def _finite_nifti_header(source: str) -> bool:
    """Whether a NIfTI header's voxel sizes, qform and sform are all finite numbers (and nibabel reads it)."""
    import nibabel as nib

    try:
        header = nib.load(source).header
        numbers = [np.asarray(header["pixdim"], dtype=np.float64)[:4], header.get_sform(), header.get_qform()]
    except Exception:  # noqa: BLE001 - any header nibabel cannot read is placed by medseg's own reading
        return False
    return all(np.isfinite(n).all() for n in numbers)


def _placed_by_affine(meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
    """``(spacing, origin, direction, None)`` in LPS, in mm, from medseg's own reading of an input."""
    from medseg.dicom import LPS_TO_RAS
    from medseg.readers import _micrometres

    picture = meta.get("format") in ("png", "tiff")
    factor = (_micrometres(_tiff_unit(meta)) or 1000.0) / 1000.0  # to mm (pixels as they stand)
    if picture:
        spacing = [float(v) * factor for v in np.asarray(meta["spacing"]).ravel()][::-1]  # (x, y[, z])
        lps = np.diag([*spacing[:2], spacing[2] if len(spacing) > 2 else 1.0, 1.0])
        if len(meta["spatial_shape"]) == 2:
            return np.array(spacing[:2]), np.zeros(2), np.eye(2), None
    else:  # (z, y, x) columns in RAS -> (x, y, z) in LPS; a tilted DICOM stack straight, as ITK stacks it
        affine = meta["straight_affine"] if "straight_affine" in meta else meta["affine"]
        lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64).reshape(4, 4)[:, [2, 1, 0, 3]]
        lps[:3] *= factor
    axes = _normal_of_rows(lps[:3, :3]) if meta.get("format") == "dicom" else lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / np.where(spacing > 0, spacing, 1.0)
    return spacing, lps[:3, 3], direction, None


def _nifti_layout(volume: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, Y, X)`` slices to the NIfTI voxel order and affine of the source (or of our contract)."""
    if "nifti_affine" in meta:  # back to the input file's own (X, Y[, Z]) order and affine
        shape = tuple(int(s) for s in meta["nifti_shape"][:3])
        data = volume.transpose(2, 1, 0)
        return data.reshape(shape if len(shape) >= 2 else data.shape), meta["nifti_affine"]
    affine = np.asarray(meta["affine"], dtype=np.float64)
    if meta.get("format") in ("png", "tiff"):  # a picture: pixel (x, y[, z]) at (x·sx, y·sy[, z·sz]) in ITK's
        # LPS frame, as ITK (SimpleITK, 3D Slicer, ITK-SNAP) places the PNG or TIFF itself; RAS flips x and y
        spacing = [float(v) for v in np.asarray(meta["spacing"]).ravel()][::-1]  # (x, y[, z])
        lead = tuple(meta.get("lead_sizes") or ())
        letters = "".join(a for a, _ in lead)
        if letters in ("T", "TZ", "ZT"):  # frames (of slices): time is the fourth axis, not more slices in space
            volume = volume.reshape(*(n for _, n in lead), *volume.shape[-2:])
            volume = volume[:, None] if letters == "T" else volume.swapaxes(0, 1) if letters == "ZT" else volume
            z = spacing[2] if "Z" in letters else 1.0
            return volume.transpose(3, 2, 1, 0), np.diag([-spacing[0], -spacing[1], z, 1.0])
        flip = np.diag([-spacing[0], -spacing[1], spacing[2] if len(spacing) > 2 else 1.0, 1.0])
        return (volume[0].T if len(meta["spatial_shape"]) == 2 else volume.transpose(2, 1, 0)), flip
    if len(meta["spatial_shape"]) == 2:  # 2D source: (1, Y, X) -> (X, Y)
        return volume[0].T, affine[:, [1, 0, 2, 3]]
    return volume.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]


def _nifti_header(meta: dict) -> dict[str, Any]:
    """The spatial unit, sform/qform codes and frame interval of the source, for :func:`medseg.io.write_nifti`."""
    header: dict[str, Any] = {"unit": str(meta.get("nifti_unit") or meta.get("spacing_unit") or "mm"),
                              "frame_interval": meta.get("frame_interval")}
    if "nifti_codes" in meta:
        header["codes"] = tuple(int(c) for c in np.asarray(meta["nifti_codes"]).ravel()[:2])
    if "nifti_qform" in meta:  # the input's own qform, which may differ from its sform
        header["qform"] = np.asarray(meta["nifti_qform"], dtype=np.float64).reshape(4, 4)
    elif "straight_affine" in meta:  # a tilted DICOM stack: a qform holds no shear, so the stack straight
        header["qform"] = np.asarray(meta["straight_affine"], dtype=np.float64).reshape(4, 4)[:, [2, 1, 0, 3]]
    return header


def _normal_of_rows(axes: np.ndarray) -> np.ndarray:
    """``axes`` (columns x, y, z of a DICOM stack) with z along the normal ITK takes, the cross product of the
    row and column directions, its length and side kept."""
    axes = np.array(axes, dtype=np.float64)
    lengths = np.linalg.norm(axes, axis=0)
    if not (np.isfinite(axes).all() and lengths.all()):
        return axes
    normal = np.cross(axes[:, 0] / lengths[0], axes[:, 1] / lengths[1])
    if not np.linalg.norm(normal):
        return axes
    axes[:, 2] = normal / np.linalg.norm(normal) * lengths[2] * (1.0 if normal @ axes[:, 2] >= 0 else -1.0)
    return axes


def _class_values(class_values: Any, class_map: Mapping | None, num_classes: int | None) -> np.ndarray | None:
    """The mask value of each class (``None``: class indices), checked before any input is written."""
    from medseg.transforms import class_mask_values

    if class_values is None:
        class_values = None if class_map is None else class_mask_values(class_map, num_classes)
        if class_values is None:
            return None
    shown = json.dumps(class_values, default=str)
    try:
        values = np.asarray(class_values, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros((0,))
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values % 1 == 0) \
            or values.min() < 0 or values.max() > 65535:
        raise ConfigValueError(f"class_values={shown}: give one whole number 0..65535 per class, e.g. "
                               "--set 'class_values=[0,128,255]'")
    if num_classes and values.size != int(num_classes):
        example = json.dumps(list(range(int(num_classes)))).replace(" ", "")
        raise ConfigValueError(f"class_values={shown}: {values.size} mask value(s) for {int(num_classes)} classes; "
                               f"give one per class, e.g. --set 'class_values={example}'")
    return values.astype(np.int64)


class SaveSegmentationd(MapTransform):
    """Save the mask (and optionally a probability map) of ``data[key]`` (softmax, ``(C, H, W)``) per slice.

    Slices of one input must arrive in order; its files are written when the last slice arrives.

    Args:
        keys: the prediction key(s).
        output_dir: folder receiving ``mask/``, ``prob/`` (and ``table/`` for instances).
        channel: the class channel of a binary mask and its probability map.
        threshold: binary mask = probability > threshold.
        save_prob: also write the float32 probability map.
        output_format: ``auto`` (the input's own kind) or one of :data:`OUTPUT_FORMATS`.
        segment_label: the class name recorded in DICOM SEG.
        algorithm: the bundle's name recorded in DICOM SEG.
        algorithm_version: its version.
        nifti_channel_dim: the channel axis of 4D NIfTI inputs (as given to their reader).
        mask_mode: ``binary``, ``classes`` or ``instances`` (see the module's description).
        class_values: for ``classes``, the PNG/TIFF value of each class (default: from ``class_map``, else the
            class index).
        class_map: for ``classes``, the training's pixel value -> class map, whose values the masks then hold
            (:func:`medseg.transforms.class_mask_values`) unless ``class_values`` is given.
        num_classes: for ``classes``, the network's class count, which ``class_values`` must cover.
        postprocess: for ``instances``, a callable ``(C, H, W)`` probabilities -> instance labels.
        measure_channels: for ``instances``, the input channels the table's ``mean_intensity`` averages: those
            the network reads (the bundle's ``input_channels``); ``None``: all.

    The instance table's ``mean_intensity`` is measured on the input's own pixel values, not on the network's
    normalised input. Labels are ``uint16``, or ``uint32`` for a slice of over 65535 objects (not in a PNG).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        channel: int = 1,
        threshold: float = 0.5,
        save_prob: bool = True,
        output_format: str = "auto",
        segment_label: str = "foreground",
        algorithm: str = "medseg",
        algorithm_version: str = "0",
        nifti_channel_dim: int | None = None,
        mask_mode: str = "binary",
        class_values: list[int] | None = None,
        postprocess: Any = None,
        class_map: Mapping | None = None,
        num_classes: int | None = None,
        measure_channels: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
        if mask_mode == "instances" and postprocess is None:
            raise ValueError("mask_mode 'instances' needs a postprocess callable (e.g. WatershedInstances)")
        if output_format == "dicom-seg" and mask_mode != "binary":  # before any input, not once per input
            raise DataError(f"DICOM SEG output holds binary masks; this bundle writes {mask_mode}: "
                            "use --format nifti")
        self.output_dir = Path(output_dir)
        if output_format not in ("auto", "", None, *OUTPUT_FORMATS):  # before any input, not once per input
            raise DataError(f"unknown output format '{output_format}'; choose auto, {', '.join(OUTPUT_FORMATS)}")
        self.channel, self.threshold, self.save_prob = channel, threshold, config_flag(save_prob, "save_prob")
        self.output_format, self.nifti_channel_dim = output_format, nifti_channel_dim
        self.mask_mode, self.postprocess = mask_mode, postprocess
        if measure_channels is not None and (not isinstance(measure_channels, (list, tuple)) or not measure_channels
                                             or any(not isinstance(c, int) or isinstance(c, bool) or c < 0
                                                    for c in measure_channels)):
            raise ValueError(f"measure_channels must be channel numbers from 0 (e.g. [1]) or None, got "
                             f"{measure_channels!r}")
        self.measure_channels = None if measure_channels is None else list(measure_channels)
        self.class_values = _class_values(class_values, class_map, num_classes) if mask_mode == "classes" else None
        self.options = {"segment_label": segment_label, "algorithm": algorithm,
                        "algorithm_version": algorithm_version}
        self._open: dict[str, _VolumeSink] = {}
        #: objects found per input name (instances mode), read by the batch runner
        self.object_counts: dict[str, int] = {}
        self._unnamed: dict[str, str] = {}  # stem -> the file written under it, for samples given without a name
        self._calibration: tuple[str, tuple[float, float] | None] | None = None  # (input, its pixel in µm)

    def _format(self, input_format: str, slices: int, source: str | None = None) -> str:
        output_format = self.output_format
        if self.mask_mode != "binary" and input_format == "dicom" and output_format in ("auto", "", None):
            output_format = "nifti"  # DICOM SEG holds binary masks: class and instance labels of DICOM go to NIfTI
        # DICOM SEG with class or instance labels was refused in __init__
        return mask_format(input_format, output_format, slices, source)

    def paths_for(self, rel: str, input_format: str, slices: int, source: str | None = None) -> dict[str, Path]:
        """The files this writer produces for an input (used to skip inputs whose outputs exist); ``source``: the
        input's file (NRRD or MetaImage)."""
        return output_paths(self.output_dir, rel, self._format(input_format, slices, source), self.save_prob,
                            table=self.mask_mode == "instances")

    def mask_of(self, pred: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask in the values ``fmt`` stores, probability map) of one slice."""
        if self.mask_mode == "binary":
            prob = np.asarray(pred[self.channel], dtype=np.float32)  # no copy of a float32 map (large slices)
            on = prob > self.threshold
            return (on.astype(np.uint8) if fmt in ("nifti", "nrrd", "metaimage")
                    else np.where(on, np.uint8(255), np.uint8(0))), prob
        prob = (1.0 - pred[0]).astype(np.float32)
        if self.mask_mode == "classes":
            index = pred.argmax(axis=0)
            top = pred.shape[0] - 1  # the dtype follows the values possible, not this slice's: pages agree
            if fmt in ("png", "tiff") and self.class_values is not None:
                index, top = self.class_values[index], int(self.class_values.max(initial=0))
            return index.astype(np.uint8 if top < 256 else np.uint16), prob
        labels = np.asarray(self.postprocess(pred))
        if labels.max(initial=0) <= 65535:
            return labels.astype(np.uint16), prob
        if fmt == "png":  # a PNG holds 16 bits at most
            raise DataError(f"{labels.max()} objects in one slice, over the 65535 labels a 16-bit PNG holds; use "
                            "--format tiff or nifti, which hold 32-bit labels")
        return labels.astype(np.uint32), prob

    def measure(self, labels: np.ndarray, intensity: np.ndarray | None, source: str = "the image",
                pixel_um: tuple[float, float] | None = None) -> list[dict]:
        """The instance table of ``labels`` (:func:`medseg.instances.measure_instances`) on ``intensity``, the
        input's own values (``(C, H, W)`` or ``(H, W)``): of the channels ``measure_channels`` names where it
        has them, the others averaged; none when its size differs from the labels' (the labels are on the
        input's own grid, also after object-size normalisation, so only a caller's own arrays can differ).
        ``pixel_um``: the input's pixel size in micrometres (:func:`pixel_micrometres`), for the ``_um``
        columns."""
        from medseg.instances import measure_instances

        if intensity is not None and intensity.shape[-2:] != labels.shape:
            intensity = None
        if intensity is not None and intensity.ndim == 3 and self.measure_channels is not None:
            if max(self.measure_channels) >= intensity.shape[0]:
                count = intensity.shape[0]
                raise DataError(f"{source}: {count} channel{'s' * (count != 1)}, and the table measures channels "
                                f"{self.measure_channels}; channels count from 0")
            intensity = intensity[self.measure_channels]
        return measure_instances(labels, intensity, pixel_um=pixel_um)

    def _measure(self, labels: np.ndarray, item: dict, page: int, pages: int) -> list[dict]:
        from medseg.readers import read_slice

        intensity = read_slice(item["image"], page, series_uid=item["series_uid"] or None,
                               nifti_channel_dim=self.nifti_channel_dim)
        key = f"{item['image']}\0{item['series_uid']}"
        if page == 0 or self._calibration is None or self._calibration[0] != key:  # a header read per input
            self._calibration = (key, pixel_micrometres(_geometry(item)))
        rows = self.measure(labels, intensity, item["image"], self._calibration[1])
        return [{"slice": page, **r} for r in rows] if pages > 1 else rows

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        source = str(d.get("image_file", d.get("image", "")))
        # the slice list names each input by its place in the input folder; a caller of its own, the file's stem
        name = str(d["name"]) if "name" in d else Path(source).name[: -len(suffix_of(source)) or None]
        if "name" not in d and self._unnamed.setdefault(name, source) != source:
            raise DataError(f"{source}: its outputs would replace those of {self._unnamed[name]} (both named "
                            f"'{name}' by their files); give each sample its own 'name'")
        page, pages = int(_scalar(d.get("page", 0))), int(_scalar(d.get("pages", 1)))
        input_format = str(d.get("format") or _format_of(source))
        item = {"image": source, "series_uid": str(d.get("series_uid") or ""), "name": name,
                "nifti_channel_dim": self.nifti_channel_dim}
        fmt = self._format(input_format, pages, source)
        paths = output_paths(self.output_dir, name, fmt, self.save_prob, table=self.mask_mode == "instances")
        for key in self.key_iterator(d):
            pred = d[key]
            pred = convert_to_numpy(pred, wrap_sequence=True)
            mask, prob = self.mask_of(pred, fmt)
            rows = self._measure(mask, item, page, pages) if "table" in paths else None
            if rows is not None:
                self.object_counts[name] = (0 if page == 0 else self.object_counts.get(name, 0)) + len(rows)
            single_2d = pages == 1 and fmt in ("png", "tiff")
            if single_2d:
                # the TIFF outputs carry the input's pixel size (a header read; none for a plain PNG mask)
                meta = _geometry(item) if fmt == "tiff" or self.save_prob else {}
                if fmt == "png":
                    write_png(paths["mask"], mask)
                else:
                    write_tiff(paths["mask"], mask, meta["spacing"], _tiff_unit(meta), ome=bool(meta.get("ome")))
                if self.save_prob:
                    write_tiff(paths["prob"], prob, meta["spacing"], _tiff_unit(meta), ome=bool(meta.get("ome")))
                if rows is not None:
                    from medseg.instances import write_measurements_csv

                    write_measurements_csv(paths["table"], rows)
            else:
                if page == 0:
                    if name in self._open:  # an unfinished earlier run of this input
                        self._open.pop(name).abort()
                    self._open[name] = _VolumeSink(item, fmt, paths, pages, self.options)
                sink = self._open.get(name)
                if sink is None:
                    raise RuntimeError(f"slice {page} of {name} arrived before slice 0; keep slices in order")
                if sink.add(page, mask, prob, rows):
                    del self._open[name]
            d[f"{key}_mask_file"] = str(paths["mask"])
        return d

    def abort(self) -> None:
        """Discard every unfinished input (after a failure): no partial file is left behind."""
        for sink in self._open.values():
            sink.abort()
        self._open.clear()


def _format_of(source: str) -> str:
    from medseg.readers import format_of

    return format_of(source)
