"""NRRD and MetaImage headers read in Python: their data files, whether their voxels are whole, and what ITK
does not report (a stated pixel size, spatial units, colour kinds)."""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import DataError

#: NRRD's ``space units`` as medseg names the units its readers report
_UNITS = {"mm": "mm", "millimeter": "mm", "millimeters": "mm", "um": "um", "µm": "um", "μm": "um", "micron": "um",
          "microns": "um", "micrometer": "um", "micrometers": "um", "m": "meter", "meter": "meter",
          "meters": "meter"}

#: bytes of a header read at most (headers are text of a few hundred bytes; data may follow)
_HEAD = 1 << 16


@dataclass
class Header:
    """What a NRRD or MetaImage header says beyond ITK's own reading of it."""

    path: Path
    kind: str  # "nrrd" or "metaimage"
    fields: dict[str, str]  # by name in lower case, spaces left out: ``spacedirections``, ``elementspacing``
    offset: int | None = None  # where attached voxels start in the file (None: in data files of their own)
    data_files: list[Path] = field(default_factory=list)  # detached voxels, in order
    listed: bool = False  # several data files (a list or a pattern), whose parts are not checked in size

    @property
    def sized(self) -> bool:
        """Whether the header states a pixel size (else ITK gives 1 for each axis)."""
        if self.kind == "nrrd":
            directions = self.fields.get("spacedirections", "")
            return bool(re.search(r"\(", directions)) or any(
                _is_number(v) for v in self.fields.get("spacings", "").split())
        return "elementspacing" in self.fields or "elementsize" in self.fields

    @property
    def unit(self) -> str:
        """The spatial unit of the pixel size: NRRD's ``space units`` where all axes share a known one, else mm
        (ITK's and 3D Slicer's assumption); ``pixel`` where no size is stated."""
        if not self.sized:
            return "pixel"
        units = re.findall(r'"([^"]*)"', self.fields.get("spaceunits", "")) if self.kind == "nrrd" else []
        named = {_UNITS.get(u.strip().lower()) for u in units if u.strip()}
        return named.pop() if len(named) == 1 and None not in named else "mm"

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
        return float(text) == float(text)  # not NaN
    except ValueError:
        return False


def read_header(path: str | os.PathLike) -> Header:
    """The header of a NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file.

    Raises:
        DataError: the file cannot be opened, or it names data files that are not there.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
    except OSError as err:
        raise DataError(f"{path}: cannot open the file ({err.strerror or err}); check its permissions") from err
    if head.startswith(b"NRRD"):
        header = _nrrd(path, head)
    else:
        header = _metaimage(path, head)
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
        text = head[start:end].rstrip(b"\r").decode("latin-1")
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


def _nrrd(path: Path, head: bytes) -> Header:
    lines, after_blank = _lines(head, lambda _text: False)
    fields: dict[str, str] = {}
    for text, _ in lines[1:]:
        name, sep, value = text.partition(":")
        if text.startswith("#") or not sep or value.startswith("="):  # comments, key:=value pairs
            continue
        fields[_key(name)] = value.strip()
    named = fields.get("datafile")
    if named is None:
        return Header(path, "nrrd", fields, offset=after_blank)
    files, listed = _data_files(path, named, head, "datafile:")
    return Header(path, "nrrd", fields, data_files=files, listed=listed)


def _metaimage(path: Path, head: bytes) -> Header:
    lines, _ = _lines(head, lambda text: _key(text.split("=", 1)[0]) == "elementdatafile")
    fields = {}
    for text, _ in lines:
        name, sep, value = text.partition("=")
        if sep:
            fields[_key(name)] = value.strip()
    named = fields.get("elementdatafile")
    if named is None or named.upper() == "LOCAL":
        return Header(path, "metaimage", fields, offset=lines[-1][1] if named else None)
    files, listed = _data_files(path, named, head, "elementdatafile=")
    return Header(path, "metaimage", fields, data_files=files, listed=listed)


def _data_files(path: Path, named: str, head: bytes, marker: str) -> tuple[list[Path], bool]:
    """The data files a header names: one file (its name may hold spaces), ``LIST`` (one name per line after
    the field ``marker`` names), or a ``printf`` pattern with first, last and step numbers."""
    folder = path.parent
    if named.upper().startswith("LIST"):
        text = head.decode("latin-1").splitlines()
        at = next((i for i, t in enumerate(text) if t.replace(" ", "").lower().startswith(marker)), len(text))
        return [folder / n.strip() for n in text[at + 1:] if n.strip()], True
    parts = named.split()
    if "%" in named and len(parts) >= 4 and all(re.fullmatch(r"-?\d+", p) for p in parts[1:4]):
        pattern, first, last, step = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        if step == 0 or (last - first) * step < 0:
            return [], True
        try:
            return [folder / (pattern % n) for n in range(first, last + (1 if step > 0 else -1), step)][: 1 << 16], True
        except (TypeError, ValueError):
            return [], True
    return [folder / named], False


def check_voxels(header: Header, expected: int) -> None:
    """Refuse voxels cut short or compressed data that are damaged, before ITK reads them: ITK would read a
    short file with a message of its own on the console, and takes damaged gzip or zlib data without checking
    their checksum, giving wrong voxels. ``expected`` is the byte count the header's size and type make.

    Raises:
        DataError: the voxels are incomplete or damaged (one line naming the file).
    """
    fields = header.fields
    if header.listed or any(k in fields for k in ("lineskip", "byteskip", "headersize")):
        return  # several files, or data placed by offsets of their own: left to ITK
    if header.kind == "nrrd":
        encoding = fields.get("encoding", "raw").lower()
        compressed = encoding in ("gzip", "gz")
        if encoding not in ("raw", "gzip", "gz"):
            return  # text encodings and bzip2: ITK's own checks
    else:
        if fields.get("binarydata", "true").lower() == "false":
            return  # voxels as text
        compressed = fields.get("compresseddata", "false").lower() == "true"
    source = header.data_files[0] if header.data_files else header.path
    offset = 0 if header.data_files else header.offset
    if offset is None:
        return
    where = f" in {source.name}" if header.data_files else ""
    if not compressed:
        available = source.stat().st_size - offset
        if available < expected:
            raise DataError(f"{header.path}: its voxels are cut short ({max(available, 0):,} of {expected:,} bytes"
                            f"{where}); the file is truncated: copy it again from its source")
        return
    produced, whole = _inflated_size(source, offset, header.path)
    if produced < expected or not whole:
        raise DataError(f"{header.path}: its compressed voxels are cut short ({produced:,} of {expected:,} bytes "
                        f"once decompressed{where}); the file is truncated: copy it again from its source")


def _inflated_size(source: Path, offset: int, path: Path) -> tuple[int, bool]:
    """Bytes the gzip or zlib stream at ``offset`` of ``source`` decompresses to (its checksum checked), and
    whether the stream ends (else the file was cut short)."""
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a zlib or a gzip header, whichever it has
    produced = 0
    try:
        with open(source, "rb") as handle:
            handle.seek(offset)
            while not inflate.eof:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                while chunk and not inflate.eof:  # at most 16 MiB out at a time: zeros compress a thousandfold
                    produced += len(inflate.decompress(chunk, 1 << 24))
                    chunk = inflate.unconsumed_tail
    except zlib.error as err:
        raise DataError(f"{path}: its compressed voxels are damaged ({err}); the file is corrupt: copy it again "
                        "from its source") from err
    return produced, inflate.eof
