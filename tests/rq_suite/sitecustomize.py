"""rq's own test suite against our worker classes: loaded by every Python process run.sh starts (this
directory is first on its PYTHONPATH), so that pytest and the processes rq's tests start (`rq worker`,
the worker pool's children) all get our class where rq's tests name rq's.

RQ_SUITE_CLASS picks it: `worker` (StarterMixin over rq.Worker), `prefork` (PreforkHorseMixin over
rq.Worker), `simple` (StarterMixin over rq.SimpleWorker). Each replaces the rq class of that name in every
loaded rq module (so `from rq import Worker` and rq's own `import_attribute('rq.Worker')` find ours), and
pickles by that name.
"""

from __future__ import annotations

import os
import sys


def _substitute(kind: str) -> None:
    import rq.worker

    from resque_starter.worker import PreforkHorseMixin, StarterMixin

    mixin, name = {
        "worker": (StarterMixin, "Worker"),
        "prefork": (PreforkHorseMixin, "Worker"),
        "simple": (StarterMixin, "SimpleWorker"),
    }[kind]
    original = getattr(rq.worker, name)
    ours = type(name, (mixin, original), {"__module__": "rq.worker", "__qualname__": name})
    for module_name, module in list(sys.modules.items()):
        if (module_name == "rq" or module_name.startswith("rq.")) and getattr(module, name, None) is original:
            setattr(module, name, ours)


if os.environ.get("RQ_SUITE_CLASS"):
    _substitute(os.environ["RQ_SUITE_CLASS"])
