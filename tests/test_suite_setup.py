"""The test suite's own set-up: how many processes `make test` spreads the tests over."""

from __future__ import annotations

import os

from conftest import usable_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_a_containers_cpu_quota_bounds_the_usable_cpus(tmp_path):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v1 / "cpu").mkdir(parents=True)
    assert usable_cpus(tmp_path / "none") == _affinity()  # no cgroup files: the CPUs it may run on
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(v2) == _affinity()
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU: one
    assert usable_cpus(v2) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == _affinity()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(v1) == 1
    (v2 / "cpu.max").write_text(f"{150000 * _affinity()} 100000\n")  # more than it may run on: the affinity
    assert usable_cpus(v2) == _affinity()
