"""What the benchmark scripts share: the machine's name and argument checks."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

# the labelled data beside the repository, wherever the script is run from
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_name() -> str:
    """The processor's model name (Linux), else what Python knows of the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value
