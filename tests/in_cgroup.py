"""`python -m in_cgroup run`: resque-starter started inside the cgroups IN_CGROUP names (cgroup.procs
files, separated by ':'), so the limits autoscale reads are the kernel's own, and bind."""

from __future__ import annotations

import os
import sys

from resque_starter import cli

if __name__ == "__main__":
    for procs in os.environ.pop("IN_CGROUP").split(":"):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    sys.exit(cli.main())
