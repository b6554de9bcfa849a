"""Shared fixtures: synthetic EM-like slices (random cell tessellations with dark membranes) and real-data paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "isbi_em"
SHARED_DATA = REPO.parent / "shared" / "data"

#: The line in which ``medseg train`` says what data it found, before the first epoch.
DATA_FOUND = re.compile(r": \d+ labelled (images|slices)\b.*"
                        r"(: \d+ for training, \d+ for validation|for training; .*: \d+ for validation)")

#: Overrides for a tiny network and windows, valid for every isbi_em workflow (train, evaluate, infer).
TINY_NET = [
    "patch_size=[64,64]",
    "mirror_border=8",
    "network_def#channels=[4,8,16]",
    "network_def#strides=[2,2]",
    "network_def#num_res_units=0",
]
#: Overrides that make the isbi_em bundle train in seconds on tiny synthetic slices.
TINY = [*TINY_NET, "samples_per_image=2", "val_count=1", "val_interval=1"]


def synthetic_em(size: int = 96, n_cells: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random Voronoi tessellation: bright noisy cell interiors separated by ~2-px dark membranes.

    Returns:
        ``(image, label)``, both ``(size, size)`` uint8; label 255 = interior, 0 = membrane.
    """
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, size, size=(n_cells, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    dist = (yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2
    cells = dist.argmin(-1)
    edges = np.zeros((size, size), bool)
    edges[:-1] |= cells[:-1] != cells[1:]
    edges[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    membrane = ndimage.binary_dilation(edges, iterations=1)
    label = np.where(membrane, 0, 255).astype(np.uint8)
    image = 170 + 25 * rng.standard_normal((size, size))
    image[membrane] = 60
    image = ndimage.gaussian_filter(image, 0.8) + 8 * rng.standard_normal((size, size))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_isbi_folder(root: Path, n: int = 4, size: int = 96) -> Path:
    """Write ``n`` synthetic pairs in the PNG layout ``root/train/{image,label}/{k}.png``."""
    from PIL import Image

    for sub in ("image", "label"):
        (root / "train" / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        image, label = synthetic_em(size=size, seed=k)
        Image.fromarray(image).save(root / "train" / "image" / f"{k}.png")
        Image.fromarray(label).save(root / "train" / "label" / f"{k}.png")
    return root


@pytest.fixture(autouse=True)
def _no_internal_error(monkeypatch):
    """Every command a test runs through Typer's runner: an unexpected exception, which the CLI reports as an
    ``internal error`` (a bug, not a user's mistake), fails the test whatever exit code it looked for."""
    from typer.testing import CliRunner

    real = CliRunner.invoke

    def invoke(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        assert "internal error: " not in result.output, result.output[-3000:]
        return result

    monkeypatch.setattr(CliRunner, "invoke", invoke)


@pytest.fixture
def isbi_folder(tmp_path: Path) -> Path:
    """A synthetic ISBI data folder (PNG layout) with 4 labelled slices."""
    return write_isbi_folder(tmp_path / "isbi")


@pytest.fixture
def isbi_stacks(tmp_path: Path) -> Path:
    """A synthetic ISBI data folder in the challenge layout: train-volume.tif + train-labels.tif (3 pages)."""
    import tifffile

    root = tmp_path / "stacks"
    root.mkdir()
    pairs = [synthetic_em(seed=k) for k in range(3)]
    tifffile.imwrite(root / "train-volume.tif", np.stack([p[0] for p in pairs]), photometric="minisblack")
    tifffile.imwrite(root / "train-labels.tif", np.stack([p[1] for p in pairs]), photometric="minisblack")
    return root


def _shared(folder: str, *probes: str) -> Path:
    """``../shared/data/FOLDER`` when each of ``probes`` (what the tests read there) exists inside it, else
    skip the test."""
    path = SHARED_DATA / folder
    missing = [p for p in probes if not (path / p).exists()]
    if missing:
        pytest.skip(f"real data not available at {path / missing[0]}")
    return path


#: The fixtures that give real data: a test using one is marked ``realdata`` (``-m "not realdata"``).
SHARED_FIXTURES = ("shared_isbi", "shared_dicom", "shared_nifti", "shared_cells3class", "shared_dsb")


def _quota(folder: Path, v2: bool) -> int | None:
    """The CPUs a cgroup folder's quota allows (1.5 CPUs: 2); ``None`` where it sets none."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup"), membership: str | None = None) -> int:
    """The CPUs this process may use: those it may run on, within the CPU quotas of its cgroup and the cgroups
    above it (cgroup v2 or v1: a container's ``--cpus``, a batch job's share), which neither ``os.cpu_count``
    nor the affinity shows.

    Args:
        cgroup: where the cgroup file systems are mounted.
        membership: the text of ``/proc/self/cgroup`` (read when not given).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    limits = []
    for line in membership.splitlines() or ["0::/", "1:cpu:/"]:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = hierarchy == "0" and not controllers
        if not v2 and "cpu" not in controllers.split(","):
            continue
        # v2 at the mount point (or its "unified" folder in a hybrid layout); v1 in the controller's folder.
        # A container's own cgroup is mounted as the root while the path names it from the host's: the
        # folders of the path that are not there are passed over
        for base in ([cgroup, cgroup / "unified"] if v2 else [cgroup / controllers, cgroup / "cpu"]):
            folder = base / path.strip("/")
            while True:
                limits.append(_quota(folder, v2))
                if folder == base or base not in folder.parents:
                    break
                folder = folder.parent
    return max(1, min([cpus, *(n for n in limits if n is not None)]))


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (-p no:xdist) has no such hook
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (``make test``): one worker per usable CPU, at most 8, or ``PYTEST_XDIST_AUTO_NUM_WORKERS``."""
    told = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "")
    return int(told) if told.isdigit() else min(8, usable_cpus())


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker takes its share of the usable CPUs for PyTorch's threads: the workers'
    threads would otherwise contend for the same cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, usable_cpus() // workers))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SHARED_FIXTURES):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture
def shared_isbi() -> Path:
    """The real ISBI 2012 slices in ../shared/data (skips the test when absent)."""
    return _shared("isbi2012", "train/image", "train/label", "test")


@pytest.fixture
def shared_dicom() -> Path:
    """The real DICOM samples in ../shared/data/dicom (skips the test when absent)."""
    return _shared("dicom", "series_mr_4slice", "series_mr_4slice_reference.nii.gz", "series_ct_3slice", "single")


@pytest.fixture
def shared_nifti() -> Path:
    """The real NIfTI samples in ../shared/data/nifti (skips the test when absent)."""
    return _shared("nifti", "anatomical.nii", "example4d.nii.gz")


def write_dicom_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    series_uid: str,
    position: tuple[float, float, float] | None,
    instance: int = 1,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.5, 0.5),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_number: int = 1,
    frames: int = 1,
    with_pixels: bool = True,
    photometric: str = "MONOCHROME2",
) -> Path:
    """Write a small CT Image Storage file with the given geometry (``pixels``: ``(Y, X)`` or ``(F, Y, X)`` int16)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, instance
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Synthetic", "SYN1"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "O", "20260101", "120000"
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
    if position is not None:  # None: an image without a place in space (a secondary capture, say)
        ds.ImagePositionPatient = [f"{v:g}" for v in position]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    ds.SliceThickness = "1"
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if frames > 1:
        ds.NumberOfFrames = frames
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(folder: Path, n: int = 4, *, series_uid: str = "1.2.826.0.1.3680043.8.498.10",
                       step: float = 2.0, size: int = 8, series_number: int = 1, reverse_names: bool = True,
                       prefix: str = "IM") -> Path:
    """``n`` axial slices whose raw pixel value is 100 * their position index; file names run against position."""
    for k in range(n):
        name = f"{prefix}{(n - 1 - k) if reverse_names else k:03d}.dcm"
        write_dicom_slice(folder / name, np.full((size, size), 100 * k, np.int16), series_uid=series_uid,
                          position=(0.0, 0.0, 10.0 + step * k), instance=(k * 7) % n + 1,
                          series_number=series_number)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Weights of the isbi_em network shrunk by TINY_NET (untrained, seeded): enough for format tests."""
    import torch

    from medseg.bundle import load_config, parse_override

    torch.manual_seed(0)
    parser = load_config(BUNDLE, "infer", overrides=dict(parse_override(item) for item in TINY_NET))
    network = parser.get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": network.state_dict()}, path)
    return path


# --- jurkat (3-class cells) and nuclei (DSB 2018) synthetic data ---------------------------------------------

#: Overrides for a tiny jurkat network (valid for train, evaluate and infer).
JURKAT_TINY_NET = [
    "patch_size=[64,64]",
    "network_def#channels=[4,8]",
    "network_def#strides=[2]",
    "network_def#num_res_units=0",
]
#: Overrides for a tiny nuclei network (valid for train, evaluate and infer).
NUCLEI_TINY_NET = JURKAT_TINY_NET


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def synthetic_cells(rng: np.random.Generator, size: tuple[int, int] = (96, 96),
                    n_cells: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Round cells on a light background: pink cytoplasm (mask 128) around a dark purple nucleus (mask 255).

    Returns:
        ``(image, mask)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 holding only 0, 128 and 255.
    """
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    r_max = min(h, w) / 4
    for _ in range(n_cells):
        r = rng.uniform(0.6, 1.0) * r_max
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        cell = _disc((h, w), cy, cx, r)
        nucleus = _disc((h, w), cy + rng.uniform(-0.2, 0.2) * r, cx + rng.uniform(-0.2, 0.2) * r,
                        rng.uniform(0.4, 0.6) * r)
        mask[cell & (mask == 0)] = 128
        mask[nucleus & cell] = 255
    colours = {0: (225, 215, 220), 128: (190, 140, 185), 255: (90, 45, 130)}
    image = np.zeros((h, w, 3), np.float64)
    for value, colour in colours.items():
        image[mask == value] = colour
    image += 10 * rng.standard_normal((h, w, 3))
    image = ndimage.gaussian_filter(image, (0.7, 0.7, 0))
    return np.clip(image, 0, 255).astype(np.uint8), mask


#: ``(folder, size)`` of the images written by :func:`write_jurkat_folder`.
JURKAT_LAYOUT = [("set_a", (72, 80)), ("set_a", (96, 96)), ("set_a", (120, 110)), ("set_a", (80, 80)),
                 ("set_a", (96, 88)), ("set_a", (72, 72)), ("set_b", (96, 96)), ("set_b", (88, 100))]


def write_jurkat_folder(root: Path, layout=JURKAT_LAYOUT, seed: int = 0) -> Path:
    """Synthetic cells as ``root/FOLDER/NNN.bmp`` (RGB) + ``root/FOLDER/NNN.png`` (0/128/255), numbered per folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for folder, size in layout:
        counts[folder] = counts.get(folder, 0) + 1
        (root / folder).mkdir(parents=True, exist_ok=True)
        image, mask = synthetic_cells(rng, size)
        Image.fromarray(image).save(root / folder / f"{counts[folder]:03d}.bmp")
        Image.fromarray(mask).save(root / folder / f"{counts[folder]:03d}.png")
    return root


@pytest.fixture
def jurkat_folder(tmp_path: Path) -> Path:
    """8 synthetic cell images of sizes 72..120 px: 6 in ``set_a/`` and 2 in ``set_b/`` (BMP + PNG mask)."""
    return write_jurkat_folder(tmp_path / "jurkat")


def synthetic_nuclei(rng: np.random.Generator, size: tuple[int, int] = (64, 64), n_single: int = 3,
                     n_pairs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Bright round nuclei on a dark background, ``n_pairs`` of them touching pairs.

    Returns:
        ``(image, labels)``: ``(H, W)`` uint8 and ``(H, W)`` int32 instance labels 1..N (0 = background);
        the pairs come first (labels 1-2, 3-4, ...; where a pair overlaps the earlier label keeps the pixel),
        then the isolated nuclei (fewer than ``n_single`` when the image is too crowded).
    """
    h, w = size
    labels = np.zeros((h, w), np.int32)
    discs: list[tuple[float, float, float]] = []
    for _ in range(n_pairs):
        r = rng.uniform(5, 7)
        cy, cx = rng.uniform(r + 2, h - 3 * r - 2), rng.uniform(r + 2, w - r - 2)
        discs += [(cy, cx, r), (cy + 2 * r - 1, cx, r)]  # centres 2r - 1 apart: they touch
    next_label = 1
    for cy, cx, r in discs:
        labels[_disc((h, w), cy, cx, r) & (labels == 0)] = next_label
        next_label += 1
    for _ in range(n_single):  # isolated nuclei: at least 3 px from any other
        for _attempt in range(50):
            cy, cx, r = rng.uniform(6, h - 6), rng.uniform(6, w - 6), rng.uniform(3.5, 5)
            if not np.any(labels[_disc((h, w), cy, cx, r + 3)]):
                labels[_disc((h, w), cy, cx, r)] = next_label
                next_label += 1
                break
    image = np.where(labels > 0, 190.0, 25.0) + 8 * rng.standard_normal((h, w))
    image = ndimage.gaussian_filter(image, 0.8)
    return np.clip(image, 0, 255).astype(np.uint8), labels


#: ``(id, size, bright_background)`` of the samples written by :func:`write_dsb_folder`.
DSB_LAYOUT = [("a1", (64, 64), False), ("a2", (64, 64), False), ("a3", (64, 64), False),
              ("b1", (80, 72), False), ("b2", (80, 72), False), ("c1", (64, 64), True)]


def write_dsb_sample(base: Path, sample_id: str, image: np.ndarray, labels: np.ndarray, rgb: bool = False) -> Path:
    """One sample in the Kaggle layout: ``base/ID/images/ID.png`` (RGBA, or RGB) + ``base/ID/masks/mNN.png``."""
    from PIL import Image

    folder = base / sample_id
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    if rgb:
        pixels = np.stack([image, image, np.clip(image.astype(int) + 10, 0, 255).astype(np.uint8)], -1)
        Image.fromarray(pixels, "RGB").save(folder / "images" / f"{sample_id}.png")
    else:
        rgba = np.stack([image, image, image, np.full_like(image, 255)], -1)
        Image.fromarray(rgba, "RGBA").save(folder / "images" / f"{sample_id}.png")
    for k in range(1, int(labels.max()) + 1):
        Image.fromarray(np.where(labels == k, 255, 0).astype(np.uint8)).save(folder / "masks" / f"m{k:02d}.png")
    return folder


def write_dsb_folder(root: Path, layout=DSB_LAYOUT, seed: int = 0) -> Path:
    """Synthetic nuclei in the DSB 2018 layout ``root/stage1_train/{id}/...``; bright-background samples are
    RGB with dark nuclei (brightfield-like), the others RGBA fluorescence-like."""
    rng = np.random.default_rng(seed)
    for sample_id, size, bright in layout:
        image, labels = synthetic_nuclei(rng, size)
        write_dsb_sample(root / "stage1_train", sample_id, 255 - image if bright else image, labels, rgb=bright)
    return root


@pytest.fixture
def dsb_folder(tmp_path: Path) -> Path:
    """6 synthetic DSB samples: 3 RGBA 64x64, 2 RGBA 80x72 and 1 RGB 64x64 with a bright background."""
    return write_dsb_folder(tmp_path / "dsb")


@pytest.fixture
def shared_cells3class() -> Path:
    """The real 3-class WBC images + masks in ../shared/data (skips the test when absent)."""
    return _shared("cells3class", "dataset1", "dataset2_subset")


@pytest.fixture
def shared_dsb() -> Path:
    """The real DSB 2018 subset in ../shared/data (skips the test when absent)."""
    return _shared("dsb2018", "stage1_train", "manifest.csv")


@pytest.fixture(autouse=True)
def _no_log_handlers_on_closed_streams():
    """A CLI call in a test may leave a log handler on the stream CliRunner gave it, closed once the call
    returns; a later call in the same process would log there and print "--- Logging error ---". A command
    run from a shell never outlives its streams, so tests drop such handlers after each test."""
    import logging

    yield
    for logger in [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                         if isinstance(lg, logging.Logger))]:
        for handler in list(logger.handlers):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                logger.removeHandler(handler)
