"""The chaos soak, on demand and bigger than CI: the same rounds as tests/chaos/test_chaos.py.

    python bench/soak.py                       # 5 rounds from a random seed, 5000 jobs, 60 s storms
    python bench/soak.py --seed 42 --rounds 1  # replay one round (the seed a failure printed)

Each round starts from a flushed private redis-server (on a free 127.0.0.1 port). Exit status 1 on
the first broken promise, with the seed and the storm's last events.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "chaos"), str(ROOT / "tests"), str(ROOT)]

from conftest import RedisServer  # noqa: E402
from storm import ChaosFailure, Plan, run_round  # noqa: E402

WORKER_CLASSES = ("rq.Worker", "rq.SimpleWorker")
# Round n runs VARIANTS[seed % 3] unless --worker-class / --prefork-horse say otherwise.
VARIANTS = (("rq.Worker", False), ("rq.SimpleWorker", False), ("rq.Worker", True))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, with seeds seed, seed+1, ...")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--storm", type=float, default=60.0, help="seconds of storm per round")
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument(
        "--worker-class", choices=WORKER_CLASSES, default=None, help="default: vary per round"
    )
    parser.add_argument("--prefork-horse", action="store_true", default=None, help="default: vary per round")
    args = parser.parse_args()
    first = args.seed if args.seed is not None else random.randrange(10**6)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = RedisServer(tmp)
        server.start()
        try:
            for n in range(args.rounds):
                seed = first + n
                worker_class, prefork = VARIANTS[seed % len(VARIANTS)]
                if args.worker_class is not None or args.prefork_horse is not None:
                    worker_class, prefork = args.worker_class or "rq.Worker", bool(args.prefork_horse)
                plan = Plan(
                    seed,
                    jobs=args.jobs,
                    storm_seconds=args.storm,
                    max_workers=args.max_workers,
                    worker_class=worker_class,
                    prefork_horse=prefork,
                    drain_timeout=max(120.0, args.jobs / 10),
                )
                run_dir = Path(tmp) / f"run-{seed}"
                run_dir.mkdir()
                started = time.monotonic()
                try:
                    run_round(plan, server.url, str(run_dir))
                except ChaosFailure as exc:
                    print(f"FAILED\n{exc}", file=sys.stderr)
                    return 1
                print(f"seed {seed}: ok in {time.monotonic() - started:.0f}s", flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
