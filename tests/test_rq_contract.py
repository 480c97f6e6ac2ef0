"""The contract with rq (issue 18): what resque_starter.rq_compat says we rely on in rq beyond its public API,
checked against the installed rq. Any rq release that renames a hook we override, changes its parameters,
drops a private name we touch, or reorders the work loop our round-trip savings follow fails here. The
last test proves it: it renames one overridden hook in a copy of rq and runs these tests against it."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import rq
from rq import Queue, SimpleWorker, Worker
from rq.executions import Execution
from rq.job import Job

from resque_starter import rq_compat
from resque_starter.worker.bookkeeping import ReportingMixin
from resque_starter.worker.dequeue import ClaimingMixin
from resque_starter.worker.horse import PreforkHorseMixin
from resque_starter.worker.mixin import StarterMixin

from starter import ROOT

MIXINS = (ReportingMixin, ClaimingMixin, StarterMixin, PreforkHorseMixin)


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)[1:]


@pytest.mark.parametrize("name", sorted(rq_compat.HOOKS))
def test_each_hook_we_override_is_rqs_with_the_parameters_we_expect(name: str) -> None:
    assert hasattr(Worker, name), f"rq.Worker has no {name} any more"
    assert _parameters(getattr(Worker, name)) == list(rq_compat.HOOKS[name])


def test_every_rq_method_the_mixins_override_is_in_the_contract() -> None:
    """A mixin method that has rq's name overrides rq's: it must be listed, so that the test above
    checks it (the `_stop_requested` property stands for rq's instance attribute, checked below)."""
    overridden = {
        name
        for mixin in MIXINS
        for name, value in vars(mixin).items()
        if callable(value) or isinstance(value, property)
        if hasattr(Worker, name) and name not in ("__init_subclass__", "__subclasshook__")
    }
    assert overridden == set(rq_compat.HOOKS)


@pytest.mark.parametrize(("owner", "name"), sorted(rq_compat.PRIVATE_CALLS, key=str))
def test_each_private_method_we_call_takes_the_parameters_we_pass(owner: type, name: str) -> None:
    assert hasattr(owner, name), f"{owner.__name__} has no {name} any more"
    assert _parameters(getattr(owner, name)) == list(rq_compat.PRIVATE_CALLS[owner, name])


def test_the_worker_attributes_we_use_are_set_by_rq(conn: redis.Redis) -> None:
    worker = Worker(["default"], connection=conn, prepare_for_work=False)
    for name in rq_compat.WORKER_ATTRIBUTES:
        assert hasattr(worker, name), f"rq's worker has no attribute {name} any more"
    assert worker._stop_requested is False and worker._horse_pid == 0 and worker._is_horse is False


def test_a_job_rebuilt_from_its_attributes_is_the_job_rq_fetches(conn: redis.Redis) -> None:
    """The pre-forked horse's hand-off: Job.__new__ and the attributes, rq's lazy ones by name."""
    queued = Queue("default", connection=conn).enqueue("testjobs.length", "four", meta={"k": "v"})
    fetched = Job.fetch(queued.id, connection=conn)
    state, unloaded = rq_compat.job_state(fetched)
    assert "connection" not in state
    rebuilt = rq_compat.restore_job(Job, conn, state, unloaded)
    assert rebuilt.to_dict() == fetched.to_dict()
    assert rebuilt.connection is conn
    assert (rebuilt.args, rebuilt.meta) == (("four",), {"k": "v"})
    assert rebuilt.perform() == 4


def test_an_execution_rebuilt_is_the_one_rq_saved(conn: redis.Redis) -> None:
    job = Queue("default", connection=conn).enqueue("testjobs.noop")
    saved = Execution.create(job, 60, pipeline=conn.pipeline(), worker_name="w")  # not executed: a value
    rebuilt = rq_compat.restore_execution(saved.id, job, conn, "w", (saved.created_at, saved.last_heartbeat))
    assert (rebuilt.id, rebuilt.job_id, rebuilt.worker_name) == (saved.id, job.id, "w")
    assert rebuilt.job is job
    assert (rebuilt.created_at, rebuilt.last_heartbeat) == (saved.created_at, saved.last_heartbeat)


_RECORDED = {name.split(":")[0] for name in rq_compat.WORK_LOOP_SIMPLE + rq_compat.WORK_LOOP_FORKING}


def _recording(worker_class: type[Worker]) -> type[Worker]:
    """worker_class, recording the hooks in _RECORDED as rq's loop calls them (set_state with its state),
    in the worker process only (not in its horse)."""

    def wrap(name: str) -> Any:
        original = getattr(worker_class, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if os.getpid() == self.recorder_pid:
                state = kwargs.get("state", args[0] if args else None)
                self.calls.append(f"{name}:{getattr(state, 'value', state)}" if name == "set_state" else name)
            return original(self, *args, **kwargs)

        return method

    recorded = {name: wrap(name) for name in _RECORDED if hasattr(worker_class, name)}
    return type("Recording", (worker_class,), recorded)


@pytest.mark.parametrize(
    ("worker_class", "expected"),
    [(SimpleWorker, rq_compat.WORK_LOOP_SIMPLE), (Worker, rq_compat.WORK_LOOP_FORKING)],
    ids=["SimpleWorker", "Worker"],
)
def test_rqs_work_loop_calls_the_hooks_in_the_order_we_rely_on(
    conn: redis.Redis, worker_class: type[Worker], expected: tuple[str, ...]
) -> None:
    worker: Any = _recording(worker_class)(["default"], connection=conn)
    worker.calls, worker.recorder_pid = [], os.getpid()
    Queue("default", connection=conn).enqueue("testjobs.noop")
    worker.work(burst=True)
    start = worker.calls.index("execute_job")
    assert tuple(worker.calls[start : start + len(expected)]) == expected


def test_these_tests_fail_against_an_rq_whose_overridden_hook_is_renamed(tmp_path: Path) -> None:
    """The proof that the contract holds rq to something: a copy of rq with prepare_job_execution
    renamed fails the tests above, naming it."""
    patched = tmp_path / "rq"
    shutil.copytree(Path(rq.__file__).parent, patched, ignore=shutil.ignore_patterns("__pycache__"))
    base = patched / "worker" / "base.py"
    source = base.read_text()
    assert source.count("    def prepare_job_execution(") == 1
    base.write_text(source.replace("    def prepare_job_execution(", "    def prepare_job_execution_v2("))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not renamed"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        f"{tmp_path}"
        in subprocess.run(
            [sys.executable, "-c", "import rq; print(rq.__file__)"], env=env, capture_output=True, text=True
        ).stdout
    )
    assert run.returncode == 1, run.stdout[-3000:]
    assert "FAILED" in run.stdout and "prepare_job_execution" in run.stdout
