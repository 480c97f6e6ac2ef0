"""An application with about 40 MB of small objects the garbage collector tracks, as a real app's
import-time state (models, tables, caches): what copy-on-write sharing is for."""

from __future__ import annotations

TABLE = [[i, i + 1] for i in range(250_000)]
