"""The scheduler plugin API: `Scheduler`, the `StepContext` it decides through, `RequestView`.

Each step the core asks its scheduler for a plan; `Scheduler` answers by handing the plugin a
`StepContext`. The plugin reads the waiting and running requests (as read-only `RequestView`s)
and the step's limits, then decides by calling `ctx.schedule(request, n)` (run n tokens of it
this step: a prefill chunk, or 1 to decode; a waiting request is admitted by it) and
`ctx.preempt(request)` (free a running request's KV; it waits again at its arrival place and
keeps its generated tokens). Every call is checked against the token budget, the sequence
limit and the free KV blocks, so a plugin cannot corrupt the core's bookkeeping: a call that
breaks a limit raises `SchedulerError` naming the plugin, and the blocks are reserved by the
core, exactly, as each call succeeds.

The engine sees none of this: it calls the `SchedulerPort` methods (`engine_*`,
tandem.engine.host.scheduling) that `Scheduler` implements here. Plugin authors import from
the `tandem.schedulers` package, which re-exports this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, NoReturn

from tandem.engine.errors import TandemError
from tandem.engine.host import clock
from tandem.engine.host.kv_accounting import KVAccounting
from tandem.engine.host.queues import RequestQueues
from tandem.engine.host.scheduling import StepPlan
from tandem.engine.host.sequence import SeqStatus, Sequence

API_VERSION = 2
SUPPORTED_API_VERSIONS = (1, 2)  # version 1 plugins load unchanged: every version 2 addition has a default


class SchedulerError(TandemError):
    """A scheduler plugin made a decision the core refuses."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"scheduler '{plugin}': {message}")
        self.plugin = plugin


class Scheduler(ABC):
    """Base class of every scheduling policy. Subclasses set `name` and implement `schedule`.

    Keyword arguments of `__init__` are the policy's options (`--scheduler-opt key=value`).
    """

    name: ClassVar[str] = ""
    api_version: ClassVar[int] = API_VERSION
    uses_priority: bool = False  # whether GenerationRequest.priority changes decisions
    overlap: ClassVar[bool] = False  # run steps pipelined: plan N+1 while N computes (async-overlap)
    # The options it was loaded with, as given (GetServerInfo reports them). Set by the registry's
    # load_scheduler under a name a plugin is unlikely to use for its own state.
    loaded_with: Mapping[str, object] = MappingProxyType({})
    __views: _Views  # the engine's side: see _engine_views

    @abstractmethod
    def schedule(self, ctx: StepContext) -> None:
        """Decide this step through `ctx.schedule` and `ctx.preempt`."""

    # -- API version 2: optional hooks, each with a default --------------------------------------
    def select_victim(self, ctx: StepContext, candidates: list[RequestView]) -> RequestView:
        """Which of `candidates` (running, not scheduled this step, in admission order) to
        preempt when KV runs short; the building blocks ask through `ctx.choose_victim`.
        Default: the most recently admitted."""
        return candidates[-1]

    def on_request_added(self, request: RequestView) -> None:
        """A request arrived (it is waiting); called on the engine thread before the next step."""
        return None

    def on_request_finished(self, request: RequestView, reason: str) -> None:
        """A request left for good: its finish reason (`length`, `eos`, `stop_token`,
        `stop_string`, or `aborted`). Its view still reads its last state."""
        return None

    def on_step_done(self, report: StepReport) -> None:
        """A step's tokens reached the host: what ran and how long it took."""
        return None

    # -- the engine's side (tandem.engine.host.scheduling.SchedulerPort); plugins leave these be --
    @property
    def engine_label(self) -> str:
        """The name errors and logs give it."""
        return self.name or type(self).__name__

    def engine_plan(
        self, queues: RequestQueues, kv: KVAccounting, max_batch_tokens: int, max_num_seqs: int, step_index: int
    ) -> StepPlan:
        """Run the plugin's `schedule` over a fresh context; its decisions, in the engine's terms."""
        views = self._engine_views()
        ctx = StepContext(queues, kv, max_batch_tokens, max_num_seqs, step_index, self, views)
        self.schedule(ctx)
        scheduled = [(view._seq, n) for view, n in ctx.scheduled]
        views.planned(scheduled)
        rejected = [(view._seq, kind, reason) for view, kind, reason in ctx.rejected]
        return StepPlan(scheduled, rejected, self.engine_label)

    def engine_request_added(self, kv: KVAccounting, seq: Sequence) -> None:
        self.on_request_added(self._engine_views().of(seq, kv))

    def engine_request_finished(self, kv: KVAccounting, seq: Sequence, reason: str) -> None:
        views = self._engine_views()
        self.on_request_finished(views.of(seq, kv), reason)
        views.finished(seq)

    def engine_step_done(
        self, kv: KVAccounting, step_index: int, rows: list[tuple[Sequence, int]], seconds: float
    ) -> None:
        views = self._engine_views()
        self.on_step_done(StepReport(step_index, [(views.of(seq, kv), n) for seq, n in rows], seconds))
        views.reported(rows)

    def _engine_views(self) -> _Views:
        # NOTE: made on first use, not in __init__: plugins need not call super().__init__().
        try:
            return self.__views
        except AttributeError:
            self.__views = _Views()
            return self.__views


@dataclass(frozen=True)
class StepReport:
    """One completed step, for `Scheduler.on_step_done`."""

    step_index: int
    rows: list[tuple[RequestView, int]]  # what ran, and how many tokens of each
    seconds: float  # from its launch until its tokens were on the host


class RequestView:
    """Read-only, live view of one request as the scheduler may see it."""

    __slots__ = ("_seq", "_kv")

    def __init__(self, seq: Sequence, kv: KVAccounting) -> None:
        self._seq = seq
        self._kv = kv

    def __repr__(self) -> str:
        s = self._seq
        return f"RequestView({s.request_id!r}, {s.status.value}, computed={s.kv.num_computed}/{s.num_tokens})"

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    @property
    def arrival_time(self) -> float:
        """time.monotonic() when the engine received it."""
        return self._seq.queue.arrival_time

    @property
    def arrival_index(self) -> int:
        """Strictly increasing in arrival order; preemption keeps it."""
        return self._seq.queue.arrival_index

    @property
    def priority(self) -> int:
        """From the request; larger means more urgent. Only some policies use it."""
        return self._seq.request.priority

    @property
    def is_running(self) -> bool:
        return self._seq.status is SeqStatus.RUNNING

    @property
    def prompt_len(self) -> int:
        return self._seq.num_prompt

    @property
    def generated_len(self) -> int:
        return self._seq.num_output

    @property
    def max_new_tokens(self) -> int:
        return self._seq.request.stopping.max_new_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what must be in the KV cache before the next token."""
        return self._seq.num_tokens

    @property
    def num_computed(self) -> int:
        """Tokens whose K/V is in the cache (0 for a waiting request)."""
        return self._seq.kv.num_computed

    @property
    def cached_prefix_len(self) -> int:
        """Tokens a prefix-cache hit would skip if this waiting request were admitted now."""
        if self.is_running:
            return self._seq.kv.num_computed
        return self._kv.prefix_hit_blocks(self._seq)[0] * self._kv.block_size

    @property
    def remaining(self) -> int:
        """Tokens still to compute before this request can sample (1 when decoding)."""
        return self._seq.num_tokens - (self._seq.kv.num_computed if self.is_running else self.cached_prefix_len)

    @property
    def is_decoding(self) -> bool:
        return self.is_running and self._seq.num_uncomputed == 1 and self._seq.num_output > 0

    @property
    def blocks_held(self) -> int:
        return len(self._seq.kv.block_table)

    @property
    def num_preemptions(self) -> int:
        return self._seq.queue.num_preemptions

    # -- API version 2 ---------------------------------------------------------------------
    @property
    def tenant(self) -> str:
        """Who sent it (the service's `x-tenant-id`, or the bearer token's name); "" if unknown."""
        return self._seq.request.tenant

    @property
    def deadline(self) -> float | None:
        """time.monotonic() by which its first token is due (the RPC's deadline), or None."""
        return self._seq.request.deadline

    @property
    def waiting_seconds(self) -> float:
        """Seconds since it last started waiting (arrival or its latest preemption); 0 while running."""
        return 0.0 if self.is_running else clock.now() - self._seq.queue.waiting_since

    @property
    def since_last_token(self) -> float | None:
        """Seconds since its latest token reached the host (None before the first)."""
        last = self._seq.output.last_token_time
        return None if last is None else clock.now() - last


@dataclass(slots=True)
class _Views:
    """One view per request, from its arrival to its finish (preemption keeps it): plugins
    compare views by identity and key their own state by them. A request that finishes while
    a step it is in has not been reported yet keeps its view until that report."""

    by_seq: dict[Sequence, RequestView] = field(default_factory=dict)
    in_flight: dict[Sequence, int] = field(default_factory=dict)  # planned steps not yet reported, per request
    gone: set[Sequence] = field(default_factory=set)  # finished, still in a step in flight

    def of(self, seq: Sequence, kv: KVAccounting) -> RequestView:
        """Its view, made on first sight (a scheduler swapped in mid-way meets requests it
        never saw added)."""
        view = self.by_seq.get(seq)
        if view is None:
            view = self.by_seq[seq] = RequestView(seq, kv)
        return view

    def planned(self, rows: list[tuple[Sequence, int]]) -> None:
        for seq, _ in rows:
            self.in_flight[seq] = self.in_flight.get(seq, 0) + 1

    def finished(self, seq: Sequence) -> None:
        if seq in self.in_flight:
            self.gone.add(seq)
        else:
            self.by_seq.pop(seq, None)

    def reported(self, rows: list[tuple[Sequence, int]]) -> None:
        for seq, _ in rows:
            left = self.in_flight.pop(seq, 1) - 1
            if left > 0:
                self.in_flight[seq] = left
            elif seq in self.gone:
                self.gone.discard(seq)
                self.by_seq.pop(seq, None)


class StepContext:
    """What one step may use, and the only way to spend it. It sees the request queues, the
    step's limits and the KV accounting, nothing else of the engine."""

    def __init__(
        self,
        queues: RequestQueues,
        kv: KVAccounting,
        max_batch_tokens: int,
        max_num_seqs: int,
        step_index: int,
        scheduler: Scheduler,
        views: _Views,
    ) -> None:
        self._queues = queues
        self._kv = kv
        self._scheduler = scheduler
        self._views = views
        self._max_num_seqs = max_num_seqs
        self.token_budget = max_batch_tokens  # tokens left this step
        self.seq_budget = max_num_seqs  # sequences left this step
        self.scheduled: list[tuple[RequestView, int]] = []
        self.rejected: list[tuple[RequestView, str, str]] = []  # (request, kind, reason)
        self._scheduled_ids: set[str] = set()
        self.step_index = step_index
        self.now = clock.now()

    # -- what the scheduler sees -----------------------------------------------------------
    @property
    def waiting(self) -> list[RequestView]:
        """Waiting requests in arrival order (preempted ones at their original place)."""
        return [self._views.of(s, self._kv) for s in self._queues.waiting]

    @property
    def running(self) -> list[RequestView]:
        """Running requests in admission order."""
        return [self._views.of(s, self._kv) for s in self._queues.running]

    @property
    def block_size(self) -> int:
        return self._kv.block_size

    @property
    def total_blocks(self) -> int:
        return self._kv.blocks.num_blocks

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take now, evictable cached ones included."""
        return self._kv.blocks.num_free

    @property
    def evictable_blocks(self) -> int:
        return self._kv.blocks.num_evictable

    def is_scheduled(self, request: RequestView) -> bool:
        return request.request_id in self._scheduled_ids

    def blocks_needed(self, request: RequestView, num_tokens: int) -> int:
        """Free blocks `schedule(request, num_tokens)` would consume, exactly."""
        return self._kv.blocks_needed(self._seq(request), num_tokens)

    def fits(self, request: RequestView, num_tokens: int) -> bool:
        return self.blocks_needed(request, num_tokens) <= self.free_blocks

    # -- decisions -------------------------------------------------------------------------
    def schedule(self, request: RequestView, num_tokens: int) -> None:
        """Run `num_tokens` of `request` this step (clamped to what it has left to compute).
        A waiting request is admitted: it takes its prefix-cache hits and starts running."""
        seq = self._seq(request)
        if request.request_id in self._scheduled_ids:
            self._refuse(f"request {request.request_id!r} is already scheduled this step")
        if any(r is request for r, _, _ in self.rejected):
            self._refuse(f"request {request.request_id!r} was rejected this step")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            self._refuse(f"token count for {request.request_id!r} must be a positive integer, got {num_tokens!r}")
        num_tokens = min(num_tokens, request.remaining)
        if num_tokens > self.token_budget:
            self._refuse(
                f"{num_tokens} tokens for {request.request_id!r} exceed the step's remaining budget "
                f"of {self.token_budget}"
            )
        if self.seq_budget < 1:
            self._refuse(f"{request.request_id!r} exceeds the step's limit of {self._max_num_seqs} sequences")
        needed = self.blocks_needed(request, num_tokens)
        if needed > self.free_blocks:
            self._refuse(
                f"{request.request_id!r} needs {needed} KV blocks, only {self.free_blocks} are free "
                "(check ctx.fits and preempt first)"
            )
        if seq.status is SeqStatus.WAITING:
            self._kv.take_prefix_hits(seq)
            self._queues.admit(seq)
        num_tokens = self._kv.reserve(seq, num_tokens)
        self.token_budget -= num_tokens
        self.seq_budget -= 1
        self.scheduled.append((request, num_tokens))
        self._scheduled_ids.add(request.request_id)

    def reject(self, request: RequestView, reason: str, kind: str = "deadline") -> None:
        """Refuse a waiting request instead of running it: it ends at once, and its caller gets
        DEADLINE_EXCEEDED (`kind` "deadline") or RESOURCE_EXHAUSTED ("overload") with `reason`."""
        self._seq(request)
        if request.is_running:
            self._refuse(f"cannot reject {request.request_id!r}: it is running (preempt it instead)")
        if kind not in ("deadline", "overload"):
            self._refuse(f"reject kind must be 'deadline' or 'overload', got {kind!r}")
        if any(r is request for r, _, _ in self.rejected):
            self._refuse(f"{request.request_id!r} is already rejected this step")
        self.rejected.append((request, kind, reason))

    def choose_victim(self, candidates: list[RequestView]) -> RequestView:
        """The scheduler's `select_victim` among `candidates`, checked to be one of them."""
        if not candidates:
            self._refuse("choose_victim needs at least one candidate")
        victim = self._scheduler.select_victim(self, list(candidates))
        if not any(victim is c for c in candidates):
            self._refuse(f"select_victim returned {victim!r}, not one of the candidates")
        return victim

    def preempt(self, request: RequestView) -> None:
        """Free a running request's KV blocks; it waits again and recomputes later."""
        seq = self._seq(request)
        if not request.is_running:
            self._refuse(f"cannot preempt {request.request_id!r}: it is not running")
        if request.request_id in self._scheduled_ids:
            self._refuse(f"cannot preempt {request.request_id!r}: it is already scheduled this step")
        self._queues.requeue(seq)
        self._kv.release(seq)

    def _seq(self, request: RequestView) -> Sequence:
        if not isinstance(request, RequestView) or request._kv is not self._kv:
            self._refuse(f"{request!r} is not a request of this engine")
        seq = request._seq
        if self._queues.lookup(seq.request_id) is not seq:
            self._refuse(f"request {seq.request_id!r} is finished, aborted or unknown")
        return seq

    def _refuse(self, message: str) -> NoReturn:
        raise SchedulerError(self._scheduler.engine_label, message)
