"""A step's batch: ragged rows on the host, flattened into one int64 buffer, viewed on the device.

All integer metadata of a step travels in one buffer (one host-to-device copy on CUDA, none
on the CPU), and masks are built on the device from it.

Rows may hold placeholder tokens (engine.device.placeholders), resolved on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.engine.device.attention import DecodeGroup, PagedReads, PrefillSpan, StepAttention
from tandem.engine.device.kv_cache import KVCache
from tandem.engine.device.placeholders import resolve_placeholders
from tandem.engine.device.sampling import GrammarMasks, SampleSpec

# What one more decode attention call costs, in padded key slots, per device type. Grouping
# rows of similar context length trades padding (gathered, attended-over keys that are masked
# off) for calls. On the CPU a call costs about what gathering ~1k slots does; on a GPU a few
# kernel launches cost what moving tens of thousands of slots does (a guess until measured).
DECODE_GROUP_COST_SLOTS = {"cpu": 1024, "cuda": 16384}
DEFAULT_GROUP_COST = 1024
# NOTE: the paged kernel runs one program per query token, so a fresh prompt of L tokens reads
# ~L²/2 keys where SDPA's tiles read ~L²/256; short prompts go to the kernel anyway, since each
# SDPA call costs a launch per layer per prompt on the host (the H200 host profile: 13% of a
# saturated async-overlap run). 512 is where that estimate crosses over: to tune on a GPU.
PAGED_PREFILL_MAX = 512
NO_GROUPING = 1 << 62  # the fused CPU kernel reads only each row's own slots: padding is free


def decode_group_sizes(lengths: np.ndarray, cost: int = DEFAULT_GROUP_COST) -> list[int]:
    """Split lengths sorted longest first into consecutive groups, each padded to its first
    (longest) member, minimizing padded slots + `cost` per group (exact, O(n^2) vectorized)."""
    n = len(lengths)
    if cost >= NO_GROUPING or n <= 1:  # padding is free (fused kernel): skip the per-step DP
        return [n] if n else []
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    base = -np.arange(n) * lengths  # best[j] - j * l[j] + i * l[j] = cost of rows j..i-1 padded to l[j]
    for i in range(1, n + 1):
        totals = best[:i] + base[:i] + i * lengths[:i]
        cut[i] = int(np.argmin(totals))
        best[i] = totals[cut[i]] + cost
    sizes, i = [], n
    while i:
        sizes.append(i - int(cut[i]))
        i = int(cut[i])
    return sizes[::-1]


@dataclass
class StepRow:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    token_ids: np.ndarray  # int64, the tokens whose K/V this step computes (placeholders allowed)
    start: int  # position of token_ids[0]; tokens before it are already in the cache
    block_table: list[int]  # covers positions [0, start + len(token_ids))
    sample: SampleSpec | None = None  # None for a prefill chunk that does not reach the end
    forks: list[SampleSpec] = field(default_factory=list)  # more samples of the same logits (n > 1)


@dataclass
class StepBatch:
    rows: list[StepRow]
    grammar: GrammarMasks | None = None  # the constrained rows' masks (maybe filled after launch)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV blocks, after the forward


Span = tuple[int, int]  # (offset, length) of one part of HostBatch.flat


@dataclass(frozen=True)
class Sections:
    """Where each part of a step's integers lies in HostBatch.flat."""

    input_ids: Span
    positions: Span
    slot_mapping: Span
    decode_rows: Span
    decode_ctx: Span
    decode_slots: Span
    prefill_slots: Span
    sample_rows: Span
    copy_src: Span
    copy_dst: Span
    paged_queries: Span  # the paged kernel's queries: flattened index, table row and keys of each
    paged_table_of: Span
    paged_lens: Span
    paged_tables: Span  # [rows, table_width] block ids


@dataclass
class HostBatch:
    flat: np.ndarray  # every integer the device needs, int64
    sections: Sections
    num_tokens: int
    decode_groups: list[tuple[int, int]]  # (rows, padded context) of each decode attention group
    prefills: list[tuple[int, int, int, int]]  # (q_start, q_end, first position, context length), outside the kernel
    attended_keys: int  # sum over query tokens of the keys each attends to (causal)
    has_placeholders: bool
    max_context: int  # longest context any row attends over
    table_width: int = 0  # with a paged kernel: blocks per row of the paged_tables section


@dataclass
class PreparedStep:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    attention: StepAttention
    sample_rows: torch.Tensor  # flattened index of the last token of each sampling row (once per sample)
    copy_src: torch.Tensor  # KV slots copied to copy_dst once the forward has written them
    copy_dst: torch.Tensor


_PAD = np.zeros(1, np.int64)


def build_host_batch(
    batch: StepBatch, block_size: int, group_cost: int = DEFAULT_GROUP_COST, paged: bool = False
) -> HostBatch:
    """Flatten the ragged rows, vectorized over tokens (Python loops only over rows). `paged`:
    attention reads the cache in place through block tables (a paged kernel), so decode rows
    and chunks over a cached prefix get tables instead of slot lists."""
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
    decode = decode[np.argsort(-ends[decode], kind="stable")]
    groups, decode_slots, at = [], [], 0
    if paged:  # one group: the kernel reads only each row's own blocks
        group_cost = NO_GROUPING
    for size in decode_group_sizes(ends[decode], group_cost) if decode.size else []:
        members = decode[at : at + size]
        ctx = np.arange(int(ends[members[0]]))
        if not paged:
            decode_slots.append((tables[members][:, ctx // bs] * bs + ctx % bs).ravel())
        groups.append((size, len(ctx)))
        at += size

    # the kernel's share with `paged`: every query of a decode row, of a chunk over a cached
    # prefix, and of a short fresh prompt (one launch per layer instead of one SDPA per prompt)
    by_kernel = ((q_lens == 1) | (starts > 0) | (q_lens <= PAGED_PREFILL_MAX)) if paged else q_lens <= 1
    prefill_slots, prefills = [], []
    for p in np.nonzero(~by_kernel)[0]:
        if starts[p]:  # a chunk that starts at 0 attends over its own new keys: no slots
            pos = np.arange(ends[p])
            prefill_slots.append(tables[p, pos // bs] * bs + pos % bs)
        prefills.append((int(cu[p]), int(cu[p + 1]), int(starts[p]), int(ends[p])))

    ids = np.concatenate([r.token_ids for r in rows])
    sample_rows = np.array(
        [cu[i + 1] - 1 for i, r in enumerate(rows) if r.sample is not None for _ in range(1 + len(r.forks))],
        dtype=np.int64,
    )
    copies = np.array(batch.copies, dtype=np.int64).reshape(-1, 2)
    in_block = np.arange(bs)
    none = np.zeros(0, np.int64)
    queries = table_of = lens = paged_tables = none
    if paged:
        queries = np.nonzero(by_kernel[owner])[0]
        table_of = (np.cumsum(by_kernel) - 1)[owner[queries]]
        lens = positions[queries] + 1
        paged_tables = tables[by_kernel].ravel()
    parts = dict(
        input_ids=ids,
        positions=positions,
        slot_mapping=slot_mapping,
        decode_rows=cu[decode],
        decode_ctx=ends[decode],
        decode_slots=np.concatenate(decode_slots) if decode_slots else none,
        prefill_slots=np.concatenate(prefill_slots) if prefill_slots else none,
        sample_rows=sample_rows,
        copy_src=(copies[:, :1] * bs + in_block).ravel(),
        copy_dst=(copies[:, 1:] * bs + in_block).ravel(),
        paged_queries=queries,
        paged_table_of=table_of,
        paged_lens=lens,
        paged_tables=paged_tables,
    )
    # NOTE: every section starts 16-byte aligned (an even int64 offset). Triton specializes a
    # kernel on its pointers' alignment: unaligned views compiled new variants mid-serving.
    spans, pieces, offset = {}, [], 0
    for name, part in parts.items():
        spans[name] = (offset, len(part))
        pieces.append(part.astype(np.int64, copy=False))
        if len(part) % 2:
            pieces.append(_PAD)
        offset += len(part) + len(part) % 2
    sections = Sections(**spans)
    flat = np.concatenate(pieces)
    # each query at position p attends over p + 1 keys
    attended = int(positions.sum()) + total
    width = tables.shape[1] if paged else 0
    return HostBatch(flat, sections, total, groups, prefills, attended, bool((ids < 0).any()), int(ends.max()), width)


def device_step(
    host: HostBatch,
    flat: torch.Tensor,
    kv: KVCache,
    prev_tokens: torch.Tensor | None,
    fused_decode=None,
    paged_kernel=None,
) -> PreparedStep:
    """Views of the device copy of `host.flat`, placeholders resolved, masks built. With
    `paged_kernel` (a host batch built `paged`), it serves every query that reads the cache."""

    def section(span: Span) -> torch.Tensor:
        offset, length = span
        return flat[offset : offset + length]

    ids = section(host.sections.input_ids)
    if host.has_placeholders:
        if prev_tokens is None:
            raise RuntimeError("step has placeholder tokens but no previous step to resolve them from")
        ids = resolve_placeholders(ids, prev_tokens)
    device = flat.device
    decode_rows, decode_ctx, decode_slots = (
        section(host.sections.decode_rows),
        section(host.sections.decode_ctx),
        section(host.sections.decode_slots),
    )
    paged = None
    if host.table_width:
        assert paged_kernel is not None, "a paged host batch needs the paged kernel"
        tables = section(host.sections.paged_tables).view(-1, host.table_width)
        sec = host.sections
        queries, table_of, lens = section(sec.paged_queries), section(sec.paged_table_of), section(sec.paged_lens)
        paged = PagedReads(queries, table_of, lens, tables, kv.layout.block_size, paged_kernel)
    decodes, row, at = [], 0, 0
    for size, length in host.decode_groups if paged is None else []:
        ctx = decode_ctx[row : row + size]
        mask = None  # the fused kernel reads each row's length; SDPA needs the padding masked
        if fused_decode is None:
            mask = (torch.arange(length, device=device)[None, :] < ctx[:, None])[:, None, None, :]
        slots = decode_slots[at : at + size * length].view(size, length)
        decodes.append(DecodeGroup(decode_rows[row : row + size], slots, mask, ctx))
        row, at = row + size, at + size * length
    prefill_slots = section(host.sections.prefill_slots)
    spans, at = [], 0
    for q_start, q_end, first, context in host.prefills:
        span_slots = span_mask = None
        if first > 0:  # causal, offset by the tokens already in the cache
            q_pos = torch.arange(first, first + q_end - q_start, device=device)
            span_mask = (torch.arange(context, device=device)[None, :] <= q_pos[:, None])[None, None]
            span_slots, at = prefill_slots[at : at + context], at + context
        spans.append(PrefillSpan(q_start, q_end, span_slots, span_mask))
    attention = StepAttention(
        kv=kv,
        slot_mapping=section(host.sections.slot_mapping),
        decodes=decodes,
        prefills=spans,
        max_context=host.max_context,
        fused_decode=fused_decode,
        paged=paged,
    )
    return PreparedStep(
        ids[None],
        section(host.sections.positions)[None],
        attention,
        section(host.sections.sample_rows),
        section(host.sections.copy_src),
        section(host.sections.copy_dst),
    )
