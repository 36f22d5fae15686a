"""The engine thread's clock: time.monotonic(), unless a simulator (tandem sim) runs the core in
virtual time. Arrival, queueing, token and deadline times all read it, so policies that look
at the time behave in a simulation as they would for real."""

from __future__ import annotations

import time
from collections.abc import Callable

_source: Callable[[], float] = time.monotonic


def now() -> float:
    return _source()


def use(source: Callable[[], float] | None) -> None:
    """Read time from `source` (None: time.monotonic again). Process-wide: for a simulator."""
    global _source
    _source = source or time.monotonic
