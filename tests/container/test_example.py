"""examples/app as a user builds and runs it: an image FROM ours that pip-installs an app with a
dependency of its own as the image's user, built offline like ours (host network, the local base),
then run against the host's Redis: its jobs run with their dependency, and the stock image's
prometheus-client serves the metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from .conftest import ROOT, Container, build
from conftest import free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

Run = Callable[..., Container]


@pytest.fixture(scope="module")
def example_image(image: str) -> str:
    return build(ROOT / "examples" / "app", f"{image}-example", image)


def http_get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read().decode()


def finished(job: Job) -> bool:
    return job.get_status(refresh=True) == JobStatus.FINISHED


def test_the_example_image_runs_its_apps_jobs_and_serves_metrics(
    example_image: str, run_container: Run, redis_url: str, conn: redis.Redis
) -> None:
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "RESQUE_STARTER_CONCURRENCY": "2",
        "RESQUE_STARTER_METRICS_PORT": str(port),
    }
    container = run_container(env=env, of=example_image)  # the example's own CMD and RESQUE_STARTER_APP
    container.wait(lambda: Worker.count(connection=conn) == 2, "2 workers of the example app registered")

    queue = Queue("default", connection=conn)
    jobs = [
        queue.enqueue("example_app.tasks.describe_size", 1536000),
        queue.enqueue("example_app.tasks.describe_count", 1200000),
    ]
    container.wait(lambda: all(finished(job) for job in jobs), "the example app's jobs finished")
    assert [job.return_value() for job in jobs] == ["1.5 MB", "1.2 million"]

    def metrics() -> str:
        return http_get(port, "/metrics")[1]

    container.wait(
        lambda: "resque_starter_jobs_finished_total 2.0" in metrics(), "2 finished jobs in /metrics"
    )
    assert 'resque_starter_workers{state="idle"} 2.0' in metrics()
    assert http_get(port, "/readyz")[0] == 200

    owner = container.exec("python", "-c", "import humanize, os; print(os.stat(humanize.__file__).st_uid)")
    assert owner.stdout.strip() == "10001", "the app's dependency was not installed by the image's user"
    where = container.exec("python", "-c", "import example_app; print(example_app.__file__)").stdout
    assert where.startswith("/opt/venv/lib/"), f"the app is not installed in the image's venv: {where}"
