"""The chaos soak in CI: a few seeded storms, small enough to run in about two minutes together.

bench/soak.py runs the same rounds (tests/chaos/storm.py) with bigger numbers, on demand.
"""

from __future__ import annotations

import pytest

from storm import Plan, run_round

# (seed, worker class): different storms, and both ways of running a job (a forked horse, or inline).
ROUNDS = [(1, "rq.Worker"), (2, "rq.Worker"), (3, "rq.SimpleWorker")]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("seed", "worker_class"), ROUNDS, ids=[f"seed-{s}-{c}" for s, c in ROUNDS])
def test_nothing_is_lost_in_a_storm_of_signals_and_kills(
    seed: int, worker_class: str, redis_url: str, run_dir: str, conn
) -> None:  # type: ignore[no-untyped-def]
    storm = run_round(Plan(seed, worker_class=worker_class), redis_url, run_dir)
    assert sum(storm.counts.values()) > 10, "the storm did something"
