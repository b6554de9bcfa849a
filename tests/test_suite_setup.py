"""The test suite's own set-up: how many processes `make test` spreads the tests over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import usable_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_cpu_quotas_of_a_process_cgroup_and_those_above_it_bound_the_usable_cpus(tmp_path):
    assert usable_cpus(tmp_path / "none", "0::/\n") == _affinity()  # no cgroup files: the CPUs it may run on
    assert usable_cpus(tmp_path / "none", "") == _affinity()
    v2 = tmp_path / "v2"
    _write(v2 / "cpu.max", "max 100000\n")
    assert usable_cpus(v2, "0::/\n") == _affinity()
    _write(v2 / "cpu.max", "50000 100000\n")  # half a CPU: one
    assert usable_cpus(v2, "0::/\n") == 1
    assert usable_cpus(v2, "") == 1  # no /proc/self/cgroup: the mount point's own
    _write(v2 / "cpu.max", f"{150000 * _affinity()} 100000\n")  # more than it may run on: the affinity
    assert usable_cpus(v2, "0::/\n") == _affinity()
    # a job's cgroup below the root, its own quota unlimited and its parent's one CPU
    nested = tmp_path / "nested"
    _write(nested / "jobs" / "job7" / "cpu.max", "max 100000\n")
    _write(nested / "jobs" / "cpu.max", "100000 100000\n")
    assert usable_cpus(nested, "0::/jobs/job7\n") == 1
    assert usable_cpus(nested, "0::/other\n") == _affinity()  # the path is not there: the root has no quota
    # hybrid layout: v2 under unified/, the quota in v1's cpu,cpuacct folder; the container's own cgroup
    # mounted as that folder while the path names it from the host's
    v1 = tmp_path / "v1"
    _write(v1 / "unified" / "cpu.stat", "")
    _write(v1 / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(v1 / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    membership = "9:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"
    assert usable_cpus(v1, membership) == _affinity()
    _write(v1 / "cpu,cpuacct" / "cpu.cfs_quota_us", "100000\n")
    assert usable_cpus(v1, membership) == 1
    assert usable_cpus(v1, membership.replace("cpu,cpuacct", "cpuacct")) == _affinity()  # no cpu controller


def test_each_worker_gives_pytorch_its_share_of_the_cpus():
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        pytest.skip("runs in one process: PyTorch keeps its own thread count")
    assert torch.get_num_threads() == max(1, usable_cpus() // workers)
