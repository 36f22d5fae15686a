"""Everything `Engine` shares between threads, behind one lock.

Threads: callers (submit, stats), the engine thread (publish, deliver, step timing), the
watchdog and the tensor-parallel watcher (fail). Invariants, each kept under the lock:
- a request id has a sink exactly while some of its samples are unfinished (`_open` > 0), and
  never after the engine failed: `fail` takes every sink at once, so each hears once;
- `_queued` counts requests submitted but not yet in the published snapshot: `publish` swaps the
  snapshot and subtracts what it now counts in one step, so none is counted twice or not at all;
- once `dead` is set it never changes (the first failure wins);
- `step_started` is set only while the engine thread is inside `core.step()`.
Sinks are called outside the lock: a consumer may call back into the engine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from tandem.engine.errors import EngineBusyError, EngineDeadError, InvalidRequestError
from tandem.engine.request import RequestOutput
from tandem.engine.stats import EngineStats

THROUGHPUT_WINDOW_S = 10.0

Sink = Callable[[RequestOutput | BaseException], None]


class SharedState:
    def __init__(self, snapshot: EngineStats) -> None:
        self._lock = threading.Lock()
        self._sinks: dict[str, Sink] = {}
        self._open: dict[str, int] = {}  # samples not yet finished, per request with a sink
        self._queued = 0  # submitted, not yet in a published snapshot
        self._snapshot = snapshot
        self._recent: deque[tuple[float, int]] = deque()  # (time, output tokens) per step
        self._dead: BaseException | None = None
        self._step_started: float | None = None

    # -- requests --------------------------------------------------------------------------
    def register(self, request_id: str, samples: int, sink: Sink, max_waiting: int | None) -> None:
        """Take a request in (or raise): the checks and the registration are one step."""
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError("the engine has failed") from self._dead
            if max_waiting is not None and self._snapshot.waiting + self._queued >= max_waiting:
                raise EngineBusyError(max_waiting)
            if request_id in self._sinks:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
            self._sinks[request_id] = sink
            self._open[request_id] = samples
            self._queued += 1

    def unqueue(self) -> None:
        """A submitted request the core refused to add."""
        with self._lock:
            self._queued -= 1

    def sink_for(self, out: RequestOutput) -> Sink | None:
        """The request's sink; forgets it when `out` finishes its last sample."""
        with self._lock:
            sink = self._sinks.get(out.request_id)
            if out.finished and sink is not None:
                self._open[out.request_id] -= 1
                if not self._open[out.request_id]:
                    del self._sinks[out.request_id], self._open[out.request_id]
            return sink

    def drop(self, request_id: str) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)
            self._open.pop(request_id, None)

    # -- failure ---------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> list[Sink] | None:
        """Mark the engine dead; the sinks to tell, or None when it had already failed
        (the loop, the watchdog and the TP watcher may all get here)."""
        with self._lock:
            if self._dead is not None:
                return None
            self._dead = exc
            sinks, self._sinks, self._open = list(self._sinks.values()), {}, {}
            return sinks

    @property
    def dead(self) -> BaseException | None:
        with self._lock:
            return self._dead

    # -- step timing (the watchdog) --------------------------------------------------------
    def step_began(self) -> float:
        started = time.monotonic()
        with self._lock:
            self._step_started = started
        return started

    def step_ended(self) -> None:
        with self._lock:
            self._step_started = None

    def step_running_for(self) -> float | None:
        """Seconds the current step has run, None between steps."""
        with self._lock:
            started = self._step_started
        return None if started is None else time.monotonic() - started

    # -- stats -----------------------------------------------------------------------------
    def count(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()

    def publish(self, snapshot: EngineStats, taken: int) -> None:
        """A new snapshot, which now counts the `taken` requests as waiting."""
        with self._lock:
            self._snapshot = snapshot
            self._queued -= taken

    def stats(self) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            tokens = sum(n for t, n in self._recent if t >= now - THROUGHPUT_WINDOW_S)
            snap = self._snapshot
            return replace(
                snap, waiting=snap.waiting + self._queued, output_tokens_per_second=tokens / THROUGHPUT_WINDOW_S
            )
