"""The chaos soak in CI: a few seeded storms, small enough to run in about two minutes together.

bench/soak.py runs the same rounds (tests/chaos/storm.py) with bigger numbers, on demand.
"""

from __future__ import annotations

import pytest

from storm import Plan, run_round

# (seed, worker class, pre-forked horse): different storms, and each way of running a job: a horse forked
# per job, one forked ahead while waiting, or inline.
ROUNDS = [(1, "rq.Worker", False), (2, "rq.Worker", True), (3, "rq.SimpleWorker", False)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("seed", "worker_class", "prefork"),
    ROUNDS,
    ids=[f"seed-{s}-{c}{'-prefork' if p else ''}" for s, c, p in ROUNDS],
)
def test_nothing_is_lost_in_a_storm_of_signals_and_kills(
    seed: int, worker_class: str, prefork: bool, redis_url: str, run_dir: str, conn
) -> None:  # type: ignore[no-untyped-def]
    plan = Plan(seed, worker_class=worker_class, prefork_horse=prefork)
    storm = run_round(plan, redis_url, run_dir)
    assert sum(storm.counts.values()) > 10, "the storm did something"
