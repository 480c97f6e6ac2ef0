"""The benchmarks' measuring tools, on real processes: they must see every process of a tree, and
count a zombie or an exited process as gone (timings are not tested: benchmarks are not tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import wait_for

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

# A parent that starts a grandchild and prints its pid; both sleep until killed.
FAMILY = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def family() -> Iterator[tuple[subprocess.Popen[str], int]]:
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    yield parent, child
    for pid in (parent.pid, child):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    parent.wait()


def test_tree_and_cpu_cover_every_descendant(family: tuple[subprocess.Popen[str], int]) -> None:
    parent, child = family
    assert sorted(common.tree([parent.pid])) == sorted([parent.pid, child])
    assert common.cpu_seconds(parent.pid, children=True) >= common.cpu_seconds(parent.pid) > 0


def test_a_zombie_is_not_alive(family: tuple[subprocess.Popen[str], int]) -> None:
    parent, child = family
    assert common.alive(parent.pid)
    parent.kill()
    wait_for(lambda: not common.alive(parent.pid), what="the killed parent to be a zombie")
    assert os.waitpid(parent.pid, os.WNOHANG)[0] == parent.pid  # it was a zombie, not gone
    assert common.alive(child)


def test_table_right_aligns_numbers() -> None:
    text = common.table(["system", "MB"], [["a", 1.5], ["bbb", 120.0]])
    assert text.splitlines() == ["system    MB", "------  ----", "a       1.50", "bbb      120"]


def test_benchmarks_parse_their_flags() -> None:
    for script in ("memory.py", "throughput.py"):
        out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "--quick" in out.stdout


def test_catches_reads_the_installed_handlers(family: tuple[subprocess.Popen[str], int]) -> None:
    parent, _ = family
    assert common.catches(os.getpid(), signal.SIGINT)  # Python's own KeyboardInterrupt handler
    assert not common.catches(parent.pid, signal.SIGTERM)
