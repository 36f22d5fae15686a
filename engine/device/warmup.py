"""Sizing the KV pool on CUDA: what one step at the budget needs is measured before the pool
takes the rest, so the first full step cannot run out of memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tandem.engine.device.batch import StepBatch, StepRow
from tandem.engine.device.executor import Executor
from tandem.engine.device.kv_cache import KVCache, KVLayout


def step_peak_bytes(model: Any, layout: KVLayout, device: torch.device, tokens: int, rows: int, attention: str) -> int:
    """Memory one forward of `tokens` prompt tokens with `rows` logits rows takes beyond the
    weights, measured on `device` with a pool just big enough for it (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    blocks = -(-tokens // layout.block_size)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    kv = KVCache(layout, blocks, device)
    executor = Executor(model, kv, device, attention=attention)
    row = StepRow(np.full(tokens, 3, dtype=np.int64), 0, list(range(blocks)))
    with torch.inference_mode():
        step = executor.prepare(StepBatch([row]))
        executor.forward(step, torch.arange(tokens - min(rows, tokens), tokens, device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - kv.nbytes
    del executor, kv, step
    torch.cuda.empty_cache()
    return max(0, int(peak))
