"""What the container may use: CPUs and memory from its cgroup, since os.cpu_count() shows the host's.

The limits that bind are those of our own cgroup (`/proc/self/cgroup`) and of every ancestor: a
container usually sees its own cgroup as the root of /sys/fs/cgroup, but a systemd service or a
container without a cgroup namespace sits deeper. Pure file reads under injectable paths, so tests
can point them at a fake tree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = "/sys/fs/cgroup"
PROC = "/proc/self/cgroup"
# cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything this large is no limit.
_V1_UNLIMITED = 1 << 62
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own(proc: str) -> dict[str, str]:
    """{controller: our cgroup's path} from /proc/self/cgroup; "" names the v2 hierarchy."""
    paths: dict[str, str] = {}
    for line in (_read(Path(proc)) or "").splitlines():
        controllers, _, path = line.partition(":")[2].partition(":")
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def _chain(base: Path, path: str) -> list[Path]:
    """Our cgroup's directory under base, then each ancestor up to base. A path that does not exist
    under base (a container mounts its own cgroup as the root) leaves only base."""
    parts = [p for p in path.split("/") if p and p != ".."]
    dirs = [base.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [base]


def _least(values: Iterable[float | None]) -> float | None:
    limits = [v for v in values if v is not None]
    return min(limits) if limits else None


def _limit_along(dirs: list[Path], name: str, parse: Callable[[Path, str], float | None]) -> float | None:
    """The least limit `name` sets along dirs; None if no dir has the file or none limits."""
    found = [(d, _read(d / name)) for d in dirs]
    return _least(parse(d, text) for d, text in found if text is not None)


def _ratio(quota: str | None, period: str | None) -> float | None:
    """CPUs a quota/period pair allows; None when unlimited or unreadable."""
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v2_cpus(_path: Path, text: str) -> float | None:
    quota, _, period = text.partition(" ")
    return _ratio(quota, period)


def _v1_cpus(d: Path, quota: str) -> float | None:
    return _ratio(quota, _read(d / "cpu.cfs_period_us"))


def _bytes(_: Path, text: str) -> float | None:
    try:
        limit = int(text)
    except ValueError:
        return None  # v2's "max"
    return limit if 0 < limit < _V1_UNLIMITED else None


def _has(dirs: list[Path], name: str) -> bool:
    return any((d / name).exists() for d in dirs)


def cpu_quota(root: str = ROOT, proc: str = PROC) -> float | None:
    """CPUs the CFS quotas allow (v2 cpu.max, else v1 cfs_quota_us), the least along our cgroup's
    ancestry; None if unlimited."""
    base, own = Path(root), _own(proc)
    v2 = _chain(base, own.get("", "/"))
    if _has(v2, "cpu.max"):
        return _limit_along(v2, "cpu.max", _v2_cpus)
    for name in _V1_CPU_DIRS:
        v1 = _chain(base / name, own.get("cpu", "/"))
        if _has(v1, "cpu.cfs_quota_us"):
            return _limit_along(v1, "cpu.cfs_quota_us", _v1_cpus)
    return None


def _available() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_count(root: str = ROOT, proc: str = PROC) -> int:
    """CPUs this process can use: the cgroup quota rounded up, capped by the CPUs it may run on; >= 1."""
    available = _available()
    quota = cpu_quota(root, proc)
    if quota is None:
        return available
    return max(1, min(available, math.ceil(quota)))


def memory_limit(root: str = ROOT, proc: str = PROC) -> int | None:
    """The memory limit in bytes (v2 memory.max, v1 memory.limit_in_bytes), the least along our
    cgroup's ancestry; None if unlimited."""
    base, own = Path(root), _own(proc)
    v2 = _chain(base, own.get("", "/"))
    if _has(v2, "memory.max"):
        limit = _limit_along(v2, "memory.max", _bytes)
    else:
        limit = _limit_along(_chain(base / "memory", own.get("memory", "/")), "memory.limit_in_bytes", _bytes)
    return None if limit is None else int(limit)


def _own_dir(base: Path, path: str) -> Path:
    """Our cgroup's own directory (the first of its chain), where its usage is counted."""
    return _chain(base, path)[0]


def cpu_usage(root: str = ROOT, proc: str = PROC) -> float | None:
    """CPU seconds our cgroup has used (v2 cpu.stat usage_usec, v1 cpuacct.usage); None if unreadable."""
    base, own = Path(root), _own(proc)
    v2 = _read(_own_dir(base, own.get("", "/")) / "cpu.stat")
    for line in (v2 or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.isdigit():
            return int(value) / 1e6
    for name in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"):
        v1 = _read(_own_dir(base / name, own.get("cpuacct", "/")) / "cpuacct.usage")
        if v1 is not None and v1.isdigit():
            return int(v1) / 1e9
    return None


def memory_used(root: str = ROOT, proc: str = PROC) -> int | None:
    """Our cgroup's working set in bytes, as the kubelet counts it: memory in use less the inactive
    file cache the kernel reclaims before it kills anything (v2 memory.current, v1 usage_in_bytes)."""
    base, own = Path(root), _own(proc)
    for directory, usage, inactive in (
        (_own_dir(base, own.get("", "/")), "memory.current", "inactive_file"),
        (_own_dir(base / "memory", own.get("memory", "/")), "memory.usage_in_bytes", "total_inactive_file"),
    ):
        text = _read(directory / usage)
        if text is None or not text.isdigit():
            continue
        lines = (_read(directory / "memory.stat") or "").splitlines()
        stat = dict(line.partition(" ")[::2] for line in lines)
        cache = stat.get(inactive, "0")
        return max(0, int(text) - (int(cache) if cache.isdigit() else 0))
    return None
