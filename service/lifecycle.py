"""One generation request's life on the server, whichever protocol carries it: received ->
first token -> tokens -> finished, or aborted (cancelled, refused, failed). The books of it
(log lines, metrics, trace spans, who may abort it) are kept here once; the protocol handlers
(`servicer` for tandem.v1, `vllm_worker` for smg) only translate messages to and from it."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import structlog

from tandem.engine import (
    EngineBusyError,
    EngineDeadError,
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
)
from tandem.engine.errors import EngineHungError, RequestRejectedError
from tandem.service import metrics, tracing
from tandem.service.auth import credential_id, token_name
from tandem.service.engine_slot import EngineSlot
from tandem.service.errors import invalid_argument, resource_exhausted

log = structlog.get_logger("tandem.service")
Context = grpc.aio.ServicerContext
FieldNames = Callable[[str], str]  # an engine field path -> the protocol's name for it

MAX_REQUEST_ID = 256
MAX_TENANT = 128  # characters of an x-tenant-id kept


def bad_request_id(request_id: str) -> str | None:
    """Ids are echoed as x-request-id metadata, so they must be legal header values."""
    if len(request_id) > MAX_REQUEST_ID:
        return f"{len(request_id)} characters, over the limit of {MAX_REQUEST_ID}"
    if not all(" " <= c <= "~" for c in request_id):
        return "must be printable ASCII (it is echoed as x-request-id metadata)"
    return None


@dataclass(frozen=True)
class Rpc:
    """An RPC that runs generation requests, and which books it keeps.

    NOTE: the flags keep what each RPC recorded before the three loops became one; making
    an RPC keep a book it does not is a change of behaviour (metrics, logs), made here."""

    name: str  # the `rpc` of the request_received line
    token_timings: bool = False  # TTFT and inter-token histograms, and the first_token line
    counts_aborts: bool = True  # an end before the finish is logged and counted as aborted
    logs_output: bool = True  # with --log-prompts, the output text goes into request_finished


GENERATE_STREAM = Rpc("GenerateStream", token_timings=True)
GENERATE = Rpc("Generate", counts_aborts=False)
VLLM_GENERATE = Rpc("vllm.Generate", logs_output=False)


@dataclass
class RequestRun:
    """One request's life: what it has produced so far, in seconds of time.monotonic()."""

    lifecycle: Lifecycle
    rpc: Rpc
    received: float = field(default_factory=time.monotonic)
    first_at: float | None = None  # the first output's arrival
    last_at: float | None = None  # the latest output's arrival
    outputs_seen: int = 0
    tokens: int = 0  # completion tokens, all samples
    finished: bool = False  # every sample has finished (the books are closed)
    last: RequestOutput | None = None  # the latest output; once finished, the one that ended the request
    _text: list[str] = field(default_factory=list)  # sample 0's text, kept only with --log-prompts

    @property
    def first(self) -> bool:
        """The output just yielded is the request's first."""
        return self.outputs_seen == 1

    async def outputs(
        self, request: GenerationRequest, context: Context, names: FieldNames
    ) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for `request`, with the books kept; engine errors become gRPC
        statuses. Close it when done (`contextlib.aclosing`): an early end is an abort."""
        self.lifecycle.received(request, self.rpc.name)
        left = request.n  # samples still running
        try:
            async with aclosing(self.lifecycle.engine_outputs(request, context, names)) as outputs:
                async for out in outputs:
                    left -= out.finished
                    self._count(request, out)
                    if not left:
                        self._finish(request, context)
                    yield out
        finally:
            if not self.finished and self.rpc.counts_aborts:  # cancelled, deadline, or an error status
                self.lifecycle.aborted(request.request_id, context, self.tokens)

    def _count(self, request: GenerationRequest, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.rpc.token_timings:
            self._time_tokens(request, now)
        self.first_at = self.first_at or now
        self.last_at, self.last = now, out
        self.outputs_seen += 1
        self.tokens += len(out.token_ids)
        if self.lifecycle.log_prompts and self.rpc.logs_output and out.index == 0:
            self._text.append(out.text)

    def _time_tokens(self, request: GenerationRequest, now: float) -> None:
        if self.first_at is None:
            metrics.TTFT.observe(now - self.received)
            log.info("first_token", request_id=request.request_id, seconds=round(now - self.received, 4))
        else:
            assert self.last_at is not None
            metrics.ITL.observe(now - self.last_at)

    def _finish(self, request: GenerationRequest, context: Context) -> None:
        assert self.last is not None and self.first_at is not None
        self.finished = True
        self.lifecycle.finished(request, self.last, self.tokens, self.received, "".join(self._text))
        end = time.monotonic()
        self.lifecycle.trace(context, request, self.received, self.first_at, end, self.last, self.tokens)


class Lifecycle:
    """The books of every generation request the server runs, and what they share: the engine
    slot, the admission bound, abort scope (who may abort what) and the logging choices."""

    def __init__(
        self,
        slot: EngineSlot,
        max_waiting: int,
        on_engine_failure: Callable[[], Awaitable[None]] | None = None,
        log_prompts: bool = False,
        scoped_aborts: bool = False,
        token_names: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.slot = slot
        self.max_waiting = max_waiting
        self.on_engine_failure = on_engine_failure
        self.log_prompts = log_prompts  # off: prompt and output text never reach the logs
        # With bearer auth on, a request may be aborted only by the credential that sent it.
        self.scoped_aborts = scoped_aborts
        self.token_names = token_names or []  # a named bearer token's requests count for that tenant
        self._owners: dict[str, str] = {}  # request id -> credential id, while it runs

    def run(self, rpc: Rpc) -> RequestRun:
        """A request received now (its latencies count from here)."""
        return RequestRun(self, rpc)

    def identify(self, request: GenerationRequest, context: Context) -> None:
        """The request's tenant (a named bearer token's name, else `x-tenant-id`) and deadline
        (the RPC's), for scheduling policies that use them."""
        metadata = context.invocation_metadata() or ()
        tenant = token_name(metadata, self.token_names) if self.token_names else ""
        if not tenant:
            given = next((v for k, v in metadata if k == "x-tenant-id" and isinstance(v, str)), "")
            tenant = given[:MAX_TENANT] if all(" " <= c <= "~" for c in given) else ""
        request.tenant = tenant
        remaining = context.time_remaining()
        if remaining is not None:
            request.deadline = time.monotonic() + remaining

    async def abort(self, request_ids: Iterable[str], context: Context) -> None:
        """Abort the ids the caller may abort (with bearer auth, those its credential sent)."""
        engine = await self.slot.get(context)
        caller = credential_id(context.invocation_metadata()) if self.scoped_aborts else ""
        for request_id in request_ids:
            # Another credential's request is left alone, and the answer says nothing of it.
            if self._owners.get(request_id, caller) == caller:
                engine.abort(request_id)

    async def engine_outputs(
        self, request: GenerationRequest, context: Context, names: FieldNames
    ) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs, the request's owner noted while it runs; engine errors become
        gRPC statuses (`names` gives an engine field at the protocol's name)."""
        engine = await self.slot.get(context)
        request_id = request.request_id or ""
        # A second request with an id in flight is refused by the engine: it must not take the id over.
        owns = self.scoped_aborts and request_id not in self._owners
        if owns:
            self._owners[request_id] = credential_id(context.invocation_metadata())
        try:
            async for out in engine.stream(request, self.max_waiting):
                yield out
        except EngineBusyError as exc:
            await context.abort_with_status(resource_exhausted(str(exc), retry_after_s=1.0))
        except RequestRejectedError as exc:  # the policy's call: it would miss its deadline, or overload
            if exc.kind == "deadline":
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
            await context.abort_with_status(resource_exhausted(str(exc), retry_after_s=1.0))
        except InvalidRequestError as exc:
            await context.abort_with_status(invalid_argument(names(exc.field), exc.message))
        except EngineDeadError as exc:
            await self._engine_failed(request, context, exc)
        finally:
            if owns:
                del self._owners[request_id]

    async def _engine_failed(self, request: GenerationRequest, context: Context, exc: EngineDeadError) -> None:
        log.error("engine_failed", request_id=request.request_id, error=str(exc))
        if self.on_engine_failure is not None:
            await self.on_engine_failure()
        # A hung step may be transient on a fresh engine (retry elsewhere); a raised one is a bug.
        code = grpc.StatusCode.UNAVAILABLE if isinstance(exc, EngineHungError) else grpc.StatusCode.INTERNAL
        await context.abort(code, str(exc))

    def received(self, request: GenerationRequest, rpc: str) -> None:
        extra: dict[str, object] = dict(prompt=request.prompt) if self.log_prompts else {}
        # Who sent it and at what level, where set: what a platform team filters the logs by.
        extra |= {k: v for k, v in (("tenant", request.tenant), ("priority", request.priority)) if v}
        log.info("request_received", request_id=request.request_id, rpc=rpc, **extra)

    def finished(
        self, request: GenerationRequest, last: RequestOutput, tokens: int, received: float, text: str
    ) -> None:
        seconds = time.monotonic() - received
        assert last.finish_reason is not None, "the last output of a request is its finish"
        reason, request_id = last.finish_reason.value, request.request_id
        metrics.E2E.observe(seconds)
        metrics.REQUESTS.labels(reason, "OK").inc()
        metrics.count_tenant_tokens(request.tenant, last.num_prompt_tokens, tokens)
        extra = dict(output=text) if self.log_prompts else {}
        log.info(
            "request_finished",
            request_id=request_id,
            reason=reason,
            completion_tokens=tokens,
            seconds=round(seconds, 4),
            **extra,
        )

    def aborted(self, request_id: str | None, context: Context, tokens: int) -> None:
        code = "CANCELLED" if context.cancelled() else (context.code() or grpc.StatusCode.UNKNOWN).name
        metrics.REQUESTS.labels("aborted", code).inc()
        log.info("request_aborted", request_id=request_id, code=code, completion_tokens=tokens)

    def trace(
        self,
        context: Context,
        request: GenerationRequest,
        received: float,
        first_token: float,
        end: float,
        last: RequestOutput,
        tokens: int,
    ) -> None:
        if not tracing.enabled():
            return
        admitted = received + (last.queue_seconds or 0.0)
        timeline = tracing.Timeline(received, admitted, max(first_token, admitted), end)
        reason = last.finish_reason.value if last.finish_reason else ""
        attributes = {
            "tandem.prompt_tokens": last.num_prompt_tokens,
            "tandem.cached_tokens": last.num_cached_tokens,
            "tandem.completion_tokens": tokens,
            "tandem.finish_reason": reason,
        }
        tracing.record(context.invocation_metadata() or (), request.request_id or "", timeline, attributes)
