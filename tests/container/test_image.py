"""The image as a user runs it: `docker run` with host networking against a Redis on the host,
`docker exec` for signals and `ctl`, `docker stop` as kubelet stops a pod (TERM, then KILL)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import urllib.request
from collections.abc import Callable

import pytest
import redis
from rq import Queue, Worker
from rq.registry import StartedJobRegistry

from .conftest import JOBS_MOUNT, ROOT, Container, docker
from conftest import free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

Run = Callable[..., Container]


def start_worker(run_container: Run, env: dict[str, str], conn: redis.Redis, workers: int = 1) -> Container:
    container = run_container("run", env=env, docker_args=JOBS_MOUNT)
    container.wait(lambda: Worker.count(connection=conn) == workers, f"{workers} worker(s) registered")
    return container


def records(conn: redis.Redis, tag: str) -> list[bytes]:
    return conn.lrange(f"testjobs:{tag}", 0, -1)


def test_supervisor_is_pid_1_and_processes_jobs_from_the_host_redis(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    container = start_worker(run_container, worker_env, conn)
    jobs = [Queue("default", connection=conn).enqueue("testjobs.record", "docker") for _ in range(5)]
    container.wait(lambda: len(records(conn, "docker")) == 5, "5 jobs processed")
    assert sorted(records(conn, "docker")) == sorted(job.id.encode() for job in jobs)
    assert "resque-starter" in container.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")


def documented_read_only_flags() -> list[str]:
    """`--read-only` and its `--tmpfs` flags, as docs/kubernetes.md tells users to run the image."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    [line] = [line for line in text.splitlines() if line.startswith("docker run --read-only ")]
    words = shlex.split(line.rstrip("\\"))
    flags = ["--read-only"]
    for index, word in enumerate(words):
        if word == "--tmpfs":
            flags += [word, words[index + 1]]
    assert "/run/resque-starter" in " ".join(flags), "the docs give no tmpfs for the run dir"
    return flags


def test_runs_read_only_with_the_documented_tmpfs_as_the_k8s_pod_does(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    """As docs/kubernetes.md says to run it, and as k8s/base/deployment.yaml does: read-only root, only the
    run dir and /tmp writable, no capabilities."""
    pod_like = (*documented_read_only_flags(), "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
    container = run_container("run", env=worker_env, docker_args=(*JOBS_MOUNT, *pod_like))
    container.wait(lambda: Worker.count(connection=conn) == 1, "a worker registered")
    job = Queue("default", connection=conn).enqueue("testjobs.record", "pod")
    container.wait(lambda: records(conn, "pod") == [job.id.encode()], "the job processed")
    assert container.exec("resque-starter", "ctl", "health", "--ready", check=False).returncode == 0


def test_runs_as_non_root(run_container: Run, worker_env: dict[str, str], conn: redis.Redis) -> None:
    container = start_worker(run_container, worker_env, conn)
    assert container.inspect("{{.Config.User}}").split(":")[0] == "10001"
    uids = {line.split()[1] for line in container.exec("grep", "^Uid:", "/proc/1/status").stdout.splitlines()}
    assert uids == {"10001"}, "PID 1 must run as uid 10001 (real, effective, saved, fs)"
    users = [row.split()[1] for row in docker("top", container.name, "-o", "pid,uid").stdout.splitlines()[1:]]
    assert users and set(users) == {"10001"}, f"processes of other users in the container: {users}"


def test_kill_ttin_to_pid_1_adds_a_worker(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    container = start_worker(run_container, worker_env, conn, workers=1)
    container.exec("kill", "-TTIN", "1")
    container.wait(lambda: Worker.count(connection=conn) == 2, "a second worker after TTIN")
    container.exec("kill", "-TTOU", "1")
    container.wait(lambda: Worker.count(connection=conn) == 1, "back to one worker after TTOU")


def test_ctl_status_through_docker_exec(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    container = start_worker(run_container, worker_env, conn)
    text = container.exec("resque-starter", "ctl", "status")
    assert text.returncode == 0 and text.stdout.strip(), text.stderr
    status = json.loads(container.exec("resque-starter", "ctl", "status", "--json").stdout)
    assert status["pid"] == 1, "the supervisor answering is not PID 1"
    assert status["app"] == ["testjobs"]
    pids = {pid for pid, _, _, _ in container.processes()}
    assert [w["pid"] in pids for w in status["workers"]] == [True], status["workers"]


def test_ctl_health_and_docker_healthcheck(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    container = run_container(
        "run",
        env=worker_env,
        docker_args=(*JOBS_MOUNT, "--health-interval", "1s", "--health-start-period", "1s"),
    )
    container.wait(lambda: Worker.count(connection=conn) == 1, "a worker registered")
    assert container.exec("resque-starter", "ctl", "health", "--live", check=False).returncode == 0
    container.wait(
        lambda: container.exec("resque-starter", "ctl", "health", "--ready", check=False).returncode == 0,
        "ready",
    )
    container.wait(
        lambda: container.inspect("{{.State.Health.Status}}") == "healthy", "docker health: healthy"
    )


def health_status(container: Container) -> str:
    return container.inspect("{{.State.Health.Status}}")


def test_healthcheck_passes_in_a_container_that_runs_no_supervisor(run_container: Run) -> None:
    """Compose's producer runs this image with another entrypoint: no supervisor, nothing unhealthy."""
    container = run_container(
        "-c",
        "import time; time.sleep(300)",
        docker_args=("--entrypoint", "python", "--health-interval", "1s", "--health-start-period", "0s"),
    )
    container.wait(
        lambda: container.inspect("{{.State.Health.Status}}") == "healthy", "docker health: healthy"
    )


def test_healthcheck_fails_when_the_supervisor_does_not_answer(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    """The check still checks: a supervisor stopped from the host (SIGSTOP) makes the container unhealthy."""
    health = ("--health-interval", "1s", "--health-start-period", "0s", "--health-timeout", "5s")
    container = run_container("run", env=worker_env, docker_args=(*JOBS_MOUNT, *health))
    container.wait(
        lambda: container.inspect("{{.State.Health.Status}}") == "healthy", "docker health: healthy"
    )
    supervisor = int(container.inspect("{{.State.Pid}}"))
    os.kill(supervisor, signal.SIGSTOP)
    try:
        container.wait(lambda: health_status(container) == "unhealthy", "docker health: unhealthy")
    finally:
        os.kill(supervisor, signal.SIGCONT)


def test_metrics_port_works_in_the_stock_image(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    port = free_port()
    container = start_worker(run_container, {**worker_env, "RESQUE_STARTER_METRICS_PORT": str(port)}, conn)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert 'resque_starter_workers{state="idle"} 1.0' in response.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert json.loads(response.read())["ok"] is True
    assert container.running()


@pytest.mark.parametrize(
    ("job_seconds", "outcome"),
    [(1.0, "finished"), (60.0, "requeued")],
    ids=["job-shorter-than-drain", "job-longer-than-drain"],
)
def test_docker_stop_during_a_job_loses_nothing(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis, job_seconds: float, outcome: str
) -> None:
    """TERM drains for RESQUE_STARTER_DRAIN_TIMEOUT (3 s here), then interrupts and requeues; docker's
    KILL comes only after GRACE = drain + 5 s, so the supervisor always gets to clean up first."""
    grace = int(float(worker_env["RESQUE_STARTER_DRAIN_TIMEOUT"])) + 5
    container = start_worker(run_container, worker_env, conn)
    queue = Queue("default", connection=conn)
    job = queue.enqueue("testjobs.sleep_then_record", job_seconds, "long", job_timeout=600)
    container.wait(lambda: records(conn, "long:started"), "the job to start")

    docker("stop", "-t", str(grace), container.name, timeout=grace + 60)

    exit_code = int(container.inspect("{{.State.ExitCode}}"))
    assert exit_code in (0, 1), f"exit {exit_code}: the supervisor did not stop by itself within {grace}s"
    assert StartedJobRegistry(queue=queue).get_job_ids() == [], "a job was left in the started registry"
    if outcome == "finished":
        assert records(conn, "long") == [job.id.encode()]
        assert exit_code == 0
    else:
        assert records(conn, "long") == []
        assert queue.get_job_ids() == [job.id], "the interrupted job is not back in its queue"
        assert exit_code == 1


def test_no_zombies_after_jobs_orphan_processes(
    run_container: Run, worker_env: dict[str, str], conn: redis.Redis
) -> None:
    container = start_worker(run_container, worker_env, conn)
    queue = Queue("default", connection=conn)
    for _ in range(5):
        queue.enqueue("testjobs.make_orphan", 0.3)
    container.wait(lambda: len(records(conn, "orphans")) == 5, "5 orphan-making jobs done")

    def no_zombies_and_no_orphans() -> bool:
        processes = container.processes()
        return not any(state.startswith("Z") for _, _, state, _ in processes) and not any(
            "import os,time" in args for _, _, _, args in processes
        )

    container.wait(no_zombies_and_no_orphans, "orphans reaped: no zombie, no leftover grandchild", timeout=15)


def test_docker_run_without_configuration_shows_the_demo(run_container: Run) -> None:
    container = run_container()
    container.wait(lambda: container.logs().count("Job OK") >= 3, "demo jobs processed in the logs")
    assert container.running()
