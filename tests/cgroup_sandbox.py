"""A real cgroup of the test's own, with a memory limit and a CPU quota the kernel enforces (cgroup v1
memory, cpu and cpuacct controllers, or v2 with memory and cpu delegated); `Sandbox.procs` enters it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path("/sys/fs/cgroup")


def _own(controller: str) -> str:
    """Our cgroup's path in the hierarchy of `controller` ("" for v2), from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(",") or controllers == controller:
            return path.lstrip("/")
    raise LookupError(controller)


def _v1_mount(controller: str) -> Path | None:
    for d in ROOT.iterdir() if ROOT.is_dir() else []:
        if controller in d.name.split(",") and d.is_dir():
            return d
    return None


class Sandbox:
    def __init__(self) -> None:
        self.dirs: dict[str, Path] = {}  # controller ("memory", "cpu", "cpuacct", or "" for v2) -> dir
        name = f"resque-starter-test-{uuid.uuid4().hex[:8]}"
        if (ROOT / "cgroup.controllers").exists():
            parent = ROOT / _own("")
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("+memory +cpu")
            self._make("", parent / name)
            if not (self.dirs[""] / "memory.max").exists() or not (self.dirs[""] / "cpu.max").exists():
                raise OSError("memory and cpu are not delegated to this cgroup")
            return
        for controller in ("memory", "cpu", "cpuacct"):
            mount = _v1_mount(controller)
            if mount is None:
                raise OSError(f"no cgroup v1 {controller} hierarchy")
            self._make(controller, mount / _own(controller) / name)

    def _make(self, controller: str, path: Path) -> None:
        if path not in self.dirs.values():
            path.mkdir()
        self.dirs[controller] = path

    @property
    def procs(self) -> str:
        """IN_CGROUP for tests/in_cgroup.py: every cgroup.procs to enter."""
        return ":".join(sorted({str(d / "cgroup.procs") for d in self.dirs.values()}))

    def limit_memory(self, limit: int) -> None:
        if "" in self.dirs:
            (self.dirs[""] / "memory.max").write_text(str(limit))
        else:
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(limit))

    def limit_cpu(self, cpus: float) -> None:
        period = 100_000
        if "" in self.dirs:
            (self.dirs[""] / "cpu.max").write_text(f"{int(cpus * period)} {period}")
        else:
            (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(period))
            (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))

    def memory_used(self) -> int:
        d = self.dirs.get("") or self.dirs["memory"]
        return int((d / ("memory.current" if "" in self.dirs else "memory.usage_in_bytes")).read_text())

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended in this cgroup."""
        d = self.dirs.get("") or self.dirs["memory"]
        name = "memory.events" if "" in self.dirs else "memory.oom_control"
        for line in (d / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Empty (the supervisor's processes are gone by now, or are moved out) and remove each dir."""
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                parent_procs = d.parent / "cgroup.procs"
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        parent_procs.write_text(pid)
                d.rmdir()


@pytest.fixture
def cgroup() -> Iterator[Sandbox]:
    """A cgroup of the test's own; skipped where this machine does not let us make one (not root, or a
    read-only or undelegated cgroup tree)."""
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    try:
        box = Sandbox()
    except (OSError, LookupError) as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        yield box
    finally:
        box.remove()
