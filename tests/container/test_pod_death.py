"""Issue 16 in the image: `docker kill` of a container running jobs, then a fresh container settles the
dead pod's lease within RESQUE_STARTER_LEASE_TTL + 5 s: its running jobs back at the front of their queue."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from resque_starter.lease import LEASES
from resque_starter.recovery import REQUEUES_META_KEY

from .conftest import JOBS_MOUNT, Container, docker

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

TTL = 5
Run = Callable[..., Container]


def test_docker_kill_then_a_fresh_container_settles_the_dead_pods_jobs(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    env = {**worker_env, "RESQUE_STARTER_LEASE_TTL": str(TTL), "RESQUE_STARTER_CONCURRENCY": "2"}
    dead = run_container("run", env=env, docker_args=JOBS_MOUNT)
    queue = Queue("default", connection=conn)
    jobs = [queue.enqueue("testjobs.sleep_then_record", 120, "long", job_timeout=600) for _ in range(2)]
    dead.wait(lambda: conn.llen("testjobs:long:started") == 2, "both jobs running")
    waiting = queue.enqueue("testjobs.record")
    (pod,) = [member.decode() for member in conn.zrange(LEASES, 0, -1)]

    docker("kill", dead.name)
    killed = time.monotonic()
    assert not dead.running()
    fresh = run_container("run", env={**env, "RESQUE_STARTER_CONCURRENCY": "0"}, docker_args=JOBS_MOUNT)
    fresh.wait(lambda: conn.zscore(LEASES, pod) is None, f"pod {pod} settled", timeout=TTL + 20)
    took = time.monotonic() - killed
    assert took <= TTL + 5, f"settled {took:.1f}s after docker kill"
    assert set(queue.get_job_ids()[:2]) == {j.id for j in jobs}, "requeued at the front"
    assert queue.get_job_ids()[2:] == [waiting.id]
    assert all(Job.fetch(j.id, connection=conn).meta[REQUEUES_META_KEY] == 1 for j in jobs)
    assert StartedJobRegistry(queue=queue).get_job_ids() == []
    assert f"settled pod {pod}" in fresh.logs()
