"""ORCA load reports (`xds.data.orca.v3.OrcaLoadReport`) in the trailers of each tandem.v1
generation (`endpoint-load-metrics-bin`), so that a proxy's load-aware balancing (Envoy's
client_side_weighted_round_robin) weighs replicas by what they hold, not only by what it sent."""

from __future__ import annotations

import threading
import time
from collections import deque

from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport

from tandem.engine.stats import Load

TRAILER = "endpoint-load-metrics-bin"
RATE_WINDOW_S = 10.0


class RequestRate:
    """Requests finished per second over the last RATE_WINDOW_S seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def mark(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())

    def per_second(self) -> float:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            while self._times and self._times[0] < cutoff:
                self._times.popleft()
            return len(self._times) / self.window_s


def load_report(load: Load, rps: float) -> OrcaLoadReport:
    """KV occupancy is the utilisation (what limits how many more requests fit); the queue,
    running requests and output rate ride along as named metrics."""
    kv = load.kv_usage
    return OrcaLoadReport(
        application_utilization=kv,
        rps_fractional=rps,
        utilization={"kv_cache": kv},
        named_metrics=load.named_metrics(),
    )


def trailer(load: Load, rps: float) -> tuple[str, bytes]:
    return TRAILER, load_report(load, rps).SerializeToString()
