"""The image as a user runs it: `docker run` with host networking against a Redis on the host,
`docker exec` for signals and `ctl`, `docker stop` as kubelet stops a pod (TERM, then KILL)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis
from rq import Queue, Worker
from rq.registry import StartedJobRegistry

from .conftest import JOBS_MOUNT, Container, docker

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


def test_runs_as_the_k8s_pod_does(run_container: Run, worker_env: dict[str, str], conn: redis.Redis) -> None:
    """As k8s/deployment.yaml runs it: read-only root, only the run dir and /tmp writable, no capabilities."""
    run_dir = "/run/resque-starter"
    pod_like = (
        "--read-only", "--tmpfs", f"{run_dir}:uid=10001,gid=10001,mode=0700", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
    )  # fmt: skip
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
