"""OpenTelemetry traces (the `tracing` extra): a W3C `traceparent` in a request's metadata is
continued into a server span per generation, with child spans for its queueing, prefill and
decode. Off (and free) unless a tracer provider is installed: `--otlp-endpoint`, or a test's
own provider."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SPAN = "tandem.generate"


try:  # once: a failed import is not cached by Python, and this is asked on every request
    from opentelemetry import trace as _trace
    from opentelemetry.sdk.trace import TracerProvider as _SdkProvider
except ImportError:
    _trace = None  # type: ignore[assignment]


def enabled() -> bool:
    """A real tracer provider is installed (the API alone gives a no-op one)."""
    return _trace is not None and isinstance(_trace.get_tracer_provider(), _SdkProvider)


def setup_otlp(endpoint: str, service_name: str = "tandem") -> None:
    """Export spans over OTLP/gRPC to `endpoint` (a collector, e.g. http://otel-collector:4317)."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ValueError(f"--otlp-endpoint needs the 'tracing' extra: pip install 'tandem[tracing]' ({exc})") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


@dataclass
class Timeline:
    """One request's phases, in seconds of time.monotonic()."""

    received: float
    admitted: float | None = None  # received + queue time
    first_token: float | None = None
    finished: float | None = None


def record(metadata: Iterable[tuple[str, Any]], request_id: str, timeline: Timeline, attributes: dict) -> None:
    """Emit the request's spans after the fact, parented on the caller's `traceparent`."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    carrier = {k: v for k, v in metadata if isinstance(v, str)}
    offset = time.time_ns() - int(time.monotonic() * 1e9)  # monotonic -> wall clock, in ns

    def ns(t: float) -> int:
        return offset + int(t * 1e9)

    tracer = trace.get_tracer("tandem.service")
    end = timeline.finished or time.monotonic()
    root = tracer.start_span(
        SPAN,
        context=extract(carrier),
        kind=trace.SpanKind.SERVER,
        start_time=ns(timeline.received),
        attributes={"tandem.request_id": request_id, **attributes},
    )
    phases = [
        ("queue", timeline.received, timeline.admitted),
        ("prefill", timeline.admitted, timeline.first_token),
        ("decode", timeline.first_token, timeline.finished),
    ]
    parent = trace.set_span_in_context(root)
    for name, start, stop in phases:
        if start is not None and stop is not None:
            tracer.start_span(name, context=parent, start_time=ns(start)).end(end_time=ns(stop))
    root.end(end_time=ns(end))
