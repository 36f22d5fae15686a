"""The engine's side of the scheduling seam: the port the core calls, and the plan it gets back.

The core knows no plugin API. Each step it asks its scheduler for a `StepPlan` over the
request queues and the KV accounting, and tells it when a request arrives, when one finishes
and when a step's tokens reach the host. `tandem.schedulers.Scheduler` implements this port
(the plugin API lives there, in tandem.schedulers.api); the `engine_` prefix keeps the
port's methods apart from anything a plugin defines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tandem.engine.host.kv_accounting import KVAccounting
from tandem.engine.host.queues import RequestQueues
from tandem.engine.host.sequence import Sequence


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step's decisions. The scheduler has already admitted the scheduled requests and
    reserved their blocks (through the queues and the KV accounting it was given)."""

    scheduled: list[tuple[Sequence, int]]  # run this many tokens of each, rows in this order
    rejected: list[tuple[Sequence, str, str]]  # refused before running: (request, kind, reason)
    label: str  # the scheduler's name, for the rejections' errors


@runtime_checkable
class SchedulerPort(Protocol):
    """What the core needs of a scheduler."""

    @property
    def overlap(self) -> bool:
        """Run steps pipelined: plan N+1 while N computes."""
        ...

    @property
    def engine_label(self) -> str:
        """The name errors and logs give it."""
        ...

    @property
    def loaded_with(self) -> Mapping[str, object]:
        """The options it was loaded with (reported, never interpreted)."""
        ...

    def engine_plan(
        self, queues: RequestQueues, kv: KVAccounting, max_batch_tokens: int, max_num_seqs: int, step_index: int
    ) -> StepPlan: ...

    def engine_request_added(self, kv: KVAccounting, seq: Sequence) -> None: ...

    def engine_request_finished(self, kv: KVAccounting, seq: Sequence, reason: str) -> None: ...

    def engine_step_done(
        self, kv: KVAccounting, step_index: int, rows: list[tuple[Sequence, int]], seconds: float
    ) -> None: ...
