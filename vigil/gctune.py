"""The garbage collector's thresholds for Vigil's long-running processes.

A worker batch makes tens of thousands of short-lived containers (decoded events, items, effects), all
freed by reference counting. At CPython's default first threshold (700 allocations) the cyclic collector
still runs every few hundred of them, and now and then a full collection walks every cached patient and
device state: a fifth to a quarter of one worker's drain rate (docs/SCALING.md). Vigil's hot paths make no
reference cycles of their own, so collecting rarely frees the same memory, later.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping

GC_THRESHOLD_ENV = "VIGIL_GC_THRESHOLD"  # "g0,g1,g2" for gc.set_threshold, or "python" for its defaults
DEFAULT = (50_000, 50, 100)


def tune(env: Mapping[str, str]) -> tuple[int, ...]:
    """Set the collector's thresholds from `VIGIL_GC_THRESHOLD` (else `DEFAULT`); returns them."""
    raw = env.get(GC_THRESHOLD_ENV, "").strip()
    if raw == "python":
        return gc.get_threshold()
    try:
        wanted = tuple(int(x) for x in raw.split(",")) if raw else DEFAULT
    except ValueError:
        raise SystemExit(f"{GC_THRESHOLD_ENV}={raw!r}: expected three integers, e.g. 50000,50,100") from None
    if len(wanted) != 3 or wanted[0] < 1 or min(wanted) < 0:
        raise SystemExit(f"{GC_THRESHOLD_ENV}={raw!r}: expected three integers, e.g. 50000,50,100")
    gc.set_threshold(*wanted)
    return wanted
