"""An application module for the mold to preload: records each import so tests can count them."""

from __future__ import annotations

import os

import redis

redis.Redis.from_url(os.environ["REDIS_URL"]).rpush("testapp:imports", os.getpid())

BIG_TABLE = [str(i) for i in range(10_000)]
