"""Prometheus metrics: per-request histograms from the servicer, the engine's stats snapshot at scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.engine import Engine
from tandem.engine.stats import EngineStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("tandem_requests", "Finished generation requests", ["finish_reason", "code"])
TTFT = Histogram("tandem_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = Histogram("tandem_inter_token_latency_seconds", "Time between streamed responses", buckets=_LATENCY)
E2E = Histogram("tandem_e2e_latency_seconds", "Request latency, receipt to last token", buckets=_LATENCY)
TENANT_TOKENS = Counter(
    "tandem_tenant_tokens",
    "Prompt and completion tokens of finished requests, by tenant (a named bearer token's name, else x-tenant-id)",
    ["tenant", "kind"],
)
MAX_TENANTS = 100  # distinct tenant labels; x-tenant-id is the client's to choose: the series stay bounded
NO_TENANT, OTHER_TENANTS = "(none)", "(other)"
_tenants: set[str] = set()


def count_tenant_tokens(tenant: str, prompt: int, completion: int) -> None:
    """Usage per tenant, as a platform team bills or caps it; past MAX_TENANTS names, "(other)"."""
    label = tenant or NO_TENANT
    if label not in _tenants:
        if len(_tenants) >= MAX_TENANTS:
            label = OTHER_TENANTS
        else:
            _tenants.add(label)
    TENANT_TOKENS.labels(label, "prompt").inc(prompt)
    TENANT_TOKENS.labels(label, "completion").inc(completion)


class EngineCollector:
    """Reads the engine's counters and queues when Prometheus scrapes; nothing on the hot path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.engine.stats()
        for kind, name, doc, value in s.exported():
            yield (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, value=value)
        for name, (doc, value) in _ratios(s).items():
            yield GaugeMetricFamily(name, doc, value=value)


def _ratios(s: EngineStats) -> dict[str, tuple[str, float]]:
    """Gauges derived from the snapshot's fields (the fields themselves: EngineStats.exported)."""
    return {
        "tandem_kv_usage_ratio": ("Owned KV blocks / all", s.kv_usage),
        "tandem_device_idle_ratio": ("Device idle / (busy + idle) since start", s.device_idle_fraction),
        "tandem_mean_step_tokens": ("Tokens per step since start (batch size)", s.mean_step_tokens),
        "tandem_mean_step_seconds": ("Device busy time per step since start", s.mean_step_seconds),
    }


def start(engine: Engine, host: str, port: int) -> int:
    REGISTRY.register(EngineCollector(engine))
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
