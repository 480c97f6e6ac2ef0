"""Issue 22: RESQUE_STARTER_POD_DELETION_COST against a fake Kubernetes API server (HTTPS on 127.0.0.1,
a self-signed certificate as the service account's CA). The supervisor runs in its own mount namespace
with the service account's token and CA at the standard path, as the kubelet mounts them."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rq import Queue

from resque_starter.deletion_cost import ANNOTATION, SERVICE_ACCOUNT

from conftest import free_port, wait_for
from starter import ROOT, base_env

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("openssl"),
    reason="needs root, unshare and openssl",
)
TOKEN = "test-token-123"
INTERVAL = 1.5


@dataclass
class Patch:
    at: float
    path: str
    content_type: str
    authorization: str
    body: Any


@dataclass
class FakeApi:
    port: int
    patches: list[Patch] = field(default_factory=list)
    others: list[str] = field(default_factory=list)

    def costs(self) -> list[int]:
        return [int(p.body["metadata"]["annotations"][ANNOTATION]) for p in self.patches]


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    """token, ca.crt (a self-signed certificate for 127.0.0.1) and its key, namespace."""
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
         "-out", str(directory / "ca.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    (directory / "token").write_text(TOKEN)
    (directory / "namespace").write_text("from-the-file")
    return directory


@pytest.fixture
def api(service_account: Path) -> Iterator[FakeApi]:
    fake = FakeApi(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.patches.append(Patch(time.monotonic(), self.path, self.headers["Content-Type"],
                                      self.headers["Authorization"], body))  # fmt: skip
            reply = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def do_GET(self) -> None:
            fake.others.append(f"GET {self.path}")
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", fake.port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(service_account / "ca.crt", service_account.parent / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def start_in_pod(starters, redis_url, run_dir, conn, service_account, api):  # type: ignore[no-untyped-def]
    """A supervisor in a mount namespace of its own, where the service account is where Kubernetes puts it."""
    mount = (
        f"mount -t tmpfs tmpfs /run && mkdir -p {SERVICE_ACCOUNT}"
        f' && cp {service_account}/* {SERVICE_ACCOUNT}/ && exec "$0" "$@"'
    )
    prefix = ("unshare", "--mount", "--fork", "--kill-child", "sh", "-c", mount)

    def start(**env: str) -> Any:
        pod = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port),
               "POD_NAME": "worker-7f9c", "POD_NAMESPACE": "jobs"}  # fmt: skip
        return starters(base_env(redis_url, run_dir, **pod, **env), (), prefix)

    return start


def test_the_cost_follows_busy_workers_only_on_change_and_at_the_set_rate(
    start_in_pod, api: FakeApi, conn
) -> None:
    s = start_in_pod(RESQUE_STARTER_POD_DELETION_COST="true",
                     RESQUE_STARTER_POD_DELETION_COST_INTERVAL=str(INTERVAL))  # fmt: skip
    s.wait_workers(2)
    wait_for(lambda: api.costs() == [0], 20, what="the first PATCH: no worker busy")
    time.sleep(INTERVAL * 2)  # nothing changes: nothing is sent
    assert api.costs() == [0]

    queue = Queue("default", connection=conn)
    jobs = [queue.enqueue("testjobs.sleep_then_record", 4 * INTERVAL) for _ in range(2)]
    wait_for(lambda: api.costs()[-1:] == [2], 30, what="the cost of two busy workers")
    wait_for(lambda: all(j.get_status(refresh=True) == "finished" for j in jobs), 60, what="the jobs to end")
    wait_for(lambda: api.costs()[-1:] == [0] and len(api.costs()) > 2, 30, what="the cost back to 0")

    costs = api.costs()
    assert all(a != b for a, b in itertools.pairwise(costs)), f"only on change: {costs}"
    assert set(costs) <= {0, 1, 2}
    gaps = [b.at - a.at for a, b in itertools.pairwise(api.patches)]
    assert min(gaps) >= INTERVAL - 0.1, f"at most one PATCH per {INTERVAL}s: {gaps}"
    for patch in api.patches:
        assert patch.path == "/api/v1/namespaces/jobs/pods/worker-7f9c"
        assert patch.content_type == "application/merge-patch+json"
        assert patch.authorization == f"Bearer {TOKEN}"
        assert list(patch.body) == ["metadata"] and list(patch.body["metadata"]) == ["annotations"]
        assert list(patch.body["metadata"]["annotations"]) == [ANNOTATION]
    assert api.others == []


def test_without_the_setting_nothing_talks_to_kubernetes(start_in_pod, api: FakeApi, conn) -> None:
    s = start_in_pod()
    s.wait_workers(2)
    job = Queue("default", connection=conn).enqueue("testjobs.noop")
    wait_for(lambda: job.get_status(refresh=True) == "finished", 30, what="the job to run")
    time.sleep(1)
    assert api.patches == [] and api.others == []


@pytest.mark.parametrize(
    ("drop", "allowed"),
    [("KUBERNETES_SERVICE_HOST", "only in a Kubernetes pod"), ("token", "a service account token and CA")],
)
def test_outside_a_pod_the_setting_exits_2_with_one_line(run_dir: str, drop: str, allowed: str) -> None:
    env = base_env("redis://127.0.0.1:1/0", run_dir, RESQUE_STARTER_POD_DELETION_COST="true",
                   POD_NAME="p", POD_NAMESPACE="n")  # fmt: skip
    if drop != "KUBERNETES_SERVICE_HOST":
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"  # but no token at the standard path on this machine
    result = subprocess.run([sys.executable, "-m", "resque_starter", "run"], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "RESQUE_STARTER_POD_DELETION_COST" in line]
    assert len(lines) == 1 and allowed in lines[0] and "Traceback" not in result.stderr, result.stderr
