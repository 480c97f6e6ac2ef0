"""`python -m faulty run`: resque-starter with a bug injected into one step of PID 1's loop.

SIGUSR1 (kill the running jobs) raises instead, as an unexpected exception in any loop step would.
"""

from __future__ import annotations

import sys

from resque_starter import cli
from resque_starter.supervisor import Supervisor


def _broken_kill_jobs(self: Supervisor) -> None:
    raise RuntimeError("injected fault")


Supervisor.kill_jobs = _broken_kill_jobs  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
