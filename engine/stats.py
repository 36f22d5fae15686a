"""The engine's load and counters: one dataclass pair, the single source that every consumer
renders (the InfoService's GetLoad, Prometheus metrics, ORCA load reports) by looping over its
fields.

Each field states, in its `metadata`, everything about it: `read`, how the engine thread reads
it off the core; `metric` ("gauge" or "counter"), `name` and `doc`, how Prometheus shows it (a
field without `metric` is not exported on its own); `orca`, its name among an ORCA load
report's named metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.engine.host.core import EngineCore

Read = Callable[["EngineCore"], float]


def _stat(read: Read, metric: str = "", name: str = "", doc: str = "", orca: str = "", default: Any = None) -> Any:
    meta: dict[str, Any] = {"read": read, "metric": metric, "name": name, "doc": doc, "orca": orca}
    return field(metadata=meta) if default is None else field(default=default, metadata=meta)


@dataclass(frozen=True)
class Load:
    """What a load balancer needs (the fields of tandem.v1's GetLoadResponse)."""

    waiting: int = _stat(
        lambda c: len(c.waiting),
        "gauge",
        "tandem_waiting_requests",
        "Requests waiting to be scheduled (queue depth)",
        orca="waiting_requests",
    )
    running: int = _stat(
        lambda c: len(c.running), "gauge", "tandem_running_requests", "Requests holding KV blocks", "running_requests"
    )
    kv_blocks_used: int = _stat(
        lambda c: c.blocks.num_used, "gauge", "tandem_kv_blocks_used", "KV blocks owned by requests"
    )
    kv_blocks_cached: int = _stat(
        lambda c: c.blocks.num_cached, "gauge", "tandem_kv_blocks_cached", "KV blocks findable in the prefix cache"
    )
    kv_blocks_free: int = _stat(lambda c: c.blocks.num_free)
    kv_blocks_total: int = _stat(
        lambda c: c.blocks.num_blocks, "gauge", "tandem_kv_blocks_total", "KV blocks in the pool"
    )
    output_tokens_per_second: float = _stat(
        lambda c: 0.0,  # a window over the published steps: Engine.stats() fills it in
        "gauge",
        "tandem_output_tokens_per_second",
        "Output tokens/s over the last 10 s",
        orca="output_tokens_per_second",
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

    steps: int = _stat(lambda c: c.device_stats.steps, "counter", "tandem_steps", "Engine steps", default=0)
    step_tokens: int = _stat(
        lambda c: c.device_stats.tokens, "counter", "tandem_step_tokens", "Tokens computed in steps", default=0
    )
    device_busy_seconds: float = _stat(
        lambda c: c.device_stats.busy_seconds,
        "counter",
        "tandem_device_busy_seconds",
        "Device busy time (forward + sampling)",
        default=0.0,
    )
    device_idle_seconds: float = _stat(  # gaps between busy periods while work was pending
        lambda c: c.device_stats.idle_seconds,
        "counter",
        "tandem_device_idle_seconds",
        "Device idle time while work was pending",
        default=0.0,
    )
    host_prepare_seconds: float = _stat(
        lambda c: c.device_stats.prepare_seconds,
        "counter",
        "tandem_host_prepare_seconds",
        "Host batch preparation time",
        default=0.0,
    )
    preemptions: int = _stat(
        lambda c: c.num_preemptions, "counter", "tandem_preemptions", "Requests preempted (recompute)", default=0
    )
    prefix_cache_hit_rate: float = _stat(
        lambda c: c.blocks.stats.hit_rate,
        "gauge",
        "tandem_prefix_cache_hit_ratio",
        "Prompt tokens served from the prefix cache",
        default=0.0,
    )
    grammar_mask_seconds: float = _stat(  # filling structured output's masks, on the engine thread
        lambda c: c.stats.mask_seconds, default=0.0
    )
    graph_replays: int = _stat(lambda c: _graph_replays(c), default=0)  # decode steps run from a CUDA graph

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
