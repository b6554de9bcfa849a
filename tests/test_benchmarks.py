"""The benchmark scripts run and check their own figures (the timings themselves are not tested)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(monkeypatch: pytest.MonkeyPatch, script: str, *args: str) -> None:
    """Runs a script as `python benchmarks/SCRIPT ARGS` would, in this process (the libraries are imported once)."""
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *args])
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")


def test_batch_overhead_times_both_passes(monkeypatch, capsys):
    _run(monkeypatch, "batch_overhead.py", "3", "7")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 3 |") or line.startswith("| 7 |")]
    assert len(rows) == 2
    assert out.startswith("machine: ")


@pytest.mark.parametrize(("script", "args"), [("batch_overhead.py", ["0"]), ("train_speed.py", ["--steps", "0"]),
                                              ("infer_speed.py", ["--repeats", "0"])])
def test_counts_and_repeats_below_one_are_refused(script, args, monkeypatch, capsys):
    with pytest.raises(SystemExit) as ended:
        _run(monkeypatch, script, *args)
    assert ended.value.code == 2
    assert "is not a whole number of at least 1" in capsys.readouterr().err.splitlines()[-1]
