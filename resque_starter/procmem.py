"""Per-process memory from /proc/PID/smaps_rollup: what copy-on-write sharing actually saves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Memory:
    rss: int
    pss: int
    uss: int
    shared: int


def read(pid: int | str = "self") -> Memory | None:
    """Bytes of RSS, PSS, USS (private) and shared for one process; None if it is gone or unreadable."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    shared = fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0)
    return Memory(rss=fields.get("Rss", 0), pss=fields.get("Pss", 0), uss=uss, shared=shared)
