"""The README's quickstart for your own app, offline: resque-starter installed from a clean copy of the
repository (`pip install .`) and from the wheel `python -m build` makes, each into a fresh venv; then,
from a project directory that holds `myapp/tasks.py`, `resque-starter` with RESQUE_STARTER_APP=myapp.tasks
runs its jobs.

Offline means: the build runs without isolation, and the fresh venv finds the dependencies (rq,
redis-py, setproctitle) through a .pth file pointing at this interpreter's site-packages instead of
downloading them; what is tested is the package, its metadata and its entry point.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.job import JobStatus

from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
APP = '''
import resque_starter


def shout(text):
    """A job of the user's own app, reporting which resque-starter runs it."""
    return text.upper(), resque_starter.__file__
'''

pytestmark = pytest.mark.timeout(300)


def clean_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (plus new files not yet committed), nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def fresh_venv(path: Path) -> Path:
    """A venv with nothing installed, which finds the dependencies where this interpreter has them."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = subprocess.run(
        [path / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "resque-starter-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return path


def pip_install(venv: Path, what: Path) -> None:
    argv = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    argv += ["--no-index", "--no-deps", "--no-build-isolation", str(what)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def build_wheel(source: Path, out: Path) -> Path:
    argv = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [wheel] = out.glob("*.whl")
    assert wheel.name == f"resque_starter-{VERSION}-py3-none-any.whl", "the README names this file"
    return wheel


@pytest.mark.parametrize("source", ["clone", "wheel"])
def test_your_app_from_the_working_directory_runs_its_jobs(
    source: str, tmp_path: Path, redis_url: str, conn: redis.Redis
) -> None:
    repository = clean_copy(tmp_path / "resque-starter")
    venv = fresh_venv(tmp_path / "venv")
    pip_install(venv, repository if source == "clone" else build_wheel(repository, tmp_path / "dist"))
    project = tmp_path / "myproject"
    (project / "myapp").mkdir(parents=True)
    (project / "myapp" / "__init__.py").write_text("")
    (project / "myapp" / "tasks.py").write_text(APP)
    (tmp_path / "run").mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": redis_url,
        "RESQUE_STARTER_APP": "myapp.tasks",
        "RESQUE_STARTER_CONCURRENCY": "1",
        "RESQUE_STARTER_RUN_DIR": str(tmp_path / "run"),
    }
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(
            [venv / "bin" / "resque-starter"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(
            lambda: Worker.count(connection=conn) == 1 or supervisor.poll() is not None,
            timeout=30,
            what="a worker of myapp",
        )
        assert supervisor.poll() is None, f"exited {supervisor.returncode}:\n{log.read_text()}"
        job = Queue("default", connection=conn).enqueue("myapp.tasks.shout", "hello")
        wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, timeout=30, what="myapp's job")
        text, runner = job.return_value()
        assert text == "HELLO"
        assert runner.startswith(str(venv)), f"the job ran with {runner}, not the installed package"
        supervisor.send_signal(signal.SIGQUIT)
        assert supervisor.wait(timeout=30) == 0, log.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
