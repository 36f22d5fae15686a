"""A step's batch: ragged rows on the host, flattened into one int64 buffer, viewed on the device.

All integer metadata of a step travels in one buffer (one host-to-device copy on CUDA, none
on the CPU), and masks are built on the device from it.

Placeholders: a token id of -(r + 1) in a row stands for "the token sampled in row r of the
previous step", not yet read back to the host. The async-overlap mode plans step N+1 before
step N's tokens are known; the device resolves these from step N's output tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import PrefillSpan, StepAttention
from engine.kv_cache import KVCache
from engine.sampling import SampleSpec


def placeholder(row: int) -> int:
    return -(row + 1)


@dataclass
class StepRow:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    token_ids: np.ndarray  # int64, the tokens whose K/V this step computes (placeholders allowed)
    start: int  # position of token_ids[0]; tokens before it are already in the cache
    block_table: list[int]  # covers positions [0, start + len(token_ids))
    sample: SampleSpec | None = None  # None for a prefill chunk that does not reach the end


@dataclass
class StepBatch:
    rows: list[StepRow]


@dataclass
class HostBatch:
    flat: np.ndarray  # every integer the device needs, int64
    sections: dict[str, tuple[int, int]]  # name -> (offset, length) in `flat`
    num_tokens: int
    decode_shape: tuple[int, int]  # (rows, padded context)
    prefills: list[tuple[int, int, int, int]]  # (q_start, q_end, first position, context length)
    has_placeholders: bool


@dataclass
class PreparedStep:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    attention: StepAttention
    sample_rows: torch.Tensor  # flattened index of the last token of each sampling row


def build_host_batch(batch: StepBatch, block_size: int) -> HostBatch:
    """Flatten the ragged rows, vectorized over tokens (Python loops only over rows)."""
    rows, bs = batch.rows, block_size
    q_lens = np.fromiter((len(r.token_ids) for r in rows), dtype=np.int64, count=len(rows))
    starts = np.fromiter((r.start for r in rows), dtype=np.int64, count=len(rows))
    ends = starts + q_lens
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    total = int(cu[-1])
    owner = np.repeat(np.arange(len(rows)), q_lens)
    positions = starts[owner] + np.arange(total) - cu[owner]

    tables = np.zeros((len(rows), max(len(r.block_table) for r in rows)), dtype=np.int64)
    for i, r in enumerate(rows):
        tables[i, : len(r.block_table)] = r.block_table
    slot_mapping = tables[owner, positions // bs] * bs + positions % bs

    decode = np.nonzero(q_lens == 1)[0]
    ctx = np.arange(int(ends[decode].max()) if decode.size else 0)
    decode_slots = tables[decode][:, ctx // bs] * bs + ctx % bs

    prefill_slots, prefills = [], []
    for i in np.nonzero(q_lens > 1)[0]:
        pos = np.arange(ends[i])
        prefill_slots.append(tables[i, pos // bs] * bs + pos % bs)
        prefills.append((int(cu[i]), int(cu[i + 1]), int(starts[i]), int(ends[i])))

    ids = np.concatenate([r.token_ids for r in rows])
    sample_rows = np.array([cu[i + 1] - 1 for i, r in enumerate(rows) if r.sample is not None], dtype=np.int64)
    parts = dict(
        input_ids=ids,
        positions=positions,
        slot_mapping=slot_mapping,
        decode_rows=cu[decode],
        decode_ctx=ends[decode],
        decode_slots=decode_slots.ravel(),
        prefill_slots=np.concatenate(prefill_slots) if prefill_slots else np.zeros(0, np.int64),
        sample_rows=sample_rows,
    )
    sections, offset = {}, 0
    for name, part in parts.items():
        sections[name] = (offset, len(part))
        offset += len(part)
    flat = np.concatenate([p.astype(np.int64, copy=False) for p in parts.values()])
    return HostBatch(flat, sections, total, decode_slots.shape, prefills, bool((ids < 0).any()))


def device_step(host: HostBatch, flat: torch.Tensor, kv: KVCache, prev_tokens: torch.Tensor | None) -> PreparedStep:
    """Views of the device copy of `host.flat`, placeholders resolved, masks built."""

    def section(name: str) -> torch.Tensor:
        offset, length = host.sections[name]
        return flat[offset : offset + length]

    ids = section("input_ids")
    if host.has_placeholders:
        if prev_tokens is None:
            raise RuntimeError("step has placeholder tokens but no previous step to resolve them from")
        ids = resolve_placeholders(ids, prev_tokens)
    bd, ld = host.decode_shape
    device = flat.device
    decode_ctx = section("decode_ctx")
    decode_mask = (torch.arange(ld, device=device)[None, :] < decode_ctx[:, None])[:, None, None, :]
    prefill_slots = section("prefill_slots")
    spans, at = [], 0
    for q_start, q_end, first, ctx in host.prefills:
        mask = None
        if first > 0:  # causal, offset by the tokens already in the cache
            q_pos = torch.arange(first, first + q_end - q_start, device=device)
            mask = (torch.arange(ctx, device=device)[None, :] <= q_pos[:, None])[None, None]
        spans.append(PrefillSpan(q_start, q_end, prefill_slots[at : at + ctx], mask))
        at += ctx
    attention = StepAttention(
        kv=kv,
        slot_mapping=section("slot_mapping"),
        decode_rows=section("decode_rows"),
        decode_slots=section("decode_slots").view(bd, ld),
        decode_mask=decode_mask,
        prefills=spans,
        max_context=max([ld] + [p[3] for p in host.prefills]),
    )
    return PreparedStep(ids[None], section("positions")[None], attention, section("sample_rows"))


def resolve_placeholders(ids: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """Replace each placeholder -(r + 1) by prev_tokens[r], on the device."""
    return torch.where(ids < 0, prev_tokens[(-ids - 1).clamp(min=0)], ids)
