"""Shared fixtures: synthetic EM-like slices (random cell tessellations with dark membranes) and real-data paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "isbi_em"
SHARED_DATA = REPO.parent / "shared" / "data"

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


@pytest.fixture
def shared_isbi() -> Path:
    """The real ISBI 2012 slices in ../shared/data (skips the test when absent)."""
    path = SHARED_DATA / "isbi2012"
    if not (path / "train" / "image").is_dir():
        pytest.skip(f"real data not available at {path}")
    return path
