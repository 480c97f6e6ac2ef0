"""Claim lists: where a worker keeps the job ids it has taken from a queue but not recorded yet.

A worker never pops a job id into thin air: it moves it atomically from its queue into its own claim
list (`claim_key`), and removes it from there in the same transaction that records the job's rq
execution. The worker claims (`claim_first`), recovery and a stopping worker give claims back
(`release_claims`). It lives beside, not inside, the worker package because recovery, which the
worker imports, needs it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.commands.core import Script
from rq.queue import Queue
from rq.utils import as_text

CLAIM_PREFIX = "rq:resque-starter:claim:"

# KEYS[1..n]: queue keys in dequeue order, KEYS[n+1..2n]: this worker's claim lists for them;
# ARGV[1..n]: the queue names, ARGV[n+1]: the job key prefix. Moves the first available job id into its
# claim list: {queue, id, the job's fields} (what Job.fetch reads, in the same round trip), or nil.
_CLAIM_FIRST = """
local n = #KEYS / 2
for i = 1, n do
  local job_id = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
  if job_id then
    return {ARGV[i], job_id, redis.call('HGETALL', ARGV[n + 1] .. job_id)}
  end
end
return false
"""

# KEYS: pairs (claim list, queue key). Every claimed id goes back to the FRONT of its queue; moving
# from the claim's tail to the queue's head keeps the claimed ids in their original order.
_RELEASE_CLAIMS = """
local moved = 0
for i = 1, #KEYS, 2 do
  while redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'RIGHT', 'LEFT') do
    moved = moved + 1
  end
end
return moved
"""


def claim_key(worker_name: str, queue_name: str) -> str:
    """The list holding the job ids `worker_name` took from `queue_name` but has not recorded yet."""
    return f"{CLAIM_PREFIX}{worker_name}:{queue_name}"


def claim_script(connection: redis.Redis) -> Script:
    """The claim script registered on `connection` (a worker registers it once)."""
    return connection.register_script(_CLAIM_FIRST)


def claim_first(
    script: Script, worker_name: str, queues: Sequence[Queue], job_prefix: str
) -> tuple[str, str, list[bytes]] | None:
    """Move the first job id found, in the order of `queues`, into the worker's claim list for its
    queue: (queue name, job id, the job hash's fields: empty if the job is gone), or None."""
    names = [queue.name for queue in queues]
    keys = [queue.key for queue in queues] + [claim_key(worker_name, name) for name in names]
    found: Any = script(keys=keys, args=[*names, job_prefix])
    if not found:
        return None
    return as_text(found[0]), as_text(found[1]), found[2]


def release_claims(connection: redis.Redis, worker_name: str, queues: Iterable[Queue]) -> int:
    """Put every job id claimed by `worker_name` back at the front of its queue; return how many."""
    return release(connection, [(claim_key(worker_name, queue.name), queue.key) for queue in queues])


def release(connection: redis.Redis, pairs: Sequence[tuple[str, str]]) -> int:
    """Move every id of each (claim list, queue key) pair back to the front of the queue, in order."""
    keys = [key for pair in pairs for key in pair]
    if not keys:
        return 0
    return int(connection.register_script(_RELEASE_CLAIMS)(keys=keys))
