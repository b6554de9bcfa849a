"""medseg: train, evaluate, share and apply biomedical segmentation models built on MONAI bundles."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
