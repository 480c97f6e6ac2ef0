"""Between two jobs: claim the next one (see `claims`), pause, and recycle.

rq pops a job id (BLPOP) or moves it into a shared intermediate list (BLMOVE); a worker killed after
that loses the job, or holds it until rq's maintenance finds it a minute or more later. Here job ids
move atomically into a claim list of this worker and leave it in the transaction that records the
execution (see StarterMixin.set_state), so recovery finds everything a dead worker held.
"""

from __future__ import annotations

import time

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from rq.exceptions import NoSuchJobError, StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.utils import now
from rq.worker import WorkerStatus

from resque_starter import claims, recovery
from resque_starter.connection import primary_address
from resque_starter.worker.bookkeeping import ReportingMixin
from resque_starter.worker.controls import Context, Controls
from resque_starter.worker.idle_wait import IdleWait

# How long one idle wait lasts at most. A job on any queue, a signal or a message from the supervisor
# ends it at once (see idle_wait); its length bounds only how late a recycle by lifetime is noticed
# and, with one BLMOVE per queue each time, what an idle worker costs Redis.
CLAIM_POLL_SECONDS = 5.0


def private_memory() -> int:
    """This process's USS in bytes: memory no other process shares (copy-on-write copies included)."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class ClaimingMixin(ReportingMixin):
    """rq's dequeue, with claims, pause and recycling (over ReportingMixin: titles, events, round trips)."""

    _context: Context
    _controls: Controls
    _jobs_done: int
    _claim_first: Script | None
    _claimed: tuple[str, str] | None = None  # (job id, queue name) until the execution records it
    _idle_wait: IdleWait | None = None
    _claims_unsure = False  # a wait broke off with an error: a job may sit in a claim list of ours
    _primary: str | None = None  # a Sentinel primary's address, as of the last claim

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Claim the next job, as rq's version pops it: heartbeats, maintenance and the backoff on
        Redis connection errors are kept; pause, stop and recycling are checked between short waits.

        `timeout` None (burst mode) tries once without blocking; otherwise it waits, on every queue
        at once and up to CLAIM_POLL_SECONDS at a time, until a job comes, a stop, or `max_idle_time`
        seconds pass.
        """
        self.set_state(WorkerStatus.IDLE)
        self._set_title(f"idle queues={','.join(self._context.queues)}")
        wait = 1.0  # rq's first wait for Redis, grown by its exponential_backoff_factor
        idle_since = time.monotonic()
        while True:
            try:
                self._recycle_if_due()
                self._wait_while_paused()
                if self._controls.stop:
                    raise StopRequested()
                self._heartbeat_if_due()
                self._settle_after_failover()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                if self._claims_unsure:
                    self._release_claims()
                    self._claims_unsure = False
                result = self._claim(block=timeout is not None)
                wait = 1.0
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                self._claims_unsure = True
                self.log.error("Worker %s: Redis unreachable (%s), retrying in %.1fs", self.name, exc, wait)
                self._controls.wait(wait)
                wait = min(wait * self.exponential_backoff_factor, self.max_connection_wait_time)
                continue
            if result is not None or timeout is None:
                return result
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None

    def _settle_after_failover(self) -> None:
        """Between jobs this worker holds none; after a Sentinel failover the new primary may still show
        some as claimed or started by it (the old primary took their end with it): settle those as a
        recovery would, failing each with the reason (or retrying it, per its rq Retry)."""
        primary, before = primary_address(self.connection), self._primary
        self._primary = primary
        if before is None or primary == before:
            return
        reason = (
            f"Redis failed over from {before} to {primary} while worker {self.name} ran this job: "
            "how it ended was lost with the old primary"
        )
        counts = recovery.recover_worker(
            self.connection, self.name, [q.name for q in self.queues], requeue=False,
            max_requeues=self._context.settings.max_requeues, reason=reason,
            job_class=self.job_class, queue_class=self.queue_class, serializer=self.serializer,
            unregister=False,
        )  # fmt: skip
        self.log.warning("Worker %s: Redis failed over to %s; settled what it held there: %s",
                         self.name, primary, counts)  # fmt: skip

    def _heartbeat_if_due(self) -> None:
        """rq heartbeats before each blocking wait of `dequeue_timeout` seconds: keep that cadence."""
        last = self.last_heartbeat
        if last is None or (now() - last).total_seconds() >= self.dequeue_timeout:
            self.heartbeat()

    def _claim(self, block: bool) -> tuple[Job, Queue] | None:
        """Move the first available job id into this worker's claim list and fetch the job."""
        ordered = self._ordered_queues
        names = [queue.name for queue in ordered]
        assert self._claim_first is not None
        prefix = self.job_class.redis_job_namespace_prefix
        found: tuple[str, str, list[bytes] | None] | None = claims.claim_first(
            self._claim_first, self.name, ordered, prefix
        )
        if found is None and block:
            found = self._wait_for_job(ordered)
        if found is None:
            return None
        queue_name, job_id, fields = found
        queue = ordered[names.index(queue_name)]
        if self._controls.stop or self._controls.paused:  # the signal came while we were waiting
            self._release_claims()
            return None
        try:
            job = self._load(job_id, fields)
        except NoSuchJobError:  # deleted while queued: drop it, as rq does
            self.connection.lrem(claims.claim_key(self.name, queue_name), 1, job_id)
            return None
        self.reorder_queues(reference_queue=queue)
        job.redis_server_version = self.get_redis_server_version()
        if self.log_job_description:  # what rq logs for a dequeued job
            self.log.info("Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id)
        else:
            self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
        self._claimed = (job.id, queue.name)
        return job, queue

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """rq's prepare_execution sets the worker BUSY in the transaction that records the execution:
        the claimed job leaves its claim list in the same transaction (from then on the execution names
        it), with the heartbeat rq's dequeue sends once it has a job."""
        claimed = self._claimed
        if pipeline is not None and state == WorkerStatus.BUSY and claimed is not None:
            self._claimed = None
            job_id, queue_name = claimed
            pipeline.lrem(claims.claim_key(self.name, queue_name), 1, job_id)
            self.heartbeat(pipeline=pipeline)
        super().set_state(state, pipeline)

    def _wait_for_job(self, ordered: list[Queue]) -> tuple[str, str, None] | None:
        """Block on every queue at once (see idle_wait) for up to CLAIM_POLL_SECONDS, shorter when a
        heartbeat or a recycle by lifetime is due sooner; a job comes already moved into this
        worker's claim list."""
        if self._idle_wait is None:
            self._idle_wait = IdleWait(self.connection, self._controls.wake_fd)
        names = [queue.name for queue in ordered]
        won = self._idle_wait.wait(
            [queue.key for queue in ordered],
            [claims.claim_key(self.name, name) for name in names],
            min(CLAIM_POLL_SECONDS, self.dequeue_timeout, self._until_recycle()),
            (*self._context.watched(), *self._idle_watch()),
        )
        return (names[won[0]], won[1], None) if won is not None else None

    def _idle_watch(self) -> tuple[int, ...]:
        """More descriptors whose news ends an idle wait (the pre-forked horse's forker)."""
        return ()

    def _until_recycle(self) -> float:
        deadline = self._context.deadline
        return CLAIM_POLL_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())

    def _load(self, job_id: str, fields: list[bytes] | None) -> Job:
        """The claimed job: from the fields the claim brought, or (after BLMOVE) Job.fetch."""
        if fields is None:
            return self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
        if not fields:
            raise NoSuchJobError(f"No such job: {self.job_class.key_for(job_id)}")
        job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
        job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
        return job

    def _release_claims(self) -> None:
        moved = claims.release_claims(self.connection, self.name, self.queues)
        if moved:
            self.log.info("Worker %s: put %d claimed job(s) back at the front of a queue", self.name, moved)

    def _wait_while_paused(self) -> None:
        if not self._controls.paused or self._controls.stop:
            return
        self.set_state(WorkerStatus.SUSPENDED)
        self._set_title("paused")
        self._context.send({"event": "paused"})
        self.log.info("Worker %s: paused (SIGUSR2), SIGCONT resumes", self.name)
        while self._controls.paused and not self._controls.stop:
            self._heartbeat_if_due()
            self._recycle_if_due()
            self._controls.wait(CLAIM_POLL_SECONDS)  # a signal ends it at once; the rest is polled
        if not self._controls.paused:
            self.log.info("Worker %s: resumed", self.name)
            self._context.send({"event": "resumed"})
        self.set_state(WorkerStatus.IDLE)
        self._set_title(f"idle queues={','.join(self._context.queues)}")

    def _recycle_if_due(self) -> None:
        if self._controls.stop:
            return
        if self._context.promotion_requested():
            generation = self._context.promote_to
            self.log.info("Worker %s: promoted to be the mold of generation %d", self.name, generation)
            self._controls.stop = True
            return
        reason = self._recycle_reason()
        if reason:
            self.log.info("Worker %s: recycling (%s)", self.name, reason)
            self._context.send({"event": "recycle", "reason": reason})
            self._controls.stop = True

    def _recycle_reason(self) -> str | None:
        settings = self._context.settings
        if settings.max_jobs is not None and self._jobs_done >= settings.max_jobs:
            return "max_jobs"
        if self._context.deadline is not None and time.monotonic() >= self._context.deadline:
            return "max_lifetime"
        if settings.max_memory is not None and private_memory() > settings.max_memory:
            return "max_memory"
        return None
