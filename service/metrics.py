"""Prometheus metrics: per-request histograms from the servicer, the engine's stats snapshot at scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.engine import Engine

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
        gauges = {
            "tandem_waiting_requests": ("Requests waiting to be scheduled (queue depth)", s.waiting),
            "tandem_running_requests": ("Requests holding KV blocks", s.running),
            "tandem_kv_blocks_used": ("KV blocks owned by requests", s.kv_blocks_used),
            "tandem_kv_blocks_cached": ("KV blocks findable in the prefix cache", s.kv_blocks_cached),
            "tandem_kv_blocks_total": ("KV blocks in the pool", s.kv_blocks_total),
            "tandem_kv_usage_ratio": ("Owned KV blocks / all", s.kv_blocks_used / max(1, s.kv_blocks_total)),
            "tandem_prefix_cache_hit_ratio": ("Prompt tokens served from the prefix cache", s.prefix_cache_hit_rate),
            "tandem_device_idle_ratio": ("Device idle / (busy + idle) since start", s.device_idle_fraction),
            "tandem_mean_step_tokens": ("Tokens per step since start (batch size)", s.step_tokens / max(1, s.steps)),
            "tandem_mean_step_seconds": (
                "Device busy time per step since start",
                s.device_busy_seconds / max(1, s.steps),
            ),
            "tandem_output_tokens_per_second": ("Output tokens/s over the last 10 s", s.output_tokens_per_second),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "tandem_steps": ("Engine steps", s.steps),
            "tandem_step_tokens": ("Tokens computed in steps", s.step_tokens),
            "tandem_device_busy_seconds": ("Device busy time (forward + sampling)", s.device_busy_seconds),
            "tandem_device_idle_seconds": ("Device idle time while work was pending", s.device_idle_seconds),
            "tandem_host_prepare_seconds": ("Host batch preparation time", s.host_prepare_seconds),
            "tandem_preemptions": ("Requests preempted (recompute)", s.preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


def start(engine: Engine, host: str, port: int) -> int:
    REGISTRY.register(EngineCollector(engine))
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
