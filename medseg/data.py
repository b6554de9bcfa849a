"""Find labelled samples (ISBI 2012 stacks/folders, image + mask folders, DSB 2018 Kaggle layout) and split them."""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import itertools
import json
import logging
import os
import random
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from medseg.discovery import any_case_suffix, natural_key
from medseg.errors import ConfigValueError, DataError, brief
from medseg.io import atomic_output
from medseg.readers import LOSSY_SUFFIXES, count_slices, lossy_mask_error, open_picture

#: Mask types accepted by the image + mask folder layout (read by :mod:`medseg.readers`): lossless only.
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")

#: Image types accepted by the image + mask folder layout: the mask types and JPEG (brightfield and
#: stained-tissue pictures are often saved so; its compression changes the pixels, not the labels).
IMAGE_SUFFIXES = (*MASK_SUFFIXES, ".jpg", ".jpeg")

#: Challenge file names of the original ISBI 2012 release (multi-page TIFF stacks).
ISBI_STACKS = ("train-volume.tif", "train-labels.tif")


def _volumes_said(files: Iterable[Path]) -> str:
    """For an error that found no training image: the first of ``files`` that is a volume (NIfTI, DICOM, NRRD,
    MetaImage), which ``medseg infer`` reads but training does not, and what to do; empty when none is."""
    from medseg.readers import SUFFIXES, suffix_of

    volume = next((f for f in files if SUFFIXES.get(suffix_of(f)) in ("nifti", "dicom", "itk")), None)
    if volume is None:
        return ""
    kind = {"nifti": "NIfTI", "itk": "NRRD or MetaImage"}.get(SUFFIXES[suffix_of(volume)], "DICOM")
    return (f"; {volume.name} is {kind}, which training does not read (medseg infer does): save its slices and "
            "their labels as 2D images, or for isbi_em as TIFF stacks")


def _images_in(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of ``folder`` with one of ``suffixes`` (any case), hidden ones (macOS ``._`` companions) left out."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )


def find_pairs(root: str | os.PathLike) -> list[dict]:
    """List the labelled slices under ``root`` as ``{"image", "label", "page", "name"}`` dicts.

    Two layouts are recognised (``root`` may also be their ``train`` sub-folder):

    * PNG/TIFF pairs: ``[train/]image/NAME`` with ``[train/]label/NAME`` (same stem, any supported suffix);
    * the challenge stacks ``train-volume.tif`` + ``train-labels.tif``: one entry per page.

    Raises:
        DataError: the folder does not exist, has neither layout, or an image has no label.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data pointing to the ISBI 2012 folder")
    for base in (root, root / "train"):
        volume, labels = (base / n for n in ISBI_STACKS)
        if volume.is_file():
            return _stack_pairs(volume, labels)
        if (base / "image").is_dir():
            return _folder_pairs(base / "image", base / "label")
    raise DataError(
        f"{root}: no labelled data found; expected image/ + label/ folders or "
        f"{ISBI_STACKS[0]} + {ISBI_STACKS[1]}"
    )


def _folder_pairs(image_dir: Path, label_dir: Path) -> list[dict]:
    if not label_dir.is_dir():
        raise DataError(f"{label_dir}: label folder not found; put one label per image there")
    labels: dict[str, Path] = {}
    for p in _images_in(label_dir, MASK_SUFFIXES):
        if p.stem in labels:
            raise DataError(f"{p}: a second label for '{p.stem}' beside {labels[p.stem].name}; keep one of them")
        labels[p.stem] = p
    lossy = {p.stem: p for p in _images_in(label_dir, LOSSY_SUFFIXES)}
    for p in image_dir.iterdir():  # left out by _images_in: an image lost from training without a word
        if p.is_symlink() and not p.exists() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            raise DataError(f"{p}: a link to a missing file; restore its target, or remove the link")
    pairs = []
    for image in _images_in(image_dir, IMAGE_SUFFIXES):
        label = labels.get(image.stem)
        if label is None and image.stem in lossy:
            raise lossy_mask_error(lossy[image.stem], "label")
        if label is None:
            odd = [q for q in label_dir.iterdir() if q.stem == image.stem and q.suffix.lower() in MASK_SUFFIXES
                   and not q.is_file()]
            if odd:  # a folder, a pipe, a device or a broken link of the label's name: not "no label" either
                what = "a link to a missing file" if odd[0].is_symlink() and not odd[0].exists() else \
                    "not a regular file"
                raise DataError(f"{odd[0]}: the label of {image.name} is {what}; put the label image there as a file")
            raise DataError(f"{image}: no label found; add {label_dir / image.name} or remove the image")
        pairs.extend(_paired_pages(image, label))
    named: dict[str, str] = {}
    for pair in pairs:  # a stack's a_001 and an image a_001.png beside it would be one name twice
        other = named.setdefault(pair["name"], pair["image"])
        if other != pair["image"]:
            raise DataError(f"{pair['image']}: its sample name '{pair['name']}' is also one of {other} (a stack's "
                            "pages are named STEM_000, STEM_001, ...); rename one of them")
    if not pairs:
        raise DataError(f"{image_dir}: no images (supported: {', '.join(IMAGE_SUFFIXES)})"
                        f"{_volumes_said(sorted(image_dir.iterdir()))}")
    return pairs


def _paired_pages(image: Path, label: Path) -> list[dict]:
    """The samples of one image/label pair of files: one, or one per page of two TIFF stacks of equal length
    (named ``{stem}_{page:03d}``, as the challenge's stacks are)."""
    def pages(path: Path) -> int:
        return count_slices(path) if path.suffix.lower() in (".tif", ".tiff") else 1

    n_img, n_lab = pages(image), pages(label)
    if n_img != n_lab:
        raise DataError(f"{label}: {n_lab} label page{'s' * (n_lab != 1)} for the {n_img} of {image.name}; "
                        "give each image page its label page, in the same order")
    if n_img == 1:
        return [{"image": str(image), "label": str(label), "page": 0, "name": image.stem}]
    return [{"image": str(image), "label": str(label), "page": k, "name": f"{image.stem}_{k:03d}"}
            for k in range(n_img)]


def _stack_pairs(volume: Path, labels: Path) -> list[dict]:
    if not labels.is_file():
        raise DataError(f"{volume}: no label stack; add {labels} next to it")
    n_img, n_lab = count_slices(volume), count_slices(labels)
    if n_img != n_lab:
        raise DataError(f"{labels}: {n_lab} label slices for {n_img} image slices; the stacks must match")
    return [
        {"image": str(volume), "label": str(labels), "page": k, "name": f"{volume.stem}_{k:03d}"}
        for k in range(n_img)
    ]


def split_pairs(pairs: list[dict], val_count: int) -> dict[str, list[dict]]:
    """Split ordered slices into train and validation: the last ``val_count`` slices validate.

    A contiguous block (not a random draw) keeps neighbouring, near-identical EM sections from
    leaking between the two sets, so validation scores stay honest.

    Raises:
        DataError: fewer than ``val_count + 1`` slices.
    """
    if val_count < 0 or val_count >= len(pairs):
        raise DataError(f"cannot hold out {val_count} validation slices from {len(pairs)}; lower val_count")
    if val_count == 0:
        return {"train": list(pairs), "val": []}
    return {"train": pairs[:-val_count], "val": pairs[-val_count:]}


def isbi_split(data_dir: str | os.PathLike, val_count: int = 5, save_to: str | None = None,
               val_dir: str | os.PathLike | None = None) -> dict:
    """Find pairs under ``data_dir`` and split them into ``train``, ``val`` (and ``all``, both together).

    With ``val_dir``, every slice of ``data_dir`` trains and every slice of ``val_dir`` validates
    (:func:`fixed_split`); ``val_count`` is not used. If ``save_to`` is a folder, the split is recorded there as
    ``split.json``.
    """
    pairs = find_pairs(data_dir)
    if val_dir:
        split = fixed_split(pairs, _in_val_folder(lambda: find_pairs(val_dir), val_dir,
                                                  "image/ + label/ slices, or the ISBI TIFF stacks"), data_dir, val_dir)
    else:
        split = split_pairs(pairs, val_count)
    _save_split(split, data_dir, save_to, val_dir)
    return {**split, "all": split["train"] + split["val"] if val_dir else pairs}


def _in_val_folder(find: Callable[[], list[dict]], val_dir: str | os.PathLike, how: str) -> list[dict]:
    """``find()``: the samples of the validation folder ``val_dir``, found as those of the data folder (``how``);
    a folder where none are found that way is named as such, not with the layouts' own advice, which would
    change how the data folder is read too."""
    try:
        return find()
    except DataError as err:
        if not re.search(r"no images match|no DSB samples found|no labelled data found|data folder not found",
                         str(err)):
            raise
        raise DataError(f"{val_dir}: no labelled images found in the validation folder as in the training data "
                        f"({how}); lay it out as the training data is") from err


#: The key of a validation sample renamed by :func:`fixed_split`, holding the prefix added to its name.
VAL_PREFIX = "val_prefix"


def fixed_split(train: list[dict], val: list[dict], data_dir: str | os.PathLike,
                val_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """``train`` (found in ``data_dir``) and ``val`` (found in ``val_dir``, a validation folder of its own, as
    StarDist's and Cellpose's test folders are kept) as a split.

    Names identify the samples in the run's ``split.json``: where a validation sample has the name of a training
    sample (both folders numbered from 000), every validation name is given the prefix ``val/`` (``val/000``),
    kept in the sample under :data:`VAL_PREFIX` and recorded in ``split.json``.

    Raises:
        DataError: ``val_dir`` is ``data_dir``; an image found in both (one folder inside the other, reached by
            the image pattern, or links to the same files); or a name found in both that the prefix does not
            tell apart (a training image named as a prefixed one, in a folder named ``val``).
    """
    if Path(val_dir).resolve() == Path(data_dir).resolve():
        raise DataError(f"{val_dir}: the validation folder is the training data folder itself; give a folder of "
                        "other labelled images, or leave the validation folder out to hold out part of the data")
    trained = {str(Path(d["image"]).resolve()): d for d in train}
    both = [d for d in val if str(Path(d["image"]).resolve()) in trained]
    if both:
        raise DataError(f"{both[0]['image']}: found both in the training data ({data_dir}) and the validation folder "
                        f"({val_dir}; {len(both)} such images): one folder is inside the other, or links to the "
                        "same files; give a validation folder of other images")
    names = {str(d["name"]) for d in train}
    clash = [d for d in val if str(d["name"]) in names]
    prefix = "val/"  # not the folder's name: a folder moved or renamed keeps its images' names
    if clash and not any(prefix + str(d["name"]) in names for d in val):  # train/ + test/ both from 000 (Cellpose)
        val = [{**d, "name": prefix + str(d["name"]), VAL_PREFIX: prefix} for d in val]
        clash = []
    if clash:
        first = next(t for t in train if str(t["name"]) == str(clash[0]["name"]))
        fix = "save the validation stack's slices as image/ + label/ PNGs named apart" \
            if Path(clash[0]["image"]).name in ISBI_STACKS else \
            "rename the validation images (a prefix such as val_)"
        raise DataError(f"{clash[0]['image']}: has the name '{clash[0]['name']}' of a training image "
                        f"({first['image']}; {len(clash)} such names), and names identify the images in the "
                        f"run's split.json: {fix}, or hold out part of one folder instead")
    return {"train": list(train), "val": list(val)}


def _save_split(split: dict[str, list[dict]], data_dir: str | os.PathLike, save_to: str | None,
                val_dir: str | os.PathLike | None = None) -> None:
    if not save_to:
        return
    out = Path(save_to)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {k: [d["name"] for d in v] for k, v in split.items()}
    record["data_dir"] = str(Path(data_dir).resolve())
    if val_dir:
        record["val_dir"] = str(Path(val_dir).absolute())  # as config.json holds it: a link stays a link
        prefix = next((d[VAL_PREFIX] for d in split["val"] if VAL_PREFIX in d), None)
        if prefix:
            record[VAL_PREFIX] = prefix
    files: dict[str, str] = {}  # a stack's file is read once for all its slices
    record["sha256"] = {d["name"]: sample_digest(d, files) for v in split.values() for d in v}
    if val_dir:
        _warn_copies(split, record["sha256"], val_dir)
    try:
        with atomic_output(out / "split.json") as tmp:  # a resume compares against it: never half written
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as err:  # named after the record, not its temporary file (a full disk names none)
        if err.filename is None or Path(err.filename).parent == out:
            err.filename = str(out / "split.json")
        raise


def _warn_copies(split: dict[str, list[dict]], digests: dict[str, str], val_dir: str | os.PathLike) -> None:
    """Say, in one warning, validation samples whose image and label are byte for byte a training sample's."""
    trained = {digests[str(d["name"])]: d for d in split["train"]}
    copies = [(d, trained[digests[str(d["name"])]]) for d in split["val"] if digests[str(d["name"])] in trained]
    if copies:
        logging.getLogger(__name__).warning(
            "%s: %d of its %d validation images are copies of training images, label and all (first: %s = %s), so "
            "validation scores them as seen in training; remove them from one of the folders", val_dir,
            len(copies), len(split["val"]), copies[0][0]["image"], copies[0][1]["image"])


def sample_digest(sample: dict, known: dict[str, str] | None = None) -> str:
    """SHA-256 of what a labelled sample is made of: its image and label, each the bytes of its file, or of
    its page's pixels in a TIFF (so that one page of a stack changed marks that slice only), or for a folder
    of instance masks each mask file's name and bytes, in name order (the files the loader reads). ``known``
    caches digests of files and pages."""
    from medseg.io import file_sha256
    from medseg.transforms import INSTANCE_MASK_SUFFIXES

    known = {} if known is None else known
    page = int(sample.get("page", 0) or 0)

    def digest(path: Path, tiff_page: int | None = None) -> str:
        key = f"{path}#{tiff_page}"
        if key not in known:
            if tiff_page is None:
                known[key] = file_sha256(path)
            else:
                import numpy as np
                import tifffile

                from medseg.readers import check_plane, count_slices, read_slice

                try:
                    if f"{path}#slices" not in known:
                        known[f"{path}#slices"] = str(count_slices(path))
                    slices = int(known[f"{path}#slices"])
                    with tifffile.TiffFile(path) as tif:
                        by_page = len(tif.pages) == slices  # page N is slice N: its pixels, as recorded before
                        if by_page:
                            page = tif.pages[tiff_page]
                            check_plane(path, page.imagelength, page.imagewidth)  # as the loader will
                        pixels = tif.pages[tiff_page].asarray() if by_page else None
                    if pixels is None:  # one page for the stack, volume tiles, channels on pages of their own
                        pixels = read_slice(path, tiff_page)  # the slice as the loader reads it
                        pixels = pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)
                except (OSError, ValueError, IndexError, tifffile.TiffFileError) as err:
                    raise DataError(f"{path}: cannot read TIFF slice {tiff_page} ({brief(err)}); the file may be "
                                    "truncated or corrupt: export it again") from err
                known[key] = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
        return known[key]

    parts = []
    for key in ("image", "label"):
        if not sample.get(key):
            continue
        path = Path(str(sample[key]))
        if path.is_dir():
            parts += [f"{f.name}:{digest(f)}" for f in sorted(path.iterdir(), key=lambda f: f.name)
                      if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in INSTANCE_MASK_SUFFIXES]
        elif path.suffix.lower() in (".tif", ".tiff"):
            parts.append(digest(path, page))
        elif path.is_file():
            parts.append(digest(path))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _glob(root: Path, pattern: str) -> list[Path]:
    """``root.glob(pattern)``, but a ``**`` also enters linked folders, as ``medseg infer`` does (each folder
    once; pathlib's ``**`` skips links, which dropped the images of a linked sub-folder without a word).
    Under a ``**``, hidden folders (``.ipynb_checkpoints``, ``.Trash``) are not entered unless the pattern
    names them before it (``.hidden/**/*.png``); names match with the system's case rule, as pathlib's do.

    Raises:
        DataError: a link matching ``pattern`` has no target. A folder that cannot be listed is a warning.
    """
    from medseg.discovery import BROKEN_LINK, files_under

    if "**" not in pattern:
        found = list(root.glob(pattern))
        for path in found:  # an image link kept out by the callers' is_file() without a word otherwise
            if path.is_symlink() and not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES:
                raise DataError(f"{path}: {BROKEN_LINK}")
        return found

    parts = [part for part in pattern.replace(os.sep, "/").split("/") if part not in ("", ".")]
    fixed = 0  # leading parts without wildcards: the folder to search from
    while fixed < len(parts) and parts[fixed] != "**" and not any(c in parts[fixed] for c in "*?["):
        fixed += 1
    base, wanted = root.joinpath(*parts[:fixed]), parts[fixed:]
    if not base.is_dir():
        return []
    files, problems = files_under(base)
    for where, why in problems:
        if where.is_dir():
            logging.getLogger(__name__).warning("%s: %s; its images, if any, are left out", where, why)
        elif _glob_match(where.relative_to(base).parts, wanted):
            raise DataError(f"{where}: {why}")
    return [f for f in files if _glob_match(f.relative_to(base).parts, wanted)]


def _glob_match(parts: tuple[str, ...], pattern: list[str]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts, ``**`` standing for any number of folders."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatch(parts[0], head) and _glob_match(parts[1:], rest)


def find_image_mask_pairs(root: str | os.PathLike, image_glob: str = "images/*",
                          mask_template: str = "../masks/{stem}.*") -> list[dict]:
    """List ``{"image", "label", "name", "group"}`` for every image matching ``image_glob`` under ``root``.

    Each image's mask is found with ``mask_template``, a glob relative to the image's folder in which
    ``{stem}`` and ``{name}`` stand for the image's file stem and name, ``{match}`` for what the first
    ``*`` of ``image_glob``'s file-name part matched (Cellpose's ``000_img.png`` + ``000_masks.png``:
    ``image_glob="*_img.png", mask_template="{match}_masks.png"``), and ``{parent}`` for the name of the
    image's folder (``images/plate1/x.tif`` + ``masks/plate1/x.tif``: ``image_glob="images/*/*.tif",
    mask_template="../../masks/{parent}/{stem}.tif"``). The defaults read
    ``root/images/NAME`` + ``root/masks/STEM.*``; masks beside their images (``001.bmp`` + ``001.png``) are
    ``image_glob="**/*.bmp", mask_template="{stem}.png"``. ``group`` is the image's folder relative to
    ``root`` (used to stratify the split); ``name`` is the image's relative path without suffix.

    Raises:
        DataError: no such folder, no image matches, or an image has no (or more than one) mask.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data pointing to the images + masks folder")
    images = sorted((p for p in _glob(root, any_case_suffix(image_glob)) if p.is_file()
                     and p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.startswith(".")),  # macOS "._" companions, editors' temporary files
                    key=lambda p: natural_key(p.relative_to(root).as_posix()))
    if not images:
        volumes = _volumes_said(sorted(p for p in _glob(root, image_glob) if p.is_file()))
        if not volumes and _dsb_like(root):
            volumes = ("; this is the Data Science Bowl layout ({id}/images/ + {id}/masks/, one mask per nucleus), "
                       "which bundles/nuclei reads")
        raise DataError(f"{root}: no images match '{image_glob}' (of the types read: {', '.join(IMAGE_SUFFIXES)})"
                        f"{volumes or '; set image_glob in the bundle config (--set image_glob=...)'}")
    found = {}
    for image in images:
        fields = {"stem": image.stem, "name": image.name, "match": _star_match(image.name, image_glob),
                  "parent": os.path.basename(os.path.abspath(image.parent))}  # "--data ." has a name too
        try:  # the image's folder and the fields as they are ("plate [1]/"), the template's wildcards as such
            shown = str(image.parent / mask_template.format(**fields))
            pattern = os.path.join(glob.escape(str(image.parent)),
                                   mask_template.format(**{k: glob.escape(v) for k, v in fields.items()}))
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigValueError(f"mask_template '{mask_template}': {type(err).__name__} {err}; its placeholders "
                                   "are {stem}, {name}, {match} (what the first * of image_glob matched) and "
                                   "{parent} (the image's folder's name), paths relative to each image's "
                                   "folder") from err
        matched = glob.glob(pattern)  # as written first: x.png is the mask even when x.PNG lies beside it
        for form in (None, "NFC", "NFD"):  # a name macOS wrote decomposed (NFD) beside one written composed
            if matched:
                break
            matched = glob.glob(any_case_suffix(unicodedata.normalize(form, pattern) if form else pattern))
        found[image] = pattern, shown, sorted(
            Path(m) for m in matched  # as found: "images/../masks" through a linked folder is not "masks"
            if Path(m).resolve() != image.resolve() and Path(m).suffix.lower() in MASK_SUFFIXES)
    # masks beside their images that image_glob matches too (Cellpose's x.tif + x_masks.tif) are not images
    taken = {m.resolve() for _, _, masks in found.values() for m in masks}
    pairs = []
    for image in images:
        if image.resolve() in taken:
            continue
        pattern, shown, masks = found[image]
        if not masks:
            lossy = [m for m in glob.glob(any_case_suffix(pattern))
                     if Path(m).suffix.lower() in LOSSY_SUFFIXES and Path(m).resolve() != image.resolve()]
            if lossy:
                raise lossy_mask_error(lossy[0])
            unread = sorted(m for m in glob.glob(any_case_suffix(pattern)) if Path(m).resolve() != image.resolve()
                            and Path(m).suffix.lower() not in MASK_SUFFIXES)
            if unread:
                how = ("Cellpose's _seg.npy holds Python objects, which are not loaded: save its masks as PNG or "
                       "TIFF (Cellpose: --save_png or --save_tif, or File > Save masks as PNG/tif)"
                       if unread[0].lower().endswith("_seg.npy") else
                       f"save it as a PNG or TIFF label image ({', '.join(MASK_SUFFIXES)})")
                raise DataError(f"{unread[0]}: masks of type {Path(unread[0]).suffix} are not read; {how}")
            sample = image.parent.parent
            if image.parent.name == "images" and image.stem == sample.name and (sample / "masks").is_dir() and \
                    sample.resolve() == root.resolve():  # one sample of the Kaggle layout given as the data
                raise DataError(f"{root}: one sample of the Kaggle DSB layout (images/{image.name} + masks/*); "
                                f"pass --data {sample.parent}, the folder that holds the samples")
            of = _cellpose_output_of(image, images)
            if of is not None:
                raise DataError(f"{image}: no mask matches {shown}; it looks like Cellpose's output for {of.name}, "
                                f"not an image: move Cellpose's outputs out of {image.parent}, or set image_glob "
                                "to match the images alone")
            raise DataError(f"{image}: no mask matches {shown}; add the mask or set mask_template")
        if len(masks) > 1:
            named = [_shown_under(m, root) for m in masks[:2]]
            raise DataError(f"{image}: {len(masks)} masks match {shown} ({named[0]}, {named[1]}); "
                            "make mask_template specific (its {parent} stands for the image's folder's name)")
        for path, what in ((image, "image"), (masks[0], "mask")):
            if path.suffix.lower() in (".tif", ".tiff") and (pages := count_slices(path)) > 1:
                fix = ("save each page as its own image, with its mask" if what == "image" else
                       "a mask is one page: merge pages of one object each into one label image (0 = background, "
                       "one value per object), or save each page as its own mask with its own image")
                raise DataError(f"{path}: a stack of {pages} pages; this bundle trains on 2D images, one per file: "
                                f"{fix}")
        rel = image.relative_to(root)
        pairs.append({"image": str(image), "label": str(masks[0]), "page": 0,
                      "name": rel.with_suffix("").as_posix(), "group": rel.parent.as_posix()})
    _warn_unpaired_masks(pairs, images, mask_template)
    first: dict[str, str] = {}
    for pair in pairs:  # a.png and a.jpg (a preview, a copy) would be one sample twice, maybe in both splits
        other = first.setdefault(pair["name"].lower(), pair["image"])
        if other != pair["image"]:
            raise DataError(f"{pair['image']}: another image of the same name, {Path(other).name}, is also "
                            f"matched by '{image_glob}'; keep one, or make image_glob specific (e.g. "
                            f"{Path(image_glob).parent.as_posix()}/*{Path(other).suffix})")
    return pairs


#: What Cellpose adds to an image's stem for the files it writes beside it (besides ``_masks`` and ``_seg.npy``)
_CELLPOSE_OUTPUTS = ("_flows", "_cp_output", "_cp_outlines", "_outlines", "_cp_masks")


def _cellpose_output_of(image: Path, images: list[Path]) -> Path | None:
    """The image of ``images`` in ``image``'s folder that ``image`` is a Cellpose output of, by its name
    (``x_flows.tif`` of ``x.tif``), else ``None``."""
    stem = image.stem.lower()
    for suffix in _CELLPOSE_OUTPUTS:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            base = stem[: -len(suffix)]
            return next((i for i in images if i.parent == image.parent and i.stem.lower() == base), None)
    return None


def _warn_unpaired_masks(pairs: list[dict], images: list[Path], mask_template: str) -> None:
    """One warning per folder of masks apart from the images (``masks/`` beside ``images/``) that holds mask files
    no image pairs with: an image missing, or left out by ``image_glob``; without it, their absence went unsaid.
    Files of the template's form count (``{stem}.*``: any mask file; ``{stem}_masks.png``: ``*_masks.png``);
    masks beside their images are not weighed (other pictures lie there). Said once per folder and files until
    :func:`forget_said` (a command that lists its data twice says it once)."""
    name_form = re.sub(r"\{(stem|name|match|parent)\}", "*", Path(mask_template.replace("\\", "/")).name)
    image_folders = {p.parent.resolve() for p in images}
    by_folder: dict[Path, set[str]] = {}
    for pair in pairs:
        label = Path(pair["label"])
        by_folder.setdefault(label.parent.resolve(), set()).add(label.name)  # a linked mask: its own name there
    for folder, used in sorted(by_folder.items()):
        if folder in image_folders:
            continue
        try:
            with os.scandir(folder) as entries:
                unpaired = sorted((e.name for e in entries if e.name not in used and not e.name.startswith(".")
                                   and Path(e.name).suffix.lower() in MASK_SUFFIXES
                                   and fnmatch.fnmatch(e.name.lower(), name_form.lower()) and e.is_file()),
                                  key=natural_key)
        except OSError:
            continue
        key = (str(folder), tuple(unpaired))
        if not unpaired or key in _UNPAIRED_SAID:
            continue
        _UNPAIRED_SAID.add(key)
        one = len(unpaired) == 1
        logging.getLogger(__name__).warning(
            "%s: %s pair%s with no image (%s%s) and %s not used; %s missing, or left out by image_glob?",
            folder, "1 mask file" if one else f"{len(unpaired)} mask files", "s" if one else "",
            ", ".join(unpaired[:3]), ", ..." if len(unpaired) > 3 else "",
            "is" if one else "are", "is its image" if one else "are their images")


#: The unpaired masks said (folder, names), so that a command that lists its data twice says them once
_UNPAIRED_SAID: set[tuple[str, tuple[str, ...]]] = set()


def forget_said() -> None:
    """Let the next listing of the data say again what it found amiss (called as each command starts)."""
    _UNPAIRED_SAID.clear()


def _shown_under(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` where it lies under it (``masks/plate1/x.tif``), else as found."""
    try:
        return Path(os.path.normpath(path)).relative_to(os.path.normpath(root)).as_posix()
    except ValueError:
        return str(path)


def _star_match(name: str, image_glob: str) -> str:
    """What the first ``*`` of ``image_glob``'s file-name part matched in ``name`` (``000`` of ``000_img.png`` for
    ``*_img.png``); the name's stem when the part has no ``*``, has a ``[...]`` class, or does not match."""
    part = image_glob.replace("\\", "/").rsplit("/", 1)[-1]
    if "*" not in part:
        return Path(name).stem
    regex = "".join("(.*)" if c == "*" else "." if c == "?" else re.escape(c) for c in part.replace("**", "*"))
    found = re.fullmatch(regex, name, flags=re.IGNORECASE) if "[" not in part else None
    return found.group(1) if found else Path(name).stem


def split_by_group(samples: list[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Random but reproducible train/validation split, stratified by each sample's ``group``.

    Each group gives ``round(val_fraction * n)`` samples (at least one when it has two or more) to
    validation, drawn with ``seed``; groups too small to give one (a single sample; two at the default 0.2)
    are pooled and split as one group, so that data whose groups are all that small still validates, and
    folders of two do not give half their samples. Both lists keep the input order.

    Raises:
        DataError: ``val_fraction`` outside [0, 1), or no training sample would be left.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1); use e.g. 0.2")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(str(s.get("group", "")), []).append(i)
    def small(members: list[int]) -> bool:
        return len(members) == 1 or round(val_fraction * len(members)) == 0

    pooled = sorted(i for members in groups.values() if small(members) for i in members)
    groups = {key: members for key, members in groups.items() if not small(members)}
    if pooled:
        groups["\0singletons"] = pooled  # a key no real group has
    rng = random.Random(seed)
    val: set[int] = set()
    for key in sorted(groups):
        members = groups[key]
        k = round(val_fraction * len(members))
        if val_fraction > 0 and len(members) >= 2:
            k = max(k, 1)
        val.update(rng.sample(members, min(k, len(members) - 1)) if len(members) > 1 else [])
    train = [s for i, s in enumerate(samples) if i not in val]
    if not train:
        raise DataError(f"no training samples left from {len(samples)}; lower val_fraction")
    return {"train": train, "val": [s for i, s in enumerate(samples) if i in val]}


def group_sampler(samples: list[dict], power: float = 0.0, num_samples: int | None = None) -> object:
    """A training sampler that draws each ``group`` (folder, category) ``n_g ** (1 - power)`` times in proportion.

    ``power=0`` is a plain shuffle (each sample once per epoch, no replacement). ``power=1`` draws every
    group equally often, ``0.5`` in proportion to the square root of its size: small groups (a second
    dataset of 16 images beside 200, a rare stain) are seen more often without drowning the large one.
    Draws are with replacement for ``power > 0``; an epoch has ``num_samples`` draws (default: as many
    as samples). Randomness comes from torch's global generator, so ``set_determinism`` fixes it.

    Raises:
        ValueError: ``power`` outside [0, 1] or no samples.
    """
    import torch
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    if not 0.0 <= float(power) <= 1.0:
        raise ConfigValueError(f"group_balance={power}: must lie in [0, 1] (0 = plain shuffle); "
                               "fix it in the config or with --set group_balance=0.5")
    if not samples:
        raise ValueError("no training samples to draw from")
    n = int(num_samples or len(samples))
    if float(power) == 0.0:
        return RandomSampler(range(len(samples)), num_samples=n if num_samples else None)
    counts: dict[str, int] = {}
    for s in samples:
        key = str(s.get("group", ""))
        counts[key] = counts.get(key, 0) + 1
    weights = [counts[str(s.get("group", ""))] ** -float(power) for s in samples]
    return WeightedRandomSampler(torch.tensor(weights, dtype=torch.double), num_samples=n, replacement=True)


def folder_split(data_dir: str | os.PathLike, image_glob: str = "images/*", mask_template: str = "../masks/{stem}.*",
                 val_fraction: float = 0.2, seed: int = 0, save_to: str | None = None,
                 val_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """:func:`find_image_mask_pairs` split by :func:`split_by_group`: ``train``, ``val`` and ``all``; with
    ``val_dir``, the pairs of ``data_dir`` train and those of ``val_dir`` (found alike) validate
    (:func:`fixed_split`)."""
    pairs = find_image_mask_pairs(data_dir, image_glob, mask_template)
    if val_dir:
        found = _in_val_folder(lambda: find_image_mask_pairs(val_dir, image_glob, mask_template), val_dir,
                               f"images '{image_glob}', masks '{mask_template}'")
        split = fixed_split(pairs, found, data_dir, val_dir)
    else:
        split = split_by_group(pairs, val_fraction, seed)
    _save_split(split, data_dir, save_to, val_dir)
    return {**split, "all": split["train"] + split["val"] if val_dir else pairs}


def find_dsb_samples(root: str | os.PathLike) -> list[dict]:
    """List the DSB 2018 samples (Kaggle layout) under ``root`` or ``root/stage1_train``.

    A sample is a folder ``{id}/`` holding ``images/{id}.png`` and ``masks/`` (one PNG per nucleus; an empty
    ``masks/`` means no nuclei). Entries are ``{"image", "label" (the masks folder), "name", "group"}``;
    ``group`` is the category from a ``manifest.csv`` beside the samples (or beside the folder that holds them,
    when it names them) when present, else the image size.

    Raises:
        DataError: no samples, or a sample without its image or its ``masks/`` folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data pointing to the DSB 2018 folder")
    base = root / "stage1_train" if (root / "stage1_train").is_dir() else root
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    folders = [p for p in folders if (p / "images").is_dir() or (p / "masks").is_dir()]
    if not folders:
        raise DataError(f"{root}: no DSB samples found{_layout_hint(root)}")
    categories = _manifest_categories(root, base)
    if not categories and base == root:  # --data .../stage1_train: the release keeps manifest.csv beside it
        above = _manifest_categories(root.resolve().parent)
        categories = above if any(f.name in above for f in folders) else {}
    samples = []
    for folder in folders:
        image = folder / "images" / f"{folder.name}.png"
        if not image.is_file():
            pictures = [p for p in (folder / "images").iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() in IMAGE_SUFFIXES] if (folder / "images").is_dir() else []
            found = sorted(p for p in pictures if p.suffix.lower() == ".png")  # x.PNG too
            if len(pictures) > 1 and (folder / "masks").is_dir():
                train = next((f for f in folders if f.name.lower() == "train"), folder)
                raise DataError(f"{folder}: images/ holds {len(pictures)} images, not one DSB sample's; for images "
                                f"with instance label images pass the folder to train on, e.g. --data {train}")
            if len(found) != 1:
                raise DataError(f"{folder}: no images/{folder.name}.png; put the sample's image there")
            image = found[0]
        if not (folder / "masks").is_dir():
            raise DataError(f"{folder}: no masks/ folder; add one PNG per nucleus under masks/ or remove the sample")
        samples.append({"image": str(image), "label": str(folder / "masks"), "page": 0, "name": folder.name,
                        "group": categories.get(folder.name) or _size_group(image)})
    return samples


def _dsb_like(root: Path, depth: int = 1) -> bool:
    """Whether ``root`` (or, ``depth`` levels down, a folder in it: the competition's ``stage1_train/``) holds
    samples in the Kaggle DSB layout (``{id}/images/{id}.*`` beside ``{id}/masks/``)."""
    try:
        folders = [p for p in itertools.islice(root.iterdir(), 200) if p.is_dir()][:20]
    except OSError:
        return False
    return any((p / "masks").is_dir() and any((p / "images").glob(f"{glob.escape(p.name)}.*")) for p in folders) \
        or (depth > 0 and any(_dsb_like(p, depth - 1) for p in folders[:5]))


def _layout_hint(root: Path) -> str:
    """What to do when ``root`` holds no DSB samples, from what it does hold."""
    kaggle = "; expected {id}/images/{id}.png and {id}/masks/*.png"
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        if root.name.lower() in ("images", "masks") and (root.parent / "images").is_dir() and \
                (root.parent / "masks").is_dir():  # one folder of an images/ + masks/ pair
            return (f"{kaggle}, or for images with instance label images the folder holding images/ and masks/: "
                    f"pass --data {root.parent}")
        return (f"{kaggle}; for images with their instance label images in this folder set image_glob and "
                "mask_template, e.g. for Cellpose's 000_img.png + 000_masks.png -s 'image_glob=*_img.png' "
                "-s 'mask_template={match}_masks.png'")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        volumes = _volumes_said(sorted((root / "images").iterdir()))
        if volumes:
            return f"{kaggle}{volumes}"
        if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in (root / "images").iterdir()) and any(
                q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                for p in (root / "images").iterdir() if p.is_dir() for q in p.iterdir()):
            return (f"{kaggle}; images/ and masks/ are here with sub-folders: read them as images with label images "
                    "of the same sub-folder and name, -s 'image_glob=images/*/*' "
                    "-s 'mask_template=../../masks/{parent}/{stem}.*'")
        return f"{kaggle}; images/ and masks/ are here: read them as images with label images, --set layout=folders"
    if (root / "images").is_dir():
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "images")
        return (f"{kaggle}; for images/ with instance label images put the labels in masks/ beside it"
                f"{' (found: ' + ', '.join(others[:3]) + ')' if others else ''}, or set mask_template")
    return f"{kaggle}, or for images with instance label images set --set layout=folders"


def _manifest_categories(*folders: Path) -> dict[str, str]:
    for folder in folders:
        path = folder / "manifest.csv"
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                return {r["image_id"]: r.get("category", "") for r in csv.DictReader(fh) if r.get("image_id")}
    return {}


def _size_group(image: Path) -> str:
    try:
        with open_picture(image) as im:
            return f"{im.mode}-{im.size[1]}x{im.size[0]}"
    except (OSError, DataError):
        return ""  # the loader names the file


def dsb_split(data_dir: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0,
              save_to: str | None = None, val_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """:func:`find_dsb_samples` split by :func:`split_by_group`: ``train``, ``val`` and ``all``; with ``val_dir``,
    the samples of ``data_dir`` train and those of ``val_dir`` validate (:func:`fixed_split`)."""
    samples = find_dsb_samples(data_dir)
    if val_dir:
        split = fixed_split(samples, _in_val_folder(lambda: find_dsb_samples(val_dir), val_dir,
                                                    "DSB Kaggle layout: {id}/images + {id}/masks"), data_dir, val_dir)
    else:
        split = split_by_group(samples, val_fraction, seed)
    _save_split(split, data_dir, save_to, val_dir)
    return {**split, "all": split["train"] + split["val"] if val_dir else samples}


#: Layouts of instance-labelled data (:func:`instance_split`).
INSTANCE_LAYOUTS = ("auto", "kaggle", "folders")
#: ``image_glob`` and ``mask_template`` of the folders layout when not set (StarDist's images/ + masks/).
_FOLDER_DEFAULTS = ("images/*", "../masks/{stem}.*")


def instance_layout(data_dir: str | os.PathLike, layout: str = "auto", image_glob: str = _FOLDER_DEFAULTS[0],
                    mask_template: str = _FOLDER_DEFAULTS[1]) -> str:
    """``"kaggle"`` or ``"folders"``: ``layout`` itself, or for ``"auto"``: ``"folders"`` when ``image_glob`` or
    ``mask_template`` is set, or when ``data_dir/images`` holds image files beside ``data_dir/masks/`` (as
    StarDist's data is kept), else ``"kaggle"``.

    Raises:
        ConfigValueError: an unknown ``layout``, or ``"auto"`` on a folder that holds both layouts.
    """
    if layout not in INSTANCE_LAYOUTS:
        raise ConfigValueError(f"layout={layout!r}: unknown; use --set layout=auto, kaggle or folders")
    if layout != "auto":
        return layout
    if (image_glob, mask_template) != _FOLDER_DEFAULTS:
        return "folders"
    root = Path(data_dir)
    images = root / "images"
    if not (images.is_dir() and (root / "masks").is_dir() and any(
            p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir())):
        return "kaggle"
    base = root / "stage1_train" if (root / "stage1_train").is_dir() else root
    kaggle = [p.name for p in base.iterdir() if p.is_dir() and (p / "images").is_dir() and (p / "masks").is_dir()]
    if kaggle:
        raise ConfigValueError(f"{root}: holds both images/ + masks/ and DSB samples ({kaggle[0]}/images, ...); "
                               "say which to read with --set layout=folders or --set layout=kaggle")
    return "folders"


def instance_split(data_dir: str | os.PathLike, layout: str = "auto", image_glob: str = _FOLDER_DEFAULTS[0],
                   mask_template: str = _FOLDER_DEFAULTS[1], val_fraction: float = 0.2, seed: int = 0,
                   save_to: str | None = None, val_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Instance-labelled samples split by :func:`split_by_group`: ``train``, ``val`` and ``all``.

    Two layouts (``layout``, see :func:`instance_layout`): ``"kaggle"``, the DSB 2018 release
    (:func:`find_dsb_samples`: a folder of per-object masks per image), and ``"folders"``, images with one
    instance label image each (0 = background, one value per object; :func:`find_image_mask_pairs` with
    ``image_glob`` and ``mask_template``), as ``medseg infer`` writes them. A validation folder ``val_dir`` is read
    in the layout of ``data_dir``.
    """
    chosen = instance_layout(data_dir, layout, image_glob, mask_template)
    if layout == "auto":
        logging.getLogger(__name__).info("%s: read in the %s layout", data_dir, chosen)
    if chosen == "kaggle":
        return dsb_split(data_dir, val_fraction, seed, save_to, val_dir)
    return folder_split(data_dir, image_glob, mask_template, val_fraction, seed, save_to, val_dir)


def with_val_prefix(samples: dict[str, dict], record: object, split: str) -> dict[str, dict]:
    """``samples`` (by name) and, where the split ``record`` prefixed its validation names (:func:`fixed_split`)
    and ``split`` is ``"val"``, those of its validation names under their prefixed name too, renamed so: the
    validation folder read on its own, by the names the record gives its images. A sample whose image and label
    are those the record holds for the training image of its unprefixed name (its digest: a copy of the training
    folder) is not so named, so that a training image is never scored as a validation one; one edited since is,
    and is said as changed where the digests are compared."""
    prefix = record.get(VAL_PREFIX) if isinstance(record, dict) and split == "val" else None
    if not isinstance(prefix, str) or not prefix:
        return samples
    wanted = {str(n) for n in record.get("val", [])} if isinstance(record.get("val"), list) else set()
    digests = record.get("sha256") if isinstance(record.get("sha256"), dict) else {}
    files: dict[str, str] = {}
    aliases = {prefix + n: {**d, "name": prefix + n} for n, d in samples.items()
               if prefix + n in wanted and prefix + n not in samples
               and (n not in digests or sample_digest(d, files) != digests[n])}
    return {**aliases, **samples}


def recorded_samples(datalists: dict[str, list[dict]], split_file: str | os.PathLike | None,
                     split: str = "val") -> list[dict]:
    """The samples a run's ``split.json`` names under ``split`` (``"val"``, ``"train"``), by name, from
    ``datalists["all"]``: what an exported bundle's ``evaluate.json`` scores, so that plain ``monai.bundle run``
    scores the images the model was validated on, not a split drawn anew from its own settings. ``split_file``
    ``None`` or ``split`` ``"all"``: ``datalists[split]`` as drawn.

    Raises:
        DataError: the record cannot be read, or none of the samples it names are in the data.
    """
    if split_file is None or split == "all":
        return datalists[split]
    try:
        record = json.loads(Path(split_file).read_text(encoding="utf-8"))
        names = [str(n) for n in record[split]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{split_file}: not a readable split record ({brief(str(err) or type(err).__name__)}); "
                        "restore it, or draw the split from the settings: split_record null in the config, or "
                        "--split_record '$None' to python -m monai.bundle run") from err
    samples = with_val_prefix({str(d.get("name")): d for d in datalists["all"]}, record, split)
    present = [samples[n] for n in names if n in samples]
    if not present:
        folder = record.get("val_dir") if split == "val" and isinstance(record, dict) else None
        data = f"val_dir the folder it was validated on ({Path(str(folder)).name}; dataset_dir the one it was " \
            "trained on)" if folder else "dataset_dir the data the model was trained on"
        raise DataError(f"{split_file}: none of the {len(names)} {split} images it names are in the data given; "
                        f"give {data}, or set eval_split to all")
    if len(present) < len(names):
        logging.getLogger(__name__).warning("%s: %d of its %d %s images are not in the data given; scoring the %d "
                                            "that are", split_file, len(names) - len(present), len(names), split,
                                            len(present))
    return present
