"""NRRD and MetaImage files in Python: headers read (their data files, whether their voxels are whole, and what
ITK does not report: a stated pixel size, spatial units, colour kinds), and masks written in the same kinds."""

from __future__ import annotations

import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DataError

#: NRRD's ``space units`` -> (the unit medseg reports, its size in that unit)
_UNITS = {"mm": ("mm", 1.0), "millimeter": ("mm", 1.0), "millimeters": ("mm", 1.0), "millimetre": ("mm", 1.0),
          "cm": ("mm", 10.0), "centimeter": ("mm", 10.0), "m": ("mm", 1000.0), "meter": ("mm", 1000.0),
          "meters": ("mm", 1000.0), "metre": ("mm", 1000.0), "in": ("mm", 25.4), "inch": ("mm", 25.4),
          "um": ("um", 1.0), "µm": ("um", 1.0), "μm": ("um", 1.0), "micron": ("um", 1.0), "microns": ("um", 1.0),
          "micrometer": ("um", 1.0), "micrometers": ("um", 1.0), "micrometre": ("um", 1.0),
          "nm": ("um", 1e-3), "nanometer": ("um", 1e-3), "nanometers": ("um", 1e-3)}

#: bytes of a header read: an attached one (data follow it) at most 64 KiB; a detached one (``.nhdr``,
#: ``.mhd``: text alone, perhaps a list of thousands of data files) whole, up to 64 MiB
_HEAD, _DETACHED = 1 << 16, 64 << 20

#: the most data files a header may name (a list or pattern: one per slice)
_MOST_FILES = 1 << 20


@dataclass
class Header:
    """What a NRRD or MetaImage header says beyond ITK's own reading of it."""

    path: Path
    kind: str  # "nrrd" or "metaimage"
    fields: dict[str, str]  # by name in lower case, spaces left out: ``spacedirections``, ``elementspacing``
    offset: int | None = None  # where attached voxels start in the file (None: in data files of their own)
    data_files: list[Path] = field(default_factory=list)  # detached voxels, in order (a list's, each a part)

    @property
    def sized(self) -> bool:
        """Whether the header states a pixel size (else ITK gives 1 for each axis)."""
        if self.kind == "nrrd":
            directions = self.fields.get("spacedirections", "")
            return "(" in directions or any(_is_number(v) for v in self.fields.get("spacings", "").split())
        return "elementspacing" in self.fields or "elementsize" in self.fields

    @property
    def unit(self) -> tuple[str, float]:
        """The unit of the pixel size (``mm``, ``um``, or ``pixel`` where none is stated or its unit is not
        known) and the header's unit in it: NRRD's ``space units`` where all axes share one, else millimetres,
        as ITK and 3D Slicer take them."""
        if not self.sized:
            return "pixel", 1.0
        units = {u.lower() for u in self._unit_words()}
        if not units:
            return "mm", 1.0
        return _UNITS[units.pop()] if len(units) == 1 and next(iter(units)) in _UNITS else ("pixel", 1.0)

    @property
    def unit_word(self) -> str | None:
        """The unit of the pixel size as the header writes it (``microns``; ``µm`` as ``um``), where it states
        one for all its axes; ``unknown`` where it states others (units that differ between axes, an axis without
        one), which medseg reads as it reads the header: no pixel size; ``None`` where it states none."""
        if not self.sized:
            return None
        words = self._unit_words()
        if not words:
            return None
        word = words.pop() if len(words) == 1 else ""
        word = "um" if word in ("µm", "μm") else word  # the headers are ASCII
        # units that differ between axes, none for one, or a word no header can hold: one medseg reads as none
        return word if word and word.isascii() and word.isprintable() and '"' not in word else "unknown"

    def _unit_words(self) -> set[str]:
        """The units the header states for its axes: NRRD's ``space units``, else its per-axis ``units`` (a
        vector axis's empty one or ``???`` left out); MetaImage's ``DistanceUnits`` (ITK writes it where the image
        states one)."""
        if self.kind == "nrrd" and "spaceunits" in self.fields:  # an empty one: an axis without a unit
            return {u.strip() for u in re.findall(r'"([^"]*)"', self.fields["spaceunits"])}
        if self.kind == "nrrd":
            return {u.strip() for u in re.findall(r'"([^"]*)"', self.fields.get("units", ""))} - {"", "???"}
        word = self.fields.get("distanceunits", "").strip()
        return {word} if word else set()

    def colours(self, components: int, itemsize: int, pixel: str) -> bool:
        """Whether several values per voxel are a picture's colours: NRRD says so by its ``kinds``; otherwise
        ITK's RGB(A) pixel types, or three or four 8-bit values (a MetaImage cannot say)."""
        kinds = self.fields.get("kinds", "").lower() if self.kind == "nrrd" else ""
        if "rgb-color" in kinds or "rgba-color" in kinds:
            return True
        if any(k in kinds for k in ("vector", "list", "point", "normal", "complex", "quaternion", "covariant",
                                    "tensor", "matrix")):
            return False
        return pixel in ("rgb", "rgba") or (components in (3, 4) and itemsize == 1)


def _is_number(text: str) -> bool:
    try:
        return not math.isnan(float(text))
    except ValueError:
        return False


def _text(raw: bytes) -> str:
    """Header bytes as text: UTF-8 (``µm``), else Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_header(path: str | os.PathLike) -> Header:
    """The header of a NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file.

    Raises:
        DataError: the file cannot be opened, or it names data files that are not there or not as many as
            its slices.
    """
    path = Path(path)
    detached = path.suffix.lower() in (".nhdr", ".mhd")
    try:
        with open(path, "rb") as handle:
            head = handle.read(_DETACHED if detached else _HEAD)
    except OSError as err:
        raise DataError(f"{path}: cannot open the file ({err.strerror or err}); check its permissions") from err
    header = _nrrd(path, head) if head.startswith(b"NRRD") else _metaimage(path, head)
    missing = [f for f in header.data_files if not f.is_file()]
    if missing:
        name = os.path.relpath(missing[0], path.parent)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        files = "data file" if len(header.data_files) == 1 else "data files"
        raise DataError(f"{path}: its data file {name}{more} (named in the header) is not there; copy the header "
                        f"and its {files} together")
    return header


def _lines(head: bytes, stop) -> tuple[list[tuple[str, int]], int | None]:
    """Header lines (text, end offset) up to the line ``stop`` accepts (included), or to an empty line (the
    offset after it returned as where data start) or the end of ``head``."""
    lines, start = [], 0
    while start < len(head):
        end = head.find(b"\n", start)
        if end < 0:
            end = len(head)
        text = _text(head[start:end].rstrip(b"\r"))
        if not text.strip() and lines:
            return lines, end + 1
        lines.append((text, end + 1))
        if stop(text):
            return lines, end + 1
        start = end + 1
    return lines, None


def _key(name: str) -> str:
    """A field's name as kept: lower case without spaces (NRRD writes ``data file`` and ``datafile`` alike)."""
    return name.strip().lower().replace(" ", "")


def _numbers(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split()]
    except ValueError:
        return None


def _nrrd(path: Path, head: bytes) -> Header:
    lines, after_blank = _lines(head, lambda _text: False)
    fields: dict[str, str] = {}
    named_at = 0  # where the line naming the data files ends: a list of them follows it
    for text, end in lines[1:]:
        name, sep, value = text.partition(":")
        if text.startswith("#") or not sep or value.startswith("="):  # comments, key:=value pairs
            continue
        fields.setdefault(_key(name), value.strip())
        named_at = end if _key(name) == "datafile" and not named_at else named_at
    named = fields.get("datafile")
    if named is None:
        return Header(path, "nrrd", fields, offset=after_blank)
    sizes = _numbers(fields.get("sizes", ""))  # every axis, x fastest (a vector's values first)
    files = _data_files(path, named, head[named_at:], sizes, len(sizes or ()) - 1)
    return Header(path, "nrrd", fields, data_files=files)


def _metaimage(path: Path, head: bytes) -> Header:
    lines, _ = _lines(head, lambda text: _key(text.split("=", 1)[0]) == "elementdatafile")
    fields = {}
    for text, _ in lines:
        name, sep, value = text.partition("=")
        if sep:
            fields[_key(name)] = value.strip()
    dims = _numbers(fields.get("ndims", ""))
    if "ndims" in fields and (dims is None or len(dims) != 1 or not 1 <= dims[0] <= 10):  # ITK would spin forever
        raise DataError(f"{path}: NDims = {fields['ndims']} in its header, not a number of dimensions; the file is "
                        "corrupt: write it again from its source")
    sizes = _numbers(fields.get("dimsize", ""))  # spatial axes, x fastest (channels within each voxel)
    if "dimsize" in fields and (not sizes or min(sizes) < 1 or (dims and len(dims) == 1 and len(sizes) != dims[0])):
        raise DataError(f"{path}: DimSize = {fields['dimsize']} in its header, not {dims[0] if dims else 'its'} "
                        "sizes of 1 or more; the file is corrupt: write it again from its source")  # ITK wraps them
    named = fields.get("elementdatafile")
    if named is None or named.upper() == "LOCAL":
        return Header(path, "metaimage", fields, offset=lines[-1][1] if named else None)
    files = _data_files(path, named, head[lines[-1][1]:], sizes, len(sizes or ()) - 1, metaimage=True)
    return Header(path, "metaimage", fields, data_files=files)


def _data_files(path: Path, named: str, after: bytes, sizes: list[int] | None, slab: int,
                metaimage: bool = False) -> list[Path]:
    """The data files a header names: one file (its name may hold spaces), ``LIST`` (one name per line after
    the field), or a ``printf`` pattern with first, last and step numbers; a list or pattern may end with the
    dimension of each file's part (``slab``: by default, one slice of the slowest axis).

    Raises:
        DataError: a list or pattern that does not name one file per part of the image.
    """
    folder = path.parent
    parts = named.split()
    is_list = parts[0] == "LIST"  # the word itself, in capitals: list.raw is a file
    if metaimage and not is_list and named.startswith("LIST"):  # ITK's MetaImage reader takes it for a list
        raise DataError(f"{path}: its data file {named} starts with LIST, which ITK's MetaImage reader takes for a "
                        "list of files; rename the data file (and ElementDataFile)")
    pattern = not is_list and "%" in named and len(parts) >= 4 and \
        all(re.fullmatch(r"-?\d+", p) for p in parts[1:4])
    if not is_list and not pattern:
        return [folder / named]
    extra = parts[1:2] if is_list else parts[4:5]
    if extra and re.fullmatch(r"\d+[dD]?", extra[0]):
        slab = int(extra[0].rstrip("dD"))
        # ITK's MetaImage reader takes no part size after a pattern, nor a list of whole images: wrong voxels
        if metaimage and (not is_list or (sizes and slab >= len(sizes))):
            raise DataError(f"{path}: its header's ElementDataFile = {named} gives each data file a part ITK "
                            "misreads; name one file per slice (without the part size)")
    wanted = math.prod(sizes[slab:]) if sizes and 0 < slab <= len(sizes) else None  # files the image needs
    if is_list:
        names = [n.strip() for n in _text(after).splitlines() if n.strip()]
        count = len(names)
    else:
        first, last, step = (int(p) for p in parts[1:4])
        numbers = range(first, last + (1 if step > 0 else -1), step) if step else range(0)
        try:
            count = len(numbers)
        except OverflowError:  # more than a machine word holds
            count = _MOST_FILES + 1
    if count == 0 or count > _MOST_FILES or (wanted is not None and count != wanted):
        said = (f"{count} data file{'s' * (count != 1)}" if count <= _MOST_FILES else "too many data files") \
            if count else "no data files"
        need = f" for the image's {wanted} parts" if wanted is not None else ""
        raise DataError(f"{path}: its header names {said}{need} ({named}); give one data file per part, as "
                        "the header's sizes say")
    if is_list:
        return [folder / n for n in names]
    try:
        if len(parts[0] % numbers[0]) > 4096:  # a width no file name has (%99999999d)
            raise ValueError("a name over 4096 characters")
        return [folder / (parts[0] % n) for n in numbers]
    except (TypeError, ValueError, OverflowError, MemoryError) as err:
        raise DataError(f"{path}: its header's data file pattern {parts[0]} cannot name files ({err}); give a "
                        "pattern with one number, such as slice%03d.raw") from err


def check_voxels(header: Header, expected: int) -> None:
    """Refuse voxels cut short or compressed data that are damaged, before ITK reads them: ITK would read a
    short file with a message of its own on the console, and takes damaged gzip or zlib data without checking
    their checksum, giving wrong voxels. ``expected`` is the byte count the header's size and type make.

    Raises:
        DataError: the voxels are incomplete or damaged, or stored in a way ITK misreads (one line naming the
            file).
    """
    fields = header.fields
    if any(k in fields for k in ("lineskip", "byteskip", "headersize")):
        return  # data placed by offsets of their own: left to ITK
    if header.kind == "nrrd":
        encoding = fields.get("encoding", "raw").lower()
        compressed = encoding in ("gzip", "gz")
        if encoding not in ("raw", "gzip", "gz"):
            return  # text encodings and bzip2: ITK's own checks
    else:
        if fields.get("binarydata", "true").lower() == "false":
            return  # voxels as text
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if compressed and not header.data_files and "compresseddatasize" not in fields:
            raise DataError(f"{header.path}: compressed voxels in the file itself without CompressedDataSize in its "
                            "header, which ITK misreads; write it again with a tool that states it (ITK, 3D Slicer), "
                            "or store the voxels in a .zraw data file")
    if header.data_files:
        sources = [(f, 0) for f in header.data_files]
        part = expected // len(sources)
    elif header.offset is not None:
        sources, part = [(header.path, header.offset)], expected
    else:
        return
    for source, offset in sources:
        where = f" in {os.path.relpath(source, header.path.parent)}" if header.data_files else ""
        if not compressed:
            available = source.stat().st_size - offset
            if available < part:
                raise DataError(f"{header.path}: its voxels are cut short ({max(available, 0):,} of {part:,} "
                                f"bytes{where}); the file is truncated: copy it again from its source")
            continue
        produced, whole = _inflated_size(source, offset, header.path, where)
        if produced < part or not whole:
            raise DataError(f"{header.path}: its compressed voxels are cut short ({produced:,} of {part:,} bytes "
                            f"once decompressed{where}); the file is truncated: copy it again from its source")


_GZIP = b"\x1f\x8b"


def _inflated_size(source: Path, offset: int, path: Path, where: str) -> tuple[int, bool]:
    """Bytes the gzip or zlib data at ``offset`` of ``source`` decompress to, each checksum checked (gzip
    members one after another, as ``bgzip`` and ``pigz`` write them, included), and whether the data end whole
    (else the file was cut short)."""
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a zlib or a gzip header, whichever it has
    produced, data = 0, b""
    try:
        with open(source, "rb") as handle:
            handle.seek(offset)
            while True:
                if not data:
                    data = handle.read(1 << 20)
                    if not data:
                        return produced, inflate.eof
                if inflate.eof:  # a member ended: another follows, or the data end here
                    if len(data) < 2:
                        data += handle.read(1 << 20)
                    if not data.startswith(_GZIP):
                        return produced, True
                    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)
                # at most 16 MiB out at a time: zeros compress a thousandfold
                produced += len(inflate.decompress(data, 1 << 24))
                data = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
    except zlib.error as err:
        raise DataError(f"{path}: its compressed voxels are damaged ({err}{where}); the file is corrupt: copy it "
                        "again from its source") from err


#: the value types written -> (NRRD ``type``, MetaImage ``ElementType``)
_TYPES = {"uint8": ("uint8", "MET_UCHAR"), "uint16": ("uint16", "MET_USHORT"), "uint32": ("uint32", "MET_UINT"),
          "float32": ("float", "MET_FLOAT")}
#: file suffix -> the kind written
WRITTEN = {".nrrd": "nrrd", ".mha": "metaimage"}


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie, as ITK states it: per axis (x, y[, z]) the spacing, the origin and the
    direction cosines (``direction[:, i]`` is axis i's) in LPS, in ``unit``: the word the header states
    (``mm``, ``um``, a NRRD's own such as ``cm`` or ``microns``, ``unknown``); ``None``: none stated, which
    ITK, 3D Slicer and medseg read as millimetres."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    unit: str | None = None


def _num(value: float) -> str:
    """The shortest text that reads back as the same double."""
    return repr(float(value)).replace("inf", "Inf")


def _deflated(arr: np.ndarray, gzip: bool, level: int = 1) -> list[bytes]:
    """``arr``'s bytes (little-endian, C order) compressed: a gzip member (NRRD) or a zlib stream (MetaImage),
    16 MiB at a time so that a large volume is not copied whole first."""
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    raw = memoryview(data).cast("B") if data.size else memoryview(b"")
    pack = zlib.compressobj(level, zlib.DEFLATED, 31 if gzip else 15)
    step = 1 << 24
    pieces = [pack.compress(raw[i:i + step]) for i in range(0, len(raw), step)]
    return [*pieces, pack.flush()]


def image_bytes(kind: str, arr: np.ndarray, geometry: Geometry | None) -> list[bytes]:
    """A NRRD (``kind`` ``nrrd``) or MetaImage (``metaimage``, voxels in the file) of ``arr`` (``(Y, X)`` or
    ``(Z, Y, X)``: x varies fastest), as the pieces of the file. ``geometry``: its axes' place in the world, one
    axis each; ``None``: no pixel size is stated (a picture's pixels), which medseg reads back as pixels.

    The voxels are compressed (NRRD ``gzip``, MetaImage ``CompressedData`` with its size stated).
    """
    arr = np.asarray(arr)
    if str(arr.dtype) not in _TYPES or arr.ndim not in (2, 3):
        raise ValueError(f"a {arr.ndim}D {arr.dtype} image; {kind} masks are 2D or 3D {', '.join(_TYPES)}")
    dims, sizes = arr.ndim, arr.shape[::-1]  # (x, y[, z])
    if geometry is not None and not (len(geometry.spacing) == len(geometry.origin) == dims
                                     and np.shape(geometry.direction) == (dims, dims)):
        raise ValueError(f"a geometry of {len(geometry.spacing)} axes for a {dims}D image")
    pieces = _deflated(arr, gzip=kind == "nrrd")
    nrrd_type, met_type = _TYPES[str(arr.dtype)]
    lines: list[str]
    if kind == "nrrd":
        lines = ["NRRD0004", "# Complete NRRD file format specification at:",
                 "# http://teem.sourceforge.net/nrrd/format.html", f"type: {nrrd_type}", f"dimension: {dims}"]
        if geometry is not None:
            lines.append("space: left-posterior-superior" if dims == 3 else "space dimension: 2")
        lines.append(f"sizes: {' '.join(map(str, sizes))}")
        if geometry is not None:
            axes = np.asarray(geometry.direction, dtype=np.float64) * np.asarray(geometry.spacing, dtype=np.float64)
            lines.append("space directions: " + " ".join(
                "(" + ",".join(_num(v) for v in axes[:, i]) + ")" for i in range(dims)))
        lines += [f"kinds: {' '.join(['domain'] * dims)}", "endian: little", "encoding: gzip"]
        if geometry is not None:
            lines.append("space origin: (" + ",".join(_num(v) for v in geometry.origin) + ")")
            if geometry.unit:
                lines.append("space units: " + " ".join([f'"{geometry.unit}"'] * dims))
        head = "\n".join(lines) + "\n\n"
    elif kind == "metaimage":
        lines = ["ObjectType = Image", f"NDims = {dims}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
                 "CompressedData = True", f"CompressedDataSize = {sum(map(len, pieces))}"]
        if geometry is not None:
            direction = np.asarray(geometry.direction, dtype=np.float64)
            lines += ["TransformMatrix = " + " ".join(_num(v) for v in direction.T.ravel()),  # axis after axis
                      "Offset = " + " ".join(_num(v) for v in geometry.origin),
                      "ElementSpacing = " + " ".join(_num(v) for v in geometry.spacing)]
            if geometry.unit:
                lines.append(f"DistanceUnits = {geometry.unit}")
        lines += [f"DimSize = {' '.join(map(str, sizes))}", f"ElementType = {met_type}", "ElementDataFile = LOCAL"]
        head = "\n".join(lines) + "\n"
    else:
        raise ValueError(f"unknown kind {kind!r}: nrrd or metaimage")
    return [head.encode("ascii"), *pieces]


def write_image(path: str | os.PathLike, arr: np.ndarray, geometry: Geometry | None) -> Path:
    """Write ``arr`` as a NRRD (``.nrrd``) or MetaImage (``.mha``) file by its suffix, atomically (see
    :func:`image_bytes`)."""
    from medseg.io import atomic_output

    path = Path(path)
    kind = WRITTEN.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: not a .nrrd or .mha file name")
    pieces = image_bytes(kind, arr, geometry)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        for piece in pieces:
            handle.write(piece)
    return path
