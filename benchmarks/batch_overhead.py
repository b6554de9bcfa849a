"""Time the bookkeeping of `medseg infer` batches (run record, manifest, skip checks) apart from the network.

`medseg.batch.run_batch` runs over N tiny PNG inputs with a segment step that only writes empty output
files, so what is timed is what the batch adds per input: the run record (`run.json` and its journal),
the manifest, the output checks. Two passes per N: the first segments every input, the second (the same
command again) skips them all. The script prints milliseconds per input, of CPU time (this process's
own work, not disturbed by other load) and of wall time (file writes and waits included); a cost that grows
with N means some file is rewritten whole per input.

    python benchmarks/batch_overhead.py 250 1000 4000
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_name, positive_int
from PIL import Image

from medseg.batch import RunRecord, run_batch
from medseg.discovery import discover
from medseg.writers import output_paths


def one_pass(inputs_dir: Path, out: Path, n: int) -> tuple[float, float, int]:
    """CPU and wall seconds of one ``run_batch`` over the first ``n`` inputs, and the inputs it segmented."""
    inputs, ignored = discover(str(inputs_dir), (), (), True, skip=str(out))
    record = RunRecord(out, {"bundle": "benchmark", "checkpoint": "none"})
    inputs = record.keep_names(inputs[:n])

    def segment(items: list[dict]) -> None:
        for path in output_paths(out, items[0]["name"], "png", True).values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")

    start, wall = time.process_time(), time.perf_counter()
    result = run_batch(inputs, ignored, segment, paths_for=lambda item, k: output_paths(out, item.rel, "png", True),
                       count=lambda item: 1, manifest=out / "manifest.csv", record=record)
    return time.process_time() - start, time.perf_counter() - wall, result.count("ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=positive_int, default=[250, 1000, 4000], help="batch sizes to time")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs_dir = Path(tmp) / "in"
        inputs_dir.mkdir()
        pixels = np.zeros((8, 8), np.uint8)
        for k in range(max(args.counts)):
            Image.fromarray(pixels).save(inputs_dir / f"{k:06d}.png")
        print("| inputs | first pass, CPU / wall ms per input | second pass (all skipped), CPU / wall ms per input |")
        print("|---|---|---|")
        for n in args.counts:
            out = Path(tmp) / f"out{n}"
            first, first_wall, made = one_pass(inputs_dir, out, n)
            second, second_wall, again = one_pass(inputs_dir, out, n)
            if made != n or again:
                raise SystemExit(f"error: {n} inputs: the first pass segmented {made}, the second {again} "
                                 f"(expected {n} and 0)")
            print(f"| {n} | {1000 * first / n:.1f} / {1000 * first_wall / n:.1f} | "
                  f"{1000 * second / n:.1f} / {1000 * second_wall / n:.1f} |")


if __name__ == "__main__":
    main()
