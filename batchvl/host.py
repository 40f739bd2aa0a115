"""What this host, or the container around the process, lets it use.

`os.cpu_count()` counts the machine's cores. A container sees them all, while it may run on fewer: Docker's
`--cpuset-cpus` and taskset narrow the CPUs the process may be scheduled on (its affinity), and Docker's
`--cpus` or a Kubernetes CPU limit give it a quota of CPU time (its cgroup's). Sizing thread and process pools
by the machine's count in a 4-CPU pod on a 64-core host would start 62 media workers on 4 CPUs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    """The cores this process may use: the CPUs it may be scheduled on, capped by its cgroup's CPU quota rounded
    up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = CGROUP, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use (quota / period), the smallest along its cgroup's path
    (cgroup v2's cpu.max, or v1's cpu.cfs_quota_us and cpu.cfs_period_us); None when there is none or it cannot be
    read."""
    found = []
    v2, v1 = _own_paths(self_cgroup)
    for folder in _upwards(root, v2):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            found.append(int(quota) / int(period))
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for folder in _upwards(base, v1):
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                found.append(quota / period)
    return min(found) if found else None


def _own_paths(self_cgroup: Path) -> tuple[str, str]:
    """The process's cgroup v2 path and its v1 cpu controller's path ('' for the root, or where unknown)."""
    v2 = v1 = ""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _upwards(root: Path, path: str) -> list[Path]:
    """root/path and each folder above it up to root (a quota anywhere on the way applies)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
