"""Model FLOPs per step and the matmul roofline they are measured against, and the memory
side beside it.

The roofline is the model's own linear layers (every projection, the MLP and the LM head) at
the step's batch size, run back to back into preallocated outputs: no attention, no norms,
no Python beyond the loop. Achieved FLOP/s counts the same GEMMs plus attention's two
products (scores and weighted values) over the keys each query really attends to; padding
and gathers count as time, not FLOPs.

The memory side: the bytes a decode step must read (every weight once, every attended key's K
and V once) against the measured read bandwidth. At 64 rows the matmuls are compute-bound (each
weight byte feeds 32 FLOPs in float32) and attention is memory-bound (each K/V byte feeds a
fraction of a FLOP), and the two run one after the other, so a step can take no less than
the matmuls at the roofline plus the K/V at the read bandwidth: the `limit`. `ceiling` is the
roofline fraction a step exactly at that limit would reach.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from tandem.engine.device.executor import StepTrace


@dataclass(frozen=True)
class ModelFlops:
    linears: list[tuple[int, int]]  # (in, out) of every linear layer but the LM head
    head: tuple[int, int]  # (hidden, vocab)
    attention_dims: int  # layers * query heads * head dim
    kv_bytes_per_key: int = 0  # K and V of one token, every layer
    weight_bytes: int = 0

    @property
    def body_params(self) -> int:
        return sum(i * o for i, o in self.linears)

    def matmul(self, s: StepTrace) -> float:
        return 2.0 * s.tokens * self.body_params + 2.0 * s.sampled_rows * self.head[0] * self.head[1]

    def step(self, s: StepTrace) -> float:
        head = self.head[0] * self.head[1]
        return (
            2.0 * s.tokens * self.body_params
            + 2.0 * s.sampled_rows * head
            + 4.0 * s.attended_keys * self.attention_dims
        )


def model_flops(model: Any) -> ModelFlops:  # a transformers PreTrainedModel
    head = model.get_output_embeddings()
    linears = [
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    ]
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dims = text.num_hidden_layers * text.num_attention_heads * head_dim
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    itemsize = head.weight.element_size()
    kv_per_key = 2 * text.num_hidden_layers * kv_heads * head_dim * itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelFlops(linears, (head.in_features, head.out_features), dims, kv_per_key, weights)


def matmul_roofline(model: Any, batch: int, repeats: int = 5) -> float:
    """FLOP/s of the model's linear layers (LM head included) at `batch` rows, best of `repeats`."""
    head = model.get_output_embeddings()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head] + [head.weight]
    p = weights[0]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=p.dtype, device=p.device) for w in weights}
    outputs = [torch.empty(batch, w.shape[0], dtype=p.dtype, device=p.device) for w in weights]
    flops = sum(2.0 * batch * w.shape[0] * w.shape[1] for w in weights)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms caches and kernels
            _sync(p.device)
            start = time.perf_counter()
            for w, out in zip(weights, outputs):
                torch.mm(inputs[w.shape[1]], w.t(), out=out)
            _sync(p.device)
            best = min(best, time.perf_counter() - start)
    return flops / best


def read_bandwidth(device: torch.device, nbytes: int = 2**29, repeats: int = 5) -> float:
    """Bytes/s of a plain sequential read (a sum over `nbytes` of float32), best of `repeats`."""
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            data.sum()
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Utilisation:
    batch: int  # rows in a saturated decode step
    steps: int  # saturated decode steps seen
    achieved_flops: float  # FLOP/s over those steps
    roofline_flops: float  # matmul roofline at `batch` rows
    all_steps_flops: float  # FLOP/s over every step of the run
    # The memory side, per saturated decode step (means); bandwidth 0 when not measured.
    step_seconds: float = 0.0
    matmul_flops: float = 0.0
    kv_bytes: float = 0.0
    weight_bytes: int = 0
    read_bandwidth: float = 0.0  # bytes/s

    @property
    def fraction(self) -> float:
        return self.achieved_flops / self.roofline_flops if self.roofline_flops else 0.0

    @property
    def limit_seconds(self) -> float:
        """The least a step can take: its matmuls at the roofline, then its K/V at the read bandwidth."""
        if not self.read_bandwidth or not self.roofline_flops:
            return 0.0
        return self.matmul_flops / self.roofline_flops + self.kv_bytes / self.read_bandwidth

    @property
    def memory_seconds(self) -> float:
        """Every byte the step reads (weights and K/V) at the read bandwidth."""
        return (self.weight_bytes + self.kv_bytes) / self.read_bandwidth if self.read_bandwidth else 0.0

    @property
    def ceiling(self) -> float:
        """The roofline fraction of a step that took exactly `limit_seconds`."""
        limit = self.limit_seconds
        return self.fraction * self.step_seconds / limit if limit else 0.0

    def figures(self) -> dict:
        return dict(
            fraction=self.fraction,
            limit_seconds=self.limit_seconds,
            memory_seconds=self.memory_seconds,
            ceiling=self.ceiling,
        )


def utilisation(
    trace: list[StepTrace], flops: ModelFlops, roofline_at, batch: int, bandwidth: float = 0.0
) -> Utilisation | None:
    """Decode at saturation: steps of `batch` single-token rows and nothing else."""
    full = [s for s in trace if s.decode_rows == s.tokens == batch]
    busy = sum(s.busy_seconds for s in trace)
    overall = sum(map(flops.step, trace)) / busy if busy else 0.0
    if not full:
        return None
    seconds = sum(s.busy_seconds for s in full)
    achieved = sum(map(flops.step, full)) / seconds
    n = len(full)
    return Utilisation(
        batch,
        n,
        achieved,
        roofline_at(batch),
        overall,
        step_seconds=seconds / n,
        matmul_flops=sum(map(flops.matmul, full)) / n,
        kv_bytes=sum(s.attended_keys for s in full) * flops.kv_bytes_per_key / n,
        weight_bytes=flops.weight_bytes,
        read_bandwidth=bandwidth,
    )
