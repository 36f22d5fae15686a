"""The offline engine: the core on its own thread, with blocking, streaming and abort APIs."""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import IO, Any

import structlog
import torch

from tandem.engine.config import CPU_DEFAULT_KV_GB, EngineConfig
from tandem.engine.device.executor import Executor
from tandem.engine.device.executor_worker import WorkerExecutor
from tandem.engine.device.kv_cache import KVCache, KVLayout, cuda_budget_bytes, num_blocks_for
from tandem.engine.device.tensor_parallel import TensorParallel, check_devices, gather, rank_device
from tandem.engine.device.warmup import step_peak_bytes
from tandem.engine.errors import (
    EngineBusyError,
    EngineDeadError,
    EngineHungError,
    InvalidRequestError,
    RequestRejectedError,
)
from tandem.engine.host.block_manager import BlockManager
from tandem.engine.host.core import EngineCore
from tandem.engine.host.heap import collect_before_build, freeze_startup_heap, thaw_heap
from tandem.engine.host.kv_events import KvEventLog
from tandem.engine.host.scheduling import SchedulerPort
from tandem.engine.host.sequence import Sequence
from tandem.engine.host.threads import on_fresh_thread
from tandem.engine.model.loader import LoadedModel, check_tensor_parallel, load_model
from tandem.engine.request import (
    Completion,
    Constraint,
    GenerationRequest,
    ModelLimits,
    OutputOptions,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)

log = structlog.get_logger("tandem.engine")
THROUGHPUT_WINDOW_S = 10.0
TOKENIZER_THREADS = 2  # bounded: a flood of long prompts queues here instead of taking the host


@dataclass(frozen=True)
class Load:
    """What a load balancer needs (the fields of tandem.v1's GetLoadResponse)."""

    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_free: int
    kv_blocks_total: int
    output_tokens_per_second: float


@dataclass(frozen=True)
class EngineStats(Load):
    """Load plus the engine's counters since start, for metrics. A snapshot: the engine thread
    publishes one after each step and each batch of commands, and other threads read only it."""

    steps: int = 0
    step_tokens: int = 0  # tokens computed in steps
    device_busy_seconds: float = 0.0
    device_idle_seconds: float = 0.0  # gaps between busy periods while work was pending
    host_prepare_seconds: float = 0.0
    preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0

    @property
    def device_idle_fraction(self) -> float:
        total = self.device_busy_seconds + self.device_idle_seconds
        return self.device_idle_seconds / total if total else 0.0


Sink = Callable[[RequestOutput | BaseException], None]
Command = tuple[str, "Sequence | str | None"]  # ("add", seq), ("abort", request id), ("stop", None)


class _Stopped(Exception):
    """The loop took the stop command."""


def make_executor(loaded: LoadedModel, kv: KVCache, seed: int, overlap: bool, attention: str = "auto") -> Executor:
    """Synchronous, or for overlap a background one: a worker thread on the CPU, streams on CUDA."""
    kind: type[Executor] = Executor
    if overlap and loaded.device.type == "cuda":
        from tandem.engine.device.executor_cuda import CudaExecutor

        kind = CudaExecutor
    elif overlap:
        kind = WorkerExecutor
    return kind(loaded.model, kv, loaded.device, seed, attention)


def build_core(config: EngineConfig, scheduler: SchedulerPort) -> tuple[EngineCore, LoadedModel]:
    """Load the model, size and allocate the KV pools, and wire the core together."""
    try:
        return _build_core(config, scheduler)
    except torch.OutOfMemoryError as exc:
        reason = str(exc).splitlines()[0]
        raise ValueError(
            f"out of device memory starting {config.model!r}: {reason} Give it a device with more free memory, "
            "a smaller dtype, or smaller --max-batch-tokens / --max-num-seqs / --kv-cache-fraction"
        ) from None


def _build_core(config: EngineConfig, scheduler: SchedulerPort) -> tuple[EngineCore, LoadedModel]:
    config.validate()
    tp = None
    if config.tensor_parallel > 1:
        check_tensor_parallel(config.model, config.tensor_parallel)
        check_devices(config)
        tp = TensorParallel(config, scheduler.overlap, build_follower)  # the followers load alongside
    try:
        return _build_leader(config, scheduler, tp)
    except BaseException:
        if tp is not None:
            tp.close()
        raise


def kv_layout(loaded: LoadedModel, config: EngineConfig) -> KVLayout:
    """This rank's KV pool layout: under tensor parallelism its share of the KV heads."""
    text = loaded.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return KVLayout(
        text.num_hidden_layers, kv_heads // config.tensor_parallel, head_dim, config.block_size, loaded.dtype
    )


def kv_blocks(config: EngineConfig, loaded: LoadedModel, layout: KVLayout) -> int:
    """How many KV blocks this rank's budget holds (every rank runs this: on CUDA it measures a forward)."""
    if config.kv_cache_gb is not None:
        budget = config.kv_cache_gb * 2**30
    elif loaded.device.type == "cuda":
        tokens = min(config.max_batch_tokens, loaded.max_model_len)
        peak = step_peak_bytes(loaded.model, layout, loaded.device, tokens, config.max_num_seqs, config.attention)
        budget = cuda_budget_bytes(loaded.device, config.kv_cache_fraction, reserve=peak)
    else:
        budget = CPU_DEFAULT_KV_GB * 2**30
    # More than every slot filled to the context length can never be used.
    num_blocks = config.kv_blocks or num_blocks_for(layout, budget, config.max_num_seqs * loaded.max_model_len)
    if not config.kv_blocks and num_blocks * config.block_size < min(loaded.max_model_len, config.max_batch_tokens):
        raise ValueError(
            f"the KV cache would hold {num_blocks * config.block_size} tokens ({budget / 2**30:.2f} GiB on "
            f"{loaded.device} after the model and one step's activations): too few for one full step; give "
            "more memory (--kv-cache-gb, --kv-cache-fraction), a smaller --max-batch-tokens or dtype"
        )
    return num_blocks


def build_follower(config: EngineConfig, control: Any) -> Executor:
    """A tensor-parallel follower's executor: its shard, and a KV pool of as many blocks as every rank holds."""
    loaded = load_model(config.model, config.dtype, config.device, config.tensor_parallel)
    layout = kv_layout(loaded, config)
    kv = KVCache(layout, min(gather(kv_blocks(config, loaded, layout), control)), loaded.device)
    gather(kv.nbytes, control)  # in step with rank 0, which reports every rank's pool
    executor = Executor(loaded.model, kv, loaded.device, config.seed, config.attention)
    freeze_startup_heap()
    return executor


def _build_leader(
    config: EngineConfig, scheduler: SchedulerPort, tp: TensorParallel | None
) -> tuple[EngineCore, LoadedModel]:
    device = str(rank_device(config, 0)) if tp is not None else config.device
    loaded = load_model(config.model, config.dtype, device, config.tensor_parallel)
    layout = kv_layout(loaded, config)
    num_blocks = kv_blocks(config, loaded, layout)
    if tp is not None:  # every rank holds as many blocks as the smallest budget allows
        num_blocks = min(gather(num_blocks, tp.control))
    kv = KVCache(layout, num_blocks, loaded.device)
    if tp is not None:
        tp.kv_bytes = gather(kv.nbytes, tp.control)
        tp.started()
    executor = make_executor(loaded, kv, config.seed, scheduler.overlap, config.attention)
    executor.tp = tp
    # NOTE: no graphs under TP: capturing the forward's NCCL collectives is not done (nor tested) yet.
    if config.cuda_graphs and loaded.device.type == "cuda" and executor.paged_kernel is not None and tp is None:
        executor.use_graphs(min(config.max_num_seqs, config.max_batch_tokens), loaded.max_model_len)
    blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, events=KvEventLog())
    limits = ModelLimits(loaded.vocab_size, loaded.max_model_len, kv.capacity_tokens, requests=config.limits)
    core = EngineCore(
        executor,
        blocks,
        loaded.tokenizer,
        limits,
        loaded.eos_token_ids,
        scheduler,
        config,
    )
    log.info(
        "engine_ready",
        model=config.model,
        scheduler=scheduler.engine_label,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        kv_blocks=num_blocks,
        kv_tokens=kv.capacity_tokens,
        kv_mib=round(kv.nbytes / 2**20, 1),
        tensor_parallel=config.tensor_parallel,
    )
    return core, loaded


class Engine:
    """The offline engine. `scheduler` is a policy instance, usually from the plugin registry:
    `Engine(EngineConfig(model="tiny-llama"), schedulers.load_scheduler("fcfs"))`."""

    def __init__(self, config: EngineConfig | None, scheduler: SchedulerPort, **overrides) -> None:
        if not isinstance(scheduler, SchedulerPort):  # a tandem.schedulers.Scheduler
            raise TypeError(f"scheduler must be a Scheduler instance, got {scheduler!r}")
        self.config = replace(config or EngineConfig(), **overrides)
        collect_before_build()
        self.core, self.model = on_fresh_thread(build_core, self.config, scheduler)  # see tandem.engine.host.threads
        self.tokenizer = self.model.tokenizer
        self.scheduler_name = scheduler.engine_label
        self.scheduler_options = {k: str(v) for k, v in scheduler.loaded_with.items()}
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, output tokens) per step
        self._step_started: float | None = None  # set while core.step() runs (watchdog)
        self._queued = 0  # submitted, not yet in a published snapshot
        self._snapshot = self._counters()
        # Tokenizing a long prompt takes a while: async callers do it here, off their event loop.
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tandem-tokenize")
        freeze_startup_heap()
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()
        if (tp := self.core.executor.tp) is not None:  # a follower that dies fails every request
            tp.watch(lambda reason: self._fail(EngineDeadError(reason)))
        if self.config.step_timeout_s is not None:
            threading.Thread(target=self._watchdog, name="tandem-watchdog", daemon=True).start()

    # -- public API ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink, max_waiting: int | None = None) -> str:
        """Validate and enqueue; `sink` receives each RequestOutput (or an exception) on the
        engine thread. Raises InvalidRequestError at once for a bad request, and EngineBusyError
        when `max_waiting` requests already wait (checked and enqueued as one step)."""
        return self._submit(self.core.make_sequence(request), sink, max_waiting)

    def _submit(self, seq: Sequence, sink: Sink, max_waiting: int | None = None) -> str:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError("the engine has failed") from self._dead
            if max_waiting is not None and self._snapshot.waiting + self._queued >= max_waiting:
                raise EngineBusyError(max_waiting)
            if seq.request_id in self._sinks:
                raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
            self._sinks[seq.request_id] = sink
            self._open[seq.request_id] = seq.request.n  # samples not yet finished
            self._queued += 1
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
        collectors = [_Collector(on_finish) for _ in requests]
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
        pending = _Coalescer()

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
            raise InvalidRequestError("messages", f"the model {self.model.name!r} has no chat template")

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
        return self.core.executor.attention_kind

    @property
    def kv_bytes_per_rank(self) -> list[int]:
        """Each rank's KV pool in bytes (one entry without tensor parallelism)."""
        tp = self.core.executor.tp
        return list(tp.kv_bytes) if tp is not None else [self.core.executor.kv.nbytes]

    @property
    def graph_buckets(self) -> list[int]:
        """Decode batch sizes that replay a captured CUDA graph (none when graphs are off)."""
        graphs = self.core.executor.graphs
        return list(graphs.buckets) if graphs is not None and graphs.capture else []

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    def stats(self) -> EngineStats:
        """A consistent snapshot, safe from any thread."""
        now = time.monotonic()
        with self._lock:
            tokens = sum(n for t, n in self._recent if t >= now - THROUGHPUT_WINDOW_S)
            snap = self._snapshot
            return replace(
                snap, waiting=snap.waiting + self._queued, output_tokens_per_second=tokens / THROUGHPUT_WINDOW_S
            )

    @property
    def kv_events(self) -> KvEventLog | None:
        """The prefix cache's stored and removed blocks, for routers (None: caching is off)."""
        blocks = self.core.kv.blocks
        return blocks.events if blocks.enable_prefix_caching else None

    def load(self) -> Load:
        s = self.stats()
        return Load(**{f.name: getattr(s, f.name) for f in fields(Load)})

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
        if trace is not None:
            self.core.executor.stats.trace = []
        try:
            self._run(trace)
        finally:
            if trace is not None:
                trace.close()

    def _run(self, trace: IO[str] | None) -> None:
        while True:
            taken = 0
            try:
                if not self.core.has_work():
                    self.core.executor.pause()
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
            self._step_started = started = time.monotonic()
            try:
                outputs = self.core.step()
            except BaseException as exc:  # noqa: BLE001 - every request must hear of it
                self._fail(exc)
                return
            finally:
                self._step_started = None
            if trace is not None:
                self._trace(trace, started, time.monotonic() - started)
            if self._dead is not None:  # the watchdog gave up on this step meanwhile
                return
            self._count(outputs)
            self._publish(taken)
            for out in outputs:
                self._deliver(out)

    def _trace(self, out: IO[str], started: float, seconds: float) -> None:
        steps = self.core.executor.stats.trace
        assert steps is not None, "tracing turns the executor's step trace on"
        for step in steps:
            out.write(json.dumps({**asdict(step), "started": started, "wall_seconds": seconds}) + "\n")
        steps.clear()
        out.flush()

    def _watchdog(self) -> None:
        """Fail every request if one step runs past step_timeout_s: a wedged device or kernel
        must end streams with a status, not leave them hanging."""
        timeout = self.config.step_timeout_s
        assert timeout is not None, "started only with a step timeout"
        while self._dead is None:
            time.sleep(min(1.0, timeout / 4))
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout:
                self._fail(EngineHungError(f"an engine step has run for over {timeout:g} s"))
                return

    def _count(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, sum(len(o.token_ids) for o in outputs)))
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()

    def _counters(self) -> EngineStats:
        core, blocks, ex = self.core, self.core.blocks, self.core.executor.stats
        return EngineStats(
            waiting=len(core.waiting),
            running=len(core.running),
            kv_blocks_used=blocks.num_used,
            kv_blocks_cached=blocks.num_cached,
            kv_blocks_free=blocks.num_free,
            kv_blocks_total=blocks.num_blocks,
            output_tokens_per_second=0.0,  # filled in by stats()
            steps=ex.steps,
            step_tokens=ex.tokens,
            device_busy_seconds=ex.busy_seconds,
            device_idle_seconds=ex.idle_seconds,
            host_prepare_seconds=ex.prepare_seconds,
            preemptions=core.num_preemptions,
            prefix_cache_hit_rate=blocks.stats.hit_rate,
        )

    def _publish(self, taken: int) -> None:
        """A new snapshot; the `taken` requests it now counts as waiting leave `_queued` at
        the same moment, so none is ever counted twice or not at all."""
        snapshot = self._counters()
        with self._lock:
            self._snapshot = snapshot
            self._queued -= taken

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
                with self._lock:
                    self._queued -= 1
                raise
            return 1
        assert isinstance(arg, str)
        for out in self.core.abort(arg):
            self._deliver(out)
        return 0

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            sink = self._sinks.get(out.request_id)
            if out.finished and sink is not None:
                self._open[out.request_id] -= 1
                if not self._open[out.request_id]:  # its last sample
                    del self._sinks[out.request_id], self._open[out.request_id]
        if sink is None:
            return
        try:
            sink(RequestRejectedError(*out.rejected) if out.rejected else out)
        except Exception as exc:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.warning("sink_failed", request_id=out.request_id, error=repr(exc))
            if not out.finished:
                with self._lock:
                    self._sinks.pop(out.request_id, None)
                    self._open.pop(out.request_id, None)
                self.core.abort(out.request_id)
                self._publish(0)  # the engine may go idle next: the snapshot must show the freed blocks

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, EngineDeadError) or isinstance(exc, EngineHungError):
            log.error("engine_failed", error=repr(exc))
        with self._lock:
            if self._dead is not None:  # the watchdog and the loop may both get here
                return
            self._dead = exc
            sinks, self._sinks = self._sinks, {}
            self._open = {}
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine step failed: {exc!r}")
        for sink in sinks.values():
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


class _Coalescer:
    """One request's undelivered outputs, merged per sample; lives on the consumer's event loop."""

    def __init__(self) -> None:
        self._out: dict[int, RequestOutput] = {}  # by sample index, in arrival order
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            self._error = self._error or out
        elif (prev := self._out.get(out.index)) is None:
            self._out[out.index] = out
        else:
            prev.token_ids = prev.token_ids + out.token_ids
            prev.text += out.text
            if out.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + out.logprobs
            prev.finished, prev.finish_reason, prev.stop = out.finished, out.finish_reason, out.stop
        self._ready.set()

    async def take(self) -> list[RequestOutput | BaseException]:
        """What arrived since the last take: the samples' merged outputs, then an error if any."""
        await self._ready.wait()
        self._ready.clear()
        outs: list[RequestOutput | BaseException] = list(self._out.values())
        self._out = {}
        if self._error is not None:
            outs.append(self._error)
        assert outs, "the event is set only with an output waiting"
        return outs


class _Collector:
    """Gathers one request's outputs into a Completion for `Engine.generate`."""

    def __init__(self, on_finish: Callable[[], None] | None = None) -> None:
        self._done = threading.Event()
        self._parts: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._on_finish = on_finish

    def __call__(self, out: RequestOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            self._error = out
            self._done.set()
            return
        self._parts.append(out)
        if out.finished:
            self._done.set()
            if self._on_finish is not None:
                self._on_finish()

    def result(self) -> Completion:
        self._done.wait()
        if self._error is not None:
            raise self._error
        last = self._parts[-1]
        assert last.finish_reason is not None, "the last output of a request is its finish"
        lps = [lp for p in self._parts for lp in (p.logprobs or [])] if last.logprobs is not None else None
        return Completion(
            request_id=last.request_id,
            text="".join(p.text for p in self._parts),
            token_ids=[t for p in self._parts for t in p.token_ids],
            finish_reason=last.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_cached_tokens=last.num_cached_tokens,
            logprobs=lps,
        )
