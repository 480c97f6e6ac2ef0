"""Production Redis (issue 17, finding 6 and "Real Redis deployments"): TLS with a private CA and client
certificates, ACL users, and Sentinel, each against real redis-server / redis-sentinel processes on
127.0.0.1: workers run jobs, recovery settles a dead worker's job, readiness is true, and a failover
under a stream of jobs is followed within seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from resque_starter.connection import connect
from resque_starter.redis_ping import ping

from conftest import RedisServer, free_port, wait_for
from starter import base_env, ctl

ACL_USER, ACL_PASSWORD = "worker", "w0rker-Pa55"


# ---- TLS: a private CA, a server certificate for 127.0.0.1 only, a client certificate


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    other_ca: Path  # a CA that signed neither


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _key_and_request(path: Path, name: str) -> tuple[Path, Path]:
    key, request = path / f"{name}.key", path / f"{name}.csr"
    _openssl(*("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
             "-keyout", key, "-out", request, "-subj", f"/CN={name}")  # fmt: skip
    return key, request


def _ca(path: Path, name: str) -> tuple[Path, Path]:
    key, cert = path / f"{name}.key", path / f"{name}.pem"
    _openssl(*("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return key, cert


def _signed(path: Path, name: str, ca_key: Path, ca: Path, extensions: str) -> tuple[Path, Path]:
    key, request = _key_and_request(path, name)
    cert, ext = path / f"{name}.pem", path / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (apt-get install -y openssl)")
    path = tmp_path_factory.mktemp("tls")
    ca_key, ca = _ca(path, "test-ca")
    server_key, server = _signed(path, "server", ca_key, ca, "subjectAltName=IP:127.0.0.1\n")
    client_key, client = _signed(path, "client", ca_key, ca, "extendedKeyUsage=clientAuth\n")
    _, other_ca = _ca(path, "other-ca")
    return Certs(ca, server, server_key, client, client_key, other_ca)


@dataclass
class TlsRedis:
    server: RedisServer  # its plain port (127.0.0.1) is the test's own way in, as the default user
    tls_port: int

    def url(self, auth: str = "", host: str = "127.0.0.1", **options: object) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"rediss://{auth}{host}:{self.tls_port}/0" + (f"?{query}" if query else "")

    def plain(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)


@pytest.fixture(scope="module")
def tls_redis(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """TLS with client certificates required, and an ACL user besides the default one."""
    tls_port = free_port()
    server = RedisServer(
        str(tmp_path_factory.mktemp("tls-redis")),
        *("--tls-port", str(tls_port), "--tls-cert-file", str(certs.server)),
        *("--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca)),
        *("--tls-auth-clients", "yes"),
    )
    server.start()
    tls = TlsRedis(server, tls_port)
    # the rules docs/configuration.md gives for a workers' user, plus the test jobs' own keys
    rules = f"on >{ACL_PASSWORD} ~rq:* ~testjobs:* &rq:* +@all -@dangerous +info +client|unblock"
    tls.plain().execute_command("ACL", "SETUSER", ACL_USER, *rules.split())
    yield tls
    server.stop()


def mtls(certs: Certs, **more: object) -> dict[str, object]:
    return {"ssl_ca_certs": certs.ca, "ssl_certfile": certs.client, "ssl_keyfile": certs.client_key, **more}


def test_tls_and_acl_urls_are_pinged_with_their_options(tls_redis: TlsRedis, certs: Certs) -> None:
    """Readiness honours every option the workers do (it was a raw PING with the system's CAs, no
    client certificate and no ?username=: false for ever, finding 6)."""
    user = f"{ACL_USER}:{ACL_PASSWORD}@"
    taken = [
        tls_redis.url(user, **mtls(certs)),
        tls_redis.url(**mtls(certs, username=ACL_USER, password=ACL_PASSWORD)),
        tls_redis.url(host="localhost", **mtls(certs, ssl_check_hostname="false")),
        tls_redis.url(ssl_cert_reqs="none", ssl_certfile=certs.client, ssl_keyfile=certs.client_key),
    ]
    refused = [
        tls_redis.url(user, ssl_ca_certs=certs.ca),  # no client certificate
        tls_redis.url(user, **mtls(certs, ssl_ca_certs=certs.other_ca)),  # the server's CA is not trusted
        tls_redis.url(host="localhost", **mtls(certs)),  # the certificate names 127.0.0.1 only
        tls_redis.url(f"{ACL_USER}:wrong@", **mtls(certs)),
        f"redis://127.0.0.1:{tls_redis.tls_port}/0",  # plain text to a TLS port
    ]
    assert [ping(url, timeout=2) for url in taken] == [True] * len(taken)
    assert [ping(url, timeout=2) for url in refused] == [False] * len(refused)
    conn = connect(tls_redis.url(user, **mtls(certs)))
    assert conn.acl_whoami() == ACL_USER


def test_workers_recovery_and_readiness_over_mutual_tls_as_an_acl_user(
    tls_redis: TlsRedis, certs: Certs, run_dir: str, starters
) -> None:  # type: ignore[no-untyped-def]
    plain = tls_redis.plain()
    plain.flushall()
    url = tls_redis.url(f"{ACL_USER}:{ACL_PASSWORD}@", **mtls(certs))
    s = starters(base_env(url, run_dir, RESQUE_STARTER_CONCURRENCY="2"))
    s.wait_workers(2)
    queue = Queue("default", connection=plain)
    jobs = [queue.enqueue("testjobs.record") for _ in range(6)]
    wait_for(lambda: all(j.get_status(refresh=True) == JobStatus.FINISHED for j in jobs), 20, what="jobs run")
    clients = plain.client_list()
    assert [c for c in clients if c["user"] == ACL_USER], "the workers are connected as the ACL user"
    ready = ctl(s.run_dir, "health", "--ready")
    assert ready.returncode == 0 and '"redis": true' in ready.stdout, ready.stdout + ready.stderr
    # a worker killed mid-job: recovery (a child of the mold) settles the job over the same TLS and user
    job = queue.enqueue("testjobs.sleep_then_record", 30)
    busy = wait_for(lambda: [w for w in s.status()["workers"] if w["job_id"] == job.id], what="a busy worker")
    os.kill(busy[0]["pid"], signal.SIGKILL)  # type: ignore[index]
    wait_for(
        lambda: job.get_status(refresh=True) == JobStatus.FAILED, 20, what="the dead worker's job failed"
    )
    assert "died (killed by SIGKILL)" in (
        Job.fetch(job.id, connection=plain).latest_result().exc_string or ""
    )
    wait_for(lambda: "recovered worker" in s.log(), what="the recovery's report")
    assert "no permissions" not in s.log(), "the documented ACL rules cover every command used"


# ---- Sentinel: a primary, a replica and one Sentinel on 127.0.0.1

SERVICE = "mymaster"


def start_sentinel(tmp: Path, port: int, monitored: int, *more: str) -> subprocess.Popen[bytes]:
    """A redis-sentinel watching the primary on 127.0.0.1:`monitored` as SERVICE; `more` config lines."""
    conf = tmp / f"sentinel-{port}.conf"
    conf.write_text(
        f"bind 127.0.0.1\ndir {tmp}\nloglevel warning\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {monitored} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 10000\n" + "".join(f"{line}\n" for line in more)
    )
    binary = shutil.which("redis-sentinel")
    if binary is None:
        pytest.fail("redis-sentinel is not installed (apt-get install -y redis-sentinel)")
    return subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL)


class SentinelSetup:
    def __init__(self, tmp: Path) -> None:
        (tmp / "primary").mkdir()
        (tmp / "replica").mkdir()
        self.primary = RedisServer(str(tmp / "primary"))
        self.primary.start()
        self.replica = RedisServer(str(tmp / "replica"), "--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        self.port = free_port()
        self.proc = start_sentinel(tmp, self.port, self.primary.port, f"port {self.port}")
        self.sentinel = redis.Redis(port=self.port, decode_responses=True)
        wait_for(self._replica_known, 20, what="the Sentinel to know the primary and its synced replica")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{SERVICE}/0"

    def _replica_known(self) -> bool:
        try:
            replicas = self.sentinel.sentinel_slaves(SERVICE)
        except redis.RedisError:
            return False
        link = redis.Redis(port=self.replica.port, decode_responses=True).info("replication")
        return bool(replicas) and link.get("master_link_status") == "up"

    def role(self, port: int) -> str:
        return str(redis.Redis(port=port, decode_responses=True).info("replication")["role"])

    def primary_port(self) -> int:
        return int(self.sentinel.sentinel_get_master_addr_by_name(SERVICE)[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path)
    yield setup
    setup.stop()


def test_readiness_through_sentinels_asks_for_the_primary_and_leaves_no_connection_open(
    sentinel: SentinelSetup,
) -> None:
    """Each readiness check builds its client and closes it, the connections to the Sentinels too:
    redis-py's close() leaves those to the garbage collector, and the check runs every few seconds."""
    assert ping(sentinel.url, timeout=2)
    assert not ping(sentinel.url.replace(SERVICE, "no-such-service"), timeout=2)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert ping(sentinel.url, timeout=2)
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_a_rediss_sentinel_url_talks_tls_to_the_sentinels_and_the_primary(
    certs: Certs, tmp_path: Path
) -> None:
    files = {"cert-file": certs.server, "key-file": certs.server_key, "ca-cert-file": certs.ca}
    tls = [f"tls-{name} {path}" for name, path in files.items()]
    tls_port, sentinel_port = free_port(), free_port()
    primary = RedisServer(str(tmp_path), "--tls-port", str(tls_port), "--tls-auth-clients", "no",
                          *(word for line in tls for word in f"--{line}".split()))  # fmt: skip
    primary.start()
    sentinel = start_sentinel(tmp_path, sentinel_port, tls_port, "port 0", f"tls-port {sentinel_port}",
                              "tls-auth-clients no", "tls-replication yes", *tls)  # fmt: skip
    try:
        url = f"rediss+sentinel://127.0.0.1:{sentinel_port}/{SERVICE}/0?ssl_ca_certs={certs.ca}"
        wait_for(lambda: ping(url, timeout=2), 20, what="the primary, named by the Sentinel, over TLS")
        client = connect(url)
        client.set("written-over", "tls")
        assert client.connection_pool.get_master_address() == ("127.0.0.1", tls_port)
        assert redis.Redis.from_url(primary.url).get("written-over") == b"tls"
        assert not ping(url.replace(str(certs.ca), str(certs.other_ca)), timeout=2), "an untrusted CA"
        plain = f"redis+sentinel://127.0.0.1:{sentinel_port}/{SERVICE}/0"
        assert not ping(plain, timeout=2), "plain text to the TLS Sentinel"
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        primary.stop()


class Producer(threading.Thread):
    """Enqueues jobs through the Sentinel URL as an app would, retrying through the failover; keeps the
    ids Redis acknowledged, each with when."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.queue = Queue("default", connection=connect(url, socket_timeout=2))
        self.acknowledged: list[tuple[float, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            try:
                job = self.queue.enqueue("testjobs.record")
            except redis.RedisError:
                continue
            self.acknowledged.append((time.monotonic(), job.id))


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "primary killed"])
def test_workers_follow_a_sentinel_failover_under_a_stream_of_jobs(
    sentinel: SentinelSetup, run_dir: str, starters, how: str
) -> None:  # type: ignore[no-untyped-def]
    s = starters(base_env(sentinel.url, run_dir, RESQUE_STARTER_CONCURRENCY="2"))
    s.wait_workers(2)
    producer = Producer(sentinel.url)
    producer.start()
    wait_for(lambda: len(producer.acknowledged) > 20, what="jobs flowing")
    old = sentinel.primary_port()
    if how == "SENTINEL FAILOVER":
        sentinel.sentinel.sentinel_failover(SERVICE)
    else:
        assert sentinel.primary.proc is not None
        sentinel.primary.proc.kill()
    wait_for(lambda: sentinel.primary_port() != old, 20, what="the Sentinel to promote the replica")
    if how == "SENTINEL FAILOVER":  # clients stay on the old primary until the Sentinel demotes it
        wait_for(lambda: sentinel.role(old) == "slave", 30, what="the Sentinel to demote the old primary")
    switched = time.monotonic()
    new = redis.Redis(port=sentinel.primary_port())
    wait_for(lambda: len([t for t, _ in producer.acknowledged if t > switched + 1]) > 20, 20,
             what="jobs enqueued on the new primary")  # fmt: skip
    producer.stopping.set()
    producer.join(10)
    after = [job_id for t, job_id in producer.acknowledged if t > switched + 1]

    def settled(job_id: str) -> bool:
        job = Job.fetch(job_id, connection=new)
        status = job.get_status(refresh=False)
        return status == JobStatus.FINISHED or (status == JobStatus.FAILED and bool(job.latest_result()))

    # workers follow within seconds: every job enqueued after the switch runs
    wait_for(lambda: all(settled(j) for j in after), 20, what="the jobs enqueued after the failover to run")
    # and every job the new primary holds, from before and during the failover too, ends with a reason
    held = [j for j in (job_id for _, job_id in producer.acknowledged) if new.exists(f"rq:job:{j}")]
    wait_for(lambda: all(settled(j) for j in held), 20, what="every job the new primary holds to end")
    assert len(Worker.all(connection=new)) >= 2
    ready = ctl(s.run_dir, "health", "--ready")
    assert ready.returncode == 0 and '"redis": true' in ready.stdout, ready.stdout + ready.stderr
