"""medseg: train, evaluate, share and apply biomedical segmentation models built on MONAI bundles."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Segmentation", "Segmenter", "__version__"]


def __getattr__(name: str):  # the CLI starts without importing torch and MONAI
    if name in ("Segmenter", "Segmentation"):
        from medseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
