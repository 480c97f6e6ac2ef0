"""`docker compose up` of compose/compose.yaml (+ the host-network override) processes the
producer's jobs: the producer exits 0 only when every job it enqueued finished."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
import redis
from pytest_docker.plugin import get_docker_services
from rq import Queue
from rq.registry import FinishedJobRegistry

from .conftest import ROOT
from conftest import free_port, wait_for

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

FILES = [str(ROOT / "compose" / "compose.yaml"), str(ROOT / "compose" / "compose.host-network.yaml")]
Compose = Callable[..., str]


def compose_command() -> str:
    """The compose v2 plugin when there is one, else docker-compose (v1, what Debian ships)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return "docker compose"
    if shutil.which("docker-compose"):
        return "docker-compose"
    pytest.fail("neither `docker compose` nor docker-compose is installed (docker/ci-setup.sh installs one)")


@pytest.fixture(scope="module")
def redis_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def compose(image: str, redis_port: int) -> Iterator[Compose]:
    """The stack, up (-d, on the image built for the session: nothing to pull or rebuild) for this module
    only; a producer enqueues 5 demo jobs and exits 0 only when all of them finished."""
    command, project = compose_command(), f"resque-starter-test-{os.getpid()}"
    settings = {
        "RESQUE_STARTER_IMAGE": image,
        "REDIS_PORT": str(redis_port),
        "PRODUCER_JOBS": "5",
        "PRODUCER_WAIT": "1",
        "PRODUCER_INTERVAL": "0",
        "PRODUCER_TIMEOUT": "60",
    }

    def run(*args: str) -> str:
        files = [arg for path in FILES for arg in ("-f", path)]
        argv = [*shlex.split(command), *files, "-p", project, *args]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    with pytest.MonkeyPatch.context() as patch:
        for key, value in settings.items():
            patch.setenv(key, value)
        with get_docker_services(command, FILES, project, ["up -d"], ["down -v"]):
            yield run


def exit_code(container_id: str) -> int | None:
    """None while the container runs, else its exit code."""
    state = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", container_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return None if state[0] == "true" else int(state[1])


def test_compose_up_processes_the_producers_jobs(compose: Compose, redis_port: int) -> None:
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
    conn = redis.Redis(host="127.0.0.1", port=redis_port)
    assert FinishedJobRegistry(queue=Queue("default", connection=conn)).count >= 5
    assert "Job OK" in logs, "the workers' logs do not show the jobs"
