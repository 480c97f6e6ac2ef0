"""The worker process: an rq worker with resque-starter's signals, status events and reliable dequeue.

`run_worker` (process.py) is what the mold calls in a freshly double-forked child. It opens its own
Redis connection (waiting for Redis with backoff), runs the after_fork hook and then rq's `work()` with
`StarterMixin` (mixin.py) layered over the configured worker class (`rq.Worker`, `rq.SimpleWorker`, or
the user's), which changes four things:

- Signals (handlers only set flags or start the job's stop, controls.py): TERM/QUIT finish the current
  job and exit; INT interrupts it and requeues it at the front of its queue (or fails it, see
  `recovery.requeue_or_fail`); USR1 kills the current job only; USR2 pauses, CONT resumes. The running
  job hears each of them at once and gets `resque_starter.job.Shutdown` at its deadline (stopclock.py).
- Dequeue (dequeue.py): instead of rq's BLPOP (a worker killed after the pop loses the job) or BLMOVE
  into a shared intermediate list (recovered after a minute or more), job ids move atomically into a
  claim list of this worker (`claims`) and leave it in the same transaction that records the
  execution, so `recovery.recover_worker` finds everything a dead worker held.
- Status (bookkeeping.py): JSON lines on the supervisor's socket (ready, busy, idle, paused, resumed,
  recycle, promote-ready); the supervisor's one message the other way is `promote`.
- Recycling between jobs after max_jobs, max_lifetime (+-10% jitter) or max_memory (USS).
- Reforking (refork_after): the worker's Nth job runs in this process, even with a forking worker
  class, so what it loads lazily stays here; asked to, the worker then becomes the next mold.

With prefork_horse and a class that forks per job, `PreforkHorseMixin` (horse.py, over StarterMixin)
forks each horse ahead of its job and reaps it after, both off the job's path, and keeps rq's Redis
bookkeeping out of the horse where it can (the process side is `prefork`). What all of this relies on
in rq beyond its public API is in `rq_compat`.
"""

from resque_starter.worker.controls import Context, Controls
from resque_starter.worker.dequeue import CLAIM_POLL_SECONDS, private_memory
from resque_starter.worker.horse import PreforkHorseMixin
from resque_starter.worker.mixin import StarterMixin
from resque_starter.worker.process import (
    DRIVER_INFO,
    REDIS_BACKOFF_FIRST,
    REDIS_BACKOFF_MAX,
    build_worker,
    forks_horses,
    run_worker,
    warm_client,
)

__all__ = [
    "CLAIM_POLL_SECONDS", "DRIVER_INFO", "REDIS_BACKOFF_FIRST", "REDIS_BACKOFF_MAX", "Context", "Controls",
    "PreforkHorseMixin", "StarterMixin", "build_worker", "forks_horses", "private_memory",
    "run_worker", "warm_client",
]  # fmt: skip
