"""Find the inputs to segment under a path: files by type, DICOM files grouped into one input per series."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from medseg.errors import DataError
from medseg.readers import SUFFIXES, _content_hint, suffix_of


@dataclass(frozen=True)
class InputItem:
    """One input of a batch: a 2D image, a TIFF stack, a NIfTI volume or a DICOM series.

    Attributes:
        source: the file, or for a DICOM series of several files their folder.
        format: ``png``, ``tiff``, ``nifti`` or ``dicom``.
        rel: output stem relative to the output folder (``sub/img``), without suffix.
        series_uid: the SeriesInstanceUID of a DICOM input (picks the series inside ``source``).
        error: why this input cannot be read (set during discovery, e.g. an unreadable DICOM header).
        key: what names the input across runs, wherever its folder lies now: its path relative to the
            searched folder (``sub/img.png``), or ``dicom:<folder>/<SeriesInstanceUID>`` for a series
            (``dicom:<SeriesInstanceUID>`` at the top of the searched folder).
    """

    source: str
    format: str
    rel: str
    series_uid: str = ""
    error: str = ""
    key: str = ""


def natural_key(text: str) -> tuple:
    """Sort key putting ``2.png`` before ``10.png``; the text itself breaks ties (``4`` and ``04``), so the
    order never depends on a folder's listing order."""
    # re.split with a group alternates text and digit runs: the odd places are the numbers
    return tuple(int(t) if k % 2 else t for k, t in enumerate(re.split(r"(\d+)", text))), text


def any_case_suffix(pattern: str) -> str:
    """``pattern`` with the literal suffixes of its last part matching in any case (``*.bmp`` ->
    ``*.[bB][mM][pP]``, ``*.nii.gz`` -> ``*.[nN][iI][iI].[gG][zZ]``), as cameras and Windows tools write ``.BMP``
    and ``.PNG``; a suffix with wildcards is left as it is, and so is the rest of the pattern."""
    head, sep, last = pattern.replace(os.sep, "/").rpartition("/")
    found = re.fullmatch(r"(.*?)((?:\.[A-Za-z0-9]+)+)", last)
    if not found or any(c in found[2] for c in "*?[]"):
        return pattern
    suffix = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in found[2])
    return f"{head}{sep}{found[1]}{suffix}"


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    """Whether the relative path ``rel`` or its file name matches one of ``patterns`` (as :func:`any_case_suffix`
    gives them)."""
    name = PurePosixPath(rel).name
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


#: What ``medseg infer`` writes into an output folder; never taken as inputs.
OUTPUT_PARTS = ("mask", "prob", "table", "run.json", "manifest.csv")
#: Mask kind -> the suffix of its files under ``mask/``.
OUTPUT_FORMATS: dict[str, str] = {"png": ".png", "tiff": ".tif", "nifti": ".nii.gz", "dicom-seg": ".seg.dcm",
                                   "nrrd": ".nrrd", "metaimage": ".mha"}
#: Mask kind -> the suffix of the probability maps under ``prob/`` that go with it.
PROB_SUFFIXES: dict[str, str] = {"png": ".tif", "tiff": ".tif", "nifti": ".nii.gz", "dicom-seg": ".nii.gz",
                                  "nrrd": ".nrrd", "metaimage": ".mha"}
#: The file in an output folder that records which model and settings made each of its outputs.
RUN_RECORD = "run.json"
#: Beside it while a batch runs: the record's changes since it was last written, one JSON line each.
RUN_JOURNAL = ".run.json.journal"


def _is_run_record(path: Path) -> bool:
    """Whether ``path`` is the run record of an output folder (not some other ``run.json``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"runs", "outputs"} <= set(data)


#: Folder names of labels beside a folder of images (DSB's ``{id}/images`` + ``{id}/masks``, images/ + masks/)
_LABEL_FOLDERS = {"masks": "images", "mask": "image", "labels": "images", "label": "image"}


def label_inputs(inputs: Sequence[InputItem], root: str | os.PathLike) -> list[tuple[InputItem, str]]:
    """The inputs that lie, below the searched folder ``root``, in a label folder beside a folder of images
    (``masks/`` beside ``images/``, ``label/`` beside ``image/``), with that folder's name: the masks of a
    labelled data set, which ``medseg infer`` of its folder would segment as images (a label folder given as
    ``root`` is the user's choice)."""
    top = Path(root).absolute()
    found, seen = [], {}
    for item in inputs:
        for folder in Path(item.source).absolute().parents:
            if folder == top or not folder.is_relative_to(top):
                break
            images = _LABEL_FOLDERS.get(folder.name.lower())
            if not images:
                continue
            if folder not in seen:  # once per folder: a DSB set has thousands of masks in a few hundred
                seen[folder] = any((folder.parent / n).is_dir() for n in (images, images.capitalize(), images.upper()))
            if seen[folder]:
                found.append((item, folder.name))
                break
    return found


def discover(
    path: str | os.PathLike,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    recursive: bool = True,
    skip: str | os.PathLike | None = None,
) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """List the inputs under ``path`` (a folder, or one file / one DICOM series folder).

    Args:
        path: folder to search, or a single input file.
        include: glob patterns on the path relative to ``path`` or the file name (``*.png``, ``ct/*``);
            when given, only matching files are considered.
        exclude: glob patterns of files to leave out.
        recursive: search sub-folders too.
        skip: the output folder: left out whole when it lies inside ``path``, its outputs
            (:data:`OUTPUT_PARTS`) when it is ``path`` itself; the outputs of any folder under ``path`` that
            holds a run record are left out too.

    Returns:
        ``(inputs, ignored)``: inputs in natural order; ``ignored`` lists ``(file, reason)`` for files that
        are not of a supported type (they are reported, not failed).

    Raises:
        DataError: ``path`` does not exist, or a single file of an unsupported type was given, or nothing
            to segment was found (the message lists the supported types).
    """
    from medseg.dicom import is_dicom_file
    from medseg.readers import format_of

    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: input not found; give a folder or an image file")
    # '*.bmp' takes 003.BMP, '*.nii.gz' x.NII.GZ, as training's image_glob does
    include, exclude = [any_case_suffix(p) for p in include], [any_case_suffix(p) for p in exclude]
    if skip is not None:  # outputs written over the inputs they are made from
        out, real = Path(skip).resolve(), root.resolve()
        for name in OUTPUT_PARTS[:3]:
            part = out / name
            target = part.resolve()
            if target == part and real.is_relative_to(part):
                raise DataError(f"{root}: the input lies in the output folder's {name}/, where the outputs are "
                                "written, so they would replace the images; choose another output folder")
            if target != part and (real.is_relative_to(target) or target.is_relative_to(real)):  # a link
                raise DataError(f"{root}: the output folder's {name}/ is a link to {target}, which holds or lies "
                                "in the input, so the outputs would replace the images; choose another output "
                                "folder")
    if root.is_file():
        fmt = format_of(root)  # raises for unsupported types, listing the supported ones
        return [InputItem(str(root), fmt, _stem(root.name), key=root.name)], []

    found, unreadable = files_under(root, recursive)
    left_out = _outputs_under(root, Path(skip) if skip is not None else None, found)
    files = sorted((p for p, real in ((p, p.resolve()) for p in found)
                    if not any(real.is_relative_to(part) for part in left_out)),
                   key=lambda p: natural_key(p.relative_to(root).as_posix()))
    inputs: list[InputItem] = []
    ignored: list[tuple[str, str]] = []
    for where, why in unreadable:  # a folder or link the search could not enter: failed, so never unnoticed
        if where == root:
            raise DataError(f"{root}: {why}")
        rel = where.relative_to(root).as_posix()
        if any(where.resolve().is_relative_to(part) for part in left_out) or \
                (include and not _matches(rel, include)) or _matches(rel, exclude):
            continue
        if where.is_symlink() and suffix_of(where) and suffix_of(where) not in SUFFIXES:
            ignored.append((str(where), f"unsupported file type '{suffix_of(where)}' (a link whose target is gone)"))
            continue
        inputs.append(InputItem(str(where), "", rel, error=f"{where}: {why}", key=rel))
    dicom_by_dir: dict[Path, list[Path]] = {}
    filtered, filtered_out = 0, set()
    # --include patterns with a part that names a hidden file ('.scan.png', 'sub/.b.tif'): those files are read
    # (hidden folders are not searched at all)
    hidden_asked = [g for g in include or () if any(part.startswith(".") and part not in (".", "..")
                                                    for part in PurePosixPath(g).parts)]
    taken: list[tuple[Path, str]] = []
    for file in files:
        rel = file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(rel).parts) and not (
                hidden_asked and _matches(rel, hidden_asked)):
            continue  # hidden files, and our own temporary outputs, unless an --include names them
        if (include and not _matches(rel, include)) or _matches(rel, exclude):
            filtered += 1
            filtered_out.add(str(file))
            continue
        taken.append((file, rel))
    owners = _data_file_owners([file for file, _ in taken])  # of the headers read, not of those left out
    for file, rel in taken:
        fmt = SUFFIXES.get(suffix_of(file))
        if fmt == "dicom" or (fmt is None and is_dicom_file(file)):
            dicom_by_dir.setdefault(file.parent, []).append(file)
        elif fmt is None:
            header = owners.get(os.path.normpath(file))
            if header is not None:
                ignored.append((str(file), f"the data file of {header.relative_to(root).as_posix()}, read with it"))
            elif file.name.upper() != "DICOMDIR":
                ignored.append((str(file), f"unsupported file type '{suffix_of(file) or '(none)'}'"))
        else:
            inputs.append(InputItem(str(file), fmt, _stem(rel), key=rel))
    for folder, dicom_files in dicom_by_dir.items():
        series_inputs, not_images = _series_inputs(root, folder, dicom_files, filtered_out)
        inputs += series_inputs
        ignored += not_images
    if not inputs:
        supported = ", ".join(sorted(set(SUFFIXES)))
        if filtered:  # the filters, not the folder, left nothing (e.g. --include '*.tif' for PNG files)
            raise DataError(f"{root}: no images to segment: --include / --exclude left out all {filtered} files; "
                            "check the patterns (they match case as written, but for a file suffix)")
        extra = f" ({len(ignored)} files of other types ignored)" if ignored else ""
        raise DataError(f"{root}: no images to segment{extra}; supported: {supported} and DICOM series folders")
    inputs.sort(key=lambda item: natural_key(item.rel))
    return _unique_rels(inputs), ignored


#: What a link with no target is said to be, and the fix
BROKEN_LINK = "a link whose target does not exist; restore the target or remove the link"


def files_under(root: Path, recursive: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files under ``root`` (its sub-folders too when ``recursive``), links to files and folders followed,
    and ``(path, reason)`` for each folder that cannot be listed and each link whose target is missing.

    A folder is searched once, under its own path when it lies under ``root`` and by the first link (in
    name order) otherwise, so that names do not depend on the order the disk lists entries in and a link
    back up is no loop. Hidden folders are not entered.
    """
    real_root = root.resolve()
    own: set[str] = set()  # the folders under root reached without a link
    if recursive:
        for folder, dirs, _ in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            own.add(os.path.realpath(folder))
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[str] = set()

    def unlisted(err: OSError) -> None:
        problems.append((Path(err.filename), f"cannot list the folder ({err.strerror}); check its permissions"))

    for folder, dirs, names in os.walk(root, onerror=unlisted, followlinks=True):
        real = os.path.realpath(folder)
        by_link = Path(real) != real_root / Path(folder).relative_to(root)
        if real in seen or (by_link and real in own):  # searched, or to be, under its own path
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists() and not name.startswith("."):
                problems.append((path, BROKEN_LINK))
    return files, problems


def _outputs_under(root: Path, output_dir: Path | None, found: list[Path]) -> list[Path]:
    """What discovery under ``root`` leaves out: the output folder when it lies inside ``root``; its outputs
    (:data:`OUTPUT_PARTS`) when it is ``root`` itself; those of any earlier run found under ``root``.

    Raises:
        DataError: the output folder is the input folder and holds a ``mask/`` (``prob/``, ``table/``) folder
            that no run recorded: the user's own masks, which outputs would be written among.
    """
    left_out: list[Path] = []
    real_root = root.resolve()
    if output_dir is not None:
        out = output_dir.resolve()
        if out != real_root and out.is_relative_to(real_root):
            left_out.append(out)
        elif out == real_root:
            own = [name for name in OUTPUT_PARTS[:3] if (out / name).is_dir()]
            if own and not _is_run_record(out / RUN_RECORD):
                raise DataError(f"{output_dir}: the output folder is the input folder, and its {own[0]}/ folder "
                                "was not written by medseg infer (masks of your own?); choose another output "
                                "folder")
            left_out += [out / name for name in OUTPUT_PARTS]
        else:  # reached through a link: the outputs are never inputs
            left_out += [out / name for name in OUTPUT_PARTS[:3]]
    for record in (p for p in found if p.name == RUN_RECORD and _is_run_record(p)):  # earlier runs' outputs
        left_out += [record.parent.resolve() / name for name in OUTPUT_PARTS]
    return left_out


def _data_file_owners(files: Sequence[Path]) -> dict[str, Path]:
    """The MetaImage (``.mhd``) and NRRD (``.nhdr``) headers among ``files`` by the data files they name
    (normalised paths), so that those are listed as their data, not as files of an unknown type."""
    from medseg.itkfiles import read_header

    owners: dict[str, Path] = {}
    for file in files:
        if SUFFIXES.get(suffix_of(file)) != "itk":
            continue
        try:
            named = read_header(file).data_files
        except DataError:  # said when the input is read
            continue
        for data in named:
            owners.setdefault(os.path.normpath(data), file)
    return owners


def _stem(rel: str) -> str:
    """``sub/img.nii.gz`` -> ``sub/img``."""
    suffix = suffix_of(rel)
    return rel[: -len(suffix)] if suffix else rel


def _series_inputs(root: Path, folder: Path, files: list[Path], filtered_out: set[str] = frozenset()
                   ) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """One input per series in ``folder`` holding a selected file; unreadable files become failed inputs,
    DICOM objects that are not images (a SEG, a report) are listed as ignored. A series is read whole: files
    of it that ``--include``/``--exclude`` left out (``filtered_out``) are said in a warning."""
    from medseg.dicom import _read, is_dicom_file, non_image_kind, series_in_folder

    in_series = series_in_folder(str(folder))  # headers read once, cached for the readers
    members = {f for s in in_series for f in s.files}
    selected = {str(f) for f in files}
    series = [s for s in in_series if selected.intersection(s.files)]
    failed, ignored = [], []
    for file in files:
        if str(file) in members:
            continue
        try:
            kind = non_image_kind(_read(file))
            if kind:
                ignored.append((str(file), f"DICOM {kind} object, not an image"))
                continue
            hint = _content_hint(file, "dicom")  # another format under a DICOM suffix
            message = f"{file}: not a DICOM file{hint}" if hint else \
                f"{file}: not a DICOM image (no SeriesInstanceUID); remove it or --exclude it"
        except DataError as err:
            message = str(err)
        if not is_dicom_file(file, marked=True):  # only its first bytes looked like DICOM: another file type
            ignored.append((str(file), f"unsupported file type '{suffix_of(file) or '(none)'}'"))
            continue
        rel = file.relative_to(root).as_posix()
        failed.append(InputItem(str(file), "dicom", _stem(rel), error=message, key=rel))
    rel_dir = folder.relative_to(root).as_posix()
    base = Path(os.path.abspath(root)).name if rel_dir == "." else rel_dir  # "." named, a link not followed
    loose = [s for s in series if len(s.files) > 1 and s.placeless]
    for s in loose:  # images without a position (secondary captures, ultrasound): each selected file alone
        for file in (f for f in s.files if f in selected):
            rel = Path(file).relative_to(root).as_posix()
            failed.append(InputItem(file, "dicom", _stem(rel), series_uid=s.uid, key=rel))
    series = [s for s in series if s not in loose]
    for s in series:
        dropped = [f for f in s.files if f in filtered_out]
        if dropped:
            logging.getLogger(__name__).warning(
                "%s: left out by --include/--exclude%s, but a DICOM series is read whole from its folder, so it "
                "is read with its series; move it out of the folder to leave it out", dropped[0],
                f" with {len(dropped) - 1} more file(s) of its series" if len(dropped) > 1 else "")
    numbers = [s.number for s in series]
    result = []
    for s in series:
        if len(series) == 1:
            rel = base
        elif len(s.files) == 1:  # a series in one file (e.g. a multi-frame image): the file's own name
            rel = _stem(Path(s.files[0]).relative_to(root).as_posix())
        elif s.number is not None and numbers.count(s.number) == 1:
            rel = f"{'' if rel_dir == '.' else rel_dir + '/'}S{s.number}"
        else:
            rel = f"{'' if rel_dir == '.' else rel_dir + '/'}{_uid_name(s.uid)}"
        source = s.files[0] if len(s.files) == 1 else str(folder)
        # a series copied (or split) into two folders is two inputs: the key holds the folder too
        key = f"dicom:{s.uid}" if rel_dir == "." else f"dicom:{rel_dir}/{s.uid}"
        result.append(InputItem(source, "dicom", rel, series_uid=s.uid, key=key))
    return failed + result, ignored


def _uid_name(uid: str) -> str:
    """A SeriesInstanceUID as a file name: a valid UID (digits and dots) as it is, any other text by its hash.

    The UID comes from the file, so it must never bring a path (``../x``, ``/abs``) into the output names.
    """
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) and len(uid) <= 64:
        return uid
    return "series_" + hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def name_key(rel: str) -> str:
    """``rel`` as a disk that ignores case and Unicode normalisation sees it (macOS's): ``Café`` composed and
    ``cafe`` + a combining accent are one name there."""
    return unicodedata.normalize("NFC", rel).casefold()


def _unique_rels(inputs: list[InputItem]) -> list[InputItem]:
    """Make output stems unique, ignoring case and Unicode normalisation (:func:`name_key`: outputs may land on
    a disk that ignores them, as macOS's do).

    ``a.png`` and ``a.tif`` in one folder become ``a_png`` and ``a_tif``; any stem still taken gets ``_2``,
    ``_3``, ... so no two inputs ever write the same file. A stem whose output file would be another input's
    output folder (``x.PNG``'s ``mask/x.png`` beside the inputs of a folder ``x.png/``) gets its suffix too.
    """
    counts: dict[str, int] = {}
    for item in inputs:
        counts[name_key(item.rel)] = counts.get(name_key(item.rel), 0) + 1
    folders = {"/".join(parts[:k]) for parts in (name_key(item.rel).split("/") for item in inputs)
               for k in range(1, len(parts))}
    outputs = (*OUTPUT_FORMATS.values(), *PROB_SUFFIXES.values(), ".csv")
    for rel in [r for r in counts if any(r + s in folders for s in outputs)]:
        counts[rel] += 1  # named apart, as a second input of the stem would be
    taken = {name_key(item.rel) for item in inputs if counts[name_key(item.rel)] == 1}
    result = []
    for item in inputs:
        rel = item.rel
        if counts[name_key(rel)] > 1:
            suffix = suffix_of(item.source).lstrip(".").replace(".", "_").lower() or item.series_uid
            rel = f"{item.rel}_{suffix}"
        candidate, n = rel, 2
        while name_key(candidate) in taken and counts[name_key(item.rel)] > 1:
            candidate, n = f"{rel}_{n}", n + 1
        taken.add(name_key(candidate))
        result.append(replace(item, rel=candidate))
    return result


def slice_items(item: InputItem, slices: int) -> list[dict]:
    """The per-slice datalist entries of one input (what the inference dataset iterates)."""
    return [
        {"image": item.source, "series_uid": item.series_uid, "format": item.format, "name": item.rel,
         "page": k, "pages": slices}
        for k in range(slices)
    ]


def slice_datalist(input_dir: str | os.PathLike, include: Sequence[str] = (), exclude: Sequence[str] = (),
                   nifti_channel_dim: int | None = None) -> list:
    """Every slice of every input under ``input_dir`` (for plain ``monai.bundle run`` inference);
    ``nifti_channel_dim`` is the channel axis of 4D NIfTI inputs, as given to their reader."""
    from medseg.readers import count_slices

    inputs, _ = discover(input_dir, include, exclude)
    items = []
    for item in inputs:
        if item.error:
            raise DataError(item.error)
        count = count_slices(item.source, series_uid=item.series_uid or None, nifti_channel_dim=nifti_channel_dim)
        items += slice_items(item, count)
    return items
