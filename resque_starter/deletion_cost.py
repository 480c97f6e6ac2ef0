"""RESQUE_STARTER_POD_DELETION_COST: idle pods first when the Deployment scales in.

Kubernetes deletes the pods of a ReplicaSet with the lowest `controller.kubernetes.io/pod-deletion-cost`
first. With this setting the pod's annotation follows how busy it is (its busy workers), so a scale-in
(KEDA, the HPA, `kubectl scale`) takes idle pods and leaves the ones running jobs.

PID 1 makes no network call: `Annotator` (in the supervisor) starts one child, `python -m
resque_starter.deletion_cost`, and writes each new cost to its stdin as a line, without blocking; the
child PATCHes the pod through the in-cluster service account (its token and CA at the standard paths,
KUBERNETES_SERVICE_HOST/PORT, the pod's name and namespace from the downward API), at most once per
interval and only when the cost changed since the last PATCH that succeeded. Without the setting nothing
talks to Kubernetes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import sys
import time
from dataclasses import asdict, dataclass

from resque_starter.config import Settings
from resque_starter.errors import PREFIX, ConfigError

log = logging.getLogger("resque_starter.deletion_cost")

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
PATCH_TIMEOUT = 10.0
ENV = PREFIX + "POD_DELETION_COST"


@dataclass(frozen=True)
class Target:
    """Where and how to PATCH: read once at start-up, so a missing piece is a clear exit 2."""

    api: str  # https://host:port
    namespace: str
    pod: str
    token_file: str
    ca_file: str
    interval: float
    log_level: str
    log_format: str
    log_config: str | None

    @property
    def url(self) -> str:
        return f"{self.api}/api/v1/namespaces/{self.namespace}/pods/{self.pod}"


def target(environ: dict[str, str], settings: Settings) -> Target:
    """The pod to annotate, from the environment Kubernetes gives a pod; ConfigError naming what is
    missing (outside a cluster, or a pod without a service account token)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError(ENV, "true", "only in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)")
    token, ca = f"{SERVICE_ACCOUNT}/token", f"{SERVICE_ACCOUNT}/ca.crt"
    for path in (token, ca):
        if not os.access(path, os.R_OK):
            raise ConfigError(ENV, "true", f"a service account token and CA in {SERVICE_ACCOUNT} ({path})")
    namespace = environ.get("POD_NAMESPACE") or _read(f"{SERVICE_ACCOUNT}/namespace")
    pod = environ.get("POD_NAME") or environ.get("HOSTNAME") or socket.gethostname()  # a pod's is its name
    if not namespace or not pod:
        raise ConfigError(
            ENV, "true", "POD_NAME and POD_NAMESPACE from the downward API (see docs/kubernetes.md)"
        )
    api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return Target(api, namespace, pod, token, ca, settings.pod_deletion_cost_interval, settings.log_level,
                  settings.log_format, settings.log_config)  # fmt: skip


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


class Annotator:
    """The supervisor's side: the child's pid and the pipe to it. `update` never blocks: a cost that does
    not fit in the pipe now is sent at the next reconcile."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self.pid: int | None = None
        self._pipe: int | None = None
        self._sent: int | None = None
        self._next_start = 0.0

    def update(self, cost: int) -> None:
        if self.pid is None:
            self._start()
        if self._pipe is None or cost == self._sent:
            return
        try:
            os.write(self._pipe, f"{cost}\n".encode())
        except BlockingIOError:
            return
        except OSError:  # the child is gone: its exit is reaped, and the next update starts another
            return
        self._sent = cost

    def _start(self) -> None:
        now = time.monotonic()
        if now < self._next_start:
            return
        self._next_start = now + self._target.interval  # a child that keeps dying is restarted this often
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_end, False)
        argv = [sys.executable, "-m", "resque_starter.deletion_cost", json.dumps(asdict(self._target))]
        try:
            self.pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0)])  # fmt: skip
        except OSError as exc:
            log.error("pod deletion cost: could not start its child: %s", exc)
            os.close(write_end)
            return
        finally:
            os.close(read_end)
        self._pipe, self._sent = write_end, None

    def exited(self, pid: int) -> bool:
        """Whether the reaped pid was the child (then the next update starts another)."""
        if pid != self.pid:
            return False
        log.warning("pod deletion cost: child pid %d exited; restarting it", pid)
        self.close()
        return True

    def close(self) -> None:
        """Closing its stdin ends the child."""
        if self._pipe is not None:
            os.close(self._pipe)
        self.pid = self._pipe = None


# --- the child -------------------------------------------------------------------------------------


def run(t: Target) -> None:
    """Read costs from stdin until it closes; PATCH the newest when it differs from the pod's and the
    interval since the last PATCH has passed."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=t.ca_file)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    wanted: int | None = None
    patched: int | None = None
    next_patch = 0.0
    buffer = b""
    while True:
        timeout = max(0.0, next_patch - time.monotonic()) if wanted != patched else None
        if select.select([0], [], [], timeout)[0]:
            data = os.read(0, 4096)
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            with contextlib.suppress(ValueError):
                wanted = int(lines[-1]) if lines else wanted
        if wanted is None or wanted == patched or time.monotonic() < next_patch:
            continue
        next_patch = time.monotonic() + t.interval
        if _patch(opener, t, wanted):
            patched = wanted


def _patch(opener: object, t: Target, cost: int) -> bool:
    import urllib.error
    import urllib.request

    body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}}).encode()
    with open(t.token_file, encoding="utf-8") as f:  # read each time: the kubelet rotates it
        token = f.read().strip()
    request = urllib.request.Request(t.url, data=body, method="PATCH", headers={
        "Content-Type": "application/merge-patch+json", "Authorization": f"Bearer {token}",
        "Accept": "application/json"})  # fmt: skip
    try:
        with opener.open(request, timeout=PATCH_TIMEOUT) as response:  # type: ignore[attr-defined]
            response.read()
    except urllib.error.HTTPError as exc:
        log.warning("pod deletion cost: PATCH %s answered %d %s", t.url, exc.code, exc.reason)
        return False
    except OSError as exc:
        log.warning("pod deletion cost: PATCH %s failed: %s", t.url, exc)
        return False
    log.debug("pod deletion cost: %s=%d", ANNOTATION, cost)
    return True


def main() -> None:
    from setproctitle import setproctitle

    from resque_starter import logs

    t = Target(**json.loads(sys.argv[1]))
    logs.setup(t.log_level, t.log_format, t.log_config)
    logs.set_role("pod deletion cost")
    setproctitle(f"resque-starter: pod deletion cost {t.namespace}/{t.pod}")
    with contextlib.suppress(KeyboardInterrupt):
        run(t)


if __name__ == "__main__":
    main()
