"""The engine's load and counters: one dataclass pair, the single source that every consumer
renders (the InfoService's GetLoad, Prometheus metrics, ORCA load reports) by looping over its
fields.

Each field states, in its `metadata`, everything about it: `read`, how the engine thread reads
it off the core; `metric` ("gauge" or "counter"), `name` and `doc`, how Prometheus shows it (a
field without `metric` is not exported on its own); `orca`, its name among an ORCA load
report's named metrics (empty: not one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.engine.host.core import EngineCore

Read = Callable[["EngineCore"], float]


def _field(read: Read, default: Any, metric: str = "", name: str = "", doc: str = "", orca: str = "") -> Any:
    meta = {"read": read, "metric": metric, "name": f"tandem_{name}" if name else "", "doc": doc, "orca": orca}
    return field(metadata=meta) if default is None else field(default=default, metadata=meta)


def _gauge(read: Read, name: str, doc: str, orca: str = "") -> Any:
    """A Load field: required, exported as a gauge."""
    return _field(read, None, "gauge", name, doc, orca)


def _counter(read: Read, name: str, doc: str) -> Any:
    """An EngineStats counter since start (zero by default), exported as a Prometheus counter."""
    return _field(read, 0, "counter", name, doc)


@dataclass(frozen=True)
class Load:
    """What a load balancer needs (the fields of tandem.v1's GetLoadResponse)."""

    waiting: int = _gauge(
        lambda c: len(c.waiting),
        "waiting_requests",
        "Requests waiting to be scheduled (queue depth)",
        "waiting_requests",
    )
    running: int = _gauge(
        lambda c: len(c.running), "running_requests", "Requests holding KV blocks", "running_requests"
    )
    kv_blocks_used: int = _gauge(lambda c: c.blocks.num_used, "kv_blocks_used", "KV blocks owned by requests")
    kv_blocks_cached: int = _gauge(
        lambda c: c.blocks.num_cached, "kv_blocks_cached", "KV blocks findable in the prefix cache"
    )
    kv_blocks_free: int = _field(lambda c: c.blocks.num_free, None)
    kv_blocks_total: int = _gauge(lambda c: c.blocks.num_blocks, "kv_blocks_total", "KV blocks in the pool")
    # A window over the published steps: Engine.stats() fills it in.
    output_tokens_per_second: float = _gauge(
        lambda c: 0.0, "output_tokens_per_second", "Output tokens/s over the last 10 s", "output_tokens_per_second"
    )

    def named_metrics(self) -> dict[str, float]:
        """The fields an ORCA load report carries by name."""
        return {f.metadata["orca"]: float(getattr(self, f.name)) for f in fields(Load) if f.metadata["orca"]}

    @property
    def kv_usage(self) -> float:
        """Owned KV blocks / all: what limits how many more requests fit."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class EngineStats(Load):
    """Load plus the engine's counters since start, for metrics. A snapshot: the engine thread
    publishes one after each step and each batch of commands, and other threads read only it."""

    steps: int = _counter(lambda c: c.device_stats.steps, "steps", "Engine steps")
    step_tokens: int = _counter(lambda c: c.device_stats.tokens, "step_tokens", "Tokens computed in steps")
    device_busy_seconds: float = _counter(
        lambda c: c.device_stats.busy_seconds, "device_busy_seconds", "Device busy time (forward + sampling)"
    )
    # Gaps between busy periods while work was pending.
    device_idle_seconds: float = _counter(
        lambda c: c.device_stats.idle_seconds, "device_idle_seconds", "Device idle time while work was pending"
    )
    host_prepare_seconds: float = _counter(
        lambda c: c.device_stats.prepare_seconds, "host_prepare_seconds", "Host batch preparation time"
    )
    preemptions: int = _counter(lambda c: c.num_preemptions, "preemptions", "Requests preempted (recompute)")
    prefix_cache_hit_rate: float = _field(
        lambda c: c.blocks.stats.hit_rate,
        0.0,
        "gauge",
        "prefix_cache_hit_ratio",
        "Prompt tokens served from the prefix cache",
    )
    # Filling structured output's masks, on the engine thread (benchmarks; not exported).
    grammar_mask_seconds: float = _field(lambda c: c.stats.mask_seconds, 0.0)
    graph_replays: int = _field(lambda c: _graph_replays(c), 0)  # decode steps run from a CUDA graph

    @classmethod
    def read(cls, core: EngineCore) -> EngineStats:
        """The core's counters now (on the engine thread)."""
        return cls(**{f.name: f.metadata["read"](core) for f in fields(cls)})

    @property
    def device_idle_fraction(self) -> float:
        total = self.device_busy_seconds + self.device_idle_seconds
        return self.device_idle_seconds / total if total else 0.0

    @property
    def mean_step_tokens(self) -> float:
        return self.step_tokens / max(1, self.steps)

    @property
    def mean_step_seconds(self) -> float:
        return self.device_busy_seconds / max(1, self.steps)

    def load(self) -> Load:
        return Load(**{f.name: getattr(self, f.name) for f in fields(Load)})

    def exported(self) -> list[tuple[str, str, str, float]]:
        """(kind, metric name, doc, value) for each field Prometheus shows."""
        return [
            (f.metadata["metric"], f.metadata["name"], f.metadata["doc"], getattr(self, f.name))
            for f in fields(self)
            if f.metadata["metric"]
        ]


def _graph_replays(core: EngineCore) -> int:
    graphs = getattr(core.executor, "graphs", None)  # the simulated executor has none
    return graphs.replays if graphs is not None else 0
