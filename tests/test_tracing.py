"""A W3C traceparent in a request's metadata is continued: the server's span is its child, with
queue, prefill and decode spans under it (the SDK's in-memory exporter, an in-process server)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers import make_engine
from tandem.service import tracing
from tandem.service.engine_slot import EngineSlot
from tandem.service.server import ServerOptions, build_server
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


async def send(requests: list[tuple[pb.GenerateStreamRequest, tuple]]) -> None:
    engine = make_engine(model="tiny-llama")
    built = build_server(EngineSlot(engine), ServerOptions(port=0))
    await built.grpc_server.start()
    await built.set_health(health_pb2.HealthCheckResponse.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{built.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for msg, metadata in requests:
                async for _ in stub.GenerateStream(msg, metadata=metadata):
                    pass
    finally:
        await built.grpc_server.stop(None)
        engine.shutdown()


def test_traceparent_is_continued_into_queue_prefill_and_decode_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert tracing.enabled()
    stopping = pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True)
    traced = pb.GenerateStreamRequest(request_id="traced", text="follow me", stopping=stopping)
    fresh = pb.GenerateStreamRequest(request_id="fresh", text="no parent", stopping=stopping)
    asyncio.run(send([(traced, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)), (fresh, ())]))

    spans: list[Any] = list(exporter.get_finished_spans())  # ReadableSpan: Optional everywhere
    roots = {s.attributes["tandem.request_id"]: s for s in spans if s.name == tracing.SPAN}
    root = roots["traced"]
    assert root.context.trace_id == int(TRACE_ID, 16)
    assert root.parent is not None and root.parent.span_id == int(PARENT_ID, 16)
    assert root.kind == trace.SpanKind.SERVER and root.attributes["tandem.completion_tokens"] == 6
    children = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [s.name for s in children] == ["queue", "prefill", "decode"]
    assert children[0].start_time == root.start_time and children[-1].end_time == root.end_time
    for before, after in zip(children, children[1:]):
        assert before.end_time <= after.start_time  # phases follow one another
    # Without a traceparent, a request starts its own trace.
    other = roots["fresh"]
    assert other.parent is None and other.context.trace_id != root.context.trace_id
