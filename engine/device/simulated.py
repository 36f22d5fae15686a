"""A simulated executor: no model, a step takes what a cost model says (tandem sim).

The cost model is linear in what a step computes: the tokens it runs (prefill chunks and
decode tokens), its decode rows, the keys its queries attend to, and the rows that reach the
LM head. `tandem sim calibrate` fits it on the real executor of a model and device.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tandem.engine.device.batch import HostBatch, StepBatch, build_host_batch
from tandem.engine.device.executor import Executor, ExecutorStats, StepHandle, StepResult, TokenChoice

FEATURES = ("base", "tokens", "decode_rows", "kilo_keys", "sampled_rows")


def step_features(host: HostBatch) -> list[float]:
    """One step's features, in FEATURES order."""
    decode_rows = sum(size for size, _ in host.decode_groups)
    return [1.0, host.num_tokens, decode_rows, host.attended_keys / 1e3, host.sections.sample_rows[1]]


@dataclass(frozen=True)
class Overheads:
    """Serving time outside the engine's steps, per request and per step (measured by
    `tandem sim calibrate --serve`; zero when fitted in-process)."""

    admit_s: float = 0.0  # client send -> the request in the engine's queue (gRPC, validation)
    step_gap_s: float = 0.0  # the engine loop between two steps (handing outputs over, commands)
    deliver_s: float = 0.0  # a step's end -> its tokens at the client


@dataclass(frozen=True)
class CostModel:
    """Seconds per step = coefficients · step_features(step)."""

    coefficients: tuple[float, ...]
    model: str = ""
    device: str = ""
    kv_blocks: int = 0  # the real engine's KV pool, so the simulation preempts where it would
    block_size: int = 16
    fit: dict = field(default_factory=dict)  # how well it fits its calibration steps
    overheads: Overheads = Overheads()
    # Quantiles (0th to 100th percentile) of real less fitted step time, in seconds, on the
    # calibration's steps; each simulated step draws one. Additive: what spreads step times on
    # a shared machine (other processes, the GIL, the allocator) costs the same whatever the
    # step computes. Empty: every step as fitted.
    noise: tuple[float, ...] = ()

    def seconds(self, host: HostBatch, u: float | None = None) -> float:
        """The step's time; `u` in [0, 1) draws its noise (None: as fitted)."""
        fitted = float(np.dot(self.coefficients, step_features(host)))
        if u is not None and self.noise:
            fitted += float(np.interp(u, np.linspace(0, 1, len(self.noise)), self.noise))
        return max(0.0, fitted)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        data["coefficients"] = tuple(data["coefficients"])
        data["overheads"] = Overheads(**data.get("overheads", {}))
        data["noise"] = tuple(data.get("noise", ()))
        return cls(**data)


@dataclass
class SimulatedStep(StepHandle):
    tokens: list[int] = field(default_factory=list)


class SimulatedExecutor(Executor):
    """The executor interface (launch, collect) without a device: each launch advances the
    simulation's clock by the cost model's step time and samples token ids at random (from
    `first_token` up: below it are the presets' special ids, EOS among them)."""

    def __init__(
        self,
        cost: CostModel,
        vocab_size: int,
        advance: Callable[[float], None],
        seed: int = 0,
        first_token: int = 4,
    ) -> None:  # NOTE: no Executor.__init__: there is no model, KV pool or device
        self.cost = cost
        self.block_size = cost.block_size
        self.vocab_size = vocab_size
        self.advance = advance
        self.rng = np.random.default_rng(seed)
        self.first_token = first_token
        self.stats = ExecutorStats()
        self.device = torch.device("cpu")  # host memory for grammar masks

    def launch(self, batch: StepBatch, prev: StepHandle | None = None) -> StepHandle:
        host = build_host_batch(batch, self.block_size)
        sampled = sum(1 + len(row.forks) for row in batch.rows if row.sample is not None)
        seconds = self.cost.seconds(host, self.rng.random())
        self.advance(seconds)
        self.stats.record(host, seconds, None)
        self.stats.tokens += host.num_tokens
        if batch.grammar is not None:
            batch.grammar.done()  # no sampling to wait: constraints are not simulated
        tokens = self.rng.integers(self.first_token, self.vocab_size, sampled).tolist()
        return SimulatedStep(host, None, None, tokens=tokens)

    def collect(self, handle: StepHandle) -> StepResult:
        assert isinstance(handle, SimulatedStep)
        return StepResult([TokenChoice(t) for t in handle.tokens])

    def pause(self) -> None:
        pass
