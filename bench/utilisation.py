"""Model FLOPs per step and the matmul roofline they are measured against.

The roofline is the model's own linear layers (every projection, the MLP and the LM head) at
the step's batch size, run back to back into preallocated outputs: no attention, no norms,
no Python beyond the loop. Achieved FLOP/s counts the same GEMMs plus attention's two
products (scores and weighted values) over the keys each query really attends to; padding
and gathers count as time, not FLOPs.
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

    @property
    def body_params(self) -> int:
        return sum(i * o for i, o in self.linears)

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
    return ModelFlops(linears, (head.in_features, head.out_features), dims)


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

    @property
    def fraction(self) -> float:
        return self.achieved_flops / self.roofline_flops if self.roofline_flops else 0.0


def utilisation(trace: list[StepTrace], flops: ModelFlops, roofline_at, batch: int) -> Utilisation | None:
    """Decode at saturation: steps of `batch` single-token rows and nothing else."""
    full = [s for s in trace if s.decode_rows == s.tokens == batch]
    busy = sum(s.busy_seconds for s in trace)
    overall = sum(map(flops.step, trace)) / busy if busy else 0.0
    if not full:
        return None
    achieved = sum(map(flops.step, full)) / sum(s.busy_seconds for s in full)
    return Utilisation(batch, len(full), achieved, roofline_at(batch), overall)
