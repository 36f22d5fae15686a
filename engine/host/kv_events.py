"""What the prefix cache holds, as events a router can follow: full blocks stored (findable by
later requests) and removed (evicted or cleared). Routers that see them (smg's cache-aware
policy) send requests to the replica that already holds their prefix."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    block_hash: int  # opaque, stable for this process; chained to the parent's
    parent_hash: int | None  # the block before it in its sequence; None for a first block
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class BlockRemoved:
    block_hash: int


KvEvent = BlockStored | BlockRemoved


class KvEventLog:
    """Written by the engine thread, read by any other. Keeps the cached blocks now (for a
    subscriber's first snapshot) and the last `max_events` changes, numbered from 1."""

    def __init__(self, max_events: int = 65536) -> None:
        self._lock = threading.Lock()
        self._events: deque[KvEvent] = deque(maxlen=max_events)
        self._next = 1  # the id the next event gets
        self._cached: dict[int, BlockStored] = {}  # in the order they were stored

    def stored(self, block_hash: int, parent_hash: int | None, token_ids: list[int]) -> None:
        event = BlockStored(block_hash, parent_hash, tuple(token_ids))
        with self._lock:
            self._cached[block_hash] = event
            self._append(event)

    def removed(self, block_hash: int) -> None:
        with self._lock:
            if self._cached.pop(block_hash, None) is not None:
                self._append(BlockRemoved(block_hash))

    def _append(self, event: KvEvent) -> None:
        self._events.append(event)
        self._next += 1

    def snapshot(self) -> tuple[int, list[BlockStored]]:
        """(the id of the next event, every block cached now, in the order they were stored:
        a parent before its children, unless the parent was evicted and stored again)."""
        with self._lock:
            return self._next, list(self._cached.values())

    def since(self, event_id: int) -> tuple[int, list[KvEvent]] | None:
        """(the id of the next event, the events from `event_id` on); None when some of
        those have been dropped already (the reader takes a new snapshot)."""
        with self._lock:
            first = self._next - len(self._events)
            if event_id < first:
                return None
            return self._next, list(itertools.islice(self._events, event_id - first, None))
