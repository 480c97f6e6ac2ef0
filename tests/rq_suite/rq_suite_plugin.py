"""pytest plugin for run.sh: marks the tests listed in expected_failures.txt for the class under test
(RQ_SUITE_CLASS) as expected to fail, strictly (one that passes fails the run: the list stays true) unless
listed as `maybe` (a test of rq's own that fails on a slow machine only), and checks that the class under
test is ours."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LISTED = Path(__file__).with_name("expected_failures.txt")


def expected_failures(kind: str) -> dict[str, tuple[str, bool]]:
    """test id -> (reason, strict), for `kind`, from lines `CLASSES [maybe] TEST_ID  # reason` (CLASSES:
    comma-separated worker, prefork, simple, or `all`)."""
    found: dict[str, tuple[str, bool]] = {}
    for line in LISTED.read_text().splitlines():
        entry, _, reason = line.partition("#")
        if not entry.strip():
            continue
        classes, *maybe, test_id = entry.split()
        if classes == "all" or kind in classes.split(","):
            found[test_id] = (reason.strip(), maybe != ["maybe"])
    return found


def pytest_configure(config: pytest.Config) -> None:
    import rq

    from resque_starter.worker import StarterMixin

    kind = os.environ["RQ_SUITE_CLASS"]
    name = "SimpleWorker" if kind == "simple" else "Worker"
    assert issubclass(getattr(rq, name), StarterMixin), f"rq.{name} is not ours: sitecustomize not loaded"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    listed = expected_failures(os.environ["RQ_SUITE_CLASS"])
    for item in items:
        if item.nodeid in listed:
            reason, strict = listed[item.nodeid]
            item.add_marker(pytest.mark.xfail(reason=reason, strict=strict))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A failed test of rq's leaves its worker pool's processes running, and multiprocessing would wait
    for them at exit for ever: end them."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
