"""What the container may use: CPUs and memory from its cgroup, since os.cpu_count() shows the host's.

Pure file reads under an injectable root, so tests can point them at a fake cgroup tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything this large is no limit.
_V1_UNLIMITED = 1 << 62
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str | None, period: str | None) -> float | None:
    """CPUs a quota/period pair allows; None when unlimited or unreadable."""
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_quota(root: str = ROOT) -> float | None:
    """CPUs the cgroup's CFS quota allows (v2 cpu.max, else v1 cfs_quota_us); None if unlimited."""
    base = Path(root)
    v2 = _read(base / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period)
    for name in _V1_CPU_DIRS:
        quota = _read(base / name / "cpu.cfs_quota_us")
        if quota is not None:
            return _ratio(quota, _read(base / name / "cpu.cfs_period_us"))
    return None


def _available() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_count(root: str = ROOT) -> int:
    """CPUs this process can use: the cgroup quota rounded up, capped by the CPUs it may run on; >= 1."""
    available = _available()
    quota = cpu_quota(root)
    if quota is None:
        return available
    return max(1, min(available, math.ceil(quota)))


def memory_limit(root: str = ROOT) -> int | None:
    """The cgroup's memory limit in bytes (v2 memory.max, v1 memory.limit_in_bytes); None if unlimited."""
    base = Path(root)
    for path in (base / "memory.max", base / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text is None:
            continue
        try:
            limit = int(text)
        except ValueError:
            return None  # v2's "max"
        return limit if 0 < limit < _V1_UNLIMITED else None
    return None
