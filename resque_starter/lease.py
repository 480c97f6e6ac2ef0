"""A pod's lease in Redis, and settling the jobs of a pod whose lease expired.

Each supervisor (one pod) is known in Redis by a lease: its id in one sorted set, scored by when the
lease expires (Redis' own clock, so no two pods need agree on the time), and a hash naming what it
holds: its workers and their queues, so their claim lists and rq executions are found without a SCAN.
Its agent refreshes the lease every TTL/3; once the pod stops refreshing it (the pod died, or was
cut off from Redis for longer than the TTL), any live agent takes it over and settles its jobs with
the rules of a dead worker (recovery.recover_worker).

Cost: finding expired leases is one ZRANGEBYSCORE on the sorted set, O(log pods) whatever the number
of live pods or keys; settling touches only the dead pod's own keys. Every step that two agents could
race on is one Lua script: exactly one of them takes a lease over. The taker holds it for SETTLE_HOLD
(the lease's score moves on by that much); a taker that dies mid-way lets it expire again, and the
next one repeats the (idempotent) settling.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from resque_starter.config import Settings
from resque_starter.recovery import recover_worker

log = logging.getLogger("resque_starter.lease")

LEASES = "rq:resque-starter:leases"
LEASE_PREFIX = "rq:resque-starter:lease:"
SETTLE_HOLD = 60.0  # seconds a taker has to settle a dead pod before another may take it over

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the lease set, this pod's hash. ARGV: pod id, ttl (ms), "1" when this pod's lease was made
# before, its workers as JSON ("" = unchanged), then field/value pairs to set. Returns false when
# refreshed; when another pod took this lease over, the taker's id ("" once it settled and removed it).
_REFRESH = (
    _NOW
    + """
local settler = redis.call('HGET', KEYS[2], 'settler')
if settler then return settler end
if ARGV[3] == '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return '' end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'workers', ARGV[4]) end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return false
"""
)

# KEYS: the lease set. ARGV: the taker's pod id, hold (ms), a pod to take even before its lease
# expires ("" = none: this pod's dead predecessor), the hash key prefix. Takes over one expired lease
# (never the taker's own) and returns {pod, its hash's fields and values}, or false when none is due.
_TAKE = (
    _NOW
    + """
local pod = false
if ARGV[3] ~= '' and redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[3]))
  if score <= now or redis.call('HEXISTS', ARGV[4] .. ARGV[3], 'settler') == 0 then pod = ARGV[3] end
end
if not pod then
  for _, due in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 2)) do
    if due ~= ARGV[1] then pod = due break end
  end
end
if not pod then return false end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), pod)
redis.call('HSET', ARGV[4] .. pod, 'settler', ARGV[1])
return {pod, redis.call('HGETALL', ARGV[4] .. pod)}
"""
)

# KEYS: the lease set, the pod's hash. ARGV: pod id, who may remove it ("" = the pod itself, only
# while nobody took it over). Returns 1 when removed.
_REMOVE = """
if (redis.call('HGET', KEYS[2], 'settler') or '') ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


def lease_key(pod: str) -> str:
    return LEASE_PREFIX + pod


@dataclass
class Taken:
    """A dead pod's lease, taken over by this pod: what it held, as its hash says."""

    pod: str
    fields: dict[str, str]

    @property
    def workers(self) -> dict[str, list[str]]:
        held: dict[str, list[str]] = json.loads(self.fields.get("workers") or "{}")
        return held

    def describe(self) -> str:
        where = ", ".join(f"{k} {self.fields[k]}" for k in ("host", "pid") if k in self.fields)
        return f"pod {self.pod}" + (f" ({where})" if where else "")


class Leases:
    """The lease operations of one pod (`pod`), on one connection."""

    def __init__(self, connection: redis.Redis, pod: str, ttl: float) -> None:
        self.connection = connection
        self.pod = pod
        self.ttl_ms = int(ttl * 1000)
        self._refresh: Script = connection.register_script(_REFRESH)
        self._take: Script = connection.register_script(_TAKE)
        self._remove: Script = connection.register_script(_REMOVE)

    def refresh(self, established: bool, workers: dict[str, list[str]] | None, **fields: str) -> str | None:
        """Extend this pod's lease (making it when not `established`), with its workers when they
        changed; None when done, else the id of the pod that took it over ("" when unknown)."""
        listed = "" if workers is None else json.dumps(workers)
        argv: list[Any] = [self.pod, self.ttl_ms, int(established), listed]
        for name, value in fields.items():
            argv += [name, value]
        lost = self._refresh(keys=[LEASES, lease_key(self.pod)], args=argv)
        return None if lost is None else lost.decode()

    def take(self, predecessor: str = "") -> Taken | None:
        """Take over one expired lease (or `predecessor`'s, expired or not), or None if none is due."""
        hold_ms = int(SETTLE_HOLD * 1000)
        taken = self._take(keys=[LEASES], args=[self.pod, hold_ms, predecessor, LEASE_PREFIX])
        if not taken:
            return None
        pod, flat = taken
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return Taken(pod.decode(), fields)

    def release(self) -> bool:
        """Remove this pod's lease at a clean exit (nothing left to settle); False if it was taken over."""
        return bool(self._remove(keys=[LEASES, lease_key(self.pod)], args=[self.pod, ""]))

    def settle(self, taken: Taken, settings: Settings, progress: Callable[[], None]) -> dict[str, int]:
        """Settle every job the dead pod held, as for a dead worker of our own: claims back to the front
        of their queues, executions requeued (counted; failed past MAX_REQUEUES) with a reason naming the
        pod, its workers unregistered; then remove its lease. `progress` runs after each worker."""
        reason = f"resque-starter: {taken.describe()} died (its lease expired); settled by pod {self.pod}"
        totals: Counter[str] = Counter()
        for name, queues in taken.workers.items():
            totals.update(
                recover_worker(
                    self.connection,
                    name,
                    queues,
                    requeue=True,
                    max_requeues=settings.max_requeues,
                    reason=reason,
                    job_class=settings.job_class,
                    queue_class=settings.queue_class,
                    serializer=settings.serializer,
                )
            )
            progress()
        self._remove(keys=[LEASES, lease_key(taken.pod)], args=[taken.pod, self.pod])
        return dict(totals)
