"""Paged attention, plugged into transformers through its attention-function registry.

transformers' own modeling code runs unchanged: it computes q/k/v (with RoPE, q/k norms,
biases...) and hands them to the function registered under ATTENTION_NAME. We write the new
keys and values into their cache slots and attend over each sequence's own blocks.

The step's whole batch is one flattened sequence of T tokens (batch dimension 1). Rows with a
single query token (decodes) attend in batched calls, one per group of rows of similar context
length, over a gathered [rows, context] view of their blocks padded to the group's longest;
multi-token prefill chunks attend one chunk at a time with a causal mask offset by the chunk's
start (a chunk that starts the sequence attends over its own new keys, with no gather). No
[T, T] mask is ever built. With a paged kernel (Triton on CUDA), decode rows and chunks over a
cached prefix skip the gather: the kernel reads the pool through block tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from tandem.engine.device.kv_cache import KVCache

ATTENTION_NAME = "tandem_paged"
STEP_KWARG = "tandem_step"


@dataclass
class PrefillSpan:
    start: int  # first query token in the flattened batch
    end: int
    slots: torch.Tensor | None  # [context] cache slots in position order; None when the chunk starts at 0
    mask: torch.Tensor | None  # [1, 1, q, context] bool; None means a plain square causal mask


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # [b] flattened index of each single-token row
    slots: torch.Tensor  # [b, L] cache slots of each row's context, padded to the group's longest
    mask: torch.Tensor | None  # [b, 1, 1, L] True where the slot is part of the context (SDPA path)
    lens: torch.Tensor  # [b] context length of each row


@dataclass
class PagedReads:
    """The queries a paged kernel serves (decode rows, chunks over a cached prefix): it reads
    their K/V in place through block tables (tandem.engine.device.paged_triton)."""

    queries: torch.Tensor  # [P] flattened index of each query
    table_of: torch.Tensor  # [P] its row of `tables`
    lens: torch.Tensor  # [P] keys it attends (causal)
    tables: torch.Tensor  # [R, W] block ids
    block_size: int
    kernel: Callable


@dataclass
class StepAttention:
    """Per-step attention metadata, built once per step and read by every layer."""

    kv: KVCache
    slot_mapping: torch.Tensor  # [T] slot each new token's K/V is written to
    decodes: list[DecodeGroup]
    prefills: list[PrefillSpan]
    max_context: int  # longest context any row attends over
    fused_decode: Callable | None = None  # tandem.engine.device.paged_cpu's kernel: reads the cache in place
    paged: PagedReads | None = None  # instead of decode groups and slot lists


def paged_attention_forward(
    module: Any,  # the transformers attention module: its layer_idx says which cache layer
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    step: StepAttention | None = kwargs.get(STEP_KWARG)
    if step is None:
        raise RuntimeError(f"'{ATTENTION_NAME}' attention needs the step metadata kwarg '{STEP_KWARG}'")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise RuntimeError(f"'{ATTENTION_NAME}' attention does not implement '{unsupported}'")
    window = kwargs.get("sliding_window")
    if window is not None and window < step.max_context:
        raise RuntimeError(f"'{ATTENTION_NAME}' attention does not implement a {window}-token sliding window")
    layer = module.layer_idx
    k_cache, v_cache = step.kv.k[layer], step.kv.v[layer]  # [slots, KVH, D]
    k_cache.index_copy_(0, step.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, step.slot_mapping, value[0].transpose(0, 1))

    q = query[0].transpose(0, 1)  # [T, H, D]
    out = torch.empty_like(q)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if (paged := step.paged) is not None and paged.queries.numel():
        with torch.profiler.record_function("tandem::paged_attention"):
            qp = q.index_select(0, paged.queries)
            op = paged.kernel(qp, k_cache, v_cache, paged.tables, paged.table_of, paged.lens, paged.block_size, scale)
        out.index_copy_(0, paged.queries, op.to(out.dtype))
    for group in step.decodes:
        if step.fused_decode is not None:
            qd = q.index_select(0, group.rows)  # [b, H, D]
            with torch.profiler.record_function("tandem::paged_decode"):  # visible to profilers
                od = step.fused_decode(qd, k_cache, v_cache, group.slots, group.lens, scale)
            out.index_copy_(0, group.rows, od)
            continue
        qd = q.index_select(0, group.rows).unsqueeze(2)  # [b, H, 1, D]
        kd, vd = (t.transpose(1, 2) for t in step.kv.gather(layer, group.slots))  # [b, KVH, L, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=scaling, enable_gqa=True)
        out.index_copy_(0, group.rows, od.squeeze(2))
    for span in step.prefills:
        qp = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if span.slots is None:  # the chunk is the whole context: its own keys, no gather
            kp, vp = key[:, :, span.start : span.end], value[:, :, span.start : span.end]
        else:
            kp, vp = (t.transpose(0, 1).unsqueeze(0) for t in step.kv.gather(layer, span.slots))  # [1, KVH, ctx, D]
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None, scale=scaling, enable_gqa=True
        )
        out[span.start : span.end] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
