"""`docker compose up` of compose/compose.yaml (+ the host-network override) processes the
producer's jobs: the producer exits 0 only when every job it enqueued finished."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable

import pytest
import redis
from pytest_docker.plugin import Services
from rq import Queue
from rq.registry import FinishedJobRegistry

from conftest import wait_for

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]


@pytest.fixture
def compose(
    docker_services: Services,
    docker_compose_command: str,
    docker_compose_file: list[str],
    docker_compose_project_name: str,
) -> Callable[..., str]:
    """compose("ps", "-q", "producer"): run compose on the stack docker_services started."""
    files = [arg for path in docker_compose_file for arg in ("-f", path)]

    def run(*args: str) -> str:
        command = [*shlex.split(docker_compose_command), *files, "-p", docker_compose_project_name, *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    return run


def exit_code(container_id: str) -> int | None:
    """None while the container runs, else its exit code."""
    state = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", container_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return None if state[0] == "true" else int(state[1])


def test_compose_up_processes_the_producers_jobs(
    compose: Callable[..., str], compose_redis_port: int
) -> None:
    producer, worker = compose("ps", "-q", "producer").strip(), compose("ps", "-q", "worker").strip()
    assert producer and worker, "compose did not start the producer and the worker"
    wait_for(
        lambda: exit_code(producer) is not None or exit_code(worker) is not None,
        timeout=90,
        what="the producer to exit",
    )
    logs = compose("logs", "--no-color")
    assert exit_code(worker) is None, f"the worker container exited:\n{logs[-6000:]}"
    assert exit_code(producer) == 0, f"the producer did not see all its jobs finish:\n{logs[-6000:]}"
    conn = redis.Redis(host="127.0.0.1", port=compose_redis_port)
    assert FinishedJobRegistry(queue=Queue("default", connection=conn)).count >= 5
    assert "Job OK" in logs, "the workers' logs do not show the jobs"
