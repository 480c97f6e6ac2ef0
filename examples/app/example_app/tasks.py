"""Example jobs. `humanize` is the app's own dependency, installed into the image's venv by the app's
Dockerfile; the mold imports this module (RESQUE_STARTER_APP=example_app.tasks) once for every worker."""

from __future__ import annotations

import humanize


def describe_size(nbytes: int) -> str:
    """A size as people read it: 1536000 -> '1.5 MB'."""
    return humanize.naturalsize(nbytes)


def describe_count(count: int) -> str:
    """A count as people read it: 1200000 -> '1.2 million'."""
    return humanize.intword(count)
