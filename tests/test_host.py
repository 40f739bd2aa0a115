"""Usable cores inside a container: the CPUs the process may run on, capped by its cgroup's CPU quota."""

from __future__ import annotations

import os

import pytest

from batchvl import host


def cgroup_v2(tmp_path, own: str, limits: dict[str, str]):
    """A cgroup v2 tree under tmp_path with cpu.max files (path below the root -> its content), and the
    /proc/self/cgroup line naming `own`."""
    root = tmp_path / "cgroup"
    for path, text in limits.items():
        folder = root / path.strip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(text + "\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(f"0::{own}\n")
    return root, self_cgroup


@pytest.mark.parametrize("own,limits,want", [
    ("/", {"": "max 100000"}, None),  # no quota (a plain host, `docker run` without --cpus)
    ("/", {"": "400000 100000"}, 4.0),  # --cpus 4, the container's cgroup mounted at the root
    ("/kubepods/pod1/c1", {"": "max 100000", "kubepods/pod1": "250000 100000", "kubepods/pod1/c1": "max 100000"},
     2.5),  # a limit on the pod applies to its containers
    ("/kubepods/pod1/c1", {"": "150000 100000"}, 1.5),  # the own path is not visible: the root's counts
    ("/", {"": "garbage"}, None),
])
def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path, own, limits, want):
    root, self_cgroup = cgroup_v2(tmp_path, own, limits)
    assert host.cgroup_cpu_quota(root, self_cgroup) == want


def test_cgroup_v1_quota(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: unlimited
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert host.cgroup_cpu_quota(root, self_cgroup) == 3.0
    assert host.cgroup_cpu_quota(tmp_path / "none", tmp_path / "no-such-file") is None


def test_usable_cores_takes_the_quota_rounded_up_within_the_affinity(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: None)
    assert host.usable_cores() == affinity
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: 0.5)
    assert host.usable_cores() == 1
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: affinity + 7.0)
    assert host.usable_cores() == affinity  # a quota above the CPUs it may run on gives no more
