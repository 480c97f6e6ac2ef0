"""The config file cannot hang, kill or fool the supervisor, and every setting has a bound: through the
real CLI at start-up (one line, exit 2) and through a real supervisor, as PID 1, on HUP (a refused reload
while PID 1 keeps answering and reaping)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from starter import ROOT, Starter, base_env, cmdline, descendants, process_state

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
AS_PID1 = os.geteuid() == 0 and shutil.which("unshare") is not None


def run_cli(
    tmp_path: Path, timeout: float = 60, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`python -m resque_starter` with `env` (RESQUE_STARTER_ prefixed, unless REDIS_URL); its result and
    how long it took. The Redis URL is never contacted: every case fails before."""
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("RESQUE_STARTER_") and k != "REDIS_URL"
    }
    environ.update(PYTHONPATH=str(ROOT), REDIS_URL="redis://127.0.0.1:1/0")
    environ["RESQUE_STARTER_RUN_DIR"] = str(tmp_path / "run")
    environ.update({k if k == "REDIS_URL" else f"RESQUE_STARTER_{k}": v for k, v in env.items()})
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "resque_starter"], env=environ, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - began


def assert_refused(result: subprocess.CompletedProcess[str], variable: str, value: str, allowed: str) -> None:
    """Exit 2 with exactly one line on stderr: the variable, its value and what is allowed."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"resque-starter: {variable}={value!r} is not allowed: "), lines[0]
    assert allowed in lines[0], (allowed, lines[0])


# ---- bounds: each setting's upper bound is refused at start-up, through the real CLI

BOUNDS = [
    ("DRAIN_TIMEOUT", "600h", "a duration from 0 to 24h"),
    ("WORKER_TTL", "100000000000000000", "a whole number of seconds from 1 to 86400"),
    ("WORKER_TTL", "1e17", "a whole number of seconds from 1 to 86400"),
    ("RESULT_TTL", "100000000000000000", "a whole number of seconds from -1 to 315360000"),
    ("JOB_MONITORING_INTERVAL", "86401", "a whole number of seconds from 1 to 86400"),
    ("MAINTENANCE_INTERVAL", "86401", "a whole number of seconds from 1 to 86400"),
    ("CONCURRENCY", "1025", "a whole number from 0 to 1024"),
    ("GROUPS", "high=1; low=1025", "size must be a whole number from 0 to 1024"),
    ("RELOAD_SURGE", "1025", "a whole number from 1 to 1024"),
    ("MAX_REQUEUES", "1001", "a whole number from 0 to 1000"),
    ("MAX_JOBS", "1000000001", "a whole number from 1 to 1000000000, or off"),
    ("REFORK_AFTER", "1000000001", "a whole number from 1 to 1000000000, or off"),
    ("MAX_LIFETIME", "721h", "a duration over 0 and at most 720h"),
    ("MAX_MEMORY", "65T", "a size over 0 and at most 64T"),
    ("METRICS_PORT", "65536", "a whole number from 1 to 65535, or off"),
    ("CONFIG_TIMEOUT", "301", "a duration over 0 and at most 5m"),
    ("RUN_DIR", "/tmp/" + "r" * 90, "a non-empty path of at most 94 bytes"),
    ("PID_FILE", "/tmp/" + "p" * 4092, "a non-empty path of at most 4096 bytes"),
    ("QUEUES", ",".join(f"q{i}" for i in range(65)), "at most 64 of them"),
    ("APP", ",".join(f"m{i}" for i in range(65)), "at most 64 of them"),
    ("PATH", ":".join(f"/d{i}" for i in range(65)), "at most 64 of them"),
]


@pytest.mark.parametrize(
    ("variable", "value", "allowed"), BOUNDS, ids=[f"{v}={x[:12]}" for v, x, _ in BOUNDS]
)
def test_a_value_past_its_bound_is_refused_at_start_up(
    tmp_path: Path, variable: str, value: str, allowed: str
) -> None:
    result, _ = run_cli(tmp_path, **{variable: value})
    assert_refused(result, f"RESQUE_STARTER_{variable}", value, allowed)


# ---- a config file that is not a small regular file, or that hangs, exits or raises, at start-up

HANGS = "import time\ntime.sleep(30)\n"
CASES = {
    "fifo": (None, "a regular file (it is a FIFO)"),
    "dev-zero": (None, "a regular file (it is a character device)"),
    "huge": ("#" * 100 + "\n", "a Python file of at most 1024 KiB"),
    "sleeps": (HANGS, "a Python file that runs to its end within 2s (it did not)"),
    "sleeps-in-finally": (
        "import time\ntry:\n    time.sleep(30)\nfinally:\n    time.sleep(30)\n",
        "within 2s",
    ),
    "os-exit-0": ("import os\nos._exit(0)\n", "a Python file that runs to its end (it exited with code 0"),
    "killed": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "it was killed by SIGKILL"),
    "keyboard-interrupt": (
        "raise KeyboardInterrupt\n",
        "a Python file that runs (it raised KeyboardInterrupt",
    ),
    "system-exit-0": ("raise SystemExit(0)\n", "a Python file that runs (it raised SystemExit: 0)"),
    "base-exception": ("raise BaseException('odd')\n", "it raised BaseException: odd"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_file_that_cannot_be_read_or_run_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    text, allowed = CASES[case]
    path = str(tmp_path / "conf.py")
    if case == "fifo":
        os.mkfifo(path)
    elif case == "dev-zero":
        path = "/dev/zero"
    elif case == "huge":
        Path(path).write_text(text * 11_000)  # ~1.1 MB of comments
    else:
        Path(path).write_text(text)
    result, took = run_cli(tmp_path, CONFIG=path, CONFIG_TIMEOUT="2s")
    assert_refused(result, "RESQUE_STARTER_CONFIG", path, allowed)
    assert took < 15, f"took {took:.1f}s"


def test_a_config_file_that_times_out_takes_what_it_started_along(tmp_path: Path) -> None:
    """The file runs in a process group of its own, killed whole at the deadline."""
    marker = "987.654321"
    conf = tmp_path / "conf.py"
    conf.write_text(f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'])\ntime.sleep(30)\n")
    result, _ = run_cli(tmp_path, CONFIG=str(conf), CONFIG_TIMEOUT="1")
    assert_refused(result, "RESQUE_STARTER_CONFIG", str(conf), "within 1s")

    def sleepers() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and marker in cmdline(int(p))]

    wait_for(lambda: not sleepers(), 5, what="the config file's own child to be gone")


def test_the_config_file_never_runs_in_the_supervisor(tmp_path: Path) -> None:
    """Whatever the file does to its process (here: change the working directory and a signal handler)
    happens in a child, not in the process that then supervises."""
    conf = tmp_path / "conf.py"
    conf.write_text(
        "import os, signal\nos.chdir('/')\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"concurrency = 0\nrun_dir = {str(tmp_path / 'run')!r}\n"
    )
    code = (
        "import os, signal\nfrom resque_starter import loader\n"
        f"settings = loader.load({{}}, {{'RESQUE_STARTER_CONFIG': {str(conf)!r}}})\n"
        "print(settings.concurrency, os.getcwd(), signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.stdout.split() == ["0", str(tmp_path), "True"]


# ---- on HUP, as PID 1


@pytest.fixture
def pid1(starters, redis_url: str, run_dir: str, conn):  # type: ignore[no-untyped-def]
    if not AS_PID1:
        pytest.skip("needs root and unshare")
    return lambda **env: starters(base_env(redis_url, run_dir, **env), prefix=UNSHARE)


def test_a_hup_whose_config_hangs_leaves_pid1_answering_and_reaping(pid1, tmp_path: Path) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("concurrency = 2\n")
    s: Starter = pid1(
        RESQUE_STARTER_CONFIG=str(conf), RESQUE_STARTER_CONCURRENCY="", RESQUE_STARTER_CONFIG_TIMEOUT="4s"
    )
    workers = s.wait_workers(2)
    conf.write_text(HANGS + "concurrency = 2\n")
    s.signal(signal.SIGHUP)
    wait_for(lambda: s.status()["reloading"], 2, what="the reload to start reading the file")

    began = time.monotonic()
    s.signal(signal.SIGTTIN)
    wait_for(lambda: s.status()["groups"][0]["size"] == 3, 1, what="TTIN within a second")
    victim = s.host_pid(workers[0]["pid"])
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: process_state(victim) is None, 1, what="the killed worker reaped")
    assert time.monotonic() - began < 2
    s.wait_workers(3)

    status = wait_for(lambda: (st := s.status())["reload_error"] and st, 10, what="the reload to time out")
    assert isinstance(status, dict)
    assert "RESQUE_STARTER_CONFIG" in status["reload_error"] and "within 4s" in status["reload_error"]
    assert status["generation"] == status["serving_generation"] == 1
    assert not status["reloading"]
    assert [p for p in descendants(s.pid) if process_state(p) == "Z"] == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("raise KeyboardInterrupt\n", "it raised KeyboardInterrupt"),
        ("raise SystemExit(0)\n", "it raised SystemExit: 0"),
        ("import os\nos._exit(0)\n", "it exited with code 0"),
    ],
    ids=["keyboard-interrupt", "system-exit", "os-exit"],
)
def test_a_hup_whose_config_raises_or_exits_is_a_refused_reload(
    pid1, tmp_path: Path, text: str, reason: str
) -> None:
    conf = tmp_path / "conf.py"
    conf.write_text("concurrency = 1\n")
    s: Starter = pid1(RESQUE_STARTER_CONFIG=str(conf), RESQUE_STARTER_CONCURRENCY="")
    [worker] = s.wait_workers(1)
    conf.write_text(text)
    s.signal(signal.SIGHUP)
    status: Any = wait_for(lambda: (st := s.status())["reload_error"] and st, 15, what="the reload refused")
    assert reason in status["reload_error"]
    assert status["generation"] == status["serving_generation"] == 1
    assert [w["pid"] for w in s.wait_workers(1)] == [worker["pid"]], "the serving worker is untouched"
    conf.write_text("concurrency = 2\n")
    s.signal(signal.SIGHUP)
    wait_for(lambda: s.status()["serving_generation"] == 2, 30, what="a later good reload")
    s.wait_workers(2)


def test_a_before_exit_hook_that_hangs_does_not_keep_pid1_from_exiting(pid1, tmp_path: Path) -> None:
    ran = tmp_path / "before_exit_ran"
    conf = tmp_path / "conf.py"
    conf.write_text(
        "import os, time\n"
        "def before_exit(settings):\n"
        f"    open({str(ran)!r}, 'w').write(f'{{os.getpid()}} {{settings.concurrency}}')\n"
        "    time.sleep(60)\n"
    )
    s: Starter = pid1(RESQUE_STARTER_CONFIG=str(conf), RESQUE_STARTER_CONCURRENCY="1")
    s.wait_workers(1)
    began = time.monotonic()
    s.signal(signal.SIGQUIT)
    assert s.wait_exit(30) == 0
    assert time.monotonic() - began < 25
    pid, concurrency = ran.read_text().split()
    assert concurrency == "1" and int(pid) != 1, "it ran, with the settings, in a child of PID 1"
    assert "before_exit hook did not finish within 10s" in s.log()
