"""Example jobs. Importing this module builds a lookup table once, in the mold, shared by every worker."""

from __future__ import annotations

import hashlib
import os
import random
import time

# Preloaded state: built once by the mold, then shared copy-on-write by every worker and work-horse.
WORDS = [hashlib.sha1(str(i).encode()).hexdigest()[:8] for i in range(50_000)]


def resize_image(image_id: int) -> str:
    """Pretend to resize an image: a little CPU, a little waiting."""
    digest = hashlib.sha256(WORDS[image_id % len(WORDS)].encode())
    for _ in range(2000):
        digest = hashlib.sha256(digest.digest())
    time.sleep(random.uniform(0.1, 0.6))
    return f"image {image_id} resized by pid {os.getpid()}: {digest.hexdigest()[:12]}"


def send_email(to: str) -> str:
    time.sleep(0.05)
    return f"email sent to {to}"


def flaky(n: int) -> str:
    """Fails one time in five, to show failures with their reason in rq's FailedJobRegistry."""
    if n % 5 == 0:
        raise RuntimeError(f"flaky job {n} failed on purpose")
    return f"flaky job {n} ok"
