"""The grpc.aio server: generation, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vllm_grpc

from tandem.engine import Engine, StoppingCriteria
from tandem.service.auth import BearerAuthInterceptor
from tandem.service.engine_slot import EngineSlot
from tandem.service.info import InfoServicer
from tandem.service.lifecycle import Lifecycle
from tandem.service.servicer import GenerationServicer
from tandem.service.vllm_worker import SERVICE as VLLM_SERVICE
from tandem.service.vllm_worker import VllmWorkerServicer
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc
from tandem.v1 import info_pb2, info_pb2_grpc

log = structlog.get_logger("tandem.server")

# Long prefills can keep a stream silent for a while: clients may ping without data and
# must not be sent GOAWAY for it. Keepalive also finds connections that dropped without a
# cancel, so their streams end and their blocks come back.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
EXIT_ENGINE_FAILED = 70  # EX_SOFTWARE: the engine failed or hung; the orchestrator restarts us
GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
INFO_SERVICE = info_pb2.DESCRIPTOR.services_by_name["InfoService"].full_name


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    grace: float = 30.0  # seconds in-flight streams get on SIGTERM
    max_waiting: int = 1024  # waiting requests beyond which new ones get RESOURCE_EXHAUSTED
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (0 picks one)
    max_message_bytes: int = 4 * 2**20  # larger requests get RESOURCE_EXHAUSTED from gRPC itself
    tls_cert: str | None = None  # PEM files; with tls_client_ca, clients must present a certificate
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: list[bytes] | None = None  # bearer tokens; None: no authentication
    token_names: list[tuple[str, bytes]] | None = None  # (name, token): a named token's requests are its tenant's
    log_prompts: bool = False  # prompt and output text in the logs (off: never logged)
    max_health_watches_per_peer: int = 64  # health Watch streams one client address may hold
    otlp_endpoint: str | None = None  # OpenTelemetry traces exported here (OTLP/gRPC)


def server_credentials(opts: ServerOptions) -> grpc.ServerCredentials | None:
    if not opts.tls_cert and not opts.tls_key:
        if opts.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (opts.tls_cert and opts.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    ca = read(opts.tls_client_ca) if opts.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(opts.tls_key), read(opts.tls_cert))], root_certificates=ca, require_client_auth=ca is not None
    )


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 with at most `max_watches` Watch streams per client address: each one
    holds a task on the server for as long as the client keeps it open."""

    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self.max_watches = max_watches
        self._watches: Counter[str] = Counter()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer().rpartition(":")[0]  # "ipv4:127.0.0.1:50000" -> its address, any port
        if self._watches[peer] >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watches} health Watch streams are open from this address (--max-health-watches-per-peer)",
            )
        self._watches[peer] += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches[peer] -= 1
            if not self._watches[peer]:
                del self._watches[peer]


@dataclass
class Server:
    """The grpc.aio server with every service added, bound, not yet started."""

    grpc_server: grpc.aio.Server
    health: BoundedHealthServicer
    port: int
    tls: bool
    serving: bool = False  # what grpc.health.v1 says, for protocols with their own health check

    async def set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", GENERATION_SERVICE, INFO_SERVICE, VLLM_SERVICE):
            await self.health.set(name, status)

    async def drain(self) -> None:
        self.serving = False
        await self.health.enter_graceful_shutdown()


def build_server(slot: EngineSlot, opts: ServerOptions) -> Server:
    credentials = server_credentials(opts)
    interceptors = [BearerAuthInterceptor(opts.auth_tokens)] if opts.auth_tokens else []
    size = opts.max_message_bytes
    options = SERVER_OPTIONS + [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", max(size, 64 * 2**20)),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    address = f"{opts.host}:{opts.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    built = Server(server, BoundedHealthServicer(opts.max_health_watches_per_peer), port, credentials is not None)
    not_serving = functools.partial(built.set_health, health_pb2.HealthCheckResponse.NOT_SERVING)
    lifecycle = Lifecycle(
        slot,
        opts.max_waiting,
        on_engine_failure=not_serving,
        log_prompts=opts.log_prompts,
        scoped_aborts=bool(opts.auth_tokens),
        token_names=[(n, t) for n, t in opts.token_names or [] if n],
    )
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(lifecycle), server)
    vllm_grpc.add_VllmEngineServicer_to_server(VllmWorkerServicer(lifecycle, lambda: built.serving), server)
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(slot, opts.max_waiting), server)
    health_pb2_grpc.add_HealthServicer_to_server(built.health, server)
    names = (GENERATION_SERVICE, INFO_SERVICE, VLLM_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return built


async def serve(slot: EngineSlot, load: Callable[[], Engine], opts: ServerOptions) -> int:
    """Open the port (health NOT_SERVING), load and warm up the engine, then serve until
    SIGTERM/SIGINT (drain) or an engine failure (exit 70)."""
    host, grace = opts.host, opts.grace
    built = build_server(slot, opts)
    server = built.grpc_server
    await built.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    print(f"tandem starting on {host}:{built.port}", flush=True)
    log.info("loading", host=host, port=built.port)
    try:
        engine = slot.engine = await asyncio.to_thread(load)
    except BaseException:
        await server.stop(None)
        raise
    # Warm up before declaring SERVING: the first forward pass allocates and compiles.
    await asyncio.to_thread(engine.generate, [[4, 5, 6]], None, StoppingCriteria(max_new_tokens=2))
    await built.set_health(health_pb2.HealthCheckResponse.SERVING)
    metrics_note = ""
    if opts.metrics_port is not None:
        from tandem.service import metrics

        metrics_note = f" metrics on {host}:{metrics.start(engine, host, opts.metrics_port)}"
    print(f"tandem serving on {host}:{built.port}{metrics_note}", flush=True)
    log.info(
        "serving",
        host=host,
        port=built.port,
        scheduler=engine.scheduler_name,
        tls=built.tls,
        mtls=bool(opts.tls_client_ca),
        auth=bool(opts.auth_tokens),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed = asyncio.create_task(_engine_failure(engine))
    await asyncio.wait([asyncio.create_task(stop.wait()), failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        # Every in-flight stream has its status already (the engine failed them all); the
        # process exits non-zero so that an orchestrator restarts it with a fresh engine.
        await built.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.error("exiting_engine_failed", error=repr(engine.dead), exit_code=EXIT_ENGINE_FAILED)
        await server.stop(min(grace, 5.0))
        return EXIT_ENGINE_FAILED
    failed.cancel()
    log.info("draining", grace_seconds=grace)
    await built.drain()
    await server.stop(grace)  # refuses new RPCs, lets in-flight ones finish, then cancels them
    log.info("stopped")
    return 0


async def _engine_failure(engine: Engine, poll_s: float = 0.2) -> None:
    while engine.dead is None:
        await asyncio.sleep(poll_s)


def run(load: Callable[[], Engine], opts: ServerOptions) -> int:
    """Serve the engine `load` builds; the port is open (NOT_SERVING) while it loads."""
    slot = EngineSlot()
    try:
        return asyncio.run(serve(slot, load, opts))
    finally:
        if slot.engine is not None:
            slot.engine.shutdown(timeout=5.0)
        sys.stdout.flush()
