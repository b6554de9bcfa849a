"""The benchmark scripts run and check their own figures (the timings themselves are not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=120)


def test_batch_overhead_times_both_passes():
    done = _run("batch_overhead.py", "3", "7")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 3 |") or line.startswith("| 7 |")]
    assert len(rows) == 2
    assert done.stdout.startswith("machine: ")


def test_counts_and_repeats_below_one_are_refused():
    for script, args in (("batch_overhead.py", ["0"]), ("train_speed.py", ["--steps", "0"]),
                         ("infer_speed.py", ["--repeats", "0"])):
        done = _run(script, *args)
        assert done.returncode == 2, (script, done.stderr[-2000:])
        assert "is not a whole number of at least 1" in done.stderr.splitlines()[-1]
