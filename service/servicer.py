"""tandem.v1.GenerationService on the engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

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
from tandem.service import metrics, orca, tracing
from tandem.service.auth import credential_id, token_name
from tandem.service.convert import (
    GenerateMessage,
    api_field,
    chat_messages,
    finish_reason,
    logprobs,
    set_matched_stop,
    stream_response,
    to_request,
    usage,
)
from tandem.service.engine_slot import EngineSlot
from tandem.service.errors import invalid_argument, resource_exhausted
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

log = structlog.get_logger("tandem.service")
MAX_REQUEST_ID = 256
Context = grpc.aio.ServicerContext


def _request_id(msg: GenerateMessage, context: Context) -> str:
    if msg.request_id:
        return msg.request_id
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:  # -bin keys alone carry bytes
            return value
    return uuid.uuid4().hex


def api_names(msg: GenerateMessage) -> Callable[[str], str]:
    kind = msg.WhichOneof("prompt")
    return lambda engine_field: api_field(engine_field, kind)


MAX_TENANT = 128  # characters of an x-tenant-id kept


def bad_request_id(request_id: str) -> str | None:
    """Ids are echoed as x-request-id metadata, so they must be legal header values."""
    if len(request_id) > MAX_REQUEST_ID:
        return f"{len(request_id)} characters, over the limit of {MAX_REQUEST_ID}"
    if not all(" " <= c <= "~" for c in request_id):
        return "must be printable ASCII (it is echoed as x-request-id metadata)"
    return None


def _sample(parts: list[RequestOutput]) -> pb.Sample:
    """One sample's outputs, whole."""
    last = parts[-1]
    sample = pb.Sample(
        index=last.index,
        token_ids=[t for p in parts for t in p.token_ids],
        text="".join(p.text for p in parts),
        logprobs=logprobs([lp for p in parts for lp in (p.logprobs or [])]),
        finish_reason=finish_reason(last),
    )
    set_matched_stop(sample, last)
    return sample


class GenerationServicer(pb_grpc.GenerationServiceServicer):
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
        self.rate = orca.RequestRate()

    async def _prepare(self, msg: GenerateMessage, context: Context) -> GenerationRequest:
        if (await self.slot.get(context)).dead is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine has failed; this server is not serving")
        try:
            rendered = None
            if msg.WhichOneof("prompt") == "messages":
                rendered = await (await self.slot.get(context)).render_chat(chat_messages(msg))
            request = to_request(msg, rendered)
        except InvalidRequestError as exc:
            await context.abort_with_status(invalid_argument(exc.field, exc.message))
        request.request_id = _request_id(msg, context)
        self.identify(request, context)
        if msg.HasField("ttft_target_s"):
            if not msg.ttft_target_s > 0:
                await context.abort_with_status(invalid_argument("ttft_target_s", "must be > 0 seconds"))
            request.deadline = time.monotonic() + msg.ttft_target_s
        if problem := bad_request_id(request.request_id):
            await context.abort_with_status(invalid_argument("request_id", problem))
        await context.send_initial_metadata((("x-request-id", request.request_id),))
        return request

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

    async def outputs(
        self, request: GenerationRequest, context: Context, field: Callable[[str], str]
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs; engine errors become gRPC statuses (`field` names an engine
        field at the protocol's names)."""
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
            await context.abort_with_status(invalid_argument(field(exc.field), exc.message))
        except EngineDeadError as exc:
            log.error("engine_failed", request_id=request.request_id, error=str(exc))
            if self.on_engine_failure is not None:
                await self.on_engine_failure()
            # A hung step may be transient on a fresh engine (retry elsewhere); a raised one is a bug.
            code = grpc.StatusCode.UNAVAILABLE if isinstance(exc, EngineHungError) else grpc.StatusCode.INTERNAL
            await context.abort(code, str(exc))
        finally:
            if owns:
                del self._owners[request_id]

    async def GenerateStream(
        self, msg: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        received = time.monotonic()
        request = await self._prepare(msg, context)
        self.received(request, "GenerateStream")
        first_at: float | None = None  # the first response's time
        last_at = received
        tokens, finished, text = 0, False, []
        left = request.n  # samples still running
        try:
            async for out in self.outputs(request, context, field=api_names(msg)):
                now = time.monotonic()
                response = stream_response(out, first_at is None)
                left -= out.finished
                if first_at is None:
                    first_at = now
                    metrics.TTFT.observe(now - received)
                    log.info("first_token", request_id=request.request_id, seconds=round(now - received, 4))
                else:
                    metrics.ITL.observe(now - last_at)
                last_at = now
                tokens += len(out.token_ids)
                if self.log_prompts:
                    text.append(out.text)
                if not left:  # the request's last response
                    finished = True
                    self._report_load(context)
                    self.trace(context, request, received, first_at or now, now, out, tokens)
                    response.usage.CopyFrom(usage(out, tokens))
                    response.timings.time_to_first_token_seconds = (first_at or now) - received
                    response.timings.queue_seconds = out.queue_seconds or 0.0
                    response.timings.total_seconds = now - received
                    self.finished(request, out, tokens, received, "".join(text))
                yield response
        finally:
            if not finished:  # cancelled, deadline, or an error status
                self.aborted(request.request_id, context, tokens)

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

    def _report_load(self, context: Context) -> None:
        """ORCA: this replica's load, in the trailers of the request that just finished."""
        self.rate.mark()
        engine = self.slot.engine
        if engine is not None:
            context.set_trailing_metadata((orca.trailer(engine.load(), self.rate.per_second()),))

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

    async def Generate(self, msg: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        received = time.monotonic()
        request = await self._prepare(msg, context)
        self.received(request, "Generate")
        parts: dict[int, list[RequestOutput]] = {}  # by sample index
        first_at = None
        async for out in self.outputs(request, context, field=api_names(msg)):
            first_at = first_at or time.monotonic()
            parts.setdefault(out.index, []).append(out)
        samples = [_sample(parts[i]) for i in sorted(parts)]
        last = parts[0][-1]
        total = sum(len(s.token_ids) for s in samples)
        self.finished(request, last, total, received, samples[0].text)
        self._report_load(context)
        self.trace(context, request, received, first_at or received, time.monotonic(), last, total)
        first = samples[0]
        response = pb.GenerateResponse(
            request_id=request.request_id,
            token_ids=first.token_ids,
            text=first.text,
            logprobs=first.logprobs,
            finish_reason=first.finish_reason,
            usage=usage(last, total),
            timings=pb.Timings(total_seconds=time.monotonic() - received, queue_seconds=last.queue_seconds or 0.0),
            samples=samples if request.n > 1 else [],
        )
        set_matched_stop(response, last)
        return response

    async def Abort(self, msg: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        await self.abort_owned(msg.request_ids, context)
        return pb.AbortResponse()

    async def abort_owned(self, request_ids: Iterable[str], context: Context) -> None:
        """Abort the ids the caller may abort (with bearer auth, those its credential sent)."""
        engine = await self.slot.get(context)
        caller = credential_id(context.invocation_metadata()) if self.scoped_aborts else ""
        for request_id in request_ids:
            # Another credential's request is left alone, and the answer says nothing of it.
            if self._owners.get(request_id, caller) == caller:
                engine.abort(request_id)

    async def Tokenize(self, msg: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        ids = await (await self.slot.get(context)).encode(msg.text, add_special_tokens=msg.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)
