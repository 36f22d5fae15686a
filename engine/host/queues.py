"""The engine's requests by state: waiting (arrival order), running (admission order), draining.

Only the engine thread touches these. Moving a request between queues also sets its status,
so the two never disagree.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from tandem.engine.errors import InvalidRequestError
from tandem.engine.host import clock
from tandem.engine.host.sequence import SeqStatus, Sequence


class RequestQueues:
    def __init__(self) -> None:
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.draining: list[Sequence] = []  # last token in flight: unschedulable, blocks still held
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    def __len__(self) -> int:
        """Requests not yet finished, in any queue."""
        return len(self._by_id)

    def lookup(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
        seq.queue.arrival_index = next(self._arrivals)
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, queue_seconds: float | None) -> None:
        """A sample forked off a running one: it starts running, its prompt already computed."""
        if seq.request_id in self._by_id:
            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
        seq.queue.arrival_index = next(self._arrivals)
        self._by_id[seq.request_id] = seq
        seq.queue.queue_seconds = queue_seconds
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def admit(self, seq: Sequence) -> None:
        """Waiting -> running; the first admission ends its queueing time."""
        self.waiting.remove(seq)
        if seq.queue.queue_seconds is None:
            seq.queue.queue_seconds = clock.now() - seq.queue.arrival_time
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """Running -> waiting at its arrival place (a preemption); it keeps its generated tokens."""
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.queue.waiting_since = clock.now()
        seq.queue.num_preemptions += 1
        self.num_preemptions += 1
        keys = [s.queue.arrival_index for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.queue.arrival_index), seq)

    def drain(self, seq: Sequence) -> None:
        """Running -> draining: its last token is in flight, nothing more to schedule."""
        self.running.remove(seq)
        self.draining.append(seq)
        seq.status = SeqStatus.DRAINING

    def remove(self, seq: Sequence) -> None:
        """Out of whichever queue holds it, for good."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.DRAINING:
            self.draining.remove(seq)
        seq.status = SeqStatus.FINISHED
        del self._by_id[seq.request_id]
