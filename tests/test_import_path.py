"""Your app importable as with `rq worker`: the working directory is on the mold's import path, and
RESQUE_STARTER_PATH puts more directories first; and what is probably a mistake is said once, at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rq import Queue
from rq.job import JobStatus

from conftest import wait_for
from starter import ROOT, Starter, base_env

TASKS = "def hello(name):\n    return f'hello {name} from ' + __name__\n"
# what pip's console script `resque-starter` is: a file in a bin directory, which puts that directory,
# not the working directory, first on sys.path (`python -m` would put the working directory there)
CONSOLE_SCRIPT = "import sys\nfrom resque_starter.cli import main\nsys.exit(main())\n"


def make_app(directory: Path, package: str) -> None:
    (directory / package).mkdir(parents=True)
    (directory / package / "__init__.py").write_text("")
    (directory / package / "tasks.py").write_text(TASKS)


def console(starters, tmp_path: Path, env: dict[str, str], cwd: Path) -> Starter:  # type: ignore[no-untyped-def]
    """`cd cwd && resque-starter` with `env`, through a console script like pip's."""
    script = tmp_path / "bin" / "resque-starter"
    script.parent.mkdir(exist_ok=True)
    script.write_text(CONSOLE_SCRIPT)
    env = {**env, "PYTHONPATH": str(ROOT)}  # resque_starter itself, as if installed; not the app
    return starters(env, cwd=str(cwd), launcher=(sys.executable, str(script)))


def run_job(conn, name: str) -> object:  # type: ignore[no-untyped-def]
    job = Queue("default", connection=conn).enqueue(f"{name}.tasks.hello", "you")
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 30, what=f"the {name} job to finish")
    return job.return_value()


def test_an_app_in_the_working_directory_runs_jobs(
    starters, redis_url, run_dir, conn, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    make_app(project, "myapp")
    env = base_env(redis_url, run_dir, RESQUE_STARTER_APP="myapp.tasks", RESQUE_STARTER_CONCURRENCY="1")
    s = console(starters, tmp_path, env, cwd=project)
    s.wait_workers(1)
    assert s.status()["app"] == ["myapp.tasks"]
    assert run_job(conn, "myapp") == "hello you from myapp.tasks"


def test_path_puts_directories_first_on_the_import_path(
    starters, redis_url, run_dir, conn, tmp_path: Path
) -> None:
    """RESQUE_STARTER_PATH (like gunicorn's --pythonpath): a directory that is not the working one, and
    first, so that it wins over a same-named package in the working directory."""
    libs, project = tmp_path / "libs", tmp_path / "project"
    make_app(libs, "otherapp")
    make_app(project, "otherapp")
    (project / "otherapp" / "tasks.py").write_text("raise ImportError('the working directory came first')\n")
    env = base_env(
        redis_url, run_dir, RESQUE_STARTER_APP="otherapp.tasks", RESQUE_STARTER_CONCURRENCY="1",
        RESQUE_STARTER_PATH=f"{tmp_path / 'nowhere'}:{libs}",
    )  # fmt: skip
    s = console(starters, tmp_path, env, cwd=project)
    s.wait_workers(1)
    assert run_job(conn, "otherapp") == "hello you from otherapp.tasks"


def test_a_mistyped_variable_and_an_unset_app_are_each_one_warning_line(
    starters, redis_url, run_dir, tmp_path: Path
) -> None:
    env = base_env(redis_url, run_dir, RESQUE_STARTER_CONCURENCY="4", RESQUE_STARTER_CONCURRENCY="1")
    env.pop("RESQUE_STARTER_APP", None)
    s: Starter = starters(env)
    s.wait_workers(1)
    lines = s.log().splitlines()
    typo = [line for line in lines if "RESQUE_STARTER_CONCURENCY" in line]
    assert len(typo) == 1 and "WARNING" in typo[0], typo
    assert typo[0].endswith(
        "RESQUE_STARTER_CONCURENCY is not a setting of resque-starter and is ignored; "
        "did you mean RESQUE_STARTER_CONCURRENCY?"
    )
    unset = [line for line in lines if "RESQUE_STARTER_APP is not set" in line]
    assert len(unset) == 1 and "WARNING" in unset[0] and "nothing is preloaded" in unset[0], unset
    assert s.status()["groups"][0]["size"] == 1, "the typo changed nothing"


def test_no_warning_when_every_variable_is_known_and_the_app_is_set(
    starters, redis_url, run_dir, tmp_path: Path
) -> None:
    env = base_env(redis_url, run_dir, RESQUE_STARTER_APP="testjobs", RESQUE_STARTER_CONCURRENCY="1")
    s: Starter = starters(env)
    s.wait_workers(1)
    assert "is not a setting of resque-starter" not in s.log()
    assert "RESQUE_STARTER_APP is not set" not in s.log()


def test_the_help_lists_every_flag_with_its_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "resque_starter", "run", "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    assert "--with-scheduler [BOOL]" in out and "--path VALUE" in out and "[RESQUE_STARTER_PATH]" in out
