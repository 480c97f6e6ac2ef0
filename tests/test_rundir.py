"""The run dir and the pid file on a shared host: nothing another local user plants is used or written.

The attacker is a second uid (65534, through setpriv) working in a sticky, world-writable directory,
as /tmp is; the supervisor runs as root, as in an image without USER or under a root systemd unit.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resque_starter import config

from conftest import wait_for
from starter import ROOT, Starter, base_env

OTHER = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")


def as_other(*argv: str) -> None:
    """Run a command as the other local user: what it plants is the attacker's."""
    prefix = ["setpriv", "--reuid", str(OTHER), "--regid", str(OTHER), "--clear-groups"]
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A /tmp look-alike: every user may create entries, only their owner may remove them."""
    base = Path(tempfile.mkdtemp(prefix="rundir-"))
    os.chmod(base, 0o755)
    path = base / "shared"
    path.mkdir()
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(base)


def run_once(env: dict[str, str], command: str = "run") -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "resque_starter", command],
        env=env, capture_output=True, text=True, timeout=60, cwd=str(ROOT),
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("resque-starter:") or " ERROR " in line]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_a_run_dir_planted_by_another_user_is_refused(shared: Path, redis_url: str) -> None:
    run_dir = shared / "run"
    as_other("mkdir", "-m", "0777", str(run_dir))
    code, output = run_once(base_env(redis_url, str(run_dir)))
    assert code == 2, output
    line = one_error(output)
    assert f"RESQUE_STARTER_RUN_DIR='{run_dir}' is not allowed" in line, line
    assert f"owned by uid 0 (it belongs to uid {OTHER})" in line, line
    assert os.listdir(run_dir) == [], "nothing was created in it"


def test_a_symlinked_run_dir_is_refused(shared: Path, tmp_path: Path, redis_url: str) -> None:
    target = tmp_path / "root-owned"
    target.mkdir(mode=0o700)
    run_dir = shared / "run"
    as_other("ln", "-s", str(target), str(run_dir))
    code, output = run_once(base_env(redis_url, str(run_dir)))
    assert code == 2, output
    assert "is a symbolic link" in one_error(output), output
    assert os.listdir(target) == []


def test_a_planted_redis_log_symlink_is_never_written(shared: Path, tmp_path: Path) -> None:
    """The embedded Redis appends its log to RUN_DIR/redis.log: a link there would make root write a
    file of the attacker's choosing."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run_dir = shared / "run"
    as_other("mkdir", "-m", "0777", str(run_dir))
    as_other("ln", "-s", str(victim), str(run_dir / "redis.log"))
    code, output = run_once(base_env(None, str(run_dir)))
    assert code == 2, output
    assert victim.read_text() == "precious\n"
    assert "started an embedded redis-server" not in output


def test_our_own_run_dir_is_made_private(
    tmp_path: Path, redis_url: str, starters: Callable[..., Starter]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    s = starters(base_env(redis_url, str(run_dir), RESQUE_STARTER_CONCURRENCY="0"))
    wait_for(s.try_status, what="the supervisor")
    assert stat.S_IMODE(os.lstat(run_dir).st_mode) == 0o700


def test_a_group_writable_run_dir_of_ours_is_refused(tmp_path: Path, redis_url: str) -> None:
    """Others could have planted anything in it already: tightening it now would not undo that."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chmod(run_dir, 0o777)
    code, output = run_once(base_env(redis_url, str(run_dir)))
    assert code == 2, output
    assert "writable by other users" in one_error(output), output


def test_a_planted_pid_file_temporary_is_harmless(
    shared: Path, tmp_path: Path, redis_url: str, starters: Callable[..., Starter]
) -> None:
    """The pid file's temporary had a predictable name (PATH.PID.tmp): links planted for the next pids
    made root overwrite their target. Now its name is random, and the links stay untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid_file = shared / "starter.pid"
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    names = [f"{pid_file}.{p}.tmp" for p in range(last + 1, last + 400)]
    script = f"import os\nfor name in {names!r}: os.symlink({str(victim)!r}, name)"
    as_other(sys.executable, "-c", script)  # one process: the next pids stay free for the supervisor
    planted = sorted(os.listdir(shared))
    env = base_env(redis_url, str(tmp_path / "run"), RESQUE_STARTER_CONCURRENCY="0")
    env["RESQUE_STARTER_PID_FILE"] = str(pid_file)
    s = starters(env)
    wait_for(s.try_status, what="the supervisor")
    assert victim.read_text() == "precious\n"
    info = os.lstat(pid_file)
    assert stat.S_ISREG(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o022
    assert pid_file.read_text() == f"{s.pid}\n"
    assert sorted(os.listdir(shared)) == sorted([*planted, "starter.pid"])


def test_a_second_supervisor_on_the_same_run_dir_leaves_the_first_alone(
    tmp_path: Path, redis_url: str, starters: Callable[..., Starter]
) -> None:
    env = base_env(redis_url, str(tmp_path / "run"), RESQUE_STARTER_CONCURRENCY="0")
    env["RESQUE_STARTER_PID_FILE"] = str(tmp_path / "starter.pid")
    first = starters(env)
    wait_for(first.try_status, what="the first supervisor")
    code, output = run_once(env)
    assert code == 2, output
    assert "no other running supervisor uses" in one_error(output), output
    assert (tmp_path / "starter.pid").read_text() == f"{first.pid}\n"
    assert first.status()["pid"] == first.pid


def test_a_second_demo_does_not_claim_an_embedded_redis(
    tmp_path: Path, starters: Callable[..., Starter]
) -> None:
    env = base_env(None, str(tmp_path / "run"))
    first = starters(env, command="demo")
    first.wait_workers(2)
    code, output = run_once(env, command="demo")
    assert code == 2, output
    assert "embedded redis-server" not in output, output
    first.wait_workers(2)  # its Redis socket was not replaced: the first one goes on
    assert first.connection().ping()


def test_the_default_run_dir_is_found_by_ctl_the_same_way(
    tmp_path: Path, redis_url: str, starters: Callable[..., Starter]
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = base_env(redis_url, "unused", RESQUE_STARTER_CONCURRENCY="0", XDG_RUNTIME_DIR=str(xdg))
    del env["RESQUE_STARTER_RUN_DIR"]
    s = starters(env, run_dir=str(xdg / "resque-starter"))
    wait_for(lambda: (xdg / "resque-starter" / "control.sock").exists(), what="the default run dir")
    proc = subprocess.run(
        [sys.executable, "-m", "resque_starter", "ctl", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f'"pid": {s.pid}' in proc.stdout


def test_the_default_run_dir_is_private_to_the_uid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert config.run_dir_candidates()[0] == f"{tmp_path}/resque-starter"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert config.run_dir_candidates()[-1] == f"/tmp/resque-starter-{os.getuid()}"
    assert "/tmp/resque-starter" not in config.run_dir_candidates()
