"""The grpc.aio server: generation, health, reflection, graceful shutdown."""
from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import Engine, StoppingCriteria
from service.info import InfoServicer
from service.servicer import GenerationServicer
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc
from tandem.v1 import info_pb2, info_pb2_grpc

log = structlog.get_logger("tandem.server")

# Long prefills can keep a stream silent for a while: clients may ping without data and
# must not be sent GOAWAY for it; large prompts need more than the 4 MiB default.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
]
GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
INFO_SERVICE = info_pb2.DESCRIPTOR.services_by_name["InfoService"].full_name


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    grace: float = 30.0  # seconds in-flight streams get on SIGTERM
    max_waiting: int = 1024  # waiting requests beyond which new ones get RESOURCE_EXHAUSTED
    scheduler_options: dict[str, str] = field(default_factory=dict)  # reported by GetServerInfo
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (0 picks one)


async def serve(engine: Engine, opts: ServerOptions) -> int:
    host, grace = opts.host, opts.grace
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()

    async def not_serving() -> None:
        for name in ("", GENERATION_SERVICE, INFO_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    generation = GenerationServicer(engine, opts.max_waiting, on_engine_failure=not_serving)
    pb_grpc.add_GenerationServiceServicer_to_server(generation, server)
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(engine, opts.scheduler_options, opts.max_waiting),
                                                    server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (GENERATION_SERVICE, INFO_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{opts.port}")
    await not_serving()
    await server.start()
    # Warm up before declaring SERVING: the first forward pass allocates and compiles.
    await asyncio.to_thread(engine.generate, [[4, 5, 6]], None, StoppingCriteria(max_new_tokens=2))
    for name in ("", GENERATION_SERVICE, INFO_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_note = ""
    if opts.metrics_port is not None:
        from service import metrics

        metrics_note = f" metrics on {host}:{metrics.start(engine, host, opts.metrics_port)}"
    print(f"tandem serving on {host}:{bound}{metrics_note}", flush=True)
    log.info("serving", host=host, port=bound, scheduler=engine.core.scheduler.name)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", grace_seconds=grace)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)  # refuses new RPCs, lets in-flight ones finish, then cancels them
    log.info("stopped")
    return 0


def run(engine: Engine, opts: ServerOptions) -> int:
    try:
        return asyncio.run(serve(engine, opts))
    finally:
        engine.shutdown()
        sys.stdout.flush()
