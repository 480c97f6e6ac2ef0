"""pytest plugin for run.sh: marks the tests listed in expected_failures.txt for the class under test
(RQ_SUITE_CLASS) as expected to fail, strictly (one that passes fails the run: the list stays true), and
checks that the class under test is ours."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LISTED = Path(__file__).with_name("expected_failures.txt")


def expected_failures(kind: str) -> dict[str, str]:
    """test id -> reason, for `kind`, from lines `CLASSES TEST_ID  # reason` (CLASSES: comma-separated
    worker, prefork, simple, or `all`)."""
    found: dict[str, str] = {}
    for line in LISTED.read_text().splitlines():
        entry, _, reason = line.partition("#")
        if not entry.strip():
            continue
        classes, test_id = entry.split()
        if classes == "all" or kind in classes.split(","):
            found[test_id] = reason.strip()
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
        reason = listed.get(item.nodeid)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
