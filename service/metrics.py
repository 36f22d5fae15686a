"""Prometheus metrics: per-request histograms from the servicer, engine state read at scrape."""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine import Engine

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("tandem_requests", "Finished generation requests", ["finish_reason", "code"])
TTFT = Histogram("tandem_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = Histogram("tandem_inter_token_latency_seconds", "Time between streamed responses", buckets=_LATENCY)
E2E = Histogram("tandem_e2e_latency_seconds", "Request latency, receipt to last token", buckets=_LATENCY)


class EngineCollector:
    """Reads the engine's counters and queues when Prometheus scrapes; nothing on the hot path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        load = self.engine.load()
        ex = self.engine.core.executor.stats
        blocks = self.engine.core.blocks
        gauges = {
            "tandem_waiting_requests": ("Requests waiting to be scheduled (queue depth)", load.waiting),
            "tandem_running_requests": ("Requests holding KV blocks", load.running),
            "tandem_kv_blocks_used": ("KV blocks owned by requests", load.kv_blocks_used),
            "tandem_kv_blocks_cached": ("KV blocks findable in the prefix cache", load.kv_blocks_cached),
            "tandem_kv_blocks_total": ("KV blocks in the pool", load.kv_blocks_total),
            "tandem_kv_usage_ratio": ("Owned KV blocks / all", load.kv_blocks_used / max(1, load.kv_blocks_total)),
            "tandem_prefix_cache_hit_ratio": ("Prompt tokens served from the prefix cache", blocks.stats.hit_rate),
            "tandem_device_idle_ratio": ("Device idle / (busy + idle) since start", ex.idle_fraction),
            "tandem_mean_step_tokens": ("Tokens per step since start (batch size)", ex.tokens / max(1, ex.steps)),
            "tandem_mean_step_seconds": ("Device busy time per step since start", ex.busy_seconds / max(1, ex.steps)),
            "tandem_output_tokens_per_second": ("Output tokens/s over the last 10 s", load.output_tokens_per_second),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "tandem_steps": ("Engine steps", ex.steps),
            "tandem_step_tokens": ("Tokens computed in steps", ex.tokens),
            "tandem_device_busy_seconds": ("Device busy time (forward + sampling)", ex.busy_seconds),
            "tandem_device_idle_seconds": ("Device idle time while work was pending", ex.idle_seconds),
            "tandem_host_prepare_seconds": ("Host batch preparation time", ex.prepare_seconds),
            "tandem_preemptions": ("Requests preempted (recompute)", self.engine.core.num_preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


def start(engine: Engine, host: str, port: int) -> int:
    REGISTRY.register(EngineCollector(engine))
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
