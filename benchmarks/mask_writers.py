"""Time and size the volume writers of `medseg infer` against ITK's own writer, side by side in one run.

One mask volume (uint8, blobs of 1 on 0, as a binary segmentation) and one probability volume (float32,
the blobs smoothed) of Z × 512 × 512 voxels are written with medseg's NRRD and MetaImage writer
(`medseg.itkfiles.write_image`, compressed: NRRD gzip, MetaImage zlib), with ITK's `itk.imwrite(...,
compression=True)` to the same suffixes, and with medseg's NIfTI writer (nibabel, `.nii.gz`). Each is
written `--repeats` times; the best wall time and the file size are printed, and every file is read back
with ITK and compared with the array written.

    python benchmarks/mask_writers.py --slices 64 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_name, positive_int
from scipy import ndimage

from medseg.io import write_nifti
from medseg.itkfiles import Geometry, write_image


def volumes(slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 mask, float32 probabilities), ``(slices, 512, 512)``: random blobs, as segmented cells are."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((slices, 512, 512)).astype(np.float32), (1, 6, 6))
    prob = 1.0 / (1.0 + np.exp(-noise / noise.std() * 3.0))
    return (prob > 0.5).astype(np.uint8), prob.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=positive_int, default=64, help="slices of 512 x 512 per volume")
    parser.add_argument("--repeats", type=positive_int, default=3, help="writes of each, the best timed")
    args = parser.parse_args()
    import itk

    mask, prob = volumes(args.slices)
    geometry = Geometry((0.5, 0.5, 2.0), (-10.0, 20.0, 30.0), np.eye(3), "mm")
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)  # the same place in RAS

    def itk_write(path: Path, arr: np.ndarray) -> None:
        image = itk.image_from_array(arr)
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        itk.imwrite(image, str(path), compression=True)

    writers = {
        "medseg NRRD (gzip)": (".nrrd", lambda p, a: write_image(p, a, geometry)),
        "ITK NRRD (itk.imwrite, compressed)": (".nrrd", itk_write),
        "medseg MetaImage (zlib)": (".mha", lambda p, a: write_image(p, a, geometry)),
        "ITK MetaImage (itk.imwrite, compressed)": (".mha", itk_write),
        "medseg NIfTI (nibabel, .nii.gz)": (".nii.gz", lambda p, a: write_nifti(p, a.transpose(2, 1, 0), affine)),
    }
    print(f"machine: {cpu_name()}, python {platform.python_version()}, ITK {itk.Version.GetITKVersion()}")
    print(f"volumes: {args.slices} × 512 × 512; best of {args.repeats} writes")
    print("| writer | mask (uint8) s / MB | probabilities (float32) s / MB |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (suffix, write)) in enumerate(writers.items()):
            cells = []
            for kind, arr in (("mask", mask), ("prob", prob)):
                path = Path(tmp) / f"{k}_{kind}{suffix}"
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    write(path, arr)
                    best = min(best, time.perf_counter() - start)
                back = itk.array_from_image(itk.imread(str(path)))
                if not np.array_equal(back.reshape(arr.shape), arr):
                    raise SystemExit(f"{name}: {path.name} does not read back as written")
                cells.append(f"{best:.2f} / {path.stat().st_size / 1e6:.1f}")
                path.unlink()
            print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
