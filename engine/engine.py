"""The offline engine: the core on its own thread, with blocking, streaming and abort APIs.

Assembly is `tandem.engine.build`; what crosses threads lives in `SharedState`
(tandem.engine.shared_state); the consumer adapters in tandem.engine.consumers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import IO

import structlog

from tandem.engine.build import EngineInfo, assemble
from tandem.engine.config import EngineConfig
from tandem.engine.consumers import Coalescer, Collector
from tandem.engine.device.executor import StepTrace
from tandem.engine.errors import (
    EngineDeadError,
    EngineHungError,
    InvalidRequestError,
    RequestRejectedError,
)
from tandem.engine.host.core import EngineCore
from tandem.engine.host.heap import collect_before_build, freeze_startup_heap, thaw_heap
from tandem.engine.host.kv_events import KvEventLog
from tandem.engine.host.scheduling import SchedulerPort
from tandem.engine.host.sequence import Sequence
from tandem.engine.host.threads import on_fresh_thread
from tandem.engine.model.loader import LoadedModel
from tandem.engine.request import (
    Completion,
    Constraint,
    GenerationRequest,
    OutputOptions,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)
from tandem.engine.shared_state import THROUGHPUT_WINDOW_S, SharedState, Sink
from tandem.engine.stats import EngineStats, Load

__all__ = ["THROUGHPUT_WINDOW_S", "Engine", "EngineInfo", "EngineStats", "Load", "Sink"]

log = structlog.get_logger("tandem.engine")
TOKENIZER_THREADS = 2  # bounded: a flood of long prompts queues here instead of taking the host

Command = tuple[str, "Sequence | str | None"]  # ("add", seq), ("abort", request id), ("stop", None)


class _Stopped(Exception):
    """The loop took the stop command."""


class Engine:
    """The offline engine. `scheduler` is a policy instance, usually from the plugin registry:
    `Engine(EngineConfig(model="tiny-llama"), schedulers.load_scheduler("fcfs"))`."""

    def __init__(self, config: EngineConfig | None, scheduler: SchedulerPort, **overrides) -> None:
        if not isinstance(scheduler, SchedulerPort):  # a tandem.schedulers.Scheduler
            raise TypeError(f"scheduler must be a Scheduler instance, got {scheduler!r}")
        self.config = replace(config or EngineConfig(), **overrides)
        collect_before_build()
        # Built on a thread that exits: see tandem.engine.host.threads.
        built: tuple[EngineCore, EngineInfo, LoadedModel] = on_fresh_thread(assemble, self.config, scheduler)
        self.core, self.info, self.model = built
        self.tokenizer = self.model.tokenizer
        self.scheduler_name = self.info.scheduler
        self.scheduler_options = dict(self.info.scheduler_options)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._shared = SharedState(self._counters())
        # Tokenizing a long prompt takes a while: async callers do it here, off their event loop.
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tandem-tokenize")
        freeze_startup_heap()
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()
        self.core.watch_ranks(lambda reason: self._fail(EngineDeadError(reason)))  # a follower died
        if self.config.step_timeout_s is not None:
            threading.Thread(target=self._watchdog, name="tandem-watchdog", daemon=True).start()

    # -- public API ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink, max_waiting: int | None = None) -> str:
        """Validate and enqueue; `sink` receives each RequestOutput (or an exception) on the
        engine thread. Raises InvalidRequestError at once for a bad request, and EngineBusyError
        when `max_waiting` requests already wait (checked and enqueued as one step)."""
        return self._submit(self.core.make_sequence(request), sink, max_waiting)

    def _submit(self, seq: Sequence, sink: Sink, max_waiting: int | None = None) -> str:
        self._shared.register(seq.request_id, seq.request.n, sink, max_waiting)
        self._commands.put(("add", seq))
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Idempotent; a finished or unknown request is left alone."""
        self._commands.put(("abort", request_id))

    def generate(
        self,
        prompts: Seq[str | list[int]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
        stopping: StoppingCriteria | Seq[StoppingCriteria] | None = None,
        output: OutputOptions | None = None,
        on_finish: Callable[[], None] | None = None,
        constraint: Constraint | Seq[Constraint | None] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion, batched together; results in prompt order.
        `on_finish` is called (on the engine thread) as each request finishes."""
        requests = [
            GenerationRequest(
                prompt=p,
                sampling=_nth(sampling, i, SamplingParams),
                stopping=_nth(stopping, i, StoppingCriteria),
                output=output or OutputOptions(),
                constraint=constraint if constraint is None or isinstance(constraint, Constraint) else constraint[i],
            )
            for i, p in enumerate(prompts)
        ]
        seqs = [self.core.make_sequence(r) for r in requests]  # validate all before running any
        collectors = [Collector(on_finish) for _ in requests]
        for seq, c in zip(seqs, collectors):
            self._submit(seq, c)
        return [c.result() for c in collectors]

    async def stream(self, request: GenerationRequest, max_waiting: int | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come, until all its `n` samples finish (each
        output says which sample: `index`); leaving early aborts the request.

        The engine never waits for a slow consumer: outputs it has not taken yet are merged
        into one per sample (tokens, text and logprobs concatenated), so nothing queues up per token.
        """
        loop = asyncio.get_running_loop()
        pending = Coalescer()

        def sink(out: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(pending.put, out)

        seq = await loop.run_in_executor(self._tokenizers, self.core.make_sequence, request)
        request_id = self._submit(seq, sink, max_waiting)
        left = request.n
        try:
            while left:
                for out in await pending.take():
                    if isinstance(out, BaseException):
                        left = 0
                        raise out
                    left -= out.finished
                    yield out
        finally:
            if left:
                self.abort(request_id)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids for `text`, computed off the caller's event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizers, functools.partial(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        )

    async def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """`messages` through the model's chat template, ready for the assistant's turn, as
        token ids (off the caller's event loop). No template: refused, never a guessed format."""
        if not messages:
            raise InvalidRequestError("messages", "give at least one message")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages", f"the model {self.info.model_name!r} has no chat template")

        def render() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template's own error, e.g. a role it refuses
                raise InvalidRequestError("messages", f"the chat template failed: {exc}") from None
            # The template writes its special tokens itself.
            return list(self.tokenizer.encode(text, add_special_tokens=False))

        return await asyncio.get_running_loop().run_in_executor(self._tokenizers, render)

    @property
    def attention(self) -> str:
        """How attention reads the KV cache (triton, cpu-kernel, gather)."""
        return self.info.attention

    @property
    def kv_bytes_per_rank(self) -> list[int]:
        """Each rank's KV pool in bytes (one entry without tensor parallelism)."""
        return list(self.info.kv_bytes_per_rank)

    @property
    def graph_buckets(self) -> list[int]:
        """Decode batch sizes that replay a captured CUDA graph (none when graphs are off)."""
        return list(self.info.graph_buckets)

    @property
    def dead(self) -> BaseException | None:
        return self._shared.dead

    def stats(self) -> EngineStats:
        """A consistent snapshot, safe from any thread."""
        return self._shared.stats()

    @property
    def kv_events(self) -> KvEventLog | None:
        """The prefix cache's stored and removed blocks, for routers (None: caching is off)."""
        return self.core.kv_events

    def load(self) -> Load:
        return self.stats().load()

    def grammar_accepts(self, constraint: Constraint, tokens: list[int]) -> bool:
        """Whether `constraint`'s grammar accepts `tokens` from its start (a fresh matcher; checks)."""
        state = self.core.grammars.state(constraint)
        return all(state.consume(token) for token in tokens)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks: runs that must not reuse each other's prompts).
        Call while the engine is idle: the pool belongs to the engine thread."""
        self.core.clear_prefix_cache()

    def trace_steps(self) -> list[StepTrace]:
        """Start recording each step's shape into the list returned (call while idle)."""
        return self.core.trace_steps()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop; with a timeout, a wedged engine thread is left behind (it is a
        daemon) rather than joined forever."""
        self._commands.put(("stop", None))
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("engine_thread_wedged", timeout_seconds=timeout)
            return
        self.core.close()
        thaw_heap()  # this engine's model and pools may be freed only by a collection

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        trace = open(self.config.step_trace, "a") if self.config.step_trace else None
        steps = self.core.trace_steps() if trace is not None else []
        try:
            self._run(trace, steps)
        finally:
            if trace is not None:
                trace.close()

    def _run(self, trace: IO[str] | None, steps: list[StepTrace]) -> None:
        while True:
            taken = 0
            try:
                if not self.core.has_work():
                    self.core.pause_device()
                taken += self._apply(self._commands.get(block=not self.core.has_work()))
                while True:
                    taken += self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            except _Stopped:
                return
            except BaseException as exc:  # noqa: BLE001 - every request must hear of it
                self._fail(exc)
                return
            if not self.core.has_work():
                self._publish(taken)
                continue
            started = self._shared.step_began()
            try:
                outputs = self.core.step()
            except BaseException as exc:  # noqa: BLE001 - every request must hear of it
                self._fail(exc)
                return
            finally:
                self._shared.step_ended()
            if trace is not None:
                _trace(trace, steps, started, time.monotonic() - started)
            if self._shared.dead is not None:  # the watchdog gave up on this step meanwhile
                return
            self._shared.count(sum(len(o.token_ids) for o in outputs))
            self._publish(taken)
            for out in outputs:
                self._deliver(out)

    def _watchdog(self) -> None:
        """Fail every request if one step runs past step_timeout_s: a wedged device or kernel
        must end streams with a status, not leave them hanging."""
        timeout = self.config.step_timeout_s
        assert timeout is not None, "started only with a step timeout"
        while self._shared.dead is None:
            time.sleep(min(1.0, timeout / 4))
            running = self._shared.step_running_for()
            if running is not None and running > timeout:
                self._fail(EngineHungError(f"an engine step has run for over {timeout:g} s"))
                return

    def _counters(self) -> EngineStats:
        """The core's counters now; the throughput is filled in by stats()."""
        return EngineStats.read(self.core)

    def _publish(self, taken: int) -> None:
        """A new snapshot; the `taken` requests it now counts as waiting leave `_queued` at
        the same moment, so none is ever counted twice or not at all."""
        self._shared.publish(self._counters(), taken)

    def _apply(self, command: Command) -> int:
        """Carry out one command; returns how many requests it added to the core."""
        kind, arg = command
        if kind == "stop":
            self._fail(EngineDeadError("the engine was shut down"))
            raise _Stopped
        if kind == "add":
            assert isinstance(arg, Sequence)
            try:
                self.core.add(arg)
            except BaseException:
                self._shared.unqueue()
                raise
            return 1
        assert isinstance(arg, str)
        for out in self.core.abort(arg):
            self._deliver(out)
        return 0

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._shared.sink_for(out)
        if sink is None:
            return
        try:
            sink(RequestRejectedError(*out.rejected) if out.rejected else out)
        except Exception as exc:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.warning("sink_failed", request_id=out.request_id, error=repr(exc))
            if not out.finished:
                self._shared.drop(out.request_id)
                self.core.abort(out.request_id)
                self._publish(0)  # the engine may go idle next: the snapshot must show the freed blocks

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, EngineDeadError) or isinstance(exc, EngineHungError):
            log.error("engine_failed", error=repr(exc))
        sinks = self._shared.fail(exc)  # None: the engine had already failed
        if sinks is None:
            return
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine step failed: {exc!r}")
        for sink in sinks:
            try:
                sink(error)
            except Exception:  # noqa: BLE001
                pass


def _nth(value, i: int, default_factory):
    if value is None:
        return default_factory()
    if isinstance(value, (list, tuple)):
        return value[i]
    return value


def _trace(out: IO[str], steps: list[StepTrace], started: float, seconds: float) -> None:
    """Append the steps traced since the last call, with this step's start and wall time."""
    for step in steps:
        out.write(json.dumps({**asdict(step), "started": started, "wall_seconds": seconds}) + "\n")
    steps.clear()
    out.flush()
