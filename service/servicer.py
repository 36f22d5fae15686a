"""tandem.v1.GenerationService on the engine: its messages to and from engine requests, whose
life (logs, metrics, traces, abort scope) `lifecycle` keeps."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc

from tandem.engine import GenerationRequest, InvalidRequestError, RequestOutput
from tandem.service import orca
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
from tandem.service.errors import invalid_argument
from tandem.service.lifecycle import GENERATE, GENERATE_STREAM, Lifecycle, bad_request_id
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

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
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.slot = lifecycle.slot
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
        self.lifecycle.identify(request, context)
        if msg.HasField("ttft_target_s"):
            if not msg.ttft_target_s > 0:
                await context.abort_with_status(invalid_argument("ttft_target_s", "must be > 0 seconds"))
            request.deadline = time.monotonic() + msg.ttft_target_s
        if problem := bad_request_id(request.request_id):
            await context.abort_with_status(invalid_argument("request_id", problem))
        await context.send_initial_metadata((("x-request-id", request.request_id),))
        return request

    async def GenerateStream(
        self, msg: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        run = self.lifecycle.run(GENERATE_STREAM)
        request = await self._prepare(msg, context)
        async with aclosing(run.outputs(request, context, api_names(msg))) as outputs:
            async for out in outputs:
                response = stream_response(out, run.first)
                if run.finished:  # the request's last response
                    self._report_load(context)
                    assert run.first_at is not None and run.last_at is not None
                    response.usage.CopyFrom(usage(out, run.tokens))
                    response.timings.time_to_first_token_seconds = run.first_at - run.received
                    response.timings.queue_seconds = out.queue_seconds or 0.0
                    response.timings.total_seconds = run.last_at - run.received
                yield response

    async def Generate(self, msg: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        run = self.lifecycle.run(GENERATE)
        request = await self._prepare(msg, context)
        parts: dict[int, list[RequestOutput]] = {}  # by sample index
        async with aclosing(run.outputs(request, context, api_names(msg))) as outputs:
            async for out in outputs:
                parts.setdefault(out.index, []).append(out)
        self._report_load(context)
        samples = [_sample(parts[i]) for i in sorted(parts)]
        last = parts[0][-1]
        first = samples[0]
        response = pb.GenerateResponse(
            request_id=request.request_id,
            token_ids=first.token_ids,
            text=first.text,
            logprobs=first.logprobs,
            finish_reason=first.finish_reason,
            usage=usage(last, run.tokens),
            timings=pb.Timings(total_seconds=time.monotonic() - run.received, queue_seconds=last.queue_seconds or 0.0),
            samples=samples if request.n > 1 else [],
        )
        set_matched_stop(response, last)
        return response

    def _report_load(self, context: Context) -> None:
        """ORCA: this replica's load, in the trailers of the request that just finished."""
        self.rate.mark()
        engine = self.slot.engine
        if engine is not None:
            context.set_trailing_metadata((orca.trailer(engine.load(), self.rate.per_second()),))

    async def Abort(self, msg: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        await self.lifecycle.abort(msg.request_ids, context)
        return pb.AbortResponse()

    async def Tokenize(self, msg: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        ids = await (await self.slot.get(context)).encode(msg.text, add_special_tokens=msg.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)
