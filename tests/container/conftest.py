"""Fixtures for the container tests: a Docker engine, a locally built base image, the image under
test (built once per session), containers run with host networking, and the compose stack.

The tests skip only when no Docker engine answers (`docker info`); anything else that goes wrong
(no base image can be built, the image does not build) fails them. docker/ci-setup.sh starts an
engine and builds the base image; without a registry the base image is debootstrapped here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import RedisServer, wait_for

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("RESQUE_STARTER_TEST_IMAGE", "resque-starter:test")
BASE_IMAGE = os.environ.get("RESQUE_STARTER_BASE_IMAGE", "resque-starter-base:bookworm")
JOBS_MODULE = ROOT / "tests" / "testjobs.py"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def engine_error() -> str | None:
    """Why no Docker engine can be reached, or None when one answers."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        result = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    return None if result.returncode == 0 else result.stderr.strip()


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> None:
    error = engine_error()
    if error:
        pytest.skip(f"no Docker engine can be reached ({error}); docker/ci-setup.sh starts one")


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


@pytest.fixture(scope="session")
def base_image() -> str:
    """The base to build on: cached by tag, else debootstrapped (no registry to pull from here)."""
    if not image_exists(BASE_IMAGE):
        result = subprocess.run(
            ["bash", str(ROOT / "docker" / "build-base-image.sh"), BASE_IMAGE],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"cannot build base image {BASE_IMAGE}:\n{result.stdout}\n{result.stderr}")
    return BASE_IMAGE


def build(context: Path, tag: str, base: str) -> str:
    """`docker build` as the docs say to build offline: host network (the engine may have no bridge),
    BASE_IMAGE as a build arg, the machine's proxy settings passed on."""
    proxies = [arg for var in PROXY_VARS if var in os.environ for arg in ("--build-arg", var)]
    argv = ["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", *proxies]
    result = subprocess.run(
        [*argv, "-t", tag, str(context)], capture_output=True, text=True, timeout=1200, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"docker build of {context} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return tag


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """The image under test, built from this checkout once per session, as a user would."""
    return build(ROOT, IMAGE, base_image)


class Container:
    """One `docker run -d --network host` container, removed at teardown."""

    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *command, check=check)

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.name).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def processes(self) -> list[tuple[int, int, str, str]]:
        """(pid, ppid, state, args) of every process in the container's PID namespace, but this ps.

        ps runs inside (procps is in the image): `docker top` cannot show zombies, which have
        already left the container's cgroup."""
        rows = [
            line.split(None, 3)
            for line in self.exec("ps", "-eo", "pid=,ppid=,stat=,args=").stdout.splitlines()
        ]
        return [
            (int(pid), int(ppid), stat, args)
            for pid, ppid, stat, args in rows
            if not args.startswith("ps -eo")
        ]

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 30) -> object:
        """conftest.wait_for, failing with the container's logs so a failure explains itself."""
        try:
            return wait_for(predicate, timeout=timeout, interval=0.1, what=what)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- logs of {self.name} ---\n{self.logs()[-6000:]}") from None

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False)


@pytest.fixture
def run_container(image: str) -> Iterator[Callable[..., Container]]:
    """run_container(*args, env={...}, docker_args=[...], of=IMAGE): start the image under test (or
    another one, `of`) with host networking."""
    started: list[Container] = []

    def run(
        *args: str, env: dict[str, str] | None = None, docker_args: tuple[str, ...] = (), of: str = image
    ) -> Container:
        container = Container(f"resque-starter-test-{uuid.uuid4().hex[:10]}")
        started.append(container)
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        docker("run", "-d", "--name", container.name, "--network", "host", *env_args, *docker_args, of, *args)
        return container

    yield run
    for container in started:
        container.remove()


@pytest.fixture
def worker_env(redis_server: RedisServer) -> dict[str, str]:
    """Settings for a supervisor that works for the host's Redis on jobs from tests/testjobs.py."""
    return {
        "REDIS_URL": redis_server.url,
        "RESQUE_STARTER_APP": "testjobs",
        "PYTHONPATH": "/jobs",
        "RESQUE_STARTER_CONCURRENCY": "1",
        "RESQUE_STARTER_QUEUES": "default",
        "RESQUE_STARTER_DRAIN_TIMEOUT": "3",
    }


JOBS_MOUNT = ("-v", f"{JOBS_MODULE}:/jobs/testjobs.py:ro")
